"""Pictures a training run leaves: sample grids, 2-D scatter plots, loss curves (matplotlib,
Agg backend, imported lazily so the core library does not need it)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["image_grid", "save_image_grid", "save_scatter", "save_loss_curve"]


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ValueError('plots need matplotlib: pip install "fastflow[train]"') from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile ``[N, C, H, W]`` images with values in ``[0, 1]`` into one ``[rows*(H+pad)-pad,
    cols*(W+pad)-pad, C]`` array (``C`` is 1 or 3; padding is white).

    Example:
        >>> image_grid(np.zeros((5, 1, 8, 8)), ncol=3).shape
        (17, 26, 1)
    """
    images = np.asarray(images, dtype=np.float64)
    n, c, h, w = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = max(1, math.ceil(n / ncol))
    out = np.ones((nrow * (h + pad) - pad, ncol * (w + pad) - pad, c))
    for i in range(n):
        r, q = divmod(i, ncol)
        out[r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = images[
            i
        ].transpose(1, 2, 0)
    return out


def save_image_grid(images: np.ndarray, path: str, scale: int = 4) -> None:
    """Save ``[N, C, H, W]`` images in ``[0, 1]`` as a PNG grid (nearest-neighbour upscaled by
    ``scale``; grayscale for ``C == 1``).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "g.png")
        >>> save_image_grid(np.random.rand(4, 1, 8, 8), p)
        >>> os.path.getsize(p) > 0
        True
    """
    plt = _plt()
    grid = image_grid(np.clip(images, 0, 1))
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    if grid.shape[2] == 1:
        plt.imsave(path, grid[:, :, 0], cmap="gray", vmin=0, vmax=1)
    else:
        plt.imsave(path, grid)


def save_scatter(samples: np.ndarray, data: np.ndarray | None, path: str, title: str = "") -> None:
    """Save a 2-D scatter of model samples next to the data (first two coordinates).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "s.png")
        >>> save_scatter(np.random.randn(50, 2), np.random.randn(50, 2), p)
        >>> os.path.exists(p)
        True
    """
    plt = _plt()
    panels = [("data", data), ("samples", samples)] if data is not None else [("samples", samples)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    pts = np.concatenate([p for _, p in panels])[:, :2]
    lo, hi = np.percentile(pts, 0.5, axis=0), np.percentile(pts, 99.5, axis=0)
    margin = 0.1 * (hi - lo + 1e-9)
    for ax, (name, p) in zip(axes[0], panels):
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.4, color="C0" if name == "data" else "C1")
        ax.set_title(name)
        ax.set_xlim(lo[0] - margin[0], hi[0] + margin[0])
        ax.set_ylim(lo[1] - margin[1], hi[1] + margin[1])
        ax.set_aspect("equal", adjustable="box")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_loss_curve(records: list[dict], path: str, key: str = "bpd") -> None:
    """Plot per-epoch ``train_<key>`` and ``val_<key>`` from ``metrics.jsonl`` records.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "l.png")
        >>> save_loss_curve([{"epoch": 1, "train_bpd": 3.0, "val_bpd": 2.9}], p)
        >>> os.path.exists(p)
        True
    """
    plt = _plt()
    epochs = [r for r in records if "epoch" in r and f"train_{key}" in r]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for split, style in (("train", "-o"), ("val", "-s")):
        xs = [r["epoch"] for r in epochs if r.get(f"{split}_{key}") is not None]
        ys = [r[f"{split}_{key}"] for r in epochs if r.get(f"{split}_{key}") is not None]
        if xs:
            ax.plot(xs, ys, style, markersize=3, label=split)
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits/dim" if key == "bpd" else "NLL (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
