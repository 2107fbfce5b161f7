// CPU MAF inverse: the degree walk of made.h over blocks of samples, OpenMP over blocks.
//
// Each thread owns a block state in the workspace: one 128-byte row (32 fp32 / 16 fp64 samples)
// per input and per hidden unit, samples contiguous. A group of units of one degree is a small
// matrix product (units x prefix) @ (prefix x samples) done by a register-blocked micro-kernel:
// R units x BS samples of accumulators, one broadcast weight and NV vector loads per prefix entry.
// The micro-kernel is written once with GCC/Clang vector extensions and built once per ISA
// variant (cpu_isa.h: AVX-512, AVX2+FMA, baseline SSE2), picked per call.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "made.h"
#include "spline.h"

namespace ff {
namespace made_cpu_detail {

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
  int64_t lookahead;  // degrees per lookahead block (1: none), <= 32
  T* x;
  T* logdet;
};

// ---------------------------------------------------------------------------------------------
// The walk of one block, built once per ISA variant (cpu_isa.h): every function below is
// always-inline into block_base / block_avx2 / block_avx512, whose vector-extension code then uses
// that ISA's registers.

// out[i * ostride + :] (+)= sum_{k < K} w[i][k] * prev[k][:] for R rows, BS = NV * W samples
// (ACC: add to what out holds). KS accumulator sets over interleaved k keep enough FMA chains in
// flight when R * NV is small.
template <typename T, int W, int NV, int R, int KS, bool ACC>
FF_INLINE void micro(const T* const* w, int64_t K, const T* prev, T* out, int64_t ostride) {
  typedef T V __attribute__((vector_size(W * sizeof(T))));
  constexpr int BS = NV * W;
  V acc[KS][R][NV];
#pragma GCC unroll 16
  for (int q = 0; q < KS; ++q)
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[q][i][v] = V{};
  int64_t k = 0;
  for (; k + KS <= K; k += KS) {
#pragma GCC unroll 8
    for (int q = 0; q < KS; ++q) {
      V p[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) std::memcpy(&p[v], prev + (k + q) * BS + v * W, sizeof(V));
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        const V wv = vsplat<V>(w[i][k + q]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[q][i][v] += wv * p[v];
      }
    }
  }
  for (; k < K; ++k) {
    V p[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) std::memcpy(&p[v], prev + k * BS + v * W, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const V wv = vsplat<V>(w[i][k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[0][i][v] += wv * p[v];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      V a = acc[0][i][v];
#pragma GCC unroll 8
      for (int q = 1; q < KS; ++q) a += acc[q][i][v];
      T* o = out + i * ostride + v * W;
      if (ACC) {
        V old;
        std::memcpy(&old, o, sizeof(V));
        a += old;
      }
      std::memcpy(o, &a, sizeof(V));
    }
}

// Accumulator sets so that R * NV * KS >= 8 vectors are in flight.
template <int R, int NV>
constexpr int ksplit() {
  return R * NV >= 6 ? 1 : (R * NV >= 4 ? 2 : (R * NV >= 2 ? 4 : 8));
}

// Rows r .. r + rem - 1 (rem < R) into out rows 0 .. rem - 1, with the widest micro-kernel that fits.
template <typename T, int W, int NV, int R, bool ACC>
FF_INLINE void rows_tail(const T* wl, int64_t ldw, int64_t r, int64_t rem, int64_t k0,
                              int64_t K, const T* prev, T* out) {
  if constexpr (R >= 1) {
    constexpr int BS = NV * W;
    if (rem == R) {
      const T* ptrs[R];
      for (int i = 0; i < R; ++i) ptrs[i] = wl + (r + i) * ldw + k0;
      micro<T, W, NV, R, ksplit<R, NV>(), ACC>(ptrs, K - k0, prev + k0 * BS, out, BS);
    } else {
      rows_tail<T, W, NV, R - 1, ACC>(wl, ldw, r, rem, k0, K, prev, out);
    }
  }
}

// Rows [r0, r1) of the layer weights `wl` (leading dim ldw) over prefix entries [k0, K) of `prev`,
// into (ACC: added to) rows 0, 1, ... of `out`.
template <typename T, int W, int NV, int R, bool ACC>
FF_INLINE void rows_product(const T* wl, int64_t ldw, int64_t r0, int64_t r1, int64_t k0,
                                 int64_t K, const T* prev, T* out) {
  constexpr int BS = NV * W;
  if (r1 <= r0) return;
  if (K <= k0 && ACC) return;
  int64_t r = r0;
  const T* ptrs[R];
  for (; r + R <= r1; r += R) {
    for (int i = 0; i < R; ++i) ptrs[i] = wl + (r + i) * ldw + k0;
    micro<T, W, NV, R, 1, ACC>(ptrs, K - k0, prev + k0 * BS, out + (r - r0) * BS, BS);
  }
  if (r < r1) rows_tail<T, W, NV, R - 1, ACC>(wl, ldw, r, r1 - r, k0, K, prev, out + (r - r0) * BS);
}

// x = u * exp(s) + t for one input over the block, from the shift and raw-scale sums.
template <typename T, int Mode, int BS>
FF_INLINE void affine_step(const T* ts, const T* tr, const T* us, T bt, T br, T c, T inv_c,
                                T* xk, T* ld) {
#pragma omp simd
  for (int s = 0; s < BS; ++s) {
    T e, ds;
    const T sv = scale_fn<Mode, T>(tr[s] + br, c, inv_c, e, ds);
    xk[s] = us[s] * e + (ts[s] + bt);
    ld[s] += sv;
  }
}

// Hidden units of degree m, every layer in turn (block state `ws`, samples [b0, b0 + nb)). With
// kb >= 0 the units' sums over the prefix known at degree kb are already in place (lookahead) and
// only the rest is added.
template <typename T, int W, int NV, int R>
FF_INLINE void hidden_groups(const Walk<T>& P, int64_t m, int64_t kb, int64_t b0, int64_t nb,
                                  T* ws) {
  constexpr int BS = NV * W;
  const int64_t d = P.d, L = P.L;
  const T* xs = ws;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* bl = P.bounds + l * (d + 1);
    const int64_t r0 = m == 0 ? 0 : bl[m - 1], r1 = bl[m];
    if (r1 <= r0) continue;
    const int64_t* bp = P.bounds + (l - 1) * (d + 1);
    const int64_t K = l == 0 ? m : bp[m];
    const int64_t ldw = l == 0 ? d : P.hidden[l - 1];
    const T* prev = l == 0 ? xs : ws + (d + P.offs[l - 1]) * BS;
    T* out = ws + (d + P.offs[l]) * BS;
    if (kb < 0) {
      rows_product<T, W, NV, R, false>(P.w[l], ldw, r0, r1, 0, K, prev, out + r0 * BS);
    } else {
      const int64_t k0 = l == 0 ? kb : bp[kb];
      rows_product<T, W, NV, R, true>(P.w[l], ldw, r0, r1, k0, K, prev, out + r0 * BS);
    }
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

// Lookahead at degree kb (before input kb is known): the sums of the outputs of inputs
// [kb, kb + B) and of the hidden units of degrees [kb + 1, kb + B] over everything already final,
// as a few wide products instead of many narrow ones (small degree groups, i.e. large D).
template <typename T, int W, int NV, int R>
FF_INLINE void lookahead(const Walk<T>& P, int64_t kb, int64_t B, T* ws, T* tsb) {
  constexpr int BS = NV * W;
  const int64_t d = P.d, L = P.L;
  const int64_t ke = kb + B < d ? kb + B : d;  // inputs [kb, ke)
  const int64_t hl = P.hidden[L - 1];
  const T* last = ws + (d + P.offs[L - 1]) * BS;
  const int64_t c0 = P.bounds[(L - 1) * (d + 1) + kb];
  rows_product<T, W, NV, R, false>(P.w[L], hl, kb, ke, 0, c0, last, tsb);
  rows_product<T, W, NV, R, false>(P.w[L], hl, d + kb, d + ke, 0, c0, last, tsb + B * BS);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* bl = P.bounds + l * (d + 1);
    const int64_t* bp = P.bounds + (l - 1) * (d + 1);
    const int64_t K0 = l == 0 ? kb : bp[kb];
    const int64_t ldw = l == 0 ? d : P.hidden[l - 1];
    const T* prev = l == 0 ? ws : ws + (d + P.offs[l - 1]) * BS;
    T* out = ws + (d + P.offs[l]) * BS;
    rows_product<T, W, NV, R, false>(P.w[l], ldw, bl[kb], bl[ke], 0, K0, prev, out + bl[kb] * BS);
  }
}

template <typename T, int W, int NV, int R>
FF_INLINE void walk_block(const Walk<T>& P, int64_t b0, int64_t nb, T* ws) {
  constexpr int BS = NV * W;
  constexpr int kMaxB = 32;
  const int64_t d = P.d, L = P.L;
  const int64_t B = P.lookahead;
  T* xs = ws;  // [d][BS]
  T ld[BS];
  for (int s = 0; s < BS; ++s) ld[s] = T(0);
  // B > 1: output sums of the lookahead block (B shift rows, then B raw-scale rows)
  alignas(64) T tsb[2 * kMaxB * BS];

  hidden_groups<T, W, NV, R>(P, 0, -1, b0, nb, ws);
  const T* wout = P.w[L];
  const T* bout = P.b[L];
  const int64_t hl = P.hidden[L - 1];
  const T* last = ws + (d + P.offs[L - 1]) * BS;
  const int64_t* bL = P.bounds + (L - 1) * (d + 1);
  int64_t kb = 0;
  for (int64_t k = 0; k < d; ++k) {
    const T *ts, *tr;
    if (B > 1) {
      if (k % B == 0) {
        kb = k;
        lookahead<T, W, NV, R>(P, kb, B, ws, tsb);
      }
      const int64_t j = k - kb, c0 = bL[kb];
      if (bL[k] > c0) {
        const T* rows[2] = {wout + k * hl + c0, wout + (d + k) * hl + c0};
        micro<T, W, NV, 2, ksplit<2, NV>(), true>(rows, bL[k] - c0, last + c0 * BS,
                                                   tsb + j * BS, B * BS);
      }
      ts = tsb + j * BS;
      tr = tsb + (B + j) * BS;
    } else {
      const T* rows[2] = {wout + k * hl, wout + (d + k) * hl};
      micro<T, W, NV, 2, ksplit<2, NV>(), false>(rows, bL[k], last, tsb, BS);
      ts = tsb;
      tr = tsb + BS;
    }
    const T bt = bout[k], br = bout[d + k];
    T us[BS];
    for (int s = 0; s < BS; ++s) us[s] = s < nb ? P.u[(b0 + s) * d + k] : T(0);
    T* xk = xs + k * BS;
    switch (P.mode) {
      case kSoftClamp:
        affine_step<T, kSoftClamp, BS>(ts, tr, us, bt, br, P.c, P.inv_c, xk, ld);
        break;
      case kGlowSigmoid:
        affine_step<T, kGlowSigmoid, BS>(ts, tr, us, bt, br, P.c, P.inv_c, xk, ld);
        break;
      case kIdentity:
        affine_step<T, kIdentity, BS>(ts, tr, us, bt, br, P.c, P.inv_c, xk, ld);
        break;
      default:
        affine_step<T, kAdditive, BS>(ts, tr, us, bt, br, P.c, P.inv_c, xk, ld);
        break;
    }
    if (k + 1 < d) hidden_groups<T, W, NV, R>(P, k + 1, B > 1 ? kb : -1, b0, nb, ws);
  }
  for (int64_t s = 0; s < nb; ++s) {
    for (int64_t k = 0; k < d; ++k) P.x[(b0 + s) * d + k] = xs[k * BS + s];
    P.logdet[b0 + s] = ld[s];
  }
}

// The spline walk (made_spline_inverse_cpu): the output of input k is its P = 3K - 1 raw spline
// parameters (widths K, heights K, interior derivatives K - 1), then x_k = spline^-1(u_k) per
// sample. No lookahead (hidden units group by degree as above; the P output rows per input are a
// product wide enough on their own).
template <typename T>
struct SplineWalk {
  const T* wout;  // [d][P][hidden[L-1]]
  const T* bout;  // [d][P]
  int bins;
  int64_t np;
  SplineConsts cs;
};

template <typename T, int W, int NV, int R>
FF_INLINE void spline_walk_block(const Walk<T>& P, const SplineWalk<T>& S, int64_t b0, int64_t nb,
                                 T* ws, T* theta) {
  using A = acc_t<T>;
  constexpr int BS = NV * W;
  const int64_t d = P.d, L = P.L, np = S.np;
  const int K = S.bins;
  T* xs = ws;  // [d][BS]
  A ld[BS];
  for (int s = 0; s < BS; ++s) ld[s] = A(0);
  A pw[kSplineMaxBins], ph[kSplineMaxBins];
  T rw[kSplineMaxBins], rh[kSplineMaxBins], rd[kSplineMaxBins];
  hidden_groups<T, W, NV, R>(P, 0, -1, b0, nb, ws);
  const int64_t hl = P.hidden[L - 1];
  const T* last = ws + (d + P.offs[L - 1]) * BS;
  const int64_t* bL = P.bounds + (L - 1) * (d + 1);
  for (int64_t k = 0; k < d; ++k) {
    rows_product<T, W, NV, R, false>(S.wout + k * np * hl, hl, 0, np, 0, bL[k], last, theta);
    const T* bk = S.bout + k * np;
    T* xk = xs + k * BS;
    for (int64_t s = 0; s < BS; ++s) {
      if (s >= nb) {
        xk[s] = T(0);
        continue;
      }
      for (int i = 0; i < K; ++i) {
        rw[i] = theta[i * BS + s] + bk[i];
        rh[i] = theta[(K + i) * BS + s] + bk[K + i];
      }
      for (int i = 0; i + 1 < K; ++i) rd[i] = theta[(2 * K + i) * BS + s] + bk[2 * K + i];
      A lad;
      const A v = A(P.u[(b0 + s) * d + k]);
      xk[s] = T(spline_elem<true, T, A>(v, rw, rh, rd, K, S.cs, true, pw, ph, lad));
      ld[s] += lad;
    }
    if (k + 1 < d) hidden_groups<T, W, NV, R>(P, k + 1, -1, b0, nb, ws);
  }
  for (int64_t s = 0; s < nb; ++s) {
    for (int64_t k = 0; k < d; ++k) P.x[(b0 + s) * d + k] = xs[k * BS + s];
    P.logdet[b0 + s] = T(ld[s]);
  }
}

// One block of samples with a variant's vector width: R * NV accumulator vectors (16 of the 32
// zmm registers on AVX-512, 8 of the 16 ymm on AVX2); BS = 128 bytes of samples in every variant.
template <int Isa>
struct MadeTuning {
  static constexpr int NV = Isa == kIsaAvx512 ? 2 : Isa == kIsaAvx2 ? 4 : 8;
  static constexpr int R = Isa == kIsaAvx512 ? 8 : Isa == kIsaAvx2 ? 2 : 1;
};

template <int Isa, typename T>
FF_INLINE void block_isa(const Walk<T>& P, int64_t b0, int64_t nb, T* ws) {
  constexpr int W = kIsaVectorBytes<Isa> / int(sizeof(T));
  walk_block<T, W, MadeTuning<Isa>::NV, MadeTuning<Isa>::R>(P, b0, nb, ws);
}
FF_CPU_VARIANTS(block, block_isa, (const Walk<T>& P, int64_t b0, int64_t nb, T* ws),
                (P, b0, nb, ws))

template <int Isa, typename T>
FF_INLINE void spline_block_isa(const Walk<T>& P, const SplineWalk<T>& S, int64_t b0, int64_t nb,
                                T* ws, T* theta) {
  constexpr int W = kIsaVectorBytes<Isa> / int(sizeof(T));
  spline_walk_block<T, W, MadeTuning<Isa>::NV, MadeTuning<Isa>::R>(P, S, b0, nb, ws, theta);
}
FF_CPU_VARIANTS(spline_block, spline_block_isa,
                (const Walk<T>& P, const SplineWalk<T>& S, int64_t b0, int64_t nb, T* ws,
                 T* theta),
                (P, S, b0, nb, ws, theta))

// ---------------------------------------------------------------------------------------------
// The driver (OpenMP over blocks) and the entry points.

template <typename T>
using BlockFn = void (*)(const Walk<T>&, int64_t, int64_t, T*);

// Degrees per lookahead block: 1 (none) when every degree has >= 32 units per layer, else enough
// degrees for about 64 units per layer and block (at most 32 degrees; measured on AVX-512). FASTFLOW_MADE_LOOKAHEAD overrides (for tests).
int64_t lookahead_for(int64_t d, const std::vector<int64_t>& hidden) {
  int64_t B = 1;
  if (const char* env = std::getenv("FASTFLOW_MADE_LOOKAHEAD")) {
    B = std::atoll(env);
  } else if (d > 1) {
    const int64_t hmin = *std::min_element(hidden.begin(), hidden.end());
    const double per_degree = double(hmin) / double(d - 1);
    if (per_degree < 32) B = int64_t(64.0 / std::max(per_degree, 2.0));
  }
  return std::max<int64_t>(1, std::min<int64_t>(32, B));
}

int64_t state_rows(int64_t d, const std::vector<int64_t>& hidden) {
  int64_t r = d;
  for (int64_t h : hidden) r += h;
  return r;
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
            b.data(),     bounds.data(), lookahead_for(d, hidden), ptr<T>(x), ptr<T>(logdet)};
  const BlockFn<T> fn = block_for<T>(cpu_isa_level());
  const int64_t rows = state_rows(d, hidden);
  const int64_t nblocks = (n + BS - 1) / BS;
  T* ws = ptr<T>(workspace);
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, nblocks)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = thread_id();
    T* mine = ws + int64_t(tid) * rows * BS;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t b0 = blk * BS;
      fn(P, b0, std::min<int64_t>(BS, n - b0), mine);
    }
  }
}

template <typename T>
void run_spline_walk(int act, int64_t n, int64_t d, const std::vector<int64_t>& hidden, int bins,
                     const SplineConsts& cs, std::uintptr_t u, std::uintptr_t init,
                     const std::vector<std::uintptr_t>& weights,
                     const std::vector<std::uintptr_t>& biases, std::uintptr_t out_weight,
                     std::uintptr_t out_bias, const std::vector<int64_t>& bounds, std::uintptr_t x,
                     std::uintptr_t logdet, std::uintptr_t workspace, int nthreads) {
  constexpr int BS = made_block_samples<T>();
  const int64_t L = int64_t(hidden.size());
  std::vector<int64_t> offs(L);
  int64_t o = 0;
  for (int64_t l = 0; l < L; ++l) {
    offs[l] = o;
    o += hidden[l];
  }
  std::vector<const T*> w(L + 1, nullptr), b(L + 1, nullptr);
  for (int64_t l = 0; l < L; ++l) {
    w[l] = ptr<const T>(weights[l]);
    b[l] = ptr<const T>(biases[l]);
  }
  Walk<T> P{act,       kIdentity,     T(1), T(1), n, d, L, hidden.data(), offs.data(),
            ptr<const T>(u), ptr<const T>(init), w.data(), b.data(), bounds.data(), 1, ptr<T>(x),
            ptr<T>(logdet)};
  const int64_t np = 3 * int64_t(bins) - 1;
  const SplineWalk<T> S{ptr<const T>(out_weight), ptr<const T>(out_bias), bins, np, cs};
  const auto fn = spline_block_for<T>(cpu_isa_level());
  const int64_t rows = state_rows(d, hidden) + np;  // the state, then theta [P][BS]
  const int64_t nblocks = (n + BS - 1) / BS;
  T* ws = ptr<T>(workspace);
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, nblocks)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    T* mine = ws + int64_t(thread_id()) * rows * BS;
    T* theta = mine + (rows - np) * BS;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t b0 = blk * BS;
      fn(P, S, b0, std::min<int64_t>(BS, n - b0), mine, theta);
    }
  }
}

}  // namespace made_cpu_detail

using namespace made_cpu_detail;

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
                             const std::vector<int64_t>& bounds, std::uintptr_t x,
                             std::uintptr_t logdet, std::uintptr_t workspace,
                             int64_t workspace_bytes, int nthreads) {
  const char* name = "made_affine_inverse_cpu";
  made_check_args(name, dtype, act, mode, clamp, n, d, hidden, u, init, weights, biases, bounds, x,
                  logdet);
  check_threads(name, nthreads);
  if (n == 0) return;
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

void made_spline_inverse_cpu(int dtype, int act, int64_t n, int64_t d,
                             const std::vector<int64_t>& hidden, int bins, double bound,
                             double min_bin_width, double min_bin_height, double min_derivative,
                             std::uintptr_t u, std::uintptr_t init,
                             const std::vector<std::uintptr_t>& weights,
                             const std::vector<std::uintptr_t>& biases, std::uintptr_t out_weight,
                             std::uintptr_t out_bias, const std::vector<int64_t>& bounds,
                             std::uintptr_t x, std::uintptr_t logdet, std::uintptr_t workspace,
                             int64_t workspace_bytes, int nthreads) {
  const char* name = "made_spline_inverse_cpu";
  const std::string nm(name);
  check(dtype == kFloat32 || dtype == kFloat64,
        nm + ": dtype must be float32 or float64 (cast 16-bit inputs first)");
  check(n >= 0, nm + ": negative batch size");
  check(d >= 1, nm + ": need at least one feature");
  check(!hidden.empty(), nm + ": need at least one hidden layer");
  for (int64_t h : hidden) check(h >= 1, nm + ": hidden sizes must be >= 1");
  check(act == kRelu || act == kTanh || act == kElu, nm + ": unknown activation code");
  check_spline_options_native(name, n, d, bins, bound, min_bin_width, min_bin_height,
                              min_derivative);
  check(bins >= 2, nm + ": bins must be >= 2");
  const int64_t L = int64_t(hidden.size());
  check(int64_t(weights.size()) == L && int64_t(biases.size()) == L,
        nm + ": need one weight and one bias per hidden layer");
  check(int64_t(bounds.size()) == L * (d + 1), nm + ": bounds must have L * (d + 1) entries");
  made_check_bounds(name, d, hidden, bounds.data());
  for (int64_t l = 0; l < L; ++l) {
    check_ptr(weights[l], hidden[l] * (l == 0 ? d : hidden[l - 1]), "weights");
    check_ptr(biases[l], hidden[l], "biases");
  }
  const int64_t np = 3 * int64_t(bins) - 1;
  check_ptr(out_weight, d * np * hidden[L - 1], "out_weight");
  check_ptr(out_bias, d * np, "out_bias");
  check_threads(name, nthreads);
  if (n == 0) return;
  check_ptr(u, n * d, "u");
  check_ptr(x, n * d, "x");
  check_ptr(logdet, n, "logdet");
  check_ptr(init, init ? n * hidden[0] : 0, "init");
  check_ptr(workspace, 1, "workspace");
  std::vector<int64_t> rows_h(hidden);
  rows_h.push_back(np);
  check(workspace_bytes >= made_workspace_bytes(dtype, d, rows_h, nthreads),
        nm + ": workspace too small (made_workspace_bytes with hidden + [3 bins - 1])");
  const SplineConsts cs = spline_consts(bins, bound, min_bin_width, min_bin_height, min_derivative);
  if (dtype == kFloat32)
    run_spline_walk<float>(act, n, d, hidden, bins, cs, u, init, weights, biases, out_weight,
                           out_bias, bounds, x, logdet, workspace, nthreads);
  else
    run_spline_walk<double>(act, n, d, hidden, bins, cs, u, init, weights, biases, out_weight,
                            out_bias, bounds, x, logdet, workspace, nthreads);
}

}  // namespace ff
