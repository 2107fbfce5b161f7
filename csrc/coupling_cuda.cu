// CUDA coupling kernels: the same contracts and per-element math (coupling.h) as coupling_cpu.cpp.
// Forward/inverse: grid (n, chunks); each block reduces its chunk's log-det contribution into one
// workspace slot, then a second kernel sums a sample's slots in a fixed order: deterministic, no
// atomics. Backward passes are elementwise (grid-stride).
#include <cuda_runtime.h>

#include "cuda_check.h"

#include <string>
#include <type_traits>

#include "coupling.h"

namespace ff {
namespace {

template <typename T>
using acc_t = typename Acc<T>::type;

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

template <typename T, int Mode, bool Masked>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(int64_t total, int64_t m, const T* __restrict__ x, int64_t s_x,
                    const T* __restrict__ raw, int64_t s_raw, const uint8_t* __restrict__ mask,
                    const T* __restrict__ gy,
                    const acc_t<T>* __restrict__ gl, T* __restrict__ gx, T* __restrict__ graw,
                    acc_t<T> c) {
  using A = acc_t<T>;
  const A inv_c = A(1) / c;
  for (int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x; k < total;
       k += int64_t(gridDim.x) * kThreads) {
    const int64_t b = k / m, i = k - b * m;
    const bool mk = Masked ? mask[i] != 0 : true;
    A a_gx, a_graw;
    coupling_backward_elem<Mode, A>(load(x[b * s_x + i]), load(raw[b * s_raw + i]), load(gy[k]),
                                    gl[b], mk, c, inv_c, a_gx, a_graw);
    gx[k] = store<T>(a_gx);
    graw[k] = store<T>(a_graw);
  }
}

template <typename T, int Mode, bool Masked>
__global__ void __launch_bounds__(kThreads)
    inverse_backward_kernel(int64_t total, int64_t m, const T* __restrict__ x,
                            const T* __restrict__ raw, int64_t s_raw,
                            const uint8_t* __restrict__ mask,
                            const T* __restrict__ gx, const acc_t<T>* __restrict__ gl,
                            T* __restrict__ gy, T* __restrict__ graw, T* __restrict__ gshift,
                            acc_t<T> c) {
  using A = acc_t<T>;
  const A inv_c = A(1) / c;
  for (int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x; k < total;
       k += int64_t(gridDim.x) * kThreads) {
    const int64_t b = k / m, i = k - b * m;
    A a_gy, a_graw, a_gt;
    coupling_inverse_backward_elem<Mode, A>(load(x[k]), load(raw[b * s_raw + i]), load(gx[k]), gl[b],
                                            Masked ? mask[i] != 0 : true, c, inv_c, a_gy, a_graw,
                                            a_gt);
    gy[k] = store<T>(a_gy);
    graw[k] = store<T>(a_graw);
    gshift[k] = store<T>(a_gt);
  }
}

unsigned elementwise_blocks(int64_t total) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  return unsigned(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

template <typename P>
P* ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

template <bool Inverse>
void run_affine(const char* name, int dtype, int mode, double clamp, int64_t n, int64_t m,
                std::uintptr_t in, int64_t s_in, std::uintptr_t raw, int64_t s_raw,
                std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask, std::uintptr_t out,
                std::uintptr_t logdet, std::uintptr_t workspace, std::uintptr_t stream) {
  check(n >= 0 && m >= 0, std::string(name) + ": negative size");
  check(mode != kSoftClamp || clamp > 0, std::string(name) + ": clamp must be > 0");
  check(n < (int64_t(1) << 31), std::string(name) + ": batch must be smaller than 2^31");
  check_strided(in, n, m, s_in, "input");
  check_strided(shift, n, m, s_shift, "shift");
  if (mode != kAdditive) check_strided(raw, n, m, s_raw, "raw_scale");
  check_ptr(out, n * m, "output");
  check_ptr(logdet, n, "logdet");
  if (n == 0) return;
  const int64_t chunks = chunks_for(m);
  const int64_t chunk = (m + chunks - 1) / chunks;
  check_ptr(workspace, n * chunks, "workspace");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    FF_DISPATCH_MODE(mode, name, [&] {
      using A = acc_t<scalar_t>;
      const dim3 grid{unsigned(n), unsigned(chunks), 1u};
      if (mask)
        affine_kernel<scalar_t, kMode, true, Inverse><<<grid, kThreads, 0, s>>>(
            m, chunk, ptr<const scalar_t>(in), s_in, ptr<const scalar_t>(raw), s_raw,
            ptr<const scalar_t>(shift), s_shift, ptr<const uint8_t>(mask), ptr<scalar_t>(out),
            ptr<A>(workspace), A(clamp));
      else
        affine_kernel<scalar_t, kMode, false, Inverse><<<grid, kThreads, 0, s>>>(
            m, chunk, ptr<const scalar_t>(in), s_in, ptr<const scalar_t>(raw), s_raw,
            ptr<const scalar_t>(shift), s_shift, nullptr, ptr<scalar_t>(out), ptr<A>(workspace),
            A(clamp));
      finish_logdet<A><<<unsigned((n + 127) / 128), 128, 0, s>>>(
          n, chunks, ptr<const A>(workspace), ptr<A>(logdet), Inverse ? A(-1) : A(1));
    });
  });
  check_cuda(cudaGetLastError(), name);
}

}  // namespace

int64_t coupling_workspace_bytes(int dtype, int64_t n, int64_t m) {
  check(n >= 0 && m >= 0, "coupling_workspace_bytes: negative size");
  const int64_t acc_bytes = dtype == kFloat64 ? 8 : 4;
  return n * chunks_for(m) * acc_bytes;
}

void coupling_forward_cuda(int dtype, int mode, double clamp, int64_t n, int64_t m,
                           std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                           std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask,
                           std::uintptr_t y, std::uintptr_t logdet, std::uintptr_t workspace,
                           std::uintptr_t stream) {
  run_affine<false>("coupling_forward_cuda", dtype, mode, clamp, n, m, x, s_x, raw, s_raw, shift,
                    s_shift, mask, y, logdet, workspace, stream);
}

void coupling_inverse_cuda(int dtype, int mode, double clamp, int64_t n, int64_t m,
                           std::uintptr_t y, int64_t s_y, std::uintptr_t raw, int64_t s_raw,
                           std::uintptr_t shift, int64_t s_shift, std::uintptr_t mask,
                           std::uintptr_t x, std::uintptr_t logdet, std::uintptr_t workspace,
                           std::uintptr_t stream) {
  run_affine<true>("coupling_inverse_cuda", dtype, mode, clamp, n, m, y, s_y, raw, s_raw, shift,
                   s_shift, mask, x, logdet, workspace, stream);
}

void coupling_backward_cuda(int dtype, int mode, double clamp, int64_t n, int64_t m,
                            std::uintptr_t x, int64_t s_x, std::uintptr_t raw, int64_t s_raw,
                            std::uintptr_t mask, std::uintptr_t grad_y,
                            std::uintptr_t grad_logdet, std::uintptr_t grad_x,
                            std::uintptr_t grad_raw, std::uintptr_t stream) {
  const char* name = "coupling_backward_cuda";
  check(n >= 0 && m >= 0, std::string(name) + ": negative size");
  check(mode != kAdditive, std::string(name) + ": the additive coupling has no native backward");
  check(mode != kSoftClamp || clamp > 0, std::string(name) + ": clamp must be > 0");
  check_strided(x, n, m, s_x, "x");
  check_strided(raw, n, m, s_raw, "raw_scale");
  check_ptr(grad_y, n * m, "grad_y");
  check_ptr(grad_logdet, n, "grad_logdet");
  check_ptr(grad_x, n * m, "grad_x");
  check_ptr(grad_raw, n * m, "grad_raw");
  const int64_t total = n * m;
  if (total == 0) return;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    FF_DISPATCH_MODE(mode, name, [&] {
      using A = acc_t<scalar_t>;
      auto launch = [&](auto masked) {
        backward_kernel<scalar_t, kMode, decltype(masked)::value>
            <<<elementwise_blocks(total), kThreads, 0, s>>>(
                total, m, ptr<const scalar_t>(x), s_x, ptr<const scalar_t>(raw), s_raw,
                ptr<const uint8_t>(mask), ptr<const scalar_t>(grad_y), ptr<const A>(grad_logdet),
                ptr<scalar_t>(grad_x), ptr<scalar_t>(grad_raw), A(clamp));
      };
      if (mask)
        launch(std::true_type{});
      else
        launch(std::false_type{});
    });
  });
  check_cuda(cudaGetLastError(), name);
}

void coupling_inverse_backward_cuda(int dtype, int mode, double clamp, int64_t n, int64_t m,
                                    std::uintptr_t x, std::uintptr_t raw, int64_t s_raw,
                                    std::uintptr_t mask, std::uintptr_t grad_x,
                                    std::uintptr_t grad_logdet, std::uintptr_t grad_y,
                                    std::uintptr_t grad_raw, std::uintptr_t grad_shift,
                                    std::uintptr_t stream) {
  const char* name = "coupling_inverse_backward_cuda";
  check(n >= 0 && m >= 0, std::string(name) + ": negative size");
  check(mode != kAdditive, std::string(name) + ": the additive coupling has no native backward");
  check(mode != kSoftClamp || clamp > 0, std::string(name) + ": clamp must be > 0");
  check_ptr(x, n * m, "x");
  check_strided(raw, n, m, s_raw, "raw_scale");
  check_ptr(grad_x, n * m, "grad_x");
  check_ptr(grad_logdet, n, "grad_logdet");
  check_ptr(grad_y, n * m, "grad_y");
  check_ptr(grad_raw, n * m, "grad_raw");
  check_ptr(grad_shift, n * m, "grad_shift");
  const int64_t total = n * m;
  if (total == 0) return;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    FF_DISPATCH_MODE(mode, name, [&] {
      using A = acc_t<scalar_t>;
      auto launch = [&](auto masked) {
        inverse_backward_kernel<scalar_t, kMode, decltype(masked)::value>
            <<<elementwise_blocks(total), kThreads, 0, s>>>(
                total, m, ptr<const scalar_t>(x), ptr<const scalar_t>(raw), s_raw,
                ptr<const uint8_t>(mask), ptr<const scalar_t>(grad_x), ptr<const A>(grad_logdet),
                ptr<scalar_t>(grad_y), ptr<scalar_t>(grad_raw), ptr<scalar_t>(grad_shift),
                A(clamp));
      };
      if (mask)
        launch(std::true_type{});
      else
        launch(std::false_type{});
    });
  });
  check_cuda(cudaGetLastError(), name);
}

}  // namespace ff
