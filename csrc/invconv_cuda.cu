// CUDA invertible 1x1 convolution kernels: the same contracts (invconv.h) and LU formulas as
// invconv_cpu.cpp. lu_weight: one block (O(C^3) once per step). channel_affine: one thread per
// pixel and group of kRows output channels. Parameter gradients: 32x32 output tiles per block over
// a chunk of pixels, partial sums into a workspace, then a fixed-order reduction kernel: no
// atomics, deterministic. Everything is launched on the stream the caller passes.
#include <cuda_runtime.h>

#include "cuda_check.h"

#include <string>

#include "invconv.h"

namespace ff {
namespace {



// ---------------------------------------------------------------------------------------------
constexpr int kLuThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kLuThreads)
    lu_weight_kernel(int64_t c, const T* __restrict__ pm, const T* __restrict__ l,
                     const T* __restrict__ u, const T* __restrict__ log_s,
                     const T* __restrict__ sign_s, T* __restrict__ w, T* __restrict__ w_inv,
                     acc_t<T>* __restrict__ logdet, acc_t<T>* __restrict__ ws) {
  using A = acc_t<T>;
  A* prod = ws;              // L U~, later U~^-1 L^-1
  A* linv = ws + c * c;      // L^-1
  A* uinv = ws + 2 * c * c;  // U~^-1
  const int64_t cc = c * c;
  for (int64_t e = threadIdx.x; e < cc; e += blockDim.x)
    prod[e] = lu_product<T, A>(l, u, log_s, sign_s, c, e / c, e % c);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < cc; e += blockDim.x) {  // W = P (L U~)
    const int64_t i = e / c, j = e % c;
    A s = 0;
    for (int64_t k = 0; k < c; ++k) s += A(load(pm[i * c + k])) * prod[k * c + j];
    w[e] = store<T>(s);
  }
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {  // columns are independent
    lower_inverse_column<T, A>(l, c, j, linv);
    upper_inverse_column<T, A>(u, log_s, sign_s, c, j, uinv);
  }
  __syncthreads();  // also: every thread is done reading prod for W
  for (int64_t e = threadIdx.x; e < cc; e += blockDim.x) {  // U~^-1 L^-1
    const int64_t i = e / c, j = e % c;
    A s = 0;
    for (int64_t k = i > j ? i : j; k < c; ++k) s += uinv[i * c + k] * linv[k * c + j];
    prod[e] = s;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < cc; e += blockDim.x) {  // W^-1 = U~^-1 L^-1 P^T
    const int64_t i = e / c, j = e % c;
    A s = 0;
    for (int64_t k = 0; k < c; ++k) s += prod[i * c + k] * A(load(pm[j * c + k]));
    w_inv[e] = store<T>(s);
  }
  if (threadIdx.x == 0) {
    A s = 0;
    for (int64_t i = 0; i < c; ++i) s += A(load(log_s[i]));
    *logdet = s;
  }
}

// ---------------------------------------------------------------------------------------------
constexpr int kAffineThreads = 128;
constexpr int kRows = 8;  // output channels per thread: each x load feeds kRows multiply-adds

// Element (q, ch) of a [N, C, P] tensor, q = n * P + pixel.
__device__ __forceinline__ int64_t at(int64_t q, int64_t ch, int64_t c, int64_t p) {
  const int64_t i = q / p;
  return (i * c + ch) * p + (q - i * p);
}

template <typename T>
__global__ void __launch_bounds__(kAffineThreads)
    channel_affine_kernel(int64_t n, int64_t c, int64_t p, const T* __restrict__ x,
                          const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y) {
  using A = acc_t<T>;
  const int64_t q = int64_t(blockIdx.x) * kAffineThreads + threadIdx.x;
  if (q >= n * p) return;
  const int64_t co0 = int64_t(blockIdx.y) * kRows;
  const int64_t base = at(q, 0, c, p);
  int64_t row[kRows];
  A acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row[r] = co0 + r < c ? co0 + r : c - 1;  // rows past C compute a duplicate, never stored
    acc[r] = b ? A(load(b[row[r]])) : A(0);
  }
  for (int64_t ci = 0; ci < c; ++ci) {
    const A xv = load(x[base + ci * p]);
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] += A(load(w[row[r] * c + ci])) * xv;
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r)
    if (co0 + r < c) y[base + (co0 + r) * p] = store<T>(acc[r]);
}

// ---------------------------------------------------------------------------------------------
constexpr int kTile = 32;          // 32 x 32 outputs of grad_W per block
constexpr int kGradThreads = 256;  // 4 outputs per thread
constexpr int64_t kPixelsPerChunk = 512;
constexpr int64_t kMaxChunks = 256;

int64_t grad_chunks(int64_t n, int64_t p) {
  const int64_t k = (n * p + kPixelsPerChunk - 1) / kPixelsPerChunk;
  return k < 1 ? 1 : (k > kMaxChunks ? kMaxChunks : k);
}

// Block (k, co tile, ci tile): partial_w[k, co, ci] = sum over chunk k of g[co] x[ci], and for the
// first ci tile partial_b[k, co] = sum over chunk k of g[co].
template <typename T>
__global__ void __launch_bounds__(kGradThreads)
    grad_params_kernel(int64_t n, int64_t c, int64_t p, int64_t chunk, const T* __restrict__ x,
                       const T* __restrict__ g, acc_t<T>* __restrict__ part_w,
                       acc_t<T>* __restrict__ part_b) {
  using A = acc_t<T>;
  __shared__ A gs[kTile][kTile + 1];
  __shared__ A xs[kTile][kTile + 1];
  const int tid = threadIdx.x;
  const int row = tid / 8, col0 = (tid % 8) * 4;
  const int64_t co_base = int64_t(blockIdx.y) * kTile, ci_base = int64_t(blockIdx.z) * kTile;
  const int64_t total = n * p;
  const int64_t begin = int64_t(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < total ? begin + chunk : total;
  A acc[4] = {0, 0, 0, 0};
  A acc_b = 0;
  for (int64_t q0 = begin; q0 < end; q0 += kTile) {
    for (int e = tid; e < kTile * kTile; e += kGradThreads) {
      const int r = e / kTile, qq = e % kTile;
      const int64_t q = q0 + qq;
      const bool ok = q < end;
      gs[r][qq] = ok && co_base + r < c ? A(load(g[at(q, co_base + r, c, p)])) : A(0);
      xs[r][qq] = ok && ci_base + r < c ? A(load(x[at(q, ci_base + r, c, p)])) : A(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int qq = 0; qq < kTile; ++qq) {
      const A gv = gs[row][qq];
      acc_b += gv;
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[k] += gv * xs[col0 + k][qq];
    }
    __syncthreads();
  }
  const int64_t co = co_base + row;
  if (co >= c) return;
  A* pw = part_w + int64_t(blockIdx.x) * c * c + co * c;
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (ci_base + col0 + k < c) pw[ci_base + col0 + k] = acc[k];
  if (blockIdx.z == 0 && col0 == 0) part_b[int64_t(blockIdx.x) * c + co] = acc_b;
}

template <typename T>
__global__ void grad_params_finish(int64_t c, int64_t chunks, const acc_t<T>* __restrict__ part_w,
                                   const acc_t<T>* __restrict__ part_b, T* __restrict__ gw,
                                   T* __restrict__ gb) {
  using A = acc_t<T>;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t cc = c * c;
  if (e < cc) {
    A s = 0;
    for (int64_t k = 0; k < chunks; ++k) s += part_w[k * cc + e];
    if (gw) gw[e] = store<T>(s);
  } else if (e < cc + c) {
    A s = 0;
    for (int64_t k = 0; k < chunks; ++k) s += part_b[k * c + (e - cc)];
    if (gb) gb[e - cc] = store<T>(s);
  }
}

}  // namespace

void lu_weight_cuda(int dtype, int64_t c, std::uintptr_t p, std::uintptr_t l, std::uintptr_t u,
                    std::uintptr_t log_s, std::uintptr_t sign_s, std::uintptr_t w,
                    std::uintptr_t w_inv, std::uintptr_t logdet, std::uintptr_t workspace,
                    std::uintptr_t stream) {
  const char* name = "lu_weight_cuda";
  check_lu_weight_args(name, c, p, l, u, log_s, sign_s, w, w_inv, logdet, workspace);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    using A = acc_t<scalar_t>;
    lu_weight_kernel<scalar_t><<<1, kLuThreads, 0, st>>>(
        c, ptr<const scalar_t>(p), ptr<const scalar_t>(l), ptr<const scalar_t>(u),
        ptr<const scalar_t>(log_s), ptr<const scalar_t>(sign_s), ptr<scalar_t>(w),
        ptr<scalar_t>(w_inv), ptr<A>(logdet), ptr<A>(workspace));
  });
  check_cuda(cudaGetLastError(), name);
}

void channel_affine_cuda(int dtype, int64_t n, int64_t c, int64_t p, std::uintptr_t x,
                         std::uintptr_t w, std::uintptr_t b, std::uintptr_t y,
                         std::uintptr_t stream) {
  const char* name = "channel_affine_cuda";
  check_channel_affine_args(name, n, c, p, x, y, "y");
  check_ptr(w, c * c, "W");
  if (n == 0) return;
  const int64_t blocks = (n * p + kAffineThreads - 1) / kAffineThreads;
  const int64_t groups = (c + kRows - 1) / kRows;
  check(blocks < (int64_t(1) << 31) && groups <= 65535, std::string(name) + ": too large");
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    channel_affine_kernel<scalar_t><<<dim3(unsigned(blocks), unsigned(groups)), kAffineThreads, 0,
                                      st>>>(n, c, p, ptr<const scalar_t>(x),
                                            ptr<const scalar_t>(w), ptr<const scalar_t>(b),
                                            ptr<scalar_t>(y));
  });
  check_cuda(cudaGetLastError(), name);
}

int64_t channel_affine_grad_workspace_bytes_cuda(int dtype, int64_t n, int64_t c, int64_t p) {
  check(n >= 0 && c >= 0 && p >= 0, "channel_affine_grad_workspace_bytes_cuda: negative size");
  return grad_chunks(n, p) * (c * c + c) * acc_bytes(dtype);
}

void channel_affine_grad_params_cuda(int dtype, int64_t n, int64_t c, int64_t p, std::uintptr_t x,
                                     std::uintptr_t grad_y, std::uintptr_t grad_w,
                                     std::uintptr_t grad_b, std::uintptr_t workspace,
                                     int64_t workspace_bytes, std::uintptr_t stream) {
  const char* name = "channel_affine_grad_params_cuda";
  check_channel_affine_args(name, n, c, p, x, grad_y, "grad_y");
  check_workspace_bytes(name, workspace, workspace_bytes,
                        channel_affine_grad_workspace_bytes_cuda(dtype, n, c, p));
  const int64_t chunks = grad_chunks(n, p);
  int64_t chunk = (n * p + chunks - 1) / chunks;
  chunk = chunk < 1 ? 1 : chunk;
  const int64_t tiles = (c + kTile - 1) / kTile;
  check(tiles <= 65535, std::string(name) + ": too many channels");
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    using A = acc_t<scalar_t>;
    A* part_w = ptr<A>(workspace);
    A* part_b = part_w + chunks * c * c;
    grad_params_kernel<scalar_t><<<dim3(unsigned(chunks), unsigned(tiles), unsigned(tiles)),
                                   kGradThreads, 0, st>>>(n, c, p, chunk,
                                                          ptr<const scalar_t>(x),
                                                          ptr<const scalar_t>(grad_y), part_w,
                                                          part_b);
    const int64_t outs = c * c + c;
    grad_params_finish<scalar_t><<<unsigned((outs + 255) / 256), 256, 0, st>>>(
        c, chunks, part_w, part_b, ptr<scalar_t>(grad_w), ptr<scalar_t>(grad_b));
  });
  check_cuda(cudaGetLastError(), name);
}

}  // namespace ff
