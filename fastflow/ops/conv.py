"""A 3x3 "same" convolution that stays fast when the input or output has few channels.

On the CPU, oneDNN computes a convolution in blocks of 16 output channels: a 3x3 convolution to
2, 4 or 6 channels costs as much as one to 16 (measured: 128 -> 4 channels on 64x14x14 takes the
same 1.9 ms as 128 -> 16, i.e. 60 GFLOP/s against ~240 for wide layers). Glow's conditioner has
two such convolutions per coupling: its last layer (hidden -> 2 * C_b channels, e.g. 4 on MNIST)
and the input gradient of its first layer (hidden -> C_a channels, e.g. 2). :func:`conv3x3`
computes those as *one* 1x1 convolution to ``9 * C_out`` channels (all nine taps at once, so the
channel blocks are full) followed by the sum of the nine shifted tap images; the weight gradient
likewise as one 1x1 weight gradient over the nine shifted copies of the output gradient. Same
result up to rounding (a different summation order); which form runs is chosen per direction by
the channel count (:data:`TAP_SPLIT_MAX_OUT`, :data:`TAP_SPLIT_MAX_WGRAD`, measured; see
docs/DESIGN-NOTES.md, "Narrow 3x3 convolutions").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastflow import _backend as B

__all__ = [
    "conv3x3",
    "conv_mlp3",
    "conv_net3",
    "TAP_SPLIT_MAX_OUT",
    "TAP_SPLIT_MAX_WGRAD",
    "CONV_MLP_MAX_MACS",
]

# oneDNN's kernels differ by ISA: the thresholds below are per CPU capability (torch's view of
# the CPU: "AVX512", "AVX2", ...).
_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
# A 3x3 convolution (or the input gradient, which is a convolution to C_in channels) to at most
# this many channels runs as one 1x1 convolution to 9x the channels + a tap sum. Measured on
# oneDNN (fp32, 1 and 2 threads, 14x14 and 16x16 images, 128-256 hidden channels): AVX-512
# 1.2-2.5x faster for 1-8 output channels, equal at 12, slower above; with oneDNN capped at AVX2
# (ONEDNN_MAX_CPU_ISA=AVX2, same CPU) 2.1x at 2 channels, 1.5x at 4, 1.0x at 8.
TAP_SPLIT_MAX_OUT = 8 if _AVX512 else 4
# The weight gradient's tap form: AVX-512 wins up to 6 output channels (equal at 8, slower at
# 12); AVX2 1.26x at 2 channels, 0.82x at 4 (its 1x1 weight gradient is slow).
TAP_SPLIT_MAX_WGRAD = 6 if _AVX512 else 2
# Below this many output pixels (N * H * W) the nine slice operations of the tap form cost more
# than the waste they save; the plain convolution runs.
TAP_SPLIT_MIN_PIXELS = 4096

_TAPS = tuple((ky - 1, kx - 1) for ky in range(3) for kx in range(3))


def _windows(h: int, w: int, dy: int, dx: int) -> tuple[slice, slice, slice, slice]:
    """Output rows/cols that tap (dy, dx) reaches and the matching input rows/cols:
    out[y, x] += in[y + dy, x + dx] for 0 <= y + dy < h, 0 <= x + dx < w."""
    y0, y1 = max(0, -dy), h - max(0, dy)
    x0, x1 = max(0, -dx), w - max(0, dx)
    return slice(y0, y1), slice(x0, x1), slice(y0 + dy, y1 + dy), slice(x0 + dx, x1 + dx)


def _use_taps(pixels: int, channels: int, limit: int) -> bool:
    return channels <= limit and pixels >= TAP_SPLIT_MIN_PIXELS


def _tap_shift(g: Tensor, n: int, h: int, w: int, c: int) -> Tensor:
    """[P, c] (pixels of channels-last images) -> [P, 9c]: out[p, t c + o] = g[p - d_t, o]."""
    out = torch.empty((n * h * w, 9 * c), dtype=g.dtype)
    B._C.conv_tap_shift_cpu(
        dtype=B.DTYPE_CODES[g.dtype], n=n, h=h, w=w, c=c,
        grad_ptr=B.ptr(g, g.dtype, n * h * w * c, _CPU, "grad"),
        shifted_ptr=B.ptr(out, g.dtype, n * h * w * 9 * c, _CPU, "shifted"),
        nthreads=B.num_threads(),
    )  # fmt: skip
    return out


def _tap_sum(y: Tensor, n: int, h: int, w: int, c: int, bias: Tensor | None = None) -> Tensor:
    """[P, 9c] -> [P, c]: out[p, o] = bias[o] + sum_t y[p + d_t, t c + o]."""
    out = torch.empty((n * h * w, c), dtype=y.dtype)
    B._C.conv_tap_sum_cpu(
        dtype=B.DTYPE_CODES[y.dtype], n=n, h=h, w=w, c=c,
        taps_ptr=B.ptr(y, y.dtype, n * h * w * 9 * c, _CPU, "taps"),
        bias_ptr=B.ptr(bias, y.dtype, c, _CPU, "bias"),
        out_ptr=B.ptr(out, y.dtype, n * h * w * c, _CPU, "out"),
        nthreads=B.num_threads(),
    )  # fmt: skip
    return out


def _conv_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """conv2d(x, weight, bias, padding=1), in the tap form where the output is narrow."""
    n, _, h, w = x.shape
    co = weight.shape[0]
    if not _use_taps(n * h * w, co, TAP_SPLIT_MAX_OUT):
        return F.conv2d(x, weight, bias, padding=1)
    # [co, ci, 3, 3] -> [9 * co, ci, 1, 1]: output channel t * co + o is tap t of channel o.
    wall = weight.permute(2, 3, 0, 1).reshape(9 * co, weight.shape[1], 1, 1)
    taps = F.conv2d(x, wall)
    if _native(taps):
        b = None if bias is None else bias.detach().contiguous()
        out = _tap_sum(_nhwc(taps).reshape(-1, 9 * co), n, h, w, co, b)
        return out.view(n, h, w, co).permute(0, 3, 1, 2)  # channels-last [N, co, H, W]
    centre = taps[:, 4 * co : 5 * co]
    out = centre.clone() if bias is None else centre + bias.view(1, -1, 1, 1)
    for t, (dy, dx) in enumerate(_TAPS):
        if t == 4:
            continue
        oy, ox, iy, ix = _windows(h, w, dy, dx)
        out[:, :, oy, ox] += taps[:, t * co : (t + 1) * co, iy, ix]
    return out


def _conv_weight_grad(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """d loss / d weight of conv2d(x, weight, padding=1) given the output gradient."""
    n, co, h, w = grad.shape
    ci = x.shape[1]
    if not _use_taps(n * h * w, co, TAP_SPLIT_MAX_WGRAD):
        return torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
        )[1]
    # gw[o, i, tap] = sum_{y,x} grad[o, y, x] * x[i, y + dy, x + dx]
    #             = sum_{y',x'} shifted_t(grad)[o, y', x'] * x[i, y', x'],
    # with shifted_t(grad)[y + dy, x + dx] = grad[y, x]: one 1x1 weight gradient over 9*co.
    if _native(grad):
        shifted = _tap_shift(_nhwc(grad).reshape(-1, co), n, h, w, co)
        shifted = shifted.view(n, h, w, 9 * co).permute(0, 3, 1, 2)
    else:
        shifted = grad.new_zeros((n, 9 * co, h, w)).contiguous(memory_format=_format_of(grad))
        for t, (dy, dx) in enumerate(_TAPS):
            oy, ox, iy, ix = _windows(h, w, dy, dx)
            shifted[:, t * co : (t + 1) * co, iy, ix] = grad[:, :, oy, ox]
    gw = torch.ops.aten.convolution_backward(
        shifted,
        x,
        weight.new_empty((9 * co, ci, 1, 1)),
        None,
        [1, 1],
        [0, 0],
        [1, 1],
        False,
        [0, 0],
        1,
        [False, True, False],
    )[1]
    return gw.view(3, 3, co, ci).permute(2, 3, 0, 1).contiguous()


_CPU = torch.device("cpu")


def _native(t: Tensor) -> bool:
    """The tap kernels (csrc/conv_taps_cpu.cpp) take this tensor: a channels-last CPU fp32/fp64
    image (or, 2-D, a contiguous ``[rows, C]`` matrix) outside autograd recording (the slice code
    below is the differentiable fallback used by double backward) and outside torch.compile, with
    the native backend available."""
    layout = torch.contiguous_format if t.dim() == 2 else torch.channels_last
    return (
        t.dtype in (torch.float32, torch.float64)
        and t.is_contiguous(memory_format=layout)
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and B.use_native(t)
        and hasattr(B._C, "conv_tap_sum_cpu")
    )


def _nhwc(t: Tensor) -> Tensor:
    """A channels-last [N, C, H, W] tensor as the contiguous [N, H, W, C] buffer it is."""
    return t.permute(0, 2, 3, 1)


def _rows_as_image(rows: Tensor, n: int, h: int, w: int) -> Tensor:
    """A ``[N * H * W, C]`` pixel-row matrix as the channels-last ``[N, C, H, W]`` image it is."""
    return rows.view(n, h, w, rows.shape[1]).permute(0, 3, 1, 2)


def _like(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` in ``param``'s memory layout (a no-op when they agree)."""
    return grad.contiguous(memory_format=_format_of(param))


def _format_of(t: Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=_format_of(x))
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # The input gradient is the convolution of grad with the flipped, transposed kernel.
            gx = _conv_forward(grad, weight.flip(2, 3).transpose(0, 1), None)
        if ctx.needs_input_grad[1]:
            gw = _conv_weight_grad(grad, x, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3))
        return gx, gw, gb


def conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel (stride 1, no dilation or groups),
    faster on the CPU when the output or input has at most 8 channels (see the module docstring).
    Equal to ``F.conv2d`` up to rounding; differentiable (also twice) in ``x``, ``weight`` and
    ``bias``.

    Args:
        x: ``[N, C_in, H, W]``, channels-last for the speed-up (any layout is accepted).
        weight: ``[C_out, C_in, 3, 3]``.
        bias: ``[C_out]`` or None.

    Example:
        >>> x, w = torch.randn(2, 16, 8, 8), torch.randn(3, 16, 3, 3)
        >>> y = conv3x3(x, w)
        >>> bool(torch.allclose(y, F.conv2d(x, w, padding=1), atol=1e-4))
        True
    """
    if x.dim() != 4:
        raise ValueError(f"conv3x3: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"conv3x3: weight must be [C_out, {x.shape[1]}, 3, 3], got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"conv3x3: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    return _Conv3x3.apply(x, weight, bias)


# ------------------------------------------------------------------------------------------------
# Glow's whole conditioner (3x3 conv -> ReLU -> 1x1 conv -> ReLU -> 3x3 conv) as matrix products
# for small inputs.

# Up to this many multiply-adds per call (pixels x (9 C_in h + h^2 + 9 h C_out)) and with at most
# this many input and output channels, the conditioner runs as one autograd node of matrix
# products (conv_mlp3) instead of oneDNN convolutions (conv_net3). Measured per CPU vendor (fwd +
# bwd of one conditioner, fp32, NCHW output gradient as in a Glow step, 1 and 2 threads):
# * AMD EPYC Zen 5: oneDNN's fixed cost per call (~40-50 us) dominates small images: 1.36-1.88x at
#   1-8M MACs (Glow's 1x8x8 levels), 1.16x at 7.7M, 1.0-1.16x at 17-24M, 0.81x at 31M; 16 output
#   channels 0.8x.
# * Intel Xeon (Sapphire Rapids): the matrix products win at every Glow level benchmarked: 2.0-2.4x
#   at 3-8M (1x8x8), 1.09-1.35x at 95-292M (1x28x28, hidden 128), 1.07-1.31x at 118-304M with 24
#   and 48 output channels and 1.01x / 1.04x (1 / 2 threads) at 877M (3x32x32, hidden 256); with
#   hidden 512 (the README's Glow) 1.08-1.10x / 1.01-1.14x at 1.75-5.65G; larger sizes were not
#   measured and keep oneDNN. docs/DESIGN-NOTES.md, "Glow's conditioner on the Intel runner".
if B.cpu_vendor() == "amd":
    CONV_MLP_MAX_MACS, CONV_MLP_MAX_CHANNELS = 12_000_000, 8
else:
    CONV_MLP_MAX_MACS, CONV_MLP_MAX_CHANNELS = 6_000_000_000, 48


def conv_mlp3_macs(n: int, h: int, w: int, c_in: int, hidden: int, c_out: int) -> int:
    """Multiply-adds of one forward of the 3-1-3 conditioner on ``n`` images of ``h x w``."""
    return n * h * w * (9 * c_in * hidden + hidden * hidden + 9 * hidden * c_out)


def _conv_mlp3_plain(x, w1, b1, w2, b2, w3, b3):
    h1 = torch.relu(F.conv2d(x, w1, b1, padding=1))
    h2 = torch.relu(F.conv2d(h1, w2, b2))
    return F.conv2d(h2, w3, b3, padding=1)


def _differentiable_grads(ctx, ins: tuple[Tensor, ...], grad: Tensor) -> tuple:
    """The 3-1-3 net's input gradients as a differentiable graph (for ``create_graph``): autograd
    through the plain convolutions from the saved inputs, whose graphs reach the originals."""
    need = [t for t, r in zip(ins, ctx.needs_input_grad) if r]
    got = iter(torch.autograd.grad(_conv_mlp3_plain(*ins), need, grad, create_graph=True))
    return tuple(next(got) if r else None for r in ctx.needs_input_grad)


def _im2col(x: Tensor) -> Tensor:
    """The first layer's im2col ``[N H W, 9 C_in]`` of a channels-last image (see
    :func:`_mlp3_forward`)."""
    n, ci, h, w = x.shape
    return _tap_shift(x.permute(0, 2, 3, 1).contiguous().view(-1, ci), n, h, w, ci)


def _mlp3_forward(x, w1, b1, w2, b2, w3, b3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """conv_mlp3's forward on the native passes (grad mode off): ``(out, x9, h1, h2)``, the
    output as ``[N H W, C_out]`` pixel rows and the activations its backward reads."""
    n, ci, h, w = x.shape
    hid, co = w1.shape[0], w3.shape[0]
    # im2col by the tap shift: x9[p, t c + i] = x[p - d_t, i] = x[p + d_(8-t), i], so the
    # first layer's taps are flipped to match.
    x9 = _im2col(x)
    w1c = w1.flip(2, 3).permute(0, 2, 3, 1).reshape(hid, 9 * ci)
    h1 = _mm_bias_relu(x9, w1c.t(), b1)
    w2m = w2.reshape(hid, hid)
    h2 = _mm_bias_relu(h1, w2m.t(), b2)
    w3a = w3.permute(2, 3, 0, 1).reshape(9 * co, hid)  # tap form: channel t * co + o
    out = _tap_sum(h2 @ w3a.t(), n, h, w, co, b3.detach().contiguous())
    return out, x9, h1, h2


def _mlp3_backward(g, x, w1, w2, w3, x9, h1, h2, need_x: bool) -> tuple:
    """conv_mlp3's backward from the output gradient as contiguous ``[N H W, C_out]`` rows:
    ``(gx rows or None, gw1, gb1, gw2, gb2, gw3, gb3)``, the weight gradients in whatever
    layout their products leave (the callers put them in the weights' layouts). ``x9=None``
    rebuilds the im2col from ``x`` (the eager path does not keep it; see _ConvMLP3)."""
    n, ci, h, w = x.shape
    hid, co = w1.shape[0], w3.shape[0]
    g9 = _tap_shift(g, n, h, w, co)  # the adjoint of the tap sum
    w3a = w3.permute(2, 3, 0, 1).reshape(9 * co, hid)
    gh2 = g9 @ w3a
    gb2 = _relu_grad_sum(_rows_as_image(gh2, n, h, w), _rows_as_image(h2, n, h, w))
    gh1 = gh2 @ w2.reshape(hid, hid)
    gb1 = _relu_grad_sum(_rows_as_image(gh1, n, h, w), _rows_as_image(h1, n, h, w))
    gx = None
    if need_x:
        w1c = w1.flip(2, 3).permute(0, 2, 3, 1).reshape(hid, 9 * ci)
        gx = _tap_sum(gh1 @ w1c, n, h, w, ci)  # the adjoint of the im2col shift
    if x9 is None:
        x9 = _im2col(x)
    # x9^T gh1 ([9 ci, hid]), transposed after: MKL runs the product with the short side as
    # the output's rows 1.7-2x faster than gh1^T x9 at Glow's level-0 sizes (1 and 2 threads)
    gw1 = (x9.t() @ gh1).t().reshape(hid, 3, 3, ci).permute(0, 3, 1, 2).flip(2, 3)
    gw2 = (gh2.t() @ h1).view(hid, hid, 1, 1)
    gw3 = (g9.t() @ h2).view(3, 3, co, hid).permute(2, 3, 0, 1)
    return gx, gw1, gb1, gw2, gb2, gw3, g.sum(0)


def _image_of_rows(rows: Tensor, like: Tensor) -> Tensor:
    """:func:`_rows_as_image` with the image size of ``like`` ([N, C, H, W])."""
    return _rows_as_image(rows, like.shape[0], like.shape[2], like.shape[3])


class _ConvMLP3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3):
        out, _x9, h1, h2 = _mlp3_forward(x, w1, b1, w2, b2, w3, b3)
        # the im2col (9 C_in columns a pixel: 0.84x the hidden width at Glow 3x16x16 h64) is not
        # kept: the backward rebuilds it from x with one tap shift (docs/DESIGN-NOTES.md, "The
        # tap kernels at Glow's narrow widths")
        ctx.save_for_backward(x, w1, b1, w2, b2, w3, b3, h1, h2)
        return _image_of_rows(out, x)

    @staticmethod
    def backward(ctx, grad):
        x, w1, b1, w2, b2, w3, b3, h1, h2 = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph: differentiate the plain convolutions instead (same function), so
            # that the gradient is itself differentiable.
            return _differentiable_grads(ctx, (x, w1, b1, w2, b2, w3, b3), grad)
        g = grad.permute(0, 2, 3, 1).contiguous().view(-1, w3.shape[0])
        gx, gw1, gb1, gw2, gb2, gw3, gb3 = _mlp3_backward(
            g, x, w1, w2, w3, None, h1, h2, ctx.needs_input_grad[0]
        )  # x9=None: rebuilt from x
        gx = None if gx is None else _image_of_rows(gx, x)
        return gx, _like(gw1, w1), gb1, _like(gw2, w2), gb2, _like(gw3, w3), gb3


# The same forward and backward as torch.library ops, for torch.compile: a compiled Glow calls
# them instead of compiling the plain convolutions (the eager path keeps the autograd.Function,
# without the dispatcher's cost per call). Outputs are fresh contiguous buffers (the output and
# input gradient as pixel rows, viewed as images outside the op), so the fake implementations
# below state their layouts exactly.
@torch.library.custom_op("fastflow::conv_mlp3_fwd", mutates_args=())
def _mlp3_fwd_op(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_net3(x, w1, b1, w2, b2, w3, b3, "fastflow::conv_mlp3_fwd")
    with torch.no_grad():
        return _mlp3_forward(x, w1, b1, w2, b2, w3, b3)


@_mlp3_fwd_op.register_fake
def _(x, w1, b1, w2, b2, w3, b3):
    n, ci, h, w = x.shape
    rows, hid = n * h * w, w1.shape[0]
    new = x.new_empty
    return new((rows, w3.shape[0])), new((rows, 9 * ci)), new((rows, hid)), new((rows, hid))


@torch.library.custom_op("fastflow::conv_mlp3_bwd", mutates_args=())
def _mlp3_bwd_op(
    g: Tensor, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, x9: Tensor, h1: Tensor, h2: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_mlp3_saved(g, x, w1, w3, x9, h1, h2)
    with torch.no_grad():
        gx, gw1, gb1, gw2, gb2, gw3, gb3 = _mlp3_backward(g, x, w1, w2, w3, x9, h1, h2, True)
        # the weight gradients with exactly the strides of empty_like(weight) (the fake below;
        # _like may keep other strides on size-1 dims)
        gw1, gw2, gw3 = (
            torch.empty_like(wt).copy_(gt) for wt, gt in ((w1, gw1), (w2, gw2), (w3, gw3))
        )
        return gx, gw1, gb1, gw2, gb2, gw3, gb3


@_mlp3_bwd_op.register_fake
def _(g, x, w1, w2, w3, x9, h1, h2):
    n, ci, h, w = x.shape
    hid, co = w1.shape[0], w3.shape[0]
    e = torch.empty_like
    return (x.new_empty((n * h * w, ci)), e(w1), x.new_empty((hid,)), e(w2),
            x.new_empty((hid,)), e(w3), x.new_empty((co,)))  # fmt: skip


def _check_mlp3_saved(g, x, w1, w3, x9, h1, h2) -> None:
    """The backward op's own arguments (a direct ``torch.ops`` call can pass anything): the output
    gradient and the forward's activations as contiguous pixel-row matrices of x's size and dtype
    (the weights are checked by the forward op)."""
    n, ci, h, w = x.shape
    rows, hid, co = n * h * w, w1.shape[0], w3.shape[0]
    for name, t, cols in (("g", g, co), ("x9", x9, 9 * ci), ("h1", h1, hid), ("h2", h2, hid)):
        if tuple(t.shape) != (rows, cols) or t.dtype != x.dtype or not t.is_contiguous():
            raise ValueError(
                f"fastflow::conv_mlp3_bwd: {name} must be a contiguous [{rows}, {cols}] "
                f"{x.dtype} tensor, got {tuple(t.shape)} {t.dtype}"
                + ("" if t.is_contiguous() else " (not contiguous)")
            )


def _setup_mlp3_op(ctx, inputs, output):
    x, w1, b1, w2, b2, w3, b3 = inputs
    _, x9, h1, h2 = output
    ctx.mark_non_differentiable(x9, h1, h2)
    ctx.save_for_backward(x, w1, b1, w2, b2, w3, b3, x9, h1, h2)


def _backward_mlp3_op(ctx, grad, *_activations):
    x, w1, b1, w2, b2, w3, b3, x9, h1, h2 = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: differentiable, through the plain convolutions
        return _differentiable_grads(ctx, (x, w1, b1, w2, b2, w3, b3), _image_of_rows(grad, x))
    gx, *rest = _mlp3_bwd_op(grad.contiguous(), x, w1, w2, w3, x9, h1, h2)
    return _image_of_rows(gx, x), *rest


_mlp3_fwd_op.register_autograd(_backward_mlp3_op, setup_context=_setup_mlp3_op)


def _check_net3(x, w1, b1, w2, b2, w3, b3, fn: str) -> None:
    if x.dim() != 4 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{fn}: x must be a [N, C, H, W] fp32/fp64 CPU tensor")
    ci, hid, co = x.shape[1], w1.shape[0], w3.shape[0]
    for name, t, shape in (
        ("w1", w1, (hid, ci, 3, 3)), ("b1", b1, (hid,)), ("w2", w2, (hid, hid, 1, 1)),
        ("b2", b2, (hid,)), ("w3", w3, (co, hid, 3, 3)), ("b3", b3, (co,)),
    ):  # fmt: skip
        if tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"{fn}: {name} must be {shape} {x.dtype} on {x.device}, got "
                f"{tuple(t.shape)} {t.dtype} on {t.device}"
            )


def conv_mlp3(x, w1, b1, w2, b2, w3, b3) -> Tensor:
    """Glow's conditioner ``conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3`` ("same" padding,
    stride 1, biases) as matrix products in one autograd node: the image's pixels as rows, the
    3x3 layers through the native tap shift / tap sum (im2col of the few input channels; the tap
    form of the few output channels; the hidden ReLUs with their biases in one native pass each
    way). Equal to the convolutions up to rounding; used up to :data:`CONV_MLP_MAX_MACS` (per CPU
    vendor: on AMD for small inputs, where a oneDNN convolution's fixed cost per call dominates;
    on Intel, where MKL's products beat oneDNN's convolutions, at every Glow size). Returns
    ``[N, C_out, H, W]`` in channels-last memory. Double backward works (it differentiates the
    plain convolutions). Under ``torch.compile`` it is the ops ``fastflow::conv_mlp3_fwd`` /
    ``fastflow::conv_mlp3_bwd`` (same values and layout).

    Example:
        >>> x = torch.randn(4, 2, 4, 4)
        >>> w1, b1 = torch.randn(8, 2, 3, 3), torch.randn(8)
        >>> w2, b2 = torch.randn(8, 8, 1, 1), torch.randn(8)
        >>> w3, b3 = torch.randn(4, 8, 3, 3), torch.randn(4)
        >>> y = conv_mlp3(x, w1, b1, w2, b2, w3, b3)
        >>> ref = _conv_mlp3_plain(x, w1, b1, w2, b2, w3, b3)
        >>> bool(torch.allclose(y, ref, atol=1e-4))
        True
    """
    _check_net3(x, w1, b1, w2, b2, w3, b3, "conv_mlp3")
    if not B.use_native(x) or not hasattr(B._C, "conv_tap_sum_cpu"):
        return _conv_mlp3_plain(x, w1, b1, w2, b2, w3, b3)
    if torch.compiler.is_compiling():
        return _image_of_rows(_mlp3_fwd_op(x, w1, b1, w2, b2, w3, b3)[0], x)
    return _ConvMLP3.apply(x, w1, b1, w2, b2, w3, b3)


def _relu_grad_sum(grad: Tensor, act: Tensor) -> Tensor:
    """ReLU's backward in place (``grad`` masked where the ReLU's output ``act`` is <= 0) and the
    bias gradient of the layer before it (``grad.sum((0, 2, 3))`` after the mask): one native pass
    over channels-last buffers, else ``threshold_backward`` and a sum. ``grad`` must be a buffer
    the caller owns."""
    if _native(grad) and act.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = grad.shape
        rows = n * h * w
        out = torch.empty(c, dtype=grad.dtype)
        gv, av = _nhwc(grad), _nhwc(act)  # the [P, C] buffers, named through the call
        B._C.relu_grad_sum_cpu(
            dtype=B.DTYPE_CODES[grad.dtype], rows=rows, c=c,
            grad_ptr=B.ptr(gv, grad.dtype, rows * c, _CPU, "grad"),
            act_ptr=B.ptr(av, grad.dtype, rows * c, _CPU, "act"),
            sum_ptr=B.ptr(out, grad.dtype, c, _CPU, "sum"),
            nthreads=B.num_threads(),
        )  # fmt: skip
        return out
    torch.ops.aten.threshold_backward.grad_input(grad, act, 0, grad_input=grad)
    return grad.sum((0, 2, 3))


def _mm_bias_relu(a: Tensor, b: Tensor, bias: Tensor) -> Tensor:
    """``relu(a @ b + bias)`` for ``[P, K] @ [K, C]``: the product without its bias, then the
    bias and the ReLU in one native pass in place (csrc/conv_taps_cpu.cpp, bias_relu_cpu), instead
    of addmm (which first copies the broadcast bias into the output) and a second ReLU pass."""
    y = torch.mm(a, b)
    if not (_native(y) and hasattr(B._C, "bias_relu_cpu")):
        return y.add_(bias).relu_()
    rows, c = y.shape
    bias = bias.detach().contiguous()
    B._C.bias_relu_cpu(
        dtype=B.DTYPE_CODES[y.dtype], rows=rows, c=c,
        y_ptr=B.ptr(y, y.dtype, rows * c, _CPU, "y"),
        bias_ptr=B.ptr(bias, y.dtype, c, _CPU, "bias"),
        nthreads=B.num_threads(),
    )  # fmt: skip
    return y


def _conv_input_grad(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """d loss / d x of conv2d(x, weight, padding=1) given the output gradient: the tap form when
    the input is narrow, else oneDNN's backward-data primitive on the weight as it is (no flipped,
    transposed copy of the kernel; 1.0-1.2x faster than the convolution with that copy, measured
    on Glow's 3x32x32 levels)."""
    n, ci, h, w = x.shape
    if _use_taps(n * h * w, ci, TAP_SPLIT_MAX_OUT):
        return _conv_forward(grad, weight.flip(2, 3).transpose(0, 1), None)
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]
    )[0]


# conv_net3's last 3x3 layer (hidden -> 2 C_b channels) as one matrix product to its nine taps +
# the native tap sum, and its backward through one shared tap shift of the output gradient:
# MKL's products run 80-98 GFLOP/s at these shapes against oneDNN's 53-80 for a 3x3 convolution
# to 12-48 channels (Intel Xeon; 1.03-1.12x per conditioner). False: the convolutions.
NET3_GEMM_LAST = True


class _ConvNet3(torch.autograd.Function):
    """The 3-1-3 conditioner on oneDNN convolutions in one autograd node: the ReLUs run in place
    forward and backward (the backward owns every gradient buffer it masks) with the bias sums in
    the same pass (:func:`_relu_grad_sum`), the narrow 3x3 directions take the tap form (as
    :func:`conv3x3`). Weights are used in the layout oneDNN reads (channels-last; a parameter
    kept channels-last, as :class:`~fastflow.nn.ChannelsLastSequential` keeps them, is not
    copied)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3):
        cl = _format_of(x)
        w1c, w3c = w1.contiguous(memory_format=cl), w3.contiguous(memory_format=cl)
        h1 = _conv_forward(x, w1c, b1).relu_()
        h2 = F.conv2d(h1, w2, b2).relu_()
        ctx.gemm_last = NET3_GEMM_LAST and _native(h2)
        if ctx.gemm_last:
            # the last layer as one matrix product to its nine taps and the native tap sum
            n, hid, h, w = h2.shape
            co = w3.shape[0]
            taps = _nhwc(h2).reshape(-1, hid) @ w3.permute(2, 3, 0, 1).reshape(9 * co, hid).t()
            out = _rows_as_image(_tap_sum(taps, n, h, w, co, b3.detach().contiguous()), n, h, w)
        else:
            out = _conv_forward(h2, w3c, b3)
        ctx.save_for_backward(x, w1, b1, w2, b2, w3, b3, h1, h2)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w1, b1, w2, b2, w3, b3, h1, h2 = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable gradient (see _ConvMLP3)
            return _differentiable_grads(ctx, (x, w1, b1, w2, b2, w3, b3), grad)
        cl = _format_of(h2)
        grad = grad.contiguous(memory_format=cl)
        w1c, w3c = w1.contiguous(memory_format=cl), w3.contiguous(memory_format=cl)
        if ctx.gemm_last and _native(grad):
            # adjoint of the tap form: the nine shifted copies of grad, shared by both products
            n, hid, h, w = h2.shape
            co = w3.shape[0]
            g9 = _tap_shift(_nhwc(grad).reshape(-1, co), n, h, w, co)
            gh2 = _rows_as_image(g9 @ w3.permute(2, 3, 0, 1).reshape(9 * co, hid), n, h, w)
            gw3 = (g9.t() @ _nhwc(h2).reshape(-1, hid)).view(3, 3, co, hid).permute(2, 3, 0, 1)
        else:
            gw3 = _conv_weight_grad(grad, h2, w3c)
            gh2 = _conv_input_grad(grad, h2, w3c)
        gb2 = _relu_grad_sum(gh2, h2)
        gh1, gw2, _ = torch.ops.aten.convolution_backward(
            gh2, h1, w2, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False]
        )
        gb1 = _relu_grad_sum(gh1, h1)
        gx = _conv_input_grad(gh1, x, w1c) if ctx.needs_input_grad[0] else None
        gw1 = _conv_weight_grad(gh1, x, w1c)
        # in each parameter's own layout: autograd copies a gradient whose strides differ
        gw1, gw3 = _like(gw1, w1), _like(gw3, w3)
        return gx, gw1, gb1, gw2, gb2, gw3, grad.sum((0, 2, 3))


def conv_net3(x, w1, b1, w2, b2, w3, b3) -> Tensor:
    """Glow's conditioner ``conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3`` on the convolution
    primitives in one autograd node (in-place ReLUs forward and backward, the tap form for narrow
    3x3 directions); for inputs above :func:`conv_mlp3`'s size. Same arguments and result as
    :func:`conv_mlp3` (up to rounding); double backward works.

    Example:
        >>> x = torch.randn(4, 2, 4, 4)
        >>> w1, b1 = torch.randn(8, 2, 3, 3), torch.randn(8)
        >>> w2, b2 = torch.randn(8, 8, 1, 1), torch.randn(8)
        >>> w3, b3 = torch.randn(4, 8, 3, 3), torch.randn(4)
        >>> y = conv_net3(x, w1, b1, w2, b2, w3, b3)
        >>> bool(torch.allclose(y, _conv_mlp3_plain(x, w1, b1, w2, b2, w3, b3), atol=1e-4))
        True
    """
    _check_net3(x, w1, b1, w2, b2, w3, b3, "conv_net3")
    return _ConvNet3.apply(x, w1, b1, w2, b2, w3, b3)
