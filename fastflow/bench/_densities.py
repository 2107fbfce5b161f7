"""Floors and baselines of the likelihood benchmark: the true densities of the 2-D toys of
:mod:`fastflow.data` in closed form (or one numerical integral), and the per-pixel histogram
baseline for images.

Units. Vectors: nats per example of the data as generated (the flows see standardised data and
the standardisation's log-det is added back, so the numbers compare directly). Images: bits per
dimension of a density over the dequantized space, the space the flows are scored in: a pixel of
level ``k`` (out of ``L``) becomes ``k + u`` with ``u ~ U[0, 1)``, so each level owns a unit-width
bin of ``[0, L)``. The histogram baseline is the density that is constant ``P(k)`` on bin ``k``
(``P`` the pixel's categorical distribution, add-one smoothed); its dequantized log-density is
``log P(k)`` for every ``u``, so its bits/dim are the same whether read as a density on the
dequantized data or as a discrete model of the levels. A flow's dequantized bits/dim is an upper
bound on its own discrete bits/dim (Jensen), so a flow above the histogram line is worse than
independent pixels even before that gap is counted.
"""

from __future__ import annotations

import math

import numpy as np

LN2 = math.log(2.0)

# the generators' constants (fastflow.data._moons, _eight_gaussians, _checkerboard)
MOONS_NOISE = 0.05
MOONS_SHIFT = (0.5, 0.25)
GAUSS8_RADIUS, GAUSS8_STD = 2.0, 0.2


def _log_normal2(d2: np.ndarray, std: float) -> np.ndarray:
    return -0.5 * d2 / std**2 - math.log(2 * math.pi * std**2)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def moons_log_density(x: np.ndarray, points: int = 1000, chunk: int = 4096) -> np.ndarray:
    """Log-density (nats) of ``fastflow.data``'s two moons at ``x`` ``[N, 2]``.

    The generator picks a half-circle with probability 1/2, a point ``t ~ U(0, pi)`` on it, adds
    ``N(0, 0.05^2 I)`` noise and shifts by ``-(0.5, 0.25)``; so the density is the noise Gaussian
    convolved with the uniform mixture over the two arcs,
    ``p(x) = 1/2 sum_arc 1/pi int_0^pi N(x + shift; c_arc(t), s^2 I) dt``,
    integrated with the midpoint rule on ``points`` nodes per arc (node spacing ``pi/points``
    along an arc of radius 1: 0.003 for 1000, far below the noise scale 0.05).

    Example:
        >>> round(float(moons_log_density(np.array([[-0.5, 0.75]]))[0]), 3)  # on the upper arc
        0.239
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1, 2) + np.array(MOONS_SHIFT)
    t = (np.arange(points) + 0.5) * (math.pi / points)
    nodes = np.concatenate(  # the upper arc, then the lower one
        [np.stack([np.cos(t), np.sin(t)], 1), np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)]
    )
    c2 = (nodes**2).sum(1)
    out = np.empty(x.shape[0])
    for i in range(0, x.shape[0], chunk):
        xs = x[i : i + chunk]
        d2 = np.maximum((xs**2).sum(1, keepdims=True) + c2[None] - 2.0 * xs @ nodes.T, 0.0)
        a = d2 * (-0.5 / MOONS_NOISE**2)
        m = a.max(1)
        out[i : i + chunk] = m + np.log(np.exp(a - m[:, None]).sum(1))
    # the mean over 2 * points nodes of the Gaussian's density
    return out - math.log(2 * points) - math.log(2 * math.pi * MOONS_NOISE**2)


def eight_gaussians_log_density(x: np.ndarray) -> np.ndarray:
    """Log-density of ``8gaussians``: an equal mixture of ``N(2 (cos k pi/4, sin k pi/4),
    0.2^2 I)``, ``k = 0..7``.

    Example:
        >>> round(float(eight_gaussians_log_density(np.array([[2.0, 0.0]]))[0]), 3)
        -0.698
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1, 2)
    k = np.arange(8)
    c = GAUSS8_RADIUS * np.stack([np.cos(k * math.pi / 4), np.sin(k * math.pi / 4)], 1)
    d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    return _logsumexp(_log_normal2(d2, GAUSS8_STD), 1) - math.log(8)


def checkerboard_log_density(x: np.ndarray) -> np.ndarray:
    """Log-density of ``checkerboard``: uniform on the 8 unit squares of ``[-2, 2)^2`` whose row
    and column indices have the same parity (``log(1/8)`` there, ``-inf`` elsewhere).

    Example:
        >>> checkerboard_log_density(np.array([[-1.5, -1.5], [-0.5, -1.5]])).round(4).tolist()
        [-2.0794, -inf]
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1, 2)
    i = np.floor(x + 2.0)
    inside = ((i >= 0) & (i <= 3)).all(1) & ((i[:, 0] - i[:, 1]) % 2 == 0)
    return np.where(inside, -math.log(8.0), -np.inf)


TRUE_LOG_DENSITY = {
    "moons": moons_log_density,
    "8gaussians": eight_gaussians_log_density,
    "checkerboard": checkerboard_log_density,
}


def histogram_log_probs(train: np.ndarray, levels: int) -> np.ndarray:
    """Per-pixel categorical log-probabilities ``[D, levels]`` fit on integer images ``train``
    ``[N, ...]`` with add-one (Laplace) smoothing: ``P_d(k) = (count_d(k) + 1) / (N + levels)``.

    Example:
        >>> lp = histogram_log_probs(np.array([[0, 1], [0, 0]]), levels=2)
        >>> np.exp(lp).round(3).tolist()
        [[0.75, 0.25], [0.5, 0.5]]
    """
    x = np.asarray(train).reshape(len(train), -1).astype(np.int64)
    if x.size and (x.min() < 0 or x.max() >= levels):
        raise ValueError(f"train: levels must lie in [0, {levels}), got {x.min()}..{x.max()}")
    d = x.shape[1]
    counts = np.zeros((d, levels))
    np.add.at(counts, (np.broadcast_to(np.arange(d), x.shape), x), 1.0)
    return np.log(counts + 1.0) - math.log(x.shape[0] + levels)


def histogram_bits_per_dim(train: np.ndarray, test: np.ndarray, levels: int) -> float:
    """Test bits/dim of the per-pixel histogram baseline (see the module docstring for why this
    is in the same units as a flow's dequantized bits/dim).

    Example:
        >>> tr = np.array([[0, 1], [0, 0]])
        >>> round(histogram_bits_per_dim(tr, np.array([[0, 1]]), 2), 4)  # -(log2 .75 + log2 .5)/2
        0.7075
    """
    lp = histogram_log_probs(train, levels)
    y = np.asarray(test).reshape(len(test), -1).astype(np.int64)
    ll = lp[np.arange(lp.shape[0])[None, :], y].sum(1)
    return float(-ll.mean() / (lp.shape[0] * LN2))
