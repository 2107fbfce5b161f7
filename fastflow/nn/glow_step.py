"""One step of Glow: ActNorm -> invertible 1x1 convolution -> affine (or additive) coupling."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastflow import _backend as B
from fastflow.nn.actnorm import ActNorm
from fastflow.nn.base import Transform
from fastflow.nn.coupling import ChannelsLastSequential
from fastflow.nn.invconv import InvConv1x1
from fastflow.ops._checks import check_finite_scalar, check_float_tensor
from fastflow.ops.coupling import (
    additive_coupling,
    additive_coupling_inverse,
    affine_coupling,
    affine_coupling_inverse,
    check_scale,
)
from fastflow.ops.invconv import channel_affine

__all__ = ["GlowConditioner", "GlowStep"]


class GlowConditioner(nn.Module):
    """Glow's coupling network: 3x3 conv -> ReLU -> 1x1 conv -> ReLU -> zero-initialised 3x3 conv.

    The last convolution starts at zero (weights and bias), so a fresh coupling is the identity
    map (for ``scale_fn="glow"`` up to the constant scale ``sigmoid(2)``). With ``affine=True``
    its first ``C_b`` output channels are the raw scale and the next ``C_b`` the shift, returned
    as the two halves ``(raw_scale, shift)`` of one convolution: views whose samples are
    contiguous, which the fused coupling reads in place (one convolution, not two over the
    even/odd filters of Glow's interleaved layout: a convolution with few output channels costs
    nearly as much as one with twice as many on the CPU).

    Args:
        in_channels: channels of the untouched half.
        out_channels: channels of the transformed half ``C_b``.
        hidden: width of the hidden layers (Glow uses 512).
        affine: return ``(raw_scale, shift)`` (each ``C_b`` channels); else only ``shift``.
        channels_last: on the CPU, run the convolutions on a channels-last copy of the input
            (:class:`~fastflow.nn.ChannelsLastSequential`; the output is returned in the default
            layout). oneDNN's convolutions, forward and backward, are
            15-25% faster on channels-last activations on the CPU at Glow's sizes (see
            docs/DESIGN-NOTES.md); the copy of the ``C // 2``-channel input and of the output is
            small next to the hidden activations. Same result up to rounding.

    Example:
        >>> net = GlowConditioner(2, 2, hidden=8)
        >>> with torch.no_grad():
        ...     raw, shift = net(torch.randn(1, 2, 5, 5))
        >>> raw.shape, float(shift.abs().max())
        (torch.Size([1, 2, 5, 5]), 0.0)

    Reference: Kingma & Dhariwal, "Glow", 2018 (section 3.3).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 512,
        affine: bool = True,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.affine = bool(affine)
        self.net = (ChannelsLastSequential if channels_last else nn.Sequential)(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, (2 if affine else 1) * out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        out = self.net(x)
        if not self.affine:
            return out
        c = out.shape[1] // 2
        # split, not two slices: its backward is one cat, not two zero-filled scatters
        raw, shift = out.split([c, c], 1)
        return raw, shift


class GlowStep(Transform):
    """One step of Glow: ActNorm, invertible 1x1 convolution, then a coupling layer.

    ActNorm and the 1x1 convolution are folded into a single per-pixel affine map
    (``W diag(exp(log_scale))`` and ``W bias``; see :mod:`fastflow.ops.invconv`) applied by one
    :func:`~fastflow.ops.invconv.channel_affine` pass, both forward and inverse; with the LU
    parameterization no ``slogdet`` or matrix inverse is computed per call. The coupling splits
    the channels into ``x_a = x[:, :C // 2]`` (untouched) and ``x_b = x[:, C // 2:]``; the
    conditioner maps ``x_a`` to ``raw_scale`` and ``shift`` (Glow's interleaved output channels:
    ``shift = h[:, 0::2]``, ``raw_scale = h[:, 1::2]``) for the fused
    :func:`~fastflow.ops.coupling.affine_coupling`
    (``y_b = x_b * exp(s) + shift``, ``s = log sigmoid(raw_scale + 2)`` by default; Glow's code
    writes ``(x_b + shift) * sigmoid(raw_scale + 2)``, the same family with the shift scaled), or
    ``shift = h`` for the additive coupling.

    Args:
        channels: image channels ``C`` (at least 2); inputs are ``[N, C, H, W]``.
        hidden: width of :class:`GlowConditioner`.
        coupling: ``"affine"`` or ``"additive"``.
        lu: LU-parameterized 1x1 convolution (else the plain weight with ``slogdet``).
        scale_fn, clamp: the affine coupling's scale function (see
            :func:`~fastflow.ops.coupling.affine_coupling`).
        data_init: ActNorm's data-dependent initialisation on the first forward call in
            training mode.
        fused: fold ActNorm into the convolution (one pass); ``False`` runs the two layers one
            after the other (same result, for testing and comparison).
        conditioner: replaces the default :class:`GlowConditioner`; maps ``[N, C // 2, H, W]`` to
            a tuple ``(raw_scale, shift)`` of ``[N, C - C // 2, H, W]`` tensors, or to one tensor
            ``h`` of ``2 * (C - C // 2)`` channels split as Glow does (``shift = h[:, 0::2]``,
            ``raw_scale = h[:, 1::2]``); for the additive coupling to ``shift`` alone.

    Example:
        >>> step = GlowStep(4, hidden=16)
        >>> x = torch.randn(8, 4, 6, 6)
        >>> z, logdet = step(x)
        >>> x2, ld2 = step.inverse(z)
        >>> torch.allclose(x, x2, atol=1e-4) and torch.allclose(logdet, -ld2, atol=1e-3)
        True

    Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 512,
        coupling: str = "affine",
        lu: bool = True,
        scale_fn: str = "glow",
        clamp: float = 2.0,
        data_init: bool = True,
        fused: bool = True,
        conditioner: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if int(channels) < 2:
            raise ValueError(f"channels must be >= 2 (the coupling splits them), got {channels}")
        if coupling not in ("affine", "additive"):
            raise ValueError(f"coupling must be 'affine' or 'additive', got {coupling!r}")
        check_scale(scale_fn, clamp)
        self.channels = int(channels)
        self.split = self.channels // 2
        self.coupling = coupling
        self.scale_fn = scale_fn
        self.clamp = check_finite_scalar("clamp", clamp, positive=True)
        self.fused = bool(fused)
        self.actnorm = ActNorm(self.channels, data_init=data_init)
        self.invconv = InvConv1x1(self.channels, lu=lu)
        c_b = self.channels - self.split
        self.conditioner = (
            conditioner
            if conditioner is not None
            else GlowConditioner(self.split, c_b, hidden, affine=coupling == "affine")
        )

    def extra_repr(self) -> str:
        return f"{self.channels}, coupling={self.coupling!r}, fused={self.fused}"

    def _check(self, name: str, x: Tensor, context: Tensor | None) -> None:
        check_float_tensor(name, x, min_dim=1)
        if x.dim() != 4:
            raise ValueError(f"{name} must be an image [N, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(
                f"{name} has {x.shape[1]} channels (dim 1) but GlowStep has {self.channels}"
            )
        if context is not None:
            raise ValueError("GlowStep is unconditional: context must be None")

    def _params(self, h: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        if isinstance(h, (tuple, list)):
            return h[0], h[1]
        return h[:, 1::2], h[:, 0::2]  # Glow's interleaved layout: raw_scale, shift

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z, logdet)`` with ``logdet`` of shape ``[N]`` (fp32, fp64 for fp64 input)."""
        self._check("x", x, context)
        acc = B.acc_dtype(x.dtype)
        if self.fused:
            self.actnorm.initialize_if_needed(x)
            w, _, ld_pp = self.invconv.weight_and_inverse(x.dtype, inverse=False)
            ls = self.actnorm.log_scale.to(x.dtype)
            t = self.actnorm.bias.to(x.dtype)
            # W (x * e + t) = (W diag(e)) x + W t, e = exp(log_scale)
            # .to(x.dtype): under autocast the matmul returns bf16/fp16 for fp32 data
            y = channel_affine(x, (w * torch.exp(ls)[None, :]).to(x.dtype), (w @ t).to(x.dtype))
            pixels = x.shape[2] * x.shape[3]
            ld = (self.actnorm.log_scale.to(acc).sum() + ld_pp.to(acc)) * pixels
            logdet = ld.expand(x.shape[0])
        else:
            y, ld1 = self.actnorm(x)
            y, ld2 = self.invconv(y)
            logdet = ld1 + ld2
        # split (not slicing): its backward is one cat instead of two zero-filled scatters
        xa, xb = y.split([self.split, self.channels - self.split], 1)
        yb, ldc = self._couple(xa, xb, inverse=False)
        return torch.cat([xa, yb], 1), logdet + ldc

    def _couple(self, xa: Tensor, xb: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        # A separate frame: the conditioner's outputs that autograd does not save (the shift)
        # are freed before the caller allocates the concatenated output, lowering peak memory.
        h = self.conditioner(xa)
        if self.coupling == "affine":
            raw, shift = self._params(h)
            fn = affine_coupling_inverse if inverse else affine_coupling
            # the conditioner may run in bf16/fp16 under autocast; the fused op wants one dtype
            raw, shift = raw.to(xb.dtype), shift.to(xb.dtype)
            return fn(xb, raw, shift, scale_fn=self.scale_fn, clamp=self.clamp)
        fn = additive_coupling_inverse if inverse else additive_coupling
        return fn(xb, h.to(xb.dtype))

    def _folded(self, dtype: torch.dtype, inverse: bool):
        """ActNorm folded into the 1x1 convolution: ``(W', b', logdet per pixel)`` of the
        forward map, or of the inverse map with ``inverse=True``."""
        acc = B.acc_dtype(dtype)
        ls = self.actnorm.log_scale.to(dtype)
        ld_pp = self.actnorm.log_scale.to(acc).sum()
        if not inverse:
            w, _, ld_w = self.invconv.weight_and_inverse(dtype, inverse=False)
            t = self.actnorm.bias.to(dtype)
            return (w * torch.exp(ls)[None, :]).to(dtype), (w @ t).to(dtype), ld_pp + ld_w.to(acc)
        _, w_inv, ld_w = self.invconv.weight_and_inverse(dtype)
        inv_e = torch.exp(-ls)
        b = (-self.actnorm.bias.to(dtype) * inv_e).to(dtype)
        return (w_inv * inv_e[:, None]).to(dtype), b, -(ld_pp + ld_w.to(acc))

    def recompute_backward(
        self, z: Tensor, grad_z: Tensor, grad_logdet: Tensor, index: dict
    ) -> tuple[Tensor, Tensor, dict] | None:
        """Invertible recomputation in one go (:mod:`fastflow.nn.recompute`): from the output
        ``z`` and the gradients of ``(z, logdet)``, rebuild the input ``x`` and return ``(x,
        grad_x, {index[id(p)]: grad_p})`` for this step's parameters in ``index`` (None where
        the step is not a fused affine one: the caller then takes the generic path).

        The conditioner runs once: its input ``x_a`` equals ``z_a``, so its pass for the inverse
        keeps its graph and serves the backward; only the cheap elementwise coupling and the
        folded 1x1 convolution are recomputed.
        """
        if not self.fused or self.coupling != "affine":
            return None  # the generic path (inverse, then forward with grad)
        za, zb = z.split([self.split, self.channels - self.split], 1)
        gza, gzb = grad_z.split([self.split, self.channels - self.split], 1)
        cond = [p for p in self.conditioner.parameters() if id(p) in index]
        with torch.enable_grad():
            xa = za.detach().requires_grad_(True)
            raw, shift = self._params(self.conditioner(xa))
            raw, shift = raw.to(zb.dtype), shift.to(zb.dtype)
            with torch.no_grad():
                xb, _ = affine_coupling_inverse(
                    zb, raw.detach(), shift.detach(), scale_fn=self.scale_fn, clamp=self.clamp
                )
            xb.requires_grad_(True)
            yb, ldc = affine_coupling(xb, raw, shift, scale_fn=self.scale_fn, clamp=self.clamp)
            g = torch.autograd.grad(
                (yb, ldc), [xa, xb, *cond], (gzb, grad_logdet.to(ldc.dtype)), allow_unused=True
            )
        g_y = torch.cat([gza + g[0], g[1]], 1)
        y = torch.cat([za, xb.detach()], 1)
        with torch.no_grad():
            w_i, b_i, _ = self._folded(z.dtype, inverse=True)
            x = channel_affine(y, w_i, b_i)
        rest = [
            p for p in (*self.actnorm.parameters(), *self.invconv.parameters()) if id(p) in index
        ]
        with torch.enable_grad():
            xl = x.requires_grad_(True)
            w, b, ld_pp = self._folded(z.dtype, inverse=False)
            y2 = channel_affine(xl, w, b)
            ld = ld_pp * (z.shape[2] * z.shape[3]) * grad_logdet.to(ld_pp.dtype).sum()
            g2 = torch.autograd.grad((y2, ld), [xl, *rest], (g_y, None), allow_unused=True)
        grads = {}
        for p, gp in (*zip(cond, g[2:]), *zip(rest, g2[1:])):
            if gp is not None:
                grads[index[id(p)]] = gp
        return x.detach(), g2[0], grads

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, logdet)`` of the inverse map (``logdet`` is minus the forward's)."""
        self._check("z", z, context)
        acc = B.acc_dtype(z.dtype)
        za, zb = z.split([self.split, self.channels - self.split], 1)
        xb, ldc = self._couple(za, zb, inverse=True)
        y = torch.cat([za, xb], 1)
        del xb
        if self.fused:
            _, w_inv, ld_pp = self.invconv.weight_and_inverse(z.dtype)
            ls = self.actnorm.log_scale.to(z.dtype)
            inv_e = torch.exp(-ls)
            # diag(1/e) W^-1 (y - W t) = (diag(1/e) W^-1) y - t / e
            x = channel_affine(
                y,
                (w_inv * inv_e[:, None]).to(z.dtype),
                (-self.actnorm.bias.to(z.dtype) * inv_e).to(z.dtype),
            )
            pixels = z.shape[2] * z.shape[3]
            ld = -(self.actnorm.log_scale.to(acc).sum() + ld_pp.to(acc)) * pixels
            return x, ld.expand(z.shape[0]) + ldc
        y, ld2 = self.invconv.inverse(y)
        x, ld1 = self.actnorm.inverse(y)
        return x, ld1 + ld2 + ldc
