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
#pragma once

#include <cstdint>

namespace ff {
void conv_tap_sum_cpu(int dtype, int64_t n, int64_t h, int64_t w, int64_t c, std::uintptr_t taps,
                      std::uintptr_t bias, std::uintptr_t out, int nthreads);
void conv_tap_shift_cpu(int dtype, int64_t n, int64_t h, int64_t w, int64_t c,
                        std::uintptr_t grad, std::uintptr_t shifted, int nthreads);
}  // namespace ff
