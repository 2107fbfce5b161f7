// CUDA rational-quadratic spline kernels, with the same contracts, argument checks and
// per-element math (spline.h) as spline_cpu.cpp:
//   kernels   forward/inverse: one block per sample (grid-stride over its m elements), the
//             block's log-det terms reduced in a fixed order: deterministic, no atomics;
//             backward: elementwise (grid-stride), one thread per element;
//   dispatch  dtype x mask x direction -> a launch;
//   entry     the functions of spline.h: argument checks, then dispatch.
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "cuda_check.h"
#include "spline.h"

namespace ff {
namespace {

constexpr int kThreads = 128;

template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : A(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;  // valid in thread 0
}

template <typename T, bool Masked, bool Inverse>
__global__ void __launch_bounds__(kThreads)
    spline_kernel(int64_t m, int k, SplineConsts cs, const T* __restrict__ in,
                  const T* __restrict__ rw, const T* __restrict__ rh, const T* __restrict__ rd,
                  const uint8_t* __restrict__ mask, T* __restrict__ out,
                  acc_t<T>* __restrict__ logdet) {
  using A = acc_t<T>;
  A pw[kSplineMaxBins], ph[kSplineMaxBins];
  const int64_t b = blockIdx.x;
  A acc = 0;
  for (int64_t i = threadIdx.x; i < m; i += kThreads) {
    const int64_t e = b * m + i;
    const bool mk = Masked ? mask[i] != 0 : true;
    A lad;
    const A v = spline_elem<Inverse, T, A>(load(in[e]), rw + e * k, rh + e * k,
                                           rd + e * (k - 1), k, cs, mk, pw, ph, lad);
    out[e] = store<T>(v);
    acc += lad;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) logdet[b] = acc;
}

template <typename T, bool Masked, bool Inverse>
__global__ void __launch_bounds__(kThreads)
    spline_backward_kernel(int64_t n, int64_t m, int k, SplineConsts cs,
                           const T* __restrict__ in, const T* __restrict__ rw,
                           const T* __restrict__ rh, const T* __restrict__ rd,
                           const uint8_t* __restrict__ mask, const T* __restrict__ g_out,
                           const acc_t<T>* __restrict__ gl, T* __restrict__ g_in,
                           T* __restrict__ gw, T* __restrict__ gh, T* __restrict__ gd) {
  using A = acc_t<T>;
  A pw[kSplineMaxBins], ph[kSplineMaxBins];
  const int64_t total = n * m;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kThreads) {
    const int64_t b = e / m, i = e - b * m;
    const bool mk = Masked ? mask[i] != 0 : true;
    const A g = spline_elem_backward<Inverse, T, A>(
        load(in[e]), rw + e * k, rh + e * k, rd + e * (k - 1), k, cs, mk, load(g_out[e]), gl[b],
        pw, ph, gw + e * k, gh + e * k, gd + e * (k - 1));
    g_in[e] = store<T>(g);
  }
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

void rq_spline_cuda(int dtype, int64_t n, int64_t m, int bins, double bound,
                    double min_bin_width, double min_bin_height, double min_derivative,
                    bool inverse, std::uintptr_t in, std::uintptr_t widths,
                    std::uintptr_t heights, std::uintptr_t derivatives, std::uintptr_t mask,
                    std::uintptr_t out, std::uintptr_t logdet, std::uintptr_t stream) {
  const char* name = "rq_spline_cuda";
  check_spline(name, n, m, bins, bound, min_bin_width, min_bin_height, min_derivative, in, widths,
               heights, derivatives, out, logdet);
  FF_CHECK(n <= int64_t(0x7fffffff), std::string(name) + ": batch too large for one grid");
  if (n == 0) return;
  const SplineConsts cs =
      spline_consts(bins, bound, min_bin_width, min_bin_height, min_derivative);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  dispatch_spline(name, dtype, mask != 0, inverse, [&](auto t, auto mk, auto inv) {
    using T = decltype(t);
    using A = acc_t<T>;
    spline_kernel<T, decltype(mk)::value, decltype(inv)::value>
        <<<dim3(unsigned(n)), kThreads, 0, st>>>(
            m, bins, cs, ptr<const T>(in), ptr<const T>(widths), ptr<const T>(heights),
            ptr<const T>(derivatives), ptr<const uint8_t>(mask), ptr<T>(out), ptr<A>(logdet));
  });
  check_cuda(cudaGetLastError(), name);
}

void rq_spline_backward_cuda(int dtype, int64_t n, int64_t m, int bins, double bound,
                             double min_bin_width, double min_bin_height, double min_derivative,
                             bool inverse, std::uintptr_t in, std::uintptr_t widths,
                             std::uintptr_t heights, std::uintptr_t derivatives,
                             std::uintptr_t mask, std::uintptr_t grad_out,
                             std::uintptr_t grad_logdet, std::uintptr_t grad_in,
                             std::uintptr_t grad_widths, std::uintptr_t grad_heights,
                             std::uintptr_t grad_derivatives, std::uintptr_t stream) {
  const char* name = "rq_spline_backward_cuda";
  check_spline_backward(name, n, m, bins, bound, min_bin_width, min_bin_height, min_derivative,
                        in, widths, heights, derivatives, grad_out, grad_logdet, grad_in,
                        grad_widths, grad_heights, grad_derivatives);
  const int64_t total = n * m;
  if (total == 0) return;
  const SplineConsts cs =
      spline_consts(bins, bound, min_bin_width, min_bin_height, min_derivative);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  int64_t blocks = (total + kThreads - 1) / kThreads;
  blocks = blocks > 65535 * 16 ? 65535 * 16 : blocks;
  dispatch_spline(name, dtype, mask != 0, inverse, [&](auto t, auto mk, auto inv) {
    using T = decltype(t);
    using A = acc_t<T>;
    spline_backward_kernel<T, decltype(mk)::value, decltype(inv)::value>
        <<<dim3(unsigned(blocks)), kThreads, 0, st>>>(
            n, m, bins, cs, ptr<const T>(in), ptr<const T>(widths), ptr<const T>(heights),
            ptr<const T>(derivatives), ptr<const uint8_t>(mask), ptr<const T>(grad_out),
            ptr<const A>(grad_logdet), ptr<T>(grad_in), ptr<T>(grad_widths),
            ptr<T>(grad_heights), ptr<T>(grad_derivatives));
  });
  check_cuda(cudaGetLastError(), name);
}

}  // namespace ff
