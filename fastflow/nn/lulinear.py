"""``LULinear``: an invertible linear layer for vectors, LU-parameterized (nflows' LULinear)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastflow.nn.invconv import InvConv1x1
from fastflow.ops.invconv import channel_affine

__all__ = ["LULinear"]


class LULinear(InvConv1x1):
    """Invertible linear map ``z = W x + b`` on ``[N, D]`` vectors with ``W = P L (U + diag(s))``.

    The vector counterpart of Glow's 1x1 convolution (it *is* :class:`InvConv1x1` on ``[N, D]``
    plus a bias): the weight, its inverse (two triangular inversions) and ``log|det W| =
    sum(log_s)`` come from one O(D^3) :func:`~fastflow.ops.invconv.lu_weight` call per pass, so
    the inverse costs one matrix product too, with no per-call ``torch.linalg.inv`` or
    ``slogdet``. Initialised from a random orthogonal matrix and a zero bias.

    Args:
        features: ``D``.
        bias: learn a bias ``b``.

    Example:
        >>> layer = LULinear(5)
        >>> x = torch.randn(3, 5)
        >>> z, logdet = layer(x)
        >>> x2, ld2 = layer.inverse(z)
        >>> torch.allclose(x, x2, atol=1e-5) and torch.allclose(logdet, -ld2)
        True

    Reference: Kingma & Dhariwal, "Glow", 2018 (LU-decomposed 1x1 convolution); Durkan et al.,
    "Neural Spline Flows", 2019 (LULinear for vectors).
    """

    def __init__(self, features: int, bias: bool = True) -> None:
        super().__init__(features, lu=True)
        self.bias = nn.Parameter(torch.zeros(self.channels)) if bias else None

    def extra_repr(self) -> str:
        return f"{self.channels}, bias={self.bias is not None}"

    def _check(self, name: str, x: Tensor) -> None:
        super()._check(name, x)
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape [N, {self.channels}], got {tuple(x.shape)}")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(W x + b, log|det W|)``, logdet of shape ``[N]``."""
        if self.bias is None:
            return super().forward(x, context)
        self._check("x", x)
        w, _, ld = self.weight_and_inverse(x.dtype, inverse=False)
        return channel_affine(x, w, self.bias.to(x.dtype)), self._logdet(ld, x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(W^-1 (z - b), -log|det W|)``."""
        if self.bias is None:
            return super().inverse(z, context)
        self._check("z", z)
        _, w_inv, ld = self.weight_and_inverse(z.dtype)
        # W^-1 (z - b) = W^-1 z + (-W^-1 b): one fused pass with a folded bias
        b_inv = -(w_inv @ self.bias.to(z.dtype))
        return channel_affine(z, w_inv, b_inv), self._logdet(-ld, z)
