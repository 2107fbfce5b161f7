"""MADE: a masked MLP whose outputs for input ``i`` depend only on the inputs before ``i``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastflow.ops.made import ACTIVATIONS, PackedMADE, degree_mask, made_mlp, pack_made
from fastflow.ops.made_density import MADELayout, flat_mask, made_views

__all__ = ["MADE"]


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


class MADE(nn.Module):
    r"""Masked autoencoder for distribution estimation (Germain et al., 2015).

    Inputs get degrees ``1..D`` from ``order``; hidden units get degrees in ``[1, D - 1]``
    (``[0]`` when ``D = 1``): ``"sequential"`` cycles through them (the default, as in most MAF
    code), ``"random"`` draws each unit's degree uniformly from ``[min previous degree, D - 1]``
    (Germain et al.). A hidden unit connects to units of smaller or equal degree, an output of
    input ``i`` to hidden units of degree strictly below ``i``'s, so output ``i`` is a function of
    the inputs before ``i`` in the order only. The optional context (conditional MADE) feeds every
    first-layer unit.

    The masks are built once (buffers). :meth:`masked_weights` are what the density direction
    multiplies with; :meth:`packed` is the same network in sorted coordinates for the single-pass
    inverse kernels (cached while the parameters do not change and no gradient is needed).

    Args:
        features: ``D``.
        hidden: hidden layer sizes (at least one layer).
        params_per_dim: outputs per input ``P`` (2 for affine: shift, raw scale).
        context: context features ``C`` (0: unconditional).
        activation: ``"relu"``, ``"tanh"`` or ``"elu"``.
        order: ``"natural"``, ``"reversed"``, ``"random"`` or a permutation of ``range(D)``
            (``order[k]`` is the ``k``-th input in autoregressive order).
        hidden_degrees: ``"sequential"`` or ``"random"``.
        seed: seed for the random order / degrees (deterministic; default 0).

    Shapes: ``forward(x [N, D], context [N, C]) -> [N, P, D]``; ``out[:, p, i]`` is parameter
    ``p`` of input ``i``.

    Example:
        >>> made = MADE(5, hidden=(32, 32), order="random", seed=1)
        >>> out = made(torch.randn(3, 5))
        >>> out.shape
        torch.Size([3, 2, 5])

    Reference: Germain, Gregor, Murray & Larochelle, "MADE: Masked Autoencoder for Distribution
    Estimation", ICML 2015.
    """

    def __init__(
        self,
        features: int,
        hidden: tuple[int, ...] | list[int] = (64, 64),
        params_per_dim: int = 2,
        context: int = 0,
        activation: str = "relu",
        order: str | list[int] | Tensor = "natural",
        hidden_degrees: str = "sequential",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if int(features) < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        if not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of sizes >= 1, got {hidden}")
        if int(params_per_dim) < 1:
            raise ValueError(f"params_per_dim must be >= 1, got {params_per_dim}")
        if int(context) < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if hidden_degrees not in ("sequential", "random"):
            raise ValueError(
                f"hidden_degrees must be 'sequential' or 'random', got {hidden_degrees!r}"
            )
        d = self.features = int(features)
        self.hidden = hidden
        self.params_per_dim = int(params_per_dim)
        self.context_features = int(context)
        self.activation = activation
        gen = _generator(seed)

        if isinstance(order, str):
            if order == "natural":
                perm = torch.arange(d)
            elif order == "reversed":
                perm = torch.arange(d - 1, -1, -1)
            elif order == "random":
                perm = torch.randperm(d, generator=gen)
            else:
                raise ValueError(
                    f"order must be 'natural', 'reversed', 'random' or a permutation, got {order!r}"
                )
        else:
            perm = torch.as_tensor(order, dtype=torch.long).flatten()
            if not torch.equal(torch.sort(perm).values, torch.arange(d)):
                raise ValueError(f"order must be a permutation of range({d}), got {perm.tolist()}")
        in_deg = torch.empty(d, dtype=torch.long)
        in_deg[perm] = torch.arange(1, d + 1)

        degrees = []
        lo = 1
        top = max(d - 1, 1)
        for h in hidden:
            if d == 1:
                deg = torch.zeros(h, dtype=torch.long)
            elif hidden_degrees == "sequential":
                deg = torch.arange(h) % top + 1
            else:
                deg = torch.randint(lo, top + 1, (h,), generator=gen)
                lo = int(deg.min())
            degrees.append(deg)

        # All weights, biases and the context weight live in one flat parameter (one tensor for
        # the optimizer, one gradient buffer); `weights`, `biases` and `context_weight` are views.
        sizes = [d, *hidden]
        chunks, w_lay, b_lay, off = [], [], [], 0
        for l in range(len(hidden) + 1):
            fan_in = sizes[l]
            fan_out = hidden[l] if l < len(hidden) else self.params_per_dim * d
            bound = 1.0 / math.sqrt(fan_in)
            chunks += [
                torch.empty(fan_out * fan_in).uniform_(-bound, bound),
                torch.empty(fan_out).uniform_(-bound, bound),
            ]
            w_lay.append((off, fan_out, fan_in))
            b_lay.append((off + fan_out * fan_in, fan_out))
            off += fan_out * fan_in + fan_out
        c_lay = None
        if self.context_features:
            bound = 1.0 / math.sqrt(self.context_features)
            chunks.append(torch.empty(hidden[0] * self.context_features).uniform_(-bound, bound))
            c_lay = (off, hidden[0], self.context_features)
        self.layout = MADELayout(tuple(w_lay), tuple(b_lay), c_lay)
        self.params = nn.Parameter(torch.cat(chunks))

        self.register_buffer("input_degrees", in_deg)
        for l, deg in enumerate(degrees):
            self.register_buffer(f"hidden_degrees_{l}", deg)
        prev = in_deg
        for l, deg in enumerate(degrees):
            self.register_buffer(f"mask_{l}", degree_mask(deg, prev, strict=False).float())
            prev = deg
        out_deg = in_deg.repeat(self.params_per_dim)
        self.register_buffer(f"mask_{len(hidden)}", degree_mask(out_deg, prev, strict=True).float())
        self._cache: tuple | None = None
        self._pack_cache: tuple | None = None

    @property
    def order(self) -> Tensor:
        """``order[k]``: the input with degree ``k + 1``."""
        return torch.argsort(self.input_degrees)

    def hidden_degree_list(self) -> list[Tensor]:
        return [getattr(self, f"hidden_degrees_{l}") for l in range(len(self.hidden))]

    def masks(self) -> list[Tensor]:
        return [getattr(self, f"mask_{l}") for l in range(len(self.hidden) + 1)]

    @property
    def weights(self) -> list[Tensor]:
        """Per-layer weights ``[out, in]`` (views of :attr:`params`)."""
        return made_views(self.params, self.layout)[0]

    @property
    def biases(self) -> list[Tensor]:
        """Per-layer biases (views of :attr:`params`)."""
        return made_views(self.params, self.layout)[1]

    @property
    def context_weight(self) -> Tensor | None:
        """The context weight ``[H_1, C]`` (a view of :attr:`params`), or None."""
        return made_views(self.params, self.layout)[2]

    def masked_weights(self) -> list[Tensor]:
        """The weights times their masks (``nn.Linear`` layout)."""
        return [w * m.to(w.dtype) for w, m in zip(self.weights, self.masks())]

    def flat_mask(self, dtype: torch.dtype) -> Tensor:
        """:func:`fastflow.ops.made_density.flat_mask` of this network's masks (cached per dtype
        and device; the masks are fixed at construction)."""
        masks = self.masks()
        key = (dtype, tuple((m.data_ptr(), m._version) for m in masks))
        cache = getattr(self, "_flat_mask_cache", None)
        if cache is None or cache[0] != key:
            cache = self._flat_mask_cache = (key, flat_mask(masks, self.layout, dtype))
        return cache[1]

    def _params(self) -> list[Tensor]:
        return [self.params]

    def _cacheable(self) -> bool:
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self._params()))

    def _key(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self._params())

    def masked_weights_cached(self) -> list[Tensor]:
        """:meth:`masked_weights`, cached when no gradient is needed."""
        if not self._cacheable():
            return self.masked_weights()
        key = ("masked", self._key())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.masked_weights())
        return self._cache[1]

    def packed(self) -> PackedMADE:
        """This network in sorted coordinates (:func:`fastflow.ops.made.pack_made`)."""
        if not self._cacheable():
            return self._pack()
        key = ("packed", self._key())
        if self._pack_cache is None or self._pack_cache[0] != key:
            with torch.no_grad():
                self._pack_cache = (key, self._pack())
        return self._pack_cache[1]

    def _pack(self) -> PackedMADE:
        return pack_made(
            list(self.weights),
            list(self.biases),
            self.input_degrees,
            self.hidden_degree_list(),
            self.context_weight,
        )

    def check_input(self, x: Tensor, context: Tensor | None, name: str = "x") -> None:
        """Clear errors for a wrong feature count or a missing / misshapen context."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"{name} must have shape [N, {self.features}], got {tuple(x.shape)}")
        c = self.context_features
        if c == 0:
            if context is not None:
                raise ValueError("this module takes no context (context=0), but context was given")
            return
        if context is None:
            raise ValueError(f"context is required: this module was built with context={c}")
        if not isinstance(context, Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        if context.dim() != 2 or context.shape[0] != x.shape[0] or context.shape[1] != c:
            raise ValueError(
                f"context must have shape [N, {c}] = [{x.shape[0]}, {c}], "
                f"got {tuple(context.shape)}"
            )
        if context.device != x.device or context.dtype != x.dtype:
            raise ValueError(
                f"context ({context.dtype}, {context.device}) must match {name} "
                f"({x.dtype}, {x.device})"
            )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Parameters ``[N, P, D]`` for inputs ``x [N, D]`` (and context ``[N, C]``)."""
        self.check_input(x, context)
        out = made_mlp(
            x,
            self.masked_weights_cached(),
            list(self.biases),
            self.activation,
            context,
            self.context_weight,
        )
        return out.view(x.shape[0], self.params_per_dim, self.features)

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, hidden={self.hidden}, params_per_dim="
            f"{self.params_per_dim}, context={self.context_features}, "
            f"activation={self.activation!r}"
        )
