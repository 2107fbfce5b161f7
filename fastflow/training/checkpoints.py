"""Checkpoints of a training run, on top of :mod:`fastflow.checkpoint` (atomic writes, safe
loads): what a checkpoint holds, writing ``last.pt``/``best.pt`` from rank 0, finding and
loading the checkpoint that ``--resume`` continues from and restoring a run's state from it,
and :func:`load_model`, which rebuilds a trained flow for ``fastflow sample`` and ``evaluate``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch
from torch import nn

from fastflow.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastflow.registry import build_model, resolve_options
from fastflow.training.config import DTYPES, TrainConfig, check_resume, model_options
from fastflow.training.preprocess import Preprocess

if TYPE_CHECKING:
    from fastflow.training.loop import Run


def checkpoint_state(run: Run) -> dict:
    """Everything a checkpoint holds: the model (name, options, weights), the preprocessing,
    the config, the optimizer, the position in the run and the torch RNG."""
    cfg = run.cfg
    return {
        "model_name": cfg.model,
        "model_options": resolve_options(cfg.model, model_options(cfg)),
        "preprocess": run.pre.state(),
        "config": asdict(cfg),
        "state_dict": run.flow.state_dict(),
        "optimizer": run.opt.state_dict(),
        "epoch": run.epoch,  # epochs completed
        "step": run.step,
        "step_in_epoch": run.step_in_epoch,  # batches done in the current (incomplete) epoch
        "best_val": run.best_val,
        "metrics_len": run.metrics_len,
        "torch_rng": torch.get_rng_state(),
    }


def save_checkpoints(run: Run, best: bool) -> None:
    """On rank 0: write ``last.pt`` (and ``best.pt`` when ``best``)."""
    if not run.is_main:
        return
    obj = checkpoint_state(run)
    save_checkpoint(obj, run.last_path)
    run.last_good = run.last_path
    if best:
        save_checkpoint(obj, run.best_path)


def _resume_path(cfg: TrainConfig, out: str) -> str | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        path = os.path.join(out, "last.pt")
        if not os.path.exists(path):
            raise CheckpointError(f"--resume: no checkpoint to resume from ({path} not found)")
        return path
    return cfg.resume


def load_resume(cfg: TrainConfig, out: str) -> tuple[str | None, dict | None]:
    """``(path, checkpoint)`` that ``--resume`` continues from, checked against ``cfg``
    (:func:`~fastflow.training.config.check_resume`); ``(None, None)`` for a fresh run."""
    path = _resume_path(cfg, out)
    if not path:
        return None, None
    ck = load_checkpoint(path)
    check_resume(cfg, ck, path)
    return path, ck


def restore(run: Run, ck: dict, path: str) -> None:
    """Put a resumed run where checkpoint ``ck`` left it: weights, optimizer, position, RNG."""
    load_weights(run.flow, ck["state_dict"], path, run.cfg.model)
    try:
        run.opt.load_state_dict(ck["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit ({e})") from None
    run.epoch, run.step = int(ck["epoch"]), int(ck["step"])
    run.step_in_epoch, run.best_val = int(ck["step_in_epoch"]), float(ck["best_val"])
    run.metrics_len = int(ck.get("metrics_len", 0))
    torch.set_rng_state(ck["torch_rng"])


def load_best_weights(run: Run) -> None:
    """On rank 0, load ``best.pt``'s weights into the run's flow (if it was written)."""
    if run.is_main and os.path.exists(run.best_path):
        best = load_checkpoint(run.best_path, map_location=run.device)
        run.flow.load_state_dict(best["state_dict"])


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
        flow = build_model(ck["model_name"], pre.data_shape, ck["model_options"], pre)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot rebuild model {ck['model_name']!r}: {e}") from None
    dtype = DTYPES.get(ck.get("config", {}).get("dtype", "float32"), torch.float32)
    flow.to(dtype)
    load_weights(flow, ck["state_dict"], path, ck["model_name"])
    return flow.to(device).eval(), pre, ck


def load_weights(flow: nn.Module, state: dict, path: str, model_name: str) -> None:
    """``flow.load_state_dict(state)``; weights that do not fit are a one-line
    ``CheckpointError`` naming the checkpoint and the model."""
    try:
        flow.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(
            f"{path}: weights do not fit model {model_name!r} ({detail[:150]})"
        ) from None
