"""The density direction of an affine MADE layer (MAF) as one autograd node.

``(t, raw) = MADE(x)``, ``u = (x - t) * exp(-s)``, ``logdet = -sum(s)``, ``s = scale_fn(raw)``
(the convention of :mod:`fastflow.ops.made`). :func:`fastflow.ops.made.made_affine_forward`
computes the same with autograd over masked matmuls and the fused coupling op: per layer a mask
multiply per weight, a matmul and an activation each with its own autograd node, and a custom op.
At the sizes MAFs are trained at (D = 2-256, hidden 64-512, batches of hundreds) those fixed
per-call costs are a large part of the step. Here the whole layer is one node: the forward applies
the masks without autograd, runs the MLP and the native coupling kernel; the backward is written
by hand (matmuls with masked weights, masked weight gradients, the activation's derivative from
the saved activations, the native coupling backward kernel).

:func:`made_affine_density` falls back to :func:`~fastflow.ops.made.made_affine_forward` (the
reference) under ``torch.compile``, autocast, for 16-bit inputs, without native kernels or for an
output layer with more than ``2 D`` rows.

Reference: Papamakarios et al., "Masked Autoregressive Flow for Density Estimation", 2017.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastflow import _backend as B
from fastflow.ops.coupling import SCALE_FNS, _head, _run, _strided
from fastflow.ops.made import _check_mlp, _check_options, made_affine_forward

__all__ = ["MADELayout", "flat_mask", "made_affine_density", "made_views"]


def _act_(h: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return h.relu_()
    if activation == "tanh":
        return h.tanh_()
    return torch.nn.functional.elu_(h)


def _act_backward(g: Tensor, h: Tensor, activation: str) -> Tensor:
    """``g * act'(pre)`` from the activation's output ``h``."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(g, h, 0)
    if activation == "tanh":
        return g * (1 - h * h)
    return torch.ops.aten.elu_backward(g, 1.0, 1.0, 1.0, True, h)


class MADELayout(NamedTuple):
    """Where a MADE's tensors sit in its flat parameter vector (row-major)."""

    weights: tuple[tuple[int, int, int], ...]  #: (offset, out, in) per layer
    biases: tuple[tuple[int, int], ...]  #: (offset, out) per layer
    context: tuple[int, int, int] | None  #: (offset, H_1, C) of the context weight, or None


def made_views(params: Tensor, layout: MADELayout):
    """``(weights, biases, context_weight)`` as views of the flat ``params``.

    Example:
        >>> lay = MADELayout(((0, 2, 1),), ((2, 2),), None)
        >>> (w,), (b,), cw = made_views(torch.arange(4.0), lay)
        >>> w.tolist(), b.tolist(), cw
        ([[0.0], [1.0]], [2.0, 3.0], None)
    """
    ws = [params[o : o + r * c].view(r, c) for o, r, c in layout.weights]
    bs = [params[o : o + r] for o, r in layout.biases]
    cw = None
    if layout.context is not None:
        o, r, c = layout.context
        cw = params[o : o + r * c].view(r, c)
    return ws, bs, cw


def flat_mask(masks: list[Tensor], layout: MADELayout, dtype: torch.dtype) -> Tensor:
    """The masks laid out like the flat parameter without its context weight (ones at the
    biases): ``params[:n] * flat_mask`` is the flat vector of masked weights and biases.

    Example:
        >>> lay = MADELayout(((0, 2, 1),), ((2, 2),), None)
        >>> flat_mask([torch.tensor([[1.0], [0.0]])], lay, torch.float32).tolist()
        [1.0, 0.0, 1.0, 1.0]
    """
    parts = []
    for m, (_, r) in zip(masks, layout.biases):
        parts += [m.reshape(-1).to(dtype), torch.ones(r, dtype=dtype, device=m.device)]
    return torch.cat(parts)


def _sizes(layout: MADELayout) -> tuple[int, ...]:
    return (layout.weights[0][2], *(r for _, r, _ in layout.weights))


class MadeStep:
    """The density direction on the whole-layer kernel (``made_density_*_cpu``): the masked
    parameters ``params * fmask`` in, the gradient masked out. One layer's forward and backward,
    used by :class:`_KernelMadeDensity` and, as a step of a one-node run, by
    :mod:`fastflow.ops.chain` (``param``: the parameter its gradient is for)."""

    __slots__ = ("param", "fmask", "sizes", "mode", "clamp")

    def __init__(self, param, fmask, sizes, mode, clamp):
        self.param, self.fmask, self.sizes, self.mode, self.clamp = param, fmask, sizes, mode, clamp

    def forward(self, x, p):
        from fastflow.ops import _mlp_native as K

        mp = p * self.fmask
        u, ld, acts = K.made_forward(x, mp, self.sizes, self.mode, self.clamp, True)
        return u, ld, (x, mp, acts)

    def backward(self, keep, g, grad_logdet):
        from fastflow.ops import _mlp_native as K

        x, mp, acts = keep
        gx, gp = K.made_backward(x, mp, self.sizes, self.mode, self.clamp, acts, g, grad_logdet)
        return gx, gp.mul_(self.fmask)


class _KernelMadeDensity(torch.autograd.Function):
    """The whole layer in the native CPU kernel (``made_density_*_cpu``, on the MLP coupling
    kernel's machinery in ``csrc/mlp_cpu.cpp``): one call each way."""

    @staticmethod
    def forward(ctx, x, params, fmask, sizes, mode, clamp):
        ctx.step = MadeStep(None, fmask, sizes, mode, clamp)
        u, logdet, keep = ctx.step.forward(x, params)
        ctx.save_for_backward(*keep)
        return u, logdet

    @staticmethod
    def backward(ctx, grad_u, grad_logdet):
        gx, gp = ctx.step.backward(ctx.saved_tensors, grad_u, grad_logdet)
        return gx, gp, None, None, None, None


# The density kernel as torch.library ops for torch.compile (as fastflow::mlp_coupling_fwd in
# mlp_coupling.py): the compiled graph masks the parameters itself and calls the kernel, one op
# each way, instead of compiling the reference. Eager calls keep _KernelMadeDensity.
@torch.library.custom_op("fastflow::made_density_fwd", mutates_args=())
def _made_fwd_op(
    x: Tensor, masked_params: Tensor, sizes: list[int], mode: int, clamp: float
) -> tuple[Tensor, Tensor, Tensor]:
    from fastflow.ops import _mlp_native as K

    u, ld, acts = K.made_forward(x, masked_params, tuple(sizes), mode, clamp, True)
    return u, ld, acts


@_made_fwd_op.register_fake
def _(x, masked_params, sizes, mode, clamp):
    from fastflow.ops import _mlp_native as K

    return K.fake_outputs(x, sizes)


@torch.library.custom_op("fastflow::made_density_bwd", mutates_args=())
def _made_bwd_op(
    x: Tensor,
    masked_params: Tensor,
    acts: Tensor,
    grad_u: Tensor,
    grad_logdet: Tensor,
    sizes: list[int],
    mode: int,
    clamp: float,
) -> tuple[Tensor, Tensor]:
    from fastflow.ops import _mlp_native as K

    return K.made_backward(x, masked_params, tuple(sizes), mode, clamp, acts, grad_u, grad_logdet)


@_made_bwd_op.register_fake
def _(x, masked_params, acts, grad_u, grad_logdet, sizes, mode, clamp):
    return torch.empty_like(x), torch.empty_like(masked_params)


def _made_op_setup(ctx, inputs, output):
    x, mp, sizes, mode, clamp = inputs
    ctx.save_for_backward(x, mp, output[2])
    ctx.args = (list(sizes), mode, clamp)
    ctx.mark_non_differentiable(output[2])


def _made_op_backward(ctx, grad_u, grad_logdet, _grad_acts):
    x, mp, acts = ctx.saved_tensors
    gx, gmp = _made_bwd_op(x, mp, acts, grad_u, grad_logdet, *ctx.args)
    return gx, gmp, None, None, None


torch.library.register_autograd(
    "fastflow::made_density_fwd", _made_op_backward, setup_context=_made_op_setup
)


# Up to this many multiply-adds per call (batch x MLP weights) the whole-layer kernel runs, per CPU
# variant of the kernels (fastflow._C.cpu_isa()); above it the one-node torch-matmul path
# (_MadeDensity) is faster. Measured with bench/crossover.py (one MAF layer forward + backward,
# fp32, 1 thread, interleaved; torch's MKL capped to the same ISA), matmul / kernel time: AVX-512
# 1.7x at D=2 N=256 h=64 (1.2M), 1.23x at 221M (D=256 N=4096 h=64), 1.01x at 270M (D=256 N=1024
# h=256); AVX2 1.95x, 1.10x, 0.95x; baseline SSE2 1.0-1.3x at 17-30M, 0.86x at 68M. (The earlier
# bound of 4M was measured before the broadcast fix in csrc/cpu_isa.h `vsplat`.) Intel numbers
# (a Xeon); on AMD (a Zen 5 EPYC, MKL's generic kernels) the kernel was faster at every size
# measured, 1 and 2 threads: 1.9-3.3x (AVX-512) up to 1.08G MACs (D=256 N=4096 h=256: 2.25x),
# 1.1-1.4x with the AVX2 variant; no bound there below 2G (SSE2: the Intel bound, unmeasured).
_MAX_MACS_INTEL = {"base": 30_000_000, "avx2": 200_000_000, "avx512": 200_000_000}
_MAX_MACS_AMD = {"base": 30_000_000, "avx2": 2_000_000_000, "avx512": 2_000_000_000}
KERNEL_MAX_MACS = dict(_MAX_MACS_AMD if B.cpu_vendor() == "amd" else _MAX_MACS_INTEL)


def kernel_layout(layout: MADELayout, d: int) -> bool:
    """Whether the whole-layer kernel can run this layout: at least one hidden layer and a last
    layer of ``2 d`` outputs (shift, raw)."""
    return len(layout.weights) >= 2 and layout.weights[-1][1] == 2 * d


def _use_kernel(x: Tensor, layout: MADELayout, activation: str, context) -> bool:
    return (
        context is None
        and activation == "relu"
        and x.device.type == "cpu"
        and hasattr(B._C, "made_density_forward_cpu")
        and x.shape[0] * sum(r * c for _, r, c in layout.weights)
        <= KERNEL_MAX_MACS.get(B.cpu_isa(), 0)
    )


class _MadeDensity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, context, params, layout, masks, activation, mode, clamp):
        weights, biases, cw = made_views(params, layout)
        nl = len(weights)
        mw = [w * m for w, m in zip(weights, masks)]
        acts = []
        h = torch.addmm(biases[0], x, mw[0].t())
        if context is not None:
            h.addmm_(context, cw.t())
        for l in range(1, nl):
            h = _act_(h, activation)
            acts.append(h)
            h = torch.addmm(biases[l], h, mw[l].t())
        n, d = x.shape
        shift, raw = h[:, :d], h[:, d:]
        u = torch.empty_like(x)
        logdet = torch.empty(n, dtype=x.dtype, device=x.device)
        _run(
            "coupling_inverse", x, **_head(x, mode, clamp), **_strided("y", "x", x, x),
            **_strided("raw", "raw", raw, x), **_strided("shift", "shift", shift, x), mask_ptr=0,
            x_ptr=B.ptr(u), logdet_ptr=B.ptr(logdet),
        )  # fmt: skip
        ctx.save_for_backward(x, context, params, u, h, *acts, *mw)
        ctx.meta = (layout, masks, activation, mode, clamp)
        return u, logdet

    @staticmethod
    def backward(ctx, grad_u, grad_logdet):
        layout, masks, activation, mode, clamp = ctx.meta
        nl = len(masks)
        x, context, params, u, out, *rest = ctx.saved_tensors
        acts, mw = rest[: nl - 1], rest[nl - 1 :]
        n, d = x.shape
        g_out = torch.empty_like(out)
        gx = torch.empty_like(x)
        graw = torch.empty_like(x)
        gshift = torch.empty_like(x)
        # the contiguous copies stay referenced until the kernel has run (no freed temporaries)
        grad_u, grad_logdet = grad_u.contiguous(), grad_logdet.contiguous()
        gu = B.ptr(grad_u, x.dtype, n * d, x.device, "grad_u")
        gl = B.ptr(grad_logdet, x.dtype, n, x.device, "grad_logdet")
        _run(
            "coupling_inverse_backward", x, **_head(x, mode, clamp),
            x_ptr=B.ptr(u, x.dtype, n * d, x.device, "u"), **_strided("raw", "raw", out[:, d:], x),
            mask_ptr=0, grad_x_ptr=gu, grad_logdet_ptr=gl, grad_y_ptr=B.ptr(gx),
            grad_raw_ptr=B.ptr(graw), grad_shift_ptr=B.ptr(gshift),
        )  # fmt: skip
        g_out[:, :d] = gshift
        g_out[:, d:] = graw
        g_params = torch.empty_like(params)
        g_w, g_b, g_cw = made_views(g_params, layout)
        g = g_out
        for l in range(nl - 1, -1, -1):
            prev = acts[l - 1] if l > 0 else x
            torch.mm(g.t(), prev, out=g_w[l])
            g_w[l].mul_(masks[l])
            torch.sum(g, 0, out=g_b[l])
            if l > 0:
                g = _act_backward(g.mm(mw[l]), prev, activation)
        g_ctx = None
        if context is not None:
            torch.mm(g.t(), context, out=g_cw)
            g_ctx = g.mm(made_views(params, layout)[2])
        gx.addmm_(g, mw[0])
        return gx, g_ctx, g_params, None, None, None, None, None


def made_affine_density(
    x: Tensor,
    params: Tensor,
    layout: MADELayout,
    masks: list[Tensor],
    activation: str = "relu",
    context: Tensor | None = None,
    scale_fn: str = "softclamp",
    clamp: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """Density direction of the affine autoregressive transform, one autograd node.

    The same result as :func:`fastflow.ops.made.made_affine_forward` with the masked weights
    ``w * m`` (see there for the map): ``params`` is the MADE's flat parameter vector laid out by
    ``layout`` (:func:`made_views`), ``masks`` its binary masks (the weights' shapes), applied
    inside.

    Example:
        >>> D, H = 3, 8
        >>> w_off = ((0, H, D), (H * D + H, 2 * D, H))
        >>> lay = MADELayout(w_off, ((H * D, H), (2 * H * D + H, 2 * D)), None)
        >>> params = torch.randn(H * D + H + 2 * D * H + 2 * D)
        >>> masks = [torch.ones(H, D), torch.ones(2 * D, H)]  # (real masks omitted here)
        >>> u, ld = made_affine_density(torch.randn(4, D), params, lay, masks)
        >>> u.shape, ld.shape
        (torch.Size([4, 3]), torch.Size([4]))

    Reference: Papamakarios et al., "Masked Autoregressive Flow for Density Estimation", 2017.
    """
    clamp = _check_options(activation, scale_fn, clamp)
    if not isinstance(params, Tensor) or params.dim() != 1:
        raise ValueError("params must be a 1-D tensor (the MADE's flat parameter vector)")
    ends = [o + r * c for o, r, c in layout.weights] + [o + r for o, r in layout.biases]
    if layout.context is not None:
        ends.append(layout.context[0] + layout.context[1] * layout.context[2])
    if max(ends) > params.numel():
        raise ValueError(f"params has {params.numel()} values, layout needs {max(ends)}")
    if len(masks) != len(layout.weights):
        raise ValueError(f"need one mask per layer, got {len(masks)} for {len(layout.weights)}")
    for l, (m, (_, r, c)) in enumerate(zip(masks, layout.weights)):
        if not isinstance(m, Tensor) or tuple(m.shape) != (r, c):
            raise ValueError(f"masks[{l}] must have shape [{r}, {c}]")
    weights, biases, cw = made_views(params, layout)
    _check_mlp(x, weights, biases, context, cw, min_out=2 * x.shape[1] if x.dim() == 2 else 2)
    return density(x, params, layout, masks, activation, context, scale_fn, clamp)


def density(x, params, layout, masks, activation, context, scale_fn, clamp, fmask=None):
    """:func:`made_affine_density` without its argument checks, for a module whose structure is
    valid by construction (``MaskedAffineAutoregressive`` checks ``x`` and the context itself):
    per call, only what can change is looked at. ``fmask``: :func:`flat_mask` of ``masks`` in
    ``x``'s dtype if the caller keeps one (else it is built when needed)."""
    d = x.shape[1]
    if (
        torch.compiler.is_compiling()
        and x.dtype in (torch.float32, torch.float64)
        and params.dtype == x.dtype
        and not torch.is_autocast_enabled(x.device.type)
        and B.use_native(x)
        and kernel_layout(layout, d)
        and _use_kernel(x, layout, activation, context)
    ):
        fm = flat_mask(masks, layout, x.dtype) if fmask is None or fmask.dtype != x.dtype else fmask
        u, logdet, _ = _made_fwd_op(
            x, params * fm, list(_sizes(layout)), SCALE_FNS[scale_fn], float(clamp)
        )
        return u, logdet
    fast = (
        x.dtype in (torch.float32, torch.float64)
        and params.dtype == x.dtype
        and (context is None or context.dtype == x.dtype)
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(x.device.type)
        and B.use_native(x)
        and kernel_layout(layout, d)
    )
    if not fast:
        weights, biases, cw = made_views(params, layout)
        mw = [w * m.to(w.dtype) for w, m in zip(weights, masks)]
        return made_affine_forward(x, mw, biases, activation, context, cw, scale_fn, clamp)
    if _use_kernel(x, layout, activation, context):
        if fmask is None or fmask.dtype != x.dtype:
            fmask = flat_mask(masks, layout, x.dtype)
        return _KernelMadeDensity.apply(
            x, params, fmask, _sizes(layout), SCALE_FNS[scale_fn], clamp
        )
    masks = [m if m.dtype == x.dtype else m.to(x.dtype) for m in masks]
    return _MadeDensity.apply(
        x.contiguous(), context, params, layout, masks, activation, SCALE_FNS[scale_fn], clamp
    )
