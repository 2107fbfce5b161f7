// CUDA MAF inverse: the degree walk of made.h, the same contract and loop structure as
// made_cpu.cpp. One launch walks all degrees: each block owns S samples and keeps their whole
// state (inputs and every hidden unit, [S][d + sum(hidden)]) in shared memory. A group of units
// of one degree is spread over the warps (one unit per warp at a time): the lanes stride over the
// unit's mask prefix, each weight is read once per block and used for all S samples, and a warp
// shuffle reduction finishes the dot products. Outputs of input k are one warp's job; x_k is then
// computed by lane s for sample s.
#include <cuda_runtime.h>

#include "cuda_check.h"

#include <string>

#include "made.h"

namespace ff {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// kMadeCudaMaxLayers (made.h): hidden layers the CUDA walk's argument block holds; Python runs the
// reference for deeper MADEs (made_cuda_supported).


template <typename T>
struct WalkArgs {
  int act, mode, L;
  T c, inv_c;
  int64_t n, d, rows;
  int64_t hidden[kMadeCudaMaxLayers];
  int64_t offs[kMadeCudaMaxLayers];  // row of layer l's first unit in the state (after d inputs)
  const T* w[kMadeCudaMaxLayers + 1];
  const T* b[kMadeCudaMaxLayers + 1];
  const int64_t* bounds;  // device [L, d + 1]
  const T* u;
  const T* init;
  T* x;
  T* logdet;
};

template <typename T, int S>
__device__ __forceinline__ void warp_sum(T (&acc)[S]) {
#pragma unroll
  for (int s = 0; s < S; ++s)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[s] += __shfl_xor_sync(0xffffffffu, acc[s], off);
}

template <typename T, int Mode>
__device__ __forceinline__ T affine_elem(T u, T t, T raw, T c, T inv_c, T& x) {
  T e, ds;
  const T s = scale_fn<Mode, T>(raw, c, inv_c, e, ds);
  x = u * e + t;
  return s;
}

// Hidden units of degree m, every layer in turn; ends with the block synchronised.
template <typename T, int S>
__device__ __forceinline__ void hidden_groups(const WalkArgs<T>& P, int64_t m, int64_t b0,
                                              int64_t nb, T* sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t d = P.d, R = P.rows;
  for (int l = 0; l < P.L; ++l) {
    const int64_t* bl = P.bounds + l * (d + 1);
    const int64_t r0 = m == 0 ? 0 : bl[m - 1], r1 = bl[m];
    if (r1 <= r0) continue;  // uniform across the block
    const int64_t K = l == 0 ? m : P.bounds[(l - 1) * (d + 1) + m];
    const int64_t ldw = l == 0 ? d : P.hidden[l - 1];
    const int64_t prev = l == 0 ? 0 : d + P.offs[l - 1];
    const int64_t out = d + P.offs[l];
    const T* W = P.w[l];
    for (int64_t j = r0 + warp; j < r1; j += kWarps) {
      T acc[S];
#pragma unroll
      for (int s = 0; s < S; ++s) acc[s] = T(0);
      const T* wr = W + j * ldw;
      for (int64_t k = lane; k < K; k += 32) {
        const T wk = wr[k];
#pragma unroll
        for (int s = 0; s < S; ++s) acc[s] += wk * sm[s * R + prev + k];
      }
      warp_sum<T, S>(acc);
      if (lane < S) {
        T v = T(0);
#pragma unroll
        for (int s = 0; s < S; ++s) v = s == lane ? acc[s] : v;
        v += P.b[l][j];
        if (l == 0 && P.init != nullptr && lane < nb) v += P.init[(b0 + lane) * P.hidden[0] + j];
        sm[lane * R + out + j] = made_activation<T>(P.act, v);
      }
    }
    __syncthreads();
  }
}

template <typename T, int S>
__global__ void __launch_bounds__(kThreads) made_walk_kernel(const WalkArgs<T> P) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sm = reinterpret_cast<T*>(smem_raw);  // [S][rows]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t d = P.d, R = P.rows, L = P.L;
  const int64_t b0 = int64_t(blockIdx.x) * S;
  const int64_t nb = P.n - b0 < S ? P.n - b0 : S;
  T ld = T(0);  // lane s of warp 0 accumulates sample s

  hidden_groups<T, S>(P, 0, b0, nb, sm);
  const T* wout = P.w[L];
  const T* bout = P.b[L];
  const int64_t hl = P.hidden[L - 1];
  const int64_t last = d + P.offs[L - 1];
  const int64_t* bL = P.bounds + (L - 1) * (d + 1);
  for (int64_t k = 0; k < d; ++k) {
    if (warp == 0) {
      T at[S], ar[S];
#pragma unroll
      for (int s = 0; s < S; ++s) at[s] = ar[s] = T(0);
      const T* wt = wout + k * hl;
      const T* wr = wout + (d + k) * hl;
      const int64_t K = bL[k];
      for (int64_t j = lane; j < K; j += 32) {
        const T a = wt[j], r = wr[j];
#pragma unroll
        for (int s = 0; s < S; ++s) {
          const T h = sm[s * R + last + j];
          at[s] += a * h;
          ar[s] += r * h;
        }
      }
      warp_sum<T, S>(at);
      warp_sum<T, S>(ar);
      if (lane < S) {
        T t = T(0), raw = T(0);
#pragma unroll
        for (int s = 0; s < S; ++s) {
          t = s == lane ? at[s] : t;
          raw = s == lane ? ar[s] : raw;
        }
        t += bout[k];
        raw += bout[d + k];
        const T u = lane < nb ? P.u[(b0 + lane) * d + k] : T(0);
        T x, sv;
        switch (P.mode) {
          case kSoftClamp: sv = affine_elem<T, kSoftClamp>(u, t, raw, P.c, P.inv_c, x); break;
          case kGlowSigmoid: sv = affine_elem<T, kGlowSigmoid>(u, t, raw, P.c, P.inv_c, x); break;
          case kIdentity: sv = affine_elem<T, kIdentity>(u, t, raw, P.c, P.inv_c, x); break;
          default: sv = affine_elem<T, kAdditive>(u, t, raw, P.c, P.inv_c, x); break;
        }
        ld += sv;
        sm[lane * R + k] = x;
      }
    }
    __syncthreads();
    if (k + 1 < d) hidden_groups<T, S>(P, k + 1, b0, nb, sm);
  }
  for (int64_t i = threadIdx.x; i < nb * d; i += kThreads) {
    const int64_t s = i / d, k = i - s * d;
    P.x[(b0 + s) * d + k] = sm[s * R + k];
  }
  if (warp == 0 && lane < nb) P.logdet[b0 + lane] = ld;
}

template <typename T, int S>
void launch(const WalkArgs<T>& P, int64_t smem, cudaStream_t stream) {
  auto kernel = made_walk_kernel<T, S>;
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "made_affine_inverse_cuda: shared memory opt-in");
  const int64_t blocks = (P.n + S - 1) / S;
  kernel<<<dim3(unsigned(blocks)), dim3(kThreads), size_t(smem), stream>>>(P);
  check_cuda(cudaGetLastError(), "made_affine_inverse_cuda launch");
}

template <typename T>
void run_walk(int act, int mode, double clamp, int64_t n, int64_t d,
              const std::vector<int64_t>& hidden, std::uintptr_t u, std::uintptr_t init,
              const std::vector<std::uintptr_t>& weights, const std::vector<std::uintptr_t>& biases,
              std::uintptr_t bounds_dev, std::uintptr_t x, std::uintptr_t logdet,
              cudaStream_t stream) {
  WalkArgs<T> P{};
  P.act = act;
  P.mode = mode;
  P.L = int(hidden.size());
  P.c = T(clamp);
  P.inv_c = T(1) / T(clamp);
  P.n = n;
  P.d = d;
  int64_t o = 0;
  for (int l = 0; l < P.L; ++l) {
    P.hidden[l] = hidden[l];
    P.offs[l] = o;
    o += hidden[l];
  }
  P.rows = d + o;
  for (int l = 0; l <= P.L; ++l) {
    P.w[l] = ptr<const T>(weights[l]);
    P.b[l] = ptr<const T>(biases[l]);
  }
  P.bounds = ptr<const int64_t>(bounds_dev);
  P.u = ptr<const T>(u);
  P.init = ptr<const T>(init);
  P.x = ptr<T>(x);
  P.logdet = ptr<T>(logdet);
  const int64_t row_bytes = P.rows * int64_t(sizeof(T));
  // the opt-in limit of this device (227 KiB on H100, 163 KiB on A100, 99 KiB on sm_86/89)
  const int64_t max_smem = max_shared_per_block_optin();
  check(row_bytes <= max_smem,
        "made_affine_inverse_cuda: d + sum(hidden) too large for the shared-memory walk on this "
        "GPU (made_cuda_supported says so; Python then runs the reference)");
  // Most samples per block that fit, but keep at least ~2 blocks per SM-sized chunk of the batch.
  int S = 8;
  while (S > 1 && (S * row_bytes > max_smem || (n + S - 1) / S < 64)) S /= 2;
  const int64_t smem = S * row_bytes;
  switch (S) {
    case 8: launch<T, 8>(P, smem, stream); break;
    case 4: launch<T, 4>(P, smem, stream); break;
    case 2: launch<T, 2>(P, smem, stream); break;
    default: launch<T, 1>(P, smem, stream); break;
  }
}

}  // namespace

bool made_cuda_supported(int dtype, int64_t d, const std::vector<int64_t>& hidden) {
  if (hidden.empty() || int64_t(hidden.size()) > kMadeCudaMaxLayers) return false;
  int64_t rows = d;
  for (int64_t h : hidden) rows += h;
  const int64_t elem = dtype == kFloat64 ? 8 : 4;
  return rows * elem <= max_shared_per_block_optin();
}

void made_affine_inverse_cuda(int dtype, int act, int mode, double clamp, int64_t n, int64_t d,
                              const std::vector<int64_t>& hidden, std::uintptr_t u,
                              std::uintptr_t init, const std::vector<std::uintptr_t>& weights,
                              const std::vector<std::uintptr_t>& biases,
                              const std::vector<int64_t>& bounds, std::uintptr_t bounds_dev,
                              std::uintptr_t x, std::uintptr_t logdet, std::uintptr_t stream) {
  const char* name = "made_affine_inverse_cuda";
  made_check_args(name, dtype, act, mode, clamp, n, d, hidden, u, init, weights, biases, bounds, x,
                  logdet);
  const int64_t L = int64_t(hidden.size());
  check(L <= kMadeCudaMaxLayers, std::string(name) + ": at most " +
                                     std::to_string(kMadeCudaMaxLayers) + " hidden layers");
  check_ptr(bounds_dev, L * (d + 1), "bounds_dev");
  if (n == 0) return;
  check(n <= int64_t(0x7fffffff), std::string(name) + ": batch too large");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == kFloat32)
    run_walk<float>(act, mode, clamp, n, d, hidden, u, init, weights, biases, bounds_dev, x, logdet,
                    s);
  else
    run_walk<double>(act, mode, clamp, n, d, hidden, u, init, weights, biases, bounds_dev, x,
                     logdet, s);
}

}  // namespace ff
