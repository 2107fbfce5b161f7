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

  FF_INLINE void rows(int64_t b0, int64_t b1) const {
    constexpr int Mode = C::mode;
    const int64_t m = this->m;
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

  FF_INLINE void rows(int64_t b0, int64_t b1) const {
    const int64_t m = this->m;
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
