"""The training loop: :func:`train` sets up a :class:`Run` (the data, the flow, its optimizer
and learning-rate schedule, the run folder and the position in the run), runs epochs of
optimizer steps with a validation pass, a metrics record and a checkpoint after each, then
scores the test split with the best-validation weights and writes the plots. Every random draw
is derived from the seed and the position in the run, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fastflow.registry import build_model, model_input_shape
from fastflow.training.checkpoints import (
    load_best_weights,
    load_resume,
    restore,
    save_checkpoints,
)
from fastflow.training.config import (
    AUTOCAST,
    DTYPES,
    TrainConfig,
    TrainError,
    check_config,
    check_extras,
    default_out_dir,
    model_options,
    resolve_defaults,
)
from fastflow.training.distributed import (
    all_sum,
    any_rank,
    broadcast_from_rank0,
    dist_info,
    process_group,
    rank0_print,
    resolve_device,
    shard_sampler,
    wrap_ddp,
)
from fastflow.training.evaluation import sharded_nll_bpd
from fastflow.training.preprocess import LN2, Preprocess, Splits, load_splits, noise_generator
from fastflow.training.rundir import (
    append_metrics,
    read_metrics,
    refuse_other_run,
    start_run_folder,
)
from fastflow.training.sampling import save_run_plots


@dataclass
class Run:
    """The state of one training run on one rank: what it trains and with what, where it writes,
    and how far it has got (the part a checkpoint saves and ``--resume`` restores)."""

    cfg: TrainConfig
    out: str
    device: torch.device
    splits: Splits
    pre: Preprocess
    flow: nn.Module
    opt: torch.optim.Optimizer
    sampler: torch.utils.data.DistributedSampler
    batches_per_epoch: int
    total_steps: int
    rank: int = 0
    world: int = 1
    wrapped: nn.Module | None = None  # what the forward pass calls (DDP around log_prob)
    scaler: torch.amp.GradScaler | None = None  # fp16 autocast only
    # the position in the run
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    step_in_epoch: int = 0  # batches done in the current epoch
    best_val: float = math.inf
    metrics_len: int = 0  # records in metrics.jsonl
    last_good: str | None = None  # the newest checkpoint written
    history: list[dict] = field(default_factory=list)
    skipped_total: int = 0
    t_start: float = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.dtype]

    @property
    def autocast(self) -> torch.dtype | None:
        return AUTOCAST[self.cfg.autocast]

    @property
    def last_path(self) -> str:
        return os.path.join(self.out, "last.pt")

    @property
    def best_path(self) -> str:
        return os.path.join(self.out, "best.pt")

    @property
    def epochs_done(self) -> float:
        """Epochs completed, with the fraction of an unfinished one (``metrics.jsonl``'s epoch)."""
        if self.step_in_epoch == 0:
            return self.epoch
        return self.epoch + self.step_in_epoch / self.batches_per_epoch

    def lr(self) -> float:
        """The learning rate of the next step: linear warm-up, then constant or cosine decay."""
        cfg = self.cfg
        warm = min(1.0, (self.step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
        if cfg.schedule == "cosine" and self.total_steps > 0:
            progress = min(self.step, self.total_steps) / self.total_steps
            return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.lr * warm


@dataclass
class _EpochStats:
    """Sums over this rank's batches of one (possibly partial) epoch."""

    loss_sum: float = 0.0
    seen: int = 0
    skipped: int = 0
    t0: float = field(default_factory=time.perf_counter)
    elapsed: float = 0.0


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
    cfg, picked = resolve_defaults(cfg)
    check_config(cfg)
    with process_group(cfg.device), _keep_num_threads():
        if picked:
            flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in picked.items())
            rank0_print(f"fastflow train: {cfg.data} defaults {flags}")
        run = _start(cfg)
        while run.epoch < cfg.epochs and run.step < run.total_steps:
            _end_epoch(run, _train_epoch(run))
        return _finish(run)


@contextlib.contextmanager
def _keep_num_threads() -> Iterator[None]:
    """Restore torch's thread count on the way out (``--threads`` changes it for the run)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- setting up ----------------------------------------------------------------------------------


def _start(cfg: TrainConfig) -> Run:
    """Everything before the first step, in an order that fails cheaply: options and extras,
    the run folder's owner, data, model, resume or data-dependent init, then the first writes."""
    check_extras(cfg)  # on every rank: all fail alike, none is left waiting in a collective
    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = cfg.out or default_out_dir(cfg.data, cfg.model)
    refuse_other_run(cfg, out, device)
    splits = load_splits(cfg.data, cfg.n_data, cfg.val, cfg.test, cfg.seed)
    model_shape = model_input_shape(cfg.model, splits.ds.shape)
    ck_path, ck = load_resume(cfg, out)
    if ck is not None:
        pre = Preprocess.from_state(ck["preprocess"])
    else:
        pre = Preprocess.fit(splits.ds, splits.train, model_shape, cfg.dequantization)
    run = _new_run(cfg, out, device, splits, pre)
    if ck is not None:
        restore(run, ck, ck_path)
        run.last_good = run.last_path
    else:
        _data_dependent_init(run)
    if run.is_main:
        start_run_folder(cfg, out, run.world, run.metrics_len if ck is not None else None)
    run.wrapped = wrap_ddp(_LogProb(run.flow, cfg.objective), device)
    if run.autocast == torch.float16:  # fp16 needs loss scaling; bf16 does not
        run.scaler = torch.amp.GradScaler(device.type)
    _print_header(run, resumed=ck is not None)
    run.t_start = time.perf_counter()
    return run


def make_adam(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """The trainer's Adam: ``fused=True`` (one kernel over all parameters per step) where every
    parameter is a floating-point CPU or CUDA tensor, the default per-tensor loop otherwise. On
    the CPU, for a Glow of ~180 small parameter tensors (bench/train_step.py's 1x8x8 model), the
    training step went 22.3 -> 19.8 ms (interleaved A/B); `fastflow train` end to end moved
    within its noise (~5%). Same algorithm, rounding aside.

    Example:
        >>> opt = make_adam(torch.nn.Linear(2, 2), lr=1e-3)
        >>> opt.param_groups[0]["fused"]
        True
    """
    params = list(model.parameters())
    fused = bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _new_run(cfg: TrainConfig, out: str, device, splits: Splits, pre: Preprocess) -> Run:
    """A run at step 0: the flow (seeded), Adam, and this rank's shard of the training rows."""
    rank, world, _ = dist_info()
    torch.manual_seed(cfg.seed)
    flow = build_model(cfg.model, splits.ds.shape, model_options(cfg), pre).to(DTYPES[cfg.dtype])
    if cfg.objective != "mle" and not hasattr(flow, "velocity"):
        raise ValueError(
            f"--objective {cfg.objective} regresses a continuous flow's vector field; model "
            f"{cfg.model!r} has none (use --model cnf, or --objective mle)"
        )
    flow.to(device)
    opt = make_adam(flow, cfg.lr, cfg.weight_decay)
    # DistributedSampler shards the data and gives every rank the same number of batches
    sampler = shard_sampler(splits.train.shape[0], cfg.seed)
    batches_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * batches_per_epoch
    total_steps = min(total_steps, cfg.epochs * batches_per_epoch)
    return Run(
        cfg=cfg,
        out=out,
        device=device,
        splits=splits,
        pre=pre,
        flow=flow,
        opt=opt,
        sampler=sampler,
        batches_per_epoch=batches_per_epoch,
        total_steps=total_steps,
        rank=rank,
        world=world,
    )


def _data_dependent_init(run: Run) -> None:
    """ActNorm's data-dependent init on this rank's first batch, before DDP wraps the model;
    ActNorm all-reduces its statistics and DDP then broadcasts rank 0's parameters."""
    run.sampler.set_epoch(0)
    idx = list(run.sampler)[: max(run.cfg.batch_size, 256)]
    g = noise_generator(run.cfg.seed, 0, 10**6, run.rank)
    with torch.no_grad():
        run.flow.train()
        run.flow.log_prob(run.pre.to_model(run.splits.train[idx], g, run.dtype).to(run.device))


def _print_header(run: Run, resumed: bool) -> None:
    cfg, s = run.cfg, run.splits
    rank0_print(
        f"fastflow train: {cfg.model} on {cfg.data} {tuple(s.ds.shape)} "
        f"({s.train.shape[0]}/{s.val.shape[0]}/{s.test.shape[0]} train/val/test), "
        f"{sum(p.numel() for p in run.flow.parameters()):,} parameters, {run.device}, "
        f"{run.world} process{'es' if run.world > 1 else ''}, out {run.out}"
        + (f", resumed at step {run.step}" if resumed else "")
    )


# -- one epoch -----------------------------------------------------------------------------------


def _train_epoch(run: Run) -> _EpochStats:
    """The steps of the current epoch from ``run.step_in_epoch`` on (up to ``total_steps``)."""
    run.sampler.set_epoch(run.epoch)
    order = list(run.sampler)
    run.flow.train()
    with _progress_bar(run) as bar:
        stats = _EpochStats()
        while run.step_in_epoch < run.batches_per_epoch and run.step < run.total_steps:
            _train_step(run, order, stats, bar)
    stats.elapsed = time.perf_counter() - stats.t0
    return stats


@contextlib.contextmanager
def _progress_bar(run: Run):
    """A tqdm bar over the epoch's batches on rank 0 with ``--progress``, else ``None``."""
    if not (run.is_main and run.cfg.progress):
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(
        total=run.batches_per_epoch,
        initial=run.step_in_epoch,
        desc=f"epoch {run.epoch + 1}/{run.cfg.epochs}",
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    try:
        yield bar
    finally:
        bar.close()


def _train_step(run: Run, order: list[int], stats: _EpochStats, bar) -> None:
    """One optimizer step on batch ``run.step_in_epoch`` of ``order``, then the bookkeeping."""
    cfg, b = run.cfg, run.step_in_epoch
    idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
    g = noise_generator(cfg.seed, run.epoch, b, run.rank)
    xm = run.pre.to_model(run.splits.train[idx], g, run.dtype).to(run.device)
    noise_std = getattr(run.flow, "train_noise_std", 0.0)  # models trained on noised data
    if noise_std:
        xm = xm + noise_std * torch.randn(xm.shape, generator=g, dtype=xm.dtype).to(xm.device)
    for group in run.opt.param_groups:
        group["lr"] = run.lr()
    loss = _batch_loss(run, xm)
    if not _optimizer_step(run, loss, stats):
        stats.loss_sum += float(loss.detach()) * len(idx)
        stats.seen += len(idx)
    run.step += 1
    run.step_in_epoch += 1
    if bar is not None:
        rate = stats.seen * run.world / max(time.perf_counter() - stats.t0, 1e-9)
        bar.set_postfix(bpd=f"{float(loss.detach()):.3f}", samples_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
    mid_epoch = run.step_in_epoch < run.batches_per_epoch
    if cfg.save_every and run.step % cfg.save_every == 0 and mid_epoch:
        save_checkpoints(run, best=False)


def _batch_loss(run: Run, xm: Tensor) -> Tensor:
    """The batch's bits/dim (NaN at ``--inject-nan-at``)."""
    cfg, pre = run.cfg, run.pre
    try:
        logp = _forward_logp(run.wrapped, xm, run.autocast, run.device)
    except (TypeError, RuntimeError) as e:
        if run.autocast is None:
            raise
        raise TrainError(
            f"--autocast {cfg.autocast}: model {cfg.model!r} fails under autocast "
            f"({' '.join(str(e).split())[:160]}); train without --autocast"
        ) from None
    if cfg.objective != "mle":  # flow matching: the wrapper returned minus the regression loss
        loss = -logp.mean()
    else:
        loss = -(logp.mean() + pre.offset) / (pre.dims * LN2)  # bits/dim of the batch
        if hasattr(run.flow, "regularization"):  # e.g. a CNF's kinetic/Jacobian regularisers
            loss = loss + run.flow.regularization().to(loss)
    if cfg.inject_nan_at is not None and run.step == cfg.inject_nan_at:
        loss = loss * float("nan")
    return loss


def _forward_logp(model: nn.Module, xm: Tensor, autocast_dtype, device: torch.device) -> Tensor:
    ctx = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with ctx:
        return model(xm).float() if autocast_dtype is not None else model(xm)


def _optimizer_step(run: Run, loss: Tensor, stats: _EpochStats) -> bool:
    """Backward, gradient clipping and the step; returns whether the batch was non-finite on
    some rank (every rank then skips it, or stops, together)."""
    cfg, opt, scaler = run.cfg, run.opt, run.scaler
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    gnorm = (
        nn.utils.clip_grad_norm_(run.flow.parameters(), cfg.clip_grad)
        if cfg.clip_grad > 0
        else torch.zeros(())
    )
    bad = any_rank(not (torch.isfinite(loss) and torch.isfinite(gnorm)), run.device)
    if bad and scaler is None:
        if not cfg.skip_nonfinite:
            raise TrainError(
                f"non-finite loss at step {run.step} (epoch {run.epoch + 1}, batch "
                f"{run.step_in_epoch}); last good checkpoint: {run.last_good or 'none yet'}; "
                "lower --lr, set --clip-grad, or pass --skip-nonfinite to skip such batches"
            )
        stats.skipped += 1
        opt.zero_grad(set_to_none=True)
    elif scaler is not None:  # skips a non-finite step itself
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return bad


class _LogProb(nn.Module):
    """Wraps a flow so that ``forward`` is ``log_prob`` (what DDP calls); for the flow-matching
    objectives it is minus the per-example flow-matching loss instead."""

    def __init__(self, flow: nn.Module, objective: str = "mle"):
        super().__init__()
        self.flow = flow
        self.objective = objective

    def forward(self, x: Tensor) -> Tensor:
        if self.objective == "mle":
            return self.flow.log_prob(x)
        from fastflow.flow_matching import flow_matching_loss

        coupling = "ot" if self.objective == "fm-ot" else "independent"
        return -flow_matching_loss(self.flow, x, coupling=coupling, reduction="none")


# -- after an epoch, after the run ---------------------------------------------------------------


def _end_epoch(run: Run, stats: _EpochStats) -> None:
    """Validation, the epoch's metrics record, checkpoints (``best.pt`` if it improved), a line."""
    cfg, pre = run.cfg, run.pre
    if run.step_in_epoch >= run.batches_per_epoch:
        run.epoch, run.step_in_epoch = run.epoch + 1, 0
    sums = [stats.loss_sum, float(stats.seen), float(stats.skipped)]
    s_loss, s_n, s_skip = all_sum(sums, run.device)
    run.skipped_total += int(s_skip)
    train_bpd = s_loss / s_n if s_n else float("nan")
    val_nll, val_bpd = _score(run, run.splits.val, cfg.seed + 1)
    improved = val_bpd < run.best_val
    if improved:
        run.best_val = val_bpd
    rec = {
        "epoch": run.epochs_done,
        "step": run.step,
        "train_nll": train_bpd * pre.dims * LN2,
        "train_bpd": train_bpd,
        "val_nll": val_nll,
        "val_bpd": val_bpd,
        "samples_per_s": s_n / max(stats.elapsed, 1e-9),
        "lr": run.opt.param_groups[0]["lr"],
        "skipped_batches": int(s_skip),
        "time_s": round(time.perf_counter() - run.t_start, 3),
    }
    run.history.append(rec)
    if run.is_main:
        append_metrics(run.out, rec)
        run.metrics_len += 1
    save_checkpoints(run, best=improved)
    rank0_print(
        f"epoch {rec['epoch']:.4g}/{cfg.epochs}  step {run.step}  train {train_bpd:.4f} "
        + ("bpd  " if cfg.objective == "mle" else "flow-matching loss  ")
        + f"val {val_bpd:.4f} bpd  {rec['samples_per_s']:.0f} samples/s"
        + ("  *best*" if improved else "")
        + (f"  ({int(s_skip)} non-finite batches skipped)" if s_skip else "")
    )


def _score(run: Run, x: Tensor, seed: int) -> tuple[float, float]:
    """(mean NLL, mean bits/dim) of ``x``, sharded over the ranks."""
    return sharded_nll_bpd(
        run.flow, run.pre, x, run.cfg.eval_batch_size, seed, run.device, run.dtype
    )


def _importance_weighted(run: Run, k: int = 16) -> dict:
    """With variational dequantization: the test split's importance-weighted bits/dim (``K``
    samples of ``q``; rank 0's shard only), else ``{}``."""
    from fastflow.dequantization import VariationalDequantization, importance_weighted_bpd

    if not (isinstance(run.flow, VariationalDequantization) and run.is_main):
        return {}
    x = run.pre.to_model(run.splits.test, None, run.dtype).to(run.device)
    bpd = importance_weighted_bpd(
        run.flow, x, run.pre.offset, k, max(1, run.cfg.eval_batch_size // k), run.cfg.seed + 3
    )
    return {"test_bpd_iw": bpd, "test_iw_k": k}


def _histogram_baseline(run: Run) -> dict:
    """For images: the test split's bits/dim under the per-pixel histogram fit on the training
    split (:func:`fastflow.bench._densities.histogram_bits_per_dim`, the independent-pixel
    baseline a flow should beat), else ``{}``."""
    from fastflow.bench._densities import histogram_bits_per_dim

    s = run.splits
    if run.pre.kind != "image" or s.test.shape[0] == 0 or s.train.shape[0] == 0:
        return {}
    bpd = histogram_bits_per_dim(s.train.numpy(), s.test.numpy(), run.pre.levels)
    return {"test_bpd_histogram": bpd}


def _finish(run: Run) -> dict:
    """Score the test split with the best-validation weights (every rank, rank 0's weights),
    write the test record, plots and last line on rank 0; the flow keeps its last parameters."""
    final_state = {k: v.detach().clone() for k, v in run.flow.state_dict().items()}
    load_best_weights(run)
    broadcast_from_rank0(run.flow)  # every rank scores the test set with rank 0's best weights
    test_nll, test_bpd = _score(run, run.splits.test, run.cfg.seed + 2)
    iw = _importance_weighted(run)
    iw.update(_histogram_baseline(run))
    result = {
        "test_nll": test_nll,
        "test_bpd": test_bpd,
        "best_val_bpd": run.best_val,
        "steps": run.step,
        "out": run.out,
        "history": run.history,
        "skipped_batches": run.skipped_total,
        **iw,
    }
    if run.is_main:
        append_metrics(run.out, {"split": "test", "test_nll": test_nll, "test_bpd": test_bpd, **iw})
        if run.cfg.plots:
            save_run_plots(run, read_metrics(run.out))
        unit = "bits/dim" if run.pre.kind == "image" else "bits/dim (differential)"
        rank0_print(
            f"test {unit}: {test_bpd:.4f}  (NLL {test_nll:.3f} nats/example, best val "
            f"{run.best_val:.4f}, {run.step} steps, {time.perf_counter() - run.t_start:.0f} s); "
            f"wrote {run.out}"
        )
        if "test_bpd_iw" in iw:
            rank0_print(
                f"test bits/dim, importance-weighted bound (K={iw['test_iw_k']}): "
                f"{iw['test_bpd_iw']:.4f}"
            )
        if "test_bpd_histogram" in iw:
            rank0_print(
                f"per-pixel histogram baseline: {iw['test_bpd_histogram']:.4f} bits/dim on the "
                "test split (independent pixels, add-one smoothed, fit on the training split)"
            )
    run.flow.load_state_dict(final_state)
    result["flow"] = run.flow
    return result
