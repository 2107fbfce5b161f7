#ifndef FF_MLP_CPU_BODY
// CPU MLP coupling layer (mlp.h): the whole layer in one call each way, OpenMP over blocks of
// kBlock samples.
//
// Every matrix product is C[r][v] (+)= sum_p A(r, p) * B[p][v] with v a run of vector lanes,
// done by one register-blocked micro-kernel (R rows x NV vectors of accumulators; per p one
// broadcast of A per row and NV vector loads of B), written once with GCC/Clang vector extensions
// and compiled per ISA (AVX-512, AVX2+FMA, baseline SSE2) like made_cpu.cpp. Activations of a
// block live sample-major in the per-thread workspace, each row padded to 64 bytes with zeros:
//   forward      H_{l+1}[s][:] = relu(H_l[s][:] @ W_l^T + b_l)  (r = sample, p = input unit,
//                                                                 B = W_l^T padded, made per call)
//   grad input   G_l[s][:] = (G_{l+1}[s][:] @ W_l) * (H_l > 0)  (r = sample, p = output unit,
//                                                                 B = W_l row-padded)
//   grad weight  dW_l[j][:] += sum_s G_{l+1}[s][j] H_l[s][:]    (r = output unit, p = sample)
// Weight gradients are summed per group of blocks (a partition that depends on n only) into the
// group's buffer in the workspace, then over the groups in order: no atomics, and the same bits
// for any thread count.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "coupling.h"
#include "mlp.h"

#if defined(FF_WITH_OPENMP)
#include <omp.h>
#endif

namespace ff {
namespace mlp_cpu_detail {

#define FF_MLP_INLINE inline __attribute__((always_inline))

// Samples per block: a multiple of every variant's row count R (6, 6, 4).
constexpr int kBlock = 48;
// Weight-gradient groups at most (each holds a copy of the padded gradient).
constexpr int64_t kMaxGroups = 16;

enum Init : int { kInitZero = 0, kInitBias = 1, kInitLoad = 2 };
enum Epi : int { kEpiNone = 0, kEpiRelu = 1, kEpiMask = 2 };

template <typename T>
struct Plan {
  int mode;
  T c, inv_c;
  int64_t n, d, da, db, nc, a_off, b_off, L;
  const int64_t* s;  // sizes [L + 1]
  const int64_t* P;  // sizes padded to 64 bytes [L + 1]
  // per-layer weights in this direction's layout (forward: W^T [s_l][P_{l+1}] and the bias
  // [P_{l+1}]; backward: W [s_{l+1}][P_l]), zero-padded, and their offsets in `w`
  const T* w;
  const int64_t* woff;
  const int64_t* boff;
  const int64_t* hoff;   // [L + 1] per-thread H_i [kBlock][P_i]
  const int64_t* goff;   // [L + 1] per-thread G_i [kBlock][P_i]
  const int64_t* gwoff;  // [L] group dW_l [s_{l+1}][P_l]
  const int64_t* gboff;  // [L] group db_l [P_{l+1}]
  int64_t acts_w;
  const int64_t* aoff;  // [L + 1] offset of layer i's outputs in an acts row (i >= 1)
  const T* in;          // x (forward, backward) or y (inverse)
  const T* ctx;
  T* out;  // y (forward) or x (inverse)
  T* logdet;
  T* acts;
  const T* gy;
  const T* gl;
  T* gx;
  T* gctx;
};

}  // namespace mlp_cpu_detail
}  // namespace ff

// The block functions, compiled once per instruction set (see made_cpu.cpp).
#define FF_MLP_CPU_BODY 1
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")
#endif
#define FF_MLP_ISA avx512
#define FF_MLP_VBYTES 64
#define FF_MLP_NV 4
#define FF_MLP_R 6
#include "mlp_cpu.cpp"  // NOLINT(build/include): deliberate self-inclusion
#undef FF_MLP_ISA
#undef FF_MLP_VBYTES
#undef FF_MLP_NV
#undef FF_MLP_R
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define FF_MLP_ISA avx2
#define FF_MLP_VBYTES 32
#define FF_MLP_NV 2
#define FF_MLP_R 6
#include "mlp_cpu.cpp"  // NOLINT(build/include)
#undef FF_MLP_ISA
#undef FF_MLP_VBYTES
#undef FF_MLP_NV
#undef FF_MLP_R
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#define FF_MLP_HAVE_X86 1
#endif
#define FF_MLP_ISA generic
#define FF_MLP_VBYTES 16
#define FF_MLP_NV 2
#define FF_MLP_R 4
#include "mlp_cpu.cpp"  // NOLINT(build/include)
#undef FF_MLP_ISA
#undef FF_MLP_VBYTES
#undef FF_MLP_NV
#undef FF_MLP_R
#undef FF_MLP_CPU_BODY

namespace ff {
namespace mlp_cpu_detail {

template <typename T>
using FwdFn = void (*)(const Plan<T>&, int64_t, int64_t, T*, bool);
template <typename T>
using BwdFn = void (*)(const Plan<T>&, int64_t, int64_t, T*, T*, bool);

template <typename T>
FwdFn<T> pick_forward() {
#if defined(FF_MLP_HAVE_X86)
  const int isa = cpu_isa_level();
  if (isa == kIsaAvx512) return &avx512::forward_block<T>;
  if (isa == kIsaAvx2) return &avx2::forward_block<T>;
#endif
  return &generic::forward_block<T>;
}

template <typename T>
BwdFn<T> pick_backward() {
#if defined(FF_MLP_HAVE_X86)
  const int isa = cpu_isa_level();
  if (isa == kIsaAvx512) return &avx512::backward_block<T>;
  if (isa == kIsaAvx2) return &avx2::backward_block<T>;
#endif
  return &generic::backward_block<T>;
}

int64_t mul(int64_t a, int64_t b) {
  int64_t r;
  check(!__builtin_mul_overflow(a, b, &r), "mlp_coupling: sizes too large");
  return r;
}
int64_t add(int64_t a, int64_t b) {
  int64_t r;
  check(!__builtin_add_overflow(a, b, &r), "mlp_coupling: sizes too large");
  return r;
}

// Where everything lives in the workspace, in elements (every offset a multiple of 64 bytes).
struct Geometry {
  int64_t L = 0, pe = 0, nblocks = 0, ngroups = 0, nthreads = 0;
  std::vector<int64_t> P, woff, boff, wpoff, hoff, goff, gwoff, gboff, aoff;
  int64_t acts_w = 0, numel = 0, wregion = 0, thread_elems = 0, group_elems = 0, total = 0;
};

Geometry geometry(const char* name, int dtype, int64_t n, const std::vector<int64_t>& sizes,
                  int nthreads) {
  const std::string nm(name);
  check(dtype == kFloat32 || dtype == kFloat64,
        nm + ": dtype must be float32 or float64 (cast 16-bit inputs first)");
  check(n >= 0, nm + ": negative batch size");
  check(nthreads >= 1, nm + ": nthreads must be >= 1");
  check(sizes.size() >= 2 && sizes.size() <= 1025,
        nm + ": sizes must be (in, hidden..., out): 2 to 1025 entries");
  for (int64_t v : sizes) check(v >= 1 && v <= (int64_t(1) << 24), nm + ": sizes must be in [1, 2^24]");
  Geometry g;
  const int64_t L = int64_t(sizes.size()) - 1;
  g.L = L;
  g.pe = dtype == kFloat32 ? 16 : 8;
  g.P.resize(L + 1);
  for (int64_t i = 0; i <= L; ++i) g.P[i] = (sizes[i] + g.pe - 1) / g.pe * g.pe;
  g.woff.resize(L);
  g.boff.resize(L);
  g.wpoff.resize(L);
  g.gwoff.resize(L);
  g.gboff.resize(L);
  int64_t fw = 0, bw = 0, gr = 0, numel = 0;
  for (int64_t l = 0; l < L; ++l) {
    g.woff[l] = fw;
    fw = add(fw, mul(sizes[l], g.P[l + 1]));
    g.boff[l] = fw;
    fw = add(fw, g.P[l + 1]);
    g.wpoff[l] = bw;
    bw = add(bw, mul(sizes[l + 1], g.P[l]));
    g.gwoff[l] = gr;
    gr = add(gr, mul(sizes[l + 1], g.P[l]));
    g.gboff[l] = gr;
    gr = add(gr, g.P[l + 1]);
    numel = add(numel, mul(sizes[l + 1], sizes[l] + 1));
  }
  g.numel = numel;
  g.wregion = std::max(fw, bw);
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
    if (i >= 1) {
      g.aoff[i] = aw;
      aw += sizes[i];
    }
  }
  g.thread_elems = te;
  g.acts_w = aw;
  g.nblocks = (n + kBlock - 1) / kBlock;
  g.ngroups = std::min(g.nblocks, kMaxGroups);
  g.nthreads = std::max<int64_t>(1, std::min<int64_t>(nthreads, g.nblocks));
  g.total = add(add(g.wregion, mul(g.nthreads, g.thread_elems)), mul(g.ngroups, g.group_elems));
  return g;
}

int64_t workspace_bytes(const Geometry& g, int dtype) {
  return add(64, mul(g.total, dtype == kFloat32 ? 4 : 8));
}

// Sizes of one call: the split, the MLP's ends and the scale mode.
struct Split {
  int64_t da, db, a_off, b_off;
};

Split check_call(const char* name, int mode, double clamp, int64_t n, int64_t d, int64_t cut,
                 int parity, int64_t n_ctx, const std::vector<int64_t>& sizes) {
  const std::string nm(name);
  check(mode == kSoftClamp || mode == kGlowSigmoid || mode == kIdentity,
        nm + ": mode must be 0 (softclamp), 1 (glow) or 2 (identity)");
  check(mode != kSoftClamp || (clamp > 0 && std::isfinite(clamp)),
        nm + ": clamp must be finite and > 0");
  check(d >= 2 && d <= (int64_t(1) << 24), nm + ": d must be in [2, 2^24]");
  check(cut >= 1 && cut < d, nm + ": need 0 < cut < d");
  check(parity == 0 || parity == 1, nm + ": parity must be 0 or 1");
  check(n_ctx >= 0 && n_ctx <= (int64_t(1) << 24), nm + ": n_ctx must be in [0, 2^24]");
  Split sp;
  sp.da = parity == 0 ? cut : d - cut;
  sp.db = d - sp.da;
  sp.a_off = parity == 0 ? 0 : cut;
  sp.b_off = parity == 0 ? cut : 0;
  check(sizes.size() >= 2 && sizes.front() == sp.da + n_ctx && sizes.back() == 2 * sp.db,
        nm + ": sizes must run from |x_a| + n_ctx = " + std::to_string(sp.da + n_ctx) +
            " to 2 |x_b| = " + std::to_string(2 * sp.db));
  return sp;
}

template <typename P>
P* ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

template <typename T>
T* aligned_base(std::uintptr_t ws) {
  return ptr<T>((ws + 63) & ~std::uintptr_t(63));
}

// Forward weights: W_l^T [s_l][P_{l+1}] and the bias [P_{l+1}], zero-padded.
template <typename T>
void pack_forward(const Geometry& g, const std::vector<int64_t>& s, const T* params, T* w) {
  int64_t off = 0;
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t in = s[l], out = s[l + 1], po = g.P[l + 1];
    const T* wl = params + off;
    const T* bl = wl + out * in;
    T* wt = w + g.woff[l];
    for (int64_t k = 0; k < in; ++k) {
      T* row = wt + k * po;
      for (int64_t j = 0; j < out; ++j) row[j] = wl[j * in + k];
      for (int64_t j = out; j < po; ++j) row[j] = T(0);
    }
    T* b = w + g.boff[l];
    for (int64_t j = 0; j < out; ++j) b[j] = bl[j];
    for (int64_t j = out; j < po; ++j) b[j] = T(0);
    off += out * (in + 1);
  }
}

// Backward weights: W_l [s_{l+1}][P_l], rows zero-padded.
template <typename T>
void pack_backward(const Geometry& g, const std::vector<int64_t>& s, const T* params, T* w) {
  int64_t off = 0;
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t in = s[l], out = s[l + 1], pi = g.P[l];
    const T* wl = params + off;
    T* wp = w + g.wpoff[l];
    for (int64_t j = 0; j < out; ++j) {
      std::memcpy(wp + j * pi, wl + j * in, sizeof(T) * in);
      for (int64_t k = in; k < pi; ++k) wp[j * pi + k] = T(0);
    }
    off += out * (in + 1);
  }
}

template <typename T>
Plan<T> make_plan(const Geometry& g, const std::vector<int64_t>& sizes, const Split& sp, int mode,
                  double clamp, int64_t n, int64_t d, int64_t n_ctx, const T* w) {
  Plan<T> P{};
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
  P.L = g.L;
  P.s = sizes.data();
  P.P = g.P.data();
  P.w = w;
  P.woff = g.woff.data();
  P.boff = g.boff.data();
  P.hoff = g.hoff.data();
  P.goff = g.goff.data();
  P.gwoff = g.gwoff.data();
  P.gboff = g.gboff.data();
  P.acts_w = g.acts_w;
  P.aoff = g.aoff.data();
  return P;
}

int thread_id() {
#if defined(FF_WITH_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

template <typename T>
void run_forward(const Geometry& g, Plan<T>& P, const T* params, std::uintptr_t workspace,
                 bool inverse) {
  T* base = aligned_base<T>(workspace);
  T* w = base;
  T* threads = base + g.wregion;
  pack_forward<T>(g, std::vector<int64_t>(P.s, P.s + g.L + 1), params, w);
  P.w = w;
  const FwdFn<T> fn = pick_forward<T>();
  const int nt = int(g.nthreads);
  const int64_t n = P.n, nblocks = g.nblocks;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    T* mine = threads + int64_t(thread_id()) * g.thread_elems;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t b0 = blk * kBlock;
      fn(P, b0, std::min<int64_t>(kBlock, n - b0), mine, inverse);
    }
  }
}

template <typename T>
void run_backward(const Geometry& g, Plan<T>& P, const T* params, T* grad_params,
                  std::uintptr_t workspace) {
  T* base = aligned_base<T>(workspace);
  T* w = base;
  T* threads = base + g.wregion;
  T* groups = threads + g.nthreads * g.thread_elems;
  const std::vector<int64_t> sizes(P.s, P.s + g.L + 1);
  pack_backward<T>(g, sizes, params, w);
  P.w = w;
  // rows of the flat gradient: (destination, source in a group buffer, length)
  struct Row {
    int64_t dst, src, len;
  };
  std::vector<Row> rows;
  int64_t off = 0;
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t in = sizes[l], out = sizes[l + 1];
    for (int64_t j = 0; j < out; ++j) rows.push_back({off + j * in, g.gwoff[l] + j * g.P[l], in});
    rows.push_back({off + out * in, g.gboff[l], out});
    off += out * (in + 1);
  }
  const BwdFn<T> fn = pick_backward<T>();
  const int64_t n = P.n, nblocks = g.nblocks, ngroups = g.ngroups;
  const int nt = int(std::min(g.nthreads, ngroups));
  const int64_t nrows = int64_t(rows.size());
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    T* mine = threads + int64_t(thread_id()) * g.thread_elems;
#pragma omp for schedule(static)
    for (int64_t q = 0; q < ngroups; ++q) {
      T* grp = groups + q * g.group_elems;
      const int64_t lo = q * nblocks / ngroups, hi = (q + 1) * nblocks / ngroups;
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t b0 = blk * kBlock;
        fn(P, b0, std::min<int64_t>(kBlock, n - b0), mine, grp, blk == lo);
      }
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < nrows; ++r) {
      const Row rw = rows[r];
      T* dst = grad_params + rw.dst;
      const T* src = groups + rw.src;
      for (int64_t k = 0; k < rw.len; ++k) dst[k] = src[k];
      for (int64_t q = 1; q < ngroups; ++q) {
        const T* sq = src + q * g.group_elems;
        for (int64_t k = 0; k < rw.len; ++k) dst[k] += sq[k];
      }
    }
  }
}

}  // namespace mlp_cpu_detail

using namespace mlp_cpu_detail;

int64_t mlp_coupling_workspace_bytes(int dtype, int64_t n, const std::vector<int64_t>& sizes,
                                     int nthreads) {
  return workspace_bytes(geometry("mlp_coupling_workspace_bytes", dtype, n, sizes, nthreads),
                         dtype);
}

namespace {

void check_workspace(const char* name, const Geometry& g, int dtype, std::uintptr_t workspace,
                     int64_t workspace_bytes_given) {
  check_ptr(workspace, 1, "workspace");
  check(workspace_bytes_given >= workspace_bytes(g, dtype),
        std::string(name) + ": workspace too small (see mlp_coupling_workspace_bytes)");
}

template <typename T>
void forward_impl(const char* name, int dtype, int mode, double clamp, int64_t n, int64_t d,
                  int64_t cut, int parity, int64_t n_ctx, const std::vector<int64_t>& sizes,
                  std::uintptr_t in, std::uintptr_t ctx, std::uintptr_t params, std::uintptr_t out,
                  std::uintptr_t logdet, std::uintptr_t acts, int64_t acts_numel,
                  std::uintptr_t workspace, int64_t workspace_bytes_given, int nthreads,
                  bool inverse) {
  const Split sp = check_call(name, mode, clamp, n, d, cut, parity, n_ctx, sizes);
  const Geometry g = geometry(name, dtype, n, sizes, nthreads);
  check_ptr(params, g.numel, "params");
  if (n == 0) return;
  check_ptr(in, mul(n, d), inverse ? "y" : "x");
  check_ptr(ctx, mul(n, n_ctx), "ctx");
  check_ptr(out, mul(n, d), inverse ? "x" : "y");
  check_ptr(logdet, n, "logdet");
  if (acts != 0)
    check(acts_numel >= mul(n, g.acts_w),
          std::string(name) + ": acts must hold n * sum(sizes[1:]) = " +
              std::to_string(mul(n, g.acts_w)) + " elements");
  check_workspace(name, g, dtype, workspace, workspace_bytes_given);
  Plan<T> P = make_plan<T>(g, sizes, sp, mode, clamp, n, d, n_ctx, nullptr);
  P.in = ptr<const T>(in);
  P.ctx = ptr<const T>(ctx);
  P.out = ptr<T>(out);
  P.logdet = ptr<T>(logdet);
  P.acts = ptr<T>(acts);
  run_forward<T>(g, P, ptr<const T>(params), workspace, inverse);
}

}  // namespace

void mlp_coupling_forward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d,
                              int64_t cut, int parity, int64_t n_ctx,
                              const std::vector<int64_t>& sizes, std::uintptr_t x,
                              std::uintptr_t ctx, std::uintptr_t params, std::uintptr_t y,
                              std::uintptr_t logdet, std::uintptr_t acts, int64_t acts_numel,
                              std::uintptr_t workspace, int64_t workspace_bytes, int nthreads) {
  const char* name = "mlp_coupling_forward_cpu";
  if (dtype == kFloat64)
    forward_impl<double>(name, dtype, mode, clamp, n, d, cut, parity, n_ctx, sizes, x, ctx,
                         params, y, logdet, acts, acts_numel, workspace, workspace_bytes,
                         nthreads, false);
  else
    forward_impl<float>(name, dtype, mode, clamp, n, d, cut, parity, n_ctx, sizes, x, ctx, params,
                        y, logdet, acts, acts_numel, workspace, workspace_bytes, nthreads, false);
}

void mlp_coupling_inverse_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d,
                              int64_t cut, int parity, int64_t n_ctx,
                              const std::vector<int64_t>& sizes, std::uintptr_t y,
                              std::uintptr_t ctx, std::uintptr_t params, std::uintptr_t x,
                              std::uintptr_t logdet, std::uintptr_t workspace,
                              int64_t workspace_bytes, int nthreads) {
  const char* name = "mlp_coupling_inverse_cpu";
  if (dtype == kFloat64)
    forward_impl<double>(name, dtype, mode, clamp, n, d, cut, parity, n_ctx, sizes, y, ctx,
                         params, x, logdet, 0, 0, workspace, workspace_bytes, nthreads, true);
  else
    forward_impl<float>(name, dtype, mode, clamp, n, d, cut, parity, n_ctx, sizes, y, ctx, params,
                        x, logdet, 0, 0, workspace, workspace_bytes, nthreads, true);
}

namespace {

template <typename T>
void backward_impl(int dtype, int mode, double clamp, int64_t n, int64_t d, int64_t cut,
                   int parity, int64_t n_ctx, const std::vector<int64_t>& sizes, std::uintptr_t x,
                   std::uintptr_t ctx, std::uintptr_t params, std::uintptr_t acts,
                   int64_t acts_numel, std::uintptr_t grad_y, std::uintptr_t grad_logdet,
                   std::uintptr_t grad_x, std::uintptr_t grad_ctx, std::uintptr_t grad_params,
                   std::uintptr_t workspace, int64_t workspace_bytes_given, int nthreads) {
  const char* name = "mlp_coupling_backward_cpu";
  const Split sp = check_call(name, mode, clamp, n, d, cut, parity, n_ctx, sizes);
  const Geometry g = geometry(name, dtype, n, sizes, nthreads);
  check_ptr(params, g.numel, "params");
  check_ptr(grad_params, g.numel, "grad_params");
  if (n == 0) {
    T* gp = ptr<T>(grad_params);
    for (int64_t i = 0; i < g.numel; ++i) gp[i] = T(0);
    return;
  }
  check_ptr(x, mul(n, d), "x");
  check_ptr(ctx, mul(n, n_ctx), "ctx");
  check_ptr(acts, mul(n, g.acts_w), "acts");
  check(acts_numel >= mul(n, g.acts_w), std::string(name) +
                                            ": acts must hold n * sum(sizes[1:]) = " +
                                            std::to_string(mul(n, g.acts_w)) + " elements");
  check_ptr(grad_y, mul(n, d), "grad_y");
  check_ptr(grad_logdet, n, "grad_logdet");
  check_ptr(grad_x, mul(n, d), "grad_x");
  check_workspace(name, g, dtype, workspace, workspace_bytes_given);
  Plan<T> P = make_plan<T>(g, sizes, sp, mode, clamp, n, d, n_ctx, nullptr);
  P.in = ptr<const T>(x);
  P.ctx = ptr<const T>(ctx);
  P.acts = ptr<T>(acts);
  P.gy = ptr<const T>(grad_y);
  P.gl = ptr<const T>(grad_logdet);
  P.gx = ptr<T>(grad_x);
  P.gctx = n_ctx > 0 ? ptr<T>(grad_ctx) : nullptr;
  P.woff = g.wpoff.data();  // the backward's weight layout
  run_backward<T>(g, P, ptr<const T>(params), ptr<T>(grad_params), workspace);
}

}  // namespace

void mlp_coupling_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d,
                               int64_t cut, int parity, int64_t n_ctx,
                               const std::vector<int64_t>& sizes, std::uintptr_t x,
                               std::uintptr_t ctx, std::uintptr_t params, std::uintptr_t acts,
                               int64_t acts_numel, std::uintptr_t grad_y,
                               std::uintptr_t grad_logdet, std::uintptr_t grad_x,
                               std::uintptr_t grad_ctx, std::uintptr_t grad_params,
                               std::uintptr_t workspace, int64_t workspace_bytes, int nthreads) {
  if (dtype == kFloat64)
    backward_impl<double>(dtype, mode, clamp, n, d, cut, parity, n_ctx, sizes, x, ctx, params,
                          acts, acts_numel, grad_y, grad_logdet, grad_x, grad_ctx, grad_params,
                          workspace, workspace_bytes, nthreads);
  else
    backward_impl<float>(dtype, mode, clamp, n, d, cut, parity, n_ctx, sizes, x, ctx, params,
                         acts, acts_numel, grad_y, grad_logdet, grad_x, grad_ctx, grad_params,
                         workspace, workspace_bytes, nthreads);
}

}  // namespace ff

#else  // FF_MLP_CPU_BODY: one instruction set's copy of the block functions

#pragma GCC diagnostic ignored "-Wpsabi"

namespace ff {
namespace mlp_cpu_detail {
namespace FF_MLP_ISA {

template <typename V, typename T>
FF_MLP_INLINE V splat(T s) {
  return s + (-V{});  // adding -0.0 is an identity the compiler drops (adding +0.0 is not)
}

template <typename V, typename T>
FF_MLP_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
FF_MLP_INLINE void vstore(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// C[r * ldc + v * W + :W] = epi(init + sum_{p < K} A(r, p) * B[p * ldb + v * W + :W]) for RR rows
// and NVV vectors; A(r, p) = a[r * lda + p], or a[p * lda + r] with AT. Init: zero, the bias
// vector, or what C holds; epilogue: none, relu, or zero where the mask m (C's layout) is <= 0.
template <typename T, int W, int RR, int NVV, int In, int Ep, bool AT>
FF_MLP_INLINE void micro(int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                         int64_t ldc, const T* bias, const T* m) {
  typedef T V __attribute__((vector_size(W * sizeof(T))));
  V acc[RR][NVV];
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NVV; ++v) {
      if (In == kInitZero)
        acc[r][v] = V{} + T(0);
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
      const V av = splat<V>(ar[r][p * ap]);
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
        const V mv = vload<V>(m + r * ldc + v * W);
        o = mv <= V{} ? V{} : o;  // threshold_backward(g, h, 0)
      }
      vstore(c + r * ldc + v * W, o);
    }
}

template <typename T, int W, int RR, int NVV, int In, int Ep, bool AT>
FF_MLP_INLINE void rows_tail(int64_t rem, int64_t K, const T* a, int64_t lda, const T* b,
                             int64_t ldb, T* c, int64_t ldc, const T* bias, const T* m) {
  if constexpr (RR >= 1) {
    if (rem == RR)
      micro<T, W, RR, NVV, In, Ep, AT>(K, a, lda, b, ldb, c, ldc, bias, m);
    else
      rows_tail<T, W, RR - 1, NVV, In, Ep, AT>(rem, K, a, lda, b, ldb, c, ldc, bias, m);
  }
}

// Rows [0, M) with NVV vectors.
template <typename T, int W, int R, int NVV, int In, int Ep, bool AT>
FF_MLP_INLINE void rows_loop(int64_t M, int64_t K, const T* a, int64_t lda, const T* b,
                             int64_t ldb, T* c, int64_t ldc, const T* bias, const T* m) {
  int64_t r = 0;
  for (; r + R <= M; r += R)
    micro<T, W, R, NVV, In, Ep, AT>(K, AT ? a + r : a + r * lda, lda, b, ldb, c + r * ldc, ldc,
                                    bias, Ep == kEpiMask ? m + r * ldc : m);
  if (r < M)
    rows_tail<T, W, R - 1, NVV, In, Ep, AT>(M - r, K, AT ? a + r : a + r * lda, lda, b, ldb,
                                            c + r * ldc, ldc, bias,
                                            Ep == kEpiMask ? m + r * ldc : m);
}

template <typename T, int W, int R, int NVV, int In, int Ep, bool AT>
FF_MLP_INLINE void vec_tail(int64_t rem, int64_t M, int64_t K, const T* a, int64_t lda,
                            const T* b, int64_t ldb, T* c, int64_t ldc, const T* bias,
                            const T* m) {
  if constexpr (NVV >= 1) {
    if (rem == NVV)
      rows_loop<T, W, R, NVV, In, Ep, AT>(M, K, a, lda, b, ldb, c, ldc, bias, m);
    else
      vec_tail<T, W, R, NVV - 1, In, Ep, AT>(rem, M, K, a, lda, b, ldb, c, ldc, bias, m);
  }
}

// C[M][NVEC vectors] as above; the vectors outermost so that B's K x NV panel stays in L1 while
// every row block streams past it.
template <typename T, int W, int R, int NV, int In, int Ep, bool AT>
void gemm(int64_t M, int64_t NVEC, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
          T* c, int64_t ldc, const T* bias, const T* m) {
  int64_t v = 0;
  for (; v + NV <= NVEC; v += NV)
    rows_loop<T, W, R, NV, In, Ep, AT>(M, K, a, lda, b + v * W, ldb, c + v * W, ldc,
                                       In == kInitBias ? bias + v * W : bias,
                                       Ep == kEpiMask ? m + v * W : m);
  if (v < NVEC)
    vec_tail<T, W, R, NV - 1, In, Ep, AT>(NVEC - v, M, K, a, lda, b + v * W, ldb, c + v * W, ldc,
                                          In == kInitBias ? bias + v * W : bias,
                                          Ep == kEpiMask ? m + v * W : m);
}

// H_0 rows [0, mr): [x_a, ctx, 0...] for the nb samples, zero rows after them.
template <typename T>
FF_MLP_INLINE void gather_input(const Plan<T>& P, int64_t b0, int64_t nb, int64_t mr, T* h0) {
  const int64_t p0 = P.P[0], da = P.da, nc = P.nc, s0 = P.s[0];
  for (int64_t s = 0; s < mr; ++s) {
    T* row = h0 + s * p0;
    int64_t k = 0;
    if (s < nb) {
      std::memcpy(row, P.in + (b0 + s) * P.d + P.a_off, sizeof(T) * da);
      if (nc > 0) std::memcpy(row + da, P.ctx + (b0 + s) * nc, sizeof(T) * nc);
      k = s0;
    }
    for (; k < p0; ++k) row[k] = T(0);
  }
}

template <typename T, int Mode>
FF_MLP_INLINE void couple_rows(const Plan<T>& P, int64_t b0, int64_t nb, const T* o, int64_t ldo,
                               bool inverse) {
  const int64_t d = P.d, da = P.da, db = P.db;
  const T c = P.c, inv_c = P.inv_c;
  for (int64_t s = 0; s < nb; ++s) {
    const T* xr = P.in + (b0 + s) * d;
    T* yr = P.out + (b0 + s) * d;
    std::memcpy(yr + P.a_off, xr + P.a_off, sizeof(T) * da);
    const T* xb = xr + P.b_off;
    T* yb = yr + P.b_off;
    const T* raw = o + s * ldo;
    const T* shift = raw + db;
    T acc = T(0);
    if (inverse) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < db; ++j) {
        T v;
        acc += coupling_inverse_elem<Mode, T>(xb[j], raw[j], shift[j], true, c, inv_c, v);
        yb[j] = v;
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < db; ++j) {
        T v;
        acc += coupling_forward_elem<Mode, T>(xb[j], raw[j], shift[j], true, c, inv_c, v);
        yb[j] = v;
      }
    }
    P.logdet[b0 + s] = inverse ? -acc : acc;
  }
}

template <typename T, int W, int NV, int R>
FF_MLP_INLINE void forward_impl(const Plan<T>& P, int64_t b0, int64_t nb, T* tb, bool inverse) {
  const int64_t L = P.L;
  const int64_t mr = (nb + R - 1) / R * R;
  gather_input<T>(P, b0, nb, mr, tb + P.hoff[0]);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t pi = P.P[l], po = P.P[l + 1];
    const int64_t nvec = (P.s[l + 1] + W - 1) / W;
    const T* h = tb + P.hoff[l];
    T* o = tb + P.hoff[l + 1];
    if (l + 1 < L)
      gemm<T, W, R, NV, kInitBias, kEpiRelu, false>(mr, nvec, P.s[l], h, pi, P.w + P.woff[l], po, o,
                                                    po, P.w + P.boff[l], nullptr);
    else
      gemm<T, W, R, NV, kInitBias, kEpiNone, false>(mr, nvec, P.s[l], h, pi, P.w + P.woff[l], po, o,
                                                    po, P.w + P.boff[l], nullptr);
  }
  const T* out = tb + P.hoff[L];
  const int64_t ldo = P.P[L];
  switch (P.mode) {
    case kSoftClamp:
      couple_rows<T, kSoftClamp>(P, b0, nb, out, ldo, inverse);
      break;
    case kGlowSigmoid:
      couple_rows<T, kGlowSigmoid>(P, b0, nb, out, ldo, inverse);
      break;
    default:
      couple_rows<T, kIdentity>(P, b0, nb, out, ldo, inverse);
      break;
  }
  if (P.acts != nullptr) {
    for (int64_t s = 0; s < nb; ++s) {
      T* ar = P.acts + (b0 + s) * P.acts_w;
      for (int64_t i = 1; i <= L; ++i)
        std::memcpy(ar + P.aoff[i], tb + P.hoff[i] + s * P.P[i], sizeof(T) * P.s[i]);
    }
  }
}

// G_L = d loss / d MLP output (raw, shift) for the block, and grad_x_b.
template <typename T, int Mode>
FF_MLP_INLINE void couple_backward_rows(const Plan<T>& P, int64_t b0, int64_t nb, int64_t mr,
                                        T* g) {
  const int64_t d = P.d, db = P.db, L = P.L, pl = P.P[L];
  const T c = P.c, inv_c = P.inv_c;
  for (int64_t s = 0; s < nb; ++s) {
    const T* xb = P.in + (b0 + s) * d + P.b_off;
    const T* gyb = P.gy + (b0 + s) * d + P.b_off;
    T* gxb = P.gx + (b0 + s) * d + P.b_off;
    const T* raw = P.acts + (b0 + s) * P.acts_w + P.aoff[L];
    const T gl = P.gl[b0 + s];
    T* gr = g + s * pl;
#pragma omp simd
    for (int64_t j = 0; j < db; ++j) {
      T a_gx, a_graw;
      coupling_backward_elem<Mode, T>(xb[j], raw[j], gyb[j], gl, true, c, inv_c, a_gx, a_graw);
      gxb[j] = a_gx;
      gr[j] = a_graw;
    }
    std::memcpy(gr + db, gyb, sizeof(T) * db);
    for (int64_t k = 2 * db; k < pl; ++k) gr[k] = T(0);
  }
  for (int64_t s = nb; s < mr; ++s)
    for (int64_t k = 0; k < pl; ++k) g[s * pl + k] = T(0);
}

template <typename T, int W, int NV, int R>
FF_MLP_INLINE void backward_impl(const Plan<T>& P, int64_t b0, int64_t nb, T* tb, T* grp,
                                 bool first) {
  const int64_t L = P.L;
  const int64_t mr = (nb + R - 1) / R * R;
  gather_input<T>(P, b0, nb, mr, tb + P.hoff[0]);
  for (int64_t i = 1; i < L; ++i) {
    const int64_t pi = P.P[i], si = P.s[i];
    T* h = tb + P.hoff[i];
    for (int64_t s = 0; s < mr; ++s) {
      T* row = h + s * pi;
      int64_t k = 0;
      if (s < nb) {
        std::memcpy(row, P.acts + (b0 + s) * P.acts_w + P.aoff[i], sizeof(T) * si);
        k = si;
      }
      for (; k < pi; ++k) row[k] = T(0);
    }
  }
  T* gL = tb + P.goff[L];
  switch (P.mode) {
    case kSoftClamp:
      couple_backward_rows<T, kSoftClamp>(P, b0, nb, mr, gL);
      break;
    case kGlowSigmoid:
      couple_backward_rows<T, kGlowSigmoid>(P, b0, nb, mr, gL);
      break;
    default:
      couple_backward_rows<T, kIdentity>(P, b0, nb, mr, gL);
      break;
  }
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t pi = P.P[l], po = P.P[l + 1], si = P.s[l], so = P.s[l + 1];
    const int64_t nvec_in = (si + W - 1) / W;
    const T* go = tb + P.goff[l + 1];  // d loss / d pre-activation of layer l's outputs
    const T* h = tb + P.hoff[l];
    // weight gradient: dW[j][:] += sum_s go[s][j] h[s][:]
    T* gw = grp + P.gwoff[l];
    if (first)
      gemm<T, W, R, NV, kInitZero, kEpiNone, true>(so, nvec_in, nb, go, po, h, pi, gw, pi, nullptr,
                                                   nullptr);
    else
      gemm<T, W, R, NV, kInitLoad, kEpiNone, true>(so, nvec_in, nb, go, po, h, pi, gw, pi, nullptr,
                                                   nullptr);
    T* gb = grp + P.gboff[l];
    if (first)
      for (int64_t k = 0; k < so; ++k) gb[k] = T(0);
    for (int64_t s = 0; s < nb; ++s) {
      const T* gr = go + s * po;
#pragma omp simd
      for (int64_t k = 0; k < so; ++k) gb[k] += gr[k];
    }
    // input gradient: gi[s][:] = go[s][:] @ W_l (masked by relu for hidden inputs)
    T* gi = tb + P.goff[l];
    const T* wl = P.w + P.woff[l];
    if (l > 0)
      gemm<T, W, R, NV, kInitZero, kEpiMask, false>(mr, nvec_in, so, go, po, wl, pi, gi, pi,
                                                    nullptr, h);
    else
      gemm<T, W, R, NV, kInitZero, kEpiNone, false>(mr, nvec_in, so, go, po, wl, pi, gi, pi,
                                                    nullptr, nullptr);
  }
  const T* g0 = tb + P.goff[0];
  const int64_t p0 = P.P[0], d = P.d, da = P.da, nc = P.nc;
  for (int64_t s = 0; s < nb; ++s) {
    const T* gr = g0 + s * p0;
    const T* gya = P.gy + (b0 + s) * d + P.a_off;
    T* gxa = P.gx + (b0 + s) * d + P.a_off;
#pragma omp simd
    for (int64_t k = 0; k < da; ++k) gxa[k] = gya[k] + gr[k];
    if (P.gctx != nullptr) std::memcpy(P.gctx + (b0 + s) * nc, gr + da, sizeof(T) * nc);
  }
}

// One block of nb <= kBlock samples from b0 with this ISA's vectors; tb: the thread's buffers.
template <typename T>
void forward_block(const Plan<T>& P, int64_t b0, int64_t nb, T* tb, bool inverse) {
  constexpr int W = FF_MLP_VBYTES / int(sizeof(T));
  forward_impl<T, W, FF_MLP_NV, FF_MLP_R>(P, b0, nb, tb, inverse);
}

// grp: the block's weight-gradient group buffer (first: the group's first block, which
// overwrites it).
template <typename T>
void backward_block(const Plan<T>& P, int64_t b0, int64_t nb, T* tb, T* grp, bool first) {
  constexpr int W = FF_MLP_VBYTES / int(sizeof(T));
  backward_impl<T, W, FF_MLP_NV, FF_MLP_R>(P, b0, nb, tb, grp, first);
}

}  // namespace FF_MLP_ISA
}  // namespace mlp_cpu_detail
}  // namespace ff

#endif  // FF_MLP_CPU_BODY
