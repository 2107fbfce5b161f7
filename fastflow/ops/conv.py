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

__all__ = ["conv3x3", "TAP_SPLIT_MAX_OUT", "TAP_SPLIT_MAX_WGRAD"]

# A 3x3 convolution (or the input gradient, which is a convolution to C_in channels) to at most
# this many channels runs as one 1x1 convolution to 9x the channels + a tap sum. Measured on
# oneDNN (fp32, 1 and 2 threads, 14x14 and 16x16 images, 128-256 hidden channels): 1.2-2.5x
# faster for 1-8 output channels, equal at 12, slower above.
TAP_SPLIT_MAX_OUT = 8
# The weight gradient's tap form wins up to 6 output channels (equal at 8, slower at 12).
TAP_SPLIT_MAX_WGRAD = 6
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
        out = torch.empty((n, co, h, w), dtype=x.dtype).contiguous(
            memory_format=torch.channels_last
        )
        b = None if bias is None else bias.detach().contiguous()
        taps_v, out_v = _nhwc(taps), _nhwc(out)  # named: B.ptr must see live tensors
        B._C.conv_tap_sum_cpu(
            dtype=B.DTYPE_CODES[x.dtype], n=n, h=h, w=w, c=co,
            taps_ptr=B.ptr(taps_v, x.dtype, n * h * w * 9 * co, _CPU, "taps"),
            bias_ptr=B.ptr(b, x.dtype, co, _CPU, "bias"),
            out_ptr=B.ptr(out_v, x.dtype, n * h * w * co, _CPU, "out"),
            nthreads=B.num_threads(),
        )  # fmt: skip
        return out
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
        shifted = torch.empty((n, 9 * co, h, w), dtype=grad.dtype)
        shifted = shifted.contiguous(memory_format=torch.channels_last)
        grad_v, shifted_v = _nhwc(grad), _nhwc(shifted)
        B._C.conv_tap_shift_cpu(
            dtype=B.DTYPE_CODES[grad.dtype], n=n, h=h, w=w, c=co,
            grad_ptr=B.ptr(grad_v, grad.dtype, n * h * w * co, _CPU, "grad"),
            shifted_ptr=B.ptr(shifted_v, grad.dtype, n * h * w * 9 * co, _CPU, "shifted"),
            nthreads=B.num_threads(),
        )  # fmt: skip
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
    tensor outside autograd recording (the slice code below is the differentiable fallback used
    by double backward) and outside torch.compile, with the native backend available."""
    return (
        t.dtype in (torch.float32, torch.float64)
        and t.is_contiguous(memory_format=torch.channels_last)
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and B.use_native(t)
        and hasattr(B._C, "conv_tap_sum_cpu")
    )


def _nhwc(t: Tensor) -> Tensor:
    """A channels-last [N, C, H, W] tensor as the contiguous [N, H, W, C] buffer it is."""
    return t.permute(0, 2, 3, 1)


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
