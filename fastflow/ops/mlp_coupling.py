"""A whole vector coupling layer as one op: MLP conditioner + affine coupling, both directions.

For vectors ``x [N, D]`` split at ``cut`` (``parity`` 0: ``x_a = x[:, :cut]`` conditions
``x_b = x[:, cut:]``; parity 1 swaps them), the conditioner is a ReLU MLP on ``[x_a, context]``
whose last layer gives ``(raw_scale, shift)`` for ``x_b``:

    ``y_b = x_b * exp(s) + shift``, ``s = scale_fn(raw_scale)``, ``y_a = x_a``, ``logdet = sum s``.

Why one op: on the sizes people train vector flows at (D = 2-256, hidden 64-1024, batches of
hundreds) the arithmetic is small and a training step is dominated by fixed per-call costs —
module calls, autograd nodes (about ten per layer), and the optimizer's per-tensor work (six
tensors per layer). Here the MLP's weights and biases live in **one flat parameter** (one tensor
for the optimizer), the forward is one autograd node whose backward is written by hand (matmuls
for the MLP, the native fused coupling kernel for the elementwise part, no Python autograd
graph), and the elementwise part runs in the native coupling kernel each way.

* :func:`mlp_affine_coupling` — the op (native path in eager mode; the reference under
  ``torch.compile``, for 16-bit inputs or where no kernel is built);
* :func:`reference_mlp_affine_coupling` — pure PyTorch, differentiable by autograd: the
  specification the tests compare against;
* :func:`mlp_layout` / :func:`init_mlp_params` — where each layer's weight and bias sit in the
  flat parameter and the ``nn.Linear``-style initialisation (last layer zero: identity coupling).

Reference: Dinh et al., "Density estimation using Real NVP", 2017 (the coupling); the fused
small-MLP idea follows Müller et al., "Real-time Neural Radiance Caching for Path Tracing", 2021
(tiny-cuda-nn's fully fused MLPs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastflow import _backend as B
from fastflow.ops._checks import check_float_tensor
from fastflow.ops.coupling import (
    SCALE_FNS,
    _head,
    _ref_scale,
    _run,
    _strided,
    check_scale,
)

__all__ = [
    "MLPLayout",
    "init_mlp_params",
    "mlp_affine_coupling",
    "mlp_layout",
    "reference_mlp_affine_coupling",
]


class MLPLayout(NamedTuple):
    """Shapes and offsets of an MLP's layers in one flat parameter (:func:`mlp_layout`)."""

    sizes: tuple[int, ...]  #: in, hidden..., out
    weights: tuple[tuple[int, int, int], ...]  #: (offset, out, in) per layer, row-major [out, in]
    biases: tuple[tuple[int, int], ...]  #: (offset, out) per layer
    numel: int


def mlp_layout(sizes: tuple[int, ...] | list[int]) -> MLPLayout:
    """Layout of the MLP ``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` in one flat vector: per
    layer its ``[out, in]`` weight then its bias.

    Example:
        >>> mlp_layout((2, 4, 6)).numel  # 4 * 2 + 4 + 6 * 4 + 6
        42
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError(f"MLP sizes must be at least two positive ints, got {sizes}")
    ws, bs, off = [], [], 0
    for i, o in zip(sizes[:-1], sizes[1:]):
        ws.append((off, o, i))
        off += o * i
        bs.append((off, o))
        off += o
    return MLPLayout(sizes, tuple(ws), tuple(bs), off)


def init_mlp_params(layout: MLPLayout, zero_last: bool = True) -> Tensor:
    """A flat parameter vector initialised as ``nn.Linear`` does (uniform in
    ``+-1/sqrt(fan_in)`` for weights and biases), the last layer zero when ``zero_last`` (so a
    new coupling is the identity).

    Example:
        >>> p = init_mlp_params(mlp_layout((2, 4, 6)))
        >>> p.shape, float(p[-30:].abs().max())
        (torch.Size([42]), 0.0)
    """
    flat = torch.empty(layout.numel)
    last = len(layout.weights) - 1
    for l, ((wo, o, i), (bo, _)) in enumerate(zip(layout.weights, layout.biases)):
        bound = 1.0 / math.sqrt(i)
        if l == last and zero_last:
            flat[wo : bo + o] = 0.0
        else:
            flat[wo : wo + o * i].uniform_(-bound, bound)
            flat[bo : bo + o].uniform_(-bound, bound)
    return flat


def _views(flat: Tensor, layout: MLPLayout) -> list[tuple[Tensor, Tensor]]:
    return [
        (flat[wo : wo + o * i].view(o, i), flat[bo : bo + o])
        for (wo, o, i), (bo, _) in zip(layout.weights, layout.biases)
    ]


def _split(x: Tensor, cut: int, parity: int) -> tuple[Tensor, Tensor]:
    a, b = x[:, :cut], x[:, cut:]
    return (a, b) if parity == 0 else (b, a)


def _merge(xa: Tensor, yb: Tensor, parity: int) -> Tensor:
    return torch.cat((xa, yb) if parity == 0 else (yb, xa), dim=1)


def _mlp_input(xa: Tensor, context: Tensor | None) -> Tensor:
    return xa if context is None else torch.cat((xa, context.to(xa.dtype)), dim=1)


# ----------------------------------------------------------------------------------------------
# Reference: the specification (autograd does the backward).


def reference_mlp_affine_coupling(
    x: Tensor,
    params: Tensor,
    layout: MLPLayout,
    cut: int,
    parity: int = 0,
    context: Tensor | None = None,
    scale_fn: str = "softclamp",
    clamp: float = 2.0,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`mlp_affine_coupling` (differentiable by autograd).

    Example:
        >>> lay = mlp_layout((1, 8, 2))
        >>> p = init_mlp_params(lay, zero_last=False)
        >>> x = torch.randn(5, 2)
        >>> y, ld = reference_mlp_affine_coupling(x, p, lay, cut=1)
        >>> x2, ld2 = reference_mlp_affine_coupling(y, p, lay, cut=1, inverse=True)
        >>> torch.allclose(x, x2, atol=1e-6) and torch.allclose(ld, -ld2)
        True
    """
    acc = B.acc_dtype(x.dtype)
    xa, xb = _split(x, cut, parity)
    h = _mlp_input(xa, context)
    views = _views(params.to(x.dtype), layout)
    for l, (w, b) in enumerate(views):
        h = torch.addmm(b, h, w.t())
        if l < len(views) - 1:
            h = torch.relu(h)
    db = xb.shape[1]
    raw, shift = h[:, :db].to(acc), h[:, db:].to(acc)
    s = _ref_scale(raw, scale_fn, clamp)
    if inverse:
        yb = (xb.to(acc) - shift) * torch.exp(-s)
        logdet = -s.sum(1)
    else:
        yb = xb.to(acc) * torch.exp(s) + shift
        logdet = s.sum(1)
    return _merge(xa, yb.to(x.dtype), parity), logdet


# ----------------------------------------------------------------------------------------------
# Native path: one autograd node, hand-written backward.


def _mlp_forward(inp: Tensor, views, keep: bool) -> tuple[Tensor, list[Tensor]]:
    """The MLP; with ``keep`` also every hidden activation (for the backward)."""
    acts = []
    h = inp
    last = len(views) - 1
    for l, (w, b) in enumerate(views):
        h = torch.addmm(b, h, w.t())
        if l < last:
            h = h.relu_()
            if keep:
                acts.append(h)
    return h, acts


def _coupling_call(name: str, x: Tensor, raw: Tensor, shift: Tensor, mode: int, clamp: float):
    """``coupling_forward``/``coupling_inverse`` kernel on batch-strided views (read in place)."""
    n, m = x.shape
    y = torch.empty((n, m), dtype=x.dtype, device=x.device)
    logdet = torch.empty(n, dtype=x.dtype, device=x.device)
    ins, outs = ("y", "x") if name == "coupling_inverse" else ("x", "y")
    _run(
        name, x, **_head(x, mode, clamp), **_strided(ins, "x", x, x),
        **_strided("raw", "raw", raw, x), **_strided("shift", "shift", shift, x), mask_ptr=0,
        **{f"{outs}_ptr": B.ptr(y)}, logdet_ptr=B.ptr(logdet),
    )  # fmt: skip
    return y, logdet


class _FusedMLPCoupling(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, context, params, layout, cut, parity, mode, clamp):
        xa, xb = _split(x, cut, parity)
        inp = _mlp_input(xa, context)
        views = _views(params, layout)
        out, acts = _mlp_forward(inp, views, keep=True)
        db = xb.shape[1]
        raw, shift = out[:, :db], out[:, db:]
        yb, logdet = _coupling_call("coupling_forward", xb, raw, shift, mode, clamp)
        ctx.save_for_backward(x, inp, params, out, *acts)
        ctx.meta = (layout, cut, parity, mode, clamp, context is not None)
        return _merge(xa, yb, parity), logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        x, inp, params, out, *acts = ctx.saved_tensors
        layout, cut, parity, mode, clamp, has_ctx = ctx.meta
        xa, xb = _split(x, cut, parity)
        gya, gyb = _split(grad_y, cut, parity)
        n, db = xb.shape
        gyb, grad_logdet = gyb.contiguous(), grad_logdet.contiguous()  # alive through the call
        raw = out[:, :db]
        # elementwise part in the native kernel: grad_x_b and grad_raw; grad_shift = grad_y_b
        g_out = torch.empty_like(out)
        gxb = torch.empty_like(xb, memory_format=torch.contiguous_format)
        graw = torch.empty((n, db), dtype=x.dtype, device=x.device)
        _run(
            "coupling_backward", xb, **_head(xb, mode, clamp), **_strided("x", "x", xb, xb),
            **_strided("raw", "raw", raw, xb), mask_ptr=0,
            grad_y_ptr=B.ptr(gyb, x.dtype, n * db, x.device, "grad_y"),
            grad_logdet_ptr=B.ptr(grad_logdet, x.dtype, n, x.device, "grad_logdet"),
            grad_x_ptr=B.ptr(gxb), grad_raw_ptr=B.ptr(graw),
        )  # fmt: skip
        g_out[:, :db] = graw
        g_out[:, db:] = gyb
        # the MLP, last layer first
        views = _views(params, layout)
        g_params = torch.empty_like(params)
        gviews = _views(g_params, layout)
        g = g_out
        for l in range(len(views) - 1, -1, -1):
            w, _ = views[l]
            gw, gb = gviews[l]
            prev = acts[l - 1] if l > 0 else inp
            torch.mm(g.t(), prev, out=gw)
            torch.sum(g, 0, out=gb)
            if l > 0:
                g = torch.ops.aten.threshold_backward(g.mm(w), prev, 0)
            else:
                g = g.mm(w)
        da = xa.shape[1]
        gxa = gya + g[:, :da]
        g_ctx = g[:, da:] if has_ctx else None
        return _merge(gxa, gxb, parity), g_ctx, g_params, None, None, None, None, None


class CouplingStep:
    """One MLP coupling layer on the whole-layer kernel (``fastflow.ops._mlp_native``), forward
    and backward, used by :class:`_KernelMLPCoupling` and, as a step of a one-node run, by
    :mod:`fastflow.ops.chain` (``param``: the parameter its gradient is for)."""

    __slots__ = ("param", "layout", "cut", "parity", "mode", "clamp")

    def __init__(self, param, layout, cut, parity, mode, clamp):
        self.param, self.layout, self.cut, self.parity = param, layout, cut, parity
        self.mode, self.clamp = mode, clamp

    def forward(self, x, p, context=None):
        from fastflow.ops import _mlp_native as K

        lay, cut, par, mode, clamp = self.layout, self.cut, self.parity, self.mode, self.clamp
        y, ld, acts = K.forward(x, context, p, lay, cut, par, mode, clamp, True)
        return y, ld, (x, p, acts, context)

    def backward_with_context(self, keep, g, grad_logdet):
        """``(grad_x, grad_params, grad_context)``."""
        from fastflow.ops import _mlp_native as K

        x, p, acts, context = keep
        lay, cut, par, mode, clamp = self.layout, self.cut, self.parity, self.mode, self.clamp
        gx, gctx, gp = K.backward(x, context, p, lay, cut, par, mode, clamp, acts, g, grad_logdet)
        return gx, gp, gctx

    def backward(self, keep, g, grad_logdet):
        gx, gp, _ = self.backward_with_context(keep, g, grad_logdet)
        return gx, gp


class _KernelMLPCoupling(torch.autograd.Function):
    """The whole layer in the native CPU kernel (``csrc/mlp_cpu.cpp``), one call each way."""

    @staticmethod
    def forward(ctx, x, context, params, layout, cut, parity, mode, clamp):
        ctx.step = CouplingStep(None, layout, cut, parity, mode, clamp)
        y, logdet, keep = ctx.step.forward(x, params, context)
        ctx.save_for_backward(*keep)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        gx, gp, gctx = ctx.step.backward_with_context(ctx.saved_tensors, grad_y, grad_logdet)
        return gx, gctx, gp, None, None, None, None, None


# The whole-layer kernel as torch.library ops, for torch.compile: under compilation the layer
# used to run its reference (which Inductor compiles: 3x slower than the eager kernel at
# B=4096); these ops let the compiled graph call the kernel, one op each way. Eager calls keep
# the cheaper autograd.Function above. No context (the compiled path takes the reference then).
@torch.library.custom_op("fastflow::mlp_coupling_fwd", mutates_args=())
def _mlp_fwd_op(
    x: Tensor, params: Tensor, sizes: list[int], cut: int, parity: int, mode: int, clamp: float
) -> tuple[Tensor, Tensor, Tensor]:
    from fastflow.ops import _mlp_native as K

    y, ld, acts = K.forward(x, None, params, mlp_layout(sizes), cut, parity, mode, clamp, True)
    return y, ld, acts


@_mlp_fwd_op.register_fake
def _(x, params, sizes, cut, parity, mode, clamp):
    from fastflow.ops import _mlp_native as K

    return K.fake_outputs(x, sizes)


@torch.library.custom_op("fastflow::mlp_coupling_bwd", mutates_args=())
def _mlp_bwd_op(
    x: Tensor,
    params: Tensor,
    acts: Tensor,
    grad_y: Tensor,
    grad_logdet: Tensor,
    sizes: list[int],
    cut: int,
    parity: int,
    mode: int,
    clamp: float,
) -> tuple[Tensor, Tensor]:
    from fastflow.ops import _mlp_native as K

    lay = mlp_layout(sizes)
    gx, _, gp = K.backward(
        x, None, params, lay, cut, parity, mode, clamp, acts, grad_y, grad_logdet
    )
    return gx, gp


@_mlp_bwd_op.register_fake
def _(x, params, acts, grad_y, grad_logdet, sizes, cut, parity, mode, clamp):
    return torch.empty_like(x), torch.empty_like(params)


def _mlp_op_setup(ctx, inputs, output):
    x, params, sizes, cut, parity, mode, clamp = inputs
    ctx.save_for_backward(x, params, output[2])
    ctx.args = (list(sizes), cut, parity, mode, clamp)
    ctx.mark_non_differentiable(output[2])


def _mlp_op_backward(ctx, grad_y, grad_logdet, _grad_acts):
    x, params, acts = ctx.saved_tensors
    gx, gp = _mlp_bwd_op(x, params, acts, grad_y, grad_logdet, *ctx.args)
    return gx, gp, None, None, None, None, None


torch.library.register_autograd(
    "fastflow::mlp_coupling_fwd", _mlp_op_backward, setup_context=_mlp_op_setup
)


# Use the whole-layer kernel up to this many multiply-adds per call (batch x MLP weights), per
# CPU variant of the kernels (fastflow._C.cpu_isa()); above it the one-node torch-matmul path
# (_FusedMLPCoupling) is faster. Measured with bench/crossover.py (one layer forward + backward,
# fp32, 1 thread, interleaved; torch's MKL capped to the same ISA): matmul / kernel time 2.9x at
# D=2 N=256 h=64 (1.1M), 1.4x at 119M (D=256 N=4096 h=64), 1.12x at 93M (D=64 N=1024 h=256),
# 0.97x at 169M (D=256 N=1024 h=256) on AVX-512; 2.2x, 1.2x, 1.06x, 1.05x on AVX2; on the
# baseline SSE2 variant 1.0-1.1x at 18-23M and 0.79x at 93M. (The earlier bound of 6M was measured
# before the broadcast fix in csrc/cpu_isa.h `vsplat`, which made the kernel 2.5-7x faster.)
# These are Intel numbers (a Xeon). On AMD (a Zen 5 EPYC) MKL runs its generic kernels and the
# whole-layer kernel was faster at every size measured, 1 and 2 threads: 1.8-3.7x (AVX-512) up to
# 674M MACs (D=256 N=4096 h=256: 2.17x), 1.2-1.8x with the AVX2 variant; so no bound there below
# 2G (the SSE2 baseline keeps the Intel bound: unmeasured on AMD).
_MAX_MACS_INTEL = {"base": 30_000_000, "avx2": 150_000_000, "avx512": 150_000_000}
_MAX_MACS_AMD = {"base": 30_000_000, "avx2": 2_000_000_000, "avx512": 2_000_000_000}
KERNEL_MAX_MACS = dict(_MAX_MACS_AMD if B.cpu_vendor() == "amd" else _MAX_MACS_INTEL)


def _use_kernel(x: Tensor, layout: MLPLayout) -> bool:
    if x.device.type != "cpu" or not hasattr(B._C, "mlp_coupling_forward_cpu"):
        return False
    macs = x.shape[0] * sum(o * i for _, o, i in layout.weights)
    return macs <= KERNEL_MAX_MACS.get(B.cpu_isa(), 0)


@torch.no_grad()
def _fused_inverse(x, context, params, layout, cut, parity, mode, clamp):
    if _use_kernel(x, layout):
        from fastflow.ops import _mlp_native as K

        return K.inverse(x, context, params, layout, cut, parity, mode, clamp)
    ya, yb = _split(x, cut, parity)
    out, _ = _mlp_forward(_mlp_input(ya, context), _views(params, layout), keep=False)
    db = yb.shape[1]
    xb, logdet = _coupling_call("coupling_inverse", yb, out[:, :db], out[:, db:], mode, clamp)
    return _merge(ya, xb, parity), logdet


def mlp_affine_coupling(
    x: Tensor,
    params: Tensor,
    layout: MLPLayout,
    cut: int,
    parity: int = 0,
    context: Tensor | None = None,
    scale_fn: str = "softclamp",
    clamp: float = 2.0,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """One affine coupling layer with its ReLU MLP conditioner, as one op.

    Args:
        x: ``[N, D]``.
        params: the MLP's flat parameter vector (``layout.numel`` values, :func:`mlp_layout`),
            same dtype and device as ``x``.
        layout: :func:`mlp_layout` of ``(|x_a| + C, hidden..., 2 |x_b|)``.
        cut: split point: ``x[:, :cut]`` and ``x[:, cut:]``.
        parity: 0: the first part conditions the second; 1: the reverse.
        context: optional ``[N, C]`` appended to the conditioner input.
        scale_fn, clamp: as :func:`fastflow.ops.coupling.affine_coupling`.
        inverse: the inverse map (``x_b = (y_b - shift) exp(-s)``, ``logdet = -sum s``).

    Returns:
        ``(y, logdet)``, ``logdet`` of shape ``[N]`` (fp32; fp64 for fp64).

    Example:
        >>> lay = mlp_layout((2, 16, 16, 4))
        >>> p = init_mlp_params(lay, zero_last=False)
        >>> x = torch.randn(8, 4)
        >>> y, ld = mlp_affine_coupling(x, p, lay, cut=2)
        >>> x2, _ = mlp_affine_coupling(y, p, lay, cut=2, inverse=True)
        >>> torch.allclose(x, x2, atol=1e-5)
        True
    """
    clamp = check_scale(scale_fn, clamp)
    check_float_tensor("x", x, min_dim=2)
    if x.dim() != 2 or not 0 < cut < x.shape[1]:
        raise ValueError(f"x must be [N, D] with 0 < cut < D, got {tuple(x.shape)}, cut={cut}")
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity!r}")
    da = cut if parity == 0 else x.shape[1] - cut
    db = x.shape[1] - da
    c = 0 if context is None else context.shape[-1]
    sizes = layout.sizes
    if sizes[0] != da + c or sizes[-1] != 2 * db:
        raise ValueError(
            f"layout {sizes} does not fit: input must be |x_a| + C = {da + c}, output "
            f"2 |x_b| = {2 * db}"
        )
    if not isinstance(params, Tensor) or params.shape != (layout.numel,):
        got = tuple(params.shape) if isinstance(params, Tensor) else type(params).__name__
        raise ValueError(f"params must be a [{layout.numel}] tensor, got {got}")
    if params.dtype != x.dtype or params.device != x.device:
        raise ValueError(
            f"params ({params.dtype}, {params.device}) must match x ({x.dtype}, {x.device})"
        )
    if context is not None and (
        context.dim() != 2 or context.shape[0] != x.shape[0] or context.device != x.device
    ):
        raise ValueError(
            f"context must have shape [N, C] on {x.device}, got {tuple(context.shape)}"
        )
    compiling = torch.compiler.is_compiling()
    if (
        compiling
        and not inverse
        and context is None
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled(x.device.type)
        and B.use_native(x)
        and _use_kernel(x, layout)
    ):
        y, logdet, _ = _mlp_fwd_op(
            x, params, list(layout.sizes), cut, parity, SCALE_FNS[scale_fn], float(clamp)
        )
        return y, logdet
    if (
        x.dtype not in (torch.float32, torch.float64)
        or compiling
        or torch.is_autocast_enabled(x.device.type)
        or not B.use_native(x)
        or (inverse and torch.is_grad_enabled() and (x.requires_grad or params.requires_grad))
    ):
        return reference_mlp_affine_coupling(
            x, params, layout, cut, parity, context, scale_fn, clamp, inverse
        )
    mode = SCALE_FNS[scale_fn]
    if inverse:
        return _fused_inverse(x, context, params, layout, cut, parity, mode, clamp)
    fn = _KernelMLPCoupling if _use_kernel(x, layout) else _FusedMLPCoupling
    return fn.apply(x, context, params, layout, cut, parity, mode, clamp)
