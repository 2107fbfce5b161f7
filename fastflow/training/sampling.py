"""Samples and plots: drawing samples in data space without touching the global RNG
(``fastflow sample``), ``samples.png`` (an image grid, or a 2-D scatter next to the data), and
the plots a finished run leaves in its folder (``samples.png``, ``loss.png``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fastflow.training.preprocess import Preprocess

if TYPE_CHECKING:
    from fastflow.training.loop import Run


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


def save_run_plots(run: Run, records: list[dict]) -> None:
    """A finished run's ``samples.png`` (``--sample-n`` samples at ``--temperature``; for vectors
    at least 2000 at temperature 1, over the test split) and ``loss.png`` (from ``records``)."""
    from fastflow.plots import save_loss_curve

    cfg, pre = run.cfg, run.pre
    data = run.splits.test.numpy() if pre.kind == "vector" else None
    n, temperature = cfg.sample_n, cfg.temperature
    if data is not None and n < 2000:
        n, temperature = 2000, 1.0
    smp = sample(run.flow, pre, n, temperature, cfg.seed, run.device)
    save_samples_png(smp, pre, os.path.join(run.out, "samples.png"), data)
    save_loss_curve(records, os.path.join(run.out, "loss.png"))
