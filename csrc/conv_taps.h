// Tap kernels of the narrow 3x3 convolution (fastflow/ops/conv.py): the "tap form" computes a 3x3
// "same" convolution to few channels as one 1x1 convolution to 9 * C channels (torch/oneDNN) and
// these two passes, on channels-last buffers ([N, H, W, channels] contiguous):
//
//   conv_tap_sum:   out[n, y, x, o] = bias[o] + sum_t taps[n, y + dy_t, x + dx_t, t * C + o]
//                   (terms outside the image are zero; bias may be null)
//   conv_tap_shift: shifted[n, y, x, t * C + o] = grad[n, y - dy_t, x - dx_t, o] (0 outside)
//
// with tap t = 3 * (dy + 1) + (dx + 1), dy, dx in {-1, 0, 1}. conv_tap_shift is the adjoint of
// the sum's gather; it feeds the weight gradient (a 1x1 weight gradient against the input).
//
//   relu_grad_sum:  grad[r, o] = act[r, o] <= 0 ? 0 : grad[r, o]   (in place; ReLU's backward
//                   from its output act, as aten::threshold_backward(grad, act, 0))
//                   sum[o] = sum_r grad[r, o]                       (after the mask: the bias
//                   gradient of the layer that produced act), over rows r of [rows, C] buffers
//
//   bias_relu:      y[r, o] = max(y[r, o] + bias[o], 0)   (in place; NaN stays NaN, as torch.relu)
//                   the epilogue of a matrix product written without its bias (addmm would first
//                   copy the broadcast bias into the output, then read it back in the product)
//
// One pass instead of two over the conditioner's widest activations (the mask and the bias sum
// each read the whole gradient; on one core those reads, not the arithmetic, are the cost).
#pragma once

#include <cstdint>

namespace ff {
void conv_tap_sum_cpu(int dtype, int64_t n, int64_t h, int64_t w, int64_t c, std::uintptr_t taps,
                      std::uintptr_t bias, std::uintptr_t out, int nthreads);
void conv_tap_shift_cpu(int dtype, int64_t n, int64_t h, int64_t w, int64_t c,
                        std::uintptr_t grad, std::uintptr_t shifted, int nthreads);
void relu_grad_sum_cpu(int dtype, int64_t rows, int64_t c, std::uintptr_t grad,
                       std::uintptr_t act, std::uintptr_t sum, int nthreads);
void bias_relu_cpu(int dtype, int64_t rows, int64_t c, std::uintptr_t y, std::uintptr_t bias,
                   int nthreads);
}  // namespace ff
