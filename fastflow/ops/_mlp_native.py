"""Thin wrappers over the native CPU kernel that runs a whole MLP coupling layer in one call.

The kernel (``csrc/mlp_cpu.cpp``) computes what :func:`fastflow.ops.mlp_coupling.
reference_mlp_affine_coupling` specifies: the ReLU MLP on ``[x_a, context]`` and the affine
coupling, each way, and the backward of the forward (input, context and flat-parameter
gradients) from the activations the forward stored. These functions only allocate outputs and
the workspace with torch and pass pointers (:func:`fastflow._backend.ptr`); shapes, dtypes and the
layout are the caller's to validate (``mlp_affine_coupling`` does). CPU, fp32 and fp64 only.

``mode`` is the scale function's code (:data:`fastflow.ops.coupling.SCALE_FNS`). ``acts``
(:func:`acts_layout`) holds per sample the hidden activations then the MLP output, which the
forward computes in place and the backward reads; with the soft clamp the forward replaces the
raw-scale columns of the output by ``tanh(raw / clamp)``, all the backward needs of them.
Results do not depend on the thread count (``nthreads``, default torch's).

Example:
    >>> import torch
    >>> from fastflow.ops.mlp_coupling import init_mlp_params, mlp_layout
    >>> lay = mlp_layout((1, 8, 2))
    >>> p = init_mlp_params(lay, zero_last=False)
    >>> x = torch.randn(5, 2)
    >>> y, ld, acts = forward(x, None, p, lay, 1, 0, 0, 2.0, need_acts=True)
    >>> x2, ld2 = inverse(y, None, p, lay, 1, 0, 0, 2.0)
    >>> torch.allclose(x, x2, atol=1e-6) and torch.allclose(ld, -ld2)
    True
"""

from __future__ import annotations

import threading
from functools import lru_cache

import torch
from torch import Tensor

from fastflow import _backend as B
from fastflow.ops.mlp_coupling import MLPLayout

__all__ = [
    "acts_layout",
    "backward",
    "forward",
    "inverse",
    "made_backward",
    "made_forward",
    "workspace",
]

#: acts layout of the kernel (csrc/mlp.h; _C.MLP_ACTS_ROW_ALIGN_BYTES / _ROW_QUANTUM, pinned by
#: tests/test_bindings.py): each layer's columns padded to this many bytes, rows to a multiple of
#: ACTS_ROW_QUANTUM
ACTS_ROW_ALIGN_BYTES = 64
ACTS_ROW_QUANTUM = 12


@lru_cache(maxsize=256)
def _workspace_bytes(code: int, n: int, sizes: tuple[int, ...], nthreads: int) -> int:
    return int(B._C.mlp_coupling_workspace_bytes(dtype=code, n=n, sizes=sizes, nthreads=nthreads))


@lru_cache(maxsize=256)
def _acts_shape(code: int, n: int, sizes: tuple[int, ...]) -> tuple[int, int]:
    rows, cols = B._C.mlp_coupling_acts_shape(dtype=code, n=n, sizes=sizes)
    return int(rows), int(cols)


def acts_shape_symbolic(dtype: torch.dtype, n, sizes: tuple[int, ...]) -> tuple:
    """``acts``' shape for a batch ``n`` that may be a symbolic size (fake tensors under
    torch.compile): the kernel rounds rows up to its row block, which is the row count for one
    sample, and the columns do not depend on ``n``.

    Example:
        >>> acts_shape_symbolic(torch.float32, 5, (8, 20, 2)) == _acts_shape(0, 5, (8, 20, 2))
        True
    """
    block, cols = _acts_shape(B.DTYPE_CODES[dtype], 1, tuple(sizes))
    return ((n + block - 1) // block) * block, cols


def fake_outputs(x: Tensor, sizes) -> tuple[Tensor, Tensor, Tensor]:
    """Empty ``(y, logdet, acts)`` of a whole-layer forward on ``x`` (the custom ops' fake
    implementations; ``x.shape[0]`` may be symbolic)."""
    rows, cols = acts_shape_symbolic(x.dtype, x.shape[0], tuple(sizes))
    return torch.empty_like(x), x.new_empty(x.shape[0]), x.new_empty(rows, cols)


def acts_layout(
    dtype: torch.dtype, n: int, sizes: tuple[int, ...]
) -> tuple[tuple[int, int], list[tuple[int, int] | None]]:
    """Shape ``(rows, cols)`` of ``acts`` and the ``(column offset, width)`` of each layer's
    outputs in it (hidden layers, then the MLP output; None for a layer not kept): row ``b < n``
    is sample ``b``; rows are rounded up to a multiple of 12 and each layer's columns to 64 bytes
    (the kernel computes whole register blocks in place). The first hidden layer is not kept when
    its input is narrow (``4 * sizes[0] <= sizes[1]``): the backward recomputes it from the input
    (a few FMAs per sample) rather than store and reload a row of it through memory.

    Example:
        >>> acts_layout(torch.float32, 5, (8, 20, 2))
        ((12, 48), [(0, 20), (32, 2)])
        >>> acts_layout(torch.float32, 5, (1, 64, 64, 2))
        ((12, 80), [None, (0, 64), (64, 2)])
    """
    code = B.DTYPE_CODES[dtype]
    shape = _acts_shape(code, n, tuple(sizes))
    offs = B._C.mlp_coupling_acts_columns(dtype=code, sizes=tuple(sizes))
    return shape, [None if o < 0 else (int(o), s) for o, s in zip(offs, sizes[1:])]


_local = threading.local()


def workspace(dtype: torch.dtype, n: int, sizes: tuple[int, ...], nthreads: int) -> Tensor:
    """Scratch for one call (bytes, CPU): a per-thread buffer kept between calls and grown as
    needed (the kernels hold the GIL, so one thread's calls never overlap)."""
    nbytes = _workspace_bytes(B.DTYPE_CODES[dtype], n, sizes, nthreads)
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _local.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf


def _common(x, ctx, params, layout, cut, parity, mode, clamp, nthreads):
    """The arguments every entry point shares, with the input pointers checked: ``(x made
    contiguous, keyword arguments for _C, keep)``. ``keep`` holds the contiguous copies the
    pointers point into: the caller keeps it referenced until the kernel has returned (a pointer
    into a freed temporary is a use-after-free: garbage or a crash)."""
    if not x.is_cpu:
        raise ValueError(f"the native MLP coupling kernel runs on the CPU, got {x.device}")
    x = x.contiguous()
    n, d = x.shape
    dt, dev = x.dtype, x.device
    nc = 0 if ctx is None else ctx.shape[1]
    nt = B.num_threads() if nthreads is None else nthreads
    ws = workspace(dt, n, layout.sizes, nt)
    ctx = None if ctx is None else ctx.contiguous()
    params = params.contiguous()
    kw = dict(
        dtype=B.DTYPE_CODES[dt], mode=mode, clamp=float(clamp), n=n, d=d, cut=cut, parity=parity,
        n_ctx=nc, sizes=layout.sizes, ctx_ptr=B.ptr(ctx, dt, n * nc, dev, "context"),
        params_ptr=B.ptr(params, dt, layout.numel, dev, "params"),
        workspace_ptr=B.ptr(ws), workspace_bytes=ws.numel(), nthreads=nt,
    )  # fmt: skip
    return x, kw, (ctx, params, ws)


def forward(
    x: Tensor,
    ctx: Tensor | None,
    params: Tensor,
    layout: MLPLayout,
    cut: int,
    parity: int,
    mode: int,
    clamp: float,
    need_acts: bool,
    nthreads: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(y, logdet, acts)`` of the forward map; ``acts`` is None unless ``need_acts``."""
    x, kw, keep = _common(x, ctx, params, layout, cut, parity, mode, clamp, nthreads)
    n, d = x.shape
    y = torch.empty_like(x)
    logdet = x.new_empty(n)
    shape = _acts_shape(kw["dtype"], n, layout.sizes)
    acts = torch.empty(*shape, dtype=x.dtype) if need_acts else None
    B._C.mlp_coupling_forward_cpu(
        **kw, x_ptr=B.ptr(x, x.dtype, n * d, x.device, "x"), y_ptr=B.ptr(y),
        logdet_ptr=B.ptr(logdet), acts_ptr=B.ptr(acts),
        acts_numel=0 if acts is None else acts.numel(),
    )  # fmt: skip
    return y, logdet, acts


def backward(
    x: Tensor,
    ctx: Tensor | None,
    params: Tensor,
    layout: MLPLayout,
    cut: int,
    parity: int,
    mode: int,
    clamp: float,
    acts: Tensor,
    grad_y: Tensor,
    grad_logdet: Tensor,
    nthreads: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(grad_x, grad_context, grad_params)`` of the forward, from its ``acts``; grad_context
    is None without a context."""
    x, kw, keep = _common(x, ctx, params, layout, cut, parity, mode, clamp, nthreads)
    n, d = x.shape
    dt, dev = x.dtype, x.device
    rows, cols = _acts_shape(kw["dtype"], n, layout.sizes)
    gx = torch.empty_like(x)
    gctx = None if ctx is None else torch.empty(n, kw["n_ctx"], dtype=dt)
    gp = x.new_empty(layout.numel)
    grad_y, grad_logdet = grad_y.contiguous(), grad_logdet.contiguous()  # alive through the call
    B._C.mlp_coupling_backward_cpu(
        **kw, x_ptr=B.ptr(x, dt, n * d, dev, "x"),
        acts_ptr=B.ptr(acts, dt, rows * cols, dev, "acts"), acts_numel=rows * cols,
        grad_y_ptr=B.ptr(grad_y, dt, n * d, dev, "grad_y"),
        grad_logdet_ptr=B.ptr(grad_logdet, dt, n, dev, "grad_logdet"),
        grad_x_ptr=B.ptr(gx), grad_ctx_ptr=B.ptr(gctx), grad_params_ptr=B.ptr(gp),
    )  # fmt: skip
    return gx, gctx, gp


def inverse(
    y: Tensor,
    ctx: Tensor | None,
    params: Tensor,
    layout: MLPLayout,
    cut: int,
    parity: int,
    mode: int,
    clamp: float,
    nthreads: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(x, logdet)`` of the inverse map (``logdet = -sum s``)."""
    y, kw, keep = _common(y, ctx, params, layout, cut, parity, mode, clamp, nthreads)
    n, d = y.shape
    x = torch.empty_like(y)
    logdet = y.new_empty(n)
    B._C.mlp_coupling_inverse_cpu(
        **kw, y_ptr=B.ptr(y, y.dtype, n * d, y.device, "y"), x_ptr=B.ptr(x),
        logdet_ptr=B.ptr(logdet),
    )  # fmt: skip
    return x, logdet


def _made_common(x, params, sizes, mode, clamp, nthreads):
    if not x.is_cpu:
        raise ValueError(f"the native MADE density kernel runs on the CPU, got {x.device}")
    x = x.contiguous()
    n, d = x.shape
    dt, dev = x.dtype, x.device
    nt = B.num_threads() if nthreads is None else nthreads
    ws = workspace(dt, n, sizes, nt)
    numel = sum(o * (i + 1) for i, o in zip(sizes[:-1], sizes[1:]))
    params = params.contiguous()
    kw = dict(
        dtype=B.DTYPE_CODES[dt], mode=mode, clamp=float(clamp), n=n, d=d, sizes=sizes,
        params_ptr=B.ptr(params, dt, numel, dev, "params"),
        workspace_ptr=B.ptr(ws), workspace_bytes=ws.numel(), nthreads=nt,
    )  # fmt: skip
    return x, kw, numel, (params, ws)


def made_forward(
    x: Tensor,
    params: Tensor,
    sizes: tuple[int, ...],
    mode: int,
    clamp: float,
    need_acts: bool,
    nthreads: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(u, logdet, acts)`` of the MADE density layer (``csrc/mlp.h``:
    ``made_density_forward_cpu``): ``params`` holds the **masked** weights and the biases in the
    layout of :func:`fastflow.ops.mlp_coupling.mlp_layout` of ``sizes = (D, hidden..., 2 D)``;
    the MLP output is ``(shift, raw)``."""
    x, kw, _, keep = _made_common(x, params, sizes, mode, clamp, nthreads)
    n, d = x.shape
    u = torch.empty_like(x)
    logdet = x.new_empty(n)
    acts = torch.empty(*_acts_shape(kw["dtype"], n, sizes), dtype=x.dtype) if need_acts else None
    B._C.made_density_forward_cpu(
        **kw, x_ptr=B.ptr(x, x.dtype, n * d, x.device, "x"), u_ptr=B.ptr(u),
        logdet_ptr=B.ptr(logdet), acts_ptr=B.ptr(acts),
        acts_numel=0 if acts is None else acts.numel(),
    )  # fmt: skip
    return u, logdet, acts


def made_backward(
    x: Tensor,
    params: Tensor,
    sizes: tuple[int, ...],
    mode: int,
    clamp: float,
    acts: Tensor,
    grad_u: Tensor,
    grad_logdet: Tensor,
    nthreads: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_params)`` of :func:`made_forward` from its ``acts`` (the gradient with
    respect to the masked parameters given)."""
    x, kw, numel, keep = _made_common(x, params, sizes, mode, clamp, nthreads)
    n, d = x.shape
    dt, dev = x.dtype, x.device
    rows, cols = _acts_shape(kw["dtype"], n, sizes)
    gx = torch.empty_like(x)
    gp = x.new_empty(numel)
    grad_u, grad_logdet = grad_u.contiguous(), grad_logdet.contiguous()  # alive through the call
    B._C.made_density_backward_cpu(
        **kw, x_ptr=B.ptr(x, dt, n * d, dev, "x"),
        acts_ptr=B.ptr(acts, dt, rows * cols, dev, "acts"), acts_numel=rows * cols,
        grad_u_ptr=B.ptr(grad_u, dt, n * d, dev, "grad_u"),
        grad_logdet_ptr=B.ptr(grad_logdet, dt, n, dev, "grad_logdet"),
        grad_x_ptr=B.ptr(gx), grad_params_ptr=B.ptr(gp),
    )  # fmt: skip
    return gx, gp
