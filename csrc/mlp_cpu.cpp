// CPU MLP coupling layer (mlp.h): the whole layer in one call each way, OpenMP over blocks of
// kBlock samples.
//
// Activations live sample-major, each row zero-padded to 64 bytes: in acts when the forward keeps
// them (computed there in place; the backward reads them there), else in the per-thread
// workspace, like the block's input and gradients. Every matrix product is one of two
// register-blocked micro-kernels, written once with GCC/Clang vector extensions and built once per
// ISA variant (cpu_isa.h: AVX-512, AVX2+FMA, baseline SSE2) like made_cpu.cpp:
//   lanes: C[r][v] (+)= sum_p A(r, p) * B[p][v], v a run of vector lanes: R rows x NV vectors of
//          accumulators, per p one broadcast of A per row and NV vector loads of B;
//   dots:  C[r][c] = sum_p A[r][p] * Bt[c][p] along the lanes, summed across them at the end: for
//          layers with fewer outputs than a vector has lanes (a 2-D flow's last layer).
//   forward      H_{l+1}[s][:] = relu(H_l[s][:] @ W_l^T + b_l)   lanes over outputs (B = W_l^T
//                                                                  padded) or dots (Bt = W_l)
//   grad input   G_l[s][:] = (G_{l+1}[s][:] @ W_l) * (H_l > 0)   lanes over inputs (B = W_l) or,
//                                                                  for the MLP input, dots
//   grad weight  dW_l[j][:] += sum_s G_{l+1}[s][j] H_l[s][:]     lanes over inputs, p = sample
//                (or dW_l^T[k][:] += sum_s H_l[s][k] G_{l+1}[s][:] when the inputs are few)
// The weights are copied once per call into the layout each product reads, zero-padded. Weight
// gradients are summed per group of blocks (a partition that depends on n only) into the group's
// buffer in the workspace, then over the groups in order: no atomics, and the same bits for any
// thread count. Which kernel a layer uses depends on the ISA (vector width), not on the threads.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "coupling.h"
#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "mlp.h"

namespace ff {
namespace mlp_cpu_detail {

// Samples per block: a multiple of every variant's row count R (6, 6, 4).
constexpr int kBlock = 48;
// Weight-gradient groups at most (each holds a copy of the padded gradient).
constexpr int64_t kMaxGroups = 16;
// acts has n rounded up to a multiple of this many rows: the kernels compute whole row blocks of
// R (6, 6 or 4) rows, written in place.
constexpr int64_t kRowQuantum = kMlpRowQuantum;

enum Init : int { kInitZero = 0, kInitBias = 1, kInitLoad = 2 };
enum Epi : int { kEpiNone = 0, kEpiRelu = 1, kEpiMask = 2 };

template <typename T>
struct Plan {
  int mode;
  T c, inv_c;
  int64_t n, d, da, db, nc, a_off, b_off, L;
  // made: the MADE density layer (every column conditions and is transformed; the MLP output is
  // (shift, raw)); raw_off / shift_off: their columns in the MLP output
  bool made;
  int64_t raw_off, shift_off;
  const int64_t* s;  // sizes [L + 1]
  const int64_t* P;  // sizes padded to 64 bytes [L + 1]
  // per-layer weights, copied into the layout this direction's product reads (see pack), and the
  // forward's biases [P_{l+1}]
  const T* w;
  const int64_t* woff;
  const int64_t* boff;
  const uint8_t* dot;    // [L] forward: layer l by dots; backward: the input gradient (l = 0)
  const uint8_t* gtr;    // [L] backward: dW_l^T [s_l][P_{l+1}] instead of dW_l [s_{l+1}][P_l]
  const int64_t* hoff;   // [L + 1] per-thread H_i [kBlock][P_i]
  const int64_t* goff;   // [L + 1] per-thread G_i [kBlock][P_i]
  const int64_t* gwoff;  // [L] group dW_l (or dW_l^T)
  const int64_t* gboff;  // [L] group db_l [P_{l+1}]
  int64_t acts_w;        // elements per acts row
  const int64_t* aoff;   // [L + 1] offset of layer i's outputs in an acts row (i >= 1)
  // r1: the first hidden layer is not kept in acts: the backward recomputes it from the input
  // (Geometry::r1) with the forward's product (dotf0: by dots), weights at wf0, bias at bf0
  bool r1, dotf0;
  int64_t wf0, bf0;
  const T* in;           // x (forward, backward) or y (inverse)
  const T* ctx;
  T* out;  // y (forward) or x (inverse)
  T* logdet;
  T* acts;
  const T* gy;
  const T* gl;
  T* gx;
  T* gctx;
};


// ---------------------------------------------------------------------------------------------
// The block functions, built once per ISA variant (cpu_isa.h): every function below is
// always-inline into forward_block_*, backward_block_* and sum_groups_*.


template <typename V, typename T>
FF_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
FF_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Short copies inline (a memcpy call per row of a few values costs more than the copy).
template <typename T>
FF_INLINE void copy_n(T* dst, const T* src, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] = src[k];
}

// A column of a row-major block to a contiguous run and back: dst[s] = src[s * stride] and
// dst[s * stride] = src[s], s < n. Restrict-qualified and vectorized (gathers / scatters where the
// ISA has them): written inline in the block functions, the loops kept their pointers and the
// loop counter on the stack (~10% of a D=16 coupling's forward).
template <typename T>
FF_INLINE void gather_col(int64_t n, const T* __restrict src, int64_t stride, T* __restrict dst) {
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) dst[s] = src[s * stride];
}

template <typename T>
FF_INLINE void scatter_col(int64_t n, const T* __restrict src, T* __restrict dst, int64_t stride) {
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) dst[s * stride] = src[s];
}

// Zero row[from rounded down to a whole vector, p) with whole-vector stores (p, every padded row
// length, is a multiple of W: rows are padded to 64 bytes, no variant's vector is wider): the
// caller writes [0, from) afterwards. One or two vector stores where a zeroing loop became a
// memset call per row (~8% of a 2-D coupling's forward).
template <typename T, int W>
FF_INLINE void zero_vectors(T* row, int64_t from, int64_t p) {
  static_assert(kMlpRowAlignBytes % (W * sizeof(T)) == 0, "rows are whole vectors");
  typedef T V __attribute__((vector_size(W * sizeof(T))));
  for (int64_t k = from / W * W; k < p; k += W) vstore(row + k, V{});
}

// ---------------------------------------------------------------------------------------------
// Lanes: C[r * ldc + v * W + :W] = epi(init + sum_{p < K} A(r, p) * B[p * ldb + v * W + :W]) for
// RR rows and NVV vectors; A(r, p) = a[r * lda + p], or a[p * lda + r] with AT. Init: zero, the
// bias vector, or what C holds; epilogue: none, relu, or zero where the mask m[r * ldm + ...] is
// <= 0.
template <typename T, int W, int RR, int NVV, int In, int Ep, bool AT>
FF_INLINE void micro(int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                         int64_t ldc, const T* bias, const T* m, int64_t ldm) {
  typedef T V __attribute__((vector_size(W * sizeof(T))));
  V acc[RR][NVV];
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NVV; ++v) {
      if (In == kInitZero)
        acc[r][v] = V{};
      else if (In == kInitBias)
        acc[r][v] = vload<V>(bias + v * W);
      else
        acc[r][v] = vload<V>(c + r * ldc + v * W);
    }
  const T* ar[RR];
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r) ar[r] = AT ? a + r : a + r * lda;
  const int64_t ap = AT ? lda : 1;
#pragma GCC unroll 2
  for (int64_t p = 0; p < K; ++p) {
    V bv[NVV];
#pragma GCC unroll 8
    for (int v = 0; v < NVV; ++v) bv[v] = vload<V>(b + p * ldb + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      const V av = vsplat<V>(ar[r][p * ap]);
#pragma GCC unroll 8
      for (int v = 0; v < NVV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NVV; ++v) {
      V o = acc[r][v];
      if (Ep == kEpiRelu) {
        o = o < V{} ? V{} : o;  // relu(NaN) = NaN, as torch
      } else if (Ep == kEpiMask) {
        const V mv = vload<V>(m + r * ldm + v * W);
        o = mv <= V{} ? V{} : o;  // threshold_backward(g, h, 0)
      }
      vstore(c + r * ldc + v * W, o);
    }
}

template <typename T, int W, int RR, int NVV, int In, int Ep, bool AT>
FF_INLINE void rows_tail(int64_t rem, int64_t K, const T* a, int64_t lda, const T* b,
                             int64_t ldb, T* c, int64_t ldc, const T* bias, const T* m,
                             int64_t ldm) {
  if constexpr (RR >= 1) {
    if (rem == RR)
      micro<T, W, RR, NVV, In, Ep, AT>(K, a, lda, b, ldb, c, ldc, bias, m, ldm);
    else
      rows_tail<T, W, RR - 1, NVV, In, Ep, AT>(rem, K, a, lda, b, ldb, c, ldc, bias, m, ldm);
  }
}

// Rows [0, M) with NVV vectors.
template <typename T, int W, int R, int NVV, int In, int Ep, bool AT>
FF_INLINE void rows_loop(int64_t M, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
                             T* c, int64_t ldc, const T* bias, const T* m, int64_t ldm) {
  int64_t r = 0;
  for (; r + R <= M; r += R)
    micro<T, W, R, NVV, In, Ep, AT>(K, AT ? a + r : a + r * lda, lda, b, ldb, c + r * ldc, ldc,
                                    bias, Ep == kEpiMask ? m + r * ldm : m, ldm);
  if (r < M)
    rows_tail<T, W, R - 1, NVV, In, Ep, AT>(M - r, K, AT ? a + r : a + r * lda, lda, b, ldb,
                                            c + r * ldc, ldc, bias,
                                            Ep == kEpiMask ? m + r * ldm : m, ldm);
}

template <typename T, int W, int R, int NVV, int In, int Ep, bool AT>
FF_INLINE void vec_tail(int64_t rem, int64_t M, int64_t K, const T* a, int64_t lda, const T* b,
                            int64_t ldb, T* c, int64_t ldc, const T* bias, const T* m,
                            int64_t ldm) {
  if constexpr (NVV >= 1) {
    if (rem == NVV)
      rows_loop<T, W, R, NVV, In, Ep, AT>(M, K, a, lda, b, ldb, c, ldc, bias, m, ldm);
    else
      vec_tail<T, W, R, NVV - 1, In, Ep, AT>(rem, M, K, a, lda, b, ldb, c, ldc, bias, m, ldm);
  }
}

// C[M][NVEC vectors] as above; the vectors outermost so that B's K x NV panel stays in L1 while
// every row block streams past it.
template <typename T, int W, int R, int NV, int In, int Ep, bool AT>
FF_INLINE void gemm(int64_t M, int64_t NVEC, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
          T* c, int64_t ldc, const T* bias = nullptr, const T* m = nullptr, int64_t ldm = 0) {
  int64_t v = 0;
  for (; v + NV <= NVEC; v += NV)
    rows_loop<T, W, R, NV, In, Ep, AT>(M, K, a, lda, b + v * W, ldb, c + v * W, ldc,
                                       In == kInitBias ? bias + v * W : bias,
                                       Ep == kEpiMask ? m + v * W : m, ldm);
  if (v < NVEC)
    vec_tail<T, W, R, NV - 1, In, Ep, AT>(NVEC - v, M, K, a, lda, b + v * W, ldb, c + v * W, ldc,
                                          In == kInitBias ? bias + v * W : bias,
                                          Ep == kEpiMask ? m + v * W : m, ldm);
}

// The sum of a vector's lanes as a tree of half-width vector adds (lane i + lane i + W/2, then
// again on the lower half): the order the scalar loop it replaces used, in log2(W) vector adds
// instead of a spill and W - 1 scalar adds.
template <typename T, int W, typename V>
FF_INLINE T hsum(const V& v) {
  static_assert(W >= 2, "every variant's vector holds at least two lanes");
  if constexpr (W == 2) {
    T l[2];
    std::memcpy(l, &v, sizeof(l));
    return l[0] + l[1];
  } else {
    typedef T H __attribute__((vector_size(W / 2 * sizeof(T))));
    H lo, hi;
    std::memcpy(&lo, &v, sizeof(H));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return hsum<T, W / 2>(lo + hi);
  }
}

// ---------------------------------------------------------------------------------------------
// Dots: C[r * ldc + c] = epi(bias[c] + sum_{p < NVK * W} A[r * lda + p] * Bt[c * ldbt + p]) for
// RD rows and CC columns, both operands zero-padded to whole vectors; the lanes are summed in a
// fixed order.
template <typename T, int W, int RD, int CC, int In, int Ep>
FF_INLINE void dot_micro(int64_t NVK, const T* a, int64_t lda, const T* bt, int64_t ldbt, T* c,
                             int64_t ldc, const T* bias) {
  typedef T V __attribute__((vector_size(W * sizeof(T))));
  V acc[RD][CC];
#pragma GCC unroll 8
  for (int r = 0; r < RD; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < CC; ++j) acc[r][j] = V{};
  for (int64_t q = 0; q < NVK; ++q) {
    V bv[CC];
#pragma GCC unroll 8
    for (int j = 0; j < CC; ++j) bv[j] = vload<V>(bt + j * ldbt + q * W);
#pragma GCC unroll 8
    for (int r = 0; r < RD; ++r) {
      const V av = vload<V>(a + r * lda + q * W);
#pragma GCC unroll 8
      for (int j = 0; j < CC; ++j) acc[r][j] += av * bv[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RD; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < CC; ++j) {
      T o = hsum<T, W>(acc[r][j]);
      if (In == kInitBias) o += bias[j];
      if (Ep == kEpiRelu) o = o < T(0) ? T(0) : o;
      c[r * ldc + j] = o;
    }
}

template <typename T, int W, int RD, int CC, int In, int Ep>
FF_INLINE void dot_cols(int64_t M, int64_t NVK, const T* a, int64_t lda, const T* bt,
                            int64_t ldbt, T* c, int64_t ldc, const T* bias) {
  for (int64_t r = 0; r < M; r += RD)
    dot_micro<T, W, RD, CC, In, Ep>(NVK, a + r * lda, lda, bt, ldbt, c + r * ldc, ldc, bias);
}

template <typename T, int W, int RD, int CC, int In, int Ep>
FF_INLINE void dot_tail(int64_t rem, int64_t M, int64_t NVK, const T* a, int64_t lda,
                            const T* bt, int64_t ldbt, T* c, int64_t ldc, const T* bias) {
  if constexpr (CC >= 1) {
    if (rem == CC)
      dot_cols<T, W, RD, CC, In, Ep>(M, NVK, a, lda, bt, ldbt, c, ldc, bias);
    else
      dot_tail<T, W, RD, CC - 1, In, Ep>(rem, M, NVK, a, lda, bt, ldbt, c, ldc, bias);
  }
}

// C[M][N] by dots over K (M a multiple of RD); the columns outermost (Bt's rows stay in L1).
template <typename T, int W, int RD, int CC, int In, int Ep>
FF_INLINE void dot_gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* bt, int64_t ldbt,
              T* c, int64_t ldc, const T* bias) {
  const int64_t nvk = (K + W - 1) / W;
  int64_t j = 0;
  for (; j + CC <= N; j += CC)
    dot_cols<T, W, RD, CC, In, Ep>(M, nvk, a, lda, bt + j * ldbt, ldbt, c + j, ldc,
                                   In == kInitBias ? bias + j : bias);
  if (j < N)
    dot_tail<T, W, RD, CC - 1, In, Ep>(N - j, M, nvk, a, lda, bt + j * ldbt, ldbt, c + j, ldc,
                                       In == kInitBias ? bias + j : bias);
}

// ---------------------------------------------------------------------------------------------

// gb[:] (+)= sum_{s < nb} g[s * ldg + :] over nvec vectors, in registers across the samples.
template <typename T, int W>
FF_INLINE void bias_grad(int64_t nvec, int64_t nb, const T* g, int64_t ldg, T* gb, bool first) {
  typedef T V __attribute__((vector_size(W * sizeof(T))));
  constexpr int C = 4;
  int64_t v = 0;
  for (; v + C <= nvec; v += C) {
    V acc[C];
#pragma GCC unroll 4
    for (int i = 0; i < C; ++i) acc[i] = first ? V{} : vload<V>(gb + (v + i) * W);
    for (int64_t s = 0; s < nb; ++s)
#pragma GCC unroll 4
      for (int i = 0; i < C; ++i) acc[i] += vload<V>(g + s * ldg + (v + i) * W);
#pragma GCC unroll 4
    for (int i = 0; i < C; ++i) vstore(gb + (v + i) * W, acc[i]);
  }
  for (; v < nvec; ++v) {
    V acc = first ? V{} : vload<V>(gb + v * W);
    for (int64_t s = 0; s < nb; ++s) acc += vload<V>(g + s * ldg + v * W);
    vstore(gb + v * W, acc);
  }
}

// H_0 rows [0, mr): [x_a, ctx, 0...] for the nb samples, zero rows after them.
template <typename T, int W>
FF_INLINE void gather_input(const Plan<T>& P, int64_t b0, int64_t nb, int64_t mr, T* h0) {
  const int64_t p0 = P.P[0], da = P.da, nc = P.nc;
  for (int64_t s = 0; s < mr; ++s) {
    T* row = h0 + s * p0;
    zero_vectors<T, W>(row, 0, p0);
    if (s < nb) {
      copy_n(row, P.in + (b0 + s) * P.d + P.a_off, da);
      if (nc > 0) copy_n(row + da, P.ctx + (b0 + s) * nc, nc);
    }
  }
}

// y = coupling(x, raw, shift) for the block's samples; o: the MLP output rows (raw, shift). The
// soft clamp replaces each raw scale in o by t = tanh(raw / c), in a loop of its own (a short
// dependency chain; kSoftClampTanh, scale.h), and runs the rest from t; the backward reads t
// there and computes no tanh.
template <typename T, int Mode, int W>
FF_INLINE void couple_rows(const Plan<T>& P, int64_t b0, int64_t nb, T* o, int64_t ldo,
                               bool inverse) {
  const int64_t d = P.d, da = P.da, db = P.db, ro = P.raw_off, so = P.shift_off;
  const T c = P.c, inv_c = P.inv_c;
  constexpr int EM = Mode == kSoftClamp ? kSoftClampTanh : Mode;
  if (!P.made)
    for (int64_t s = 0; s < nb; ++s)
      copy_n(P.out + (b0 + s) * d + P.a_off, P.in + (b0 + s) * d + P.a_off, da);
  if (db < W) {
    // few outputs per sample: vectorize over the samples, one output at a time
    T ld[kBlock], xs[kBlock], rs[kBlock], ts[kBlock], ys[kBlock], ss[kBlock];
    for (int64_t s = 0; s < nb; ++s) ld[s] = T(0);
    for (int64_t j = 0; j < db; ++j) {
      gather_col(nb, P.in + b0 * d + P.b_off + j, d, xs);
      gather_col(nb, o + ro + j, ldo, rs);
      gather_col(nb, o + so + j, ldo, ts);
      if constexpr (Mode == kSoftClamp) {
#pragma omp simd
        for (int64_t s = 0; s < nb; ++s) rs[s] = soft_clamp_tanh(rs[s], inv_c);
        scatter_col(nb, rs, o + ro + j, ldo);
      }
      if (inverse) {
#pragma omp simd
        for (int64_t s = 0; s < nb; ++s)
          ss[s] = coupling_inverse_elem<EM, T>(xs[s], rs[s], ts[s], true, c, inv_c, ys[s]);
      } else {
#pragma omp simd
        for (int64_t s = 0; s < nb; ++s)
          ss[s] = coupling_forward_elem<EM, T>(xs[s], rs[s], ts[s], true, c, inv_c, ys[s]);
      }
      scatter_col(nb, ys, P.out + b0 * d + P.b_off + j, d);
#pragma omp simd
      for (int64_t s = 0; s < nb; ++s) ld[s] += ss[s];
    }
    for (int64_t s = 0; s < nb; ++s) P.logdet[b0 + s] = inverse ? -ld[s] : ld[s];
    return;
  }
  for (int64_t s = 0; s < nb; ++s) {
    const T* xb = P.in + (b0 + s) * d + P.b_off;
    T* yb = P.out + (b0 + s) * d + P.b_off;
    T* raw = o + s * ldo + ro;
    const T* shift = o + s * ldo + so;
    T acc = T(0);
    if constexpr (Mode == kSoftClamp) {
#pragma omp simd
      for (int64_t j = 0; j < db; ++j) raw[j] = soft_clamp_tanh(raw[j], inv_c);
    }
    if (inverse) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < db; ++j) {
        T v;
        acc += coupling_inverse_elem<EM, T>(xb[j], raw[j], shift[j], true, c, inv_c, v);
        yb[j] = v;
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < db; ++j) {
        T v;
        acc += coupling_forward_elem<EM, T>(xb[j], raw[j], shift[j], true, c, inv_c, v);
        yb[j] = v;
      }
    }
    P.logdet[b0 + s] = inverse ? -acc : acc;
  }
}

// Layer l's forward product for mr rows: o = relu(h @ W_l^T + b_l) (no relu for the output
// layer), whole padded rows defined (the next layer and the backward read whole vectors: the
// vectors past the columns the product writes are zeroed first, the product overwrites the rest).
// w: W_l^T [s_l][P_{l+1}] (lanes) or W_l [s_{l+1}][P_l] (dot).
template <typename T, int W, int NV, int R, int CC>
FF_INLINE void forward_layer(const Plan<T>& P, int64_t l, int64_t mr, const T* h, int64_t ldh,
                             const T* w, const T* bias, bool dot, T* o, int64_t ldo) {
  constexpr int RD = R / 2;
  const int64_t pi = P.P[l], po = P.P[l + 1], si = P.s[l], so = P.s[l + 1];
  const bool hidden = l + 1 < P.L;
  const int64_t done = dot ? so : (so + W - 1) / W * W;  // columns the product writes
  if (done < po)
    for (int64_t s = 0; s < mr; ++s) zero_vectors<T, W>(o + s * ldo, done, po);
  if (dot) {
    if (hidden)
      dot_gemm<T, W, RD, CC, kInitBias, kEpiRelu>(mr, so, si, h, ldh, w, pi, o, ldo, bias);
    else
      dot_gemm<T, W, RD, CC, kInitBias, kEpiNone>(mr, so, si, h, ldh, w, pi, o, ldo, bias);
  } else {
    const int64_t nvec = (so + W - 1) / W;
    if (hidden)
      gemm<T, W, R, NV, kInitBias, kEpiRelu, false>(mr, nvec, si, h, ldh, w, po, o, ldo, bias);
    else
      gemm<T, W, R, NV, kInitBias, kEpiNone, false>(mr, nvec, si, h, ldh, w, po, o, ldo, bias);
  }
}

template <typename T, int W, int NV, int R, int CC>
FF_INLINE void forward_block_impl(const Plan<T>& P, int64_t b0, int64_t nb, T* tb, bool inverse) {
  static_assert(kRowQuantum % R == 0, "acts rows are rounded to a multiple of every R");
  const int64_t L = P.L;
  const int64_t mr = (nb + R - 1) / R * R;
  gather_input<T, W>(P, b0, nb, mr, tb + P.hoff[0]);
  // layer outputs straight into acts when it is kept (its rows are padded like the buffers); the
  // first hidden layer stays in the block's buffer when the backward recomputes it (r1)
  T* const acts = P.acts == nullptr ? nullptr : P.acts + b0 * P.acts_w;
  const auto kept = [&](int64_t i) { return acts != nullptr && !(i == 1 && P.r1); };
  for (int64_t l = 0; l < L; ++l) {
    const int64_t pi = P.P[l], po = P.P[l + 1];
    const T* h = l == 0 ? tb + P.hoff[0] : kept(l) ? acts + P.aoff[l] : tb + P.hoff[l];
    const int64_t ldh = l > 0 && kept(l) ? P.acts_w : pi;
    T* o = kept(l + 1) ? acts + P.aoff[l + 1] : tb + P.hoff[l + 1];
    const int64_t ldo = kept(l + 1) ? P.acts_w : po;
    forward_layer<T, W, NV, R, CC>(P, l, mr, h, ldh, P.w + P.woff[l], P.w + P.boff[l], P.dot[l],
                                   o, ldo);
  }
  T* out = acts ? acts + P.aoff[L] : tb + P.hoff[L];
  const int64_t ldo = acts ? P.acts_w : P.P[L];
  switch (P.mode) {
    case kSoftClamp:
      couple_rows<T, kSoftClamp, W>(P, b0, nb, out, ldo, inverse);
      break;
    case kGlowSigmoid:
      couple_rows<T, kGlowSigmoid, W>(P, b0, nb, out, ldo, inverse);
      break;
    default:
      couple_rows<T, kIdentity, W>(P, b0, nb, out, ldo, inverse);
      break;
  }
}

// The MADE density layer's G_L (d loss / d MLP output (shift, raw)) and the direct part of
// grad_x, for u = (x - shift) exp(-s), logdet = -sum s (u recomputed from x and the stored output).
template <typename T, int Mode, int W>
FF_INLINE void made_backward_rows(const Plan<T>& P, int64_t b0, int64_t nb, int64_t mr, T* g) {
  const int64_t d = P.d, L = P.L, pl = P.P[L], aw = P.acts_w, ro = P.raw_off, so = P.shift_off;
  const T c = P.c, inv_c = P.inv_c;
  const T* o0 = P.acts + b0 * aw + P.aoff[L];
  // the vectors past the 2 d columns written below are zero (whole rows, zero rows from nb to mr)
  for (int64_t s = 0; s < mr; ++s) zero_vectors<T, W>(g + s * pl, s < nb ? 2 * d : 0, pl);
  const auto elem = [&](T x, T raw, T t, T gu, T gl, T& gx, T& graw, T& gt) {
    T u;
    coupling_inverse_elem<Mode, T>(x, raw, t, true, c, inv_c, u);
    coupling_inverse_backward_elem<Mode, T>(u, raw, gu, gl, true, c, inv_c, gx, graw, gt);
  };
  if (d < W) {
    T xs[kBlock], rs[kBlock], ts[kBlock], gus[kBlock], gls[kBlock], gxs[kBlock], grs[kBlock],
        gts[kBlock];
    for (int64_t s = 0; s < nb; ++s) gls[s] = P.gl[b0 + s];
    for (int64_t j = 0; j < d; ++j) {
      gather_col(nb, P.in + b0 * d + j, d, xs);
      gather_col(nb, P.gy + b0 * d + j, d, gus);
      gather_col(nb, o0 + ro + j, aw, rs);
      gather_col(nb, o0 + so + j, aw, ts);
#pragma omp simd
      for (int64_t s = 0; s < nb; ++s)
        elem(xs[s], rs[s], ts[s], gus[s], gls[s], gxs[s], grs[s], gts[s]);
      scatter_col(nb, gxs, P.gx + b0 * d + j, d);
      scatter_col(nb, grs, g + ro + j, pl);
      scatter_col(nb, gts, g + so + j, pl);
    }
  } else {
    for (int64_t s = 0; s < nb; ++s) {
      const T* x = P.in + (b0 + s) * d;
      const T* gu = P.gy + (b0 + s) * d;
      T* gx = P.gx + (b0 + s) * d;
      const T* raw = o0 + s * aw + ro;
      const T* t = o0 + s * aw + so;
      const T gl = P.gl[b0 + s];
      T* gr = g + s * pl + ro;
      T* gt = g + s * pl + so;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) elem(x[j], raw[j], t[j], gu[j], gl, gx[j], gr[j], gt[j]);
    }
  }
}

// G_L = d loss / d MLP output (raw, shift) for the block (zero-padded, zero rows from nb to mr),
// and grad_x_b.
template <typename T, int Mode, int W>
FF_INLINE void couple_backward_rows(const Plan<T>& P, int64_t b0, int64_t nb, int64_t mr,
                                        T* g) {
  const int64_t d = P.d, db = P.db, L = P.L, pl = P.P[L], aw = P.acts_w;
  const T c = P.c, inv_c = P.inv_c;
  const T* raw0 = P.acts + b0 * aw + P.aoff[L];
  // the vectors past the 2 db columns written below are zero (whole rows, zero rows from nb to mr)
  for (int64_t s = 0; s < mr; ++s) zero_vectors<T, W>(g + s * pl, s < nb ? 2 * db : 0, pl);
  if (db < W) {
    T xs[kBlock], rs[kBlock], gys[kBlock], gls[kBlock], gxs[kBlock], grs[kBlock];
    for (int64_t s = 0; s < nb; ++s) gls[s] = P.gl[b0 + s];
    for (int64_t j = 0; j < db; ++j) {
      gather_col(nb, P.in + b0 * d + P.b_off + j, d, xs);
      gather_col(nb, P.gy + b0 * d + P.b_off + j, d, gys);
      gather_col(nb, raw0 + j, aw, rs);
#pragma omp simd
      for (int64_t s = 0; s < nb; ++s)
        coupling_backward_elem<Mode, T>(xs[s], rs[s], gys[s], gls[s], true, c, inv_c, gxs[s],
                                        grs[s]);
      scatter_col(nb, gxs, P.gx + b0 * d + P.b_off + j, d);
      scatter_col(nb, grs, g + j, pl);
      scatter_col(nb, gys, g + db + j, pl);
    }
  } else {
    for (int64_t s = 0; s < nb; ++s) {
      const T* xb = P.in + (b0 + s) * d + P.b_off;
      const T* gyb = P.gy + (b0 + s) * d + P.b_off;
      T* gxb = P.gx + (b0 + s) * d + P.b_off;
      const T* raw = raw0 + s * aw;
      const T gl = P.gl[b0 + s];
      T* gr = g + s * pl;
#pragma omp simd
      for (int64_t j = 0; j < db; ++j) {
        T a_gx, a_graw;
        coupling_backward_elem<Mode, T>(xb[j], raw[j], gyb[j], gl, true, c, inv_c, a_gx, a_graw);
        gxb[j] = a_gx;
        gr[j] = a_graw;
      }
      copy_n(gr + db, gyb, db);
    }
  }
}

template <typename T, int W, int NV, int R, int CC>
FF_INLINE void backward_block_impl(const Plan<T>& P, int64_t b0, int64_t nb, T* tb, T* grp,
                                 bool first) {
  constexpr int RD = R / 2;
  const int64_t L = P.L, aw = P.acts_w;
  const int64_t mr = (nb + R - 1) / R * R;
  gather_input<T, W>(P, b0, nb, mr, tb + P.hoff[0]);
  const T* acts = P.acts + b0 * aw;  // the hidden activations, read in place
  if (P.r1)  // the first hidden layer, recomputed as the forward computed it (same bits)
    forward_layer<T, W, NV, R, CC>(P, 0, mr, tb + P.hoff[0], P.P[0], P.w + P.wf0, P.w + P.bf0,
                                   P.dotf0, tb + P.hoff[1], P.P[1]);
  T* gL = tb + P.goff[L];
  if (P.made) {
    switch (P.mode) {
      case kSoftClamp:  // the forward left t = tanh(raw / c) in acts (couple_rows)
        made_backward_rows<T, kSoftClampTanh, W>(P, b0, nb, mr, gL);
        break;
      case kGlowSigmoid:
        made_backward_rows<T, kGlowSigmoid, W>(P, b0, nb, mr, gL);
        break;
      default:
        made_backward_rows<T, kIdentity, W>(P, b0, nb, mr, gL);
        break;
    }
  } else {
    switch (P.mode) {
      case kSoftClamp:  // the forward left t = tanh(raw / c) in acts (couple_rows)
        couple_backward_rows<T, kSoftClampTanh, W>(P, b0, nb, mr, gL);
        break;
      case kGlowSigmoid:
        couple_backward_rows<T, kGlowSigmoid, W>(P, b0, nb, mr, gL);
        break;
      default:
        couple_backward_rows<T, kIdentity, W>(P, b0, nb, mr, gL);
        break;
    }
  }
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t pi = P.P[l], po = P.P[l + 1], si = P.s[l], so = P.s[l + 1];
    const int64_t nvec_in = (si + W - 1) / W, nvec_out = (so + W - 1) / W;
    const T* go = tb + P.goff[l + 1];  // d loss / d pre-activation of layer l's outputs
    const bool local = l == 0 || (l == 1 && P.r1);  // in the block's buffer, not in acts
    const T* h = local ? tb + P.hoff[l] : acts + P.aoff[l];
    const int64_t ldh = local ? pi : aw;
    T* gw = grp + P.gwoff[l];
    {
      // gtr: dW^T[k][:] += sum_s h[s][k] go[s][:]; else dW[j][:] += sum_s go[s][j] h[s][:]
      const bool tr = P.gtr[l];
      const int64_t rows = tr ? si : so, nvec = tr ? nvec_out : nvec_in, ldw = tr ? po : pi;
      const T* a = tr ? h : go;
      const T* b = tr ? go : h;
      const int64_t lda = tr ? ldh : po, ldb = tr ? po : ldh;
      if (first)
        gemm<T, W, R, NV, kInitZero, kEpiNone, true>(rows, nvec, nb, a, lda, b, ldb, gw, ldw);
      else
        gemm<T, W, R, NV, kInitLoad, kEpiNone, true>(rows, nvec, nb, a, lda, b, ldb, gw, ldw);
    }
    bias_grad<T, W>(nvec_out, nb, go, po, grp + P.gboff[l], first);
    // input gradient: gi[s][:] = go[s][:] @ W_l (masked by relu for hidden inputs)
    T* gi = tb + P.goff[l];
    const T* wl = P.w + P.woff[l];
    if (l > 0)
      gemm<T, W, R, NV, kInitZero, kEpiMask, false>(mr, nvec_in, so, go, po, wl, pi, gi, pi,
                                                    nullptr, h, ldh);
    else if (P.dot[0])
      dot_gemm<T, W, RD, CC, kInitZero, kEpiNone>(mr, si, so, go, po, wl, po, gi, pi, nullptr);
    else
      gemm<T, W, R, NV, kInitZero, kEpiNone, false>(mr, nvec_in, so, go, po, wl, pi, gi, pi);
  }
  const T* g0 = tb + P.goff[0];
  const int64_t p0 = P.P[0], d = P.d, da = P.da, nc = P.nc;
  if (P.made) {  // grad_x = the direct part (made_backward_rows) + the MLP input gradient
    for (int64_t s = 0; s < nb; ++s) {
      const T* gr = g0 + s * p0;
      T* gx = P.gx + (b0 + s) * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) gx[k] += gr[k];
    }
    return;
  }
  for (int64_t s = 0; s < nb; ++s) {
    const T* gr = g0 + s * p0;
    const T* gya = P.gy + (b0 + s) * d + P.a_off;
    T* gxa = P.gx + (b0 + s) * d + P.a_off;
#pragma omp simd
    for (int64_t k = 0; k < da; ++k) gxa[k] = gya[k] + gr[k];
    if (P.gctx != nullptr) copy_n(P.gctx + (b0 + s) * nc, gr + da, nc);
  }
}

// dst[k * stride] = sum over the groups q (in order) of src[q * ge + k], k < len; src is padded to
// whole vectors.
template <int Isa, typename T>
FF_INLINE void sum_groups_isa(T* dst, int64_t stride, const T* src, int64_t len, int64_t ngroups,
                              int64_t ge) {
  constexpr int W = kIsaVectorBytes<Isa> / int(sizeof(T));
  typedef T V __attribute__((vector_size(W * sizeof(T))));
  for (int64_t k = 0; k < len; k += W) {
    V acc = vload<V>(src + k);
    for (int64_t q = 1; q < ngroups; ++q) acc += vload<V>(src + q * ge + k);
    const int64_t m = len - k < W ? len - k : W;
    if (stride == 1 && m == W) {
      vstore(dst + k, acc);
    } else {
      T lanes[W];
      std::memcpy(lanes, &acc, sizeof(lanes));
      for (int64_t i = 0; i < m; ++i) dst[(k + i) * stride] = lanes[i];
    }
  }
}

// Blocking per variant: R rows x NV vectors of accumulators (lanes), CC columns (dots).
template <int Isa>
struct MlpTuning {
  static constexpr int W_BYTES = kIsaVectorBytes<Isa>;
  static constexpr int NV = Isa == kIsaAvx512 ? 4 : 2;
  static constexpr int R = Isa == kIsaBase ? 4 : 6;
  static constexpr int CC = Isa == kIsaAvx512 ? 4 : 2;
};

// One block of nb <= kBlock samples from b0 with this ISA's vectors; tb: the thread's buffers.
template <int Isa, typename T>
FF_INLINE void forward_block_isa(const Plan<T>& P, int64_t b0, int64_t nb, T* tb, bool inverse) {
  using Tn = MlpTuning<Isa>;
  forward_block_impl<T, Tn::W_BYTES / int(sizeof(T)), Tn::NV, Tn::R, Tn::CC>(P, b0, nb, tb, inverse);
}

// grp: the block's weight-gradient group buffer (first: the group's first block, which
// overwrites it).
template <int Isa, typename T>
FF_INLINE void backward_block_isa(const Plan<T>& P, int64_t b0, int64_t nb, T* tb, T* grp,
                                  bool first) {
  using Tn = MlpTuning<Isa>;
  backward_block_impl<T, Tn::W_BYTES / int(sizeof(T)), Tn::NV, Tn::R, Tn::CC>(P, b0, nb, tb, grp, first);
}

FF_CPU_VARIANTS(forward_block, forward_block_isa,
                (const Plan<T>& P, int64_t b0, int64_t nb, T* tb, bool inverse),
                (P, b0, nb, tb, inverse))
FF_CPU_VARIANTS(backward_block, backward_block_isa,
                (const Plan<T>& P, int64_t b0, int64_t nb, T* tb, T* grp, bool first),
                (P, b0, nb, tb, grp, first))
FF_CPU_VARIANTS(sum_groups, sum_groups_isa,
                (T* dst, int64_t stride, const T* src, int64_t len, int64_t ngroups, int64_t ge),
                (dst, stride, src, len, ngroups, ge))

// ---------------------------------------------------------------------------------------------
// The driver (OpenMP over blocks and groups) and the entry points.

template <typename T>
using FwdFn = void (*)(const Plan<T>&, int64_t, int64_t, T*, bool);
template <typename T>
using BwdFn = void (*)(const Plan<T>&, int64_t, int64_t, T*, T*, bool);
template <typename T>
using SumFn = void (*)(T*, int64_t, const T*, int64_t, int64_t, int64_t);

// The block functions and vector width of one ISA variant (cpu_isa.h).
template <typename T>
struct Kernels {
  FwdFn<T> forward;
  BwdFn<T> backward;
  SumFn<T> sum_groups;
  int64_t lanes;
};

template <typename T>
Kernels<T> pick_kernels(int isa) {
  return {forward_block_for<T>(isa), backward_block_for<T>(isa), sum_groups_for<T>(isa),
          int64_t(isa_vector_bytes(isa) / int(sizeof(T)))};
}

int64_t mul(int64_t a, int64_t b) {
  int64_t r;
  FF_CHECK(!__builtin_mul_overflow(a, b, &r), "mlp_coupling: sizes too large");
  return r;
}
int64_t add(int64_t a, int64_t b) {
  int64_t r;
  FF_CHECK(!__builtin_add_overflow(a, b, &r), "mlp_coupling: sizes too large");
  return r;
}


// Where everything lives in the workspace, in elements (every offset a multiple of 64 bytes).
// Each layer's weight copy and gradient have room for either orientation.
struct Geometry {
  int64_t L = 0, pe = 0, nblocks = 0, ngroups = 0, nthreads = 0;
  std::vector<int64_t> P, woff, boff, hoff, goff, gwoff, gboff, aoff;
  int64_t acts_w = 0, acts_rows = 0, numel = 0, wregion = 0, thread_elems = 0, group_elems = 0;
  int64_t total = 0;
  // r1: acts holds no columns for the first hidden layer; the backward recomputes it from the
  // input (recompute_first_layer); wf0 / bf0: the backward's copy of the forward's layer-0 weights
  bool r1 = false;
  int64_t wf0 = 0, bf0 = 0;
};

// Whether the backward recomputes the first hidden layer instead of reading it from acts: when
// its input is narrow (kRecomputeRatio * sizes[0] <= sizes[1]) the product costs a few FMAs per
// output (one for a 2-D coupling), while a row of sizes[1] values stored by the forward and
// reloaded by the backward goes through memory once acts outgrows L2 (a few thousand samples; ~22
// GB/s here against ~70 in L2). Whole training step, 1 thread, B=4096, in-process A/B: RealNVP
// h64 D=2 1.21x, D=16 1.25x; MAF D=2 1.49x, D=16 1.09x (ratio 4; 8 leaves D=16 MAF out); B=256
// unchanged within noise. Ratio 2 (D=64 RealNVP) gave +3.6% at B=4096 and -1% at B=256: not taken.
constexpr int64_t kRecomputeRatio = 4;
inline bool recompute_first_layer(const std::vector<int64_t>& sizes) {
  return sizes.size() >= 3 && sizes[0] * kRecomputeRatio <= sizes[1];
}

void geometry(const char* name, int dtype, int64_t n, const std::vector<int64_t>& sizes,
              int nthreads, Geometry& g) {
  FF_CHECK(dtype == kFloat32 || dtype == kFloat64,
               std::string(name) + ": dtype must be float32 or float64 (cast 16-bit inputs first)");
  FF_CHECK(n >= 0, std::string(name) + ": negative batch size");
  FF_CHECK(nthreads >= 1, std::string(name) + ": nthreads must be >= 1");
  FF_CHECK(sizes.size() >= 2 && sizes.size() <= 1025,
               std::string(name) + ": sizes must be (in, hidden..., out): 2 to 1025 entries");
  for (int64_t v : sizes)
    FF_CHECK(v >= 1 && v <= (int64_t(1) << 24),
                 std::string(name) + ": sizes must be in [1, 2^24]");
  const int64_t L = int64_t(sizes.size()) - 1;
  g.L = L;
  g.pe = kMlpRowAlignBytes / (dtype == kFloat32 ? 4 : 8);
  g.P.resize(L + 1);
  for (int64_t i = 0; i <= L; ++i) g.P[i] = (sizes[i] + g.pe - 1) / g.pe * g.pe;
  g.woff.resize(L);
  g.boff.resize(L);
  g.gwoff.resize(L);
  g.gboff.resize(L);
  int64_t fw = 0, gr = 0, numel = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t wl = std::max(mul(sizes[l], g.P[l + 1]), mul(sizes[l + 1], g.P[l]));
    g.woff[l] = fw;
    fw = add(fw, wl);
    g.boff[l] = fw;
    fw = add(fw, g.P[l + 1]);
    g.gwoff[l] = gr;
    gr = add(gr, wl);
    g.gboff[l] = gr;
    gr = add(gr, g.P[l + 1]);
    numel = add(numel, mul(sizes[l + 1], sizes[l] + 1));
  }
  g.r1 = recompute_first_layer(sizes);
  if (g.r1) {
    g.wf0 = fw;
    fw = add(fw, std::max(mul(sizes[0], g.P[1]), mul(sizes[1], g.P[0])));
    g.bf0 = fw;
    fw = add(fw, g.P[1]);
  }
  g.numel = numel;
  g.wregion = fw;
  g.group_elems = gr;
  g.hoff.resize(L + 1);
  g.goff.resize(L + 1);
  g.aoff.assign(L + 1, 0);
  int64_t te = 0, aw = 0;
  for (int64_t i = 0; i <= L; ++i) {
    g.hoff[i] = te;
    te = add(te, mul(kBlock, g.P[i]));
    g.goff[i] = te;
    te = add(te, mul(kBlock, g.P[i]));
    if (i == 1 && g.r1) {
      g.aoff[i] = -1;  // not kept
    } else if (i >= 1) {
      g.aoff[i] = aw;
      aw += g.P[i];
    }
  }
  g.thread_elems = te;
  g.acts_w = aw;
  g.acts_rows = (n + kRowQuantum - 1) / kRowQuantum * kRowQuantum;
  g.nblocks = (n + kBlock - 1) / kBlock;
  g.ngroups = std::min(g.nblocks, kMaxGroups);
  g.nthreads = std::max<int64_t>(1, std::min<int64_t>(nthreads, g.nblocks));
  g.total = add(add(g.wregion, mul(g.nthreads, g.thread_elems)), mul(g.ngroups, g.group_elems));
}

int64_t workspace_bytes(const Geometry& g, int dtype) {
  return add(64, mul(g.total, dtype == kFloat32 ? 4 : 8));
}

// Sizes of one call: the split, the MLP's ends and the scale mode.
struct Split {
  int64_t da, db, a_off, b_off;
  bool made;
  int64_t raw_off, shift_off;
};

// parity value of the MADE density layer (made_density_*_cpu only; cut is then unused)
constexpr int kParityMade = 2;

Split check_call(const char* name, int mode, double clamp, int64_t n, int64_t d, int64_t cut,
                 int parity, int64_t n_ctx, const std::vector<int64_t>& sizes) {
  const auto nm = [name] { return std::string(name); };
  FF_CHECK(mode == kSoftClamp || mode == kGlowSigmoid || mode == kIdentity,
               nm() + ": mode must be 0 (softclamp), 1 (glow) or 2 (identity)");
  FF_CHECK(mode != kSoftClamp || (clamp > 0 && std::isfinite(clamp)),
               nm() + ": clamp must be finite and > 0");
  FF_CHECK(d >= (parity == kParityMade ? 1 : 2) && d <= (int64_t(1) << 24),
           nm() + ": d must be in [2, 2^24] (MADE: [1, 2^24])");
  FF_CHECK(n_ctx >= 0 && n_ctx <= (int64_t(1) << 24), nm() + ": n_ctx must be in [0, 2^24]");
  Split sp;
  if (parity == kParityMade) {
    sp.made = true;
    sp.da = sp.db = d;
    sp.a_off = sp.b_off = 0;
    sp.shift_off = 0;
    sp.raw_off = d;
    FF_CHECK(sizes.size() >= 2 && sizes.front() == d + n_ctx && sizes.back() == 2 * d,
             nm() + ": sizes must run from d + n_ctx = " + std::to_string(d + n_ctx) +
                 " to 2 d = " + std::to_string(2 * d));
    return sp;
  }
  FF_CHECK(cut >= 1 && cut < d, nm() + ": need 0 < cut < d");
  FF_CHECK(parity == 0 || parity == 1, nm() + ": parity must be 0 or 1");
  sp.made = false;
  sp.da = parity == 0 ? cut : d - cut;
  sp.db = d - sp.da;
  sp.a_off = parity == 0 ? 0 : cut;
  sp.b_off = parity == 0 ? cut : 0;
  sp.raw_off = 0;
  sp.shift_off = sp.db;
  FF_CHECK(sizes.size() >= 2 && sizes.front() == sp.da + n_ctx && sizes.back() == 2 * sp.db,
               nm() + ": sizes must run from |x_a| + n_ctx = " + std::to_string(sp.da + n_ctx) +
                   " to 2 |x_b| = " + std::to_string(2 * sp.db));
  return sp;
}

// The coupling entry points take parity 0 or 1 only (kParityMade is the MADE entry points').
inline void check_coupling_parity(const char* name, int parity) {
  FF_CHECK(parity == 0 || parity == 1, std::string(name) + ": parity must be 0 or 1");
}

template <typename T>
T* aligned_base(std::uintptr_t ws) {
  return ptr<T>((ws + 63) & ~std::uintptr_t(63));
}

// Vector-FMA counts per sample of the two ways to compute out = sum_{k < K} a[k] w[k] for N
// outputs: lanes over the outputs, or N dot products of K (plus their sums across the lanes).
inline bool dots_are_cheaper(int64_t K, int64_t N, int64_t lanes) {
  return N * ((K + lanes - 1) / lanes + 2) < K * ((N + lanes - 1) / lanes);
}

// Layer l's weight W_l [out][in] (params row-major) into dst, zero-padded: transposed (W_l^T
// [in][P_{l+1}]) or as is (W_l [out][P_l]).
template <typename T>
void pack_layer(const T* wl, int64_t in, int64_t out, int64_t pin, int64_t pout, bool transposed,
                T* dst) {
  if (transposed) {
    // eight source rows at a time: contiguous stores of 8, reads from 8 streams
    int64_t j0 = 0;
    for (; j0 + 8 <= out; j0 += 8) {
      const T* r = wl + j0 * in;
      for (int64_t k = 0; k < in; ++k) {
        T* o = dst + k * pout + j0;
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) o[i] = r[i * in + k];
      }
    }
    for (; j0 < out; ++j0)
      for (int64_t k = 0; k < in; ++k) dst[k * pout + j0] = wl[j0 * in + k];
    for (int64_t k = 0; k < in; ++k)
      for (int64_t j = out; j < pout; ++j) dst[k * pout + j] = T(0);
  } else {
    for (int64_t j = 0; j < out; ++j) {
      std::memcpy(dst + j * pin, wl + j * in, sizeof(T) * in);
      for (int64_t k = in; k < pin; ++k) dst[j * pin + k] = T(0);
    }
  }
}

// The per-call state shared by the entry points: geometry, kernel choice and the plan.
template <typename T>
struct Call {
  Geometry g;
  Kernels<T> k;
  std::vector<uint8_t> dot, gtr;
  Plan<T> P{};
};

template <typename T>
void make_plan(Call<T>& C, const std::vector<int64_t>& sizes, const Split& sp, int mode,
               double clamp, int64_t n, int64_t d, int64_t n_ctx, bool backward) {
  const Geometry& g = C.g;
  C.k = pick_kernels<T>(cpu_isa_level());
  const int64_t L = g.L, lanes = C.k.lanes;
  C.dot.assign(L, 0);
  C.gtr.assign(L, 0);
  for (int64_t l = 0; l < L; ++l) {
    if (!backward) C.dot[l] = dots_are_cheaper(sizes[l], sizes[l + 1], lanes);
    C.gtr[l] = sizes[l] * ((sizes[l + 1] + lanes - 1) / lanes) <
               sizes[l + 1] * ((sizes[l] + lanes - 1) / lanes);
  }
  if (backward) C.dot[0] = dots_are_cheaper(sizes[1], sizes[0], lanes);
  Plan<T>& P = C.P;
  P.mode = mode;
  P.c = T(clamp);
  P.inv_c = T(1) / T(clamp);
  P.n = n;
  P.d = d;
  P.da = sp.da;
  P.db = sp.db;
  P.nc = n_ctx;
  P.a_off = sp.a_off;
  P.b_off = sp.b_off;
  P.made = sp.made;
  P.raw_off = sp.raw_off;
  P.shift_off = sp.shift_off;
  P.L = L;
  P.s = sizes.data();
  P.P = g.P.data();
  P.woff = g.woff.data();
  P.boff = g.boff.data();
  P.dot = C.dot.data();
  P.gtr = C.gtr.data();
  P.hoff = g.hoff.data();
  P.goff = g.goff.data();
  P.gwoff = g.gwoff.data();
  P.gboff = g.gboff.data();
  P.acts_w = g.acts_w;
  P.aoff = g.aoff.data();
  P.r1 = g.r1;
  P.dotf0 = dots_are_cheaper(sizes[0], sizes[1], lanes);  // the forward's choice for layer 0
  P.wf0 = g.wf0;
  P.bf0 = g.bf0;
}

// A layer's forward weights from its block of the flat parameters (wl: W_l then b_l): W_l^T
// (lanes) or W_l (dots) at w, the bias zero-padded to pout at b.
template <typename T>
void pack_forward_layer(const T* wl, int64_t in, int64_t out, int64_t pin, int64_t pout, bool dot,
                        T* w, T* b) {
  pack_layer<T>(wl, in, out, pin, pout, !dot, w);
  std::memcpy(b, wl + out * in, sizeof(T) * out);
  for (int64_t j = out; j < pout; ++j) b[j] = T(0);
}

// Forward weights: W_l^T (lanes) or W_l (dots), and the biases.
template <typename T>
void pack_forward(const Call<T>& C, const T* params, T* w) {
  const Geometry& g = C.g;
  const int64_t* s = C.P.s;
  int64_t off = 0;
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t in = s[l], out = s[l + 1];
    pack_forward_layer<T>(params + off, in, out, g.P[l], g.P[l + 1], C.dot[l], w + g.woff[l],
                          w + g.boff[l]);
    off += out * (in + 1);
  }
}

// Backward weights: W_l (lanes over the inputs) or, for the input gradient by dots, W_0^T.
template <typename T>
void pack_backward(const Call<T>& C, const T* params, T* w) {
  const Geometry& g = C.g;
  const int64_t* s = C.P.s;
  int64_t off = 0;
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t in = s[l], out = s[l + 1];
    pack_layer<T>(params + off, in, out, g.P[l], g.P[l + 1], l == 0 && C.dot[0], w + g.woff[l]);
    off += out * (in + 1);
  }
  if (g.r1)  // layer 0 as the forward packs it, for its recomputation
    pack_forward_layer<T>(params, s[0], s[1], g.P[0], g.P[1], C.P.dotf0, w + g.wf0, w + g.bf0);
}

template <typename T>
void run_forward(Call<T>& C, const T* params, std::uintptr_t workspace, bool inverse) {
  const Geometry& g = C.g;
  T* base = aligned_base<T>(workspace);
  T* threads = base + g.wregion;
  pack_forward<T>(C, params, base);
  C.P.w = base;
  const Plan<T>& P = C.P;
  const FwdFn<T> fn = C.k.forward;
  const int nt = int(g.nthreads);
  const int64_t n = P.n, nblocks = g.nblocks, te = g.thread_elems;
  if (nt == 1) {  // no parallel region at all: even an inactive one costs a few microseconds
    for (int64_t blk = 0; blk < nblocks; ++blk)
      fn(P, blk * kBlock, std::min<int64_t>(kBlock, n - blk * kBlock), threads, inverse);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    T* mine = threads + int64_t(thread_id()) * te;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t b0 = blk * kBlock;
      fn(P, b0, std::min<int64_t>(kBlock, n - b0), mine, inverse);
    }
  }
}

template <typename T>
void run_backward(Call<T>& C, const T* params, T* grad_params, std::uintptr_t workspace) {
  const Geometry& g = C.g;
  T* base = aligned_base<T>(workspace);
  T* threads = base + g.wregion;
  T* groups = threads + g.nthreads * g.thread_elems;
  pack_backward<T>(C, params, base);
  C.P.w = base;
  const Plan<T>& P = C.P;
  // runs of the flat gradient: `len` values at dst, dst + stride, ... summed over the groups from
  // src (contiguous) in each group buffer
  struct Run {
    int64_t dst, stride, src, len;
  };
  std::vector<Run> runs;
  int64_t nr = 0;
  for (int64_t l = 0; l < g.L; ++l) nr += (C.gtr[l] ? P.s[l] : P.s[l + 1]) + 1;
  runs.reserve(nr);
  int64_t off = 0;
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t in = P.s[l], out = P.s[l + 1];
    if (C.gtr[l]) {
      for (int64_t k = 0; k < in; ++k)
        runs.push_back({off + k, in, g.gwoff[l] + k * g.P[l + 1], out});
    } else {
      for (int64_t j = 0; j < out; ++j)
        runs.push_back({off + j * in, 1, g.gwoff[l] + j * g.P[l], in});
    }
    runs.push_back({off + out * in, 1, g.gboff[l], out});
    off += out * (in + 1);
  }
  const BwdFn<T> fn = C.k.backward;
  const SumFn<T> sum = C.k.sum_groups;
  const int64_t n = P.n, nblocks = g.nblocks, ngroups = g.ngroups, ge = g.group_elems;
  const int64_t te = g.thread_elems;
  const int nt = int(std::min(g.nthreads, ngroups));
  const int64_t nruns = int64_t(runs.size());
  const Run* rp = runs.data();
  const auto group = [&](int64_t q, T* mine) {
    T* grp = groups + q * ge;
    const int64_t lo = q * nblocks / ngroups, hi = (q + 1) * nblocks / ngroups;
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t b0 = blk * kBlock;
      fn(P, b0, std::min<int64_t>(kBlock, n - b0), mine, grp, blk == lo);
    }
  };
  if (nt == 1) {
    for (int64_t q = 0; q < ngroups; ++q) group(q, threads);
    for (int64_t r = 0; r < nruns; ++r)
      sum(grad_params + rp[r].dst, rp[r].stride, groups + rp[r].src, rp[r].len, ngroups, ge);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    T* mine = threads + int64_t(thread_id()) * te;
#pragma omp for schedule(static)
    for (int64_t q = 0; q < ngroups; ++q) group(q, mine);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < nruns; ++r)
      sum(grad_params + rp[r].dst, rp[r].stride, groups + rp[r].src, rp[r].len, ngroups, ge);
  }
}

}  // namespace mlp_cpu_detail

using namespace mlp_cpu_detail;

int64_t mlp_coupling_workspace_bytes(int dtype, int64_t n, const std::vector<int64_t>& sizes,
                                     int nthreads) {
  Geometry g;
  geometry("mlp_coupling_workspace_bytes", dtype, n, sizes, nthreads, g);
  return workspace_bytes(g, dtype);
}

std::pair<int64_t, int64_t> mlp_coupling_acts_shape(int dtype, int64_t n,
                                                    const std::vector<int64_t>& sizes) {
  Geometry g;
  geometry("mlp_coupling_acts_shape", dtype, n, sizes, 1, g);
  return {g.acts_rows, g.acts_w};
}

std::vector<int64_t> mlp_coupling_acts_columns(int dtype, const std::vector<int64_t>& sizes) {
  Geometry g;
  geometry("mlp_coupling_acts_columns", dtype, 0, sizes, 1, g);
  return std::vector<int64_t>(g.aoff.begin() + 1, g.aoff.end());
}

namespace {

void check_workspace(const char* name, const Geometry& g, int dtype, std::uintptr_t workspace,
                     int64_t workspace_bytes_given) {
  check_ptr(workspace, 1, "workspace");
  FF_CHECK(workspace_bytes_given >= workspace_bytes(g, dtype),
               std::string(name) + ": workspace too small (see mlp_coupling_workspace_bytes)");
}

void check_acts(const char* name, const Geometry& g, int64_t acts_numel) {
  const int64_t need = mul(g.acts_rows, g.acts_w);
  FF_CHECK(acts_numel >= need, std::string(name) + ": acts must hold " + std::to_string(need) +
                                       " elements (see mlp_coupling_acts_shape)");
}

template <typename T>
void forward_impl(const char* name, int dtype, int mode, double clamp, int64_t n, int64_t d,
                  int64_t cut, int parity, int64_t n_ctx, const std::vector<int64_t>& sizes,
                  std::uintptr_t in, std::uintptr_t ctx, std::uintptr_t params, std::uintptr_t out,
                  std::uintptr_t logdet, std::uintptr_t acts, int64_t acts_numel,
                  std::uintptr_t workspace, int64_t workspace_bytes_given, int nthreads,
                  bool inverse) {
  const Split sp = check_call(name, mode, clamp, n, d, cut, parity, n_ctx, sizes);
  Call<T> C;
  geometry(name, dtype, n, sizes, nthreads, C.g);
  check_ptr(params, C.g.numel, "params");
  if (n == 0) return;
  check_ptr(in, mul(n, d), inverse ? "y" : "x");
  check_ptr(ctx, mul(n, n_ctx), "ctx");
  check_ptr(out, mul(n, d), inverse ? "x" : "y");
  check_ptr(logdet, n, "logdet");
  if (acts != 0) check_acts(name, C.g, acts_numel);
  check_workspace(name, C.g, dtype, workspace, workspace_bytes_given);
  make_plan<T>(C, sizes, sp, mode, clamp, n, d, n_ctx, false);
  C.P.in = ptr<const T>(in);
  C.P.ctx = ptr<const T>(ctx);
  C.P.out = ptr<T>(out);
  C.P.logdet = ptr<T>(logdet);
  C.P.acts = ptr<T>(acts);
  run_forward<T>(C, ptr<const T>(params), workspace, inverse);
}

}  // namespace

void mlp_coupling_forward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d, int64_t cut,
                              int parity, int64_t n_ctx, const std::vector<int64_t>& sizes,
                              std::uintptr_t x, std::uintptr_t ctx, std::uintptr_t params,
                              std::uintptr_t y, std::uintptr_t logdet, std::uintptr_t acts,
                              int64_t acts_numel, std::uintptr_t workspace, int64_t workspace_bytes,
                              int nthreads) {
  const char* name = "mlp_coupling_forward_cpu";
  check_coupling_parity(name, parity);
  if (dtype == kFloat64)
    forward_impl<double>(name, dtype, mode, clamp, n, d, cut, parity, n_ctx, sizes, x, ctx, params,
                         y, logdet, acts, acts_numel, workspace, workspace_bytes, nthreads, false);
  else
    forward_impl<float>(name, dtype, mode, clamp, n, d, cut, parity, n_ctx, sizes, x, ctx, params,
                        y, logdet, acts, acts_numel, workspace, workspace_bytes, nthreads, false);
}

void mlp_coupling_inverse_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d, int64_t cut,
                              int parity, int64_t n_ctx, const std::vector<int64_t>& sizes,
                              std::uintptr_t y, std::uintptr_t ctx, std::uintptr_t params,
                              std::uintptr_t x, std::uintptr_t logdet, std::uintptr_t workspace,
                              int64_t workspace_bytes, int nthreads) {
  const char* name = "mlp_coupling_inverse_cpu";
  check_coupling_parity(name, parity);
  if (dtype == kFloat64)
    forward_impl<double>(name, dtype, mode, clamp, n, d, cut, parity, n_ctx, sizes, y, ctx, params,
                         x, logdet, 0, 0, workspace, workspace_bytes, nthreads, true);
  else
    forward_impl<float>(name, dtype, mode, clamp, n, d, cut, parity, n_ctx, sizes, y, ctx, params,
                        x, logdet, 0, 0, workspace, workspace_bytes, nthreads, true);
}

namespace {

template <typename T>
void backward_impl(const char* name, int dtype, int mode, double clamp, int64_t n, int64_t d, int64_t cut, int parity,
                   int64_t n_ctx, const std::vector<int64_t>& sizes, std::uintptr_t x,
                   std::uintptr_t ctx, std::uintptr_t params, std::uintptr_t acts,
                   int64_t acts_numel, std::uintptr_t grad_y, std::uintptr_t grad_logdet,
                   std::uintptr_t grad_x, std::uintptr_t grad_ctx, std::uintptr_t grad_params,
                   std::uintptr_t workspace, int64_t workspace_bytes_given, int nthreads) {
  const Split sp = check_call(name, mode, clamp, n, d, cut, parity, n_ctx, sizes);
  Call<T> C;
  geometry(name, dtype, n, sizes, nthreads, C.g);
  check_ptr(params, C.g.numel, "params");
  check_ptr(grad_params, C.g.numel, "grad_params");
  if (n == 0) {
    T* gp = ptr<T>(grad_params);
    for (int64_t i = 0; i < C.g.numel; ++i) gp[i] = T(0);
    return;
  }
  check_ptr(x, mul(n, d), "x");
  check_ptr(ctx, mul(n, n_ctx), "ctx");
  check_ptr(acts, 1, "acts");
  check_acts(name, C.g, acts_numel);
  check_ptr(grad_y, mul(n, d), "grad_y");
  check_ptr(grad_logdet, n, "grad_logdet");
  check_ptr(grad_x, mul(n, d), "grad_x");
  check_workspace(name, C.g, dtype, workspace, workspace_bytes_given);
  make_plan<T>(C, sizes, sp, mode, clamp, n, d, n_ctx, true);
  C.P.in = ptr<const T>(x);
  C.P.ctx = ptr<const T>(ctx);
  C.P.acts = ptr<T>(acts);
  C.P.gy = ptr<const T>(grad_y);
  C.P.gl = ptr<const T>(grad_logdet);
  C.P.gx = ptr<T>(grad_x);
  C.P.gctx = n_ctx > 0 ? ptr<T>(grad_ctx) : nullptr;
  run_backward<T>(C, ptr<const T>(params), ptr<T>(grad_params), workspace);
}

}  // namespace

void mlp_coupling_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d, int64_t cut,
                               int parity, int64_t n_ctx, const std::vector<int64_t>& sizes,
                               std::uintptr_t x, std::uintptr_t ctx, std::uintptr_t params,
                               std::uintptr_t acts, int64_t acts_numel, std::uintptr_t grad_y,
                               std::uintptr_t grad_logdet, std::uintptr_t grad_x,
                               std::uintptr_t grad_ctx, std::uintptr_t grad_params,
                               std::uintptr_t workspace, int64_t workspace_bytes, int nthreads) {
  check_coupling_parity("mlp_coupling_backward_cpu", parity);
  if (dtype == kFloat64)
    backward_impl<double>("mlp_coupling_backward_cpu", dtype, mode, clamp, n, d, cut, parity, n_ctx, sizes, x, ctx, params, acts,
                          acts_numel, grad_y, grad_logdet, grad_x, grad_ctx, grad_params, workspace,
                          workspace_bytes, nthreads);
  else
    backward_impl<float>("mlp_coupling_backward_cpu", dtype, mode, clamp, n, d, cut, parity, n_ctx, sizes, x, ctx, params, acts,
                         acts_numel, grad_y, grad_logdet, grad_x, grad_ctx, grad_params, workspace,
                         workspace_bytes, nthreads);
}

void made_density_forward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d,
                              const std::vector<int64_t>& sizes, std::uintptr_t x,
                              std::uintptr_t params, std::uintptr_t u, std::uintptr_t logdet,
                              std::uintptr_t acts, int64_t acts_numel, std::uintptr_t workspace,
                              int64_t workspace_bytes, int nthreads) {
  const char* name = "made_density_forward_cpu";
  if (dtype == kFloat64)
    forward_impl<double>(name, dtype, mode, clamp, n, d, 0, kParityMade, 0, sizes, x, 0, params, u,
                         logdet, acts, acts_numel, workspace, workspace_bytes, nthreads, true);
  else
    forward_impl<float>(name, dtype, mode, clamp, n, d, 0, kParityMade, 0, sizes, x, 0, params, u,
                        logdet, acts, acts_numel, workspace, workspace_bytes, nthreads, true);
}

void made_density_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d,
                               const std::vector<int64_t>& sizes, std::uintptr_t x,
                               std::uintptr_t params, std::uintptr_t acts, int64_t acts_numel,
                               std::uintptr_t grad_u, std::uintptr_t grad_logdet,
                               std::uintptr_t grad_x, std::uintptr_t grad_params,
                               std::uintptr_t workspace, int64_t workspace_bytes, int nthreads) {
  const char* name = "made_density_backward_cpu";
  if (dtype == kFloat64)
    backward_impl<double>(name, dtype, mode, clamp, n, d, 0, kParityMade, 0, sizes, x, 0, params,
                          acts, acts_numel, grad_u, grad_logdet, grad_x, 0, grad_params, workspace,
                          workspace_bytes, nthreads);
  else
    backward_impl<float>(name, dtype, mode, clamp, n, d, 0, kParityMade, 0, sizes, x, 0, params,
                         acts, acts_numel, grad_u, grad_logdet, grad_x, 0, grad_params, workspace,
                         workspace_bytes, nthreads);
}

}  // namespace ff
