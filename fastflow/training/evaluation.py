"""Scoring data under a flow: per-example log-likelihoods, the mean NLL and bits/dim of a split
sharded over the ranks, and :func:`evaluate_checkpoint` (``fastflow evaluate``) with the
invertibility report and out-of-distribution scores: AUROC by likelihood and by the typicality
test.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastflow.data import load_data
from fastflow.training.checkpoints import load_model
from fastflow.training.config import DTYPES
from fastflow.training.distributed import all_sum, dist_info
from fastflow.training.preprocess import (
    LN2,
    Preprocess,
    Splits,
    load_splits,
    noise_generator,
    rows_for,
)


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
            g = noise_generator(seed, 7, i)
            xm = pre.to_model(x[i : i + batch_size], g, dtype).to(device)
            out.append(flow.log_prob(xm).double().cpu() + pre.offset)
    finally:
        flow.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def sharded_nll_bpd(
    flow: nn.Module,
    pre: Preprocess,
    x: Tensor,
    batch_size: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[float, float]:
    """(mean NLL nats, mean bits/dim) over ``x``, each rank scoring a shard, summed over ranks."""
    rank, world, _ = dist_info()
    ll = log_likelihood(flow, pre, x[rank::world], batch_size, seed, device, dtype)
    s, n = all_sum([float(ll.sum()), float(ll.numel())], device)
    nll = -s / max(n, 1)
    return nll, nll / (pre.dims * LN2)


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
    if batch_size < 1 or ood_batch < 1 or ood_trials < 1:
        raise ValueError("--batch-size, --ood-batch and --ood-trials must be positive")
    flow, pre, ck = load_model(path, device)
    cfg = ck["config"]
    dtype = DTYPES.get(cfg.get("dtype", "float32"), torch.float32)
    own = load_splits(cfg["data"], cfg.get("n_data"), cfg["val"], cfg["test"], cfg["seed"])
    if data is None or data == cfg["data"]:
        parts = {"train": own.train, "val": own.val, "test": own.test, "all": own.ds.x}
        x, what = parts[split], f"{cfg['data']} ({split} split)"
    else:
        x, what = rows_for(pre, load_data(data, seed=seed)), data
    score = partial(log_likelihood, flow, pre, batch_size=batch_size, device=device, dtype=dtype)
    nll = float(-score(x, seed=seed).mean())
    res: dict[str, Any] = {
        "data": what,
        "n": int(x.shape[0]),
        "nll": nll,
        "bpd": nll / (pre.dims * LN2),
    }
    res.update(_invertibility(flow, pre, x, seed, dtype, device))
    if ood is not None:
        res["ood"] = ood
        xo = _ood_rows(ood, pre, own, seed)
        res.update(_ood_scores(score, pre, own, xo, seed, ood_batch, ood_trials))
    return res


def _invertibility(flow, pre: Preprocess, x: Tensor, seed: int, dtype, device) -> dict:
    """The per-layer round-trip report on up to 256 rows of ``x`` and its worst layer."""
    from fastflow.diagnostics import check_invertibility

    g = torch.Generator().manual_seed(seed)
    xb = pre.to_model(x[:256], g, dtype).to(device)
    report = check_invertibility(flow, xb)
    worst = report.worst() if len(report) else None
    return {"invertibility": report, "worst_layer": None if worst is None else vars(worst)}


def _ood_rows(ood: str, pre: Preprocess, own: Splits, seed: int) -> Tensor:
    """The other data: a named data set, or ``noise`` (uniform levels for images, uniform over
    the data's bounding box for vectors; as many rows as the test split, at least 100)."""
    from fastflow.data import noise_images

    if ood != "noise":
        return rows_for(pre, load_data(ood, seed=seed))
    n_ood = max(int(own.test.shape[0]), 100)
    if pre.kind == "image":
        return noise_images(pre.data_shape, pre.levels, n_ood, seed + 1).x
    gen = torch.Generator().manual_seed(seed + 1)
    lo, hi = own.ds.x.min(0).values, own.ds.x.max(0).values
    u = torch.rand(n_ood, *pre.data_shape, generator=gen, dtype=torch.float64)
    return lo + u * (hi - lo)


def _ood_scores(score, pre, own: Splits, xo: Tensor, seed, ood_batch, ood_trials) -> dict:
    """OOD statistics of ``xo`` against the in-distribution test split (``score(x, seed=...)``
    is the per-example log-likelihood)."""
    nll_in = (-score(own.test, seed=seed)).numpy()
    nll_ood = (-score(xo, seed=seed + 3)).numpy()
    ref = float(-score(own.train[:2000], seed=seed).mean())
    t_in = typicality_scores(nll_in, ref, ood_batch, ood_trials, seed)
    t_ood = typicality_scores(nll_ood, ref, ood_batch, ood_trials, seed + 1)
    return {
        "ood_n": int(xo.shape[0]),
        "in_nll": float(nll_in.mean()),
        "ood_nll": float(nll_ood.mean()),
        "ood_bpd": float(nll_ood.mean()) / (pre.dims * LN2),
        "train_nll": ref,
        "auroc_likelihood": auroc(nll_in, nll_ood),
        "auroc_typicality": auroc(t_in, t_ood),
        "ood_batch": min(ood_batch, nll_in.size, nll_ood.size),
    }
