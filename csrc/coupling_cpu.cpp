// CPU coupling kernels, in three layers read top to bottom like coupling_cuda.cu:
//   kernels   one pass over a range of samples, a vectorizable loop per sample, built once per
//             ISA variant (cpu_isa.h); OpenMP splits the batch outside the variants;
//   dispatch  dtype x scale mode x mask (dispatch_coupling, coupling.h) -> a kernel;
//   entry     the functions of coupling.h: argument checks (shared with CUDA), then dispatch.
#include <type_traits>

#include "coupling.h"
#include "cpu_isa.h"
#include "cpu_parallel.h"

namespace ff {
namespace {

// Elements per tile of the soft clamp's two loops (kSoftClampTanh): the tanh values stay in L1.
constexpr int64_t kTile = 256;

// The soft clamp's two loops (kSoftClampTanh, scale.h): per tile of up to kTile of a sample's m
// elements, th[i] = tanh(raw[i0 + i] / c) in one loop, then tile(em, i0, len, th) runs the rest
// in its own; em: the element mode, kSoftClampTanhInRange when c <= kInRangeClamp.
template <typename A, typename T, typename F>
FF_INLINE void soft_clamp_tiles(int64_t m, const T* raw, A c, A inv_c, F&& tile) {
  const auto run = [&](auto em) {
    A th[kTile];
    for (int64_t i0 = 0; i0 < m; i0 += kTile) {
      const int64_t len = m - i0 < kTile ? m - i0 : kTile;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) th[i] = soft_clamp_tanh(load(raw[i0 + i]), inv_c);
      tile(em, i0, len, static_cast<const A*>(th));
    }
  };
  if (c <= A(kInRangeClamp))
    run(std::integral_constant<int, kSoftClampTanhInRange>{});
  else
    run(std::integral_constant<int, kSoftClampTanh>{});
}

// Short samples (m <= kPackMax, no mask) run a block of whole samples as one flat loop: per
// sample, a loop of m below the vector width runs scalar (its remainder loop) and one of a few
// vectors pays the loop set-up per sample. Measured (1 thread, AVX-512, soft clamp; separate
// processes, alternated, ns per element, forward / backward, per sample -> packed): m = 8
// 15.5 / 6.7 -> 3.4 / 3.6; m = 16 3.2 / 3.0 -> 2.0 / 1.7; m = 32 2.1 / 2.0 -> 1.6 / 1.6; from
// m = 48 on equal or slower packed (1.3-1.7 either way), so samples of more than 32 stay per sample.
constexpr int64_t kPackMax = 32;

// Rows [b, b + rows) of a batch-strided input as one flat run of rows * m elements: the input
// itself when its samples are adjacent (stride m), else copied into buf.
template <typename T>
FF_INLINE const T* packed_rows(const T* in, int64_t s_in, int64_t b, int64_t rows, int64_t m,
                               T* buf) {
  if (s_in == m) return in + b * m;
  for (int64_t j = 0; j < rows; ++j) {
    const T* src = in + (b + j) * s_in;
    for (int64_t k = 0; k < m; ++k) buf[j * m + k] = src[k];
  }
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Kernels. Each pass holds its arguments and runs samples [b0, b1) in `rows`. `s_*` are batch
// strides in elements: sample b of an input starts at in + b * s_in (inputs may be views such as
// the two halves of a conditioner's output); outputs are contiguous.

template <typename C, bool Inverse>
struct AffinePass {
  using T = typename C::scalar;
  using A = typename C::acc;
  int64_t m;
  const T* in;
  int64_t s_in;
  const T* raw;
  int64_t s_raw;
  const T* shift;
  int64_t s_shift;
  const uint8_t* mask;
  T* out;
  A* logdet;
  A c;

  // Element i given r: raw_b[i], or for the soft clamp its tanh (kSoftClampTanh, scale.h).
  template <int Mode>
  FF_INLINE A elem(const T* in_b, const T* shift_b, T* out_b, int64_t i, A r, A c,
                   A inv_c) const {
    A v;
    const bool mk = C::masked ? mask[i] != 0 : true;
    const A s = Inverse ? coupling_inverse_elem<Mode, A>(load(in_b[i]), r, load(shift_b[i]), mk,
                                                         c, inv_c, v)
                        : coupling_forward_elem<Mode, A>(load(in_b[i]), r, load(shift_b[i]), mk,
                                                         c, inv_c, v);
    out_b[i] = store<T>(v);
    return s;
  }

  // Blocks of whole samples as one flat loop (kPackMax): the elements' s into sb, then summed
  // per sample in order.
  FF_INLINE void packed(int64_t b0, int64_t b1) const {
    constexpr int Mode = C::mode;
    const int64_t m = this->m, per = kTile / m;
    const A c = this->c, inv_c = A(1) / c;
    T ib[kTile], rb[kTile], tb[kTile];
    A sb[kTile];
    for (int64_t b = b0; b < b1; b += per) {
      const int64_t rows = b1 - b < per ? b1 - b : per, len = rows * m;
      const T* in_p = packed_rows(in, s_in, b, rows, m, ib);
      const T* sh_p = packed_rows(shift, s_shift, b, rows, m, tb);
      T* out_p = out + b * m;
      if constexpr (Mode == kSoftClamp) {
        soft_clamp_tiles(len, packed_rows(raw, s_raw, b, rows, m, rb), c, inv_c,
                         [&](auto em, int64_t i0, int64_t n, const A* th) {
#pragma omp simd
                           for (int64_t i = 0; i < n; ++i)
                             sb[i0 + i] = elem<decltype(em)::value>(in_p, sh_p, out_p, i0 + i,
                                                                    th[i], c, inv_c);
                         });
      } else {
        const T* raw_p = Mode == kAdditive ? nullptr : packed_rows(raw, s_raw, b, rows, m, rb);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i)
          sb[i] = elem<Mode>(in_p, sh_p, out_p, i, Mode == kAdditive ? A(0) : load(raw_p[i]), c,
                             inv_c);
      }
      sum_rows(sb, rows, m, logdet + b);
    }
  }

  // logdet[j] = (-) sum_k s[j m + k] for rows j: one vector reduction per row where a row spans
  // vectors; else the rows side by side (independent sums, not one chain of dependent adds).
  FF_INLINE static void sum_rows(const A* s, int64_t rows, int64_t m, A* ld) {
    if (m >= 32) {
      for (int64_t j = 0; j < rows; ++j) {
        A acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < m; ++k) acc += s[j * m + k];
        ld[j] = Inverse ? -acc : acc;
      }
      return;
    }
    A acc[kTile];
    for (int64_t j = 0; j < rows; ++j) acc[j] = 0;
    for (int64_t k = 0; k < m; ++k)
      for (int64_t j = 0; j < rows; ++j) acc[j] += s[j * m + k];
    for (int64_t j = 0; j < rows; ++j) ld[j] = Inverse ? -acc[j] : acc[j];
  }

  FF_INLINE void rows(int64_t b0, int64_t b1) const {
    constexpr int Mode = C::mode;
    const int64_t m = this->m;
    if (!C::masked && m > 0 && m <= kPackMax) return packed(b0, b1);
    const A c = this->c, inv_c = A(1) / c;
    for (int64_t b = b0; b < b1; ++b) {
      const T* in_b = in + b * s_in;
      const T* raw_b = Mode == kAdditive ? nullptr : raw + b * s_raw;
      const T* shift_b = shift + b * s_shift;
      T* out_b = out + b * m;
      A acc = 0;
      if constexpr (Mode == kSoftClamp) {
        soft_clamp_tiles(m, raw_b, c, inv_c, [&](auto em, int64_t i0, int64_t len, const A* th) {
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < len; ++i)
            acc += elem<decltype(em)::value>(in_b, shift_b, out_b, i0 + i, th[i], c, inv_c);
        });
      } else {
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < m; ++i)
          acc += elem<Mode>(in_b, shift_b, out_b, i, Mode == kAdditive ? A(0) : load(raw_b[i]), c,
                            inv_c);
      }
      logdet[b] = Inverse ? -acc : acc;
    }
  }
};

// Backward of the forward (Inverse = false: from x, raw, grad_y -> grad_x, grad_raw) or of the
// inverse (from its output x, raw, grad_x -> grad_y, grad_raw, grad_shift; x contiguous, s_x = m).
template <typename C, bool Inverse>
struct BackwardPass {
  using T = typename C::scalar;
  using A = typename C::acc;
  int64_t m;
  const T* x;
  int64_t s_x;
  const T* raw;
  int64_t s_raw;
  const uint8_t* mask;
  const T* g;  // grad_y (forward) or grad_x (inverse)
  const A* gl;
  T* g_in;  // grad_x (forward) or grad_y (inverse)
  T* graw;
  T* gshift;  // inverse only
  A c;

  // Element i (offset o of the sample) given r: raw_b[i], or its tanh (kSoftClampTanh).
  template <int Mode>
  FF_INLINE void elem(const T* x_b, int64_t o, int64_t i, A r, A glb, A c, A inv_c) const {
    const bool mk = C::masked ? mask[i] != 0 : true;
    A a_g, a_graw, a_gt;
    if (Inverse) {
      coupling_inverse_backward_elem<Mode, A>(load(x_b[i]), r, load(g[o + i]), glb, mk, c, inv_c,
                                              a_g, a_graw, a_gt);
      gshift[o + i] = store<T>(a_gt);
    } else {
      coupling_backward_elem<Mode, A>(load(x_b[i]), r, load(g[o + i]), glb, mk, c, inv_c, a_g,
                                      a_graw);
    }
    g_in[o + i] = store<T>(a_g);
    graw[o + i] = store<T>(a_graw);
  }

  // Blocks of whole samples as one flat loop (kPackMax), the log-det gradient per element in gb.
  FF_INLINE void packed(int64_t b0, int64_t b1) const {
    const int64_t m = this->m, per = kTile / m;
    const A c = this->c, inv_c = A(1) / c;
    T xb[kTile], rb[kTile];
    A gb[kTile];
    for (int64_t b = b0; b < b1; b += per) {
      const int64_t rows = b1 - b < per ? b1 - b : per, len = rows * m, o = b * m;
      const T* x_p = packed_rows(x, s_x, b, rows, m, xb);
      const T* raw_p = packed_rows(raw, s_raw, b, rows, m, rb);
      for (int64_t j = 0; j < rows; ++j)
        for (int64_t k = 0; k < m; ++k) gb[j * m + k] = gl[b + j];
      if constexpr (C::mode == kSoftClamp) {
        soft_clamp_tiles(len, raw_p, c, inv_c, [&](auto em, int64_t i0, int64_t n, const A* th) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i)
            elem<decltype(em)::value>(x_p, o, i0 + i, th[i], gb[i0 + i], c, inv_c);
        });
      } else {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i)
          elem<C::mode>(x_p, o, i, load(raw_p[i]), gb[i], c, inv_c);
      }
    }
  }

  FF_INLINE void rows(int64_t b0, int64_t b1) const {
    const int64_t m = this->m;
    if (!C::masked && m > 0 && m <= kPackMax) return packed(b0, b1);
    const A c = this->c, inv_c = A(1) / c;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * m;
      const T* x_b = x + b * s_x;
      const T* raw_b = raw + b * s_raw;
      const A glb = gl[b];
      if constexpr (C::mode == kSoftClamp) {
        soft_clamp_tiles(m, raw_b, c, inv_c, [&](auto em, int64_t i0, int64_t len, const A* th) {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i)
            elem<decltype(em)::value>(x_b, o, i0 + i, th[i], glb, c, inv_c);
        });
      } else {
#pragma omp simd
        for (int64_t i = 0; i < m; ++i) elem<C::mode>(x_b, o, i, load(raw_b[i]), glb, c, inv_c);
      }
    }
  }
};

// The passes need no per-ISA tuning: the same loops, auto-vectorized for each variant.
template <int Isa, typename Pass>
FF_INLINE void pass_rows_body(const Pass& pass, int64_t b0, int64_t b1) {
  pass.rows(b0, b1);
}
FF_CPU_VARIANTS(pass_rows, pass_rows_body, (const T& pass, int64_t b0, int64_t b1),
                (pass, b0, b1))

// n samples of m elements: one contiguous range of samples per thread.
template <typename Pass>
void run_pass(const Pass& pass, int64_t n, int nthreads) {
  const auto fn = pass_rows_for<Pass>(cpu_isa_level());
  parallel_ranges(n, n * pass.m > kParallelGrain ? nthreads : 1,
                  [&](int64_t b0, int64_t b1) { fn(pass, b0, b1); });
}

// ---------------------------------------------------------------------------------------------
// Dispatch: one pass per dtype x scale mode x mask.

template <bool Inverse>
void run_affine(const char* name, int dtype, int mode, double clamp, int64_t n, int64_t m,
                std::uintptr_t in, int64_t s_in, std::uintptr_t raw, int64_t s_raw,
                std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask, std::uintptr_t out,
                std::uintptr_t logdet, int nthreads) {
  dispatch_coupling(name, dtype, mode, mask != 0, [&](auto cs) {
    using C = decltype(cs);
    using T = typename C::scalar;
    using A = typename C::acc;
    const AffinePass<C, Inverse> pass{m,           ptr<const T>(in),    s_in,
                                      ptr<const T>(raw), s_raw,          ptr<const T>(shift),
                                      s_shift,     ptr<const uint8_t>(mask), ptr<T>(out),
                                      ptr<A>(logdet), A(clamp)};
    run_pass(pass, n, nthreads);
  });
}

template <bool Inverse>
void run_backward(const char* name, int dtype, int mode, double clamp, int64_t n, int64_t m,
                  std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                  std::uintptr_t mask, std::uintptr_t g, std::uintptr_t gl, std::uintptr_t g_in,
                  std::uintptr_t graw, std::uintptr_t gshift, int nthreads) {
  dispatch_coupling(name, dtype, mode, mask != 0, [&](auto cs) {
    using C = decltype(cs);
    using T = typename C::scalar;
    using A = typename C::acc;
    const BackwardPass<C, Inverse> pass{m,           ptr<const T>(x),    s_x,
                                        ptr<const T>(raw), s_raw,        ptr<const uint8_t>(mask),
                                        ptr<const T>(g), ptr<const A>(gl), ptr<T>(g_in),
                                        ptr<T>(graw), ptr<T>(gshift),    A(clamp)};
    run_pass(pass, n, nthreads);
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points: the checks shared with CUDA (coupling.h), the thread count, then dispatch.

void coupling_forward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                          std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                          std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask,
                          std::uintptr_t y, std::uintptr_t logdet, int nthreads) {
  const char* name = "coupling_forward_cpu";
  check_coupling_affine(name, mode, clamp, n, m, x, s_x, "x", raw, s_raw, shift, s_shift, y, "y",
                        logdet);
  check_threads(name, nthreads);
  run_affine<false>(name, dtype, mode, clamp, n, m, x, s_x, raw, s_raw, shift, s_shift, mask, y,
                    logdet, nthreads);
}

void coupling_inverse_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                          std::uintptr_t y, int64_t s_y, std::uintptr_t raw, int64_t s_raw,
                          std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask,
                          std::uintptr_t x, std::uintptr_t logdet, int nthreads) {
  const char* name = "coupling_inverse_cpu";
  check_coupling_affine(name, mode, clamp, n, m, y, s_y, "y", raw, s_raw, shift, s_shift, x, "x",
                        logdet);
  check_threads(name, nthreads);
  run_affine<true>(name, dtype, mode, clamp, n, m, y, s_y, raw, s_raw, shift, s_shift, mask, x,
                   logdet, nthreads);
}

void coupling_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                           std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                           std::uintptr_t mask, std::uintptr_t grad_y, std::uintptr_t grad_logdet,
                           std::uintptr_t grad_x, std::uintptr_t grad_raw, int nthreads) {
  const char* name = "coupling_backward_cpu";
  check_coupling_backward(name, mode, clamp, n, m, x, s_x, raw, s_raw, grad_y, grad_logdet,
                          grad_x, grad_raw);
  check_threads(name, nthreads);
  run_backward<false>(name, dtype, mode, clamp, n, m, x, s_x, raw, s_raw, mask, grad_y,
                      grad_logdet, grad_x, grad_raw, 0, nthreads);
}

void coupling_inverse_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                                   std::uintptr_t x, std::uintptr_t raw, int64_t s_raw,
                                   std::uintptr_t mask, std::uintptr_t grad_x,
                                   std::uintptr_t grad_logdet, std::uintptr_t grad_y,
                                   std::uintptr_t grad_raw, std::uintptr_t grad_shift,
                                   int nthreads) {
  const char* name = "coupling_inverse_backward_cpu";
  check_coupling_inverse_backward(name, mode, clamp, n, m, x, raw, s_raw, grad_x, grad_logdet,
                                  grad_y, grad_raw, grad_shift);
  check_threads(name, nthreads);
  run_backward<true>(name, dtype, mode, clamp, n, m, x, m, raw, s_raw, mask, grad_x, grad_logdet,
                     grad_y, grad_raw, grad_shift, nthreads);
}

}  // namespace ff
