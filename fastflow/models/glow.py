"""Glow (Kingma & Dhariwal, 2018): multi-scale flow of ActNorm -> invertible 1x1 conv ->
coupling steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflow.distributions import DiagonalGaussian, StandardNormal
from fastflow.flow import Flow
from fastflow.nn.base import Compose, Transform
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling, conv_subnet
from fastflow.nn.shape import Split, Squeeze

__all__ = ["Glow", "glow_step"]


# ----------------------------------------------------------------------------------------------
# Pure-torch ActNorm / 1x1 conv, used only while fastflow.nn.actnorm / fastflow.nn.invconv (the
# fused kernels) are not available.


class _ActNorm(Transform):
    def __init__(self, channels: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def _logdet(self, x: Tensor, sign: float) -> Tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        ld = sign * x.shape[2] * x.shape[3] * self.log_scale.to(acc).sum()
        return ld.expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            with torch.no_grad():  # data-dependent init: unit variance, zero mean per channel
                self.loc.copy_(-x.mean((0, 2, 3)).view_as(self.loc))
                std = x.std((0, 2, 3)) if x.shape[0] * x.shape[2] * x.shape[3] > 1 else None
                if std is not None:
                    self.log_scale.copy_(-torch.log(std + 1e-6).view_as(self.log_scale))
                self.initialized.fill_(True)
        return (x + self.loc) * torch.exp(self.log_scale), self._logdet(x, 1.0)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * torch.exp(-self.log_scale) - self.loc, self._logdet(z, -1.0)


class _InvConv1x1(Transform):
    def __init__(self, channels: int, lu: bool = True):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels))[0]
        self.lu = lu
        if lu:
            p, low, up = torch.linalg.lu(w)
            s = torch.diagonal(up)
            self.register_buffer("p", p)
            self.register_buffer("sign_s", torch.sign(s))
            self.lower = nn.Parameter(torch.tril(low, -1))
            self.upper = nn.Parameter(torch.triu(up, 1))
            self.log_s = nn.Parameter(torch.log(s.abs()))
        else:
            self.weight = nn.Parameter(w)

    def _weight(self) -> tuple[Tensor, Tensor]:
        if self.lu:
            eye = torch.eye(self.p.shape[0], dtype=self.p.dtype, device=self.p.device)
            low = torch.tril(self.lower, -1) + eye
            up = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
            return self.p @ low @ up, self.log_s.sum()
        return self.weight, torch.linalg.slogdet(self.weight)[1]

    def _logdet(self, x: Tensor, ld: Tensor, sign: float) -> Tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (sign * x.shape[2] * x.shape[3] * ld.to(acc)).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        w, ld = self._weight()
        return F.conv2d(x, w[:, :, None, None]), self._logdet(x, ld, 1.0)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        w, ld = self._weight()
        return F.conv2d(z, torch.linalg.inv(w)[:, :, None, None]), self._logdet(z, ld, -1.0)


def _norm_and_mix(channels: int, lu: bool) -> list[nn.Module]:
    """ActNorm and the 1x1 conv: the fused-kernel modules when they exist, else the fallback."""
    try:
        from fastflow.nn.actnorm import ActNorm
        from fastflow.nn.invconv import InvConv1x1
    except ImportError:
        return [_ActNorm(channels), _InvConv1x1(channels, lu=lu)]
    return [ActNorm(channels), InvConv1x1(channels, lu=lu)]


def glow_step(
    shape: tuple[int, int, int],
    hidden: int = 512,
    coupling: str = "affine",
    lu: bool = True,
    context_features: int | None = None,
    scale_fn: str = "glow",
    clamp: float = 2.0,
) -> Compose:
    """One step of Glow on ``(C, H, W)`` inputs: ActNorm -> invertible 1x1 conv -> coupling
    (channel split, Glow's conv conditioner), as a :class:`~fastflow.nn.Compose`.

    Example:
        >>> step = glow_step((4, 8, 8), hidden=8)
        >>> z, logdet = step(torch.randn(2, 4, 8, 8))
        >>> z.shape
        torch.Size([2, 4, 8, 8])

    Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """
    c = shape[0]
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
    elif coupling == "additive":
        cp = AdditiveCoupling(shape, "channel", subnet=subnet, context_features=context_features)
    else:
        raise ValueError(f"coupling must be 'affine' or 'additive', got {coupling!r}")
    return Compose([*_norm_and_mix(c, lu), cp])


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
