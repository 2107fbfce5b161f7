"""Invertible 1x1 convolution ops (Glow): LU weight assembly and the per-pixel affine map.

* :func:`lu_weight` assembles ``W = P L (U + diag(sign_s * exp(log_s)))``, its inverse (two
  triangular inversions) and ``logdet_per_pixel = sum(log_s)`` in one call per step: O(C^3)
  once, never per pixel, and no ``slogdet`` or general matrix inverse.
* :func:`channel_affine` applies ``y[n, :, h, w] = W x[n, :, h, w] + b`` to NCHW images (or
  ``[N, C]`` rows, or any ``[N, C, *spatial]``) reading ``x`` once and writing ``y`` once; its
  backward gives the gradients for ``x``, ``W`` and ``b``.
* :func:`plain_weight` is the non-LU parameterization: ``slogdet`` for the log-det and
  ``torch.linalg.inv`` for the inverse (the reference, and an option for ``InvConv1x1(lu=False)``).

The 1x1 convolution's log-det for an image is ``H * W * logdet_per_pixel``.

Folding ActNorm into the convolution (what :class:`fastflow.nn.GlowStep` does): with ActNorm
``a(x) = exp(log_scale) * x + bias`` per channel, i.e. ``diag(e) x + t`` with
``e = exp(log_scale)`` and ``t = bias``, the pair ``W a(x) + b`` is
``(W diag(e)) x + (W t + b)``: one :func:`channel_affine` call with
``W' = W * e[None, :]`` (scale column ``j`` of ``W`` by ``e_j``) and ``b' = W t + b``. Its inverse
is ``x = diag(1/e) W^-1 (y - b')`` = ``(diag(1/e) W^-1) y - (t / e)`` when ``b = 0`` (since
``W^-1 b' = t``): again one call, with ``W'^-1 = W^-1 / e[:, None]`` (scale row ``i`` by
``1/e_i``) and bias ``-t * exp(-log_scale)``. Only C x C matrices are touched to build them.

Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastflow import _backend as B
from fastflow.ops._checks import check_device_dtype, check_float_tensor

__all__ = [
    "channel_affine",
    "lu_weight",
    "plain_weight",
    "reference_channel_affine",
    "reference_lu_weight",
]


# ----------------------------------------------------------------------------------------------
# Reference implementation: the specification. Computes in the accumulation dtype (fp32 for
# 16-bit inputs, fp64 for fp64) and rounds once on output, as the kernels do.


def _lu_factors(L: Tensor, U: Tensor, log_s: Tensor, sign_s: Tensor) -> tuple[Tensor, Tensor]:
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    lower = torch.tril(L, -1) + eye
    upper = torch.triu(U, 1) + torch.diag(sign_s * torch.exp(log_s))
    return lower, upper


def reference_lu_weight(
    P: Tensor, L: Tensor, U: Tensor, log_s: Tensor, sign_s: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Pure-PyTorch :func:`lu_weight` (the specification; differentiable by autograd)."""
    acc = B.acc_dtype(L.dtype)
    Pa, La, Ua, la, sa = (t.to(acc) for t in (P, L, U, log_s, sign_s))
    lower, upper = _lu_factors(La, Ua, la, sa)
    W = Pa @ lower @ upper
    eye = torch.eye(L.shape[0], dtype=acc, device=L.device)
    lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
    upper_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
    W_inv = upper_inv @ lower_inv @ Pa.T
    return W.to(L.dtype), W_inv.to(L.dtype), la.sum()


def reference_channel_affine(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """Pure-PyTorch :func:`channel_affine` (the specification)."""
    acc = B.acc_dtype(x.dtype)
    pixels = 1
    for s in x.shape[2:]:
        pixels *= s
    xa = x.to(acc).reshape(x.shape[0], x.shape[1], pixels)
    y = torch.matmul(W.to(acc), xa)
    if b is not None:
        y = y + b.to(acc)[:, None]
    return y.reshape(x.shape).to(x.dtype)


def plain_weight(W: Tensor, inverse: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
    """The non-LU 1x1 convolution: ``(W, W^-1, log|det W|)`` by ``torch.linalg``.

    This is what pure-PyTorch Glow implementations compute on every call (``slogdet`` for the
    log-det, ``inverse`` for sampling); :func:`lu_weight` avoids both. Computed in fp32 for
    16-bit weights (``torch.linalg`` has no 16-bit kernels), differentiable by autograd.

    Args:
        W: ``[C, C]`` weight.
        inverse: compute ``W_inv`` (else it is returned as None: the forward pass needs only the
            log-det).

    Returns:
        ``(W, W_inv, logdet_per_pixel)`` with ``logdet_per_pixel`` a scalar (fp32, fp64 for fp64).

    Raises:
        ValueError: ``W`` not square, not finite, or singular (checked for CPU tensors outside
            ``torch.compile``; on CUDA the check would cost a device sync and is skipped).

    Example:
        >>> W = torch.linalg.qr(torch.randn(4, 4))[0]
        >>> W, W_inv, ld = plain_weight(W)
        >>> torch.allclose(W @ W_inv, torch.eye(4), atol=1e-5) and abs(float(ld)) < 1e-5
        True

    Reference: Kingma & Dhariwal, "Glow", 2018 (section 3.2).
    """
    check_float_tensor("W", W, min_dim=2)
    _check_square("W", W)
    if W.shape[0] == 0:
        raise ValueError("W must have at least one channel, got shape (0, 0)")
    acc = B.acc_dtype(W.dtype)
    Wa = W.to(acc)
    sign, logabsdet = torch.linalg.slogdet(Wa)
    if _eager_cpu(W):
        if not bool(torch.isfinite(W).all()):
            raise ValueError("W has non-finite entries")
        # singular to working precision: rounding makes slogdet of an exactly singular fp32
        # matrix finite (e.g. -20), so test the reciprocal condition number instead
        with torch.no_grad():
            sv = torch.linalg.svdvals(Wa)
        tiny = sv[0] * W.shape[0] * torch.finfo(acc).eps
        if (
            float(sign.detach()) == 0.0
            or not math.isfinite(float(logabsdet.detach()))
            or bool(sv[-1] <= tiny)
        ):
            raise ValueError(
                "W is singular to working precision (smallest singular value "
                f"{float(sv[-1]):.3g} <= C * eps * largest); the 1x1 convolution is not invertible"
            )
    W_inv = torch.linalg.inv(Wa).to(W.dtype) if inverse else None
    return W, W_inv, logabsdet


# ----------------------------------------------------------------------------------------------
# Native ops. Inputs reaching these are validated and contiguous.


def _run(name: str, t: Tensor, threads: bool = True, **kw) -> None:
    """Call ``_C.<name>_cpu(**kw, nthreads=...)`` (``nthreads`` only where ``threads``) or
    ``_C.<name>_cuda(**kw, stream=...)`` for ``t`` (on ``t``'s device), by keyword."""
    if t.device.type == "cuda":
        with B.cuda_guard(t):
            getattr(B._C, name + "_cuda")(**kw, stream=B.stream_of(t))
    elif threads:
        getattr(B._C, name + "_cpu")(**kw, nthreads=B.num_threads())
    else:
        getattr(B._C, name + "_cpu")(**kw)


def _sizes(x: Tensor) -> tuple[int, int, int]:
    if x.dim() < 2:
        raise ValueError(f"x must have shape [N, C, ...], got {tuple(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    p = x.numel() // (n * c) if n * c else 0
    return n, c, p


@torch.library.custom_op("fastflow::lu_weight", mutates_args=())
def _lu_weight(
    P: Tensor, L: Tensor, U: Tensor, log_s: Tensor, sign_s: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    if L.dim() != 2 or L.shape[0] != L.shape[1] or L.dtype not in B.DTYPE_CODES:
        raise ValueError(f"L must be a floating [C, C] matrix, got {L.dtype} {tuple(L.shape)}")
    c, dt, dev = L.shape[0], L.dtype, L.device
    ptrs = {
        f"{name.lower()}_ptr": B.ptr(t, dt, k, dev, name)
        for name, t, k in (
            ("P", P, c * c), ("L", L, c * c), ("U", U, c * c), ("log_s", log_s, c),
            ("sign_s", sign_s, c),
        )
    }  # fmt: skip
    W = torch.empty_like(L)
    W_inv = torch.empty_like(L)
    logdet = torch.empty((), dtype=B.acc_dtype(dt), device=dev)
    code = B.DTYPE_CODES[dt]
    nbytes = B._C.lu_weight_workspace_bytes(dtype=code, c=c)
    ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=dev)
    _run(
        "lu_weight", L, threads=False, dtype=code, c=c, **ptrs, w_ptr=B.ptr(W),
        w_inv_ptr=B.ptr(W_inv), logdet_ptr=B.ptr(logdet), workspace_ptr=B.ptr(ws),
    )  # fmt: skip
    return W, W_inv, logdet


@_lu_weight.register_fake
def _(P, L, U, log_s, sign_s):
    return (torch.empty_like(L), torch.empty_like(L), L.new_empty((), dtype=B.acc_dtype(L.dtype)))


def _setup_lu(ctx, inputs, output):
    P, L, U, log_s, sign_s = inputs
    ctx.save_for_backward(P, L, U, log_s, sign_s, output[1])


def _backward_lu(ctx, grad_w, grad_w_inv, grad_logdet):
    # O(C^3) once per step, in torch and in the accumulation dtype: W = P A, A = L~ U~. The W^-1
    # output contributes through d(W^-1) = -W^-1 dW W^-1, i.e. grad_W -= W^-T grad_W_inv W^-T.
    # For 16-bit parameters W^-1 is rebuilt in fp32 from the factors: the saved 16-bit W^-1 may
    # have overflowed (inf * a zero gradient = NaN) and is ~10x less accurate.
    P, L, U, log_s, sign_s, W_inv = ctx.saved_tensors
    acc = B.acc_dtype(L.dtype)
    Pa, La, Ua, la, sa = (t.to(acc) for t in (P, L, U, log_s, sign_s))
    lower, upper = _lu_factors(La, Ua, la, sa)
    g = torch.zeros_like(La) if grad_w is None else grad_w.to(acc)
    if grad_w_inv is not None:
        if W_inv.dtype == acc:
            Wi = W_inv
        else:
            eye = torch.eye(La.shape[0], dtype=acc, device=La.device)
            lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
            Wi = torch.linalg.solve_triangular(upper, lower_inv @ Pa.T, upper=True)
        g = g - Wi.T @ grad_w_inv.to(acc) @ Wi.T
    g_a = Pa.T @ g
    g_lower = g_a @ upper.T
    g_upper = lower.T @ g_a
    g_log_s = torch.diagonal(g_upper) * sa * torch.exp(la)
    if grad_logdet is not None:
        g_log_s = g_log_s + grad_logdet.to(acc)
    dt = L.dtype
    return (
        None,
        torch.tril(g_lower, -1).to(dt),
        torch.triu(g_upper, 1).to(dt),
        g_log_s.to(dt),
        None,
    )


_lu_weight.register_autograd(_backward_lu, setup_context=_setup_lu)


def _channel_affine_impl(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    n, c, p = _sizes(x)
    dt, dev = x.dtype, x.device
    px = B.ptr(x, dt, x.numel(), dev, "x")
    pw, pb = B.ptr(W, dt, c * c, dev, "W"), B.ptr(b, dt, c, dev, "b")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    _run(
        "channel_affine", x, dtype=B.DTYPE_CODES[dt], n=n, c=c, p=p, x_ptr=px, w_ptr=pw,
        b_ptr=pb, y_ptr=B.ptr(y),
    )  # fmt: skip
    return y


# torch.library ops for torch.compile / opcheck / torch.ops; eager calls use _ChannelAffineFn.
_channel_affine = torch.library.custom_op(
    "fastflow::channel_affine", _channel_affine_impl, mutates_args=()
)


@_channel_affine.register_fake
def _(x, W, b):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _channel_affine_grad_params_impl(x: Tensor, grad_y: Tensor) -> tuple[Tensor, Tensor]:
    n, c, p = _sizes(x)
    px = B.ptr(x, x.dtype, x.numel(), x.device, "x")
    pg = B.ptr(grad_y, x.dtype, x.numel(), x.device, "grad_y")
    gw = x.new_empty((c, c))
    gb = x.new_empty((c,))
    code = B.DTYPE_CODES[x.dtype]
    if x.device.type == "cuda":
        nbytes = B._C.channel_affine_grad_workspace_bytes_cuda(dtype=code, n=n, c=c, p=p)
    else:
        nbytes = B._C.channel_affine_grad_workspace_bytes_cpu(
            dtype=code, c=c, nthreads=B.num_threads()
        )
    ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=x.device)
    _run(
        "channel_affine_grad_params", x, dtype=code, n=n, c=c, p=p, x_ptr=px, grad_y_ptr=pg,
        grad_w_ptr=B.ptr(gw), grad_b_ptr=B.ptr(gb), workspace_ptr=B.ptr(ws),
        workspace_bytes=nbytes,
    )  # fmt: skip
    return gw, gb


_channel_affine_grad_params = torch.library.custom_op(
    "fastflow::channel_affine_grad_params", _channel_affine_grad_params_impl, mutates_args=()
)


@_channel_affine_grad_params.register_fake
def _(x, grad_y):
    c = x.shape[1]
    return x.new_empty((c, c)), x.new_empty((c,))


def _setup_affine(ctx, inputs, output):
    x, W, b = inputs
    ctx.save_for_backward(x, W)
    ctx.has_bias = b is not None


def _affine_grads(ctx, grad_y, apply, grad_params):
    # y = W x + b per pixel: grad_x = W^T grad_y (the same kernel with W^T, no bias),
    # grad_W = sum_{n,p} grad_y x^T and grad_b = sum_{n,p} grad_y (one reduction pass).
    # `apply`/`grad_params`: the custom ops (op path) or their implementations (eager path).
    x, W = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    need_x, need_w, need_b = ctx.needs_input_grad
    gx = gw = gb = None
    if need_x:
        gx = apply(grad_y, W.t().contiguous(), None)
    if need_w or (need_b and ctx.has_bias):
        gw, gb = grad_params(x, grad_y)
    return gx, (gw if need_w else None), (gb if ctx.has_bias and need_b else None)


def _backward_affine(ctx, grad_y):
    return _affine_grads(ctx, grad_y, _channel_affine, _channel_affine_grad_params)


_channel_affine.register_autograd(_backward_affine, setup_context=_setup_affine)


class _ChannelAffineFn(torch.autograd.Function):
    """Eager native path: the same kernels and formulas as the op, without the dispatcher."""

    @staticmethod
    def forward(ctx, x, W, b):
        _setup_affine(ctx, (x, W, b), None)
        return _channel_affine_impl(x, W, b)

    @staticmethod
    def backward(ctx, grad_y):
        return _affine_grads(ctx, grad_y, _channel_affine_impl, _channel_affine_grad_params_impl)


# ----------------------------------------------------------------------------------------------
# Public functions: validate, then run native or reference.


def _eager_cpu(t: Tensor) -> bool:
    """Data-dependent checks run for CPU tensors outside torch.compile (no device sync)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_square(name: str, W: Tensor) -> None:
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"{name} must be a square [C, C] matrix, got shape {tuple(W.shape)}")


def _check_param(name: str, t: object, ref: Tensor, shape: tuple[int, ...]) -> Tensor:
    check_device_dtype(name, t, ref, "L")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return t.contiguous()


def _log_range(dtype: torch.dtype) -> float:
    # exp(log_s) must be finite and nonzero (normal) in the accumulation dtype
    acc = B.acc_dtype(dtype)
    return math.log(torch.finfo(acc).max) - 1.0


def _check_lu_values(L: Tensor, U: Tensor, log_s: Tensor) -> None:
    bound = _log_range(L.dtype)
    with torch.no_grad():  # one sync on the fast path; the detailed checks only on failure
        ok = torch.isfinite(L.sum() + U.sum()) & (log_s.abs().max() < bound)
        if bool(ok):
            return
        for name, t in (("L", L), ("U", U), ("log_s", log_s)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} has non-finite entries")
        if not bool((log_s.abs() < bound).all()):
            raise ValueError(
                "exp(log_s) overflows or underflows: W would be singular or infinite "
                f"(|log_s| must be < {bound:.1f})"
            )
    # finite entries whose sum overflowed: nothing wrong


def _check_lu_constants(P: Tensor, sign_s: Tensor) -> None:
    with torch.no_grad():
        if not bool((sign_s.abs() == 1).all()):
            raise ValueError("sign_s must contain only +1 and -1")
        if not (
            bool(((P == 0) | (P == 1)).all())
            and bool((P.sum(0) == 1).all())
            and bool((P.sum(1) == 1).all())
        ):
            raise ValueError("P must be a permutation matrix (one 1 in every row and column)")


def lu_weight(
    P: Tensor,
    L: Tensor,
    U: Tensor,
    log_s: Tensor,
    sign_s: Tensor,
    check_constants: bool = True,
    inverse: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Assemble the LU-parameterized 1x1 convolution weight, its inverse and its log-det.

    ``W = P L (U + diag(sign_s * exp(log_s)))`` with ``L`` read only below its diagonal (unit
    diagonal implied) and ``U`` only above it; ``W_inv`` by two triangular inversions;
    ``logdet_per_pixel = sum(log_s)``. One O(C^3) call per step instead of ``slogdet`` and
    ``inverse``. Differentiable with respect to ``L``, ``U`` and ``log_s`` (gradients outside
    the strict triangles are zero) and through both ``W`` and ``W_inv``; ``P`` and ``sign_s``
    are constants.

    Args:
        P: ``[C, C]`` permutation matrix.
        L: ``[C, C]``, strictly lower part used.
        U: ``[C, C]``, strictly upper part used.
        log_s: ``[C]`` log of the absolute diagonal of the upper factor.
        sign_s: ``[C]`` its signs (+1 or -1).
        check_constants: check that ``P`` is a permutation matrix and ``sign_s`` is +-1 (a
            module holding them as fixed buffers checks them once and passes False).
        inverse: also compute ``W_inv`` (else it is returned as None). The density direction
            (training) needs only ``W`` and the log-det: then ``W`` is two small matmuls with
            autograd, about 3x cheaper forward+backward than the kernel call that also inverts
            the triangles (``bench``: C = 4-256, 1 thread), so that path is taken.

    Returns:
        ``(W, W_inv, logdet_per_pixel)``: ``[C, C]`` matrices like ``L`` and a scalar (fp32, or
        fp64 for fp64 parameters). An image's log-det is ``H * W * logdet_per_pixel``.

    Raises:
        ValueError/TypeError: shape, dtype or device mismatches; for CPU tensors outside
            ``torch.compile`` also non-finite parameters, ``P`` not a permutation matrix,
            ``sign_s`` not +-1 and ``exp(log_s)`` out of range (a singular ``W``).

    Example:
        >>> C = 4
        >>> P, L, U = torch.eye(C), torch.randn(C, C), torch.randn(C, C)
        >>> log_s, sign_s = torch.randn(C) * 0.1, torch.ones(C)
        >>> W, W_inv, ld = lu_weight(P, L, U, log_s, sign_s)
        >>> torch.allclose(W @ W_inv, torch.eye(C), atol=1e-4)
        True
        >>> torch.allclose(ld, torch.linalg.slogdet(W)[1], atol=1e-4)
        True

    Reference: Kingma & Dhariwal, "Glow", 2018 (section 3.2, LU decomposition).
    """
    check_float_tensor("L", L, min_dim=2)
    _check_square("L", L)
    c = L.shape[0]
    if c == 0:
        raise ValueError("L must have at least one channel")
    P = _check_param("P", P, L, (c, c))
    U = _check_param("U", U, L, (c, c))
    log_s = _check_param("log_s", log_s, L, (c,))
    sign_s = _check_param("sign_s", sign_s, L, (c,))
    L = L.contiguous()
    if _eager_cpu(L):
        _check_lu_values(L, U, log_s)
        if check_constants:
            _check_lu_constants(P, sign_s)
    if not inverse:
        acc = B.acc_dtype(L.dtype)
        lower, upper = _lu_factors(*(t.to(acc) for t in (L, U, log_s, sign_s)))
        W = P.to(acc) @ (lower @ upper)
        return W.to(L.dtype), None, log_s.to(acc).sum()
    if B.use_native(L):
        W, W_inv, _ = _lu_weight(P, L, U, log_s, sign_s)
        # the log-det as the inverse=False path computes it, so both directions agree bitwise
        return W, W_inv, log_s.to(B.acc_dtype(L.dtype)).sum()
    return reference_lu_weight(P, L, U, log_s, sign_s)


def channel_affine(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """Per-pixel channel mixing ``y[n, :, ...] = W x[n, :, ...] + b`` (a 1x1 convolution).

    One read of ``x`` and one write of ``y``; the backward gives gradients for ``x``, ``W`` and
    ``b`` (the latter two by one reduction pass, no atomics). Combined with :func:`lu_weight`
    it is Glow's invertible 1x1 convolution, and ActNorm folds into ``W`` and ``b`` (see the
    module docstring for the algebra) so ActNorm + 1x1 convolution is a single pass.

    Args:
        x: ``[N, C]`` rows or ``[N, C, *spatial]`` (e.g. NCHW images).
        W: ``[C, C]`` matrix, same dtype and device as ``x``.
        b: optional ``[C]`` bias.

    Returns:
        ``y`` like ``x``. Sums accumulate in fp32 for 16-bit inputs.

    Example:
        >>> x, W, b = torch.randn(2, 3, 4, 4), torch.randn(3, 3), torch.randn(3)
        >>> y = channel_affine(x, W, b)
        >>> ref = torch.nn.functional.conv2d(x, W[:, :, None, None], b)
        >>> torch.allclose(y, ref, atol=1e-5)
        True

    Reference: Kingma & Dhariwal, "Glow", 2018.
    """
    check_float_tensor("x", x, min_dim=2)
    check_device_dtype("W", W, x, "x")
    _check_square("W", W)
    c = x.shape[1]
    if W.shape[0] != c:
        raise ValueError(f"W is [{W.shape[0]}, {W.shape[1]}] but x has {c} channels (x.shape[1])")
    if b is not None:
        check_device_dtype("b", b, x, "x")
        if tuple(b.shape) != (c,):
            raise ValueError(f"b must have shape ({c},), got {tuple(b.shape)}")
        b = b.contiguous()
    if x.numel() == 0 or not B.use_native(x):
        return reference_channel_affine(x, W, b)
    if torch.compiler.is_compiling():
        return _channel_affine(x.contiguous(), W.contiguous(), b)
    return _ChannelAffineFn.apply(x.contiguous(), W.contiguous(), b)
