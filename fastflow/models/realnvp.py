"""RealNVP (Dinh et al., 2017): affine couplings, multi-scale for images."""

from __future__ import annotations

from torch import nn

from fastflow.distributions import StandardNormal
from fastflow.flow import Flow
from fastflow.nn.base import Compose
from fastflow.nn.coupling import AffineCoupling, MLPAffineCoupling
from fastflow.nn.shape import Split, Squeeze

__all__ = ["RealNVP"]


class RealNVP(Flow):
    """RealNVP for vectors or images.

    *Images* ``(C, H, W)``: ``levels`` scales. Every scale but the last: 3 affine couplings with
    alternating checkerboard masks, a 2x2 squeeze, 3 couplings with alternating channel masks,
    then half the channels are factored out (:class:`~fastflow.nn.Split`, with a learned
    conditional prior). The last scale: 4 checkerboard couplings. ``H`` and ``W`` must be
    divisible by ``2 ** (levels - 1)``. Conditioners are Glow-style convolutional nets.

    *Vectors* (``shape`` an int ``D``): ``layers`` affine couplings with alternating half masks.

    Args:
        shape: ``(C, H, W)`` for images or ``D`` for vectors.
        levels: number of scales (images).
        hidden: conditioner width (channels for images, units for vectors).
        layers: number of couplings (vectors only).
        context_features: optional vector context size (conditions every coupling and prior).
        scale_fn: coupling scale function (see :func:`fastflow.ops.coupling.affine_coupling`).
        clamp: soft-clamp bound.
        invertible_recompute: see :class:`~fastflow.Flow`.
        fused: vectors only: each coupling is a :class:`~fastflow.nn.MLPAffineCoupling` (the
            MLP conditioner and the coupling fused into one op each way, one flat parameter
            per layer) instead of an :class:`~fastflow.nn.AffineCoupling` with an
            ``nn.Sequential`` conditioner. The same model and parameter count; faster training
            steps at the sizes vector flows use (``bench/train_step.py``).

    Example:
        >>> import torch
        >>> model = RealNVP((1, 8, 8), levels=2, hidden=8)
        >>> model.sample(2).shape
        torch.Size([2, 1, 8, 8])
        >>> RealNVP(2, layers=4, hidden=16).log_prob(torch.randn(5, 2)).shape
        torch.Size([5])

    Reference: Dinh et al., "Density estimation using Real NVP", 2017.
    """

    def __init__(
        self,
        shape: int | tuple[int, int, int],
        levels: int = 2,
        hidden: int = 64,
        layers: int = 8,
        context_features: int | None = None,
        scale_fn: str = "softclamp",
        clamp: float = 2.0,
        invertible_recompute: bool = False,
        fused: bool = True,
    ):
        kw = dict(hidden=hidden, context_features=context_features, scale_fn=scale_fn, clamp=clamp)
        if isinstance(shape, int):
            if shape < 2:
                raise ValueError(f"features must be >= 2, got {shape}")
            if not isinstance(layers, int) or layers < 1:
                raise ValueError(f"layers must be a positive int, got {layers!r}")
            if fused:
                transforms = [MLPAffineCoupling(shape, parity=i % 2, **kw) for i in range(layers)]
            else:
                transforms = [
                    AffineCoupling(shape, "half", parity=i % 2, **kw) for i in range(layers)
                ]
            super().__init__(
                transforms,
                StandardNormal(shape),
                invertible_recompute=invertible_recompute,
                event_shape=(shape,),
            )
            return
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W) or an int, got {shape}")
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be a positive int, got {levels!r}")
        c, h, w = shape
        k = 2 ** (levels - 1)
        if h % k or w % k:
            raise ValueError(f"H and W must be divisible by 2**(levels-1) = {k}, got {shape}")
        scales: list[nn.Module] = []
        for _ in range(levels - 1):
            ts: list[nn.Module] = [
                AffineCoupling((c, h, w), "checkerboard", parity=i % 2, **kw) for i in range(3)
            ]
            ts.append(Squeeze())
            c, h, w = 4 * c, h // 2, w // 2
            ts += [AffineCoupling((c, h, w), "channel", parity=i % 2, **kw) for i in range(3)]
            split = Split((c, h, w), context_features=context_features)
            ts.append(split)
            c = split.keep
            scales.append(Compose(ts))
        scales.append(
            Compose(AffineCoupling((c, h, w), "checkerboard", parity=i % 2, **kw) for i in range(4))
        )
        super().__init__(
            Compose(scales),
            StandardNormal((c, h, w)),
            invertible_recompute=invertible_recompute,
            event_shape=shape,
        )
