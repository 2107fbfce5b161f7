"""Neural spline layers: rational-quadratic spline coupling and autoregressive transforms.

Both apply the monotonic rational-quadratic spline of Durkan et al. (2019) elementwise
(:mod:`fastflow.ops.spline`: ``K`` bins on ``[-B, B]``, identity tails, ``3K - 1``
unnormalised parameters per element: ``K`` widths, ``K`` heights, ``K - 1`` interior
derivatives; all-zero parameters are the identity).

* :class:`SplineCoupling`: the parameters come from a conditioner of the untouched part (masks,
  parities, conditioners and context exactly as :class:`~fastflow.nn.AffineCoupling`); both
  directions cost one conditioner pass.
* :class:`SplineAutoregressive` (MAF-style): the parameters come from a :class:`~fastflow.nn.MADE`;
  the density direction is one network pass, the sampling direction the single-pass degree
  walk with the spline inverse per dimension inside it (:mod:`fastflow.ops.made_spline`), not
  ``D`` network passes. :class:`SplineInverseAutoregressive` (IAF-style) swaps the directions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastflow.nn.base import Transform
from fastflow.nn.coupling import Subnet, _Coupling
from fastflow.nn.made import MADE
from fastflow.ops.made_spline import (
    PackedSplineMADE,
    made_spline_forward,
    made_spline_inverse,
    pack_spline_made,
)
from fastflow.ops.spline import (
    DEFAULT_MIN_BIN_HEIGHT,
    DEFAULT_MIN_BIN_WIDTH,
    DEFAULT_MIN_DERIVATIVE,
    check_spline_options,
    rq_spline,
    rq_spline_inverse,
    spline_params_per_element,
)

__all__ = ["SplineAutoregressive", "SplineCoupling", "SplineInverseAutoregressive"]


class SplineCoupling(_Coupling):
    """Rational-quadratic spline coupling: ``y_b = spline(x_b; theta(x_a))``, ``y_a = x_a``.

    The conditioner outputs ``3K - 1`` values per transformed element (for vectors
    ``[N, (3K - 1) * |x_b|]``, parameter-major: ``h.view(N, 3K - 1, *x_b.shape[1:])``; for
    images ``[N, (3K - 1) * C_b, H, W]`` likewise). The default conditioner's last layer is
    zero-initialised, so a new coupling is the identity.

    Args:
        shape: ``features`` (int) or ``(C, H, W)``.
        mask, parity, subnet, hidden, context_features: as :class:`~fastflow.nn.AffineCoupling`.
        bins: ``K`` (default 8).
        bound: the spline acts on ``[-bound, bound]`` (default 3); identity outside.
        min_bin_width, min_bin_height, min_derivative: see
            :func:`fastflow.ops.spline.rq_spline`.

    Example:
        >>> layer = SplineCoupling(4, hidden=16, bins=5)
        >>> x = torch.randn(8, 4)
        >>> z, logdet = layer(x)
        >>> torch.allclose(layer.inverse(z)[0], x, atol=1e-5), logdet.shape
        (True, torch.Size([8]))

    Reference: Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019.
    """

    def __init__(
        self,
        shape: int | tuple[int, ...],
        mask: str | Tensor = "half",
        parity: int = 0,
        subnet: Subnet | None = None,
        hidden: int | None = None,
        context_features: int | None = None,
        bins: int = 8,
        bound: float = 3.0,
        min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
        min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
        min_derivative: float = DEFAULT_MIN_DERIVATIVE,
    ):
        opts = check_spline_options(bins, bound, min_bin_width, min_bin_height, min_derivative)
        # read by _Coupling.__init__ to size the conditioner's output
        self._params_per_element = spline_params_per_element(bins)
        super().__init__(shape, mask, parity, subnet, hidden, context_features)
        self.bins, self.bound = opts[0], opts[1]
        self.min_bin_width, self.min_bin_height, self.min_derivative = opts[2:]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, bound={self.bound}"

    def _couple(self, x: Tensor, h: Tensor, mask: Tensor | None, inverse: bool):
        P, K = self._params_per_element, self.bins
        # [N, P * C, ...] -> [N, C, ..., P]; under autocast h may be 16-bit: one dtype for the op
        th = h.to(x.dtype).reshape(x.shape[0], P, *x.shape[1:]).movedim(1, -1)
        w, hh, d = th[..., :K], th[..., K : 2 * K], th[..., 2 * K :]
        op = rq_spline_inverse if inverse else rq_spline
        return op(x, w, hh, d, self.bound, self.min_bin_width, self.min_bin_height,
                  self.min_derivative, mask=mask)  # fmt: skip


class SplineAutoregressive(Transform):
    r"""Rational-quadratic spline autoregressive layer (MAF-style) on a :class:`MADE`.

    * ``forward(x, context) -> (u, logdet)``: the density direction in **one network pass**,
      ``u_i = spline(x_i; theta_i(x_<i))``.
    * ``inverse(u, context) -> (x, logdet)``: the exact inverse by the **degree walk** (one
      network pass of work, sequential in the degrees), ``x_i = spline^-1(u_i; theta_i(x_<i))``.

    The MADE outputs ``3K - 1`` parameters per input. Its output layer is initialised small
    (``init_scale``), so a new layer is close to the identity.

    Args:
        features: ``D``.
        hidden: MADE hidden sizes.
        context: context features (0: unconditional).
        bins: ``K`` (default 8).
        bound: the spline interval ``[-bound, bound]`` (default 3).
        activation, order, hidden_degrees, seed: see :class:`MADE`.
        min_bin_width, min_bin_height, min_derivative: see :func:`fastflow.ops.spline.rq_spline`.
        init_scale: the MADE output layer's initial weights and biases are scaled by this.

    Example:
        >>> layer = SplineAutoregressive(4, hidden=(16, 16), bins=4)
        >>> x = torch.randn(8, 4)
        >>> u, logdet = layer(x)
        >>> x2, logdet2 = layer.inverse(u)
        >>> torch.allclose(x, x2, atol=1e-4), torch.allclose(logdet, -logdet2, atol=1e-4)
        (True, True)

    Reference: Durkan et al., "Neural Spline Flows", NeurIPS 2019; Papamakarios et al., "Masked
    Autoregressive Flow for Density Estimation", 2017.
    """

    def __init__(
        self,
        features: int,
        hidden: tuple[int, ...] | list[int] = (64, 64),
        context: int = 0,
        bins: int = 8,
        bound: float = 3.0,
        activation: str = "relu",
        order: str | list[int] | Tensor = "natural",
        hidden_degrees: str = "sequential",
        seed: int | None = None,
        min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
        min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
        min_derivative: float = DEFAULT_MIN_DERIVATIVE,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        opts = check_spline_options(bins, bound, min_bin_width, min_bin_height, min_derivative)
        self.bins, self.bound = opts[0], opts[1]
        self.min_bin_width, self.min_bin_height, self.min_derivative = opts[2:]
        P = spline_params_per_element(self.bins)
        self.made = MADE(features, hidden, P, context, activation, order, hidden_degrees, seed)
        self.features = self.made.features
        with torch.no_grad():
            w_off, rows, cols = self.made.layout.weights[-1]
            b_off, _ = self.made.layout.biases[-1]
            self.made.params[w_off : w_off + rows * cols].mul_(float(init_scale))
            self.made.params[b_off : b_off + rows].mul_(float(init_scale))
        self._pack_cache: tuple | None = None

    def _spline(self) -> tuple:
        return (self.bound, self.min_bin_width, self.min_bin_height, self.min_derivative)

    def packed(self) -> PackedSplineMADE:
        """The MADE in sorted coordinates for the walk (cached while no gradient is needed and
        the parameters do not change)."""
        m = self.made
        if not m._cacheable():
            return self._pack()
        key = m._key()
        if self._pack_cache is None or self._pack_cache[0] != key:
            with torch.no_grad():
                self._pack_cache = (key, self._pack())
        return self._pack_cache[1]

    def _pack(self) -> PackedSplineMADE:
        m = self.made
        return pack_spline_made(
            list(m.weights), list(m.biases), m.input_degrees, m.hidden_degree_list(),
            m.params_per_dim, m.context_weight,
        )  # fmt: skip

    def _density(self, x: Tensor, context: Tensor | None, name: str) -> tuple[Tensor, Tensor]:
        self.made.check_input(x, context, name)
        m = self.made
        if m.params.dtype != x.dtype:
            return made_spline_forward(x, _cast_made(m, x)(x, context), self.bins, *self._spline())
        return made_spline_forward(x, m(x, context), self.bins, *self._spline())

    def _walk(self, u: Tensor, context: Tensor | None, name: str) -> tuple[Tensor, Tensor]:
        self.made.check_input(u, context, name)
        p = self.packed()
        if p.out_weight.dtype != u.dtype:
            p = PackedSplineMADE(*(_to(v, u.dtype) for v in p))
        return made_spline_inverse(u, p, self.bins, context, self.made.activation, *self._spline())

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Density direction (one network pass): ``x [N, D] -> (u, logdet [N])``."""
        return self._density(x, context, "x")

    def inverse(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sampling direction (the single-pass degree walk): ``u [N, D] -> (x, logdet [N])``."""
        return self._walk(u, context, "u")

    def naive_walk(self, u: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The walk direction (:meth:`inverse` here, ``forward`` of
        :class:`SplineInverseAutoregressive`) by ``D`` full MADE passes in original coordinates:
        the specification the degree walk is tested against (slow)."""
        self.made.check_input(u, context, "u")
        x = torch.zeros_like(u)
        K = self.bins
        for i in self.made.order.tolist():
            th = self.made(x, context).movedim(1, -1).to(u.dtype)[:, i]
            xi, _ = rq_spline_inverse(
                u[:, i : i + 1], th[:, None, :K], th[:, None, K : 2 * K], th[:, None, 2 * K :],
                *self._spline(),
            )  # fmt: skip
            x = torch.cat([x[:, :i], xi, x[:, i + 1 :]], 1)
        _, ld = self._density(x, context, "u")
        return x, -ld

    def extra_repr(self) -> str:
        return f"bins={self.bins}, bound={self.bound}"


class SplineInverseAutoregressive(SplineAutoregressive):
    r"""IAF-style spline autoregressive layer: :class:`SplineAutoregressive` with its directions
    swapped.

    * ``forward(x, context) -> (z, logdet)``: the density direction by the degree walk (one
      pass of work), ``z_i = spline^-1(x_i; theta_i(z_<i))``.
    * ``inverse(z, context) -> (x, logdet)``: sampling in **one network pass**,
      ``x = spline(z; theta(z))`` (the cheap direction for variational posteriors).

    Arguments as in :class:`SplineAutoregressive`.

    Example:
        >>> layer = SplineInverseAutoregressive(3, hidden=(8,), bins=4)
        >>> z = torch.randn(5, 3)
        >>> x, ld = layer.inverse(z)
        >>> torch.allclose(layer(x)[0], z, atol=1e-4)
        True

    Reference: Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow",
    NeurIPS 2016; Durkan et al., "Neural Spline Flows", 2019.
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Density direction (the degree walk): ``x [N, D] -> (z, logdet [N])``."""
        return self._walk(x, context, "x")

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sampling direction (one network pass): ``z [N, D] -> (x, logdet [N])``."""
        return self._density(z, context, "z")


def _to(v, dtype):
    if isinstance(v, Tensor) and v.is_floating_point():
        return v.to(dtype)
    if isinstance(v, list) and v and isinstance(v[0], Tensor):
        return [t.to(dtype) for t in v]
    return v


def _cast_made(m: MADE, x: Tensor):
    """``m``'s network at ``x``'s dtype (for a module left in another dtype)."""

    def run(v: Tensor, context: Tensor | None) -> Tensor:
        from fastflow.ops.made import made_mlp

        ws = [w.to(v.dtype) for w in m.masked_weights()]
        bs = [b.to(v.dtype) for b in m.biases]
        cw = m.context_weight
        out = made_mlp(v, ws, bs, m.activation, context, None if cw is None else cw.to(v.dtype))
        return out.view(v.shape[0], m.params_per_dim, m.features)

    return run
