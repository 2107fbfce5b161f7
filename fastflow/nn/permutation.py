"""Fixed permutations of the feature (or channel) dimension, dim 1. Their log-det is zero."""

from __future__ import annotations

import torch
from torch import Tensor

from fastflow.nn.base import Transform, zero_logdet

__all__ = ["Reverse", "RandomPermutation"]


def _check_input(x: object, name: str, features: int | None = None) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [N, features, ...], got {tuple(x.shape)}")
    if features is not None and x.shape[1] != features:
        raise ValueError(f"{name}.shape[1] must be {features}, got {x.shape[1]}")
    return x


class Reverse(Transform):
    """Reverses the order of dim 1 (features of ``[N, D]``, channels of ``[N, C, H, W]``).

    Alternating couplings with ``Reverse`` lets every feature be transformed.

    Example:
        >>> z, ld = Reverse()(torch.tensor([[1.0, 2.0, 3.0]]))
        >>> z.tolist(), ld.tolist()
        ([[3.0, 2.0, 1.0]], [0.0])

    Reference: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2015.
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(x, "x")
        return x.flip(1), zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(z, "z")
        return z.flip(1), zero_logdet(z)

    def _chain_step(self, x: Tensor):
        """A step of a one-node run (:mod:`fastflow.ops.chain`); runs only see ``[N, D]``."""
        from fastflow.ops import chain

        return chain.FlipStep()


class RandomPermutation(Transform):
    """A fixed random permutation of dim 1, drawn from ``seed`` and kept as a buffer.

    The permutation is part of the ``state_dict``, so a loaded model permutes the same way.

    Args:
        features: size of dim 1 (features or channels).
        seed: seed of the generator that draws the permutation (the global RNG is untouched).

    Example:
        >>> p = RandomPermutation(5, seed=0)
        >>> x = torch.randn(2, 5)
        >>> z, _ = p(x)
        >>> torch.equal(p.inverse(z)[0], x)
        True

    Reference: Papamakarios et al., "Masked Autoregressive Flow for Density Estimation", 2017.
    """

    def __init__(self, features: int, seed: int = 0):
        super().__init__()
        if not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive int, got {features!r}")
        gen = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(features, generator=gen)
        self.features = features
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def extra_repr(self) -> str:
        return f"features={self.features}"

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(x, "x", self.features)
        return x.index_select(1, self.perm), zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(z, "z", self.features)
        return z.index_select(1, self.inv_perm), zero_logdet(z)
