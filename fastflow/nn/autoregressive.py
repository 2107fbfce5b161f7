"""Affine autoregressive transforms: one MAF layer and one IAF layer.

Both share the same map between data-side ``x`` and latent-side ``u`` (Papamakarios et al.,
2017), with ``(t, raw) = MADE(.)`` and ``s = clamp * tanh(raw / clamp)`` by default:

* one network pass: ``u = (x - t(x)) * exp(-s(x))``;
* the degree walk (one pass of work, sequential in the degrees):
  ``x_i = u_i * exp(s_i(x_<i)) + t_i(x_<i)``.

:class:`MaskedAffineAutoregressive` (MAF) uses the network pass for the density direction
(``forward``, data -> latent) and the walk for sampling (``inverse``);
:class:`InverseAutoregressive` (IAF, Kingma et al., 2016) swaps them: sampling is one network
pass, the density direction is the walk.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastflow.nn.made import MADE
from fastflow.ops.coupling import check_scale
from fastflow.ops.made import made_affine_inverse
from fastflow.ops.made_density import density

__all__ = ["InverseAutoregressive", "MaskedAffineAutoregressive"]


class MaskedAffineAutoregressive(nn.Module):
    r"""One MAF layer: an affine autoregressive transform conditioned by a :class:`MADE`.

    * ``forward(x, context) -> (u, logdet)``: the density direction in **one network pass**,
      ``u = (x - t(x)) * exp(-s(x))``, ``logdet = -sum(s)``.
    * ``inverse(u, context) -> (x, logdet)``: the exact inverse by the **degree walk**, one pass
      of work in a single native kernel call (not ``D`` network passes),
      ``x_i = u_i * exp(s_i(x_<i)) + t_i(x_<i)``, ``logdet = +sum(s)``.

    Args:
        features: ``D``.
        hidden: MADE hidden sizes.
        context: context features (0: unconditional).
        activation: ``"relu"``, ``"tanh"`` or ``"elu"``.
        order, hidden_degrees, seed: see :class:`MADE`.
        scale_fn: ``"softclamp"`` (``clamp * tanh(raw / clamp)``), ``"glow"`` or ``"identity"``.
        clamp: the soft-clamp bound.

    Example:
        >>> import torch
        >>> layer = MaskedAffineAutoregressive(4, hidden=(16, 16))
        >>> x = torch.randn(8, 4)
        >>> u, logdet = layer(x)
        >>> x2, logdet2 = layer.inverse(u)
        >>> torch.allclose(x, x2, atol=1e-4), torch.allclose(logdet, -logdet2, atol=1e-4)
        (True, True)

    Reference: Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density
    Estimation", NeurIPS 2017.
    """

    def __init__(
        self,
        features: int,
        hidden: tuple[int, ...] | list[int] = (64, 64),
        context: int = 0,
        activation: str = "relu",
        order: str | list[int] | Tensor = "natural",
        hidden_degrees: str = "sequential",
        seed: int | None = None,
        scale_fn: str = "softclamp",
        clamp: float = 3.0,
    ) -> None:
        super().__init__()
        check_scale(scale_fn, clamp)
        self.made = MADE(features, hidden, 2, context, activation, order, hidden_degrees, seed)
        self.features = self.made.features
        self.scale_fn = scale_fn
        self.clamp = float(clamp)

    def _density(self, x: Tensor, context: Tensor | None, name: str) -> tuple[Tensor, Tensor]:
        self.made.check_input(x, context, name)
        m = self.made
        p = m.params if m.params.dtype == x.dtype else m.params.to(x.dtype)
        # the layer's structure is valid by construction and x/context were just checked
        # the flat mask of the native path (not traced: torch.compile runs the reference)
        fm = None if torch.compiler.is_compiling() else m.flat_mask(x.dtype)
        return density(
            x, p, m.layout, m.masks(), m.activation, context, self.scale_fn, self.clamp, fm
        )

    def _chain_step(self, x: Tensor):
        """The density direction as a step of a one-node run (:mod:`fastflow.ops.chain`) for
        ``x``, or None where it would not take the whole-layer kernel."""
        from fastflow.ops import made_density as MD

        m = self.made
        lay, p = m.layout, m.params
        if (
            m.context_features
            or x.shape[1] != self.features
            or p.dtype != x.dtype
            or p.device != x.device
            or not MD.kernel_layout(lay, self.features)
            or not MD._use_kernel(x, lay, m.activation, None)
        ):
            return None
        fm = m.flat_mask(x.dtype)
        return MD.MadeStep(p, fm, MD._sizes(lay), MD.SCALE_FNS[self.scale_fn], self.clamp)

    def _walk(self, u: Tensor, context: Tensor | None, name: str) -> tuple[Tensor, Tensor]:
        self.made.check_input(u, context, name)
        return made_affine_inverse(
            u, self.made.packed(), context, self.made.activation, self.scale_fn, self.clamp
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Density direction (one network pass): ``x [N, D] -> (u, logdet [N])``."""
        return self._density(x, context, "x")

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sampling direction (the single-pass degree walk): ``u [N, D] -> (x, logdet [N])``."""
        return self._walk(u, context, "u")

    def extra_repr(self) -> str:
        return f"scale_fn={self.scale_fn!r}, clamp={self.clamp}"


class InverseAutoregressive(MaskedAffineAutoregressive):
    r"""One IAF layer: :class:`MaskedAffineAutoregressive` with its directions swapped.

    * ``forward(x, context) -> (z, logdet)``: the density direction by the **degree walk** (one
      pass of work), ``z_i = x_i * exp(s_i(z_<i)) + t_i(z_<i)``, ``logdet = +sum(s)``.
    * ``inverse(z, context) -> (x, logdet)``: sampling in **one network pass**,
      ``x = (z - t(z)) * exp(-s(z))``, ``logdet = -sum(s)``.

    Arguments as in :class:`MaskedAffineAutoregressive`.

    Example:
        >>> import torch
        >>> layer = InverseAutoregressive(3, hidden=(8,))
        >>> z = torch.randn(5, 3)
        >>> x, ld = layer.inverse(z)
        >>> z2, ld2 = layer(x)
        >>> torch.allclose(z, z2, atol=1e-4)
        True

    Reference: Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, "Improved Variational
    Inference with Inverse Autoregressive Flow", NeurIPS 2016.
    """

    _chain_step = None  # its forward is the degree walk, not the density kernel

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Density direction (the single-pass degree walk): ``x [N, D] -> (z, logdet [N])``."""
        return self._walk(x, context, "x")

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sampling direction (one network pass): ``z [N, D] -> (x, logdet [N])``."""
        return self._density(z, context, "z")
