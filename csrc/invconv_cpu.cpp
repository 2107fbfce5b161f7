// CPU invertible 1x1 convolution kernels: LU assembly (once per step) and the per-pixel affine
// map with its parameter gradients. OpenMP over the batch; inner loops run over contiguous pixels.
#include <algorithm>
#include <string>
#include <type_traits>

#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "invconv.h"

namespace ff {
namespace {
// Output channels computed together: each load of x feeds kRows multiply-adds.
constexpr int kRows = 4;
// Pixels per tile: kRows accumulator rows of kTile values stay in L1.
constexpr int64_t kTile = 64;

// ---------------------------------------------------------------------------------------------
// Forward, image layout [N, C, P]: rows co0 .. co0+R-1 of y[n] = W x[n] + b.
// y[co, p] = b[co] + sum_ci W[co, ci] x[ci, p]: the ci loop is outside, the pixel loop inside, so
// the inner loop is a contiguous, vectorizable axpy into R accumulator rows.
template <typename T, int R>
FF_INLINE void affine_rows(const T* x, const T* w, const T* b, T* y, int64_t c, int64_t p,
                           int64_t co0, int64_t np) {
  // np <= p pixels starting at x, y (row stride p)
  using A = acc_t<T>;
  for (int64_t p0 = 0; p0 < np; p0 += kTile) {
    const int64_t len = std::min(kTile, np - p0);
    A acc[R][kTile];
    for (int r = 0; r < R; ++r) {
      const A bias = b ? A(load(b[co0 + r])) : A(0);
      for (int64_t v = 0; v < kTile; ++v) acc[r][v] = bias;
    }
    for (int64_t ci = 0; ci < c; ++ci) {
      const T* xr = x + ci * p + p0;
      A wk[R];
      for (int r = 0; r < R; ++r) wk[r] = load(w[(co0 + r) * c + ci]);
#pragma omp simd
      for (int64_t v = 0; v < len; ++v) {
        const A xv = load(xr[v]);
        for (int r = 0; r < R; ++r) acc[r][v] += wk[r] * xv;
      }
    }
    for (int r = 0; r < R; ++r) {
      T* yr = y + (co0 + r) * p + p0;
#pragma omp simd
      for (int64_t v = 0; v < len; ++v) yr[v] = store<T>(acc[r][v]);
    }
  }
}

// Register-blocked version for fp32/fp64 (GCC vector extensions): R output rows by K vectors of
// VB bytes of pixels stay in registers for the whole ci loop; each x vector loaded feeds R
// multiply-adds. Rows [co0, co0 + R) must exist; pixels past the last full tile go to affine_rows.
template <typename T, int VB, int R, int K>
FF_INLINE void affine_block_vec(const T* x, const T* w, const T* b, T* y, int64_t c, int64_t p,
                                int64_t co0) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int64_t L = VB / sizeof(T);
  constexpr int64_t TP = L * K;
  int64_t p0 = 0;
  for (; p0 + TP <= p; p0 += TP) {
    V acc[R][K];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T bias = b ? b[co0 + r] : T(0);
#pragma GCC unroll 16
      for (int k = 0; k < K; ++k) acc[r][k] = vsplat<V>(bias);
    }
    for (int64_t ci = 0; ci < c; ++ci) {
      const T* xr = x + ci * p + p0;
      V xv[K];
#pragma GCC unroll 16
      for (int k = 0; k < K; ++k) memcpy(&xv[k], xr + k * L, VB);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const V wr = vsplat<V>(w[(co0 + r) * c + ci]);
#pragma GCC unroll 16
        for (int k = 0; k < K; ++k) acc[r][k] += wr * xv[k];
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      T* yr = y + (co0 + r) * p + p0;
#pragma GCC unroll 16
      for (int k = 0; k < K; ++k) memcpy(yr + k * L, &acc[r][k], VB);
    }
  }
  if (p0 < p) affine_rows<T, R>(x + p0, w, b, y + p0, c, p, co0, p - p0);
}

template <typename T, int VB, int R, int K>
FF_INLINE void affine_item_vec(const T* x, const T* w, const T* b, T* y, int64_t c, int64_t p,
                               int64_t co0) {
  // items are kRows * 2 = 8 rows wide; R divides 8
  const int64_t end = std::min<int64_t>(c, co0 + 2 * kRows);
  int64_t co = co0;
  for (; co + R <= end; co += R) affine_block_vec<T, VB, R, K>(x, w, b, y, c, p, co);
  for (; co < end; ++co) affine_rows<T, 1>(x, w, b, y, c, p, co, p);
}

template <typename T>
FF_INLINE void affine_item_generic(const T* x, const T* w, const T* b, T* y, int64_t c, int64_t p,
                                   int64_t co0) {
  switch (std::min<int64_t>(kRows, c - co0)) {
    case 4:
      affine_rows<T, 4>(x, w, b, y, c, p, co0, p);
      break;
    case 3:
      affine_rows<T, 3>(x, w, b, y, c, p, co0, p);
      break;
    case 2:
      affine_rows<T, 2>(x, w, b, y, c, p, co0, p);
      break;
    default:
      affine_rows<T, 1>(x, w, b, y, c, p, co0, p);
  }
}

// Items are 2 * kRows output rows of one sample. VB = 0: portable loops (any dtype); otherwise
// register-blocked R rows x K vectors of VB bytes (fp32/fp64 only).
template <typename T, int VB, int R, int K>
FF_INLINE void affine_item_body(const T* x, const T* w, const T* b, T* y, int64_t c, int64_t p,
                                int64_t co0) {
  if constexpr (VB > 0 && (std::is_same_v<T, float> || std::is_same_v<T, double>)) {
    affine_item_vec<T, VB, R, K>(x, w, b, y, c, p, co0);
  } else {
    for (int64_t co = co0; co < std::min<int64_t>(c, co0 + 2 * kRows); co += kRows)
      affine_item_generic<T>(x, w, b, y, c, p, co);
  }
}

// Backward for W and b, image layout: acc_w[co, ci] += sum_p g[co, p] x[ci, p] for one sample,
// two output rows by four input rows at a time (six loads feed eight multiply-adds).
template <typename T>
FF_INLINE void grad_params_body(const T* x, const T* g, int64_t c, int64_t p,
                                acc_t<T>* acc_w, acc_t<T>* acc_b) {
  using A = acc_t<T>;
  int64_t co = 0;
  for (; co + 2 <= c; co += 2) {
    const T* g0 = g + co * p;
    const T* g1 = g0 + p;
    A sb0 = 0, sb1 = 0;
#pragma omp simd reduction(+ : sb0, sb1)
    for (int64_t v = 0; v < p; ++v) {
      sb0 += load(g0[v]);
      sb1 += load(g1[v]);
    }
    acc_b[co] += sb0;
    acc_b[co + 1] += sb1;
    int64_t ci = 0;
    for (; ci + 4 <= c; ci += 4) {
      const T* x0 = x + ci * p;
      const T* x1 = x0 + p;
      const T* x2 = x1 + p;
      const T* x3 = x2 + p;
      A s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
      for (int64_t v = 0; v < p; ++v) {
        const A a0 = load(g0[v]), a1 = load(g1[v]);
        const A b0 = load(x0[v]), b1 = load(x1[v]), b2 = load(x2[v]), b3 = load(x3[v]);
        s00 += a0 * b0;
        s01 += a0 * b1;
        s02 += a0 * b2;
        s03 += a0 * b3;
        s10 += a1 * b0;
        s11 += a1 * b1;
        s12 += a1 * b2;
        s13 += a1 * b3;
      }
      A* r0 = acc_w + co * c + ci;
      A* r1 = r0 + c;
      r0[0] += s00;
      r0[1] += s01;
      r0[2] += s02;
      r0[3] += s03;
      r1[0] += s10;
      r1[1] += s11;
      r1[2] += s12;
      r1[3] += s13;
    }
    for (; ci < c; ++ci) {
      const T* x0 = x + ci * p;
      A s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0, s1)
      for (int64_t v = 0; v < p; ++v) {
        const A b0 = load(x0[v]);
        s0 += load(g0[v]) * b0;
        s1 += load(g1[v]) * b0;
      }
      acc_w[co * c + ci] += s0;
      acc_w[(co + 1) * c + ci] += s1;
    }
  }
  for (; co < c; ++co) {
    const T* g0 = g + co * p;
    A sb = 0;
#pragma omp simd reduction(+ : sb)
    for (int64_t v = 0; v < p; ++v) sb += load(g0[v]);
    acc_b[co] += sb;
    for (int64_t ci = 0; ci < c; ++ci) {
      const T* x0 = x + ci * p;
      A s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t v = 0; v < p; ++v) s += load(g0[v]) * load(x0[v]);
      acc_w[co * c + ci] += s;
    }
  }
}

// Register-blocked W gradient for fp32/fp64: RO x RC vector accumulators (VB bytes each) over the
// pixels, summed horizontally at the end; RO + RC loads feed RO * RC multiply-adds. Rows and
// columns past the last full block go through the simple dot products below.
template <typename T>
FF_INLINE void grad_params_range(const T* x, const T* g, int64_t c, int64_t p, int64_t co_lo,
                                 int64_t co_hi, int64_t ci_lo, int64_t ci_hi, acc_t<T>* acc_w) {
  using A = acc_t<T>;
  for (int64_t co = co_lo; co < co_hi; ++co)
    for (int64_t ci = ci_lo; ci < ci_hi; ++ci) {
      const T* g0 = g + co * p;
      const T* x0 = x + ci * p;
      A s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t v = 0; v < p; ++v) s += A(load(g0[v])) * A(load(x0[v]));
      acc_w[co * c + ci] += s;
    }
}

// Samples per block of the vector W gradient: the block's x and g rows stay in L2 (~32K elements
// each) while every RO x RC tile of the gradient passes over them.
constexpr int64_t kGradParamsBlockElems = 32768;

// The W and b gradients of ns consecutive samples (each [C, P], sample stride C * P).
// fp32/fp64: RO x RC vector accumulators (VB bytes each) run over the pixels of every sample of a
// block and are summed horizontally once per block (per sample, a 4x4 image's 16 pixels would
// pay one horizontal sum per gradient entry per sample: 8x slower than torch.bmm at C=48, P=16);
// RO + RC loads feed RO * RC multiply-adds. Rows and columns past the last full tile, and pixels
// past the last full vector, go through plain dot products.
template <typename T, int VB, int RO, int RC>
FF_INLINE void grad_params_vec(const T* x, const T* g, int64_t ns, int64_t c, int64_t p,
                               T* acc_w, T* acc_b) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int64_t L = VB / sizeof(T);
  const int64_t pv = p - p % L, sp = c * p;
  const int64_t co_full = c - c % RO, ci_full = c - c % RC;
  const int64_t blk = std::max<int64_t>(1, kGradParamsBlockElems / std::max<int64_t>(sp, 1));
  for (int64_t s0 = 0; s0 < ns; s0 += blk) {
    const int64_t s1 = std::min(ns, s0 + blk);
    for (int64_t co0 = 0; co0 < co_full; co0 += RO)
      for (int64_t ci0 = 0; ci0 < ci_full; ci0 += RC) {
        V acc[RO][RC];
        T tail[RO][RC];
#pragma GCC unroll 16
        for (int r = 0; r < RO; ++r)
#pragma GCC unroll 16
          for (int q = 0; q < RC; ++q) acc[r][q] = V{}, tail[r][q] = T(0);
        for (int64_t sm = s0; sm < s1; ++sm) {
          const T* gs = g + sm * sp;
          const T* xs = x + sm * sp;
          for (int64_t v = 0; v < pv; v += L) {
            V gv[RO], xv[RC];
#pragma GCC unroll 16
            for (int r = 0; r < RO; ++r) memcpy(&gv[r], gs + (co0 + r) * p + v, VB);
#pragma GCC unroll 16
            for (int q = 0; q < RC; ++q) memcpy(&xv[q], xs + (ci0 + q) * p + v, VB);
#pragma GCC unroll 16
            for (int r = 0; r < RO; ++r)
#pragma GCC unroll 16
              for (int q = 0; q < RC; ++q) acc[r][q] += gv[r] * xv[q];
          }
          for (int64_t v = pv; v < p; ++v)
            for (int r = 0; r < RO; ++r)
              for (int q = 0; q < RC; ++q)
                tail[r][q] += gs[(co0 + r) * p + v] * xs[(ci0 + q) * p + v];
        }
        for (int r = 0; r < RO; ++r)
          for (int q = 0; q < RC; ++q) {
            T sum = tail[r][q];
            for (int e = 0; e < L; ++e) sum += acc[r][q][e];
            acc_w[(co0 + r) * c + ci0 + q] += sum;
          }
      }
    for (int64_t sm = s0; sm < s1; ++sm) {
      const T* gs = g + sm * sp;
      const T* xs = x + sm * sp;
      if (ci_full < c) grad_params_range<T>(xs, gs, c, p, 0, c, ci_full, c, acc_w);
      if (co_full < c) grad_params_range<T>(xs, gs, c, p, co_full, c, 0, ci_full, acc_w);
      for (int64_t co = 0; co < c; ++co) {
        const T* g0 = gs + co * p;
        T sb = 0;
#pragma omp simd reduction(+ : sb)
        for (int64_t v = 0; v < p; ++v) sb += g0[v];
        acc_b[co] += sb;
      }
    }
  }
}

template <typename T, int VB, int RO, int RC>
FF_INLINE void grad_params_dispatch(const T* x, const T* g, int64_t ns, int64_t c, int64_t p,
                                    acc_t<T>* acc_w, acc_t<T>* acc_b) {
  if constexpr (VB > 0 && (std::is_same_v<T, float> || std::is_same_v<T, double>)) {
    grad_params_vec<T, VB, RO, RC>(x, g, ns, c, p, acc_w, acc_b);
  } else {
    for (int64_t sm = 0; sm < ns; ++sm)
      grad_params_body<T>(x + sm * c * p, g + sm * c * p, c, p, acc_w, acc_b);
  }
}

// Row layout [N, C] (P = 1): y[n, co] = b[co] + sum_ci W[co, ci] x[n, ci], a dot product over
// contiguous channels; and the outer-product update of the W gradient for one row.
template <typename T>
FF_INLINE void affine_row_body(const T* x, const T* w, const T* b, T* y, int64_t c) {
  using A = acc_t<T>;
  for (int64_t co = 0; co < c; ++co) {
    const T* wr = w + co * c;
    A s = b ? A(load(b[co])) : A(0);
#pragma omp simd reduction(+ : s)
    for (int64_t ci = 0; ci < c; ++ci) s += A(load(wr[ci])) * A(load(x[ci]));
    y[co] = store<T>(s);
  }
}

template <typename T>
FF_INLINE void grad_params_row_body(const T* x, const T* g, int64_t c, acc_t<T>* acc_w,
                                    acc_t<T>* acc_b) {
  using A = acc_t<T>;
  for (int64_t co = 0; co < c; ++co) {
    const A gv = load(g[co]);
    acc_b[co] += gv;
    A* r = acc_w + co * c;
#pragma omp simd
    for (int64_t ci = 0; ci < c; ++ci) r[ci] += gv * A(load(x[ci]));
  }
}

// ---------------------------------------------------------------------------------------------
// The bodies built once per ISA variant (cpu_isa.h). Blocking per variant: VB bytes per vector
// (0: the portable loops, any dtype), affine: R rows x K vectors of accumulators, W gradient: RO x
// RC vectors.
template <int Isa>
struct InvconvTuning {  // baseline
  static constexpr int VB = 0, R = 1, K = 1, RO = 1, RC = 1;
};
template <>
struct InvconvTuning<kIsaAvx2> {  // affine: 8 of 16 ymm accumulate; W gradient: 8 + 6 of 16
  static constexpr int VB = 32, R = 4, K = 2, RO = 2, RC = 4;
};
template <>
struct InvconvTuning<kIsaAvx512> {  // affine: 16 of 32 zmm accumulate; W gradient: 16 + 8 of 32
  static constexpr int VB = 64, R = 8, K = 2, RO = 4, RC = 4;
};

template <int Isa, typename T>
FF_INLINE void affine_item_isa(const T* x, const T* w, const T* b, T* y, int64_t c, int64_t p,
                               int64_t co0) {
  using Tn = InvconvTuning<Isa>;
  affine_item_body<T, Tn::VB, Tn::R, Tn::K>(x, w, b, y, c, p, co0);
}
template <int Isa, typename T>
FF_INLINE void grad_params_isa(const T* x, const T* g, int64_t ns, int64_t c, int64_t p,
                               acc_t<T>* aw, acc_t<T>* ab) {
  using Tn = InvconvTuning<Isa>;
  grad_params_dispatch<T, Tn::VB, Tn::RO, Tn::RC>(x, g, ns, c, p, aw, ab);
}
template <int Isa, typename T>
FF_INLINE void affine_row_isa(const T* x, const T* w, const T* b, T* y, int64_t c) {
  affine_row_body<T>(x, w, b, y, c);
}
template <int Isa, typename T>
FF_INLINE void grad_params_row_isa(const T* x, const T* g, int64_t c, acc_t<T>* aw,
                                   acc_t<T>* ab) {
  grad_params_row_body<T>(x, g, c, aw, ab);
}

FF_CPU_VARIANTS(affine_item, affine_item_isa,
                (const T* x, const T* w, const T* b, T* y, int64_t c, int64_t p, int64_t co0),
                (x, w, b, y, c, p, co0))
FF_CPU_VARIANTS(grad_params, grad_params_isa,
                (const T* x, const T* g, int64_t ns, int64_t c, int64_t p, acc_t<T>* aw,
                 acc_t<T>* ab),
                (x, g, ns, c, p, aw, ab))
FF_CPU_VARIANTS(affine_row, affine_row_isa,
                (const T* x, const T* w, const T* b, T* y, int64_t c), (x, w, b, y, c))
FF_CPU_VARIANTS(grad_params_row, grad_params_row_isa,
                (const T* x, const T* g, int64_t c, acc_t<T>* aw, acc_t<T>* ab),
                (x, g, c, aw, ab))

template <typename T>
void channel_affine_kernel(int64_t n, int64_t c, int64_t p, const T* x, const T* w, const T* b,
                           T* y, int nthreads) {
  const bool par = n * c * p * c > kParallelGrain;
  const int isa = cpu_isa_level();
  if (p == 1) {
    auto fn = affine_row_for<T>(isa);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (par)
    for (int64_t i = 0; i < n; ++i) fn(x + i * c, w, b, y + i * c, c);
    return;
  }
  auto fn = affine_item_for<T>(isa);
  const int64_t nb = (c + 2 * kRows - 1) / (2 * kRows);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (par)
  for (int64_t item = 0; item < n * nb; ++item) {
    const int64_t i = item / nb;
    const int64_t co0 = (item % nb) * 2 * kRows;
    fn(x + i * c * p, w, b, y + i * c * p, c, p, co0);
  }
}

template <typename T>
void grad_params_kernel(int64_t n, int64_t c, int64_t p, const T* x, const T* g, T* gw, T* gb,
                        acc_t<T>* ws, int nthreads) {
  using A = acc_t<T>;
  const int64_t stride = c * c + c;  // one [C*C] W accumulator then one [C] b accumulator
  const bool par = n * c * p * c > kParallelGrain;
  const int nt = par ? nthreads : 1;
  std::fill(ws, ws + stride * nthreads, A(0));
  const int isa = cpu_isa_level();
  auto fn_img = grad_params_for<T>(isa);
  auto fn_row = grad_params_row_for<T>(isa);
  parallel_ranges(n, nt, [&](int64_t lo, int64_t hi) {
    A* aw = ws + thread_id() * stride;
    A* ab = aw + c * c;
    if (p == 1) {
      for (int64_t i = lo; i < hi; ++i) fn_row(x + i * c, g + i * c, c, aw, ab);
    } else {
      // a contiguous range of samples per thread, in one call (horizontal sums once per block)
      fn_img(x + lo * c * p, g + lo * c * p, hi - lo, c, p, aw, ab);
    }
  });
  // Fixed-order sum over the per-thread accumulators: deterministic for a given thread count.
  for (int64_t k = 0; k < stride; ++k) {
    A s = ws[k];
    for (int t = 1; t < nt; ++t) s += ws[t * stride + k];
    if (k < c * c) {
      if (gw) gw[k] = store<T>(s);
    } else if (gb) {
      gb[k - c * c] = store<T>(s);
    }
  }
}

template <typename T>
void lu_weight_kernel(int64_t c, const T* pm, const T* l, const T* u, const T* log_s,
                      const T* sign_s, T* w, T* w_inv, acc_t<T>* logdet, acc_t<T>* ws) {
  // Same formulas as the CUDA kernel (and invconv.h's column helpers), organised as row axpys
  // over contiguous memory so that the O(C^3) loops vectorize.
  using A = acc_t<T>;
  A* prod = ws;              // L U~, later U~^-1 L^-1
  A* linv = ws + c * c;      // U~ first, then L^-1
  A* uinv = ws + 2 * c * c;  // U~^-1
  A* uf = linv;
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = 0; j < c; ++j) uf[i * c + j] = lu_upper<T, A>(u, log_s, sign_s, c, i, j);
  // prod[i, :] = U~[i, :] + sum_{k < i} L[i, k] U~[k, :]   (U~[k, j] = 0 for j < k)
  for (int64_t i = 0; i < c; ++i) {
    A* row = prod + i * c;
    for (int64_t j = 0; j < c; ++j) row[j] = uf[i * c + j];
    for (int64_t k = 0; k < i; ++k) {
      const A lk = load(l[i * c + k]);
      const A* ur = uf + k * c;
#pragma omp simd
      for (int64_t j = k; j < c; ++j) row[j] += lk * ur[j];
    }
  }
  // U~^-1 by rows, bottom up: uinv[i, :] = (e_i - sum_{k > i} U[i, k] uinv[k, :]) / d_i
  for (int64_t i = c - 1; i >= 0; --i) {
    A* row = uinv + i * c;
    for (int64_t j = 0; j < c; ++j) row[j] = j == i ? A(1) : A(0);
    for (int64_t k = i + 1; k < c; ++k) {
      const A uk = uf[i * c + k];
      const A* r = uinv + k * c;
#pragma omp simd
      for (int64_t j = k; j < c; ++j) row[j] -= uk * r[j];
    }
    const A inv_d = A(1) / uf[i * c + i];
#pragma omp simd
    for (int64_t j = i; j < c; ++j) row[j] *= inv_d;
  }
  // L^-1 by rows, top down: linv[i, :] = e_i - sum_{k < i} L[i, k] linv[k, :] (overwrites U~)
  for (int64_t i = 0; i < c; ++i) {
    A* row = linv + i * c;
    for (int64_t j = 0; j < c; ++j) row[j] = j == i ? A(1) : A(0);
    for (int64_t k = 0; k < i; ++k) {
      const A lk = load(l[i * c + k]);
      const A* r = linv + k * c;
#pragma omp simd
      for (int64_t j = 0; j <= k; ++j) row[j] -= lk * r[j];
    }
  }
  // W = P prod, using only P's nonzero entries (a permutation gathers rows; exact for any P)
  for (int64_t i = 0; i < c; ++i) {
    T* wr = w + i * c;
    int64_t nnz = 0, only = 0;
    for (int64_t k = 0; k < c; ++k)
      if (A(load(pm[i * c + k])) != A(0)) {
        ++nnz;
        only = k;
      }
    if (nnz == 1 && A(load(pm[i * c + only])) == A(1)) {
      for (int64_t j = 0; j < c; ++j) wr[j] = store<T>(prod[only * c + j]);
    } else {
      for (int64_t j = 0; j < c; ++j) {
        A sum = 0;
        for (int64_t k = 0; k < c; ++k) sum += A(load(pm[i * c + k])) * prod[k * c + j];
        wr[j] = store<T>(sum);
      }
    }
  }
  // M = U~^-1 L^-1 into prod: M[i, :] = sum_{k >= i} uinv[i, k] linv[k, 0..k]
  for (int64_t i = 0; i < c; ++i) {
    A* row = prod + i * c;
    for (int64_t j = 0; j < c; ++j) row[j] = A(0);
    for (int64_t k = i; k < c; ++k) {
      const A uk = uinv[i * c + k];
      const A* r = linv + k * c;
#pragma omp simd
      for (int64_t j = 0; j <= k; ++j) row[j] += uk * r[j];
    }
  }
  // W^-1 = M P^T: column j of W^-1 is M P[j, :]^T (a permutation scatters columns)
  for (int64_t j = 0; j < c; ++j) {
    int64_t nnz = 0, only = 0;
    for (int64_t k = 0; k < c; ++k)
      if (A(load(pm[j * c + k])) != A(0)) {
        ++nnz;
        only = k;
      }
    const bool gather = nnz == 1 && A(load(pm[j * c + only])) == A(1);
    for (int64_t i = 0; i < c; ++i) {
      A sum = 0;
      if (gather) {
        sum = prod[i * c + only];
      } else {
        for (int64_t k = 0; k < c; ++k) sum += prod[i * c + k] * A(load(pm[j * c + k]));
      }
      w_inv[i * c + j] = store<T>(sum);
    }
  }
  A ld = 0;
  for (int64_t i = 0; i < c; ++i) ld += A(load(log_s[i]));
  *logdet = ld;
}

}  // namespace

std::string invconv_cpu_isa() { return cpu_isa_name(cpu_isa_level()); }

int64_t lu_weight_workspace_bytes(int dtype, int64_t c) {
  check(c >= 0, "lu_weight_workspace_bytes: negative size");
  return 3 * c * c * acc_bytes(dtype);
}

int64_t channel_affine_grad_workspace_bytes_cpu(int dtype, int64_t c, int nthreads) {
  check(c >= 0 && nthreads >= 1, "channel_affine_grad_workspace_bytes_cpu: bad sizes");
  return int64_t(nthreads) * (c * c + c) * acc_bytes(dtype);
}

void lu_weight_cpu(int dtype, int64_t c, std::uintptr_t p, std::uintptr_t l, std::uintptr_t u,
                   std::uintptr_t log_s, std::uintptr_t sign_s, std::uintptr_t w,
                   std::uintptr_t w_inv, std::uintptr_t logdet, std::uintptr_t workspace) {
  const char* name = "lu_weight_cpu";
  check_lu_weight_args(name, c, p, l, u, log_s, sign_s, w, w_inv, logdet, workspace);
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    using A = acc_t<scalar_t>;
    lu_weight_kernel<scalar_t>(c, ptr<const scalar_t>(p), ptr<const scalar_t>(l),
                               ptr<const scalar_t>(u), ptr<const scalar_t>(log_s),
                               ptr<const scalar_t>(sign_s), ptr<scalar_t>(w),
                               ptr<scalar_t>(w_inv), ptr<A>(logdet), ptr<A>(workspace));
  });
}

void channel_affine_cpu(int dtype, int64_t n, int64_t c, int64_t p, std::uintptr_t x,
                        std::uintptr_t w, std::uintptr_t b, std::uintptr_t y, int nthreads) {
  const char* name = "channel_affine_cpu";
  check_channel_affine_args(name, n, c, p, x, y, "y");
  check_ptr(w, c * c, "W");
  check_threads(name, nthreads);
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    channel_affine_kernel<scalar_t>(n, c, p, ptr<const scalar_t>(x), ptr<const scalar_t>(w),
                                    ptr<const scalar_t>(b), ptr<scalar_t>(y), nthreads);
  });
}

void channel_affine_grad_params_cpu(int dtype, int64_t n, int64_t c, int64_t p, std::uintptr_t x,
                                    std::uintptr_t grad_y, std::uintptr_t grad_w,
                                    std::uintptr_t grad_b, std::uintptr_t workspace,
                                    int64_t workspace_bytes, int nthreads) {
  const char* name = "channel_affine_grad_params_cpu";
  check_channel_affine_args(name, n, c, p, x, grad_y, "grad_y");
  check_threads(name, nthreads);
  check_workspace_bytes(name, workspace, workspace_bytes,
                        channel_affine_grad_workspace_bytes_cpu(dtype, c, nthreads));
  FF_DISPATCH_FLOAT(dtype, name, [&] {
    grad_params_kernel<scalar_t>(n, c, p, ptr<const scalar_t>(x), ptr<const scalar_t>(grad_y),
                                 ptr<scalar_t>(grad_w), ptr<scalar_t>(grad_b),
                                 ptr<acc_t<scalar_t>>(workspace), nthreads);
  });
}

}  // namespace ff
