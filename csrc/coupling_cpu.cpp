// CPU coupling kernels: OpenMP over the batch, one vectorizable pass per sample. The loops live in
// coupling_cpu_kernels.inc, compiled here for the baseline ISA and (x86-64 GCC) for AVX2+FMA and
// AVX-512, chosen at run time. This file checks arguments and dispatches.
#include <string>
#include <type_traits>

#include "coupling.h"

namespace ff {
namespace base {
#include "coupling_cpu_kernels.inc"
}  // namespace base

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FF_HAVE_AVX2_CLONE 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "coupling_cpu_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")
namespace avx512 {
#include "coupling_cpu_kernels.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {

#if defined(FF_HAVE_AVX2_CLONE)
#define FF_ISA_CALL(FN, ...)                                \
  (cpu_isa_level() == kIsaAvx512 ? avx512::FN(__VA_ARGS__)  \
   : cpu_isa_level() == kIsaAvx2 ? avx2::FN(__VA_ARGS__)    \
                                 : base::FN(__VA_ARGS__))
#else
#define FF_ISA_CALL(FN, ...) base::FN(__VA_ARGS__)
#endif

void check_common(const char* name, int mode, double clamp, int64_t n, int64_t m, int nthreads) {
  check(n >= 0 && m >= 0, std::string(name) + ": negative size");
  check(mode != kSoftClamp || clamp > 0, std::string(name) + ": clamp must be > 0");
  check(nthreads >= 1, std::string(name) + ": nthreads must be >= 1");
}

}  // namespace

void coupling_forward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                          std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                          std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask,
                          std::uintptr_t y, std::uintptr_t logdet, int nthreads) {
  const char* name = "coupling_forward_cpu";
  check_common(name, mode, clamp, n, m, nthreads);
  check_strided(x, n, m, s_x, "x");
  check_strided(shift, n, m, s_shift, "shift");
  if (mode != kAdditive) check_strided(raw, n, m, s_raw, "raw_scale");
  check_ptr(y, n * m, "y");
  check_ptr(logdet, n, "logdet");
  FF_ISA_CALL(run_affine<false>, name, dtype, mode, clamp, n, m, x, s_x, raw, s_raw, shift,
              s_shift, mask, y, logdet, nthreads);
}

void coupling_inverse_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                          std::uintptr_t y, int64_t s_y, std::uintptr_t raw, int64_t s_raw,
                          std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask,
                          std::uintptr_t x, std::uintptr_t logdet, int nthreads) {
  const char* name = "coupling_inverse_cpu";
  check_common(name, mode, clamp, n, m, nthreads);
  check_strided(y, n, m, s_y, "y");
  check_strided(shift, n, m, s_shift, "shift");
  if (mode != kAdditive) check_strided(raw, n, m, s_raw, "raw_scale");
  check_ptr(x, n * m, "x");
  check_ptr(logdet, n, "logdet");
  FF_ISA_CALL(run_affine<true>, name, dtype, mode, clamp, n, m, y, s_y, raw, s_raw, shift,
              s_shift, mask, x, logdet, nthreads);
}

void coupling_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                           std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                           std::uintptr_t mask, std::uintptr_t grad_y, std::uintptr_t grad_logdet,
                           std::uintptr_t grad_x, std::uintptr_t grad_raw, int nthreads) {
  const char* name = "coupling_backward_cpu";
  check_common(name, mode, clamp, n, m, nthreads);
  check(mode != kAdditive, std::string(name) + ": the additive coupling has no native backward");
  check_strided(x, n, m, s_x, "x");
  check_strided(raw, n, m, s_raw, "raw_scale");
  check_ptr(grad_y, n * m, "grad_y");
  check_ptr(grad_logdet, n, "grad_logdet");
  check_ptr(grad_x, n * m, "grad_x");
  check_ptr(grad_raw, n * m, "grad_raw");
  FF_ISA_CALL(run_backward, name, dtype, mode, clamp, n, m, x, s_x, raw, s_raw, mask, grad_y,
              grad_logdet, grad_x, grad_raw, nthreads);
}

void coupling_inverse_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                                   std::uintptr_t x, std::uintptr_t raw, int64_t s_raw,
                                   std::uintptr_t mask, std::uintptr_t grad_x,
                                   std::uintptr_t grad_logdet, std::uintptr_t grad_y,
                                   std::uintptr_t grad_raw, std::uintptr_t grad_shift,
                                   int nthreads) {
  const char* name = "coupling_inverse_backward_cpu";
  check_common(name, mode, clamp, n, m, nthreads);
  check(mode != kAdditive, std::string(name) + ": the additive coupling has no native backward");
  check_ptr(x, n * m, "x");
  check_strided(raw, n, m, s_raw, "raw_scale");
  check_ptr(grad_x, n * m, "grad_x");
  check_ptr(grad_logdet, n, "grad_logdet");
  check_ptr(grad_y, n * m, "grad_y");
  check_ptr(grad_raw, n * m, "grad_raw");
  check_ptr(grad_shift, n * m, "grad_shift");
  FF_ISA_CALL(run_inverse_backward, name, dtype, mode, clamp, n, m, x, raw, s_raw, mask, grad_x,
              grad_logdet, grad_y, grad_raw, grad_shift, nthreads);
}

}  // namespace ff
