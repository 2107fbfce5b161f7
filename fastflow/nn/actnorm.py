"""Activation normalization (Glow): a per-channel affine map with data-dependent initialisation."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastflow import _backend as B
from fastflow.nn.base import Transform
from fastflow.ops._checks import check_float_tensor

__all__ = ["ActNorm"]


def _pixels(x: Tensor) -> int:
    """Positions sharing one channel's scale: H * W for images, 1 for [N, C] rows."""
    p = 1
    for s in x.shape[2:]:
        p *= s
    return p


class ActNorm(Transform):
    """Per-channel affine map ``y = x * exp(log_scale) + bias`` (Glow's ActNorm).

    With ``data_init=True`` the first :meth:`forward` call in training mode sets ``log_scale``
    and ``bias`` so that its output has zero mean and unit variance per channel on that batch
    (with a single value per channel only the mean is used; the statistics
    are all-reduced across ranks when ``torch.distributed`` is initialised, so every rank gets
    the same initialisation). The ``initialized`` flag is a buffer, so a ``state_dict`` round
    trip keeps an initialised layer initialised.

    Works on ``[N, C]`` rows and on ``[N, C, *spatial]`` images; the log-det counts every
    spatial position: ``logdet = H * W * sum(log_scale)``.

    Args:
        channels: number of channels ``C`` (``x.shape[1]``).
        data_init: initialise from the first batch (else start as the identity map).
        eps: added to the standard deviation in the initialisation.

    Example:
        >>> layer = ActNorm(3)
        >>> x = torch.randn(16, 3, 4, 4) * 5 + 2
        >>> z, logdet = layer(x)  # the first call initialises
        >>> bool(z.mean((0, 2, 3)).abs().max() < 1e-4)
        True
        >>> x2, ld2 = layer.inverse(z)
        >>> torch.allclose(x, x2, atol=1e-4) and torch.allclose(logdet, -ld2)
        True

    Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    initialized: Tensor

    def __init__(self, channels: int, data_init: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if int(channels) < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = int(channels)
        self.eps = float(eps)
        self.log_scale = nn.Parameter(torch.zeros(self.channels))
        self.bias = nn.Parameter(torch.zeros(self.channels))
        self.register_buffer("initialized", torch.tensor(not data_init))
        # A Python mirror of the buffer: forward branches on it without reading tensor data, so
        # the module traces under torch.compile(fullgraph=True) once initialised.
        self._initialized = not data_init

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    def extra_repr(self) -> str:
        return f"{self.channels}, initialized={self._initialized}"

    def _check(self, name: str, x: Tensor) -> None:
        check_float_tensor(name, x, min_dim=2)
        if x.shape[1] != self.channels:
            raise ValueError(
                f"{name} has {x.shape[1]} channels (dim 1) but ActNorm has {self.channels}"
            )

    def initialize_if_needed(self, x: Tensor) -> None:
        """Run the data-dependent :meth:`initialize` on ``x`` if this layer is in training mode
        and not initialised yet (what :meth:`forward` does first; for modules that fold ActNorm
        into another map, like :class:`~fastflow.nn.GlowStep`)."""
        if not self._initialized and self.training:
            self.initialize(x)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``log_scale`` and ``bias`` so that ``forward(x)`` has zero mean and unit variance
        per channel (statistics over all ranks under ``torch.distributed``)."""
        self._check("x", x)
        acc = B.acc_dtype(x.dtype)
        xa = x.detach().to(acc).transpose(0, 1).reshape(self.channels, -1)
        count = torch.tensor(float(xa.shape[1]), dtype=acc, device=x.device)
        total = xa.sum(1)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(count)
            dist.all_reduce(total)
        if float(count) == 0:
            raise ValueError("ActNorm cannot initialise from an empty batch")
        mean = total / count
        sq = (xa - mean[:, None]).square().sum(1)  # two passes: no cancellation
        if distributed:
            dist.all_reduce(sq)
        std = (sq / count).sqrt()
        log_scale = -torch.log(std + self.eps)
        if float(count) < 2:  # one value per channel: no variance to normalise
            log_scale = torch.zeros_like(log_scale)
        self.log_scale.copy_(log_scale.to(self.log_scale.dtype))
        self.bias.copy_((-mean * torch.exp(log_scale)).to(self.bias.dtype))
        self.initialized.fill_(True)
        self._initialized = True

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x * exp(log_scale) + bias, logdet)`` with ``logdet`` of shape ``[N]``."""
        self._check("x", x)
        self.initialize_if_needed(x)
        shape = (1, self.channels) + (1,) * (x.dim() - 2)
        ls = self.log_scale.to(x.dtype)
        z = torch.addcmul(self.bias.to(x.dtype).view(shape), x, torch.exp(ls).view(shape))
        acc = B.acc_dtype(x.dtype)
        logdet = (self.log_scale.to(acc).sum() * _pixels(x)).expand(x.shape[0])
        return z, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``((z - bias) * exp(-log_scale), -logdet)``; never initialises."""
        self._check("z", z)
        shape = (1, self.channels) + (1,) * (z.dim() - 2)
        ls = self.log_scale.to(z.dtype)
        x = (z - self.bias.to(z.dtype).view(shape)) * torch.exp(-ls).view(shape)
        acc = B.acc_dtype(z.dtype)
        logdet = (-self.log_scale.to(acc).sum() * _pixels(z)).expand(z.shape[0])
        return x, logdet
