"""Case list and worker for ``tests/test_fuzz.py`` (fuzzing every op in :mod:`fastflow.ops`).

The case list is built deterministically (fixed seed, no tensors are made until a case runs), so
the test process and its worker processes agree on it. A worker runs one family's cases from a
start index and prints one JSON line per event on stdout, flushed, prefixed with ``FUZZ``:
``{"start": i}`` before case ``i`` and ``{"done": i, "ok": ..., "msg": ...}`` after it; when the
worker dies the last started case is the one that killed it.

Run a family by hand: ``python tests/_fuzz_cases.py coupling [start]``.

Per case, on the native backend: the op either raises ValueError/TypeError (accepted), or
returns a result that must agree with the reference within a dtype-appropriate tolerance, NaN
exactly where the reference has NaN, the same infinities; gradients (of a fixed random linear
functional of the outputs) are compared the same way where a case asks for them. Cases marked
``reject`` have inputs that the op's contract rules out: for them only ValueError/TypeError is
accepted. Inputs must not be modified by the op.

The reference is the op itself on the reference backend (``fastflow.set_backend("reference")``,
same worker, same autocast state), except: ``plain_weight`` (no native path) against fp64
``torch.linalg`` with an exact rational test for singular W (log|det| = -inf); the MADE inverse
with non-finite values against ``torch_degree_walk`` (see ``_walk_ref``), ``torch_degree_walk``
against the naive loop; gradients of the MADE inverse are taken through ``pack_made`` (see
``_inverse_of_packed``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import random
import sys
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
import torch

import fastflow
from fastflow.ops import conv as CV
from fastflow.ops import coupling as C
from fastflow.ops import invconv as I
from fastflow.ops import made as M
from fastflow.ops import made_density as MD
from fastflow.ops import mlp_coupling as MC

SEED = 20250611
FAMILIES = ("coupling", "invconv", "made_net", "made_inverse", "spline", "conv")

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
FLOATS = (F32, F64, BF16, F16)
INTS = (torch.int32, torch.int64, torch.bool)
DNAME = {
    F32: "f32",
    F64: "f64",
    BF16: "bf16",
    F16: "f16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "bool",
}
#: (rtol, atol) of native against the reference, per dtype of the compared tensor; atol is
#: relative to max(1, max |reference|)
TOL = {F64: (1e-9, 1e-9), F32: (2e-4, 2e-4), BF16: (2e-2, 2e-2), F16: (4e-3, 4e-3)}
AUTOCAST_TOL = (0.1, 0.1)  # bf16 autocast: the reference's matmuls also run in bf16
NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------------------------
# Inputs


class Spec(NamedTuple):
    """A random tensor: built when the case runs, from the case's own generator."""

    shape: tuple
    dtype: torch.dtype = F32
    values: str = "randn"  # randn big tiny zero nan inf nonfinite
    layout: str = "contig"  # contig t T0 strided bstride chlast expand offset overlap
    scale: float = 1.0


def _values(g: torch.Generator, shape: tuple, dtype: torch.dtype, values: str, scale: float):
    if dtype in INTS:
        lo = 0 if dtype == torch.bool else -3
        return torch.randint(lo, 2 if dtype == torch.bool else 4, shape, generator=g).to(dtype)
    base = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if values == "big":
        base = base * (1e3 if dtype == F16 else 1e4)
    elif values == "tiny":  # subnormal in the dtype (zero for bf16 beyond its range)
        base = base * {F64: 1e-310, F32: 1e-40, BF16: 1e-40, F16: 1e-7}[dtype]
    elif values == "zero":
        base = torch.zeros_like(base)
    elif values in ("nan", "inf", "nonfinite") and base.numel():
        flat = base.view(-1)
        k = max(1, flat.numel() // 5)
        idx = torch.randperm(flat.numel(), generator=g)[:k]
        fill = {"nan": [NAN], "inf": [INF, -INF], "nonfinite": [NAN, INF, -INF]}[values]
        for j, i in enumerate(idx.tolist()):
            flat[i] = fill[j % len(fill)]
    return base.to(dtype)


def relayout(g: torch.Generator, base: torch.Tensor, layout: str) -> torch.Tensor:
    """``base``'s values (except for expand/overlap) with the memory layout ``layout``."""
    s, d = tuple(base.shape), base.dim()
    if layout == "t" and d >= 2:  # last two dims transposed in memory
        return base.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "T0" and d >= 2:  # batch dim not outermost (e.g. x = h.t())
        return base.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided" and d >= 1:
        big = torch.zeros(s[:-1] + (2 * s[-1] + 1,), dtype=base.dtype)
        big[..., 1::2] = base
        return big[..., 1::2]
    if layout == "bstride" and d >= 2:  # one half of a wider conditioner output
        big = torch.ones((s[0], 2 * s[1] + 1) + s[2:], dtype=base.dtype)
        big[:, 1 : s[1] + 1] = base
        return big[:, 1 : s[1] + 1]
    if layout == "chlast" and d in (4, 5):
        fmt = torch.channels_last if d == 4 else torch.channels_last_3d
        return base.contiguous(memory_format=fmt)
    if layout == "expand" and d >= 1 and s[0] >= 1:  # stride 0 batch: every sample aliases
        return base[:1].expand(s)
    if layout == "offset":  # storage offset of one element (misaligned for SIMD)
        st = torch.zeros(base.numel() + 1, dtype=base.dtype)
        st[1:] = base.flatten()
        return st[1:].view(s)
    if layout == "overlap" and d == 2 and s[0] > 1 and s[1] > 1:  # rows overlap in memory
        step = max(1, s[1] // 2)
        st = torch.randn((s[0] - 1) * step + s[1], generator=g, dtype=torch.float64)
        return st.to(base.dtype).as_strided(s, (step, 1))
    return base.contiguous()


def make(g: torch.Generator, spec: Any) -> Any:
    if isinstance(spec, Spec):
        base = _values(g, tuple(spec.shape), spec.dtype, spec.values, spec.scale)
        return relayout(g, base, spec.layout)
    if callable(spec):
        return spec(g)
    return spec


def meta(shape, dtype=F32):
    return lambda g: torch.zeros(shape, dtype=dtype, device="meta")


def nparray(shape):
    return lambda g: np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def pylist(shape):
    return lambda g: torch.randn(shape, generator=g).tolist()


# ----------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    name: str
    op: Callable
    args: list = field(default_factory=list)  # Specs, callables (g -> value) or literals
    kwargs: dict = field(default_factory=dict)
    build: Callable | None = None  # g -> (args, kwargs), instead of args/kwargs
    grad: Callable | None = None  # (args, kwargs) -> tensors to differentiate with respect to
    reject: bool = False  # invalid by the op's contract: only ValueError/TypeError is accepted
    autocast: bool = False  # run under torch.autocast("cpu", torch.bfloat16)
    tol: float = 1.0  # multiplies the dtype tolerance
    ref: Callable | None = None  # independent oracle (args, kwargs) -> expected outputs
    loss_on: tuple | None = None  # outputs the gradient check's loss uses (default: all)

    def inputs(self) -> tuple[list, dict]:
        g = torch.Generator().manual_seed(SEED ^ zlib.crc32(self.name.encode()))
        if self.build is not None:
            return self.build(g)
        args = [make(g, a) for a in self.args]
        return args, {k: make(g, v) for k, v in self.kwargs.items()}


def _shape_str(shape) -> str:
    return "x".join(str(s) for s in shape) if len(shape) else "scalar"


class _Namer:
    def __init__(self, family: str):
        self.family, self.n, self.seen = family, 0, set()

    def __call__(self, desc: str) -> str:
        name = f"{self.family}/{self.n:03d}-{desc}"
        self.n += 1
        assert name not in self.seen
        self.seen.add(name)
        return name


def _grad_args(*pos):
    return lambda args, kwargs: [args[i] for i in pos]


# ---- coupling ---------------------------------------------------------------------------------

_COUPLING_OPS = {
    "affine": C.affine_coupling,
    "affine_inv": C.affine_coupling_inverse,
    "additive": C.additive_coupling,
    "additive_inv": C.additive_coupling_inverse,
}
_COUPLING_SHAPES = [
    (2, 3),
    (1, 5),
    (0, 4),
    (3, 0),
    (0, 0),
    (4, 3, 5, 7),
    (2, 1, 1),
    (3, 17),
    (2, 3, 4, 5, 6),
    (1, 1),
    (5, 64),
    (2, 8, 3, 3),
    (7, 33),
    (3, 2, 5),
]


def _layouts_for(shape) -> list[str]:
    out = ["contig", "contig", "offset", "strided"]
    if len(shape) >= 2:
        out += ["t", "bstride", "T0"]
    if len(shape) in (4, 5):
        out += ["chlast", "chlast"]
    if len(shape) >= 1 and shape[0] >= 1:
        out.append("expand")
    if len(shape) == 2:
        out.append("overlap")
    return out


def _mask_spec(kind: str, shape):
    feat = tuple(shape[1:])

    def build(g):
        if kind == "bool":
            return torch.rand(feat, generator=g) < 0.5
        if kind == "int":
            return torch.randint(-1, 3, feat, generator=g)
        if kind == "float":  # 0, 0.5, 1 (nonzero = transformed)
            return torch.randint(0, 3, feat, generator=g).float() / 2
        if kind == "nan":  # NaN != 0: transformed
            m = torch.randint(0, 2, feat, generator=g).float()
            if m.numel():
                m.view(-1)[0] = NAN
            return m
        if kind == "bcast":  # broadcast over all but the first feature dim
            return torch.rand(feat[:1] + (1,) * (len(feat) - 1), generator=g) < 0.5
        if kind == "scalar":
            return torch.tensor(1)
        if kind == "strided":
            return (torch.rand(feat[:-1] + (2 * feat[-1],), generator=g) < 0.5)[..., ::2]
        raise AssertionError(kind)

    return build


_UNSET = object()


def _coupling(name, op, x, raw=None, shift=None, mask=None, scale_fn=_UNSET, clamp=_UNSET, **kw):
    args = [x, raw, shift] if op in ("affine", "affine_inv") else [x, shift]
    kwargs = {"mask": mask} if mask is not None else {}
    if scale_fn is not _UNSET:
        kwargs["scale_fn"] = scale_fn
    if clamp is not _UNSET:
        kwargs["clamp"] = clamp
    return Case(name, _COUPLING_OPS[op], args, kwargs, **kw)


def coupling_cases() -> list[Case]:
    rng = random.Random(SEED + 1)
    name = _Namer("coupling")
    cases: list[Case] = []
    ops = list(_COUPLING_OPS)

    def some_ops(j):
        return (ops[j % 4], ops[(j + 1) % 4])

    # random combinations of shape, dtype, layouts, values, scale function, clamp and mask
    for i in range(48):
        op = ops[i % 4]
        shape = rng.choice(_COUPLING_SHAPES)
        dtype = rng.choice(FLOATS)
        lay = [rng.choice(_layouts_for(shape)) for _ in range(3)]
        mask = rng.choice([None, None, None, "bool", "int", "float", "bcast", "scalar", "strided"])
        if mask is not None and len(shape) < 2:
            mask = None
        vals = [rng.choices(["randn", "big", "tiny", "zero", "nan", "inf"], [8, 1, 1, 1, 1, 1])[0]]
        # with a mask, non-finite values only in x (see the dedicated masked-NaN cases below)
        pool = ["randn"] * 8 + (["big", "tiny", "zero"] if mask else ["big", "nan", "inf", "zero"])
        vals += [rng.choice(pool), rng.choice(pool)]
        scale_fn = rng.choice(["softclamp", "softclamp", "glow", "identity"])
        clamp = rng.choice([2.0, 2.0, 1.0, 0.5, 1e-3, 1e6, 1e30, 1e-30])
        specs = [Spec(shape, dtype, v, lay_) for v, lay_ in zip(vals, lay)]
        affine = op.startswith("affine")
        desc = f"{op}-{DNAME[dtype]}-{_shape_str(shape)}-{'/'.join(lay)}-{'/'.join(vals)}"
        if affine:
            desc += f"-{scale_fn}-c{clamp:g}"
        if mask:
            desc += f"-mask_{mask}"
        cases.append(
            _coupling(
                name(desc),
                op,
                specs[0],
                specs[1],
                specs[2],
                mask=_mask_spec(mask, shape) if mask else None,
                scale_fn=scale_fn if affine else _UNSET,
                clamp=clamp if affine else _UNSET,
            )
        )

    # gradients
    for shape, dtype, lay, mask, sf in [
        ((3, 5), F64, "contig", None, "softclamp"),
        ((4, 3, 5, 7), F64, "chlast", "bool", "glow"),
        ((2, 17), F32, "bstride", None, "identity"),
        ((5, 2, 3), F32, "t", "int", "softclamp"),
        ((1, 9), F64, "strided", None, "glow"),
        ((6, 8), BF16, "contig", None, "softclamp"),
        ((3, 4, 4), F16, "offset", "bcast", "softclamp"),
        ((2, 33), F32, "expand", None, "softclamp"),
    ]:
        for op in some_ops(len(cases)):
            affine = op.startswith("affine")
            specs = [Spec(shape, dtype, "randn", lay)] * 3
            desc = f"grad-{op}-{DNAME[dtype]}-{_shape_str(shape)}-{lay}-mask_{mask}"
            cases.append(
                _coupling(
                    name(desc + (f"-{sf}" if affine else "")),
                    op,
                    *specs,
                    mask=_mask_spec(mask, shape) if mask else None,
                    scale_fn=sf if affine else _UNSET,
                    grad=_grad_args(0, 1, 2) if affine else _grad_args(0, 1),
                )
            )

    # extreme (but valid) clamps
    for clamp in (5e-324, 1e-300, 1e-30, 1e-8, 1e8, 1e38, 1e300, sys.float_info.max):
        for dtype, op in ((F32, "affine"), (F64, "affine_inv")):
            s = Spec((3, 7), dtype, "big" if clamp > 1 else "randn")
            cases.append(
                _coupling(name(f"{op}-clamp{clamp:g}-{DNAME[dtype]}"), op, s, s, s, clamp=clamp)
            )
    for clamp in ("2", torch.tensor(1.5), np.float32(0.5), True):
        s = Spec((2, 4))
        cases.append(
            _coupling(name(f"affine-clamp_{type(clamp).__name__}"), "affine", s, s, s, clamp=clamp)
        )

    # invalid options
    s = Spec((2, 4))
    for sf in ("nope", None, 3, ["softclamp"], "Glow"):
        cases.append(
            _coupling(name(f"affine-scale_fn_{sf!r}"), "affine", s, s, s, scale_fn=sf, reject=True)
        )
    for j, clamp in enumerate((0.0, -1.0, NAN, INF, -INF, None, "abc", [2.0], torch.ones(2))):
        for op in (("affine", "affine_inv")[j % 2],):
            cases.append(
                _coupling(name(f"{op}-clamp_{clamp!r}"), op, s, s, s, clamp=clamp, reject=True)
            )

    # wrong ranks, dtypes, shapes, devices, types (each variant for two of the four ops)
    for j, shape in enumerate(((), (5,))):
        for op in some_ops(j):
            sp = Spec(shape)
            cases.append(_coupling(name(f"{op}-rank{len(shape)}"), op, sp, sp, sp, reject=True))
    for j, dt in enumerate(INTS):
        for op in some_ops(j):
            sp = Spec((2, 3), dt)
            cases.append(_coupling(name(f"{op}-x_{DNAME[dt]}"), op, sp, sp, sp, reject=True))
    ok = Spec((2, 3))
    bad_shift = {
        "shift_f64": Spec((2, 3), F64),
        "shift_i64": Spec((2, 3), torch.int64),
        "shift_shape2x4": Spec((2, 4)),
        "shift_bcast1x3": Spec((1, 3)),
        "shift_3d": Spec((2, 3, 1)),
        "shift_meta": meta((2, 3)),
        "shift_None": None,
        "shift_list": pylist((2, 3)),
        "shift_numpy": nparray((2, 3)),
    }
    for j, (k, v) in enumerate(bad_shift.items()):
        for op in some_ops(j):
            cases.append(_coupling(name(f"{op}-{k}"), op, ok, ok, v, reject=True))
    bad_x = {
        "x_None": None,
        "x_list": pylist((2, 3)),
        "x_numpy": nparray((2, 3)),
        "x_meta": meta((2, 3)),
        "x_f16_shift_bf16": Spec((2, 3), F16),
    }
    for j, (k, v) in enumerate(bad_x.items()):
        sh = Spec((2, 3), BF16) if k == "x_f16_shift_bf16" else ok
        for op in some_ops(j + 1):
            cases.append(_coupling(name(f"{op}-{k}"), op, v, sh, sh, reject=True))
    for k, v in {
        "raw_f16": Spec((2, 3), F16),
        "raw_shape": Spec((3, 2)),
        "raw_meta": meta((2, 3)),
        "raw_None": None,
        "raw_numpy": nparray((2, 3)),
        "raw_int": 1,
    }.items():
        ok = Spec((2, 3))
        cases.append(_coupling(name(f"affine-{k}"), "affine", ok, v, ok, reject=True))
        cases.append(_coupling(name(f"affine_inv-{k}"), "affine_inv", ok, v, ok, reject=True))

    # masks: invalid ones, and NaN/inf in the masked-out part of raw_scale/shift
    ok = Spec((2, 3, 4))
    for k, v in {
        "mask_shape": lambda g: torch.ones(4, 3),
        "mask_batch": lambda g: torch.ones(2, 3, 4),
        "mask_longer": lambda g: torch.ones(3, 5),
        "mask_list": lambda g: [1, 0, 1, 0],
        "mask_numpy": lambda g: np.ones((3, 4)),
        "mask_meta": meta((3, 4)),
        "mask_int": 1,
    }.items():
        for op in some_ops(len(k)):
            cases.append(_coupling(name(f"{op}-{k}"), op, ok, ok, ok, mask=v, reject=True))

    def masked_nonfinite(where, value):
        def build(g):
            x, raw, t = (torch.randn(3, 4, generator=g) for _ in range(3))
            m = torch.tensor([1, 0, 1, 0])
            {"raw": raw, "shift": t}[where][:, 1] = value
            return [x, raw, t], {"mask": m, "scale_fn": "identity"}

        return build

    for op in ("affine", "affine_inv"):
        for where, value in (("raw", NAN), ("raw", INF), ("shift", NAN)):
            cases.append(
                Case(
                    name(f"{op}-masked_out_{where}_{value}"),
                    _COUPLING_OPS[op],
                    build=masked_nonfinite(where, value),
                )
            )

    # aliasing: the same tensor for every argument; large odd sizes (SIMD tails, threads)
    def aliased(shape, dtype, affine):
        def build(g):
            x = torch.randn(shape, generator=g).to(dtype)
            return ([x, x, x] if affine else [x, x]), {}

        return build

    for op in ops:
        cases.append(
            Case(
                name(f"{op}-aliased"),
                _COUPLING_OPS[op],
                build=aliased((3, 10), F32, op.startswith("affine")),
            )
        )
        for shape, dtype in (((5, 1031), F32), ((3, 3, 17, 19), BF16), ((2, 4099), F16))[
            ops.index(op) % 2 :: 2
        ]:
            sp = Spec(shape, dtype, "randn", "bstride")
            cases.append(
                _coupling(name(f"{op}-large-{DNAME[dtype]}-{_shape_str(shape)}"), op, sp, sp, sp)
            )

    # under bf16 autocast
    for op in ops:
        for dtype in ((F32, BF16)[ops.index(op) % 2],):
            sp = Spec((4, 3, 5), dtype)
            cases.append(
                _coupling(name(f"autocast-{op}-{DNAME[dtype]}"), op, sp, sp, sp, autocast=True)
            )
    return cases


# ---- invconv ----------------------------------------------------------------------------------


def _lu_build(c, dtype, lay=("contig",) * 5, log_scale=0.3, perm=True, sign=True, mods=None):
    def build(g):
        pi = torch.randperm(c, generator=g) if perm else torch.arange(c)
        P = torch.eye(c, dtype=torch.float64)[pi]
        L = torch.randn(c, c, generator=g, dtype=torch.float64) * 0.3
        U = torch.randn(c, c, generator=g, dtype=torch.float64) * 0.3
        log_s = torch.randn(c, generator=g, dtype=torch.float64) * log_scale
        sign_s = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).double()
        if not sign:
            sign_s = torch.ones(c, dtype=torch.float64)
        ts = [relayout(g, t.to(dtype), l) for t, l in zip((P, L, U, log_s, sign_s), lay)]
        kwargs = {}
        if mods:
            mods(g, ts, kwargs)
        return ts, kwargs

    return build


def _set_last(ts: list, i: int, value: float) -> None:
    ts[i] = ts[i].clone()
    ts[i].view(-1)[-1] = value


def _lu_grad(args, kwargs):
    return [args[1], args[2], args[3]]


def _exact_det_is_zero(W: torch.Tensor) -> bool | None:
    """Whether det(W) is exactly 0 for W's floating values (exact rational elimination)."""
    c = W.shape[0]
    if c > 8:
        return None
    a = [[Fraction(float(v)) for v in row] for row in W.double().tolist()]
    for k in range(c):
        piv = next((i for i in range(k, c) if a[i][k] != 0), None)
        if piv is None:
            return True
        a[k], a[piv] = a[piv], a[k]
        for i in range(k + 1, c):
            f = a[i][k] / a[k][k]
            if f:
                a[i] = [x - f * y for x, y in zip(a[i], a[k])]
    return False


SKIP = object()  # an expected value that is not compared


def _ref_plain_weight(args, kwargs):
    """Independent oracle: fp64 slogdet/inverse, exact rational test for a singular W."""
    W = args[0]
    inverse = kwargs.get("inverse", args[1] if len(args) > 1 else True)
    acc = F64 if W.dtype == F64 else F32
    if not (isinstance(W, torch.Tensor) and W.dtype in FLOATS and W.dim() == 2):
        raise TypeError("no oracle for this W")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("non-finite W")
    singular = _exact_det_is_zero(W)
    if singular:
        return W, SKIP if inverse else None, torch.tensor(-INF, dtype=acc)
    ld = torch.linalg.slogdet(W.double())[1].to(acc)
    w_inv = torch.linalg.inv(W.double()).to(W.dtype) if inverse else None
    return W, w_inv, ld


def invconv_cases() -> list[Case]:
    rng = random.Random(SEED + 2)
    name = _Namer("invconv")
    cases: list[Case] = []

    # ---- lu_weight: random
    for _ in range(24):
        c = rng.choice([1, 2, 3, 4, 5, 7, 8, 16, 17, 33])
        dtype = rng.choice(FLOATS)
        lay = tuple(rng.choice(["contig", "contig", "t", "strided", "offset"]) for _ in range(5))
        # larger log-scales only for small C: exp(|log_s|) chained over C rows overflows fp32
        log_scale = rng.choice([0.3, 0.3, 1.0, 3.0] if c <= 8 else [0.3, 1.0])
        desc = f"lu_weight-{DNAME[dtype]}-C{c}-{'/'.join(lay)}-logs{log_scale:g}"
        grad = rng.random() < 0.35 and dtype in (F32, F64) and log_scale < 1
        cases.append(
            Case(
                name(desc + ("-grad" if grad else "")),
                I.lu_weight,
                build=_lu_build(c, dtype, lay, log_scale),
                grad=_lu_grad if grad else None,
                tol=10.0 if c > 8 else 1.0,
            )
        )
    for dtype in FLOATS:  # gradients in every dtype (16-bit included)
        for c in (3, 8):
            cases.append(
                Case(
                    name(f"lu_weight-grad-{DNAME[dtype]}-C{c}"),
                    I.lu_weight,
                    build=_lu_build(c, dtype),
                    grad=_lu_grad,
                )
            )

    # a 16-bit W^-1 that overflows (entries ~ e^11.5 > 65504) while W stays well conditioned
    # (W = P L diag(e^-11.5), U = 0); the loss with and without W^-1
    def small_w(g, ts, kw):
        ts[2] = torch.zeros_like(ts[2])
        ts[3] = torch.full_like(ts[3], -11.5)

    for dtype in (F16, BF16):
        for loss_on in ((0, 1, 2), (0, 2)):
            cases.append(
                Case(
                    name(f"lu_weight-grad-{DNAME[dtype]}-W_inv_overflow-loss{len(loss_on)}"),
                    I.lu_weight,
                    build=_lu_build(4, dtype, mods=small_w),
                    grad=_lu_grad,
                    loss_on=loss_on,
                )
            )
    for dtype in (F32, BF16):
        cases.append(
            Case(
                name(f"autocast-lu_weight-{DNAME[dtype]}"),
                I.lu_weight,
                build=_lu_build(5, dtype),
                autocast=True,
            )
        )

    def mod(fn):
        return lambda g, ts, kw: fn(ts, kw)

    def set_(i, value):
        return lambda ts, kw: _set_last(ts, i, value)

    def repl(i, new):
        def f(ts, kw):
            ts[i] = new(ts[i]) if callable(new) else new

        return f

    lu_bad = {
        "L_nan": set_(1, NAN),
        "U_inf": set_(2, INF),
        "log_s_nan": set_(3, NAN),
        "log_s_100": set_(3, 100.0),
        "log_s_-100": set_(3, -100.0),
        "log_s_800": set_(3, 800.0),
        "sign_s_0": set_(4, 0.0),
        "sign_s_0.5": set_(4, 0.5),
        "sign_s_nan": set_(4, NAN),
        "P_2I": repl(0, lambda P: 2 * P),
        "P_not_perm": repl(0, lambda P: torch.ones_like(P) / P.shape[0]),
        "P_nan": set_(0, NAN),
        "P_shape": repl(0, lambda P: P[:-1]),
        "U_shape": repl(2, lambda U: U[:, :-1]),
        "log_s_shape": repl(3, lambda t: t[:, None]),
        "sign_s_shape": repl(4, lambda t: t[:-1]),
        "L_rank3": repl(1, lambda t: t[None]),
        "L_rank1": repl(1, lambda t: t[0]),
        "L_nonsquare": repl(1, lambda t: t[:-1]),
        "P_f64": repl(0, lambda t: t.double() if t.dtype != F64 else t.float()),
        "P_int": repl(0, lambda t: t.long()),
        "U_meta": repl(2, lambda t: t.to("meta")),
        "log_s_meta": repl(3, lambda t: t.to("meta")),
        "L_int": repl(1, lambda t: t.long()),
        "L_None": repl(1, None),
        "U_None": repl(2, None),
        "P_list": repl(0, lambda t: t.tolist()),
        "L_numpy": repl(1, lambda t: t.numpy()),
        "sign_s_numpy": repl(4, lambda t: t.numpy()),
        "check_constants_str": lambda ts, kw: kw.update(check_constants="no"),
    }
    for k, f in lu_bad.items():
        reject = k not in ("check_constants_str",)
        cases.append(
            Case(
                name(f"lu_weight-{k}"),
                I.lu_weight,
                build=_lu_build(4, F32, mods=mod(f)),
                reject=reject,
            )
        )
    cases.append(Case(name("lu_weight-C0"), I.lu_weight, build=_lu_build(0, F32), reject=True))
    for k, f in {"log_s_87": set_(3, 87.0), "log_s_-87": set_(3, -87.0)}.items():
        cases.append(
            Case(
                name(f"lu_weight-{k}-f32"),
                I.lu_weight,
                build=_lu_build(3, F32, log_scale=0.0, mods=mod(f)),
            )
        )
    for k, f in {"log_s_700": set_(3, 700.0), "log_s_-700": set_(3, -700.0)}.items():
        cases.append(
            Case(
                name(f"lu_weight-{k}-f64"),
                I.lu_weight,
                build=_lu_build(3, F64, log_scale=0.0, mods=mod(f)),
            )
        )
    for dtype in (F16, BF16):  # exp(log_s) = e^20 overflows the 16-bit W (but not fp32)
        cases.append(
            Case(
                name(f"lu_weight-log_s_20-{DNAME[dtype]}"),
                I.lu_weight,
                build=_lu_build(3, dtype, log_scale=0.0, mods=mod(set_(3, 20.0))),
            )
        )

    cases.append(
        Case(
            name("lu_weight-check_constants_False"),
            I.lu_weight,
            build=_lu_build(4, F64, mods=mod(lambda ts, kw: kw.update(check_constants=False))),
        )
    )

    # ---- channel_affine: random
    for _ in range(28):
        n = rng.choice([0, 1, 2, 5])
        c = rng.choice([1, 2, 3, 4, 8, 17, 33])
        spatial = rng.choice([(), (), (7,), (3, 5), (4, 4), (0, 3), (1, 1), (2, 3, 5), (9, 13)])
        shape = (n, c, *spatial)
        dtype = rng.choice(FLOATS)
        xl = rng.choice(_layouts_for(shape))
        wl = rng.choice(["contig", "t", "strided"])
        vals = rng.choices(["randn", "big", "nan", "inf", "zero"], [8, 1, 1, 1, 1], k=3)
        bias = rng.random() < 0.6
        grad = rng.random() < 0.3 and all(v == "randn" for v in vals) and xl != "expand" and n > 0
        args = [Spec(shape, dtype, vals[0], xl), Spec((c, c), dtype, vals[1], wl, 1 / c**0.5)]
        if bias:
            args.append(Spec((c,), dtype, vals[2], rng.choice(["contig", "strided"])))
        desc = f"channel_affine-{DNAME[dtype]}-{_shape_str(shape)}-{xl}/{wl}-{'/'.join(vals)}"
        cases.append(
            Case(
                name(desc + ("-bias" if bias else "") + ("-grad" if grad else "")),
                I.channel_affine,
                args,
                grad=(_grad_args(*range(len(args))) if grad else None),
                tol=5.0 if c > 8 else 1.0,
            )
        )
    for dtype in FLOATS:
        cases.append(
            Case(
                name(f"channel_affine-grad-{DNAME[dtype]}-chlast"),
                I.channel_affine,
                [
                    Spec((3, 4, 5, 6), dtype, layout="chlast"),
                    Spec((4, 4), dtype),
                    Spec((4,), dtype),
                ],
                grad=_grad_args(0, 1, 2),
            )
        )
    for dtype in (F32, BF16):
        cases.append(
            Case(
                name(f"autocast-channel_affine-{DNAME[dtype]}"),
                I.channel_affine,
                [Spec((2, 3, 4, 4), dtype), Spec((3, 3), dtype), Spec((3,), dtype)],
                autocast=True,
            )
        )
    x, w, b = Spec((2, 3, 4, 4)), Spec((3, 3)), Spec((3,))
    ca_bad = {
        "x_rank1": [Spec((3,)), w, b],
        "x_rank0": [Spec(()), w, b],
        "x_int": [Spec((2, 3, 4), torch.int64), w, b],
        "x_None": [None, w, b],
        "x_list": [pylist((2, 3)), w, b],
        "x_numpy": [nparray((2, 3, 4)), w, b],
        "W_nonsquare": [x, Spec((3, 4)), b],
        "W_wrong_C": [x, Spec((4, 4)), b],
        "W_rank3": [x, Spec((1, 3, 3)), b],
        "W_rank1": [x, Spec((3,)), b],
        "W_f64": [x, Spec((3, 3), F64), b],
        "W_int": [x, Spec((3, 3), torch.int32), b],
        "W_meta": [x, meta((3, 3)), b],
        "W_None": [x, None, b],
        "W_numpy": [x, nparray((3, 3)), b],
        "b_shape": [x, w, Spec((3, 1))],
        "b_short": [x, w, Spec((2,))],
        "b_scalar": [x, w, Spec(())],
        "b_f16": [x, w, Spec((3,), F16)],
        "b_meta": [x, w, meta((3,))],
        "b_list": [x, w, pylist((3,))],
        "b_float": [x, w, 1.0],
        "x_meta": [meta((2, 3, 4, 4)), w, b],
    }
    for k, args in ca_bad.items():
        cases.append(Case(name(f"channel_affine-{k}"), I.channel_affine, args, reject=True))
    for shape in ((2, 0, 3), (0, 0), (2, 5, 0, 0)):
        c = shape[1]
        cases.append(
            Case(
                name(f"channel_affine-empty-{_shape_str(shape)}"),
                I.channel_affine,
                [Spec(shape), Spec((c, c)), Spec((c,))],
            )
        )
    cases.append(
        Case(
            name("channel_affine-large-f32-4x33x31x29"),
            I.channel_affine,
            [Spec((4, 33, 31, 29), layout="chlast"), Spec((33, 33), scale=0.2), Spec((33,))],
            tol=5.0,
        )
    )

    # ---- plain_weight
    def well_conditioned(c, dtype, layout="contig", scale=1.0):
        def build(g):
            q = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=F64))[0]
            W = (q + 0.1 * torch.randn(c, c, generator=g, dtype=F64)) * scale
            return [relayout(g, W.to(dtype), layout)], {}

        return build

    for j, c in enumerate((1, 2, 3, 4, 8, 17)):
        for dtype in (FLOATS[j % 4], FLOATS[(j + 1) % 4]):
            lay = rng.choice(["contig", "t", "strided"])
            cases.append(
                Case(
                    name(f"plain_weight-{DNAME[dtype]}-C{c}-{lay}"),
                    I.plain_weight,
                    build=well_conditioned(c, dtype, lay),
                    ref=_ref_plain_weight,
                )
            )
    cases.append(
        Case(
            name("plain_weight-inverse_False"),
            I.plain_weight,
            build=lambda g: ([torch.eye(3) * 2], {"inverse": False}),
            ref=_ref_plain_weight,
        )
    )
    cases.append(
        Case(
            name("plain_weight-f32-C4-scale1e-10"),
            I.plain_weight,
            build=well_conditioned(4, F32, scale=1e-10),
            ref=_ref_plain_weight,
        )
    )

    def fixed(rows, dtype):
        return lambda g: ([torch.tensor(rows, dtype=F64).to(dtype)], {})

    def rank_deficient(c, dtype, how):
        def build(g):
            W = torch.randint(-4, 5, (c, c), generator=g).double()
            if how == "sum":  # last row = row0 + row1 (exact in integers)
                W[-1] = W[0] + W[1]
            elif how == "col":
                W[:, -1] = W[:, 0]
            elif how == "zero_row":
                W[1] = 0
            elif how == "scaled":  # row1 = 0.1 * row0 (rounded: exactly singular values)
                W = torch.randn(c, c, generator=g, dtype=F64).to(dtype).double()
                W[1] = W[0]
                W[:, 1] = W[:, 0] * 3
            return [W.to(dtype)], {}

        return build

    singular = {
        "1to9": [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
        "zeros": [[0.0, 0.0], [0.0, 0.0]],
        "1x1_zero": [[0.0]],
        "rank1": [[1, 2], [2, 4]],
        # last row = a * row0 + b * row1: LU rounding leaves a tiny nonzero pivot (a finite
        # fp32, and for the first two fp64, log|det| from slogdet)
        "int4_a": [[6, -5, -9, -9], [2, -2, -4, 0], [0, -5, 4, -8], [4, -3, -5, -9]],
        "int4_b": [[-9, 2, 3, 7], [-4, 4, 6, -7], [3, 9, 4, -4], [19, 2, 3, -35]],
        "int4_c": [[7, 1, 2, -7], [-7, -8, 2, 1], [-1, 4, -4, -1], [-28, -18, 0, 16]],
    }
    for j, (k, rows) in enumerate(singular.items()):
        for dtype in (FLOATS[j % 4], FLOATS[(j + 2) % 4]):
            cases.append(
                Case(
                    name(f"plain_weight-singular_{k}-{DNAME[dtype]}"),
                    I.plain_weight,
                    build=fixed(rows, dtype),
                    ref=_ref_plain_weight,
                )
            )
    for j, how in enumerate(("sum", "col", "zero_row", "scaled")):
        for dtype in ((F32, F64)[j % 2],):
            cases.append(
                Case(
                    name(f"plain_weight-singular_{how}-{DNAME[dtype]}-C5"),
                    I.plain_weight,
                    build=rank_deficient(5, dtype, how),
                    ref=_ref_plain_weight,
                )
            )
    pw_bad = {
        "nan": [[1.0, NAN], [0.0, 1.0]],
        "inf": [[INF, 0.0], [0.0, 1.0]],
    }
    for k, rows in pw_bad.items():
        cases.append(
            Case(name(f"plain_weight-{k}"), I.plain_weight, build=fixed(rows, F32), reject=True)
        )
    for k, arg in {
        "nonsquare": Spec((3, 4)),
        "rank3": Spec((2, 3, 3)),
        "rank1": Spec((3,)),
        "int": Spec((3, 3), torch.int64),
        "None": None,
        "list": pylist((2, 2)),
        "numpy": nparray((2, 2)),
        "empty": Spec((0, 0)),
    }.items():
        cases.append(
            Case(
                name(f"plain_weight-{k}"),
                I.plain_weight,
                [arg],
                reject=k != "empty",
                ref=_ref_plain_weight,
            )
        )
    return cases


# ---- MADE -------------------------------------------------------------------------------------


def _made_net(g, d, hidden, c=0, rows=None, dtype=F64, masked=True):
    """Random MADE weights in original coordinates: (weights, biases, in_deg, hidden_deg, cw)."""
    sizes = [d, *hidden]
    in_deg = torch.randperm(d, generator=g) + 1 if d else torch.zeros(0, dtype=torch.long)
    hd = [torch.randint(0, max(d, 1), (h,), generator=g) for h in hidden]
    ws, prev = [], in_deg
    for i, h in enumerate(hidden):
        w = torch.randn(h, sizes[i], generator=g, dtype=F64) / max(sizes[i], 1) ** 0.5
        if masked:
            w = w * (hd[i][:, None] >= prev[None, :])
        ws.append(w)
        prev = hd[i]
    rows = 2 * d if rows is None else rows
    w = torch.randn(rows, hidden[-1], generator=g, dtype=F64) / hidden[-1] ** 0.5
    if masked and d:
        reps = -(-rows // d)
        w = w * (in_deg.repeat(reps)[:rows, None] > prev[None, :])
    ws.append(w)
    bs = [0.3 * torch.randn(w.shape[0], generator=g, dtype=F64) for w in ws]
    cw = torch.randn(hidden[0], c, generator=g, dtype=F64) * 0.5 if c else None
    ws, bs = [w.to(dtype) for w in ws], [b.to(dtype) for b in bs]
    return ws, bs, in_deg, hd, (cw.to(dtype) if cw is not None else None)


_ACTS = ("relu", "tanh", "elu")
_SFS = ("softclamp", "glow", "identity")


def _grad_made_fwd(args, kwargs):
    return [args[0], *args[1], *args[2]]


def made_net_cases() -> list[Case]:
    """made_mlp, made_affine_forward, pack_made and torch_degree_walk."""
    rng = random.Random(SEED + 3)
    name = _Namer("made_net")
    cases: list[Case] = []

    def fwd_build(
        n,
        d,
        hidden,
        c,
        dtype,
        act,
        sf,
        clamp,
        xl="contig",
        vals="randn",
        rows=None,
        mods=None,
        mlp=False,
    ):
        def build(g):
            ws, bs, _, _, cw = _made_net(g, d, hidden, c, rows, dtype)
            x = relayout(g, _values(g, (n, d), dtype, vals, 1.0), xl)
            ctx = torch.randn(n, c, generator=g).to(dtype) if c else None
            args = [x, ws, bs, act, ctx, cw]
            if mods:
                mods(g, args)
            if mlp:
                return args, {}
            return args, {"scale_fn": sf, "clamp": clamp}

        return build

    # ---- made_affine_forward: random
    for _ in range(28):
        n = rng.choice([0, 1, 2, 7, 16])
        d = rng.choice([1, 2, 3, 5, 9])
        hidden = rng.choice([(7,), (8, 5), (4, 6, 3)])
        c = rng.choice([0, 0, 3])
        dtype = rng.choice(FLOATS)
        act, sf = rng.choice(_ACTS), rng.choice(_SFS)
        clamp = rng.choice([3.0, 3.0, 1.0, 1e-3, 1e6])
        xl = rng.choice(["contig", "t", "T0", "bstride", "strided", "offset"])
        vals = rng.choices(["randn", "big", "nan", "inf", "zero"], [8, 1, 1, 1, 1])[0]
        rows = rng.choice([None, None, 3 * d])
        grad = rng.random() < 0.3 and vals == "randn" and dtype in (F32, F64) and n > 0
        desc = (
            f"fwd-{DNAME[dtype]}-n{n}-d{d}-h{'_'.join(map(str, hidden))}-c{c}-{act}-{sf}"
            f"-c{clamp:g}-{xl}-{vals}" + ("-rows3d" if rows else "") + ("-grad" if grad else "")
        )
        cases.append(
            Case(
                name(desc),
                M.made_affine_forward,
                build=fwd_build(n, d, hidden, c, dtype, act, sf, clamp, xl, vals, rows),
                grad=_grad_made_fwd if grad else None,
                tol=5.0,
            )
        )
    for c in (0, 3):
        for act in _ACTS:
            cases.append(
                Case(
                    name(f"autocast-fwd-f32-c{c}-{act}"),
                    M.made_affine_forward,
                    build=fwd_build(6, 4, (9, 7), c, F32, act, "softclamp", 3.0),
                    autocast=True,
                )
            )

    # ---- made_affine_forward: invalid arguments
    def m(fn):
        return lambda g, args: fn(args)

    def w0(fn):
        def f(args):
            args[1] = list(args[1])
            args[1][0] = fn(args[1][0])

        return f

    fwd_bad = {
        "W0_wider": w0(lambda w: torch.cat([w, w[:, :1]], 1)),
        "W0_narrower": w0(lambda w: w[:, :-1]),
        "W0_f64": w0(lambda w: w.double()),
        "W0_int": w0(lambda w: w.long()),
        "W0_meta": w0(lambda w: w.to("meta")),
        "W0_numpy": w0(lambda w: w.numpy()),
        "W0_None": w0(lambda w: None),
        "W0_rank3": w0(lambda w: w[None]),
        "Wout_2d-1_rows": lambda a: a.__setitem__(1, a[1][:-1] + [a[1][-1][:-1]]),
        "bias0_short": lambda a: a.__setitem__(2, [a[2][0][:-1]] + a[2][1:]),
        "bias_missing": lambda a: a.__setitem__(2, a[2][:-1]),
        "weights_empty": lambda a: a.__setitem__(1, []),
        "weights_None": lambda a: a.__setitem__(1, None),
        "x_rank3": lambda a: a.__setitem__(0, a[0][:, :, None]),
        "x_rank1": lambda a: a.__setitem__(0, a[0][0]),
        "x_int": lambda a: a.__setitem__(0, a[0].long()),
        "x_meta": lambda a: a.__setitem__(0, a[0].to("meta")),
        "x_wrong_D": lambda a: a.__setitem__(0, torch.cat([a[0], a[0][:, :1]], 1)),
        "x_list": lambda a: a.__setitem__(0, a[0].tolist()),
        "context_no_weight": lambda a: a.__setitem__(4, torch.ones(a[0].shape[0], 3)),
        "activation_gelu": lambda a: a.__setitem__(3, "gelu"),
        "activation_None": lambda a: a.__setitem__(3, None),
    }
    for k, f in fwd_bad.items():
        cases.append(
            Case(
                name(f"fwd-{k}"),
                M.made_affine_forward,
                build=fwd_build(4, 3, (8,), 0, F32, "relu", "softclamp", 3.0, mods=m(f)),
                reject=True,
            )
        )
    ctx_bad = {
        "context_shape": lambda a: a.__setitem__(4, a[4][:, :-1]),
        "context_batch": lambda a: a.__setitem__(4, a[4][:-1]),
        "context_f64": lambda a: a.__setitem__(4, a[4].double()),
        "context_weight_short": lambda a: a.__setitem__(5, a[5][:-1]),
        "context_weight_None": lambda a: a.__setitem__(5, None),
        "context_list": lambda a: a.__setitem__(4, a[4].tolist()),
    }
    for k, f in ctx_bad.items():
        cases.append(
            Case(
                name(f"fwd-{k}"),
                M.made_affine_forward,
                build=fwd_build(4, 3, (8,), 3, F32, "tanh", "softclamp", 3.0, mods=m(f)),
                reject=True,
            )
        )
    for k, kw in {
        "scale_fn_bad": {"scale_fn": "x"},
        "clamp_0": {"clamp": 0.0},
        "clamp_nan": {"clamp": NAN},
        "clamp_None": {"clamp": None},
    }.items():

        def build(g, kw=kw):
            args, kwargs = fwd_build(4, 3, (8,), 0, F32, "relu", "softclamp", 3.0)(g)
            return args, {**kwargs, **kw}

        cases.append(Case(name(f"fwd-{k}"), M.made_affine_forward, build=build, reject=True))

    # ---- made_mlp
    for _ in range(10):
        n, d = rng.choice([0, 1, 5]), rng.choice([1, 3, 6])
        hidden, c = rng.choice([(7,), (5, 4)]), rng.choice([0, 2])
        dtype, act = rng.choice(FLOATS), rng.choice(_ACTS)
        vals = rng.choice(["randn", "randn", "nan"])
        cases.append(
            Case(
                name(
                    f"mlp-{DNAME[dtype]}-n{n}-d{d}-h{'_'.join(map(str, hidden))}-c{c}-{act}-{vals}"
                ),
                M.made_mlp,
                build=fwd_build(n, d, hidden, c, dtype, act, None, None, vals=vals, mlp=True),
            )
        )
    for k in (
        "W0_wider",
        "W0_f64",
        "bias0_short",
        "bias_missing",
        "weights_None",
        "x_rank3",
        "x_int",
        "context_no_weight",
        "activation_gelu",
    ):
        cases.append(
            Case(
                name(f"mlp-{k}"),
                M.made_mlp,
                build=fwd_build(
                    4, 3, (8,), 0, F32, "relu", None, None, mods=m(fwd_bad[k]), mlp=True
                ),
                reject=True,
            )
        )
    for k in ("context_shape", "context_weight_short", "context_weight_None"):
        cases.append(
            Case(
                name(f"mlp-{k}"),
                M.made_mlp,
                build=fwd_build(
                    4, 3, (8,), 3, F32, "relu", None, None, mods=m(ctx_bad[k]), mlp=True
                ),
                reject=True,
            )
        )

    # ---- pack_made
    def pack_build(d, hidden, c, dtype, mods=None, masked=True):
        def build(g):
            ws, bs, in_deg, hd, cw = _made_net(g, d, hidden, c, None, dtype, masked)
            args = [ws, bs, in_deg, hd, cw]
            if mods:
                mods(g, args)
            return args, {}

        return build

    for d, hidden, c, dtype, masked in [
        (1, (4,), 0, F32, True),
        (3, (8,), 2, F64, False),
        (5, (6, 9), 0, BF16, True),
        (7, (3, 4, 5), 1, F16, False),
        (16, (33,), 0, F32, True),
    ]:
        cases.append(
            Case(
                name(f"pack-{DNAME[dtype]}-d{d}-h{'_'.join(map(str, hidden))}-c{c}"),
                M.pack_made,
                build=pack_build(d, hidden, c, dtype, masked=masked),
            )
        )

    def setarg(i, fn):
        return lambda a: a.__setitem__(i, fn(a[i]))

    pack_bad = {
        "in_deg_dup": setarg(2, lambda t: torch.tensor([1, 1, 2])),
        "in_deg_zero_based": setarg(2, lambda t: t - 1),
        "in_deg_empty": setarg(2, lambda t: t[:0]),
        "in_deg_short": setarg(2, lambda t: torch.tensor([1, 2])),
        "in_deg_list": setarg(2, lambda t: t.tolist()),
        "in_deg_None": setarg(2, lambda t: None),
        "hd_too_big": setarg(3, lambda hd: [torch.full_like(hd[0], 3)]),
        "hd_negative": setarg(3, lambda hd: [hd[0] - 5]),
        "hd_count": setarg(3, lambda hd: [hd[0][:-1]]),
        "hd_missing": setarg(3, lambda hd: []),
        "bias_missing": setarg(1, lambda bs: bs[:-1]),
        "bias0_short": setarg(1, lambda bs: [bs[0][:-1], bs[1]]),
        "bias_out_short": setarg(1, lambda bs: [bs[0], bs[1][:-1]]),
        "W0_wider": setarg(0, lambda ws: [torch.cat([ws[0], ws[0][:, :1]], 1), ws[1]]),
        "W0_narrower": setarg(0, lambda ws: [ws[0][:, :-1], ws[1]]),
        "Wout_2d-1_rows": setarg(0, lambda ws: [ws[0], ws[1][:-1]]),
        "Wout_wrong_H": setarg(0, lambda ws: [ws[0], ws[1][:, :-1]]),
        "weights_empty": setarg(0, lambda ws: []),
        "weights_numpy": setarg(0, lambda ws: [w.numpy() for w in ws]),
        "cw_short": setarg(4, lambda cw: torch.ones(7, 2)),
        "cw_list": setarg(4, lambda cw: [[1.0, 2.0]] * 8),
    }
    for k, f in pack_bad.items():
        cases.append(
            Case(
                name(f"pack-{k}"),
                M.pack_made,
                build=pack_build(3, (8,), 0, F32, mods=m(f)),
                reject=True,
            )
        )

    # ---- torch_degree_walk (a second reference): valid inputs against the naive loop
    for d, hidden, c, dtype, act, vals in [
        (1, (3,), 0, F64, "relu", "randn"),
        (4, (9, 6), 2, F32, "elu", "randn"),
        (7, (5,), 0, F64, "tanh", "zero"),
        (9, (8, 8), 1, BF16, "relu", "randn"),
    ]:

        def build(g, d=d, hidden=hidden, c=c, dtype=dtype, act=act, vals=vals):
            ws, bs, in_deg, hd, cw = _made_net(g, d, hidden, c, None, dtype)
            p = M.pack_made(ws, bs, in_deg, hd, cw)
            u = _values(g, (5, d), dtype, vals, 1.0)
            ctx = torch.randn(5, c, generator=g).to(dtype) if c else None
            return [u, p, ctx, act], {}

        cases.append(
            Case(
                name(f"walk-{DNAME[dtype]}-d{d}-c{c}-{act}-{vals}"),
                M.torch_degree_walk,
                build=build,
                ref=lambda a, k: M.reference_made_affine_inverse(*a, **k),
                tol=5.0,
            )
        )
    cases += _fused_layer_cases(name, rng)
    return cases


def _fused_layer_cases(name, rng) -> list[Case]:
    """mlp_affine_coupling and made_affine_density (whole layers as one op)."""
    cases: list[Case] = []

    def mlp_build(n, d, hidden, c, dtype, parity, sf, inverse, xl, vals, bad=None):
        def build(g):
            cut = d // 2
            da = cut if parity == 0 else d - cut
            lay = MC.mlp_layout((da + c, *hidden, 2 * (d - da)))
            p = (torch.randn(lay.numel, generator=g) * 0.3).to(dtype)
            x = relayout(g, _values(g, (n, d), dtype, vals, 1.0), xl)
            ctx = torch.randn(n, c, generator=g).to(dtype) if c else None
            if bad == "short_params":
                p = p[:-1]
            elif bad == "params_dtype":
                p = p.to(F64 if dtype != F64 else F32)
            elif bad == "ctx_rows":
                ctx = torch.randn(n + 1, c, generator=g).to(dtype)
            elif bad == "cut":
                cut = d
            elif bad == "layout":
                lay = MC.mlp_layout((da + c + 1, *hidden, 2 * (d - da)))
                p = torch.randn(lay.numel, generator=g).to(dtype)
            return [x, p, lay, cut, parity, ctx], {"scale_fn": sf, "inverse": inverse}

        return build

    for _ in range(24):
        n = rng.choice([0, 1, 3, 17])
        d = rng.choice([2, 3, 5, 16])
        hidden = rng.choice([(), (7,), (8, 5)])
        c = rng.choice([0, 0, 2])
        dtype = rng.choice(FLOATS)
        parity, inverse = rng.choice([0, 1]), rng.random() < 0.4
        sf = rng.choice(_SFS)
        xl = rng.choice(["contig", "t", "strided", "offset"])
        vals = rng.choices(["randn", "big", "nan", "zero"], [8, 1, 1, 1])[0]
        grad = not inverse and vals == "randn" and dtype in (F32, F64) and n > 0
        desc = (
            f"mlpc-{DNAME[dtype]}-n{n}-d{d}-h{'_'.join(map(str, hidden)) or '0'}-c{c}-p{parity}"
            f"-{sf}-{'inv' if inverse else 'fwd'}-{xl}-{vals}" + ("-grad" if grad else "")
        )
        build = mlp_build(n, d, hidden, c, dtype, parity, sf, inverse, xl, vals)
        cases.append(
            Case(
                name(desc), MC.mlp_affine_coupling, build=build,
                grad=_grad_args(0, 1) if grad else None, tol=5.0,
            )
        )  # fmt: skip
    for bad in ("short_params", "params_dtype", "ctx_rows", "cut", "layout"):
        build = mlp_build(4, 4, (6,), 2, F32, 0, "softclamp", False, "contig", "randn", bad)
        case = Case(name(f"mlpc-bad-{bad}"), MC.mlp_affine_coupling, build=build, reject=True)
        cases.append(case)

    def dens_build(n, d, hidden, c, dtype, act, sf, xl, vals, bad=None):
        def build(g):
            ws, bs, _, _, cw = _made_net(g, d, hidden, c, None, dtype)
            ts = [*ws, *bs] + ([cw] if cw is not None else [])
            params = torch.cat([t.detach().flatten() for t in ts])
            w_lay, b_lay, off = [], [], 0
            for w in ws:
                w_lay.append((off, w.shape[0], w.shape[1]))
                off += w.numel()
            for b in bs:
                b_lay.append((off, b.shape[0]))
                off += b.numel()
            c_lay = None if cw is None else (off, cw.shape[0], cw.shape[1])
            lay = MD.MADELayout(tuple(w_lay), tuple(b_lay), c_lay)
            masks = [(w != 0).to(dtype) for w in ws]
            x = relayout(g, _values(g, (n, d), dtype, vals, 1.0), xl)
            ctx = torch.randn(n, c, generator=g).to(dtype) if c else None
            if bad == "short_params":
                params = params[:-1]
            elif bad == "mask_shape":
                masks[0] = masks[0][:, :-1]
            elif bad == "mask_count":
                masks = masks[:-1]
            elif bad == "x_width":
                x = torch.randn(n, d + 1, generator=g).to(dtype)
            return [x, params, lay, masks, act, ctx], {"scale_fn": sf}

        return build

    for _ in range(16):
        n = rng.choice([0, 1, 3, 17])
        d = rng.choice([1, 2, 5, 9])
        hidden = rng.choice([(7,), (8, 5)])
        c = rng.choice([0, 0, 3])
        dtype = rng.choice(FLOATS)
        act, sf = rng.choice(_ACTS), rng.choice(_SFS)
        xl = rng.choice(["contig", "t", "strided", "offset"])
        vals = rng.choices(["randn", "big", "nan", "zero"], [8, 1, 1, 1])[0]
        grad = vals == "randn" and dtype in (F32, F64) and n > 0
        desc = (
            f"dens-{DNAME[dtype]}-n{n}-d{d}-h{'_'.join(map(str, hidden))}-c{c}-{act}-{sf}-{xl}"
            f"-{vals}" + ("-grad" if grad else "")
        )
        build = dens_build(n, d, hidden, c, dtype, act, sf, xl, vals)
        cases.append(
            Case(
                name(desc), MD.made_affine_density, build=build,
                grad=_grad_args(0, 1) if grad else None, tol=5.0,
            )
        )  # fmt: skip
    for bad in ("short_params", "mask_shape", "mask_count", "x_width"):
        build = dens_build(4, 3, (6,), 2, F32, "relu", "softclamp", "contig", "randn", bad)
        cases.append(
            Case(name(f"dens-bad-{bad}"), MD.made_affine_density, build=build, reject=True)
        )
    cases.append(
        Case(
            name("dens-autocast-f32-c3"), MD.made_affine_density,
            build=dens_build(6, 4, (9, 7), 3, F32, "relu", "softclamp", "contig", "randn"),
            autocast=True,
        )
    )  # fmt: skip
    return cases


def _inverse_of_packed(u, weights, biases, in_deg, hidden_deg, cw, context, **kwargs):
    """made_affine_inverse of pack_made(...): gradients in original coordinates, where the masks
    (applied by pack_made) zero the masked-out entries. (With respect to the packed weights, the
    masked-out entries' gradients are not defined by the model: the naive loop and the walk's
    implicit-function rule differ there.)"""
    packed = M.pack_made(weights, biases, in_deg, hidden_deg, cw)
    return M.made_affine_inverse(u, packed, context, **kwargs)


def _grad_made_inv(args, kwargs):
    out = [args[0], *args[1], *args[2]]
    if args[5] is not None:
        out += [args[5], args[6]]
    return out


def _walk_ref(args, kwargs):
    """The degree walk in torch: the oracle where non-finite values occur. The naive loop runs
    the full network with zeros for the inputs not yet computed, so its masked-out (zero)
    weights turn inf/NaN inputs into NaN everywhere (0 * NaN); the walk, like the kernels, reads
    only the prefixes the masks allow."""
    return M.torch_degree_walk(*args, **kwargs)


def _inv_build(
    n,
    d,
    hidden,
    c,
    dtype,
    act="relu",
    sf="softclamp",
    clamp=3.0,
    ul="contig",
    vals="randn",
    wdtype=None,
    mods=None,
    u_scale=1.0,
    unpacked=False,
):
    def build(g):
        ws, bs, in_deg, hd, cw = _made_net(g, d, hidden, c, None, F64)
        wd = wdtype or dtype
        if unpacked:  # for _inverse_of_packed
            u = _values(g, (n, d), dtype, vals, u_scale)
            ctx = torch.randn(n, c, generator=g, dtype=F64).to(dtype) if c else None
            cast = [w.to(wd) for w in ws], [b.to(wd) for b in bs]
            cw = None if cw is None else cw.to(wd)
            return [u, *cast, in_deg, hd, cw, ctx], {
                "activation": act,
                "scale_fn": sf,
                "clamp": clamp,
            }
        p = M.pack_made(ws, bs, in_deg, hd, cw)
        p = p._replace(
            weights=[w.to(wd) for w in p.weights],
            biases=[b.to(wd) for b in p.biases],
            context_weight=None if p.context_weight is None else p.context_weight.to(wd),
        )
        u = relayout(g, _values(g, (n, d), dtype, vals, u_scale), ul)
        ctx = torch.randn(n, c, generator=g, dtype=F64).to(dtype) if c else None
        args = [u, p, ctx]
        kwargs = {"activation": act, "scale_fn": sf, "clamp": clamp}
        if mods:
            mods(g, args, kwargs)
        return args, kwargs

    return build


def made_inverse_cases() -> list[Case]:
    rng = random.Random(SEED + 4)
    name = _Namer("made_inverse")
    cases: list[Case] = []

    for _ in range(36):
        n = rng.choice([0, 1, 3, 10, 33])
        d = rng.choice([1, 2, 3, 4, 7, 16, 33])
        hidden = rng.choice([(5,), (9,), (8, 6), (4, 7, 5)])
        c = rng.choice([0, 0, 2])
        dtype = rng.choice(FLOATS)
        wdtype = rng.choice([None, None, F64, F32])
        act, sf = rng.choice(_ACTS), rng.choice(_SFS)
        clamp = rng.choice([3.0, 3.0, 1.0, 1e-3, 1e6])
        ul = rng.choice(["contig", "t", "T0", "bstride", "strided", "offset", "expand"])
        vals = rng.choices(["randn", "big", "nan", "inf", "zero", "tiny"], [8, 1, 1, 1, 1, 1])[0]
        grad = (
            rng.random() < 0.3
            and vals == "randn"
            and dtype in (F32, F64)
            and n > 0
            and wdtype in (None, dtype)
            and d <= 16
        )
        nonfinite = vals in ("nan", "inf", "big")
        # exp(s) over D sequential steps amplifies rounding: a looser tolerance for deep walks
        tol = 10.0 * (1 + d / 4) if dtype != F64 else 1e3
        desc = (
            f"{DNAME[dtype]}-n{n}-d{d}-h{'_'.join(map(str, hidden))}-c{c}-{act}-{sf}-"
            f"c{clamp:g}-{ul}-{vals}"
            + (f"-w{DNAME[wdtype]}" if wdtype else "")
            + ("-grad" if grad else "")
        )
        if grad:
            cases.append(
                Case(
                    name(desc),
                    _inverse_of_packed,
                    grad=_grad_made_inv,
                    tol=tol,
                    build=_inv_build(
                        n, d, hidden, c, dtype, act, sf, clamp, vals=vals, unpacked=True
                    ),
                )
            )
            continue
        cases.append(
            Case(
                name(desc),
                M.made_affine_inverse,
                build=_inv_build(n, d, hidden, c, dtype, act, sf, clamp, ul, vals, wdtype),
                ref=_walk_ref if nonfinite else None,
                tol=tol,
            )
        )
    # NaN / inf in one sample's first input in autoregressive order (every later input depends
    # on it through the hidden units), every activation; the naive loop and the walk agree here
    for act in _ACTS:
        for vals in ("nan", "inf", "-inf"):

            def one(g, args, kwargs, v=float(vals)):
                args[0] = args[0].clone()
                args[0][1, args[1].order[0]] = v

            for ref in (None, _walk_ref) if vals == "nan" else (_walk_ref,):
                cases.append(
                    Case(
                        name(f"first_{vals}-{act}" + ("-walk" if ref else "")),
                        M.made_affine_inverse,
                        ref=ref,
                        tol=10.0,
                        build=_inv_build(3, 5, (9, 17), 0, F32, act, mods=one),
                    )
                )
    # gradients
    for d, hidden, c, dtype, act, sf in [
        (3, (7,), 0, F64, "relu", "softclamp"),
        (5, (6, 8), 2, F64, "tanh", "glow"),
        (4, (9,), 1, F32, "elu", "identity"),
        (1, (3,), 0, F64, "tanh", "softclamp"),
    ]:
        cases.append(
            Case(
                name(f"grad-{DNAME[dtype]}-d{d}-c{c}-{act}-{sf}"),
                _inverse_of_packed,
                build=_inv_build(6, d, hidden, c, dtype, act, sf, unpacked=True),
                grad=_grad_made_inv,
                tol=1e3 if dtype == F64 else 20.0,
            )
        )
    # 16-bit data with a 16-bit MADE (e.g. a module converted with .to(torch.bfloat16))
    for dtype in (BF16, F16):
        for c in (0, 2):
            cases.append(
                Case(
                    name(f"{DNAME[dtype]}_weights-c{c}"),
                    M.made_affine_inverse,
                    build=_inv_build(5, 4, (8,), c, dtype),
                    tol=10.0,
                )
            )
    # under bf16 autocast, with and without context
    for c in (0, 3):
        for act in _ACTS:
            cases.append(
                Case(
                    name(f"autocast-f32-c{c}-{act}"),
                    M.made_affine_inverse,
                    build=_inv_build(6, 4, (9, 7), c, F32, act),
                    autocast=True,
                )
            )
    # extreme clamps
    for clamp in (1e-30, 1e30, 5e-324):
        cases.append(
            Case(
                name(f"clamp{clamp:g}"),
                M.made_affine_inverse,
                build=_inv_build(4, 3, (6,), 0, F64, clamp=clamp, u_scale=3.0),
            )
        )

    # invalid arguments and hand-built PackedMADEs
    def edit(fn):
        def mods(g, args, kwargs):
            fn(args, kwargs)

        return mods

    def pk(**fields):
        """Replace fields of the PackedMADE: each value is a function of the old field."""

        def f(args, kwargs):
            p = args[1]
            args[1] = p._replace(**{k: v(getattr(p, k)) for k, v in fields.items()})

        return f

    def first(fn):
        return lambda ts: [fn(ts[0]), *ts[1:]]

    def last(fn):
        return lambda ts: [*ts[:-1], fn(ts[-1])]

    def bounds(fn):
        def f(args, kwargs):
            p = args[1]
            b = fn(p.bounds.clone())
            args[1] = p._replace(bounds=b, bounds_list=b.flatten().tolist())

        return f

    inv_bad = {  # (edit, context features)
        "cw_short": (pk(context_weight=lambda cw: cw[:-1]), 2),
        "cw_narrow": (pk(context_weight=lambda cw: cw[:, :-1]), 2),
        "cw_1d": (pk(context_weight=lambda cw: cw[:, 0]), 2),
        "W0_narrower": (pk(weights=first(lambda w: w[:, :-1])), 0),
        "W0_wider": (pk(weights=first(lambda w: torch.cat([w, w[:, :1]], 1))), 0),
        "W0_fewer_rows": (pk(weights=first(lambda w: w[:-1])), 0),
        "bias0_short": (pk(biases=first(lambda b: b[:-1])), 0),
        "bias_out_short": (pk(biases=last(lambda b: b[:-1])), 0),
        "Wout_2d-1_rows": (pk(weights=last(lambda w: w[:-1]), biases=last(lambda b: b[:-1])), 0),
        "Wout_1_row": (pk(weights=last(lambda w: w[:1]), biases=last(lambda b: b[:1])), 0),
        "Wout_narrower": (pk(weights=last(lambda w: w[:, :-1])), 0),
        "weights_missing": (pk(weights=lambda ws: ws[:-1]), 0),
        "biases_missing": (pk(biases=lambda bs: bs[:-1]), 0),
        "W_int": (pk(weights=first(lambda w: w.long())), 0),
        "W_meta": (pk(weights=first(lambda w: w.to("meta"))), 0),
        "W_None": (pk(weights=first(lambda w: None)), 0),
        "order_out_of_range": (pk(order=lambda o: o + 1), 0),
        "order_duplicate": (pk(order=lambda o: torch.zeros_like(o)), 0),
        "order_float": (pk(order=lambda o: o.float()), 0),
        "order_long": (pk(order=lambda o: torch.cat([o, o[:1]])), 0),
        "order_list": (pk(order=lambda o: o.tolist()), 0),
        "bounds_too_big": (bounds(lambda b: b + 5), 0),
        "bounds_decreasing": (bounds(lambda b: b.flip(1)), 0),
        "bounds_negative": (bounds(lambda b: b - 100), 0),
        "bounds_short": (bounds(lambda b: b[:, :-1]), 0),
        "bounds_list_short": (pk(bounds_list=lambda bl: bl[:-2]), 0),
        "bounds_list_mismatch": (pk(bounds_list=lambda bl: [0] * len(bl)), 0),
        "packed_None": (lambda a, k: a.__setitem__(1, None), 0),
        "packed_tuple": (lambda a, k: a.__setitem__(1, tuple(a[1])[:3]), 0),
        "u_rank3": (lambda a, k: a.__setitem__(0, a[0][:, :, None]), 0),
        "u_rank1": (lambda a, k: a.__setitem__(0, a[0][0]), 0),
        "u_wrong_D": (lambda a, k: a.__setitem__(0, a[0][:, :-1]), 0),
        "u_int": (lambda a, k: a.__setitem__(0, a[0].long()), 0),
        "u_None": (lambda a, k: a.__setitem__(0, None), 0),
        "u_numpy": (lambda a, k: a.__setitem__(0, a[0].numpy()), 0),
        "u_meta": (lambda a, k: a.__setitem__(0, a[0].to("meta")), 0),
        "context_missing": (lambda a, k: a.__setitem__(2, None), 2),
        "context_extra": (lambda a, k: a.__setitem__(2, torch.ones(a[0].shape[0], 2)), 0),
        "context_shape": (lambda a, k: a.__setitem__(2, a[2][:, :1]), 2),
        "context_batch": (lambda a, k: a.__setitem__(2, a[2][:-1]), 2),
        "context_list": (lambda a, k: a.__setitem__(2, a[2].tolist()), 2),
        "context_meta": (lambda a, k: a.__setitem__(2, a[2].to("meta")), 2),
        "activation_gelu": (lambda a, k: k.update(activation="gelu"), 0),
        "scale_fn_x": (lambda a, k: k.update(scale_fn="x"), 0),
        "clamp_0": (lambda a, k: k.update(clamp=0.0), 0),
        "clamp_inf": (lambda a, k: k.update(clamp=INF), 0),
    }
    for k, (f, c) in inv_bad.items():
        cases.append(
            Case(
                name(k),
                M.made_affine_inverse,
                build=_inv_build(4, 3, (8,), c, F32, mods=edit(f)),
                reject=True,
            )
        )
    # valid variations of the inputs
    inv_ok = {
        "context_f64": (lambda a, k: a.__setitem__(2, a[2].double()), 2),
        "context_int": (lambda a, k: a.__setitem__(2, a[2].long()), 2),
        "order_i32": (pk(order=lambda o: o.int()), 0),
        "weights_noncontig": (pk(weights=first(lambda w: w.t().contiguous().t())), 0),
        "weights_nan": (pk(weights=last(lambda w: w.index_fill(0, torch.tensor([1]), NAN))), 0),
    }
    for k, (f, c) in inv_ok.items():
        cases.append(
            Case(
                name(k),
                M.made_affine_inverse,
                tol=10.0,
                ref=_walk_ref if k == "weights_nan" else None,
                build=_inv_build(4, 3, (8,), c, F32, mods=edit(f)),
            )
        )
    return cases


# ---- spline -----------------------------------------------------------------------------------


def spline_cases() -> list[Case]:
    """The rational-quadratic spline ops: random shapes, bins, dtypes, layouts and values
    (tails, non-finite, huge parameters), gradients, and invalid arguments."""
    from fastflow.ops import spline as S

    rng = random.Random(SEED + 5)
    name = _Namer("spline")
    ops = {"fwd": S.rq_spline, "inv": S.rq_spline_inverse}
    cases: list[Case] = []
    shapes = [(3, 4), (1, 1), (0, 3), (2, 3, 5), (5, 17), (4, 0)]
    for i in range(24):
        op = ("fwd", "inv")[i % 2]
        shape, k = rng.choice(shapes), rng.choice([1, 2, 5, 8, 70])
        dtype = rng.choice(FLOATS)
        xv = rng.choices(["randn", "big", "tiny", "zero", "nan", "inf"], [6, 2, 1, 1, 1, 1])[0]
        pv = rng.choices(["randn", "big", "zero"], [6, 1, 1])[0]
        lay = [rng.choice(_layouts_for(shape)), "contig", "contig", "contig"]
        bound = rng.choice([3.0, 3.0, 1.0, 0.5])
        specs = [Spec(shape, dtype, xv, lay[0], 2.0)]
        specs += [Spec(shape + (k,), dtype, pv), Spec(shape + (k,), dtype, pv)]
        specs += [Spec(shape + (k - 1,), dtype, pv)]
        desc = f"{op}-{DNAME[dtype]}-{_shape_str(shape)}-K{k}-{lay[0]}-{xv}/{pv}-B{bound:g}"
        cases.append(Case(name(desc), ops[op], specs, {"bound": bound}))
    for op in ("fwd", "inv"):  # gradients in fp64
        specs = [Spec((3, 4), F64, "randn", "contig", 2.0)]
        specs += [Spec((3, 4, 6), F64), Spec((3, 4, 6), F64), Spec((3, 4, 5), F64)]
        cases.append(Case(name(f"{op}-grad"), ops[op], specs, grad=_grad_args(0, 1, 2, 3)))
    bad = [  # invalid by the contract: ValueError / TypeError naming the argument
        ("heights-bins", [Spec((3, 4)), Spec((3, 4, 6)), Spec((3, 4, 5)), Spec((3, 4, 5))], {}),
        ("deriv-count", [Spec((3, 4)), Spec((3, 4, 6)), Spec((3, 4, 6)), Spec((3, 4, 6))], {}),
        (
            "int-x",
            [Spec((3, 4), torch.int64), Spec((3, 4, 2)), Spec((3, 4, 2)), Spec((3, 4, 1))],
            {},
        ),
        ("mixed-dtype", [Spec((3, 4), F64), Spec((3, 4, 2)), Spec((3, 4, 2)), Spec((3, 4, 1))], {}),
        (
            "bound",
            [Spec((3, 4)), Spec((3, 4, 2)), Spec((3, 4, 2)), Spec((3, 4, 1))],
            {"bound": -1.0},
        ),
        (
            "min-width",
            [Spec((3, 4)), Spec((3, 4, 2)), Spec((3, 4, 2)), Spec((3, 4, 1))],
            {"min_bin_width": 0.9},
        ),
        ("meta", [meta((3, 4)), Spec((3, 4, 2)), Spec((3, 4, 2)), Spec((3, 4, 1))], {}),
        ("list", [pylist((3, 4)), Spec((3, 4, 2)), Spec((3, 4, 2)), Spec((3, 4, 1))], {}),
    ]
    for op in ("fwd", "inv"):
        for desc, args, kw in bad:
            cases.append(Case(name(f"{op}-bad-{desc}"), ops[op], args, kw, reject=True))
    cases += _spline_walk_cases(rng)
    return cases


def _spline_walk_build(n, d, hidden, k, c, dtype, values, act, bad=None):
    """made_spline_inverse of a random spline MADE (the native walk without gradients; the
    reference backend runs the PyTorch walk)."""
    from fastflow.ops import made_spline as MS

    def build(g):
        p = 3 * k - 1
        ws, bs, in_deg, hd, cw = _made_net(g, d, hidden, c, rows=p * d, dtype=dtype)
        packed = MS.pack_spline_made(ws, bs, in_deg, hd, p, cw)
        if bad == "bounds":
            packed = packed._replace(bounds_list=[0] * len(packed.bounds_list))
        elif bad == "out-weight":
            packed = packed._replace(out_weight=packed.out_weight[:, :-1])
        u = _values(g, (n, d), dtype, values, 2.0)
        ctx = torch.randn(n, c, generator=g, dtype=F64).to(dtype) if c else None
        return [u, packed, k, ctx, act], {}

    return build


def _spline_walk_cases(rng) -> list[Case]:
    from fastflow.ops import made_spline as MS

    name = _Namer("spline-walk")
    cases = []
    for _ in range(10):
        n, d = rng.choice([(0, 3), (1, 1), (5, 4), (33, 6), (70, 2)])
        hidden = rng.choice([[8], [6, 9], [16, 16, 16]])
        k, c = rng.choice([2, 3, 8]), rng.choice([0, 0, 2])
        dtype, act = rng.choice([F32, F64]), rng.choice(_ACTS)
        vals = rng.choices(["randn", "big", "zero", "nan", "inf"], [6, 2, 1, 1, 1])[0]
        desc = f"{DNAME[dtype]}-n{n}-d{d}-h{len(hidden)}-K{k}-c{c}-{act}-{vals}"
        build = _spline_walk_build(n, d, hidden, k, c, dtype, vals, act)
        cases.append(Case(name(desc), MS.made_spline_inverse, build=build))
    for bad in ("bounds", "out-weight"):
        build = _spline_walk_build(4, 3, [8], 3, 0, F32, "randn", "relu", bad)
        cases.append(Case(name(f"bad-{bad}"), MS.made_spline_inverse, build=build, reject=True))
    return cases


# ---- conv: narrow 3x3 convolutions, the 3-1-3 conditioner nodes, their native tap kernels ------


def _conv313_plain(x, w1, b1, w2, b2, w3, b3):
    return CV._conv_mlp3_plain(x, w1, b1, w2, b2, w3, b3)


def _conv_build(n, ci, h, w, hid, co, dtype, layout, vals, net):
    """x and the 3-1-3 parameters (or a single 3x3 layer's weight and bias when not ``net``)."""

    def build(g):
        x = relayout(g, _values(g, (n, ci, h, w), dtype, vals, 1.0), layout)
        if not net:
            return [x, _values(g, (co, ci, 3, 3), dtype, "randn", 0.2),
                    _values(g, (co,), dtype, "randn", 1.0)], {}  # fmt: skip
        shapes = [(hid, ci, 3, 3), (hid,), (hid, hid, 1, 1), (hid,), (co, hid, 3, 3), (co,)]
        return [x] + [_values(g, sh, dtype, "randn", 0.3) for sh in shapes], {}

    return build


def _conv_ref(args, kwargs):
    x, *p = args
    if len(p) == 2:
        return torch.nn.functional.conv2d(x, p[0], p[1], padding=1)
    return _conv313_plain(x, *p)


def conv_cases() -> list[Case]:
    """conv3x3 (tap form above 4096 pixels, native tap sum/shift), conv_mlp3 and conv_net3 on
    random narrow shapes, layouts and values, against F.conv2d / the plain 3-1-3 layers (values
    and gradients: the oracle is run with autograd by the harness's reference pass)."""
    rng = random.Random(SEED ^ 0xC0)
    name = _Namer("conv")
    cases = []
    ops = {"conv3x3": CV.conv3x3, "mlp3": CV.conv_mlp3, "net3": CV.conv_net3}
    for _ in range(24):
        op = rng.choice(list(ops))
        n, h, w = rng.choice(
            [(0, 4, 4), (1, 1, 1), (3, 2, 5), (2, 7, 3), (17, 16, 16), (5, 30, 31)]
        )
        ci, co, hid = rng.choice([1, 2, 3, 6]), rng.choice([1, 2, 4, 8, 12]), rng.choice([4, 9])
        dtype = rng.choice([F32, F32, F64])
        layout = rng.choice(["contig", "chlast", "strided", "offset"])
        vals = rng.choices(["randn", "big", "zero", "nan", "inf"], [6, 1, 1, 1, 1])[0]
        desc = f"{op}-{DNAME[dtype]}-{n}x{ci}x{h}x{w}-h{hid}-o{co}-{layout}-{vals}"
        build = _conv_build(n, ci, h, w, hid, co, dtype, layout, vals, op != "conv3x3")
        k = 3 if op == "conv3x3" else 7
        cases.append(Case(name(desc), ops[op], build=build, grad=_grad_args(*range(k)), tol=5.0))

    # conv_mlp3's torch.library forward (what a compiled conditioner calls), called directly,
    # against the plain layers
    def mlp3_fwd_op(x, *p):
        return CV._image_of_rows(torch.ops.fastflow.conv_mlp3_fwd(x, *p)[0], x)

    for n, ci, h, w, hid, co, dtype, layout in [
        (3, 2, 5, 4, 9, 4, F32, "strided"), (1, 6, 1, 1, 4, 12, F64, "contig"),
        (17, 3, 16, 16, 9, 8, F32, "chlast"), (0, 2, 4, 4, 4, 2, F32, "contig"),
    ]:  # fmt: skip
        build = _conv_build(n, ci, h, w, hid, co, dtype, layout, "randn", True)
        desc = f"mlp3-op-{DNAME[dtype]}-{n}x{ci}x{h}x{w}-h{hid}-o{co}-{layout}"
        cases.append(Case(name(desc), mlp3_fwd_op, build=build, ref=_conv_ref, tol=5.0))
    # the oracle itself on two cases (independent of the slice fallback the reference backend uses)
    for op in ("conv3x3", "net3"):
        build = _conv_build(17, 3, 16, 16, 9, 4, F64, "chlast", "randn", op != "conv3x3")
        cases.append(Case(name(f"{op}-oracle"), ops[op], build=build, ref=_conv_ref))
    bad = [
        ("x-3d", CV.conv3x3, lambda g: ([torch.randn(2, 4, 4), torch.randn(2, 2, 3, 3)], {})),
        ("w-5x5", CV.conv3x3, lambda g: ([torch.randn(1, 2, 4, 4), torch.randn(2, 2, 5, 5)], {})),
        (
            "bias",
            CV.conv3x3,
            lambda g: ([torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), torch.randn(2)], {}),
        ),  # fmt: skip
        (
            "mlp3-dtype",
            CV.conv_mlp3,
            _conv_build(2, 2, 4, 4, 4, 2, F32, "contig", "randn", True),
        ),  # fmt: skip
    ]

    def mlp3_bwd_args(bad: str):
        def build(g):
            x, *p = _conv_build(2, 2, 4, 4, 4, 2, F32, "contig", "randn", True)(g)[0]
            out, x9, h1, h2 = torch.ops.fastflow.conv_mlp3_fwd(x, *p)
            saved = {"g": torch.ones_like(out), "x9": x9, "h1": h1, "h2": h2}
            saved[bad] = {"g": saved["g"][:-1], "x9": x9.double(), "h1": h1.t().contiguous().t(),
                          "h2": h2[:, :2]}[bad]  # fmt: skip
            return [saved["g"], x, p[0], p[2], p[4], saved["x9"], saved["h1"], saved["h2"]], {}

        return build

    bad += [
        ("mlp3-op-x-3d", torch.ops.fastflow.conv_mlp3_fwd,
         lambda g: ([torch.randn(2, 4, 4)] + _conv_build(1, 2, 4, 4, 4, 2, F32, "contig",
                                                         "randn", True)(g)[0][1:], {})),
    ] + [
        (f"mlp3-bwd-op-{k}", torch.ops.fastflow.conv_mlp3_bwd, mlp3_bwd_args(k))
        for k in ("g", "x9", "h1", "h2")
    ]  # fmt: skip
    for desc, op, build in bad:
        if desc == "mlp3-dtype":
            inner = build

            def build(g, inner=inner):  # w2 in fp64 against fp32 x
                args, kw = inner(g)
                args[3] = args[3].double()
                return args, kw

        cases.append(Case(name(f"bad-{desc}"), op, build=build, reject=True))
    return cases


_BUILDERS = {
    "coupling": coupling_cases,
    "invconv": invconv_cases,
    "made_net": made_net_cases,
    "made_inverse": made_inverse_cases,
    "spline": spline_cases,
    "conv": conv_cases,
}


def build_cases(family: str) -> list[Case]:
    return _BUILDERS[family]()


# ----------------------------------------------------------------------------------------------
# Running one case


def _walk(obj) -> list:
    if isinstance(obj, (list, tuple)):
        return [x for o in obj for x in _walk(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _walk(o)]
    return [obj]


def _snapshot(args, kwargs) -> list:
    out = []
    for t in _walk([args, kwargs]):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            out.append((t, t.detach().clone()))
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _loss(out, loss_on: tuple | None) -> torch.Tensor:
    """A fixed random linear functional of the floating outputs (those in ``loss_on``)."""
    total = torch.zeros((), dtype=F64)
    for i, t in enumerate(_walk(out)):
        if loss_on is not None and i not in loss_on:
            continue
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
            w = torch.randn(t.shape, generator=torch.Generator().manual_seed(1000 + i), dtype=F64)
            total = total + (t.double() * w).sum()
    return total


def _call(case: Case, ctx) -> tuple[Any, list | None, list]:
    args, kwargs = case.inputs()
    leaves = case.grad(args, kwargs) if case.grad else []
    for t in leaves:
        t.requires_grad_(True)
    snap = _snapshot(args, kwargs)
    with ctx():
        out = case.op(*args, **kwargs)
    return out, leaves, snap


def _grads(out, leaves, loss_on) -> list:
    loss = _loss(out, loss_on)
    if not loss.requires_grad:
        return [None] * len(leaves)
    return list(torch.autograd.grad(loss, leaves, allow_unused=True))


def _err(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _compare(what: str, a: Any, r: Any, tol: tuple[float, float]) -> str | None:
    if r is SKIP:
        return None
    if isinstance(r, torch.Tensor):
        if not isinstance(a, torch.Tensor):
            return f"{what}: got {type(a).__name__}, reference gives a tensor"
        if a.shape != r.shape or a.dtype != r.dtype:
            return f"{what}: got {a.dtype} {tuple(a.shape)}, reference {r.dtype} {tuple(r.shape)}"
        if a.device != r.device:
            return f"{what}: on {a.device}, reference on {r.device}"
        if not r.is_floating_point():
            return None if torch.equal(a, r) else f"{what}: differs from the reference"
        a64, r64 = a.detach().double(), r.detach().double()
        an, rn = a64.isnan(), r64.isnan()
        if bool((rn & ~an).any()):
            k = int((rn & ~an).sum())
            return f"{what}: finite/inf at {k} position(s) where the reference is NaN"
        if bool((an & ~rn).any()):
            k = int((an & ~rn).sum())
            return f"{what}: NaN at {k} position(s) where the reference is not NaN"
        ri = r64.isinf()
        if bool((ri & (a64 != r64)).any()):
            return f"{what}: differs at positions where the reference is +-inf"
        fin = ~(rn | ri)
        if not bool(fin.any()):
            return None
        rtol, atol = tol
        rf, af = r64[fin], a64[fin]
        scale = max(1.0, float(rf.abs().max()))
        err = (af - rf).abs()
        bad = ~(err <= atol * scale + rtol * rf.abs())
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            return (
                f"{what}: {int(bad.sum())}/{rf.numel()} values off (e.g. {float(af[j]):.6g} "
                f"vs reference {float(rf[j]):.6g}; max abs err {float(err.max()):.3g})"
            )
        return None
    if r is None or isinstance(r, (bool, int, float, str)):
        return None if a == r or (a != a and r != r) else f"{what}: {a!r} != reference {r!r}"
    return None


def _tol(t: Any, case: Case) -> tuple[float, float]:
    """Tolerance for comparing ``t``: ``case.tol`` scales the accumulation (fp32/fp64) part;
    16-bit results add one rounding of their own dtype."""
    dt = t.dtype if isinstance(t, torch.Tensor) and t.dtype in TOL else F32
    if case.autocast:
        return AUTOCAST_TOL
    if dt in (F32, F64):
        rtol, atol = TOL[dt]
        return rtol * case.tol, atol * case.tol
    return TOL[dt][0] + TOL[F32][0] * case.tol, TOL[dt][1] + TOL[F32][1] * case.tol


def run_case(case: Case) -> tuple[str | None, str]:
    """(failure message or None, outcome) for one case on the native backend."""
    ctx = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if case.autocast
        else (contextlib.nullcontext)
    )
    fastflow.set_backend("native")
    try:
        out, leaves, snap = _call(case, ctx)
    except (ValueError, TypeError) as e:
        return None, "rejected: " + _err(e)
    except Exception as e:
        return f"raised {_err(e)}", "error"
    for i, (t, before) in enumerate(snap):
        if not _same(t.detach(), before):
            return f"modified its input tensor #{i}", "mutated"
    if case.reject:
        return "accepted an invalid input (expected ValueError or TypeError)", "accepted"
    grads = None
    if leaves:
        try:
            grads = _grads(out, leaves, case.loss_on)
        except Exception as e:
            return f"backward raised {_err(e)}", "error"

    # the expectation: an independent oracle, or the op on the reference backend
    try:
        if case.ref is not None:
            args, kwargs = case.inputs()
            ref, ref_grads = case.ref(args, kwargs), None
        else:
            fastflow.set_backend("reference")
            try:
                r_out, r_leaves, _ = _call(case, ctx)
                ref_grads = _grads(r_out, r_leaves, case.loss_on) if r_leaves else None
            finally:
                fastflow.set_backend("native")
            ref = r_out
    except Exception as e:
        return f"returned, but the reference raised {_err(e)} (input not rejected)", "ref-error"

    a_leaves, r_leaves_ = _walk(out), _walk(ref)
    if len(a_leaves) != len(r_leaves_):
        return f"returned {len(a_leaves)} values, the reference {len(r_leaves_)}", "mismatch"
    for i, (a, r) in enumerate(zip(a_leaves, r_leaves_)):
        msg = _compare(f"output[{i}]", a, r, _tol(r, case))
        if msg:
            return msg, "mismatch"
    if grads is not None and ref_grads is not None:
        for i, (a, r, leaf) in enumerate(zip(grads, ref_grads, leaves)):
            a = torch.zeros_like(leaf) if a is None else a
            r = torch.zeros_like(leaf) if r is None else r
            msg = _compare(f"grad[{i}]", a, r, _tol(leaf, case))
            if msg:
                return msg, "mismatch"
    return None, "agree"


# ----------------------------------------------------------------------------------------------
# Worker


def _emit(**event) -> None:
    sys.stdout.write("FUZZ " + json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    family = argv[1]
    start = int(argv[2]) if len(argv) > 2 else 0
    faulthandler.enable()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)  # the CPU kernels split work over torch's intra-op threads
    fastflow.set_backend("native")
    info = fastflow.info()
    assert info["backend"] == "native", f"native kernels are not in use: {info}"
    cases = build_cases(family)
    _emit(ready=True, n=len(cases), isa=info["cpu_isa"])
    for i in range(start, len(cases)):
        case = cases[i]
        _emit(start=i, name=case.name)
        try:
            msg, outcome = run_case(case)
        except Exception as e:  # the harness itself: report, keep going
            msg, outcome = f"harness error {_err(e)}\n{traceback.format_exc()}", "harness"
        _emit(done=i, name=case.name, ok=msg is None, msg=msg, outcome=outcome)
    _emit(end=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
