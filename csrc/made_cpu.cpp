// CPU MAF inverse: the degree walk of made.h over blocks of samples, OpenMP over blocks.
//
// Each thread owns a block state in the workspace: one 128-byte row (32 fp32 / 16 fp64 samples)
// per input and per hidden unit, samples contiguous. A group of units of one degree is a small
// matrix product (units x prefix) @ (prefix x samples) done by a register-blocked micro-kernel:
// R units x BS samples of accumulators, one broadcast weight and NV vector loads per prefix entry.
// The micro-kernel is written once with GCC/Clang vector extensions and compiled three times
// (AVX-512, AVX2+FMA, baseline SSE2), picked at run time: the project builds without -march.
#include <algorithm>
#include <cstring>
#include <string>

#include "made.h"

#if defined(FF_WITH_OPENMP)
#include <omp.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"

namespace ff {
namespace {

#define FF_MADE_INLINE inline __attribute__((always_inline))

template <typename T>
struct Walk {
  int act, mode;
  T c, inv_c;
  int64_t n, d, L;
  const int64_t* hidden;  // [L]
  const int64_t* offs;    // [L] row offset of layer l's units in the block state (after d inputs)
  const T* u;
  const T* init;
  const T* const* w;  // [L + 1]
  const T* const* b;  // [L + 1]
  const int64_t* bounds;
  T* x;
  T* logdet;
};

// acc[i][:] = sum_{k < K} w[i][k] * prev[k][:], for R rows, BS = NV * W samples.
template <typename T, int W, int NV, int R>
FF_MADE_INLINE void micro(const T* const* w, int64_t K, const T* prev, T* out) {
  typedef T V __attribute__((vector_size(W * sizeof(T))));
  constexpr int BS = NV * W;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = V{} + T(0);
  for (int64_t k = 0; k < K; ++k) {
    V p[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) std::memcpy(&p[v], prev + k * BS + v * W, sizeof(V));
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const V wv = V{} + w[i][k];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] += wv * p[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) std::memcpy(out + i * BS + v * W, &acc[i][v], sizeof(V));
}

// Rows [r0, r1) of layer weights `wl` (leading dim ldw) over prefix K of `prev`, into out rows.
template <typename T, int W, int NV, int R>
FF_MADE_INLINE void rows_product(const T* wl, int64_t ldw, int64_t r0, int64_t r1, int64_t K,
                                 const T* prev, T* out) {
  constexpr int BS = NV * W;
  int64_t r = r0;
  const T* ptrs[R];
  for (; r + R <= r1; r += R) {
    for (int i = 0; i < R; ++i) ptrs[i] = wl + (r + i) * ldw;
    micro<T, W, NV, R>(ptrs, K, prev, out + r * BS);
  }
  for (; r < r1; ++r) {
    ptrs[0] = wl + r * ldw;
    micro<T, W, NV, 1>(ptrs, K, prev, out + r * BS);
  }
}

// x = u * exp(s) + t for one input over the block; ts holds BS shifts then BS raw scales.
template <typename T, int Mode, int BS>
FF_MADE_INLINE void affine_step(const T* ts, const T* us, T bt, T br, T c, T inv_c, T* xk, T* ld) {
#pragma omp simd
  for (int s = 0; s < BS; ++s) {
    T e, ds;
    const T sv = scale_fn<Mode, T>(ts[BS + s] + br, c, inv_c, e, ds);
    xk[s] = us[s] * e + (ts[s] + bt);
    ld[s] += sv;
  }
}

// Hidden units of degree m, every layer in turn (block state `ws`, samples [b0, b0 + nb)).
template <typename T, int W, int NV, int R>
FF_MADE_INLINE void hidden_groups(const Walk<T>& P, int64_t m, int64_t b0, int64_t nb, T* ws) {
  constexpr int BS = NV * W;
  const int64_t d = P.d, L = P.L;
  const T* xs = ws;
    for (int64_t l = 0; l < L; ++l) {
    const int64_t* bl = P.bounds + l * (d + 1);
    const int64_t r0 = m == 0 ? 0 : bl[m - 1], r1 = bl[m];
    if (r1 <= r0) continue;
    const int64_t K = l == 0 ? m : P.bounds[(l - 1) * (d + 1) + m];
    const int64_t ldw = l == 0 ? d : P.hidden[l - 1];
    const T* prev = l == 0 ? xs : ws + (d + P.offs[l - 1]) * BS;
    T* out = ws + (d + P.offs[l]) * BS;
    rows_product<T, W, NV, R>(P.w[l], ldw, r0, r1, K, prev, out);
    const T* bias = P.b[l];
    for (int64_t r = r0; r < r1; ++r) {
      T* o = out + r * BS;
      const T br = bias[r];
      if (l == 0 && P.init != nullptr) {
        const int64_t h0 = P.hidden[0];
        for (int64_t s = 0; s < nb; ++s) o[s] += P.init[(b0 + s) * h0 + r];
      }
#pragma omp simd
      for (int s = 0; s < BS; ++s) o[s] = made_activation<T>(P.act, o[s] + br);
    }
  }
}

template <typename T, int W, int NV, int R>
FF_MADE_INLINE void walk_block(const Walk<T>& P, int64_t b0, int64_t nb, T* ws) {
  constexpr int BS = NV * W;
  const int64_t d = P.d, L = P.L;
  T* xs = ws;  // [d][BS]
  T ld[BS];
  for (int s = 0; s < BS; ++s) ld[s] = T(0);

  hidden_groups<T, W, NV, R>(P, 0, b0, nb, ws);
  const T* wout = P.w[L];
  const T* bout = P.b[L];
  const int64_t hl = P.hidden[L - 1];
  const T* last = ws + (d + P.offs[L - 1]) * BS;
  const int64_t* bL = P.bounds + (L - 1) * (d + 1);
  T ts[2 * BS];
  for (int64_t k = 0; k < d; ++k) {
    const T* rows[2] = {wout + k * hl, wout + (d + k) * hl};
    micro<T, W, NV, 2>(rows, bL[k], last, ts);
    const T bt = bout[k], br = bout[d + k];
    T us[BS];
    for (int s = 0; s < BS; ++s) us[s] = s < nb ? P.u[(b0 + s) * d + k] : T(0);
    T* xk = xs + k * BS;
    switch (P.mode) {
      case kSoftClamp: affine_step<T, kSoftClamp, BS>(ts, us, bt, br, P.c, P.inv_c, xk, ld); break;
      case kGlowSigmoid: affine_step<T, kGlowSigmoid, BS>(ts, us, bt, br, P.c, P.inv_c, xk, ld); break;
      case kIdentity: affine_step<T, kIdentity, BS>(ts, us, bt, br, P.c, P.inv_c, xk, ld); break;
      default: affine_step<T, kAdditive, BS>(ts, us, bt, br, P.c, P.inv_c, xk, ld); break;
    }
    if (k + 1 < d) hidden_groups<T, W, NV, R>(P, k + 1, b0, nb, ws);
  }
  for (int64_t s = 0; s < nb; ++s) {
    for (int64_t k = 0; k < d; ++k) P.x[(b0 + s) * d + k] = xs[k * BS + s];
    P.logdet[b0 + s] = ld[s];
  }
}

template <typename T>
using BlockFn = void (*)(const Walk<T>&, int64_t, int64_t, T*);

// R * NV = 8 accumulator vectors in every variant; BS = 128 bytes of samples.
template <typename T>
__attribute__((target("avx512f"))) void block_avx512(const Walk<T>& P, int64_t b0, int64_t nb,
                                                     T* ws) {
  constexpr int W = 64 / sizeof(T);
  walk_block<T, W, 2, 4>(P, b0, nb, ws);
}
template <typename T>
__attribute__((target("avx2,fma"))) void block_avx2(const Walk<T>& P, int64_t b0, int64_t nb,
                                                    T* ws) {
  constexpr int W = 32 / sizeof(T);
  walk_block<T, W, 4, 2>(P, b0, nb, ws);
}
template <typename T>
void block_generic(const Walk<T>& P, int64_t b0, int64_t nb, T* ws) {
  constexpr int W = 16 / sizeof(T);
  walk_block<T, W, 8, 1>(P, b0, nb, ws);
}

template <typename T>
BlockFn<T> pick_block_fn() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return &block_avx512<T>;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &block_avx2<T>;
#endif
  return &block_generic<T>;
}

int64_t state_rows(int64_t d, const std::vector<int64_t>& hidden) {
  int64_t r = d;
  for (int64_t h : hidden) r += h;
  return r;
}

template <typename P>
P* ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

template <typename T>
void run_walk(int act, int mode, double clamp, int64_t n, int64_t d,
              const std::vector<int64_t>& hidden, std::uintptr_t u, std::uintptr_t init,
              const std::vector<std::uintptr_t>& weights, const std::vector<std::uintptr_t>& biases,
              const std::vector<int64_t>& bounds, std::uintptr_t x, std::uintptr_t logdet,
              std::uintptr_t workspace, int nthreads) {
  constexpr int BS = made_block_samples<T>();
  const int64_t L = int64_t(hidden.size());
  std::vector<int64_t> offs(L);
  int64_t o = 0;
  for (int64_t l = 0; l < L; ++l) {
    offs[l] = o;
    o += hidden[l];
  }
  std::vector<const T*> w(L + 1), b(L + 1);
  for (int64_t l = 0; l <= L; ++l) {
    w[l] = ptr<const T>(weights[l]);
    b[l] = ptr<const T>(biases[l]);
  }
  Walk<T> P{act,          mode,        T(clamp), T(1) / T(clamp), n,          d,
            L,            hidden.data(), offs.data(), ptr<const T>(u), ptr<const T>(init), w.data(),
            b.data(),     bounds.data(), ptr<T>(x), ptr<T>(logdet)};
  const BlockFn<T> fn = pick_block_fn<T>();
  const int64_t rows = state_rows(d, hidden);
  const int64_t nblocks = (n + BS - 1) / BS;
  T* ws = ptr<T>(workspace);
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, nblocks)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#if defined(FF_WITH_OPENMP)
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    T* mine = ws + int64_t(tid) * rows * BS;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t b0 = blk * BS;
      fn(P, b0, std::min<int64_t>(BS, n - b0), mine);
    }
  }
}

}  // namespace

int64_t made_workspace_bytes(int dtype, int64_t d, const std::vector<int64_t>& hidden,
                             int nthreads) {
  check(d >= 0 && nthreads >= 1, "made_workspace_bytes: bad sizes");
  for (int64_t h : hidden) check(h >= 0, "made_workspace_bytes: negative hidden size");
  // 128 bytes per state row and thread, whatever the dtype
  return int64_t(nthreads) * state_rows(d, hidden) * 128;
}

void made_affine_inverse_cpu(int dtype, int act, int mode, double clamp, int64_t n, int64_t d,
                             const std::vector<int64_t>& hidden, std::uintptr_t u,
                             std::uintptr_t init, const std::vector<std::uintptr_t>& weights,
                             const std::vector<std::uintptr_t>& biases,
                             const std::vector<int64_t>& bounds, std::uintptr_t x, std::uintptr_t logdet, std::uintptr_t workspace,
                             int64_t workspace_bytes, int nthreads) {
  const char* name = "made_affine_inverse_cpu";
  made_check_sizes(name, act, mode, clamp, n, d, hidden, weights, biases);
  check(dtype == kFloat32 || dtype == kFloat64,
        std::string(name) + ": dtype must be float32 or float64 (cast 16-bit inputs first)");
  check(nthreads >= 1, std::string(name) + ": nthreads must be >= 1");
  const int64_t L = int64_t(hidden.size());
  check(int64_t(bounds.size()) == L * (d + 1), std::string(name) + ": bounds must have L * (d + 1) entries");
  made_check_bounds(name, d, hidden, bounds.data());
  for (int64_t l = 0; l <= L; ++l) {
    const int64_t rows = l == L ? 2 * d : hidden[l];
    const int64_t cols = l == 0 ? d : hidden[l - 1];
    check_ptr(weights[l], rows * cols, "weights");
    check_ptr(biases[l], rows, "biases");
  }
  if (n == 0) return;
  check_ptr(u, n * d, "u");
  check_ptr(x, n * d, "x");
  check_ptr(logdet, n, "logdet");
  check_ptr(init, init ? n * hidden[0] : 0, "init");
  check_ptr(workspace, 1, "workspace");
  check(workspace_bytes >= made_workspace_bytes(dtype, d, hidden, nthreads),
        std::string(name) + ": workspace too small (see made_workspace_bytes)");
  if (dtype == kFloat32)
    run_walk<float>(act, mode, clamp, n, d, hidden, u, init, weights, biases, bounds, x, logdet,
                    workspace, nthreads);
  else
    run_walk<double>(act, mode, clamp, n, d, hidden, u, init, weights, biases, bounds, x, logdet,
                     workspace, nthreads);
}

}  // namespace ff
