"""Image helpers: uniform dequantization and bits per dimension."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastflow._backend import acc_dtype

__all__ = ["dequantize", "bits_per_dim"]


def dequantize(x: Tensor, bits: int = 8, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization of discrete pixel values to ``[0, 1)``.

    ``y = (x + u) / 2**bits`` with ``u ~ U[0, 1)``. Integer inputs (e.g. ``uint8``) hold levels in
    ``[0, 2**bits)``; floating inputs are taken as pixel values in ``[0, 1]`` (as
    ``torchvision.transforms.ToTensor`` gives) and first rounded to their level. A flow's
    log-density of ``y`` then lower-bounds the discrete log-likelihood:
    ``log P(x) >= log p(y) - D * bits * log 2`` (see :func:`bits_per_dim`).

    Args:
        x: pixel levels ``[N, ...]`` (integers) or values in ``[0, 1]`` (floats).
        bits: bits per channel, 1 to 16.
        generator: optional ``torch.Generator`` for the noise.

    Returns:
        A float tensor in ``[0, 1)`` (fp32 for integer input, else ``x.dtype``).

    Example:
        >>> x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
        >>> y = dequantize(x)
        >>> bool(((y * 256).floor() == x).all())
        True

    Reference: Theis et al., "A note on the evaluation of generative models", 2016; Dinh et al.,
    "Density estimation using Real NVP", 2017.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")
    levels = 2**bits
    if x.dtype.is_floating_point:
        out_dtype = x.dtype
        k = torch.round(x.to(acc_dtype(x.dtype)) * (levels - 1))
    elif x.dtype == torch.bool or x.dtype.is_complex:
        raise TypeError(f"x must be integer or floating, got {x.dtype}")
    else:
        out_dtype = torch.float32
        k = x.to(torch.float32)
    if x.numel() and (k.min() < 0 or k.max() > levels - 1):
        raise ValueError(f"x has values outside [0, {levels - 1}] for bits={bits}")
    u = torch.rand(k.shape, generator=generator, device=k.device, dtype=k.dtype)
    # (k + u) / levels can round up to exactly 1.0 in fp32 for the top level; keep it below
    y = ((k + u) / levels).clamp_max(1.0 - 1.0 / (levels * 4096))
    return y.to(out_dtype)


def bits_per_dim(log_prob: Tensor, num_dims: int | tuple[int, ...], bits: int = 8) -> Tensor:
    """Bits per dimension of dequantized data from the flow's log-density of ``y = x / 2**bits``.

    ``bpd = -(log p(y) - D * bits * log 2) / (D * log 2) = -log p(y) / (D log 2) + bits``, the
    negative discrete log-likelihood bound in bits, averaged over the ``D`` dimensions. Data
    rescaled by an affine map after :func:`dequantize` (e.g. centred to ``[-0.5, 0.5)``) must
    include that map's log-det in ``log_prob`` (a shift costs nothing).

    Args:
        log_prob: ``log p(y)`` per example, any shape.
        num_dims: ``D`` (an int) or the event shape, e.g. ``(3, 32, 32)``.
        bits: bits per channel used by :func:`dequantize`.

    Example:
        >>> # a uniform density on [0, 1)^D has log p = 0: exactly `bits` bits per dim
        >>> bits_per_dim(torch.zeros(2), (3, 8, 8)).tolist()
        [8.0, 8.0]

    Reference: Theis et al., "A note on the evaluation of generative models", 2016.
    """
    d = math.prod(num_dims) if isinstance(num_dims, (tuple, list, torch.Size)) else int(num_dims)
    if d < 1:
        raise ValueError(f"num_dims must be positive, got {num_dims!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits must be a positive int, got {bits!r}")
    return -log_prob / (d * math.log(2.0)) + bits
