"""Fused coupling ops: NICE additive and RealNVP/Glow affine couplings.

Given the conditioner's output for the untouched half, ``raw_scale`` and ``shift``, and the
half to transform ``x`` (any shape ``[N, ...]``):

* forward: ``y = x * exp(s) + shift``, ``logdet[n] = sum(s[n])``, with ``s = scale_fn(raw_scale)``
* inverse: ``x = (y - shift) * exp(-s)``, ``logdet[n] = -sum(s[n])``

Scale functions (``scale_fn``):

* ``"softclamp"`` (default): ``s = clamp * tanh(raw / clamp)``; ``clamp=1`` is the plain ``tanh``
  scale of textbook RealNVP code, the default ``clamp=2`` bounds ``|s| < 2``.
* ``"glow"``: ``s = log(sigmoid(raw + 2))`` as in Glow (Kingma & Dhariwal, 2018).
* ``"identity"``: ``s = raw`` (Dinh et al., 2017, unbounded).

An optional ``mask`` (shape broadcastable to ``x.shape[1:]``) selects the transformed elements;
elsewhere ``y = x`` and nothing is added to the log-det. That gives checkerboard and arbitrary
binary masks without gathering the halves.

The native kernel makes one pass over memory for each of forward, inverse and their backward
passes; autograd saves only the inputs (``x``, ``raw_scale``; for the inverse its output), never
``exp``/``tanh`` intermediates. Log-dets are fp32 for fp32/bf16/fp16 inputs and fp64 for fp64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastflow import _backend as B
from fastflow.ops._checks import check_finite_scalar, check_float_tensor, check_like

__all__ = [
    "SCALE_FNS",
    "check_scale",
    "affine_coupling",
    "affine_coupling_inverse",
    "additive_coupling",
    "additive_coupling_inverse",
    "reference_affine_coupling",
    "reference_affine_coupling_inverse",
    "reference_additive_coupling",
    "reference_additive_coupling_inverse",
]

#: scale function name -> kernel mode code (csrc/scale.h, enum ScaleMode; _C.SCALE_MODES, pinned
#: by tests/test_bindings.py, which also has "additive": _ADDITIVE)
SCALE_FNS = {"softclamp": 0, "glow": 1, "identity": 2}
_ADDITIVE = 3


# ----------------------------------------------------------------------------------------------
# Reference implementation: the specification. Computes in the accumulation dtype (fp32 for
# 16-bit inputs) and rounds once on output, as the kernels do.


def _ref_scale(raw: Tensor, scale_fn: str, clamp: float) -> Tensor:
    if scale_fn == "softclamp":
        return clamp * torch.tanh(raw / clamp)
    if scale_fn == "glow":
        return F.logsigmoid(raw + 2.0)
    return raw


def _ref_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    # boolean, applied with torch.where: a masked-out element passes through unchanged even where
    # the conditioner's output is NaN/inf there (NaN * 0 would be NaN), as in the kernels
    return None if mask is None else (mask != 0)


def reference_affine_coupling(
    x: Tensor,
    raw_scale: Tensor,
    shift: Tensor,
    scale_fn: str = "softclamp",
    clamp: float = 2.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`affine_coupling` (the specification)."""
    acc = B.acc_dtype(x.dtype)
    s = _ref_scale(raw_scale.to(acc), scale_fn, clamp)
    t = shift.to(acc)
    m = _ref_mask(mask, s)
    if m is not None:
        s, t = torch.where(m, s, 0.0), torch.where(m, t, 0.0)
    y = x.to(acc) * torch.exp(s) + t
    return y.to(x.dtype), s.flatten(1).sum(1)


def reference_affine_coupling_inverse(
    y: Tensor,
    raw_scale: Tensor,
    shift: Tensor,
    scale_fn: str = "softclamp",
    clamp: float = 2.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`affine_coupling_inverse` (the specification)."""
    acc = B.acc_dtype(y.dtype)
    s = _ref_scale(raw_scale.to(acc), scale_fn, clamp)
    t = shift.to(acc)
    m = _ref_mask(mask, s)
    if m is not None:
        s, t = torch.where(m, s, 0.0), torch.where(m, t, 0.0)
    x = (y.to(acc) - t) * torch.exp(-s)
    return x.to(y.dtype), -s.flatten(1).sum(1)


def reference_additive_coupling(
    x: Tensor, shift: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`additive_coupling` (the specification)."""
    acc = B.acc_dtype(x.dtype)
    t = shift.to(acc)
    m = _ref_mask(mask, t)
    if m is not None:
        t = torch.where(m, t, 0.0)
    y = (x.to(acc) + t).to(x.dtype)
    return y, x.new_zeros(x.shape[0], dtype=acc)


def reference_additive_coupling_inverse(
    y: Tensor, shift: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`additive_coupling_inverse` (the specification)."""
    acc = B.acc_dtype(y.dtype)
    t = shift.to(acc)
    m = _ref_mask(mask, t)
    if m is not None:
        t = torch.where(m, t, 0.0)
    x = (y.to(acc) - t).to(y.dtype)
    return x, y.new_zeros(y.shape[0], dtype=acc)


# ----------------------------------------------------------------------------------------------
# Native ops. Inputs reaching these are validated; each sample of an input is contiguous but the
# batch stride may be larger than the sample (see _prepare), so views such as the two halves of
# a conditioner's output are read in place. Outputs are contiguous.


def _run(name: str, t: Tensor, **kw) -> None:
    """Call ``_C.<name>_cpu`` or ``_C.<name>_cuda`` for ``t``'s device, by keyword (CUDA: on
    ``t``'s device and its current stream; the CUDA forward and inverse take a workspace,
    allocated here and kept alive across the launch)."""
    if t.device.type == "cuda":
        if name in ("coupling_forward", "coupling_inverse"):
            nbytes = B._C.coupling_workspace_bytes(dtype=kw["dtype"], n=kw["n"], m=kw["m"])
            ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=t.device)
            kw["workspace_ptr"] = ws.data_ptr()
        with B.cuda_guard(t):
            getattr(B._C, name + "_cuda")(**kw, stream=B.stream_of(t))
    else:
        getattr(B._C, name + "_cpu")(**kw, nthreads=B.num_threads())


def _head(x: Tensor, mode: int, clamp: float) -> dict:
    """The arguments every coupling kernel takes first: dtype code, scale mode, clamp, sizes."""
    n, m = _sizes(x)
    return dict(dtype=B.DTYPE_CODES[x.dtype], mode=mode, clamp=clamp, n=n, m=m)


def _bs(t: Tensor) -> int:
    """Batch stride of ``t`` in elements (the sample size when the batch has one sample)."""
    return t.stride(0) if t.shape[0] > 1 else max(t[0].numel(), 1) if t.shape[0] else 1


def _sp(name: str, t: Tensor, x: Tensor) -> tuple[int, int]:
    """``(pointer, batch stride)`` of a per-sample input the kernel reads like ``x`` (same shape,
    dtype and device; each sample contiguous, samples not overlapping): the one place the
    coupling ops take such pointers, so a direct ``torch.ops.fastflow`` call cannot hand the
    kernel a buffer it would misread. (Kept cheap: it runs on every call.)"""
    if t is not x and (
        t.dtype != x.dtype or t.shape != x.shape or t.get_device() != x.get_device()
    ):
        raise ValueError(
            f"{name}: the kernel reads {x.dtype} {tuple(x.shape)} on {x.device}, got "
            f"{t.dtype} {tuple(t.shape)} on {t.device}"
        )
    n = t.shape[0]
    if t.is_contiguous():
        return t.data_ptr(), (t.stride(0) if n > 1 else max(t.numel(), 1))
    if n > 1 and t[0].is_contiguous() and t.stride(0) >= t[0].numel():
        return t.data_ptr(), t.stride(0)
    raise ValueError(f"{name}: each sample must be contiguous (batch-strided at most)")


def _strided(key: str, name: str, t: Tensor, x: Tensor) -> dict:
    """``{key_ptr, key_stride}`` keyword arguments of a batch-strided input (see :func:`_sp`)."""
    p, stride = _sp(name, t, x)
    return {f"{key}_ptr": p, f"{key}_stride": stride}


def _mask_ptr(mask: Tensor | None, x: Tensor) -> int:
    if mask is None:
        return 0
    n = x.shape[0]
    return B.ptr(mask, torch.uint8, x.numel() // n if n else None, x.device, "mask")


def _ld_ptr(name: str, t: Tensor, x: Tensor) -> int:
    return B.ptr(t, B.acc_dtype(x.dtype), x.shape[0], x.device, name)


def _new(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _sizes(x: Tensor) -> tuple[int, int]:
    n = x.shape[0]
    return n, (x.numel() // n if n else 0)


def _affine_fwd_impl(
    x: Tensor, raw: Tensor, shift: Tensor, mask: Tensor | None, mode: int, clamp: float
) -> tuple[Tensor, Tensor]:
    y = _new(x)
    logdet = torch.empty(x.shape[0], dtype=B.acc_dtype(x.dtype), device=x.device)
    _run(
        "coupling_forward", x, **_head(x, mode, clamp), **_strided("x", "x", x, x),
        **_strided("raw", "raw", raw, x), **_strided("shift", "shift", shift, x),
        mask_ptr=_mask_ptr(mask, x), y_ptr=B.ptr(y), logdet_ptr=B.ptr(logdet),
    )  # fmt: skip
    return y, logdet


def _affine_inv_impl(
    y: Tensor, raw: Tensor, shift: Tensor, mask: Tensor | None, mode: int, clamp: float
) -> tuple[Tensor, Tensor]:
    x = _new(y)
    logdet = torch.empty(y.shape[0], dtype=B.acc_dtype(y.dtype), device=y.device)
    _run(
        "coupling_inverse", y, **_head(y, mode, clamp), **_strided("y", "y", y, y),
        **_strided("raw", "raw", raw, y), **_strided("shift", "shift", shift, y),
        mask_ptr=_mask_ptr(mask, y), x_ptr=B.ptr(x), logdet_ptr=B.ptr(logdet),
    )  # fmt: skip
    return x, logdet


def _affine_bwd_impl(
    x: Tensor,
    raw: Tensor,
    mask: Tensor | None,
    grad_y: Tensor,
    grad_logdet: Tensor,
    mode: int,
    clamp: float,
) -> tuple[Tensor, Tensor]:
    gx = _new(x)
    graw = _new(x)
    _run(
        "coupling_backward", x, **_head(x, mode, clamp), **_strided("x", "x", x, x),
        **_strided("raw", "raw", raw, x), mask_ptr=_mask_ptr(mask, x),
        grad_y_ptr=B.ptr(grad_y, x.dtype, x.numel(), x.device, "grad_y"),
        grad_logdet_ptr=_ld_ptr("grad_logdet", grad_logdet, x),
        grad_x_ptr=B.ptr(gx), grad_raw_ptr=B.ptr(graw),
    )  # fmt: skip
    return gx, graw


def _affine_inv_bwd_impl(
    x: Tensor,
    raw: Tensor,
    mask: Tensor | None,
    grad_x: Tensor,
    grad_logdet: Tensor,
    mode: int,
    clamp: float,
) -> tuple[Tensor, Tensor, Tensor]:
    gy = _new(x)
    graw = _new(x)
    gshift = _new(x)
    _run(
        "coupling_inverse_backward", x, **_head(x, mode, clamp),
        x_ptr=B.ptr(x, x.dtype, x.numel(), x.device, "x"), **_strided("raw", "raw", raw, x),
        mask_ptr=_mask_ptr(mask, x),
        grad_x_ptr=B.ptr(grad_x, x.dtype, x.numel(), x.device, "grad_x"),
        grad_logdet_ptr=_ld_ptr("grad_logdet", grad_logdet, x),
        grad_y_ptr=B.ptr(gy), grad_raw_ptr=B.ptr(graw), grad_shift_ptr=B.ptr(gshift),
    )  # fmt: skip
    return gy, graw, gshift


def _additive_impl(x: Tensor, shift: Tensor, mask: Tensor | None, inverse: bool) -> Tensor:
    y = _new(x)
    # the kernel writes a (zero) log-det; additive couplings have a unit Jacobian
    logdet = torch.empty(x.shape[0], dtype=B.acc_dtype(x.dtype), device=x.device)
    ins, outs = ("y", "x") if inverse else ("x", "y")
    _run(
        "coupling_inverse" if inverse else "coupling_forward", x,
        **_head(x, _ADDITIVE, 1.0), **_strided(ins, "x", x, x), raw_ptr=0, raw_stride=1,
        **_strided("shift", "shift", shift, x), mask_ptr=_mask_ptr(mask, x),
        **{f"{outs}_ptr": B.ptr(y)}, logdet_ptr=B.ptr(logdet),
    )  # fmt: skip
    return y


# The kernels as torch.library ops (with fake implementations and autograd formulas below): what
# torch.compile, opcheck and direct torch.ops.fastflow calls see. Eager calls skip the op
# dispatcher and run the same implementations under one autograd.Function (_CouplingFn), which
# costs a fraction of a custom op's per-call overhead (bench/train_step.py).
_affine_fwd = torch.library.custom_op(
    "fastflow::affine_coupling_fwd", _affine_fwd_impl, mutates_args=()
)
_affine_inv = torch.library.custom_op(
    "fastflow::affine_coupling_inv", _affine_inv_impl, mutates_args=()
)
_affine_bwd = torch.library.custom_op(
    "fastflow::affine_coupling_bwd", _affine_bwd_impl, mutates_args=()
)
_affine_inv_bwd = torch.library.custom_op(
    "fastflow::affine_coupling_inv_bwd", _affine_inv_bwd_impl, mutates_args=()
)
_additive = torch.library.custom_op("fastflow::additive_coupling", _additive_impl, mutates_args=())


def _fake_pair(x, *args):
    return _new(x), x.new_empty(x.shape[0], dtype=B.acc_dtype(x.dtype))


_affine_fwd.register_fake(_fake_pair)
_affine_inv.register_fake(_fake_pair)


@_affine_bwd.register_fake
def _(x, raw, mask, grad_y, grad_logdet, mode, clamp):
    return _new(x), _new(x)


@_affine_inv_bwd.register_fake
def _(x, raw, mask, grad_x, grad_logdet, mode, clamp):
    return _new(x), _new(x), _new(x)


@_additive.register_fake
def _(x, shift, mask, inverse):
    return _new(x)


def _masked(g: Tensor, mask: Tensor | None) -> Tensor:
    return g if mask is None else g * mask.to(g.dtype)


def _setup_fwd(ctx, inputs, output):
    x, raw, _shift, mask, mode, clamp = inputs
    ctx.save_for_backward(x, raw, mask)
    ctx.mode, ctx.clamp, ctx.inverse = mode, clamp, False


def _setup_inv(ctx, inputs, output):
    _y, raw, _shift, mask, mode, clamp = inputs
    ctx.save_for_backward(output[0], raw, mask)  # the inverse's output x, not y or shift
    ctx.mode, ctx.clamp, ctx.inverse = mode, clamp, True


def _affine_grads(ctx, grad_y, grad_logdet, bwd, inv_bwd):
    """Gradients for ``(input, raw, shift)``; ``bwd``/``inv_bwd`` are the backward custom ops
    (op path) or their implementations (eager path)."""
    x, raw, mask = ctx.saved_tensors
    gy, gl = grad_y.contiguous(), grad_logdet.contiguous()
    if ctx.inverse:
        return inv_bwd(x, raw, mask, gy, gl, ctx.mode, ctx.clamp)
    g_in, graw = bwd(x, raw, mask, gy, gl, ctx.mode, ctx.clamp)
    return g_in, graw, _masked(grad_y, mask)


def _backward_affine(ctx, grad_y, grad_logdet):
    grads = _affine_grads(ctx, grad_y, grad_logdet, _affine_bwd, _affine_inv_bwd)
    return (*grads, None, None, None)


def _setup_add(ctx, inputs, output):
    _x, _shift, mask, inverse = inputs
    ctx.save_for_backward(mask)
    ctx.inverse = inverse


def _backward_add(ctx, grad_y):
    (mask,) = ctx.saved_tensors
    gs = _masked(grad_y, mask)
    return grad_y, (-gs if ctx.inverse else gs), None, None


_affine_fwd.register_autograd(_backward_affine, setup_context=_setup_fwd)
_affine_inv.register_autograd(_backward_affine, setup_context=_setup_inv)
_additive.register_autograd(_backward_add, setup_context=_setup_add)


def _zero_logdet(x: Tensor) -> Tensor:
    """The additive coupling's log-det: zeros of the accumulation dtype, one per sample."""
    return torch.zeros(x.shape[0], dtype=B.acc_dtype(x.dtype), device=x.device)


class _CouplingFn(torch.autograd.Function):
    """Eager native path: the kernels' implementations under one autograd node (no dispatcher).
    ``mode`` is a scale-mode code or ``_ADDITIVE`` (then ``raw`` is unused)."""

    @staticmethod
    def forward(ctx, x, raw, shift, mask, mode, clamp, inverse):
        if mode == _ADDITIVE:
            _setup_add(ctx, (x, shift, mask, inverse), None)
            y = _additive_impl(x, shift, mask, inverse)
            return y, _zero_logdet(x)
        impl, setup = (_affine_inv_impl, _setup_inv) if inverse else (_affine_fwd_impl, _setup_fwd)
        out = impl(x, raw, shift, mask, mode, clamp)
        setup(ctx, (x, raw, shift, mask, mode, clamp), out)
        ctx.additive = False
        return out

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        if getattr(ctx, "additive", True):
            g_x, g_shift, _, _ = _backward_add(ctx, grad_y)
            return g_x, None, g_shift, None, None, None, None
        grads = _affine_grads(ctx, grad_y, grad_logdet, _affine_bwd_impl, _affine_inv_bwd_impl)
        return (*grads, None, None, None, None)


def _native(x, raw, shift, mask, mode, clamp, inverse):
    """The native kernels: custom ops while compiling, the autograd.Function in eager mode."""
    if torch.compiler.is_compiling():
        if mode == _ADDITIVE:
            y = _additive(x, shift, mask, inverse)
            return y, _zero_logdet(x)
        return (_affine_inv if inverse else _affine_fwd)(x, raw, shift, mask, mode, clamp)
    if torch.is_grad_enabled() and (
        x.requires_grad or shift.requires_grad or (raw is not None and raw.requires_grad)
    ):
        return _CouplingFn.apply(x, raw, shift, mask, mode, clamp, inverse)
    # nothing to differentiate (sampling, evaluation): the kernel without the autograd node
    # (apply and its context cost ~8 us a call, a fifth of a small call's fixed cost)
    if mode == _ADDITIVE:
        y = _additive_impl(x, shift, mask, inverse)
        return y, _zero_logdet(x)
    return (_affine_inv_impl if inverse else _affine_fwd_impl)(x, raw, shift, mask, mode, clamp)


# ----------------------------------------------------------------------------------------------
# Public functions: validate, then run native or reference.


def _prepare(x: Tensor, others: dict, mask: Tensor | None, xname: str):
    check_float_tensor(xname, x, min_dim=2)
    out = []
    for name, t in others.items():
        check_like(name, t, x, xname)
        out.append(_batch_contiguous(t))
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but {xname} is on {x.device}")
        try:
            mask = torch.broadcast_to(mask, x.shape[1:])
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to {xname}.shape[1:] = "
                f"{tuple(x.shape[1:])}"
            ) from None
        if mask.dtype != torch.uint8 or not mask.is_contiguous():
            # kernels read one byte per element, nonzero = transformed; modules cache this form
            mask = (mask != 0).to(torch.uint8).contiguous()
    return _batch_contiguous(x), out, mask


def _batch_contiguous(t: Tensor) -> Tensor:
    """``t`` itself if each sample is contiguous and samples do not overlap, else a copy."""
    if t.is_contiguous():
        return t
    if t.shape[0] > 1 and t[0].is_contiguous() and t.stride(0) >= t[0].numel():
        return t
    return t.contiguous()


def check_scale(scale_fn: str, clamp: float) -> float:
    """``scale_fn`` must name a scale function and ``clamp`` be a finite positive number (the
    one check every coupling, MADE layer and Glow step uses); returns ``clamp`` as a float.

    Example:
        >>> check_scale("softclamp", 3)
        3.0
    """
    if scale_fn not in SCALE_FNS:
        raise ValueError(f"scale_fn must be one of {sorted(SCALE_FNS)}, got {scale_fn!r}")
    return check_finite_scalar("clamp", clamp, positive=True)


def affine_coupling(
    x: Tensor,
    raw_scale: Tensor,
    shift: Tensor,
    scale_fn: str = "softclamp",
    clamp: float = 2.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Affine coupling ``y = x * exp(s) + shift`` with ``s = scale_fn(raw_scale)``.

    Args:
        x: the half to transform, ``[N, ...]`` (vectors ``[N, D]`` or images ``[N, C, H, W]``).
        raw_scale: the conditioner's unconstrained scale output, same shape/dtype/device as ``x``.
        shift: the conditioner's shift output, same shape/dtype/device as ``x``.
        scale_fn: ``"softclamp"`` (``clamp * tanh(raw / clamp)``), ``"glow"``
            (``log sigmoid(raw + 2)``) or ``"identity"``.
        clamp: the soft-clamp bound ``c`` (ignored by the other scale functions).
        mask: optional binary mask broadcastable to ``x.shape[1:]``; elements where it is 0 pass
            through unchanged.

    Returns:
        ``(y, logdet)``: ``y`` like ``x`` and ``logdet`` of shape ``[N]`` (fp32, fp64 for fp64).

    Example:
        >>> x, raw, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
        >>> y, logdet = affine_coupling(x, raw, t)
        >>> x2, ld2 = affine_coupling_inverse(y, raw, t)
        >>> torch.allclose(x, x2, atol=1e-5) and torch.allclose(logdet, -ld2)
        True

    References: Dinh et al., "Density estimation using Real NVP", 2017; Kingma & Dhariwal,
    "Glow", 2018.
    """
    clamp = check_scale(scale_fn, clamp)
    x, (raw_scale, shift), mask = _prepare(x, {"raw_scale": raw_scale, "shift": shift}, mask, "x")
    if B.use_native(x):
        return _native(x, raw_scale, shift, mask, SCALE_FNS[scale_fn], clamp, False)
    return reference_affine_coupling(x, raw_scale, shift, scale_fn, clamp, mask)


def affine_coupling_inverse(
    y: Tensor,
    raw_scale: Tensor,
    shift: Tensor,
    scale_fn: str = "softclamp",
    clamp: float = 2.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`affine_coupling`: ``x = (y - shift) * exp(-s)``.

    Arguments as in :func:`affine_coupling`, with ``y`` in place of ``x``. Returns ``(x, logdet)``
    where ``logdet = -sum(s)`` is the log-det of the inverse map.

    Example:
        >>> y, raw, t = torch.randn(5, 6), torch.randn(5, 6), torch.randn(5, 6)
        >>> x, logdet = affine_coupling_inverse(y, raw, t, scale_fn="glow")
        >>> logdet.shape
        torch.Size([5])
    """
    clamp = check_scale(scale_fn, clamp)
    y, (raw_scale, shift), mask = _prepare(y, {"raw_scale": raw_scale, "shift": shift}, mask, "y")
    if B.use_native(y):
        return _native(y, raw_scale, shift, mask, SCALE_FNS[scale_fn], clamp, True)
    return reference_affine_coupling_inverse(y, raw_scale, shift, scale_fn, clamp, mask)


def additive_coupling(
    x: Tensor, shift: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """NICE additive coupling ``y = x + shift`` (unit Jacobian, so ``logdet`` is zeros).

    Example:
        >>> x, t = torch.randn(2, 3), torch.randn(2, 3)
        >>> y, logdet = additive_coupling(x, t)
        >>> torch.equal(logdet, torch.zeros(2))
        True

    Reference: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2015.
    """
    x, (shift,), mask = _prepare(x, {"shift": shift}, mask, "x")
    if B.use_native(x):
        return _native(x, None, shift, mask, _ADDITIVE, 1.0, False)
    return reference_additive_coupling(x, shift, mask)


def additive_coupling_inverse(
    y: Tensor, shift: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`additive_coupling`: ``x = y - shift``.

    Example:
        >>> y, t = torch.randn(2, 3), torch.randn(2, 3)
        >>> x, _ = additive_coupling_inverse(y, t)
        >>> torch.allclose(x + t, y)
        True
    """
    y, (shift,), mask = _prepare(y, {"shift": shift}, mask, "y")
    if B.use_native(y):
        return _native(y, None, shift, mask, _ADDITIVE, 1.0, True)
    return reference_additive_coupling_inverse(y, shift, mask)
