// CUDA coupling kernels, in the same three layers and with the same contracts, argument checks
// and per-element math (coupling.h) as coupling_cpu.cpp:
//   kernels   forward/inverse: grid (n, chunks); each block reduces its chunk's log-det
//             contribution into one workspace slot, then a second kernel sums a sample's slots in
//             a fixed order: deterministic, no atomics. Backward passes are elementwise
//             (grid-stride);
//   dispatch  dtype x scale mode x mask (dispatch_coupling, coupling.h) -> a launch;
//   entry     the functions of coupling.h: argument checks, then dispatch.
#include <cuda_runtime.h>

#include <string>

#include "coupling.h"
#include "cuda_check.h"

namespace ff {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels.

constexpr int kThreads = 256;
constexpr int64_t kElemsPerBlock = 4096;  // enough work per block to hide the reduction
constexpr int64_t kMaxChunks = 1024;

int64_t chunks_for(int64_t m) {
  int64_t c = (m + kElemsPerBlock - 1) / kElemsPerBlock;
  return c < 1 ? 1 : (c > kMaxChunks ? kMaxChunks : c);
}

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

// Inverse = true runs coupling_inverse_elem; `in` is x (forward) or y (inverse).
template <typename T, int Mode, bool Masked, bool Inverse>
__global__ void __launch_bounds__(kThreads)
    affine_kernel(int64_t m, int64_t chunk, const T* __restrict__ in, int64_t s_in,
                  const T* __restrict__ raw, int64_t s_raw, const T* __restrict__ shift,
                  int64_t s_shift, const uint8_t* __restrict__ mask, T* __restrict__ out,
                  acc_t<T>* __restrict__ partial, acc_t<T> c) {
  using A = acc_t<T>;
  const A inv_c = A(1) / c;
  const int64_t b = blockIdx.x;  // grid.x holds the batch (up to 2^31 - 1), grid.y the chunks
  const int64_t begin = int64_t(blockIdx.y) * chunk;
  const int64_t end = begin + chunk < m ? begin + chunk : m;
  const T* in_b = in + b * s_in;
  const T* raw_b = Mode == kAdditive ? nullptr : raw + b * s_raw;
  const T* shift_b = shift + b * s_shift;
  T* out_b = out + b * m;
  A acc = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    A r = Mode == kAdditive ? A(0) : load(raw_b[i]);
    A v;
    const bool mk = Masked ? mask[i] != 0 : true;
    if (Inverse)
      acc += coupling_inverse_elem<Mode, A>(load(in_b[i]), r, load(shift_b[i]), mk, c, inv_c, v);
    else
      acc += coupling_forward_elem<Mode, A>(load(in_b[i]), r, load(shift_b[i]), mk, c, inv_c, v);
    out_b[i] = store<T>(v);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[b * gridDim.y + blockIdx.y] = acc;
}

template <typename A>
__global__ void finish_logdet(int64_t n, int64_t chunks, const A* __restrict__ partial,
                              A* __restrict__ logdet, A sign) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= n) return;
  A s = 0;
  for (int64_t k = 0; k < chunks; ++k) s += partial[b * chunks + k];
  logdet[b] = sign * s;
}

// Backward of the forward (Inverse = false: from x, raw, grad_y -> grad_x, grad_raw) or of the
// inverse (from its output x, raw, grad_x -> grad_y, grad_raw, grad_shift; x contiguous, s_x = m),
// as BackwardPass in coupling_cpu.cpp.
template <typename T, int Mode, bool Masked, bool Inverse>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(int64_t total, int64_t m, const T* __restrict__ x, int64_t s_x,
                    const T* __restrict__ raw, int64_t s_raw, const uint8_t* __restrict__ mask,
                    const T* __restrict__ g, const acc_t<T>* __restrict__ gl, T* __restrict__ g_in,
                    T* __restrict__ graw, T* __restrict__ gshift, acc_t<T> c) {
  using A = acc_t<T>;
  const A inv_c = A(1) / c;
  for (int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x; k < total;
       k += int64_t(gridDim.x) * kThreads) {
    const int64_t b = k / m, i = k - b * m;
    const bool mk = Masked ? mask[i] != 0 : true;
    A a_g, a_graw, a_gt;
    if (Inverse) {
      coupling_inverse_backward_elem<Mode, A>(load(x[b * s_x + i]), load(raw[b * s_raw + i]),
                                              load(g[k]), gl[b], mk, c, inv_c, a_g, a_graw, a_gt);
      gshift[k] = store<T>(a_gt);
    } else {
      coupling_backward_elem<Mode, A>(load(x[b * s_x + i]), load(raw[b * s_raw + i]), load(g[k]),
                                      gl[b], mk, c, inv_c, a_g, a_graw);
    }
    g_in[k] = store<T>(a_g);
    graw[k] = store<T>(a_graw);
  }
}

unsigned elementwise_blocks(int64_t total) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  return unsigned(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

// ---------------------------------------------------------------------------------------------
// Dispatch (arguments checked by the entry points below).

template <bool Inverse>
void run_affine(const char* name, int dtype, int mode, double clamp, int64_t n, int64_t m,
                std::uintptr_t in, int64_t s_in, std::uintptr_t raw, int64_t s_raw,
                std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask, std::uintptr_t out,
                std::uintptr_t logdet, std::uintptr_t workspace, std::uintptr_t stream) {
  if (n == 0) return;
  const int64_t chunks = chunks_for(m);
  const int64_t chunk = (m + chunks - 1) / chunks;
  check_ptr(workspace, n * chunks, "workspace");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_coupling(name, dtype, mode, mask != 0, [&](auto cs) {
    using C = decltype(cs);
    using T = typename C::scalar;
    using A = typename C::acc;
    const dim3 grid{unsigned(n), unsigned(chunks), 1u};
    affine_kernel<T, C::mode, C::masked, Inverse><<<grid, kThreads, 0, s>>>(
        m, chunk, ptr<const T>(in), s_in, ptr<const T>(raw), s_raw, ptr<const T>(shift), s_shift,
        ptr<const uint8_t>(mask), ptr<T>(out), ptr<A>(workspace), A(clamp));
    finish_logdet<A><<<unsigned((n + 127) / 128), 128, 0, s>>>(
        n, chunks, ptr<const A>(workspace), ptr<A>(logdet), Inverse ? A(-1) : A(1));
  });
  check_cuda(cudaGetLastError(), name);
}

template <bool Inverse>
void run_backward(const char* name, int dtype, int mode, double clamp, int64_t n, int64_t m,
                  std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                  std::uintptr_t mask, std::uintptr_t g, std::uintptr_t gl, std::uintptr_t g_in,
                  std::uintptr_t graw, std::uintptr_t gshift, std::uintptr_t stream) {
  const int64_t total = n * m;
  if (total == 0) return;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_coupling(name, dtype, mode, mask != 0, [&](auto cs) {
    using C = decltype(cs);
    using T = typename C::scalar;
    using A = typename C::acc;
    backward_kernel<T, C::mode, C::masked, Inverse>
        <<<elementwise_blocks(total), kThreads, 0, s>>>(
            total, m, ptr<const T>(x), s_x, ptr<const T>(raw), s_raw, ptr<const uint8_t>(mask),
            ptr<const T>(g), ptr<const A>(gl), ptr<T>(g_in), ptr<T>(graw), ptr<T>(gshift),
            A(clamp));
  });
  check_cuda(cudaGetLastError(), name);
}

// The grid's x dimension holds the batch.
void check_grid(const char* name, int64_t n) {
  check(n < (int64_t(1) << 31), std::string(name) + ": batch must be smaller than 2^31");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points.

int64_t coupling_workspace_bytes(int dtype, int64_t n, int64_t m) {
  check(n >= 0 && m >= 0, "coupling_workspace_bytes: negative size");
  return n * chunks_for(m) * acc_bytes(dtype);
}

void coupling_forward_cuda(int dtype, int mode, double clamp, int64_t n, int64_t m,
                           std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                           std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask,
                           std::uintptr_t y, std::uintptr_t logdet, std::uintptr_t workspace,
                           std::uintptr_t stream) {
  const char* name = "coupling_forward_cuda";
  check_coupling_affine(name, mode, clamp, n, m, x, s_x, "x", raw, s_raw, shift, s_shift, y, "y",
                        logdet);
  check_grid(name, n);
  run_affine<false>(name, dtype, mode, clamp, n, m, x, s_x, raw, s_raw, shift, s_shift, mask, y,
                    logdet, workspace, stream);
}

void coupling_inverse_cuda(int dtype, int mode, double clamp, int64_t n, int64_t m,
                           std::uintptr_t y, int64_t s_y, std::uintptr_t raw, int64_t s_raw,
                           std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask,
                           std::uintptr_t x, std::uintptr_t logdet, std::uintptr_t workspace,
                           std::uintptr_t stream) {
  const char* name = "coupling_inverse_cuda";
  check_coupling_affine(name, mode, clamp, n, m, y, s_y, "y", raw, s_raw, shift, s_shift, x, "x",
                        logdet);
  check_grid(name, n);
  run_affine<true>(name, dtype, mode, clamp, n, m, y, s_y, raw, s_raw, shift, s_shift, mask, x,
                   logdet, workspace, stream);
}

void coupling_backward_cuda(int dtype, int mode, double clamp, int64_t n, int64_t m,
                            std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                            std::uintptr_t mask, std::uintptr_t grad_y,
                            std::uintptr_t grad_logdet, std::uintptr_t grad_x,
                            std::uintptr_t grad_raw, std::uintptr_t stream) {
  const char* name = "coupling_backward_cuda";
  check_coupling_backward(name, mode, clamp, n, m, x, s_x, raw, s_raw, grad_y, grad_logdet,
                          grad_x, grad_raw);
  run_backward<false>(name, dtype, mode, clamp, n, m, x, s_x, raw, s_raw, mask, grad_y,
                      grad_logdet, grad_x, grad_raw, 0, stream);
}

void coupling_inverse_backward_cuda(int dtype, int mode, double clamp, int64_t n, int64_t m,
                                    std::uintptr_t x, std::uintptr_t raw, int64_t s_raw,
                                    std::uintptr_t mask, std::uintptr_t grad_x,
                                    std::uintptr_t grad_logdet, std::uintptr_t grad_y,
                                    std::uintptr_t grad_raw, std::uintptr_t grad_shift,
                                    std::uintptr_t stream) {
  const char* name = "coupling_inverse_backward_cuda";
  check_coupling_inverse_backward(name, mode, clamp, n, m, x, raw, s_raw, grad_x, grad_logdet,
                                  grad_y, grad_raw, grad_shift);
  run_backward<true>(name, dtype, mode, clamp, n, m, x, m, raw, s_raw, mask, grad_x, grad_logdet,
                     grad_y, grad_raw, grad_shift, stream);
}

}  // namespace ff
