"""Monotonic rational-quadratic (RQ) spline ops (Durkan et al., 2019), elementwise.

Each element ``x`` gets its own spline on ``[-B, B]`` with ``K`` bins, built from the
conditioner's *unnormalised* parameters (the last dim of each):

* ``widths [..., K]``, ``heights [..., K]``: ``w = min_w + (1 - K min_w) softmax(widths)``
  (times ``2B``), the same for heights, so bins have width/height at least ``2B min_w``;
* ``derivatives [..., K - 1]``: the derivatives at the ``K - 1`` interior knots,
  ``d = min_d + softplus(derivatives + c)`` with ``c = log(expm1(1 - min_d))``, so a zero
  parameter is derivative 1. The derivatives at ``-B`` and ``B`` are 1: the spline joins the
  **linear identity tails** (``y = x`` outside ``[-B, B]``) with a continuous derivative, so
  ``3K - 1`` parameters per element, and all-zero parameters are the identity map.

In bin ``k`` (knots ``x_k``, ``y_k``, width ``w``, height ``h``, slope ``s = h / w``, end
derivatives ``d_k``, ``d_k+1``) with ``theta = (x - x_k) / w``:

``y = y_k + h (s theta^2 + d_k theta (1 - theta)) / (s + (d_k+1 + d_k - 2 s) theta (1 - theta))``

and ``dy/dx = s^2 (d_k+1 theta^2 + 2 s theta (1 - theta) + d_k (1 - theta)^2) / denom^2``.

The inverse solves the quadratic ``a theta^2 + b theta + c = 0`` for the bin of ``y`` in its
numerically stable form: the discriminant ``b^2 - 4ac`` (positive in exact arithmetic for a
monotonic spline) is clamped at 0 so rounding never makes it negative, and the root is taken
as ``2c / (-b - sqrt(b^2 - 4ac))`` (``c = -s (y - y_k) <= 0``): the textbook
``(-b + sqrt(b^2 - 4ac)) / 2a`` loses every digit as ``c -> 0``, next to each bin's left
knot, and divides by ``a``, which can vanish. The root is clamped to ``[0, 1]``. Its gradient
is not taken through that ``sqrt`` (infinite where the discriminant rounds to 0) but by the
implicit-function rule at the root, ``dx = (dy - dF) / F'(x)``, with ``F'`` from the forward
formula above (a sum of positive terms): finite everywhere, including on bin edges and at
``+-B``. (First derivatives; the inverse is not twice differentiable this way.)

Log-dets are summed per sample (``[N]``) in fp32 (fp64 for fp64 input); 16-bit inputs are
computed in fp32 and rounded once. Values exactly on a knot, at ``+-B`` and batches entirely in
the tails work (the spline is evaluated on ``clamp(x, -B, B)`` and the tails selected with
``torch.where``, so no NaN/inf reaches a gradient).

Backends: :func:`rq_spline` / :func:`rq_spline_inverse` validate their arguments, then run the
native kernel (``csrc/spline*.{h,cpp,cu}``; CPU, and CUDA when built with it): one
pass over memory for the forward or inverse (normalisation, bin search, the bin's map or stable
root and the per-sample log-det sum, per element), one more for the backward (the gradients of
the input and of the three raw parameter tensors, derived by hand; the inverse's by the same
implicit rule, recomputing the root from its input). 16-bit inputs are computed in fp32 in the
kernel, as here. The pure-PyTorch reference, :func:`reference_rq_spline` /
:func:`reference_rq_spline_inverse`, is the specification the tests check and the fallback:
under ``set_backend("reference")``, without ``_C``, for more than ``_C.SPLINE_MAX_BINS`` (64)
bins. Under ``torch.compile`` the kernels run as the custom ops ``fastflow::rq_spline_fwd`` /
``fastflow::rq_spline_bwd`` (fake implementations, autograd formula). The kernel is once
differentiable (as the reference's inverse is).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastflow import _backend as B
from fastflow.ops._checks import check_finite_scalar, check_float_tensor

__all__ = [
    "DEFAULT_MIN_BIN_WIDTH",
    "DEFAULT_MIN_BIN_HEIGHT",
    "DEFAULT_MIN_DERIVATIVE",
    "check_spline_options",
    "rq_spline",
    "rq_spline_inverse",
    "rq_spline_elementwise",
    "reference_rq_spline",
    "reference_rq_spline_inverse",
    "spline_params_per_element",
]

DEFAULT_MIN_BIN_WIDTH = 1e-3
DEFAULT_MIN_BIN_HEIGHT = 1e-3
DEFAULT_MIN_DERIVATIVE = 1e-3


def spline_params_per_element(bins: int) -> int:
    """Unnormalised parameters per element: ``K`` widths, ``K`` heights, ``K - 1`` derivatives.

    Example:
        >>> spline_params_per_element(8)
        23
    """
    return 3 * int(bins) - 1


def check_spline_options(
    bins: int,
    bound: float,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
) -> tuple[int, float, float, float, float]:
    """Validate spline options (``ValueError``/``TypeError`` naming the argument); returns them
    as ``(bins, bound, min_bin_width, min_bin_height, min_derivative)``.

    ``bins >= 1``; ``bound > 0``; ``0 <= min_bin_width, min_bin_height < 1 / bins``;
    ``0 < min_derivative < 1`` (the tails' derivative is 1).

    Example:
        >>> check_spline_options(8, 3)
        (8, 3.0, 0.001, 0.001, 0.001)
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    bound = check_finite_scalar("bound", bound, positive=True)
    out = [bins, bound]
    for name, v in (("min_bin_width", min_bin_width), ("min_bin_height", min_bin_height)):
        v = check_finite_scalar(name, v)
        if not 0 <= v * bins < 1:
            raise ValueError(f"{name} must be in [0, 1 / bins) = [0, {1 / bins:.4g}), got {v!r}")
        out.append(v)
    md = check_finite_scalar("min_derivative", min_derivative)
    if not 0 < md < 1:
        raise ValueError(f"min_derivative must be in (0, 1), got {min_derivative!r}")
    out.append(md)
    return tuple(out)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# Reference implementation (the specification), elementwise.


def _knots(raw: Tensor, bound: float, min_size: float) -> Tensor:
    """Knots ``[..., K + 1]`` from unnormalised sizes ``[..., K]``: the first exactly ``-B``,
    the last exactly ``B``, the bins at least ``2 B min_size`` apart."""
    k = raw.shape[-1]
    frac = min_size + (1 - min_size * k) * torch.softmax(raw, dim=-1)
    inner = 2 * bound * torch.cumsum(frac[..., :-1], dim=-1) - bound
    ends = raw.new_full((*raw.shape[:-1], 1), bound)
    return torch.cat([-ends, inner, ends], dim=-1)


def _derivatives(raw: Tensor, min_derivative: float) -> Tensor:
    """Knot derivatives ``[..., K + 1]``: 1 at both ends, interior from ``raw [..., K - 1]``."""
    c = math.log(math.expm1(1.0 - min_derivative))
    inner = min_derivative + F.softplus(raw + c)
    one = raw.new_ones((*raw.shape[:-1], 1))
    return torch.cat([one, inner, one], dim=-1)


def _bin(knots: Tensor, v: Tensor) -> Tensor:
    """Index ``[..., 1]`` of the bin of ``v`` (in ``[-B, B]``): the number of interior knots
    ``<= v``, so a value on a knot belongs to the bin on its right and ``B`` to the last bin."""
    inner = knots[..., 1:-1]
    return (v[..., None] >= inner).sum(-1, keepdim=True)


def _bin_params(widths, heights, derivatives, bound, min_w, min_h, min_d, v, by_height):
    """``(x_k, y_k, w, h, d_k, d_k+1)`` of the bin holding ``v`` (an x, or a y if
    ``by_height``): one gather of both ends per table."""
    xs = _knots(widths, bound, min_w)
    ys = _knots(heights, bound, min_h)
    ds = _derivatives(derivatives, min_d)
    idx = _bin(ys if by_height else xs, v)
    ends = torch.cat([idx, idx + 1], dim=-1)
    x2, y2, d2 = xs.gather(-1, ends), ys.gather(-1, ends), ds.gather(-1, ends)
    xk, yk = x2[..., 0], y2[..., 0]
    return xk, yk, x2[..., 1] - xk, y2[..., 1] - yk, d2[..., 0], d2[..., 1]


def _forward_in_bin(theta, yk, h, s, d0, d1):
    """``y`` and ``log dy/dx`` of a bin at ``theta``."""
    t1 = theta * (1 - theta)
    denom = s + (d1 + d0 - 2 * s) * t1
    y = yk + h * (s * theta * theta + d0 * t1) / denom
    num = d1 * theta * theta + 2 * s * t1 + d0 * (1 - theta) * (1 - theta)
    lad = 2 * torch.log(s) + torch.log(num) - 2 * torch.log(denom)
    return y, lad


def _spline_forward(x, widths, heights, derivatives, bound, min_w, min_h, min_d):
    inside = (x >= -bound) & (x <= bound)
    xc = x.clamp(-bound, bound)
    xk, yk, w, h, d0, d1 = _bin_params(
        widths, heights, derivatives, bound, min_w, min_h, min_d, xc, False
    )
    theta = ((xc - xk) / w).clamp(0, 1)
    y, lad = _forward_in_bin(theta, yk, h, h / w, d0, d1)
    return torch.where(inside, y, x), torch.where(inside, lad, torch.zeros_like(lad))


def _spline_inverse(y, widths, heights, derivatives, bound, min_w, min_h, min_d):
    inside = (y >= -bound) & (y <= bound)
    yc = y.clamp(-bound, bound)
    xk, yk, w, h, d0, d1 = _bin_params(
        widths, heights, derivatives, bound, min_w, min_h, min_d, yc, True
    )
    s = h / w
    with torch.no_grad():  # the root's value; its gradient comes from the implicit rule below
        dy = yc - yk
        e = d1 + d0 - 2 * s
        a = h * (s - d0) + dy * e
        b = h * d0 - dy * e
        c = -s * dy
        disc = (b * b - 4 * a * c).clamp_min(0)
        theta0 = (2 * c / (-b - torch.sqrt(disc))).clamp(0, 1)
    theta = theta0
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y, widths, heights, derivatives)):
        # implicit rule at the root: F(theta; params) = y, so d theta = (dy - dF) / (dF/dtheta),
        # dF taken at the fixed theta0; the value stays theta0 exactly (v - v.detach() == 0)
        y_hat, lad_hat = _forward_in_bin(theta0, yk, h, s, d0, d1)
        # dy/dtheta = w * dy/dx = w * exp(lad)
        slope = (w * torch.exp(lad_hat)).detach()
        theta = theta0 + ((yc - yc.detach()) - (y_hat - y_hat.detach())) / slope
    x = xk + theta * w
    _, lad = _forward_in_bin(theta, yk, h, s, d0, d1)
    return torch.where(inside, x, y), torch.where(inside, -lad, torch.zeros_like(lad))


def rq_spline_elementwise(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    inverse: bool = False,
    bound: float = 3.0,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
) -> tuple[Tensor, Tensor]:
    """The spline (or its inverse) and ``log|dy/dx|`` per element, not summed (pure PyTorch;
    no argument checks: the building block of the reference ops and of the autoregressive
    degree walk). Computes in ``x``'s dtype.

    Example:
        >>> z = torch.zeros(4, 3)
        >>> y, lad = rq_spline_elementwise(torch.randn(4), z, z, z[:, :2])
        >>> lad.abs().max().item() < 1e-6  # zero parameters: the identity
        True
    """
    fn = _spline_inverse if inverse else _spline_forward
    return fn(x, widths, heights, derivatives, bound, min_bin_width, min_bin_height, min_derivative)


def _reference(x, widths, heights, derivatives, bound, min_w, min_h, min_d, mask, inverse):
    acc = B.acc_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        xa = x.to(acc)
        y, lad = rq_spline_elementwise(
            xa, widths.to(acc), heights.to(acc), derivatives.to(acc), inverse,
            bound, min_w, min_h, min_d,
        )  # fmt: skip
        if mask is not None:
            m = mask != 0
            y, lad = torch.where(m, y, xa), torch.where(m, lad, torch.zeros_like(lad))
        return y.to(x.dtype), (lad if lad.dim() == 1 else lad.flatten(1).sum(1))


def reference_rq_spline(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    bound: float = 3.0,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`rq_spline` (the specification)."""
    return _reference(
        x, widths, heights, derivatives, bound, min_bin_width, min_bin_height, min_derivative,
        mask, False,
    )  # fmt: skip


def reference_rq_spline_inverse(
    y: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    bound: float = 3.0,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch :func:`rq_spline_inverse` (the specification)."""
    return _reference(
        y, widths, heights, derivatives, bound, min_bin_width, min_bin_height, min_derivative,
        mask, True,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Public ops: validation, then the native kernel where one exists, else the reference.


def _native_kernel(t: Tensor):
    """The compiled spline entry point for ``t``'s device, or None (reference backend, no
    ``_C``, or a ``_C`` built without the spline kernels): ``_C.rq_spline_cpu`` /
    ``_C.rq_spline_cuda`` (forward and inverse; ``rq_spline_backward_*`` their backward)."""
    if B.get_backend() == "reference" or B._C is None:
        return None
    name = "rq_spline_cuda" if t.device.type == "cuda" else "rq_spline_cpu"
    return getattr(B._C, name, None)


def _use_native(x: Tensor, bins: int) -> bool:
    """Whether this call runs the native kernel: native backend for ``x``'s device, a ``_C``
    with the spline kernels, at most ``_C.SPLINE_MAX_BINS`` bins."""
    if not B.use_native(x):
        return False
    if _native_kernel(x) is None:
        return False
    return bins <= getattr(B._C, "SPLINE_MAX_BINS", 0)


def _run(name: str, t: Tensor, **kw) -> None:
    """``_C.<name>_cpu`` / ``_C.<name>_cuda`` for ``t``'s device, by keyword."""
    if t.device.type == "cuda":
        with B.cuda_guard(t):
            getattr(B._C, name + "_cuda")(**kw, stream=B.stream_of(t))
    else:
        getattr(B._C, name + "_cpu")(**kw, nthreads=B.num_threads())


def _kernel_args(v, widths, heights, derivatives, mask, opts, inverse) -> dict:
    """The arguments the forward and backward kernels share; every pointer through
    :func:`fastflow._backend.ptr` with the dtype, size and device the kernel reads."""
    bins = opts[0]
    n = v.shape[0]
    e = v.numel()
    dev, dt = v.device, v.dtype
    return dict(
        dtype=B.DTYPE_CODES[dt], n=n, m=(e // n if n else 0), bins=bins, bound=opts[1],
        min_bin_width=opts[2], min_bin_height=opts[3], min_derivative=opts[4],
        inverse=inverse, in_ptr=B.ptr(v, dt, e, dev, "x"),
        widths_ptr=B.ptr(widths, dt, e * bins, dev, "widths"),
        heights_ptr=B.ptr(heights, dt, e * bins, dev, "heights"),
        derivatives_ptr=B.ptr(derivatives, dt, e * (bins - 1), dev, "derivatives"),
        mask_ptr=B.ptr(mask, torch.uint8, e // n if n else None, dev, "mask"),
    )  # fmt: skip


def _native_fwd(v, widths, heights, derivatives, mask, opts, inverse):
    out = torch.empty_like(v, memory_format=torch.contiguous_format)
    logdet = torch.empty(v.shape[0], dtype=B.acc_dtype(v.dtype), device=v.device)
    kw = _kernel_args(v, widths, heights, derivatives, mask, opts, inverse)
    _run("rq_spline", v, **kw, out_ptr=B.ptr(out), logdet_ptr=B.ptr(logdet))
    return out, logdet


def _native_bwd(v, widths, heights, derivatives, mask, opts, inverse, grad_out, grad_logdet):
    kw = _kernel_args(v, widths, heights, derivatives, mask, opts, inverse)
    g_in = torch.empty_like(v, memory_format=torch.contiguous_format)
    gw, gh = torch.empty_like(widths), torch.empty_like(heights)
    gd = torch.empty_like(derivatives)
    _run(
        "rq_spline_backward", v, **kw,
        grad_out_ptr=B.ptr(grad_out, v.dtype, v.numel(), v.device, "grad_out"),
        grad_logdet_ptr=B.ptr(grad_logdet, B.acc_dtype(v.dtype), v.shape[0], v.device,
                              "grad_logdet"),
        grad_in_ptr=B.ptr(g_in), grad_widths_ptr=B.ptr(gw), grad_heights_ptr=B.ptr(gh),
        grad_derivatives_ptr=B.ptr(gd),
    )  # fmt: skip
    return g_in, gw, gh, gd


class _SplineFn(torch.autograd.Function):
    """Eager native path: forward or inverse in one kernel pass, backward in one more (it
    recomputes the bin, and for the inverse the root, from the saved inputs)."""

    @staticmethod
    def forward(ctx, v, widths, heights, derivatives, mask, opts, inverse):
        ctx.save_for_backward(v, widths, heights, derivatives, mask)
        ctx.opts, ctx.inverse = opts, inverse
        return _native_fwd(v, widths, heights, derivatives, mask, opts, inverse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_logdet):
        v, widths, heights, derivatives, mask = ctx.saved_tensors
        grads = _native_bwd(
            v, widths, heights, derivatives, mask, ctx.opts, ctx.inverse,
            grad_out.contiguous(), grad_logdet.contiguous(),
        )  # fmt: skip
        return (*grads, None, None, None)


# The kernels as torch.library ops (fake implementations, autograd formula): what
# torch.compile and opcheck see. Eager calls run the same implementations under _SplineFn.


def _fwd_op_impl(
    v: Tensor, widths: Tensor, heights: Tensor, derivatives: Tensor, mask: Tensor | None,
    bins: int, bound: float, min_w: float, min_h: float, min_d: float, inverse: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    opts = (bins, bound, min_w, min_h, min_d)
    return _native_fwd(v, widths, heights, derivatives, mask, opts, inverse)


def _bwd_op_impl(
    v: Tensor, widths: Tensor, heights: Tensor, derivatives: Tensor, mask: Tensor | None,
    grad_out: Tensor, grad_logdet: Tensor, bins: int, bound: float, min_w: float,
    min_h: float, min_d: float, inverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    opts = (bins, bound, min_w, min_h, min_d)
    return _native_bwd(v, widths, heights, derivatives, mask, opts, inverse, grad_out,
                       grad_logdet)  # fmt: skip


_spline_fwd_op = torch.library.custom_op("fastflow::rq_spline_fwd", _fwd_op_impl, mutates_args=())
_spline_bwd_op = torch.library.custom_op("fastflow::rq_spline_bwd", _bwd_op_impl, mutates_args=())


@_spline_fwd_op.register_fake
def _(v, widths, heights, derivatives, mask, bins, bound, min_w, min_h, min_d, inverse):
    out = torch.empty_like(v, memory_format=torch.contiguous_format)
    return out, v.new_empty(v.shape[0], dtype=B.acc_dtype(v.dtype))


@_spline_bwd_op.register_fake
def _(v, widths, heights, derivatives, mask, grad_out, grad_logdet, *opts):
    return (
        torch.empty_like(v, memory_format=torch.contiguous_format),
        torch.empty_like(widths), torch.empty_like(heights), torch.empty_like(derivatives),
    )  # fmt: skip


def _setup_op(ctx, inputs, output):
    v, widths, heights, derivatives, mask, *opts = inputs
    ctx.save_for_backward(v, widths, heights, derivatives, mask)
    ctx.opts = opts


def _backward_op(ctx, grad_out, grad_logdet):
    v, widths, heights, derivatives, mask = ctx.saved_tensors
    grads = _spline_bwd_op(
        v, widths, heights, derivatives, mask, grad_out.contiguous(),
        grad_logdet.contiguous(), *ctx.opts,
    )  # fmt: skip
    return (*grads, None, None, None, None, None, None, None)


_spline_fwd_op.register_autograd(_backward_op, setup_context=_setup_op)


def _native(v, widths, heights, derivatives, mask, opts, inverse):
    """The native kernels: custom ops while compiling, the autograd.Function in eager mode."""
    if mask is not None:
        mask = (torch.broadcast_to(mask, v.shape[1:]) != 0).to(torch.uint8).contiguous()
    args = (v.contiguous(), widths.contiguous(), heights.contiguous(), derivatives.contiguous(),
            mask)  # fmt: skip
    if torch.compiler.is_compiling():
        return _spline_fwd_op(*args, *opts, inverse)
    return _SplineFn.apply(*args, opts, inverse)


def _check(name, x, widths, heights, derivatives, bound, min_w, min_h, min_d, mask):
    check_float_tensor(name, x, min_dim=1)
    if not isinstance(widths, Tensor):
        raise TypeError(f"widths must be a torch.Tensor, got {type(widths).__name__}")
    bins = widths.shape[-1] if widths.dim() else 0
    opts = check_spline_options(bins, bound, min_w, min_h, min_d)
    for pname, t, k in (
        ("widths", widths, bins),
        ("heights", heights, bins),
        ("derivatives", derivatives, bins - 1),
    ):
        check_float_tensor(pname, t, min_dim=1)
        if tuple(t.shape) != (*x.shape, k):
            raise ValueError(
                f"{pname} must have shape {name}.shape + ({k},) = {(*x.shape, k)}, "
                f"got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{pname} is on {t.device} but {name} is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{pname} has dtype {t.dtype} but {name} has dtype {x.dtype}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        try:
            torch.broadcast_shapes(mask.shape, x.shape[1:])
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to {name}.shape[1:] = "
                f"{tuple(x.shape[1:])}"
            ) from None
        if torch.broadcast_shapes(mask.shape, x.shape[1:]) != x.shape[1:]:
            raise ValueError(f"mask must broadcast to {name}.shape[1:] = {tuple(x.shape[1:])}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but {name} is on {x.device}")
    return opts


def rq_spline(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    bound: float = 3.0,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Elementwise monotonic rational-quadratic spline with identity tails (module doc).

    Args:
        x: ``[N, ...]`` (fp32/fp64; bf16/fp16 are computed in fp32).
        widths, heights: unnormalised bin widths / heights, ``x.shape + (K,)``.
        derivatives: unnormalised interior-knot derivatives, ``x.shape + (K - 1,)``.
        bound: the spline acts on ``[-bound, bound]``; identity outside.
        min_bin_width, min_bin_height: smallest bin size as a fraction of ``2 * bound``.
        min_derivative: smallest knot derivative.
        mask: optional binary mask broadcastable to ``x.shape[1:]``; where 0, ``y = x`` and
            nothing is added to the log-det.

    Returns:
        ``(y, logdet)``: ``y`` like ``x``, ``logdet = sum log|dy/dx|`` of shape ``[N]`` (fp32,
        fp64 for fp64).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(5, 3)
        >>> w, h, d = torch.randn(5, 3, 8), torch.randn(5, 3, 8), torch.randn(5, 3, 7)
        >>> y, ld = rq_spline(x, w, h, d)
        >>> x2, ld2 = rq_spline_inverse(y, w, h, d)
        >>> # fp32 round trip: ~1e-5 typically, up to ~1e-3 where random bins are very steep
        >>> torch.allclose(x2, x, atol=1e-4), torch.allclose(ld2, -ld, atol=1e-4)
        (True, True)

    Reference: Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019.
    """
    opts = _check("x", x, widths, heights, derivatives, bound, min_bin_width, min_bin_height,
                  min_derivative, mask)  # fmt: skip
    if _use_native(x, opts[0]):
        return _native(x, widths, heights, derivatives, mask, opts, False)
    return reference_rq_spline(x, widths, heights, derivatives, *opts[1:], mask=mask)


def rq_spline_inverse(
    y: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    bound: float = 3.0,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`rq_spline` (the stable quadratic root, module doc); arguments as
    there with ``y`` in place of ``x``. Returns ``(x, logdet)``, ``logdet = -sum log|dy/dx|``
    at the solution.

    Example:
        >>> y = torch.tensor([[-3.0, 0.0, 3.0, 7.0]])  # the bounds, a value on a knot, a tail
        >>> p = torch.zeros(1, 4, 5)
        >>> x, ld = rq_spline_inverse(y, p, p, p[..., :4])
        >>> torch.allclose(x, y), ld.abs().max().item() < 1e-6  # zero parameters: the identity
        (True, True)
    """
    opts = _check("y", y, widths, heights, derivatives, bound, min_bin_width, min_bin_height,
                  min_derivative, mask)  # fmt: skip
    if _use_native(y, opts[0]):
        return _native(y, widths, heights, derivatives, mask, opts, True)
    return reference_rq_spline_inverse(y, widths, heights, derivatives, *opts[1:], mask=mask)
