"""Shape transforms for multi-scale flows: squeeze, flatten and split with a learned prior."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastflow._backend import acc_dtype
from fastflow.nn.base import Transform, zero_logdet

__all__ = ["Squeeze", "Flatten", "Split"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Squeeze(Transform):
    """2x2 space-to-depth: ``[N, C, H, W] -> [N, 4C, H/2, W/2]`` (a permutation, log-det 0).

    Output channel ``4c + 2i + j`` holds input channel ``c`` at pixel offset ``(i, j)`` of each
    2x2 block.

    Example:
        >>> z, _ = Squeeze()(torch.randn(2, 3, 8, 6))
        >>> z.shape
        torch.Size([2, 12, 4, 3])

    Reference: Dinh et al., "Density estimation using Real NVP", 2017.
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a [N, C, H, W] tensor, got {_shape_of(x)}")
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(
                f"Squeeze needs even height and width, got x of shape {tuple(x.shape)}"
            )
        z = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(n, 4 * c, h // 2, w // 2), zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] % 4:
            raise ValueError(
                f"z must be [N, 4C, H, W] (channels a multiple of 4), got {_shape_of(z)}"
            )
        n, c4, h, w = z.shape
        x = z.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c4 // 4, 2 * h, 2 * w), zero_logdet(z)


def _shape_of(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


class Flatten(Transform):
    """Reshape ``[N, *shape] -> [N, prod(shape)]`` (log-det 0).

    Args:
        shape: the event shape of the input, e.g. ``(C, H, W)``.

    Example:
        >>> z, _ = Flatten((2, 3, 3))(torch.randn(5, 2, 3, 3))
        >>> z.shape
        torch.Size([5, 18])

    Reference: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and
    Inference", 2021.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape [N, *{self.shape}], got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1), zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if z.dim() != 2 or z.shape[1] != math.prod(self.shape):
            raise ValueError(
                f"z must have shape [N, {math.prod(self.shape)}], got {tuple(z.shape)}"
            )
        return z.reshape(z.shape[0], *self.shape), zero_logdet(z)


class Split(Transform):
    """Factor out half of dim 1 with a learned conditional Gaussian prior (multi-scale flows).

    ``forward`` keeps ``x[:, :keep]`` and factors out ``x2 = x[:, keep:]``. A zero-initialised
    network on the kept half (a 3x3 conv for images, a linear layer for vectors; plus the
    context if any) gives the mean ``mu`` and log-std ``log_sigma`` of ``x2``. The factored-out
    latent is the standardised ``eps = (x2 - mu) * exp(-log_sigma)``, standard normal under the
    model. The returned "log-det" is ``log N(x2; mu, sigma)``, the prior's log-density, so that
    ``Flow.log_prob`` (base log-prob of the kept path + sum of log-dets) stays exact.

    ``inverse(z, latents=..., temperature=t)`` takes ``eps`` from ``latents`` (popping the last
    entry; a list as :meth:`Compose.forward_with_latents` returns) or samples it as
    ``t * N(0, 1)``, rebuilds ``x2 = mu + sigma * eps`` and returns ``-log N(x2; mu, sigma)`` as
    its log-det, so ``log p(x) = log p_base(z) - sum(inverse log-dets)`` holds for samples.

    Args:
        shape: event shape of the input, ``(C, H, W)`` or ``(D,)``.
        context_features: optional vector context size fed to the prior network.
        keep: channels (or features) kept; default ``C - C // 2``.

    Example:
        >>> split = Split((4, 8, 8))
        >>> x = torch.randn(2, 4, 8, 8)
        >>> z, logp, latents = split.forward_with_latents(x)
        >>> z.shape, latents[0].shape
        (torch.Size([2, 2, 8, 8]), torch.Size([2, 2, 8, 8]))
        >>> torch.allclose(split.inverse(z, latents=latents)[0], x, atol=1e-6)
        True

    Reference: Dinh et al., "Density estimation using Real NVP", 2017 (multi-scale);
    Kingma & Dhariwal, "Glow", 2018 (learned prior).
    """

    factors_out = True

    def __init__(
        self,
        shape: int | tuple[int, ...],
        context_features: int | None = None,
        keep: int | None = None,
    ):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        if len(shape) not in (1, 3) or shape[0] < 2:
            raise ValueError(f"shape must be (D,) or (C, H, W) with D, C >= 2, got {shape}")
        self.shape = shape
        c = shape[0]
        self.keep = c - c // 2 if keep is None else int(keep)
        if not 1 <= self.keep < c:
            raise ValueError(f"keep must be in [1, {c - 1}], got {keep!r}")
        self.out_shape = (self.keep, *shape[1:])
        self.latent_shape = (c - self.keep, *shape[1:])
        self.context_features = context_features
        in_f = self.keep + (context_features or 0)
        out_f = 2 * (c - self.keep)
        if len(shape) == 3:
            self.prior = nn.Conv2d(in_f, out_f, 3, padding=1)
        else:
            self.prior = nn.Linear(in_f, out_f)
        nn.init.zeros_(self.prior.weight)
        nn.init.zeros_(self.prior.bias)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, keep={self.keep}"

    def _check(self, t: Tensor, name: str, shape: tuple[int, ...], context: Tensor | None):
        if not isinstance(t, torch.Tensor) or tuple(t.shape[1:]) != shape:
            raise ValueError(f"{name} must have shape [N, *{shape}], got {_shape_of(t)}")
        if self.context_features is None and context is not None:
            raise ValueError("context was given but this Split has no context_features")
        if self.context_features is not None and (
            context is None or tuple(context.shape) != (t.shape[0], self.context_features)
        ):
            raise ValueError(
                f"context must have shape [{t.shape[0]}, {self.context_features}], got "
                f"{_shape_of(context)}"
            )

    def _prior(self, kept: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        h = kept
        if context is not None:
            if kept.dim() == 4:
                context = context[:, :, None, None].expand(-1, -1, *kept.shape[2:])
            h = torch.cat((kept, context.to(kept.dtype)), dim=1)
        mu, log_sigma = self.prior(h).chunk(2, dim=1)
        return mu, log_sigma

    @staticmethod
    def _log_normal(eps: Tensor, log_sigma: Tensor) -> Tensor:
        acc = acc_dtype(eps.dtype)
        e, ls = eps.to(acc), log_sigma.to(acc)
        return (-0.5 * e * e - ls - _HALF_LOG_2PI).flatten(1).sum(1)

    def forward_with_latents(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(kept, log N(x2; mu, sigma), [eps])``."""
        self._check(x, "x", self.shape, context)
        kept, x2 = x[:, : self.keep], x[:, self.keep :]
        mu, log_sigma = self._prior(kept, context)
        eps = (x2 - mu) * torch.exp(-log_sigma)
        return kept, self._log_normal(eps, log_sigma), [eps]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kept, logp, _ = self.forward_with_latents(x, context)
        return kept, logp

    def inverse(
        self,
        z: Tensor,
        context: Tensor | None = None,
        latents: list[Tensor] | Tensor | None = None,
        temperature: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        self._check(z, "z", self.out_shape, context)
        mu, log_sigma = self._prior(z, context)
        if isinstance(latents, torch.Tensor):
            eps = latents
        elif latents:
            eps = latents.pop()
        else:
            eps = torch.randn_like(mu) * temperature
        if tuple(eps.shape) != tuple(mu.shape):
            raise ValueError(
                f"latent for this Split must have shape {tuple(mu.shape)}, got {tuple(eps.shape)}"
            )
        x2 = mu + torch.exp(log_sigma) * eps.to(mu.dtype)
        return torch.cat((z, x2), dim=1), -self._log_normal(eps, log_sigma)
