// CPU tap kernels of the 3x3 convolutions' tap forms and the ReLU passes of Glow's conditioner;
// contracts in conv_taps.h. Memory-bound passes: plain loops the compiler vectorizes over the
// channels (one variant per ISA), one image row (tap kernels) or a range of pixel rows per work
// item.
#include <cstdint>
#include <string>
#include <vector>

#include "checks.h"
#include "conv_taps.h"
#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "storage.h"

namespace ff {
namespace {

void check_tap_args(const char* name, int64_t n, int64_t h, int64_t w, int64_t c) {
  FF_CHECK(n >= 0 && h >= 1 && w >= 1 && c >= 1,
           std::string(name) + ": need n >= 0 and h, w, c >= 1");
  FF_CHECK(n <= INT64_MAX / (9 * h * w * c), std::string(name) + ": size overflows");
}

// The per-range loops are built once per ISA variant (cpu_isa.h; the drivers below split the work
// and pick the variant): compiled for the baseline only, the ReLU passes ran at half the speed of
// torch's own relu_ on an AVX-512 CPU.
//
// The tap kernels move one segment of C channels per (pixel, tap). Glow's halves are narrow (2-48
// channels), and with C known only at run time a segment of 6 floats ran in the scalar remainder
// of a vector loop: ~8 ns per segment whatever C (0.6 ms for one 32x16x16x6 shift). So each
// kernel is stamped out for the channel counts Glow and image couplings use (FF_TAP_WIDTHS), where
// the segment is a fixed-size copy or sum the compiler turns into a few vector moves, and the
// tap sum keeps the pixel's C sums in registers across its nine taps; other counts run the
// generic loops (C = 0 below). Same arithmetic in the same order (bias, then taps 0..8): results
// are bit-identical to the generic loop's.
template <typename T, int C>
FF_INLINE void tap_sum_rows_c(int64_t lo, int64_t hi, int64_t h, int64_t w, int64_t c_rt,
                              const T* __restrict taps, const T* __restrict bias,
                              T* __restrict out) {
  const int64_t c = C > 0 ? C : c_rt;
  const int64_t c9 = 9 * c;
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t img = r / h, y = r % h;
    T* orow = out + r * w * c;
    const T* trow[3];
    for (int dy = -1; dy <= 1; ++dy) {
      const int64_t yy = y + dy;
      trow[dy + 1] = (yy < 0 || yy >= h) ? nullptr : taps + (img * h + yy) * w * c9;
    }
    if constexpr (C > 0) {
      for (int64_t x = 0; x < w; ++x) {
        T acc[C];
        for (int o = 0; o < C; ++o) acc[o] = bias ? bias[o] : T(0);
        for (int ty = 0; ty < 3; ++ty) {
          if (!trow[ty]) continue;
          for (int dx = -1; dx <= 1; ++dx) {
            const int64_t xx = x + dx;
            if (xx < 0 || xx >= w) continue;
            const T* src = trow[ty] + xx * c9 + (3 * ty + dx + 1) * C;
            for (int o = 0; o < C; ++o) acc[o] += src[o];
          }
        }
        T* dst = orow + x * C;
        for (int o = 0; o < C; ++o) dst[o] = acc[o];
      }
    } else {
      for (int64_t x = 0; x < w; ++x)
        for (int64_t o = 0; o < c; ++o) orow[x * c + o] = bias ? bias[o] : T(0);
      for (int ty = 0; ty < 3; ++ty) {
        if (!trow[ty]) continue;
        for (int dx = -1; dx <= 1; ++dx) {
          const int64_t t = 3 * ty + (dx + 1);
          const int64_t x0 = dx < 0 ? 1 : 0, x1 = dx > 0 ? w - 1 : w;
          for (int64_t x = x0; x < x1; ++x) {
            const T* src = trow[ty] + (x + dx) * c9 + t * c;
            T* dst = orow + x * c;
#pragma omp simd
            for (int64_t o = 0; o < c; ++o) dst[o] += src[o];
          }
        }
      }
    }
  }
}

template <typename T, int C>
FF_INLINE void tap_shift_rows_c(int64_t lo, int64_t hi, int64_t h, int64_t w, int64_t c_rt,
                                const T* __restrict grad, T* __restrict shifted) {
  const int64_t c = C > 0 ? C : c_rt;
  const int64_t c9 = 9 * c;
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t img = r / h, y = r % h;
    const T* grow[3];
    for (int dy = -1; dy <= 1; ++dy) {
      const int64_t yy = y - dy;  // shifted[y] = grad[y - dy]
      grow[dy + 1] = (yy < 0 || yy >= h) ? nullptr : grad + (img * h + yy) * w * c;
    }
    // one output pixel's nine segments in order: the writes stream through the output
    T* dst = shifted + r * w * c9;
    for (int64_t x = 0; x < w; ++x) {
      for (int ty = 0; ty < 3; ++ty) {
        for (int dx = -1; dx <= 1; ++dx, dst += c) {
          const int64_t xx = x - dx;
          const T* src = (grow[ty] && xx >= 0 && xx < w) ? grow[ty] + xx * c : nullptr;
          if constexpr (C > 0) {
            for (int o = 0; o < C; ++o) dst[o] = src ? src[o] : T(0);
          } else if (src) {
#pragma omp simd
            for (int64_t o = 0; o < c; ++o) dst[o] = src[o];
          } else {
#pragma omp simd
            for (int64_t o = 0; o < c; ++o) dst[o] = T(0);
          }
        }
      }
    }
  }
}

// The channel counts with their own copy of the tap kernels (see above), and the dispatch.
#define FF_TAP_WIDTHS(X) X(1) X(2) X(3) X(4) X(6) X(8) X(12) X(16) X(24) X(32) X(48)

template <int Isa, typename T>
FF_INLINE void tap_sum_rows_body(int64_t lo, int64_t hi, int64_t h, int64_t w, int64_t c,
                                 const T* __restrict taps, const T* __restrict bias,
                                 T* __restrict out) {
  switch (c) {
#define FF_TAP_CASE(K)                                           \
  case K:                                                        \
    tap_sum_rows_c<T, K>(lo, hi, h, w, c, taps, bias, out);      \
    return;
    FF_TAP_WIDTHS(FF_TAP_CASE)
#undef FF_TAP_CASE
    default:
      tap_sum_rows_c<T, 0>(lo, hi, h, w, c, taps, bias, out);
  }
}

template <int Isa, typename T>
FF_INLINE void tap_shift_rows_body(int64_t lo, int64_t hi, int64_t h, int64_t w, int64_t c,
                                   const T* __restrict grad, T* __restrict shifted) {
  switch (c) {
#define FF_TAP_CASE(K)                                     \
  case K:                                                  \
    tap_shift_rows_c<T, K>(lo, hi, h, w, c, grad, shifted); \
    return;
    FF_TAP_WIDTHS(FF_TAP_CASE)
#undef FF_TAP_CASE
    default:
      tap_shift_rows_c<T, 0>(lo, hi, h, w, c, grad, shifted);
  }
}

// Rows per block of the bias sum: a block is summed in T, the blocks in double (the error of a
// plain T running sum grows with the row count; this one with the block size).
constexpr int64_t kSumBlock = 64;

template <int Isa, typename T>
FF_INLINE void relu_grad_sum_rows_body(int64_t lo, int64_t hi, int64_t c, T* __restrict grad,
                                       const T* __restrict act, T* __restrict blk,
                                       double* __restrict acc) {
  for (int64_t r0 = lo; r0 < hi; r0 += kSumBlock) {
    const int64_t r1 = r0 + kSumBlock < hi ? r0 + kSumBlock : hi;
    for (int64_t o = 0; o < c; ++o) blk[o] = T(0);
    for (int64_t r = r0; r < r1; ++r) {
      T* g = grad + r * c;
      const T* a = act + r * c;
#pragma omp simd
      for (int64_t o = 0; o < c; ++o) {
        const T v = a[o] <= T(0) ? T(0) : g[o];
        g[o] = v;
        blk[o] += v;
      }
    }
    for (int64_t o = 0; o < c; ++o) acc[o] += static_cast<double>(blk[o]);
  }
}

template <int Isa, typename T>
FF_INLINE void bias_relu_rows_body(int64_t lo, int64_t hi, int64_t c, T* __restrict y,
                                   const T* __restrict bias) {
  for (int64_t r = lo; r < hi; ++r) {
    T* row = y + r * c;
#pragma omp simd
    for (int64_t o = 0; o < c; ++o) {
      const T v = row[o] + bias[o];
      row[o] = v < T(0) ? T(0) : v;  // NaN is not < 0: it stays NaN
    }
  }
}

FF_CPU_VARIANTS(tap_sum_rows, tap_sum_rows_body,
                (int64_t lo, int64_t hi, int64_t h, int64_t w, int64_t c, const T* taps,
                 const T* bias, T* out),
                (lo, hi, h, w, c, taps, bias, out))
FF_CPU_VARIANTS(tap_shift_rows, tap_shift_rows_body,
                (int64_t lo, int64_t hi, int64_t h, int64_t w, int64_t c, const T* grad,
                 T* shifted),
                (lo, hi, h, w, c, grad, shifted))
FF_CPU_VARIANTS(relu_grad_sum_rows, relu_grad_sum_rows_body,
                (int64_t lo, int64_t hi, int64_t c, T* grad, const T* act, T* blk, double* acc),
                (lo, hi, c, grad, act, blk, acc))
FF_CPU_VARIANTS(bias_relu_rows, bias_relu_rows_body,
                (int64_t lo, int64_t hi, int64_t c, T* y, const T* bias), (lo, hi, c, y, bias))

template <typename T>
void tap_sum_kernel(int64_t n, int64_t h, int64_t w, int64_t c, const T* taps, const T* bias,
                    T* out, int nthreads) {
  const int64_t rows = n * h;
  const int nt = rows * w * 9 * c >= kParallelGrain ? nthreads : 1;
  auto fn = tap_sum_rows_for<T>(cpu_isa_level());
  parallel_ranges(rows, nt, [&](int64_t lo, int64_t hi) { fn(lo, hi, h, w, c, taps, bias, out); });
}

template <typename T>
void tap_shift_kernel(int64_t n, int64_t h, int64_t w, int64_t c, const T* grad, T* shifted,
                      int nthreads) {
  const int64_t rows = n * h;
  const int nt = rows * w * 9 * c >= kParallelGrain ? nthreads : 1;
  auto fn = tap_shift_rows_for<T>(cpu_isa_level());
  parallel_ranges(rows, nt, [&](int64_t lo, int64_t hi) { fn(lo, hi, h, w, c, grad, shifted); });
}

template <typename T>
void relu_grad_sum_kernel(int64_t rows, int64_t c, T* grad, const T* act, T* sum, int nthreads) {
  const int nt = rows * c >= kParallelGrain ? nthreads : 1;
  std::vector<double> part(static_cast<size_t>(nt) * c, 0.0);  // one row of partials a thread
  auto fn = relu_grad_sum_rows_for<T>(cpu_isa_level());
  parallel_ranges(rows, nt, [&](int64_t lo, int64_t hi) {
    std::vector<T> blk(c);
    fn(lo, hi, c, grad, act, blk.data(), part.data() + static_cast<size_t>(thread_id()) * c);
  });
  for (int64_t o = 0; o < c; ++o) {
    double s = 0.0;
    for (int i = 0; i < nt; ++i) s += part[static_cast<size_t>(i) * c + o];
    sum[o] = static_cast<T>(s);
  }
}

template <typename T>
void bias_relu_kernel(int64_t rows, int64_t c, T* y, const T* bias, int nthreads) {
  const int nt = rows * c >= kParallelGrain ? nthreads : 1;
  auto fn = bias_relu_rows_for<T>(cpu_isa_level());
  parallel_ranges(rows, nt, [&](int64_t lo, int64_t hi) { fn(lo, hi, c, y, bias); });
}

template <typename F>
void dispatch_f32_f64(int dtype, const char* name, F&& f) {
  if (dtype == kFloat32)
    f(float{});
  else if (dtype == kFloat64)
    f(double{});
  else
    check(false, std::string(name) + ": fp32 and fp64 only, got dtype code " +
                     std::to_string(dtype));
}

}  // namespace

void conv_tap_sum_cpu(int dtype, int64_t n, int64_t h, int64_t w, int64_t c, std::uintptr_t taps,
                      std::uintptr_t bias, std::uintptr_t out, int nthreads) {
  const char* name = "conv_tap_sum_cpu";
  check_tap_args(name, n, h, w, c);
  check_ptr(taps, n * h * w * 9 * c, "taps");
  check_ptr(out, n * h * w * c, "out");
  check_threads(name, nthreads);
  dispatch_f32_f64(dtype, name, [&](auto zero) {
    using T = decltype(zero);
    tap_sum_kernel<T>(n, h, w, c, ptr<const T>(taps), ptr<const T>(bias), ptr<T>(out), nthreads);
  });
}

void conv_tap_shift_cpu(int dtype, int64_t n, int64_t h, int64_t w, int64_t c,
                        std::uintptr_t grad, std::uintptr_t shifted, int nthreads) {
  const char* name = "conv_tap_shift_cpu";
  check_tap_args(name, n, h, w, c);
  check_ptr(grad, n * h * w * c, "grad");
  check_ptr(shifted, n * h * w * 9 * c, "shifted");
  check_threads(name, nthreads);
  dispatch_f32_f64(dtype, name, [&](auto zero) {
    using T = decltype(zero);
    tap_shift_kernel<T>(n, h, w, c, ptr<const T>(grad), ptr<T>(shifted), nthreads);
  });
}

void relu_grad_sum_cpu(int dtype, int64_t rows, int64_t c, std::uintptr_t grad,
                       std::uintptr_t act, std::uintptr_t sum, int nthreads) {
  const char* name = "relu_grad_sum_cpu";
  FF_CHECK(rows >= 0 && c >= 1, std::string(name) + ": need rows >= 0 and c >= 1");
  FF_CHECK(rows <= INT64_MAX / c, std::string(name) + ": size overflows");
  check_ptr(grad, rows * c, "grad");
  check_ptr(act, rows * c, "act");
  check_ptr(sum, c, "sum");
  check_threads(name, nthreads);
  dispatch_f32_f64(dtype, name, [&](auto zero) {
    using T = decltype(zero);
    relu_grad_sum_kernel<T>(rows, c, ptr<T>(grad), ptr<const T>(act), ptr<T>(sum), nthreads);
  });
}

void bias_relu_cpu(int dtype, int64_t rows, int64_t c, std::uintptr_t y, std::uintptr_t bias,
                   int nthreads) {
  const char* name = "bias_relu_cpu";
  FF_CHECK(rows >= 0 && c >= 1, std::string(name) + ": need rows >= 0 and c >= 1");
  FF_CHECK(rows <= INT64_MAX / c, std::string(name) + ": size overflows");
  check_ptr(y, rows * c, "y");
  check_ptr(bias, c, "bias");
  check_threads(name, nthreads);
  dispatch_f32_f64(dtype, name, [&](auto zero) {
    using T = decltype(zero);
    bias_relu_kernel<T>(rows, c, ptr<T>(y), ptr<const T>(bias), nthreads);
  });
}

}  // namespace ff
