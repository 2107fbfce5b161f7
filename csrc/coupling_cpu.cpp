// CPU coupling kernels: OpenMP over the batch, one vectorizable pass per sample.
#include "coupling.h"

#include <string>

namespace ff {
namespace {

template <typename T>
using acc_t = typename Acc<T>::type;

// Small problems are not worth waking the thread pool for.
constexpr int64_t kParallelGrain = 1 << 15;

template <typename T, int Mode, bool Masked>
void forward_kernel(int64_t n, int64_t m, const T* x, const T* raw, const T* shift,
                    const uint8_t* mask, T* y, acc_t<T>* logdet, acc_t<T> c, int nthreads) {
  using A = acc_t<T>;
  const A inv_c = A(1) / c;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n * m > kParallelGrain)
  for (int64_t b = 0; b < n; ++b) {
    const int64_t o = b * m;
    A acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < m; ++i) {
      A out;
      const A r = Mode == kAdditive ? A(0) : load(raw[o + i]);
      acc += coupling_forward_elem<Mode, A>(load(x[o + i]), r, load(shift[o + i]),
                                            Masked ? mask[i] != 0 : true, c, inv_c, out);
      y[o + i] = store<T>(out);
    }
    logdet[b] = acc;
  }
}

template <typename T, int Mode, bool Masked>
void inverse_kernel(int64_t n, int64_t m, const T* y, const T* raw, const T* shift,
                    const uint8_t* mask, T* x, acc_t<T>* logdet, acc_t<T> c, int nthreads) {
  using A = acc_t<T>;
  const A inv_c = A(1) / c;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n * m > kParallelGrain)
  for (int64_t b = 0; b < n; ++b) {
    const int64_t o = b * m;
    A acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < m; ++i) {
      A out;
      const A r = Mode == kAdditive ? A(0) : load(raw[o + i]);
      acc += coupling_inverse_elem<Mode, A>(load(y[o + i]), r, load(shift[o + i]),
                                            Masked ? mask[i] != 0 : true, c, inv_c, out);
      x[o + i] = store<T>(out);
    }
    logdet[b] = -acc;
  }
}

template <typename T, int Mode, bool Masked>
void backward_kernel(int64_t n, int64_t m, const T* x, const T* raw, const uint8_t* mask,
                     const T* gy, const acc_t<T>* gl, T* gx, T* graw, T* gshift, acc_t<T> c,
                     int nthreads) {
  using A = acc_t<T>;
  const A inv_c = A(1) / c;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n * m > kParallelGrain)
  for (int64_t b = 0; b < n; ++b) {
    const int64_t o = b * m;
    const A glb = gl[b];
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      A a_gx, a_graw;
      const bool mk = Masked ? mask[i] != 0 : true;
      const A g = load(gy[o + i]);
      coupling_backward_elem<Mode, A>(load(x[o + i]), load(raw[o + i]), g, glb, mk, c, inv_c,
                                      a_gx, a_graw);
      gx[o + i] = store<T>(a_gx);
      graw[o + i] = store<T>(a_graw);
      if (gshift != nullptr) gshift[o + i] = store<T>(mk ? g : A(0));
    }
  }
}

template <typename T, int Mode, bool Masked>
void inverse_backward_kernel(int64_t n, int64_t m, const T* x, const T* raw, const uint8_t* mask,
                             const T* gx, const acc_t<T>* gl, T* gy, T* graw, T* gshift,
                             acc_t<T> c, int nthreads) {
  using A = acc_t<T>;
  const A inv_c = A(1) / c;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n * m > kParallelGrain)
  for (int64_t b = 0; b < n; ++b) {
    const int64_t o = b * m;
    const A glb = gl[b];
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      A a_gy, a_graw, a_gt;
      coupling_inverse_backward_elem<Mode, A>(load(x[o + i]), load(raw[o + i]), load(gx[o + i]),
                                              glb, Masked ? mask[i] != 0 : true, c, inv_c, a_gy,
                                              a_graw, a_gt);
      gy[o + i] = store<T>(a_gy);
      graw[o + i] = store<T>(a_graw);
      gshift[o + i] = store<T>(a_gt);
    }
  }
}

void check_common(const char* name, int mode, double clamp, int64_t n, int64_t m, int nthreads) {
  check(n >= 0 && m >= 0, std::string(name) + ": negative size");
  check(mode != kSoftClamp || clamp > 0, std::string(name) + ": clamp must be > 0");
  check(nthreads >= 1, std::string(name) + ": nthreads must be >= 1");
}

template <typename P>
P* ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

}  // namespace

void coupling_forward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                          std::uintptr_t x, std::uintptr_t raw, std::uintptr_t shift,
                          std::uintptr_t mask, std::uintptr_t y, std::uintptr_t logdet,
                          int nthreads) {
  const char* name = "coupling_forward_cpu";
  check_common(name, mode, clamp, n, m, nthreads);
  check_ptr(x, n * m, "x");
  check_ptr(shift, n * m, "shift");
  check_ptr(y, n * m, "y");
  check_ptr(logdet, n, "logdet");
  if (mode != kAdditive) check_ptr(raw, n * m, "raw_scale");
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    FF_DISPATCH_MODE(mode, name, [&] {
      using A = acc_t<scalar_t>;
      if (mask)
        forward_kernel<scalar_t, kMode, true>(n, m, ptr<const scalar_t>(x),
                                              ptr<const scalar_t>(raw), ptr<const scalar_t>(shift),
                                              ptr<const uint8_t>(mask), ptr<scalar_t>(y),
                                              ptr<A>(logdet), A(clamp), nthreads);
      else
        forward_kernel<scalar_t, kMode, false>(n, m, ptr<const scalar_t>(x),
                                               ptr<const scalar_t>(raw), ptr<const scalar_t>(shift),
                                               nullptr, ptr<scalar_t>(y), ptr<A>(logdet), A(clamp),
                                               nthreads);
    });
  });
}

void coupling_inverse_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                          std::uintptr_t y, std::uintptr_t raw, std::uintptr_t shift,
                          std::uintptr_t mask, std::uintptr_t x, std::uintptr_t logdet,
                          int nthreads) {
  const char* name = "coupling_inverse_cpu";
  check_common(name, mode, clamp, n, m, nthreads);
  check_ptr(y, n * m, "y");
  check_ptr(shift, n * m, "shift");
  check_ptr(x, n * m, "x");
  check_ptr(logdet, n, "logdet");
  if (mode != kAdditive) check_ptr(raw, n * m, "raw_scale");
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    FF_DISPATCH_MODE(mode, name, [&] {
      using A = acc_t<scalar_t>;
      if (mask)
        inverse_kernel<scalar_t, kMode, true>(n, m, ptr<const scalar_t>(y),
                                              ptr<const scalar_t>(raw), ptr<const scalar_t>(shift),
                                              ptr<const uint8_t>(mask), ptr<scalar_t>(x),
                                              ptr<A>(logdet), A(clamp), nthreads);
      else
        inverse_kernel<scalar_t, kMode, false>(n, m, ptr<const scalar_t>(y),
                                               ptr<const scalar_t>(raw), ptr<const scalar_t>(shift),
                                               nullptr, ptr<scalar_t>(x), ptr<A>(logdet), A(clamp),
                                               nthreads);
    });
  });
}

void coupling_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                           std::uintptr_t x, std::uintptr_t raw, std::uintptr_t mask,
                           std::uintptr_t grad_y, std::uintptr_t grad_logdet,
                           std::uintptr_t grad_x, std::uintptr_t grad_raw,
                           std::uintptr_t grad_shift, int nthreads) {
  const char* name = "coupling_backward_cpu";
  check_common(name, mode, clamp, n, m, nthreads);
  check(mode != kAdditive, std::string(name) + ": the additive coupling has no native backward");
  check_ptr(x, n * m, "x");
  check_ptr(raw, n * m, "raw_scale");
  check_ptr(grad_y, n * m, "grad_y");
  check_ptr(grad_logdet, n, "grad_logdet");
  check_ptr(grad_x, n * m, "grad_x");
  check_ptr(grad_raw, n * m, "grad_raw");
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    FF_DISPATCH_MODE(mode, name, [&] {
      using A = acc_t<scalar_t>;
      auto run = [&](auto masked) {
        backward_kernel<scalar_t, kMode, decltype(masked)::value>(
            n, m, ptr<const scalar_t>(x), ptr<const scalar_t>(raw), ptr<const uint8_t>(mask),
            ptr<const scalar_t>(grad_y), ptr<const A>(grad_logdet), ptr<scalar_t>(grad_x),
            ptr<scalar_t>(grad_raw), ptr<scalar_t>(grad_shift), A(clamp), nthreads);
      };
      if (mask)
        run(std::true_type{});
      else
        run(std::false_type{});
    });
  });
}

void coupling_inverse_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                                   std::uintptr_t x, std::uintptr_t raw, std::uintptr_t mask,
                                   std::uintptr_t grad_x, std::uintptr_t grad_logdet,
                                   std::uintptr_t grad_y, std::uintptr_t grad_raw,
                                   std::uintptr_t grad_shift, int nthreads) {
  const char* name = "coupling_inverse_backward_cpu";
  check_common(name, mode, clamp, n, m, nthreads);
  check(mode != kAdditive, std::string(name) + ": the additive coupling has no native backward");
  check_ptr(x, n * m, "x");
  check_ptr(raw, n * m, "raw_scale");
  check_ptr(grad_x, n * m, "grad_x");
  check_ptr(grad_logdet, n, "grad_logdet");
  check_ptr(grad_y, n * m, "grad_y");
  check_ptr(grad_raw, n * m, "grad_raw");
  check_ptr(grad_shift, n * m, "grad_shift");
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    FF_DISPATCH_MODE(mode, name, [&] {
      using A = acc_t<scalar_t>;
      auto run = [&](auto masked) {
        inverse_backward_kernel<scalar_t, kMode, decltype(masked)::value>(
            n, m, ptr<const scalar_t>(x), ptr<const scalar_t>(raw), ptr<const uint8_t>(mask),
            ptr<const scalar_t>(grad_x), ptr<const A>(grad_logdet), ptr<scalar_t>(grad_y),
            ptr<scalar_t>(grad_raw), ptr<scalar_t>(grad_shift), A(clamp), nthreads);
      };
      if (mask)
        run(std::true_type{});
      else
        run(std::false_type{});
    });
  });
}

}  // namespace ff
