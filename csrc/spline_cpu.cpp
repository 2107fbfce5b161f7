// CPU rational-quadratic spline kernels, in the three layers of coupling_cpu.cpp:
//   kernels   one pass over a range of samples; per element the per-element math of spline.h
//             (normalisation, bin search, the bin's map or stable root, its reverse mode), its
//             loops over the K bins vectorizable; built once per ISA variant (cpu_isa.h);
//             OpenMP splits the batch outside the variants (cpu_parallel.h);
//   dispatch  dtype x mask -> a pass;
//   entry     the functions of spline.h: argument checks (shared with CUDA), then dispatch.
#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "spline.h"

namespace ff {
namespace {

template <typename T, bool Masked, bool Inverse>
struct SplinePass {
  using A = acc_t<T>;
  int64_t m;
  int k;
  SplineConsts cs;
  const T* in;
  const T* rw;
  const T* rh;
  const T* rd;
  const uint8_t* mask;
  T* out;
  A* logdet;

  FF_INLINE void rows(int64_t b0, int64_t b1) const {
    A pw[kSplineMaxBins], ph[kSplineMaxBins];
    const int k = this->k;
    for (int64_t b = b0; b < b1; ++b) {
      A acc = 0;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t e = b * m + i;
        const bool mk = Masked ? mask[i] != 0 : true;
        A lad;
        const A v = spline_elem<Inverse, T, A>(load(in[e]), rw + e * k, rh + e * k,
                                               rd + e * (k - 1), k, cs, mk, pw, ph, lad);
        out[e] = store<T>(v);
        acc += lad;
      }
      logdet[b] = acc;
    }
  }
};

template <typename T, bool Masked, bool Inverse>
struct SplineBackwardPass {
  using A = acc_t<T>;
  int64_t m;
  int k;
  SplineConsts cs;
  const T* in;
  const T* rw;
  const T* rh;
  const T* rd;
  const uint8_t* mask;
  const T* g_out;
  const A* gl;
  T* g_in;
  T* gw;
  T* gh;
  T* gd;

  FF_INLINE void rows(int64_t b0, int64_t b1) const {
    A pw[kSplineMaxBins], ph[kSplineMaxBins];
    const int k = this->k;
    for (int64_t b = b0; b < b1; ++b) {
      const A glb = gl[b];
      for (int64_t i = 0; i < m; ++i) {
        const int64_t e = b * m + i;
        const bool mk = Masked ? mask[i] != 0 : true;
        const A g = spline_elem_backward<Inverse, T, A>(
            load(in[e]), rw + e * k, rh + e * k, rd + e * (k - 1), k, cs, mk, load(g_out[e]), glb,
            pw, ph, gw + e * k, gh + e * k, gd + e * (k - 1));
        g_in[e] = store<T>(g);
      }
    }
  }
};

// The passes need no per-ISA tuning: the same loops, compiled for each variant.
template <int Isa, typename Pass>
FF_INLINE void spline_rows_body(const Pass& pass, int64_t b0, int64_t b1) {
  pass.rows(b0, b1);
}
FF_CPU_VARIANTS(spline_rows, spline_rows_body, (const T& pass, int64_t b0, int64_t b1),
                (pass, b0, b1))

template <typename Pass>
void run_pass(const Pass& pass, int64_t n, int nthreads) {
  const auto fn = spline_rows_for<Pass>(cpu_isa_level());
  // a spline element is ~K exps of work: a smaller batch already pays for the thread pool
  parallel_ranges(n, n * pass.m * pass.k > kParallelGrain ? nthreads : 1,
                  [&](int64_t b0, int64_t b1) { fn(pass, b0, b1); });
}

template <typename F>
void dispatch_spline(const char* name, int dtype, bool masked, bool inverse, F&& f) {
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    if (masked) {
      if (inverse)
        f(scalar_t{}, std::true_type{}, std::true_type{});
      else
        f(scalar_t{}, std::true_type{}, std::false_type{});
    } else {
      if (inverse)
        f(scalar_t{}, std::false_type{}, std::true_type{});
      else
        f(scalar_t{}, std::false_type{}, std::false_type{});
    }
  });
}

}  // namespace

void rq_spline_cpu(int dtype, int64_t n, int64_t m, int bins, double bound, double min_bin_width,
                   double min_bin_height, double min_derivative, bool inverse, std::uintptr_t in,
                   std::uintptr_t widths, std::uintptr_t heights, std::uintptr_t derivatives,
                   std::uintptr_t mask, std::uintptr_t out, std::uintptr_t logdet, int nthreads) {
  const char* name = "rq_spline_cpu";
  check_spline(name, n, m, bins, bound, min_bin_width, min_bin_height, min_derivative, in, widths,
               heights, derivatives, out, logdet);
  check_threads(name, nthreads);
  const SplineConsts cs =
      spline_consts(bins, bound, min_bin_width, min_bin_height, min_derivative);
  dispatch_spline(name, dtype, mask != 0, inverse, [&](auto t, auto mk, auto inv) {
    using T = decltype(t);
    using A = acc_t<T>;
    const SplinePass<T, decltype(mk)::value, decltype(inv)::value> pass{
        m,           bins,           cs,
        ptr<const T>(in), ptr<const T>(widths), ptr<const T>(heights),
        ptr<const T>(derivatives), ptr<const uint8_t>(mask), ptr<T>(out),
        ptr<A>(logdet)};
    run_pass(pass, n, nthreads);
  });
}

void rq_spline_backward_cpu(int dtype, int64_t n, int64_t m, int bins, double bound,
                            double min_bin_width, double min_bin_height, double min_derivative,
                            bool inverse, std::uintptr_t in, std::uintptr_t widths,
                            std::uintptr_t heights, std::uintptr_t derivatives,
                            std::uintptr_t mask, std::uintptr_t grad_out,
                            std::uintptr_t grad_logdet, std::uintptr_t grad_in,
                            std::uintptr_t grad_widths, std::uintptr_t grad_heights,
                            std::uintptr_t grad_derivatives, int nthreads) {
  const char* name = "rq_spline_backward_cpu";
  check_spline_backward(name, n, m, bins, bound, min_bin_width, min_bin_height, min_derivative,
                        in, widths, heights, derivatives, grad_out, grad_logdet, grad_in,
                        grad_widths, grad_heights, grad_derivatives);
  check_threads(name, nthreads);
  const SplineConsts cs =
      spline_consts(bins, bound, min_bin_width, min_bin_height, min_derivative);
  dispatch_spline(name, dtype, mask != 0, inverse, [&](auto t, auto mk, auto inv) {
    using T = decltype(t);
    using A = acc_t<T>;
    const SplineBackwardPass<T, decltype(mk)::value, decltype(inv)::value> pass{
        m,
        bins,
        cs,
        ptr<const T>(in),
        ptr<const T>(widths),
        ptr<const T>(heights),
        ptr<const T>(derivatives),
        ptr<const uint8_t>(mask),
        ptr<const T>(grad_out),
        ptr<const A>(grad_logdet),
        ptr<T>(grad_in),
        ptr<T>(grad_widths),
        ptr<T>(grad_heights),
        ptr<T>(grad_derivatives)};
    run_pass(pass, n, nthreads);
  });
}

}  // namespace ff
