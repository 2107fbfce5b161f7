"""Glow (Kingma & Dhariwal, 2018): multi-scale flow of ActNorm -> invertible 1x1 conv ->
coupling steps."""

from __future__ import annotations

from torch import nn

from fastflow.distributions import DiagonalGaussian, StandardNormal
from fastflow.flow import Flow
from fastflow.nn.actnorm import ActNorm
from fastflow.nn.base import Compose
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling, conv_subnet
from fastflow.nn.glow_step import GlowStep
from fastflow.nn.invconv import InvConv1x1
from fastflow.nn.shape import Split, Squeeze

__all__ = ["Glow", "glow_step"]


def glow_step(
    shape: tuple[int, int, int],
    hidden: int = 512,
    coupling: str = "affine",
    lu: bool = True,
    context_features: int | None = None,
    scale_fn: str = "glow",
    clamp: float = 2.0,
) -> nn.Module:
    """One step of Glow on ``(C, H, W)`` inputs: ActNorm -> invertible 1x1 conv -> coupling.

    Unconditional steps are :class:`~fastflow.nn.glow_step.GlowStep` (ActNorm folded into the
    1x1 convolution, one fused pass). With ``context_features`` the step is a
    :class:`~fastflow.nn.Compose` of :class:`~fastflow.nn.ActNorm`,
    :class:`~fastflow.nn.InvConv1x1` and a channel-split coupling whose conditioner also reads
    the context (broadcast over pixels).

    Example:
        >>> import torch
        >>> step = glow_step((4, 8, 8), hidden=8)
        >>> z, logdet = step(torch.randn(2, 4, 8, 8))
        >>> z.shape
        torch.Size([2, 4, 8, 8])

    Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """
    if coupling not in ("affine", "additive"):
        raise ValueError(f"coupling must be 'affine' or 'additive', got {coupling!r}")
    c = shape[0]
    if context_features is None:
        return GlowStep(c, hidden, coupling=coupling, lu=lu, scale_fn=scale_fn, clamp=clamp)
    subnet = conv_subnet(hidden)
    if coupling == "affine":
        cp: nn.Module = AffineCoupling(
            shape,
            "channel",
            subnet=subnet,
            context_features=context_features,
            scale_fn=scale_fn,
            clamp=clamp,
        )
    else:
        cp = AdditiveCoupling(shape, "channel", subnet=subnet, context_features=context_features)
    return Compose([ActNorm(c), InvConv1x1(c, lu=lu), cp])


class Glow(Flow):
    """Glow: ``levels`` scales of (squeeze, ``steps`` x [ActNorm, 1x1 conv, coupling], split).

    The last scale has no split. Splits factor out half the channels with a learned conditional
    prior (zero-initialised conv on the kept half); the final latent has a standard normal base,
    or a learned diagonal Gaussian with ``learn_top=True``. ``sample(n, temperature=T)`` samples
    every latent at temperature ``T``.

    Args:
        image_shape: ``(C, H, W)``; ``H`` and ``W`` divisible by ``2 ** levels``.
        levels: number of scales ``L``.
        steps: steps per scale ``K``.
        hidden: conditioner width (the paper uses 512).
        coupling: ``"affine"`` or ``"additive"``.
        lu: LU-parameterised 1x1 convolutions (else a plain weight matrix).
        context_features: optional vector context (conditions couplings and split priors).
        scale_fn, clamp: affine coupling scale function (Glow's ``"glow"`` sigmoid by default).
        learn_top: learned diagonal Gaussian for the final latent.
        invertible_recompute: keep only each scale's output for backward and rebuild inputs
            with exact inverses (see :class:`~fastflow.Flow`); activation memory stops growing
            with ``steps``.

    Example:
        >>> import torch
        >>> model = Glow((3, 8, 8), levels=2, steps=2, hidden=8)
        >>> x = torch.rand(4, 3, 8, 8)
        >>> model.log_prob(x).shape, model.sample(2, temperature=0.7).shape
        (torch.Size([4]), torch.Size([2, 3, 8, 8]))

    Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        levels: int = 3,
        steps: int = 32,
        hidden: int = 512,
        coupling: str = "affine",
        lu: bool = True,
        context_features: int | None = None,
        scale_fn: str = "glow",
        clamp: float = 2.0,
        learn_top: bool = False,
        invertible_recompute: bool = False,
    ):
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be a positive int, got {levels!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if coupling not in ("affine", "additive"):
            raise ValueError(f"coupling must be 'affine' or 'additive', got {coupling!r}")
        c, h, w = shape
        k = 2**levels
        if h % k or w % k:
            raise ValueError(f"H and W must be divisible by 2**levels = {k}, got {shape}")
        scales: list[nn.Module] = []
        for level in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            ts: list[nn.Module] = [Squeeze()]
            ts += [
                glow_step((c, h, w), hidden, coupling, lu, context_features, scale_fn, clamp)
                for _ in range(steps)
            ]
            if level < levels - 1:
                split = Split((c, h, w), context_features=context_features)
                ts.append(split)
                c = split.keep
            scales.append(Compose(ts))
        top = (c, h, w)
        base = DiagonalGaussian(top) if learn_top else StandardNormal(top)
        super().__init__(
            Compose(scales), base, invertible_recompute=invertible_recompute, event_shape=shape
        )
