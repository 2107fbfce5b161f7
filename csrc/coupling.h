// Fused coupling kernels (NICE additive, RealNVP/Glow affine). See DESIGN.md, kernel family 1.
//
// `n` samples of `m` elements each. Inputs marked (strided) may have any batch stride `s_* >= m`
// (sample b starts at p + b * s_*, its m elements contiguous), so the halves of a conditioner's
// output are read in place; every other buffer is contiguous. `mask` (may be 0) is `m` bytes,
// broadcast over the batch: where it is 0 the element passes through unchanged and adds nothing
// to the log-det. `logdet` and `grad_logdet` are fp32, or fp64 when dtype is fp64.
//   forward:  y = x * exp(s) + t,   logdet[n] = sum_i s[n, i],   s = scale_fn(raw)
//   inverse:  x = (y - t) * exp(-s), logdet[n] = -sum_i s[n, i]
#pragma once
#include <cstdint>

#include "dispatch.h"

namespace ff {

// forward: x, raw, shift strided
void coupling_forward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                          std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                          std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask,
                          std::uintptr_t y, std::uintptr_t logdet, int nthreads);
// inverse: y, raw, shift strided
void coupling_inverse_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                          std::uintptr_t y, int64_t s_y, std::uintptr_t raw, int64_t s_raw,
                          std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask,
                          std::uintptr_t x, std::uintptr_t logdet, int nthreads);
// Backward of forward: from x, raw (strided), grad_y, grad_logdet -> grad_x, grad_raw. (grad_shift
// is grad_y itself, times the mask if there is one: the caller forms it without a kernel.)
void coupling_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                           std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                           std::uintptr_t mask, std::uintptr_t grad_y, std::uintptr_t grad_logdet,
                           std::uintptr_t grad_x, std::uintptr_t grad_raw, int nthreads);
// Backward of inverse: from the inverse's output x, raw (strided), grad_x, grad_logdet -> grad_y,
// grad_raw, grad_shift.
void coupling_inverse_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t m,
                                   std::uintptr_t x, std::uintptr_t raw, int64_t s_raw,
                                   std::uintptr_t mask, std::uintptr_t grad_x,
                                   std::uintptr_t grad_logdet, std::uintptr_t grad_y,
                                   std::uintptr_t grad_raw, std::uintptr_t grad_shift,
                                   int nthreads);

#if defined(FF_WITH_CUDA)
// Same contracts on device pointers; `workspace` holds coupling_workspace_bytes(...) bytes;
// everything runs on `stream` (a cudaStream_t passed as an integer).
int64_t coupling_workspace_bytes(int dtype, int64_t n, int64_t m);
void coupling_forward_cuda(int dtype, int mode, double clamp, int64_t n, int64_t m,
                           std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                           std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask,
                           std::uintptr_t y, std::uintptr_t logdet, std::uintptr_t workspace,
                           std::uintptr_t stream);
void coupling_inverse_cuda(int dtype, int mode, double clamp, int64_t n, int64_t m,
                           std::uintptr_t y, int64_t s_y, std::uintptr_t raw, int64_t s_raw,
                           std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask,
                           std::uintptr_t x, std::uintptr_t logdet, std::uintptr_t workspace,
                           std::uintptr_t stream);
void coupling_backward_cuda(int dtype, int mode, double clamp, int64_t n, int64_t m,
                            std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                            std::uintptr_t mask, std::uintptr_t grad_y,
                            std::uintptr_t grad_logdet, std::uintptr_t grad_x,
                            std::uintptr_t grad_raw, std::uintptr_t stream);
void coupling_inverse_backward_cuda(int dtype, int mode, double clamp, int64_t n, int64_t m,
                                    std::uintptr_t x, std::uintptr_t raw, int64_t s_raw,
                                    std::uintptr_t mask, std::uintptr_t grad_x,
                                    std::uintptr_t grad_logdet, std::uintptr_t grad_y,
                                    std::uintptr_t grad_raw, std::uintptr_t grad_shift,
                                    std::uintptr_t stream);
#endif

// Elements spanned by n samples of m elements at batch stride s (0 when empty).
inline int64_t strided_extent(int64_t n, int64_t m, int64_t s) {
  return (n == 0 || m == 0) ? 0 : (n - 1) * s + m;
}
inline void check_strided(std::uintptr_t p, int64_t n, int64_t m, int64_t s, const char* name) {
  FF_CHECK(s >= m, std::string(name) + ": batch stride smaller than the sample size");
  check_ptr(p, strided_extent(n, m, s), name);
}

// ---------------------------------------------------------------------------------------------
// Argument checks shared by the CPU and CUDA entry points (each adds its own: threads, grid).

inline void check_coupling_sizes(const char* name, int mode, double clamp, int64_t n, int64_t m,
                                 bool backward) {
  FF_CHECK(n >= 0 && m >= 0, std::string(name) + ": negative size");
  FF_CHECK(mode != kSoftClamp || clamp > 0, std::string(name) + ": clamp must be > 0");
  if (backward)
    FF_CHECK(mode != kAdditive,
             std::string(name) + ": the additive coupling has no native backward");
}

// forward (in = x, out = y) and inverse (in = y, out = x): in, raw, shift strided.
inline void check_coupling_affine(const char* name, int mode, double clamp, int64_t n, int64_t m,
                                  std::uintptr_t in, int64_t s_in, const char* in_name,
                                  std::uintptr_t raw, int64_t s_raw, std::uintptr_t shift,
                                  int64_t s_shift, std::uintptr_t out, const char* out_name,
                                  std::uintptr_t logdet) {
  check_coupling_sizes(name, mode, clamp, n, m, false);
  check_strided(in, n, m, s_in, in_name);
  check_strided(shift, n, m, s_shift, "shift");
  if (mode != kAdditive) check_strided(raw, n, m, s_raw, "raw_scale");
  check_ptr(out, n * m, out_name);
  check_ptr(logdet, n, "logdet");
}

inline void check_coupling_backward(const char* name, int mode, double clamp, int64_t n,
                                    int64_t m, std::uintptr_t x, int64_t s_x, std::uintptr_t raw,
                                    int64_t s_raw, std::uintptr_t grad_y,
                                    std::uintptr_t grad_logdet, std::uintptr_t grad_x,
                                    std::uintptr_t grad_raw) {
  check_coupling_sizes(name, mode, clamp, n, m, true);
  check_strided(x, n, m, s_x, "x");
  check_strided(raw, n, m, s_raw, "raw_scale");
  check_ptr(grad_y, n * m, "grad_y");
  check_ptr(grad_logdet, n, "grad_logdet");
  check_ptr(grad_x, n * m, "grad_x");
  check_ptr(grad_raw, n * m, "grad_raw");
}

inline void check_coupling_inverse_backward(const char* name, int mode, double clamp, int64_t n,
                                            int64_t m, std::uintptr_t x, std::uintptr_t raw,
                                            int64_t s_raw, std::uintptr_t grad_x,
                                            std::uintptr_t grad_logdet, std::uintptr_t grad_y,
                                            std::uintptr_t grad_raw, std::uintptr_t grad_shift) {
  check_coupling_sizes(name, mode, clamp, n, m, true);
  check_ptr(x, n * m, "x");
  check_strided(raw, n, m, s_raw, "raw_scale");
  check_ptr(grad_x, n * m, "grad_x");
  check_ptr(grad_logdet, n, "grad_logdet");
  check_ptr(grad_y, n * m, "grad_y");
  check_ptr(grad_raw, n * m, "grad_raw");
  check_ptr(grad_shift, n * m, "grad_shift");
}

// ---------------------------------------------------------------------------------------------
// dtype x scale mode x mask dispatch shared by the CPU and CUDA files: calls f(CouplingCase<...>{})
// with the storage type, the scale mode and whether there is a mask as compile-time constants.
template <typename T, int Mode, bool Masked>
struct CouplingCase {
  using scalar = T;
  using acc = acc_t<T>;
  static constexpr int mode = Mode;
  static constexpr bool masked = Masked;
};

template <typename F>
void dispatch_coupling(const char* name, int dtype, int mode, bool masked, F&& f) {
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    FF_DISPATCH_MODE(mode, name, [&] {
      if (masked)
        f(CouplingCase<scalar_t, kMode, true>{});
      else
        f(CouplingCase<scalar_t, kMode, false>{});
    });
  });
}

// Per-element math shared by the CPU and CUDA kernels. `mk` is the mask value (1 without a mask).
// Each returns the element's log-det contribution s (0 where masked out).
template <int Mode, typename A>
FF_HOST_DEVICE A coupling_forward_elem(A x, A raw, A t, bool mk, A c, A inv_c, A& y) {
  A e, ds;
  A s = scale_fn<Mode>(raw, c, inv_c, e, ds);
  y = mk ? x * e + t : x;
  return mk ? s : A(0);
}

template <int Mode, typename A>
FF_HOST_DEVICE A coupling_inverse_elem(A y, A raw, A t, bool mk, A c, A inv_c, A& x) {
  A e, ds;
  A s = scale_fn<Mode>(raw, c, inv_c, e, ds);
  // (y - t) * exp(-s): divide instead of a second exp; exact inverse of the forward's multiply
  x = mk ? (y - t) / e : y;
  return mk ? s : A(0);
}

// d/dx, d/draw of the forward, given gy = dL/dy and gl = dL/dlogdet[n].
template <int Mode, typename A>
FF_HOST_DEVICE void coupling_backward_elem(A x, A raw, A gy, A gl, bool mk, A c, A inv_c, A& gx,
                                           A& graw) {
  A e, ds;
  scale_fn<Mode>(raw, c, inv_c, e, ds);
  gx = mk ? gy * e : gy;
  // dy/ds = x * exp(s), dlogdet/ds = 1
  graw = mk ? (gy * x * e + gl) * ds : A(0);
}

// Backward of the inverse x = (y - t) exp(-s), logdet = -sum s, from its output x.
template <int Mode, typename A>
FF_HOST_DEVICE void coupling_inverse_backward_elem(A x, A raw, A gx, A gl, bool mk, A c, A inv_c,
                                                   A& gy, A& graw, A& gt) {
  A e, ds;
  scale_fn<Mode>(raw, c, inv_c, e, ds);
  A g = gx / e;
  gy = mk ? g : gx;
  gt = mk ? -g : A(0);
  // dx/ds = -x, dlogdet/ds = -1
  graw = mk ? -(gx * x + gl) * ds : A(0);
}

}  // namespace ff
