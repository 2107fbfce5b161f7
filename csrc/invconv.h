// Invertible 1x1 convolution kernels (Glow). See DESIGN.md, kernel family 2.
//
// lu_weight: assembles, once per step (O(C^3), not per pixel),
//   W     = P L (U + diag(sign_s * exp(log_s)))
//   W_inv = (U + diag(sign_s * exp(log_s)))^-1 L^-1 P^T   (two triangular inversions)
//   logdet_per_pixel = sum(log_s)
// where L is read only below its diagonal (unit diagonal implied), U only above it, and P must be
// a permutation matrix (so P^-1 = P^T). All matrices are row-major [C, C]; log_s and sign_s are
// [C]; the log-det is one scalar in the accumulation type (fp32, fp64 for fp64).
//
// channel_affine: the per-pixel map y[n, :, p] = W x[n, :, p] + b for x of shape [N, C, P]
// (an NCHW image with P = H * W pixels, or [N, C] rows with P = 1), contiguous. One read of x, one
// write of y. b may be 0 (no bias). The backward is the same map with W^T (grad_x, no bias) plus
// channel_affine_grad_params: grad_W = sum_{n,p} grad_y[n, :, p] x[n, :, p]^T and
// grad_b = sum_{n,p} grad_y[n, :, p], reduced per thread (CPU) or per block (CUDA) into a
// workspace and summed at the end: no atomics, deterministic.
#pragma once
#include <cstdint>
#include <string>

#include "dispatch.h"
#include "fast_math.h"

namespace ff {

// The instruction set the CPU channel_affine kernels run with: "avx512", "avx2" or "base" (the
// widest the CPU supports, capped by FASTFLOW_CPU_ISA=base|avx2; see cpu_isa.h).
std::string invconv_cpu_isa();

// Bytes of scratch lu_weight_* needs for C channels.
int64_t lu_weight_workspace_bytes(int dtype, int64_t c);

void lu_weight_cpu(int dtype, int64_t c, std::uintptr_t p, std::uintptr_t l, std::uintptr_t u,
                   std::uintptr_t log_s, std::uintptr_t sign_s, std::uintptr_t w,
                   std::uintptr_t w_inv, std::uintptr_t logdet, std::uintptr_t workspace);
void channel_affine_cpu(int dtype, int64_t n, int64_t c, int64_t p, std::uintptr_t x,
                        std::uintptr_t w, std::uintptr_t b, std::uintptr_t y, int nthreads);
// Scratch for channel_affine_grad_params_cpu: one [C*C + C] accumulator per thread.
int64_t channel_affine_grad_workspace_bytes_cpu(int dtype, int64_t c, int nthreads);
void channel_affine_grad_params_cpu(int dtype, int64_t n, int64_t c, int64_t p, std::uintptr_t x,
                                    std::uintptr_t grad_y, std::uintptr_t grad_w,
                                    std::uintptr_t grad_b, std::uintptr_t workspace,
                                    int64_t workspace_bytes, int nthreads);

#if defined(FF_WITH_CUDA)
// Same contracts on device pointers; everything runs on `stream` (a cudaStream_t as an integer).
void lu_weight_cuda(int dtype, int64_t c, std::uintptr_t p, std::uintptr_t l, std::uintptr_t u,
                    std::uintptr_t log_s, std::uintptr_t sign_s, std::uintptr_t w,
                    std::uintptr_t w_inv, std::uintptr_t logdet, std::uintptr_t workspace,
                    std::uintptr_t stream);
void channel_affine_cuda(int dtype, int64_t n, int64_t c, int64_t p, std::uintptr_t x,
                         std::uintptr_t w, std::uintptr_t b, std::uintptr_t y,
                         std::uintptr_t stream);
int64_t channel_affine_grad_workspace_bytes_cuda(int dtype, int64_t n, int64_t c, int64_t p);
void channel_affine_grad_params_cuda(int dtype, int64_t n, int64_t c, int64_t p, std::uintptr_t x,
                                     std::uintptr_t grad_y, std::uintptr_t grad_w,
                                     std::uintptr_t grad_b, std::uintptr_t workspace,
                                     int64_t workspace_bytes, std::uintptr_t stream);
#endif

// ---------------------------------------------------------------------------------------------
// Argument checks shared by the CPU and CUDA entry points.

inline void check_lu_weight_args(const char* name, int64_t c, std::uintptr_t p, std::uintptr_t l,
                                 std::uintptr_t u, std::uintptr_t log_s, std::uintptr_t sign_s,
                                 std::uintptr_t w, std::uintptr_t w_inv, std::uintptr_t logdet,
                                 std::uintptr_t workspace) {
  check(c >= 1, std::string(name) + ": need at least one channel");
  check_ptr(p, c * c, "P");
  check_ptr(l, c * c, "L");
  check_ptr(u, c * c, "U");
  check_ptr(w, c * c, "W");
  check_ptr(w_inv, c * c, "W_inv");
  check_ptr(log_s, c, "log_s");
  check_ptr(sign_s, c, "sign_s");
  check_ptr(logdet, 1, "logdet");
  check_ptr(workspace, 3 * c * c, "workspace");
}

// channel_affine (in = x, out = y) and its parameter gradient (in = x, out = grad_y).
inline void check_channel_affine_args(const char* name, int64_t n, int64_t c, int64_t p,
                                      std::uintptr_t in, std::uintptr_t out,
                                      const char* out_name) {
  check(n >= 0 && c >= 1 && p >= 1, std::string(name) + ": bad sizes");
  check_ptr(in, n * c * p, "x");
  check_ptr(out, n * c * p, out_name);
}

inline void check_workspace_bytes(const char* name, std::uintptr_t workspace, int64_t given,
                                  int64_t needed) {
  check(workspace != 0 && given >= needed, std::string(name) + ": workspace too small");
}

// ---------------------------------------------------------------------------------------------
// Shared pieces of the LU assembly (CPU and CUDA run the same formulas).

// Entry (i, j) of U + diag(sign_s * exp(log_s)): only the strict upper triangle of U is read.
template <typename T, typename A>
FF_HOST_DEVICE A lu_upper(const T* u, const T* log_s, const T* sign_s, int64_t c, int64_t i,
                          int64_t j) {
  if (j > i) return load(u[i * c + j]);
  if (j == i) return load(sign_s[i]) * ff_exp(A(load(log_s[i])));
  return A(0);
}

// Entry (i, j) of L with its diagonal replaced by ones: only the strict lower triangle is read.
template <typename T, typename A>
FF_HOST_DEVICE A lu_lower(const T* l, int64_t c, int64_t i, int64_t j) {
  if (j < i) return load(l[i * c + j]);
  return j == i ? A(1) : A(0);
}

// Entry (i, j) of (L U~): sum over k <= min(i, j) of L[i, k] U~[k, j].
template <typename T, typename A>
FF_HOST_DEVICE A lu_product(const T* l, const T* u, const T* log_s, const T* sign_s, int64_t c,
                            int64_t i, int64_t j) {
  const int64_t kmax = i < j ? i : j;
  A s = A(0);
  for (int64_t k = 0; k <= kmax; ++k)
    s += lu_lower<T, A>(l, c, i, k) * lu_upper<T, A>(u, log_s, sign_s, c, k, j);
  return s;
}

// Column j of L^-1 (unit lower) by forward substitution into linv[:, j] (row-major, stride c).
template <typename T, typename A>
FF_HOST_DEVICE void lower_inverse_column(const T* l, int64_t c, int64_t j, A* linv) {
  for (int64_t i = 0; i < j; ++i) linv[i * c + j] = A(0);
  linv[j * c + j] = A(1);
  for (int64_t i = j + 1; i < c; ++i) {
    A s = A(0);
    for (int64_t k = j; k < i; ++k) s += load(l[i * c + k]) * linv[k * c + j];
    linv[i * c + j] = -s;
  }
}

// Column j of U~^-1 (upper) by back substitution into uinv[:, j].
template <typename T, typename A>
FF_HOST_DEVICE void upper_inverse_column(const T* u, const T* log_s, const T* sign_s, int64_t c,
                                         int64_t j, A* uinv) {
  for (int64_t i = c - 1; i > j; --i) uinv[i * c + j] = A(0);
  for (int64_t i = j; i >= 0; --i) {
    A s = i == j ? A(1) : A(0);
    for (int64_t k = i + 1; k <= j; ++k) s -= load(u[i * c + k]) * uinv[k * c + j];
    uinv[i * c + j] = s / lu_upper<T, A>(u, log_s, sign_s, c, i, i);
  }
}

}  // namespace ff
