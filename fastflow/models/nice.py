"""NICE: additive couplings and a final diagonal scaling (Dinh et al., 2015)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastflow._backend import acc_dtype
from fastflow.distributions import StandardNormal
from fastflow.flow import Flow
from fastflow.nn.base import Transform
from fastflow.nn.coupling import AdditiveCoupling, mlp_subnet

__all__ = ["NICE", "DiagonalScaling"]


class DiagonalScaling(Transform):
    """Elementwise scaling ``z = x * exp(s)`` with a learnable ``s`` per feature,
    ``logdet = sum(s)``: NICE's final layer, the only one of NICE that changes volume.

    Example:
        >>> layer = DiagonalScaling(3)
        >>> z, ld = layer(torch.ones(2, 3))
        >>> z.tolist(), ld.tolist()
        ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [0.0, 0.0])

    Reference: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2015.
    """

    def __init__(self, features: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(features))

    def _check(self, x: Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.log_scale.numel():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape [N, {self.log_scale.numel()}], got {got}")

    def _logdet(self, x: Tensor, sign: float) -> Tensor:
        acc = acc_dtype(x.dtype)
        return (sign * self.log_scale.to(acc).sum()).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, "x")
        return x * torch.exp(self.log_scale).to(x.dtype), self._logdet(x, 1.0)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, "z")
        return z * torch.exp(-self.log_scale).to(z.dtype), self._logdet(z, -1.0)


class NICE(Flow):
    """NICE for vectors: ``layers`` additive couplings on alternating (odd/even) features, then a
    learnable diagonal scaling, over a standard normal base.

    Args:
        features: data dimension ``D`` (>= 2).
        layers: number of additive coupling layers (the paper uses 4).
        hidden: width of each conditioner MLP (the paper uses 1000).
        hidden_layers: hidden layers per conditioner (the paper uses 4 or 5).
        context_features: optional context size (conditions every coupling).
        invertible_recompute: see :class:`~fastflow.Flow`.

    Example:
        >>> model = NICE(4, layers=4, hidden=16)
        >>> x = torch.randn(8, 4)
        >>> model.log_prob(x).shape, model.sample(3).shape
        (torch.Size([8]), torch.Size([3, 4]))

    Reference: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2015.
    """

    def __init__(
        self,
        features: int,
        layers: int = 4,
        hidden: int = 1000,
        hidden_layers: int = 4,
        context_features: int | None = None,
        invertible_recompute: bool = False,
    ):
        if not isinstance(features, int) or features < 2:
            raise ValueError(f"features must be an int >= 2, got {features!r}")
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        subnet = mlp_subnet(hidden, hidden_layers)
        transforms: list[nn.Module] = [
            AdditiveCoupling(
                features,
                mask="checkerboard",
                parity=i % 2,
                subnet=subnet,
                context_features=context_features,
            )
            for i in range(layers)
        ]
        transforms.append(DiagonalScaling(features))
        super().__init__(
            transforms,
            StandardNormal(features),
            invertible_recompute=invertible_recompute,
            event_shape=(features,),
        )
