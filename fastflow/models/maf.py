"""Ready autoregressive flows: MAF and IAF with a standard normal base."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastflow._backend import acc_dtype
from fastflow.nn.autoregressive import InverseAutoregressive, MaskedAffineAutoregressive

__all__ = ["IAF", "MAF", "Permutation"]


class Permutation(nn.Module):
    """A fixed permutation of the features (``forward``: ``x[:, perm]``), log-det 0.

    Example:
        >>> p = Permutation(torch.tensor([2, 0, 1]))
        >>> p(torch.tensor([[1.0, 2.0, 3.0]]))[0]
        tensor([[3., 1., 2.]])
    """

    def __init__(self, perm: Tensor) -> None:
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long)
        self.register_buffer("perm", perm)
        self.register_buffer("inv", torch.argsort(perm))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0], dtype=acc_dtype(x.dtype))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z[:, self.inv], z.new_zeros(z.shape[0], dtype=acc_dtype(z.dtype))


class _AutoregressiveFlow(nn.Module):
    _layer = MaskedAffineAutoregressive

    def __init__(
        self,
        features: int,
        layers: int = 5,
        hidden: tuple[int, ...] | list[int] = (64, 64),
        context: int = 0,
        activation: str = "relu",
        permutation: str = "reverse",
        hidden_degrees: str = "sequential",
        seed: int | None = None,
        scale_fn: str = "softclamp",
        clamp: float = 3.0,
    ) -> None:
        super().__init__()
        if int(layers) < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        if permutation not in ("reverse", "random", "none"):
            raise ValueError(
                f"permutation must be 'reverse', 'random' or 'none', got {permutation!r}"
            )
        self.features = int(features)
        self.context_features = int(context)
        gen = torch.Generator()
        gen.manual_seed(0 if seed is None else int(seed))
        mods = []
        for i in range(int(layers)):
            if i > 0 and permutation != "none":
                if permutation == "reverse":
                    perm = torch.arange(self.features - 1, -1, -1)
                else:
                    perm = torch.randperm(self.features, generator=gen)
                mods.append(Permutation(perm))
            layer_seed = None if seed is None else int(seed) + i
            mods.append(
                self._layer(
                    features,
                    hidden,
                    context,
                    activation,
                    "natural",
                    hidden_degrees,
                    layer_seed,
                    scale_fn,
                    clamp,
                )
            )
        self.transforms = nn.ModuleList(mods)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to latent: ``(z, logdet)`` with ``logdet = log|det dz/dx|``."""
        logdet = 0
        for t in self.transforms:
            x, ld = t(x, context)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent to data: ``(x, logdet)`` with ``logdet = log|det dx/dz|``."""
        logdet = 0
        for t in reversed(self.transforms):
            z, ld = t.inverse(z, context)
            logdet = logdet + ld
        return z, logdet

    def _base_log_prob(self, z: Tensor) -> Tensor:
        z = z.to(acc_dtype(z.dtype))
        return -0.5 * (z * z).sum(1) - 0.5 * self.features * math.log(2 * math.pi)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x | context)``, shape ``[N]``."""
        z, logdet = self(x, context)
        return self._base_log_prob(z) + logdet

    def _context_for(self, n: int, context: Tensor | None) -> Tensor | None:
        if context is None or not isinstance(context, Tensor) or context.dim() != 1:
            return context
        return context.expand(n, -1)

    def rsample(self, n: int, context: Tensor | None = None) -> Tensor:
        """Reparameterised samples ``[n, D]`` (differentiable w.r.t. the parameters)."""
        return self.rsample_and_log_prob(n, context)[0]

    def rsample_and_log_prob(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Differentiable :meth:`sample_and_log_prob`."""
        p = next(self.parameters())
        z = torch.randn(int(n), self.features, dtype=p.dtype, device=p.device)
        x, logdet = self.inverse(z, self._context_for(int(n), context))
        return x, self._base_log_prob(z) - logdet

    @torch.no_grad()
    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        """``n`` samples ``[n, D]``; ``context`` is ``[n, C]`` or ``[C]`` (shared by all)."""
        return self.rsample_and_log_prob(n, context)[0]

    @torch.no_grad()
    def sample_and_log_prob(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Samples ``[n, D]`` and their log-densities ``[n]`` from one pass through the flow."""
        return self.rsample_and_log_prob(n, context)


class MAF(_AutoregressiveFlow):
    r"""Masked autoregressive flow: affine MADE layers, permutations between them, N(0, I) base.

    ``log_prob`` runs each layer's density direction (one network pass); ``sample`` runs each
    layer's exact inverse by the single-pass degree walk (fastflow's native kernel), so sampling
    costs about one network pass per layer instead of ``D``.

    Args:
        features: ``D``.
        layers: number of autoregressive layers.
        hidden: MADE hidden sizes of every layer.
        context: context features (0: unconditional).
        activation: ``"relu"``, ``"tanh"`` or ``"elu"``.
        permutation: between layers: ``"reverse"`` (default), ``"random"`` (seeded) or ``"none"``.
        hidden_degrees: ``"sequential"`` or ``"random"`` (see :class:`fastflow.nn.made.MADE`).
        seed: seed for random permutations / degrees.
        scale_fn, clamp: the scale function ``s = clamp * tanh(raw / clamp)`` by default.

    Example:
        >>> flow = MAF(3, layers=2, hidden=(16, 16))
        >>> x = flow.sample(10)
        >>> flow.log_prob(x).shape
        torch.Size([10])

    Reference: Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density
    Estimation", NeurIPS 2017.
    """

    _layer = MaskedAffineAutoregressive


class IAF(_AutoregressiveFlow):
    r"""Inverse autoregressive flow: like :class:`MAF` with every layer's directions swapped.

    ``sample`` is one network pass per layer; ``log_prob`` of external data runs the degree walk
    (one pass of work per layer, single native kernel call).

    Arguments as in :class:`MAF`.

    Example:
        >>> flow = IAF(3, layers=2, hidden=(16,), context=2)
        >>> c = torch.randn(2)
        >>> x, lp = flow.sample_and_log_prob(4, context=c)
        >>> torch.allclose(lp, flow.log_prob(x, c.expand(4, 2)), atol=1e-4)
        True

    Reference: Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow",
    NeurIPS 2016.
    """

    _layer = InverseAutoregressive
