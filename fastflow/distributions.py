"""Base distributions for flows (as ``nn.Module`` so their parameters train with the flow).

Every base has ``log_prob(z, context=None) -> [N]`` (summed over the event shape, fp32 or fp64)
and ``sample(n, context=None, temperature=1.0) -> [n, *shape]``; ``temperature`` scales the
standard deviation of the samples (Kingma & Dhariwal, 2018), not the density ``log_prob`` uses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastflow._backend import acc_dtype

__all__ = ["StandardNormal", "DiagonalGaussian", "ConditionalDiagonalGaussian"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _shape(shape: int | tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a tuple of positive sizes, got {shape}")
    return shape


_acc = acc_dtype


def _check_n(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return n


def _check_temperature(temperature: object) -> float:
    try:
        t = float(temperature)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a number, got {temperature!r}") from None
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
    return t


class _Base(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = _shape(shape)
        # an empty buffer so samples follow the module's device and dtype
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"

    def _check_z(self, z: Tensor) -> None:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"z must have shape [N, *{self.shape}], got {tuple(z.shape)}")

    @staticmethod
    def _normal_logp(eps: Tensor, log_sigma: Tensor | None) -> Tensor:
        acc = _acc(eps.dtype)
        e = eps.to(acc)
        lp = -0.5 * e * e - _HALF_LOG_2PI
        if log_sigma is not None:
            lp = lp - log_sigma.to(acc)
        return lp.flatten(1).sum(1)


class StandardNormal(_Base):
    """Standard normal ``N(0, I)`` over an event of shape ``shape``.

    Args:
        shape: event shape, e.g. ``2`` or ``(3, 32, 32)``.

    Example:
        >>> base = StandardNormal(2)
        >>> round(base.log_prob(torch.zeros(1, 2)).item(), 4)  # -log(2 pi)
        -1.8379
        >>> base.sample(5).shape
        torch.Size([5, 2])

    Reference: Rezende & Mohamed, "Variational Inference with Normalizing Flows", 2015.
    """

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check_z(z)
        return self._normal_logp(z, None)

    def sample(self, n: int, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        n, t = _check_n(n), _check_temperature(temperature)
        a = self._anchor
        return torch.randn(n, *self.shape, device=a.device, dtype=a.dtype) * t


class DiagonalGaussian(_Base):
    """Gaussian with learnable mean and log-std per element, ``N(loc, diag(exp(log_scale))^2)``.

    Initialised to the standard normal.

    Example:
        >>> base = DiagonalGaussian((2, 4, 4))
        >>> base.sample(3, temperature=0.5).shape
        torch.Size([3, 2, 4, 4])
        >>> sorted(n for n, _ in base.named_parameters())
        ['loc', 'log_scale']

    Reference: Kingma & Dhariwal, "Glow", 2018 (learned top prior).
    """

    def __init__(self, shape: int | tuple[int, ...]):
        super().__init__(shape)
        self.loc = nn.Parameter(torch.zeros(self.shape))
        self.log_scale = nn.Parameter(torch.zeros(self.shape))

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check_z(z)
        eps = (z - self.loc) * torch.exp(-self.log_scale)
        return self._normal_logp(eps, self.log_scale.expand_as(z))

    def sample(self, n: int, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        n, t = _check_n(n), _check_temperature(temperature)
        eps = torch.randn(n, *self.shape, device=self.loc.device, dtype=self.loc.dtype) * t
        return self.loc + torch.exp(self.log_scale) * eps


class ConditionalDiagonalGaussian(_Base):
    """Gaussian whose mean and log-std are produced from a context vector by a network.

    Args:
        shape: event shape.
        context_features: size ``F`` of the context ``[N, F]``.
        hidden: hidden width of the default MLP (``Linear -> ReLU -> Linear``, last layer zero
            initialised so the base starts standard normal).
        net: optional ``nn.Module`` mapping ``[N, F]`` to ``[N, 2 * prod(shape)]`` instead.

    ``sample(n, context)``: ``context`` has ``n`` rows, or one row used for all ``n`` samples
    (``n=None`` takes ``n`` from the context).

    Example:
        >>> base = ConditionalDiagonalGaussian(3, context_features=2, hidden=8)
        >>> c = torch.randn(4, 2)
        >>> base.log_prob(base.sample(4, c), c).shape
        torch.Size([4])

    Reference: Winkler et al., "Learning Likelihoods with Conditional Normalizing Flows", 2019.
    """

    def __init__(
        self,
        shape: int | tuple[int, ...],
        context_features: int,
        hidden: int = 64,
        net: nn.Module | None = None,
    ):
        super().__init__(shape)
        if not isinstance(context_features, int) or context_features < 1:
            raise ValueError(f"context_features must be a positive int, got {context_features!r}")
        self.context_features = context_features
        if net is None:
            net = nn.Sequential(
                nn.Linear(context_features, hidden),
                nn.ReLU(),
                nn.Linear(hidden, 2 * math.prod(self.shape)),
            )
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
        self.net = net

    def _params(self, context: Tensor | None, n: int | None) -> tuple[Tensor, Tensor]:
        if not isinstance(context, torch.Tensor):
            raise ValueError(
                f"this base distribution needs a context of shape [N, {self.context_features}]"
            )
        if context.dim() != 2 or context.shape[1] != self.context_features:
            raise ValueError(
                f"context must have shape [N, {self.context_features}], got {tuple(context.shape)}"
            )
        if n is not None and context.shape[0] != n:
            if context.shape[0] != 1:
                raise ValueError(f"context has {context.shape[0]} rows but n={n} were asked for")
            context = context.expand(n, -1)
        h = self.net(context)
        loc, log_scale = h.chunk(2, dim=1)
        return loc.reshape(-1, *self.shape), log_scale.reshape(-1, *self.shape)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check_z(z)
        loc, log_scale = self._params(context, z.shape[0])
        eps = (z - loc) * torch.exp(-log_scale)
        return self._normal_logp(eps, log_scale)

    def sample(
        self, n: int | None, context: Tensor | None = None, temperature: float = 1.0
    ) -> Tensor:
        if n is None and isinstance(context, torch.Tensor):
            n = context.shape[0]
        n, t = _check_n(n), _check_temperature(temperature)
        loc, log_scale = self._params(context, n)
        return loc + torch.exp(log_scale) * torch.randn_like(loc) * t
