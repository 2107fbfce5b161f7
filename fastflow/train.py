"""Training, sampling and evaluation behind the ``fastflow`` command.

:func:`train` fits a registered model (:mod:`fastflow.registry`) to a data set
(:mod:`fastflow.data`) by maximum likelihood, single-process or under ``torchrun`` with
DistributedDataParallel, and leaves in its output folder ``config.json``, ``metrics.jsonl``,
``last.pt`` / ``best.pt`` (atomic, :mod:`fastflow.checkpoint`), ``samples.png`` and
``loss.png``. A run is reproducible from its seed: the data order of every epoch and the
dequantization noise of every batch are derived from ``(seed, epoch, batch)``, so ``--resume``
from a checkpoint (even one written mid-epoch) reaches the same parameters as an uninterrupted
run on the same machine.

Images are dequantized uniformly, ``y = (k + u) / L`` with ``L`` levels, and fed to the flow as
``y - 0.5``; bits/dim is ``-log p(y) / (D log 2) + log2(L)``, a bound on the discrete negative
log-likelihood. Vectors are standardised with the training split's mean and std, whose log-det
is counted, so NLLs are in the data's own units.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastflow.checkpoint import (
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from fastflow.data import DataError, DataSet, load_data, split_indices
from fastflow.registry import build_model, model_input_shape, resolve_options

__all__ = [
    "TrainConfig",
    "TrainError",
    "Preprocess",
    "train",
    "load_model",
    "log_likelihood",
    "sample",
    "auroc",
    "default_out_dir",
]

LN2 = math.log(2.0)


class TrainError(RuntimeError):
    """A training run that cannot go on (non-finite loss, incompatible ``--resume``...)."""


@dataclass
class TrainConfig:
    """Options of :func:`train` (the ``fastflow train`` flags, same names).

    Example:
        >>> cfg = TrainConfig(data="moons", model="realnvp", epochs=1, n_data=256)
        >>> cfg.batch_size
        64
    """

    model: str = "glow"
    hidden: int | None = None
    depth: int | None = None
    scales: int | None = None
    data: str = "digits"
    n_data: int | None = None
    val: float = 0.1
    test: float = 0.1
    epochs: int = 50
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    schedule: str = "cosine"
    clip_grad: float = 50.0
    weight_decay: float = 0.0
    device: str = "auto"
    dtype: str = "float32"
    autocast: str = "off"
    seed: int = 0
    out: str | None = None
    resume: str | None = None
    overwrite: bool = False  # start over in an out folder that holds a run
    save_every: int = 0
    skip_nonfinite: bool = False
    progress: bool = True
    plots: bool = True
    sample_n: int = 64
    temperature: float = 0.8
    eval_batch_size: int = 512
    threads: int = 1
    inject_nan_at: int | None = None  # testing aid: make the loss NaN at this step


# options that must match the checkpoint on --resume (the rest may change)
_RESUME_KEYS = (
    "model",
    "hidden",
    "depth",
    "scales",
    "data",
    "n_data",
    "val",
    "test",
    "seed",
    "batch_size",
    "dtype",
    "schedule",
    # the optimisation: Adam's saved state restores the old weight decay whatever the flag says,
    # and a resumed run reaches an uninterrupted run's parameters only with the same values
    "lr",
    "warmup",
    "clip_grad",
    "weight_decay",
)

# what makes a folder hold a run (a fresh run there is refused without --overwrite) ...
_RUN_STATE = ("config.json", "metrics.jsonl", "last.pt", "best.pt")
# ... and every file a run writes there (--overwrite deletes these, and only these)
_RUN_FILES = (*_RUN_STATE, "samples.png", "loss.png")


def default_out_dir(data: str, model: str) -> str:
    """``runs/<data>-<model>`` (a file's base name for a path).

    Example:
        >>> default_out_dir("/tmp/points.csv", "maf")
        'runs/points-maf'
    """
    name = os.path.splitext(os.path.basename(os.path.normpath(data)))[0] or "data"
    return os.path.join("runs", f"{name}-{model}")


# -- preprocessing ---------------------------------------------------------------------------------


class Preprocess:
    """Maps data to the flow's input and back, and knows the log-det of that map.

    Images: ``x_model = (k + u) / L - 0.5`` reshaped to the model's input shape;
    ``offset = -D log L`` (so ``log p(y) + offset`` bounds ``log P(k)``). Vectors:
    ``x_model = (x - mean) / std``; ``offset = -sum(log std)``.

    Example:
        >>> pre = Preprocess("vector", (2,), (2,), mean=[0.0, 0.0], std=[2.0, 2.0])
        >>> round(pre.offset, 4) == round(-2 * math.log(2.0), 4)
        True
    """

    def __init__(
        self,
        kind: str,
        data_shape: tuple[int, ...],
        model_shape: tuple[int, ...],
        levels: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ):
        self.kind = kind
        self.data_shape = tuple(data_shape)
        self.model_shape = tuple(model_shape)
        self.levels = levels
        self.dims = math.prod(self.data_shape)
        if kind == "image":
            self.offset = -self.dims * math.log(levels)
        else:
            self.mean = torch.tensor(mean, dtype=torch.float64)
            self.std = torch.tensor(std, dtype=torch.float64)
            self.offset = -float(torch.log(self.std).sum())

    @classmethod
    def fit(cls, ds: DataSet, train_x: Tensor, model_shape: tuple[int, ...]) -> Preprocess:
        """Build from a data set (vector mean/std from the training rows)."""
        if ds.kind == "image":
            return cls("image", ds.shape, model_shape, levels=ds.levels)
        mean = train_x.mean(0)
        std = train_x.std(0) if train_x.shape[0] > 1 else torch.ones_like(mean)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        return cls("vector", ds.shape, model_shape, mean=mean.tolist(), std=std.tolist())

    def state(self) -> dict:
        s: dict[str, Any] = {
            "kind": self.kind,
            "data_shape": list(self.data_shape),
            "model_shape": list(self.model_shape),
            "levels": self.levels,
        }
        if self.kind == "vector":
            s["mean"], s["std"] = self.mean.tolist(), self.std.tolist()
        return s

    @classmethod
    def from_state(cls, s: dict) -> Preprocess:
        return cls(
            s["kind"],
            tuple(s["data_shape"]),
            tuple(s["model_shape"]),
            s.get("levels"),
            s.get("mean"),
            s.get("std"),
        )

    def to_model(self, x: Tensor, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
        """Raw data rows -> flow input (dequantized for images)."""
        if self.kind == "image":
            u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
            y = (x.double() + u) / self.levels - 0.5
        else:
            y = (x.double() - self.mean) / self.std
        return y.to(dtype).reshape(x.shape[0], *self.model_shape)

    def from_model(self, xm: Tensor) -> np.ndarray:
        """Flow output -> data: image levels as floats in ``[0, 1]``, or vectors."""
        x = xm.detach().double().cpu().reshape(xm.shape[0], *self.data_shape)
        if self.kind == "image":
            k = torch.floor((x + 0.5).clamp(0, 1 - 1e-9) * self.levels)
            return (k / (self.levels - 1)).numpy()
        return (x * self.std + self.mean).numpy()

    def bpd(self, loglik: Tensor | float) -> Tensor | float:
        """Bits per dimension of a data log-likelihood (``log p + offset``)."""
        return -loglik / (self.dims * LN2)


# -- distributed helpers ---------------------------------------------------------------------------


def _dist_info() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _maybe_init_distributed(device: str) -> bool:
    """Start the process group when launched by torchrun (``WORLD_SIZE > 1``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if wants_cuda else "gloo"
    if wants_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    _, world, _ = _dist_info()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _resolve_device(name: str) -> torch.device:
    _, world, local = _dist_info()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {name}: CUDA is not available in this torch build/machine")
        if world > 1 and name == "cuda":
            name = f"cuda:{local}"
    try:
        return torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device: unknown device {name!r}") from None


_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_AUTOCAST = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# -- model and data assembly -----------------------------------------------------------------------


def _model_options(cfg: TrainConfig) -> dict:
    return {"hidden": cfg.hidden, "depth": cfg.depth, "scales": cfg.scales}


def _prepare(cfg: TrainConfig):
    ds = load_data(cfg.data, n=cfg.n_data, seed=cfg.seed)
    tr, va, te = split_indices(len(ds), cfg.val, cfg.test, seed=cfg.seed)
    return ds, ds.x[tr], ds.x[va], ds.x[te]


def _forward_logp(model: nn.Module, xm: Tensor, autocast_dtype, device: torch.device) -> Tensor:
    ctx = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with ctx:
        return model(xm).float() if autocast_dtype is not None else model(xm)


class _LogProb(nn.Module):
    """Wraps a flow so that ``forward`` is ``log_prob`` (what DDP calls)."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor) -> Tensor:
        return self.flow.log_prob(x)


@torch.no_grad()
def log_likelihood(
    flow: nn.Module,
    pre: Preprocess,
    x: Tensor,
    batch_size: int = 512,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-example data log-likelihood (nats; for images the dequantization bound with one
    noise draw per example, reproducible from ``seed``), in eval mode.

    Example:
        >>> from fastflow.registry import build_model
        >>> flow = build_model("realnvp", (2,), {"hidden": 8, "depth": 2})
        >>> pre = Preprocess("vector", (2,), (2,), mean=[0.0, 0.0], std=[1.0, 1.0])
        >>> log_likelihood(flow, pre, torch.randn(5, 2)).shape
        torch.Size([5])
    """
    was_training = flow.training
    flow.eval()
    out = []
    try:
        for i in range(0, x.shape[0], batch_size):
            g = torch.Generator().manual_seed(_seed_for(seed, 7, i))
            xm = pre.to_model(x[i : i + batch_size], g, dtype).to(device)
            out.append(flow.log_prob(xm).double().cpu() + pre.offset)
    finally:
        flow.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _sharded_mean_bpd(flow, pre, x, cfg, device, dtype, seed) -> tuple[float, float]:
    """(mean NLL nats, mean bits/dim) over ``x``, each rank scoring a shard, summed over ranks."""
    rank, world, _ = _dist_info()
    ll = log_likelihood(flow, pre, x[rank::world], cfg.eval_batch_size, seed, device, dtype)
    s, n = _all_sum([float(ll.sum()), float(ll.numel())], device)
    nll = -s / max(n, 1)
    return nll, nll / (pre.dims * LN2)


def sample(
    flow: nn.Module,
    pre: Preprocess,
    n: int,
    temperature: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> np.ndarray:
    """``n`` samples in data space (images as floats in ``[0, 1]``; vectors unstandardised),
    reproducible from ``seed`` without touching the global RNG.

    Example:
        >>> from fastflow.registry import build_model
        >>> flow = build_model("nice", (2,), {"hidden": 8, "depth": 2})
        >>> pre = Preprocess("vector", (2,), (2,), mean=[1.0, 1.0], std=[1.0, 1.0])
        >>> sample(flow, pre, 4).shape
        (4, 2)
    """
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    was_training = flow.training
    flow.eval()
    out = []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for i in range(0, n, batch_size):
                draw = flow.sample(min(batch_size, n - i), temperature=temperature)
                out.append(pre.from_model(draw))
    finally:
        flow.train(was_training)
    if not out:
        return np.zeros((0, *pre.data_shape))
    return np.concatenate(out)


def save_samples_png(samples: np.ndarray, pre: Preprocess, path: str, data: np.ndarray | None):
    """``samples.png``: an image grid, or a 2-D scatter next to the data."""
    from fastflow.plots import save_image_grid, save_scatter

    if pre.kind == "image":
        save_image_grid(samples, path)
    else:
        save_scatter(samples, data, path)


# -- checkpoints -----------------------------------------------------------------------------------


def _checkpoint(flow, opt, cfg, pre, epoch, step, step_in_epoch, best_val, metrics_len) -> dict:
    return {
        "model_name": cfg.model,
        "model_options": resolve_options(cfg.model, _model_options(cfg)),
        "preprocess": pre.state(),
        "config": asdict(cfg),
        "state_dict": flow.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": epoch,  # epochs completed
        "step": step,
        "step_in_epoch": step_in_epoch,  # batches done in the current (incomplete) epoch
        "best_val": best_val,
        "metrics_len": metrics_len,
        "torch_rng": torch.get_rng_state(),
    }


def load_model(path: str, device: torch.device | str = "cpu"):
    """Rebuild the flow saved in a ``fastflow train`` checkpoint.

    Returns:
        ``(flow, preprocess, checkpoint_dict)`` with the flow in eval mode on ``device``.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or weights that do not fit the
            model the checkpoint names.

    Example:
        >>> load_model("missing.pt")
        Traceback (most recent call last):
        ...
        fastflow.checkpoint.CheckpointError: checkpoint not found: missing.pt
    """
    ck = load_checkpoint(path)
    for key in ("model_name", "model_options", "preprocess", "state_dict"):
        if key not in ck:
            raise CheckpointError(f"{path}: not a 'fastflow train' checkpoint (no {key!r})")
    pre = Preprocess.from_state(ck["preprocess"])
    try:
        flow = build_model(ck["model_name"], pre.data_shape, ck["model_options"])
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot rebuild model {ck['model_name']!r}: {e}") from None
    dtype = _DTYPES.get(ck.get("config", {}).get("dtype", "float32"), torch.float32)
    flow.to(dtype)
    _load_state(flow, ck["state_dict"], path, ck["model_name"])
    return flow.to(device).eval(), pre, ck


def _load_state(flow: nn.Module, state: dict, path: str, model_name: str) -> None:
    try:
        flow.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(
            f"{path}: weights do not fit model {model_name!r} ({detail[:150]})"
        ) from None


# -- the training loop -----------------------------------------------------------------------------


def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
    if cfg.schedule == "cosine" and total > 0:
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return cfg.lr * warm


def _check_config(cfg: TrainConfig) -> None:
    def positive(name, v, allow_none=False):
        if allow_none and v is None:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {v!r}")

    positive("epochs", cfg.epochs)
    positive("batch_size", cfg.batch_size)
    positive("eval_batch_size", cfg.eval_batch_size)
    positive("max_steps", cfg.max_steps, allow_none=True)
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.warmup < 0 or cfg.save_every < 0 or cfg.clip_grad < 0 or cfg.threads < 0:
        raise ValueError("--warmup, --save-every, --clip-grad and --threads must be >= 0")
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(_DTYPES)}, got {cfg.dtype!r}")
    if cfg.autocast not in _AUTOCAST:
        raise ValueError(f"--autocast must be one of {', '.join(_AUTOCAST)}, got {cfg.autocast!r}")
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"--schedule must be constant or cosine, got {cfg.schedule!r}")
    if not (cfg.temperature >= 0):
        raise ValueError(f"--temperature must be >= 0, got {cfg.temperature}")
    if cfg.overwrite and cfg.resume is not None:
        raise ValueError("--resume continues a run and --overwrite starts over: pass one of them")


def _resume_path(cfg: TrainConfig, out: str) -> str | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        path = os.path.join(out, "last.pt")
        if not os.path.exists(path):
            raise CheckpointError(f"--resume: no checkpoint to resume from ({path} not found)")
        return path
    return cfg.resume


def _check_resume(cfg: TrainConfig, ck: dict, path: str) -> None:
    old = ck.get("config")
    if not isinstance(old, dict) or "state_dict" not in ck or "optimizer" not in ck:
        raise CheckpointError(f"{path}: not a resumable 'fastflow train' checkpoint")
    diffs = [
        f"--{k.replace('_', '-')} {old.get(k)!r} (checkpoint) vs {getattr(cfg, k)!r} (now)"
        for k in _RESUME_KEYS
        if old.get(k) != getattr(cfg, k)
    ]
    if cfg.schedule == "cosine":
        for k in ("epochs", "max_steps"):
            if old.get(k) != getattr(cfg, k):
                diffs.append(f"--{k.replace('_', '-')} {old.get(k)!r} vs {getattr(cfg, k)!r}")
    if diffs:
        raise TrainError(f"incompatible --resume options: {'; '.join(diffs)}")


def _refuse_other_run(cfg: TrainConfig, out: str, device: torch.device) -> None:
    """A fresh run (no ``--resume``, no ``--overwrite``) does not write over another run's files."""
    taken = 0.0
    if _dist_info()[0] == 0 and cfg.resume is None and not cfg.overwrite:
        taken = float(any(os.path.lexists(os.path.join(out, f)) for f in _RUN_STATE))
    if _all_sum([taken], device)[0] > 0:  # rank 0 looked (it writes the files); all ranks stop
        raise TrainError(
            f"{out} already holds a training run: pass --resume to continue it, --overwrite to "
            "start over, or a new --out"
        )


def _clear_out_dir(cfg: TrainConfig, out: str) -> None:
    """Before the first write: with ``--overwrite`` delete the old run's files; always delete the
    temporaries of a checkpoint save that was killed."""
    if cfg.overwrite:
        for name in _RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out, name))
    remove_stale_temporaries(out)


def _rank0_print(*args, **kwargs) -> None:
    if _dist_info()[0] == 0:
        print(*args, **kwargs, flush=True)


def _need_extras(cfg: TrainConfig) -> None:
    missing = []
    if cfg.progress:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            missing.append("tqdm (or pass --no-progress)")
    if cfg.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            missing.append("matplotlib (or pass --no-plots)")
    if missing:
        raise DataError(f'training needs {", ".join(missing)}: pip install "fastflow[train]"')


def train(cfg: TrainConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` (see :class:`TrainConfig`); rank 0 writes the output
    folder. Works single-process and under ``torchrun`` (gloo on CPU, NCCL on GPU).

    Returns:
        A dict with ``test_nll``, ``test_bpd``, ``best_val_bpd``, ``out``, ``steps``,
        ``history`` (per-epoch metrics) and ``flow`` (the trained flow, last parameters).

    Example:
        >>> import tempfile
        >>> cfg = TrainConfig(data="moons", model="realnvp", hidden=8, depth=2, n_data=200,
        ...                   epochs=1, out=tempfile.mkdtemp(), progress=False, plots=False)
        >>> r = train(cfg)  # doctest: +ELLIPSIS
        fastflow train: realnvp on moons (2,) ...
        epoch 1/1 ...
        test bits/dim (differential): ...
        >>> sorted(k for k in r if k.startswith("test"))
        ['test_bpd', 'test_nll']

    Reference: maximum-likelihood training of flows as in Dinh et al., "Density estimation
    using Real NVP", 2017; data parallelism with PyTorch DDP (Li et al., VLDB 2020).
    """
    _check_config(cfg)
    started_dist = _maybe_init_distributed(cfg.device)
    threads = torch.get_num_threads()
    try:
        result = _train(cfg)
        if started_dist:
            # rank 0 finishes last (it writes the files): without this, the other ranks tear
            # down the process group while it may still be in use
            dist.barrier()
        return result
    finally:
        torch.set_num_threads(threads)
        if started_dist:
            dist.destroy_process_group()


def _train(cfg: TrainConfig) -> dict:
    rank, world, _ = _dist_info()
    is_main = rank == 0
    _need_extras(cfg)  # on every rank: all fail alike, none is left waiting in a collective
    device = _resolve_device(cfg.device)
    if device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dtype = _DTYPES[cfg.dtype]
    ac_dtype = _AUTOCAST[cfg.autocast]
    out = cfg.out or default_out_dir(cfg.data, cfg.model)
    _refuse_other_run(cfg, out, device)

    ds, x_tr, x_va, x_te = _prepare(cfg)
    model_shape = model_input_shape(cfg.model, ds.shape)
    resume_path = _resume_path(cfg, out)
    ck = None
    if resume_path:
        ck = load_checkpoint(resume_path)
        _check_resume(cfg, ck, resume_path)
        pre = Preprocess.from_state(ck["preprocess"])
    else:
        pre = Preprocess.fit(ds, x_tr, model_shape)

    torch.manual_seed(cfg.seed)
    flow = build_model(cfg.model, ds.shape, _model_options(cfg)).to(dtype)
    flow.to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # DistributedSampler shards the data and gives every rank the same number of batches
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(
        range(x_tr.shape[0]), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed
    )
    per_rank = len(sampler)
    batches_per_epoch = math.ceil(per_rank / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * batches_per_epoch
    total_steps = min(total_steps, cfg.epochs * batches_per_epoch)

    epoch, step, step_in_epoch, best_val, metrics_len = 0, 0, 0, math.inf, 0
    if ck is not None:
        _load_state(flow, ck["state_dict"], resume_path, cfg.model)
        try:
            opt.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{resume_path}: optimizer state does not fit ({e})") from None
        epoch, step = int(ck["epoch"]), int(ck["step"])
        step_in_epoch, best_val = int(ck["step_in_epoch"]), float(ck["best_val"])
        metrics_len = int(ck.get("metrics_len", 0))
        torch.set_rng_state(ck["torch_rng"])
    else:
        # data-dependent init (ActNorm) on this rank's first batch, before DDP wraps the model;
        # ActNorm all-reduces its statistics and DDP then broadcasts rank 0's parameters
        sampler.set_epoch(0)
        idx = list(sampler)[: max(cfg.batch_size, 256)]
        g = torch.Generator().manual_seed(_seed_for(cfg.seed, 0, 10**6, rank))
        with torch.no_grad():
            flow.train()
            flow.log_prob(pre.to_model(x_tr[idx], g, dtype).to(device))

    if is_main:
        os.makedirs(out, exist_ok=True)
        _clear_out_dir(cfg, out)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({**asdict(cfg), "out": out, "world_size": world}, f, indent=2)
        metrics_path = os.path.join(out, "metrics.jsonl")
        kept = []
        if ck is not None and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                kept = [ln for ln in f.read().splitlines() if ln.strip()][:metrics_len]
        with open(metrics_path, "w") as f:
            f.writelines(ln + "\n" for ln in kept)
    history = []

    wrapped: nn.Module = _LogProb(flow)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = (
        torch.amp.GradScaler(device.type) if ac_dtype == torch.float16 else None
    )  # fp16 needs loss scaling; bf16 does not

    last_path = os.path.join(out, "last.pt")
    best_path = os.path.join(out, "best.pt")
    last_good = last_path if ck is not None else None
    if is_main:
        _rank0_print(
            f"fastflow train: {cfg.model} on {cfg.data} {tuple(ds.shape)} "
            f"({x_tr.shape[0]}/{x_va.shape[0]}/{x_te.shape[0]} train/val/test), "
            f"{sum(p.numel() for p in flow.parameters()):,} parameters, {device}, "
            f"{world} process{'es' if world > 1 else ''}, out {out}"
            + (f", resumed at step {step}" if ck is not None else "")
        )

    def save(kind_best: bool):
        nonlocal last_good
        if not is_main:
            return
        obj = _checkpoint(flow, opt, cfg, pre, epoch, step, step_in_epoch, best_val, metrics_len)
        save_checkpoint(obj, last_path)
        last_good = last_path
        if kind_best:
            save_checkpoint(obj, best_path)

    skipped_total = 0
    t_run = time.perf_counter()
    while epoch < cfg.epochs and step < total_steps:
        sampler.set_epoch(epoch)
        order = list(sampler)
        flow.train()
        bar = None
        if is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=batches_per_epoch,
                initial=step_in_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        sum_loss, n_seen, skipped = 0.0, 0, 0
        t0 = time.perf_counter()
        b = step_in_epoch
        while b < batches_per_epoch and step < total_steps:
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            g = torch.Generator().manual_seed(_seed_for(cfg.seed, epoch, b, rank))
            xm = pre.to_model(x_tr[idx], g, dtype).to(device)
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step, total_steps)
            try:
                logp = _forward_logp(wrapped, xm, ac_dtype, device)
            except (TypeError, RuntimeError) as e:
                if ac_dtype is None:
                    raise
                raise TrainError(
                    f"--autocast {cfg.autocast}: model {cfg.model!r} fails under autocast "
                    f"({' '.join(str(e).split())[:160]}); train without --autocast"
                ) from None
            loss = -(logp.mean() + pre.offset) / (pre.dims * LN2)  # bits/dim of the batch
            if cfg.inject_nan_at is not None and step == cfg.inject_nan_at:
                loss = loss * float("nan")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            gnorm = (
                nn.utils.clip_grad_norm_(flow.parameters(), cfg.clip_grad)
                if cfg.clip_grad > 0
                else torch.zeros(())
            )
            bad = float(not (torch.isfinite(loss) and torch.isfinite(gnorm)))
            bad = _all_sum([bad], device)[0] > 0  # every rank skips or stops together
            if bad and scaler is None:
                if not cfg.skip_nonfinite:
                    if bar is not None:
                        bar.close()
                    raise TrainError(
                        f"non-finite loss at step {step} (epoch {epoch + 1}, batch {b}); last good "
                        f"checkpoint: {last_good or 'none yet'}; lower --lr, set --clip-grad, or "
                        "pass --skip-nonfinite to skip such batches"
                    )
                skipped += 1
                opt.zero_grad(set_to_none=True)
            elif scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if not bad:
                sum_loss += float(loss.detach()) * len(idx)
                n_seen += len(idx)
            step += 1
            b += 1
            step_in_epoch = b
            if bar is not None:
                rate = n_seen * world / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(
                    bpd=f"{float(loss.detach()):.3f}", samples_s=f"{rate:.0f}", refresh=False
                )
                bar.update(1)
            if cfg.save_every and step % cfg.save_every == 0 and b < batches_per_epoch:
                save(False)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        if b >= batches_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        s_loss, s_n, s_skip = _all_sum([sum_loss, float(n_seen), float(skipped)], device)
        skipped_total += int(s_skip)
        train_bpd = s_loss / s_n if s_n else float("nan")
        val_nll, val_bpd = _sharded_mean_bpd(flow, pre, x_va, cfg, device, dtype, cfg.seed + 1)
        improved = val_bpd < best_val
        if improved:
            best_val = val_bpd
        rec = {
            "epoch": epoch if step_in_epoch == 0 else epoch + step_in_epoch / batches_per_epoch,
            "step": step,
            "train_nll": train_bpd * pre.dims * LN2,
            "train_bpd": train_bpd,
            "val_nll": val_nll,
            "val_bpd": val_bpd,
            "samples_per_s": s_n / max(elapsed, 1e-9),
            "lr": opt.param_groups[0]["lr"],
            "skipped_batches": int(s_skip),
            "time_s": round(time.perf_counter() - t_run, 3),
        }
        history.append(rec)
        if is_main:
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
            metrics_len += 1
        save(improved)
        _rank0_print(
            f"epoch {rec['epoch']:.4g}/{cfg.epochs}  step {step}  train {train_bpd:.4f} bpd  "
            f"val {val_bpd:.4f} bpd  {rec['samples_per_s']:.0f} samples/s"
            + ("  *best*" if improved else "")
            + (f"  ({int(s_skip)} non-finite batches skipped)" if s_skip else "")
        )

    # test with the best-validation weights
    final_state = {k: v.detach().clone() for k, v in flow.state_dict().items()}
    if is_main and os.path.exists(best_path):
        best = load_checkpoint(best_path, map_location=device)
        flow.load_state_dict(best["state_dict"])
    if world > 1:  # every rank scores the test set with rank 0's best weights
        for t in flow.state_dict().values():
            if t.is_floating_point():
                dist.broadcast(t, 0)
    test_nll, test_bpd = _sharded_mean_bpd(flow, pre, x_te, cfg, device, dtype, cfg.seed + 2)
    result = {
        "test_nll": test_nll,
        "test_bpd": test_bpd,
        "best_val_bpd": best_val,
        "steps": step,
        "out": out,
        "history": history,
        "skipped_batches": skipped_total,
    }
    if is_main:
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(
                json.dumps({"split": "test", "test_nll": test_nll, "test_bpd": test_bpd}) + "\n"
            )
        if cfg.plots:
            from fastflow.plots import save_loss_curve

            smp = sample(flow, pre, cfg.sample_n, cfg.temperature, cfg.seed, device)
            data = x_te.numpy() if pre.kind == "vector" else None
            if data is not None and smp.shape[0] < 2000:
                smp = sample(flow, pre, 2000, 1.0, cfg.seed, device)
            save_samples_png(smp, pre, os.path.join(out, "samples.png"), data)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                recs = [json.loads(ln) for ln in f if ln.strip()]
            save_loss_curve(recs, os.path.join(out, "loss.png"))
        unit = "bits/dim" if pre.kind == "image" else "bits/dim (differential)"
        _rank0_print(
            f"test {unit}: {test_bpd:.4f}  (NLL {test_nll:.3f} nats/example, best val "
            f"{best_val:.4f}, {step} steps, {time.perf_counter() - t_run:.0f} s); wrote {out}"
        )
    flow.load_state_dict(final_state)
    result["flow"] = flow
    return result


def config_from_args(args) -> TrainConfig:
    """A :class:`TrainConfig` from parsed ``fastflow train`` arguments (same attribute names)."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


# -- evaluation ------------------------------------------------------------------------------------


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of telling ``positives`` (higher scores) from ``negatives``: the
    Mann-Whitney rank statistic ``P(s_pos > s_neg) + 0.5 P(tie)``.

    Example:
        >>> auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0]))
        1.0
        >>> auroc(np.array([1.0]), np.array([1.0]))
        0.5

    Reference: Hanley & McNeil, "The meaning and use of the area under a ROC curve", 1982.
    """
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    pos = np.asarray(positives, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        raise ValueError("auroc needs at least one score in each group")
    scores = np.concatenate([neg, pos])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < scores.size:  # average ranks over ties
        j = i
        while j + 1 < scores.size and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    r_pos = ranks[neg.size :].sum()
    return float((r_pos - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def typicality_scores(
    nll: np.ndarray, reference: float, batch: int, trials: int, seed: int
) -> np.ndarray:
    """``|mean NLL of a random batch - reference|`` for ``trials`` batches of ``batch`` examples
    drawn without replacement (Nalisnick et al., "Detecting Out-of-Distribution Inputs to Deep
    Generative Models Using Typicality", 2019).

    Example:
        >>> typicality_scores(np.ones(10), 1.0, 4, 3, 0).tolist()
        [0.0, 0.0, 0.0]
    """
    rng = np.random.default_rng(seed)
    nll = np.asarray(nll, dtype=np.float64)
    b = min(batch, nll.size)
    return np.array(
        [abs(nll[rng.choice(nll.size, b, replace=False)].mean() - reference) for _ in range(trials)]
    )


def _data_for(pre: Preprocess, ds: DataSet, seed: int) -> Tensor:
    """Rows of ``ds`` in the layout ``pre`` expects (images resized/requantized if needed)."""
    from fastflow.data import resize_images

    if pre.kind == "image":
        if ds.kind != "image":
            raise DataError(f"{ds.name}: the model was trained on images {pre.data_shape}")
        if ds.shape != pre.data_shape or ds.levels != pre.levels:
            ds = resize_images(ds, pre.data_shape, pre.levels)
        return ds.x
    if ds.kind == "image" or ds.shape != pre.data_shape:
        raise DataError(
            f"{ds.name}: shape {ds.shape} does not match the model's vectors {pre.data_shape}"
        )
    return ds.x


def evaluate_checkpoint(
    path: str,
    data: str | None = None,
    split: str = "test",
    ood: str | None = None,
    batch_size: int = 512,
    seed: int = 0,
    ood_batch: int = 10,
    ood_trials: int = 500,
    device: str = "cpu",
) -> dict:
    """Score data under a checkpoint: mean NLL, bits/dim, the invertibility report
    (:func:`fastflow.diagnostics.check_invertibility` on up to 256 examples), and with ``ood``
    the AUROC of telling the other data from the in-distribution test split by NLL and by the
    typicality test (batches of ``ood_batch``, distance of the batch mean NLL from the training
    split's mean NLL).

    Returns:
        A dict: ``nll``, ``bpd``, ``n``, ``invertibility`` (the report), ``worst_layer``, and
        with ``ood``: ``ood_nll``, ``ood_bpd``, ``auroc_likelihood``, ``auroc_typicality``.

    Example:
        >>> evaluate_checkpoint("missing.pt")
        Traceback (most recent call last):
        ...
        fastflow.checkpoint.CheckpointError: checkpoint not found: missing.pt

    Reference: Nalisnick et al., "Do Deep Generative Models Know What They Don't Know?", 2019;
    Nalisnick et al., "Detecting Out-of-Distribution Inputs to Deep Generative Models Using
    Typicality", 2019.
    """
    from fastflow.data import noise_images
    from fastflow.diagnostics import check_invertibility

    if batch_size < 1 or ood_batch < 1 or ood_trials < 1:
        raise ValueError("--batch-size, --ood-batch and --ood-trials must be positive")
    flow, pre, ck = load_model(path, device)
    cfg = ck["config"]
    dtype = _DTYPES.get(cfg.get("dtype", "float32"), torch.float32)
    own = load_data(cfg["data"], n=cfg.get("n_data"), seed=cfg["seed"])
    tr, va, te = split_indices(len(own), cfg["val"], cfg["test"], seed=cfg["seed"])
    parts = {"train": own.x[tr], "val": own.x[va], "test": own.x[te], "all": own.x}
    if data is None or data == cfg["data"]:
        x, what = parts[split], f"{cfg['data']} ({split} split)"
    else:
        x, what = _data_for(pre, load_data(data, seed=seed), seed), data
    ll = log_likelihood(flow, pre, x, batch_size, seed, device, dtype)
    nll = float(-ll.mean())
    res: dict[str, Any] = {
        "data": what,
        "n": int(x.shape[0]),
        "nll": nll,
        "bpd": nll / (pre.dims * LN2),
    }
    g = torch.Generator().manual_seed(seed)
    xb = pre.to_model(x[:256], g, dtype).to(device)
    report = check_invertibility(flow, xb)
    res["invertibility"] = report
    worst = report.worst() if len(report) else None
    res["worst_layer"] = None if worst is None else vars(worst)
    if ood is not None:
        if ood == "noise":
            n_ood = max(int(parts["test"].shape[0]), 100)
            if pre.kind == "image":
                other = noise_images(pre.data_shape, pre.levels, n_ood, seed + 1)
            else:
                gen = torch.Generator().manual_seed(seed + 1)
                lo, hi = own.x.min(0).values, own.x.max(0).values
                u = torch.rand(n_ood, *pre.data_shape, generator=gen, dtype=torch.float64)
                other = DataSet("noise", lo + u * (hi - lo), None)
            xo = other.x
        else:
            xo = _data_for(pre, load_data(ood, seed=seed), seed)
        ll_in = log_likelihood(flow, pre, parts["test"], batch_size, seed, device, dtype)
        ll_ood = log_likelihood(flow, pre, xo, batch_size, seed + 3, device, dtype)
        ref = float(
            -log_likelihood(
                flow, pre, parts["train"][:2000], batch_size, seed, device, dtype
            ).mean()
        )
        nll_in, nll_ood = (-ll_in).numpy(), (-ll_ood).numpy()
        t_in = typicality_scores(nll_in, ref, ood_batch, ood_trials, seed)
        t_ood = typicality_scores(nll_ood, ref, ood_batch, ood_trials, seed + 1)
        res.update(
            ood=ood,
            ood_n=int(xo.shape[0]),
            in_nll=float(nll_in.mean()),
            ood_nll=float(nll_ood.mean()),
            ood_bpd=float(nll_ood.mean()) / (pre.dims * LN2),
            train_nll=ref,
            auroc_likelihood=auroc(nll_in, nll_ood),
            auroc_typicality=auroc(t_in, t_ood),
            ood_batch=min(ood_batch, nll_in.size, nll_ood.size),
        )
    return res
