"""Model registry of the ``fastflow`` command: a name -> a builder from (data shape, options).

A new model plugs in with one entry::

    @register_model("spline", kinds=("vector",), defaults={"hidden": 64, "depth": 8})
    def _spline(shape, opts):
        return MySplineFlow(shape[0], layers=opts["depth"], hidden=opts["hidden"])

Options every builder receives (``None`` in the call means the entry's default): ``hidden``
(conditioner width), ``depth`` (steps per scale / number of layers), ``scales`` (levels of a
multi-scale image flow), ``marginal`` (bins of a per-pixel
:class:`~fastflow.nn.PiecewiseLinearMarginal` at the data end; 0 = none; only for entries whose
defaults have it). Models that take vectors only are fed flattened images.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

__all__ = ["ModelSpec", "MODELS", "register_model", "build_model", "model_input_shape"]

OPTION_KEYS = ("hidden", "depth", "scales", "marginal")


@dataclass
class ModelSpec:
    """One registry entry: ``build(shape, options) -> Flow``; ``kinds`` are the data kinds it
    takes natively (``"image"`` = ``(C, H, W)``, ``"vector"`` = ``(D,)``)."""

    name: str
    build: Callable[[tuple[int, ...], dict], nn.Module]
    kinds: tuple[str, ...]
    defaults: dict = field(default_factory=dict)
    description: str = ""
    available: Callable[[], str | None] = lambda: None  # None if usable, else why not


MODELS: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    kinds: tuple[str, ...] = ("vector",),
    defaults: dict | None = None,
    description: str = "",
    available: Callable[[], str | None] | None = None,
):
    """Decorator: register ``fn(shape, options) -> Flow`` as model ``name``.

    Example:
        >>> from fastflow.models.nice import NICE
        >>> @register_model("tiny-nice", defaults={"hidden": 8, "depth": 2})
        ... def _tiny(shape, o):
        ...     return NICE(shape[0], layers=o["depth"], hidden=o["hidden"], hidden_layers=1)
        >>> build_model("tiny-nice", (4,)).log_prob(__import__("torch").zeros(1, 4)).shape
        torch.Size([1])
        >>> _ = MODELS.pop("tiny-nice")
    """

    def deco(fn):
        MODELS[name] = ModelSpec(
            name, fn, tuple(kinds), dict(defaults or {}), description, available or (lambda: None)
        )
        return fn

    return deco


def model_input_shape(name: str, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the model consumes: the data shape, or the flattened image for vector-only
    models.

    Raises:
        ValueError: unknown model, or a model that cannot take this kind of data.

    Example:
        >>> model_input_shape("nice", (1, 8, 8)), model_input_shape("glow", (1, 8, 8))
        ((64,), (1, 8, 8))
    """
    spec = _spec(name)
    kind = "image" if len(data_shape) == 3 else "vector"
    if kind in spec.kinds:
        return tuple(data_shape)
    if kind == "image" and "vector" in spec.kinds:
        return (math.prod(data_shape),)
    raise ValueError(
        f"model {name!r} needs {' or '.join(spec.kinds)} data, but the data has shape "
        f"{tuple(data_shape)}; for vectors use one of: "
        + ", ".join(n for n, s in MODELS.items() if "vector" in s.kinds)
    )


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    spec = MODELS[name]
    why = spec.available()
    if why:
        raise ValueError(f"model {name!r} is not available: {why}")
    return spec


def resolve_options(name: str, options: dict | None = None) -> dict:
    """The entry's defaults updated with the non-``None`` values of ``options``."""
    opts = dict(_spec(name).defaults)
    for k, v in (options or {}).items():
        if v is not None:
            opts[k] = v
    for k in ("hidden", "depth", "scales"):
        if k in opts and (not isinstance(opts[k], int) or opts[k] < 1):
            raise ValueError(f"--{k} must be a positive int, got {opts[k]!r}")
    m = opts.get("marginal", 0)
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"--marginal must be an int >= 0 (bins; 0 = none), got {m!r}")
    if m and "marginal" not in _spec(name).defaults:
        takes = ", ".join(n for n, s in MODELS.items() if "marginal" in s.defaults)
        raise ValueError(f"--marginal is for the models {takes}, not {name!r}")
    return opts


def build_model(
    name: str, data_shape: tuple[int, ...], options: dict | None = None, preprocess=None
) -> nn.Module:
    """Build registered model ``name`` for data of ``data_shape`` (see
    :func:`model_input_shape`) with ``options`` over the entry's defaults. With a
    ``preprocess`` (:class:`~fastflow.training.preprocess.Preprocess`) whose dequantization is
    ``"variational"``, the model is wrapped in a
    :class:`~fastflow.dequantization.VariationalDequantization` (trained jointly).

    Example:
        >>> flow = build_model("realnvp", (2,), {"hidden": 16, "depth": 4})
        >>> flow.sample(3).shape
        torch.Size([3, 2])
    """
    shape = model_input_shape(name, data_shape)
    flow = MODELS[name].build(shape, resolve_options(name, options))
    if getattr(preprocess, "dequantization", "uniform") == "variational":
        from fastflow.dequantization import VariationalDequantization

        flow = VariationalDequantization(flow, tuple(data_shape), preprocess.levels, shape)
    return flow


def _call_accepting(cls, *args, **kwargs):
    """Call ``cls`` with only the keyword arguments its signature takes (for models whose exact
    options vary, e.g. MAF/IAF)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return cls(*args, **kwargs)
    return cls(*args, **{k: v for k, v in kwargs.items() if k in params})


# -- built-in entries ------------------------------------------------------------------------------


@register_model(
    "glow",
    kinds=("image",),
    defaults={"hidden": 64, "depth": 8, "scales": 2, "marginal": 0},
    description="Glow (Kingma & Dhariwal 2018): multi-scale ActNorm/1x1 conv/affine coupling; "
    "--marginal N: a per-pixel histogram marginal (N bins) at the data end",
)
def _glow(shape, o):
    from fastflow.models.glow import Glow

    glow = Glow(shape, levels=o["scales"], steps=o["depth"], hidden=o["hidden"])
    return with_marginal(glow, shape, o.get("marginal", 0))


def with_marginal(flow, shape: tuple[int, ...], bins: int):
    """``flow`` with a :class:`~fastflow.nn.PiecewiseLinearMarginal` of ``bins`` bins on
    ``[-0.5, 0.5]`` (the dequantized range of ``fastflow train``'s images) before its
    transforms; ``flow`` itself when ``bins`` is 0.

    Example:
        >>> from fastflow.models import Glow
        >>> f = with_marginal(Glow((1, 4, 4), levels=1, steps=1, hidden=4), (1, 4, 4), 8)
        >>> type(f.transforms[0]).__name__, f.log_prob(__import__("torch").zeros(2, 1, 4, 4)).shape
        ('PiecewiseLinearMarginal', torch.Size([2]))
    """
    if not bins:
        return flow
    from fastflow.flow import Flow
    from fastflow.nn.base import Compose
    from fastflow.nn.marginal import PiecewiseLinearMarginal

    marginal = PiecewiseLinearMarginal(tuple(shape), bins=bins, low=-0.5, high=0.5)
    return Flow(
        Compose([marginal, flow.transforms]),
        flow.base,
        invertible_recompute=flow.invertible_recompute,
        event_shape=tuple(shape),
    )


@register_model(
    "realnvp",
    kinds=("image", "vector"),
    defaults={"hidden": 64, "depth": 8, "scales": 2},
    description="RealNVP (Dinh et al. 2017): affine couplings, multi-scale for images",
)
def _realnvp(shape, o):
    from fastflow.models.realnvp import RealNVP

    if len(shape) == 1:
        return RealNVP(shape[0], hidden=o["hidden"], layers=o["depth"])
    return RealNVP(shape, levels=o["scales"], hidden=o["hidden"])


@register_model(
    "nice",
    kinds=("vector",),
    defaults={"hidden": 128, "depth": 4},
    description="NICE (Dinh et al. 2015): additive couplings and a diagonal scaling",
)
def _nice(shape, o):
    from fastflow.models.nice import NICE

    return NICE(shape[0], layers=o["depth"], hidden=o["hidden"], hidden_layers=2)


def _autoregressive(cls_name: str):
    def build(shape, o):
        import fastflow.models.maf as maf

        cls = getattr(maf, cls_name)
        # MADE hidden sizes: two hidden layers of width `hidden`
        return _call_accepting(cls, shape[0], layers=o["depth"], hidden=(o["hidden"],) * 2)

    return build


for _name, _cls, _desc in (
    ("maf", "MAF", "MAF (Papamakarios et al. 2017): masked autoregressive flow"),
    ("iaf", "IAF", "IAF (Kingma et al. 2016): inverse autoregressive flow"),
):
    register_model(
        _name,
        kinds=("vector",),
        defaults={"hidden": 64, "depth": 5},
        description=_desc,
    )(_autoregressive(_cls))


@register_model(
    "nsf",
    kinds=("vector",),
    defaults={"hidden": 64, "depth": 5},
    description="Neural spline flow (Durkan et al. 2019): rational-quadratic spline couplings",
)
def _nsf(shape, o):
    from fastflow.models.nsf import NeuralSplineFlow

    return NeuralSplineFlow(shape[0], layers=o["depth"], hidden=o["hidden"])


def _tarflow_patch(shape: tuple[int, ...]) -> int:
    """The largest of 4, 2, 1 that divides H and W and leaves at least 16 tokens."""
    _, h, w = shape
    return next(p for p in (4, 2, 1) if h % p == 0 and w % p == 0 and (h // p) * (w // p) >= 16)


@register_model(
    "tarflow",
    kinds=("image",),
    defaults={"hidden": 64, "depth": 4},
    description="TarFlow (Zhai et al. 2024): causal transformer autoregressive flow on patches "
    "(--hidden width, --depth blocks; trains on noised data)",
)
def _tarflow(shape, o):
    from fastflow.models.tarflow import TarFlow

    width = o["hidden"]
    heads = next(h for h in (4, 2, 1) if width % h == 0)
    return TarFlow(
        shape,
        patch_size=_tarflow_patch(shape),
        width=width,
        depth=2,
        blocks=o["depth"],
        heads=heads,
        noise_std=0.05,
    )


def _cnf_available() -> str | None:
    from fastflow.nn.continuous import torchdiffeq_missing

    return torchdiffeq_missing()


@register_model(
    "cnf",
    kinds=("vector",),
    defaults={"hidden": 64, "depth": 2},
    description="CNF (FFJORD, Grathwohl et al. 2019): a neural ODE, exact likelihood; train "
    "with --objective mle or fm/fm-ot (flow matching); --depth hidden layers of the field",
    available=_cnf_available,
)
def _cnf(shape, o):
    from fastflow.models.cnf import CNF

    return CNF(shape[0], hidden=o["hidden"], hidden_layers=o["depth"])
