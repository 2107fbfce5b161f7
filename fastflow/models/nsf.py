"""Neural spline flows (Durkan et al., 2019): rational-quadratic spline coupling or autoregressive
layers with permutations between them and a standard normal base."""

from __future__ import annotations

import torch  # noqa: F401  (the docstring examples use it)

from fastflow.distributions import StandardNormal
from fastflow.flow import Flow
from fastflow.nn.coupling import mlp_subnet
from fastflow.nn.permutation import RandomPermutation, Reverse
from fastflow.nn.spline import SplineAutoregressive, SplineCoupling
from fastflow.ops.spline import (
    DEFAULT_MIN_BIN_HEIGHT,
    DEFAULT_MIN_BIN_WIDTH,
    DEFAULT_MIN_DERIVATIVE,
    check_spline_options,
)

__all__ = ["NeuralSplineFlow"]

KINDS = ("coupling", "autoregressive")


class NeuralSplineFlow(Flow):
    r"""Neural spline flow: ``layers`` rational-quadratic spline layers, ``N(0, I)`` base.

    * ``kind="coupling"`` (RQ-NSF (C)): :class:`~fastflow.nn.SplineCoupling` layers, each
      transforming the second half given the first, with a :class:`~fastflow.nn.Reverse` (the
      default ``permutation``) between layers (alternating halves instead with
      ``permutation="none"``); density and sampling both cost one conditioner pass per layer.
    * ``kind="autoregressive"`` (RQ-NSF (AR)): :class:`~fastflow.nn.SplineAutoregressive` (MADE)
      layers; ``log_prob`` is one network pass per layer and ``sample`` the single-pass degree
      walk with the spline inverse inside (one network pass of work per layer, not ``D``).

    A :class:`~fastflow.Flow`: ``log_prob``, ``sample`` / ``rsample``, ``sample_and_log_prob``,
    ``.distribution()``.

    Args:
        features: ``D`` (``>= 2`` for couplings).
        layers: number of spline layers.
        bins: ``K`` bins per spline.
        kind: ``"coupling"`` or ``"autoregressive"``.
        context: context features (0: unconditional).
        hidden: hidden width of each conditioner layer.
        hidden_layers: hidden layers per conditioner.
        bound: the splines act on ``[-bound, bound]``; identity outside.
        permutation: between layers: ``"reverse"``, ``"random"`` (seeded) or ``"none"``.
        seed: seed of random permutations.
        min_bin_width, min_bin_height, min_derivative: see :func:`fastflow.ops.spline.rq_spline`.

    Example:
        >>> flow = NeuralSplineFlow(3, layers=2, bins=4, kind="autoregressive", hidden=16)
        >>> x = flow.sample(10)
        >>> flow.log_prob(x).shape
        torch.Size([10])

    Reference: Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019.
    """

    def __init__(
        self,
        features: int,
        layers: int = 5,
        bins: int = 8,
        kind: str = "coupling",
        context: int = 0,
        hidden: int = 64,
        hidden_layers: int = 2,
        bound: float = 3.0,
        permutation: str = "reverse",
        seed: int | None = None,
        min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
        min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
        min_derivative: float = DEFAULT_MIN_DERIVATIVE,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be 'coupling' or 'autoregressive', got {kind!r}")
        for name, v, lo in (
            ("features", features, 2 if kind == "coupling" else 1),
            ("layers", layers, 1),
            ("hidden", hidden, 1),
            ("hidden_layers", hidden_layers, 1),
            ("context", context, 0),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                what = f" for kind={kind!r}" if name == "features" else ""
                raise ValueError(f"{name} must be an int >= {lo}{what}, got {v!r}")
        if permutation not in ("reverse", "random", "none"):
            raise ValueError(
                f"permutation must be 'reverse', 'random' or 'none', got {permutation!r}"
            )
        opts = check_spline_options(bins, bound, min_bin_width, min_bin_height, min_derivative)
        spline = dict(
            bins=opts[0], bound=opts[1], min_bin_width=opts[2], min_bin_height=opts[3],
            min_derivative=opts[4],
        )  # fmt: skip
        mods = []
        for i in range(layers):
            if i > 0 and permutation == "reverse":
                mods.append(Reverse())
            elif i > 0 and permutation == "random":
                mods.append(RandomPermutation(features, seed=(0 if seed is None else seed) + i))
            if kind == "coupling":
                mods.append(
                    SplineCoupling(
                        features,
                        "half",
                        parity=i % 2 if permutation == "none" else 0,
                        subnet=mlp_subnet(hidden, hidden_layers),
                        context_features=context or None,
                        **spline,
                    )  # fmt: skip
                )
            else:
                mods.append(
                    SplineAutoregressive(features, (hidden,) * hidden_layers, context, **spline)
                )
        super().__init__(mods, StandardNormal(features), event_shape=(features,))
        self.features, self.kind, self.bins = features, kind, opts[0]
        self.context_features = context
