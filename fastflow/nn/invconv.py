"""Invertible 1x1 convolution (Glow), LU-parameterized or plain."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastflow import _backend as B
from fastflow.nn.base import Transform
from fastflow.ops._checks import check_float_tensor
from fastflow.ops.invconv import channel_affine, lu_weight, plain_weight

__all__ = ["InvConv1x1"]


class InvConv1x1(Transform):
    """Invertible 1x1 convolution ``y[n, :, h, w] = W x[n, :, h, w]`` (Glow).

    With ``lu=True`` (default) ``W = P L (U + diag(sign_s * exp(log_s)))``: ``P`` (a fixed
    permutation) and ``sign_s`` are buffers, ``L`` (strictly lower part used), ``U`` (strictly
    upper part used) and ``log_s`` are parameters. The weight, its inverse and the log-det
    ``H * W * sum(log_s)`` come from one O(C^3) :func:`~fastflow.ops.invconv.lu_weight` call per
    pass, and the per-pixel map is one :func:`~fastflow.ops.invconv.channel_affine` pass. With
    ``lu=False`` the weight is a free ``[C, C]`` parameter and the log-det is ``slogdet`` (the
    inverse direction calls ``torch.linalg.inv``), as in Glow's non-LU variant.

    Both start from a random orthogonal matrix (log-det 0). Works on ``[N, C]`` rows and
    ``[N, C, *spatial]`` images.

    Args:
        channels: number of channels ``C``.
        lu: LU parameterization (else the plain weight).

    Example:
        >>> conv = InvConv1x1(4)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> z, logdet = conv(x)
        >>> x2, ld2 = conv.inverse(z)
        >>> torch.allclose(x, x2, atol=1e-5) and torch.allclose(logdet, -ld2)
        True

    Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, channels: int, lu: bool = True) -> None:
        super().__init__()
        if int(channels) < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = c = int(channels)
        self.lu = bool(lu)
        q = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0]
        if self.lu:
            p, lower, upper = torch.linalg.lu(q)
            d = torch.diagonal(upper)
            self.register_buffer("P", p.float())
            self.register_buffer("sign_s", torch.sign(d).float())
            self.L = nn.Parameter(torch.tril(lower, -1).float())
            self.U = nn.Parameter(torch.triu(upper, 1).float())
            self.log_s = nn.Parameter(torch.log(d.abs()).float())
        else:
            self.weight = nn.Parameter(q.float())
        # P and sign_s are fixed buffers: lu_weight checks them on the first call only (and again
        # after a state_dict load)
        self._constants_checked = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._constants_checked = False

    def extra_repr(self) -> str:
        return f"{self.channels}, lu={self.lu}"

    def weight_and_inverse(
        self, dtype: torch.dtype | None = None, inverse: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(W, W_inv, logdet_per_pixel)`` in ``dtype`` (default: the parameters' dtype).

        ``W_inv`` is None when ``inverse=False`` (the density direction needs only ``W``).
        """
        if self.lu:
            ps = (self.P, self.L, self.U, self.log_s, self.sign_s)
            if dtype is not None:
                ps = tuple(t.to(dtype) for t in ps)
            check = not self._constants_checked
            out = lu_weight(*ps, check_constants=check, inverse=inverse)
            self._constants_checked = True
            return out
        w = self.weight if dtype is None else self.weight.to(dtype)
        return plain_weight(w, inverse=inverse)

    def _check(self, name: str, x: Tensor) -> None:
        check_float_tensor(name, x, min_dim=2)
        if x.shape[1] != self.channels:
            raise ValueError(
                f"{name} has {x.shape[1]} channels (dim 1) but InvConv1x1 has {self.channels}"
            )

    @staticmethod
    def _logdet(ld: Tensor, x: Tensor) -> Tensor:
        pixels = x.numel() // max(x.shape[0] * x.shape[1], 1)
        return (ld.to(B.acc_dtype(x.dtype)) * pixels).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(W x, H * W * log|det W|)`` per pixel; logdet of shape ``[N]``."""
        self._check("x", x)
        w, _, ld = self.weight_and_inverse(x.dtype, inverse=False)
        return channel_affine(x, w), self._logdet(ld, x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(W^-1 z, -H * W * log|det W|)``."""
        self._check("z", z)
        _, w_inv, ld = self.weight_and_inverse(z.dtype)
        return channel_affine(z, w_inv), self._logdet(-ld, z)
