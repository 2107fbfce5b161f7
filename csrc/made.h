// MADE / MAF kernels: the exact inverse of an affine autoregressive transform in one pass of work
// (DESIGN.md, kernel family 3).
//
// Everything here works in *sorted coordinates*: Python permutes the inputs into their
// autoregressive order (input k has degree k + 1) and sorts every hidden layer's units by degree,
// permuting the rows/columns of the masked weight matrices to match. Then every mask is a prefix:
//   layer 1 unit of degree m reads inputs [0, m),
//   layer l unit of degree m reads the previous layer's units [0, bounds[l-1][m]),
//   output of input k (shift row k, raw-scale row d + k) reads the last layer's [0, bounds[L-1][k]),
// where bounds[l][m] is the number of layer-l units of degree <= m (an int64 [L, d + 1] table).
//
// The walk: units of degree 0 first; then for k = 0 .. d-1: the two output rows of input k (all the
// last-layer units they read are final), x_k = u_k * exp(s) + t, then every hidden unit of degree
// k + 1, layer by layer. Each hidden unit and each output is computed exactly once, reading only
// its mask's prefix: the work of one (mask-sparse) forward pass.
//
// Convention (fastflow/ops/made.py): density direction u = (x - t(x)) * exp(-s(x)), logdet -sum s;
// the walk computes the inverse x = u * exp(s) + t with logdet[n] = +sum_k s[n, k].
#pragma once
#include <cstdint>
#include <vector>

#include "checks.h"
#include "scale.h"
#include "storage.h"

namespace ff {

// Hidden activations. Codes shared with fastflow/ops/made.py (ACTIVATIONS).
enum Activation : int { kRelu = 0, kTanh = 1, kElu = 2 };

// Written so that NaN propagates as in torch (a comparison with NaN is false, so NaN takes the
// `v` branch): relu(NaN) = elu(NaN) = NaN.
template <typename A>
FF_HOST_DEVICE A made_activation(int act, A v) {
  if (act == kRelu) return v < A(0) ? A(0) : v;
  if (act == kTanh) return ff_tanh(v);
  return v < A(0) ? ff_exp(v) - A(1) : v;  // elu, alpha = 1
}

// Samples per block on the CPU: one 128-byte row of the per-thread state per unit.
template <typename T>
constexpr int made_block_samples() {
  return int(128 / sizeof(T));
}

// Scratch the CPU walk needs (per-thread block state), in bytes.
int64_t made_workspace_bytes(int dtype, int64_t d, const std::vector<int64_t>& hidden,
                             int nthreads);

// u, x: [n, d] (sorted coordinates). init: 0 or [n, hidden[0]] added to the first layer's
// pre-activations (the context term). weights[l]: [hidden[l], hidden[l-1]] (hidden[-1] = d), the
// last one [2 d, hidden[L-1]] (rows: d shifts then d raw scales); biases likewise. bounds: the
// [L, d + 1] degree table (host, row-major). logdet: [n] in the accumulation dtype. dtype: fp32
// or fp64 only.
void made_affine_inverse_cpu(int dtype, int act, int mode, double clamp, int64_t n, int64_t d,
                             const std::vector<int64_t>& hidden, std::uintptr_t u,
                             std::uintptr_t init, const std::vector<std::uintptr_t>& weights,
                             const std::vector<std::uintptr_t>& biases,
                             const std::vector<int64_t>& bounds, std::uintptr_t x,
                             std::uintptr_t logdet, std::uintptr_t workspace,
                             int64_t workspace_bytes, int nthreads);

// The spline MADE's inverse (fastflow/ops/made_spline.py) by the same walk: weights/biases the L
// hidden layers only (sorted coordinates); out_weight [d, P, hidden[L-1]] and out_bias [d, P]
// (P = 3 bins - 1: widths, heights, interior derivatives of input k's spline, rows already masked
// and sorted); x_k = rq_spline^-1(u_k) on [-bound, bound] with identity tails, logdet[n] = sum of
// the inverse's log-derivatives (fp32 / fp64 as the dtype). Inference only (no backward). The
// workspace: made_workspace_bytes(dtype, d, hidden + [P], nthreads).
void made_spline_inverse_cpu(int dtype, int act, int64_t n, int64_t d,
                             const std::vector<int64_t>& hidden, int bins, double bound,
                             double min_bin_width, double min_bin_height, double min_derivative,
                             std::uintptr_t u, std::uintptr_t init,
                             const std::vector<std::uintptr_t>& weights,
                             const std::vector<std::uintptr_t>& biases, std::uintptr_t out_weight,
                             std::uintptr_t out_bias, const std::vector<int64_t>& bounds,
                             std::uintptr_t x, std::uintptr_t logdet, std::uintptr_t workspace,
                             int64_t workspace_bytes, int nthreads);

// Hidden layers the CUDA walk supports.
constexpr int kMadeCudaMaxLayers = 8;

#if defined(FF_WITH_CUDA)
// Whether the CUDA walk handles this MADE on the current device: at most kMadeCudaMaxLayers
// hidden layers and one sample's state (d + sum(hidden) values) within the device's opt-in
// shared memory per block.
bool made_cuda_supported(int dtype, int64_t d, const std::vector<int64_t>& hidden);

// Same contract on device pointers; `bounds` (host, checked) and `bounds_dev` (the same table in
// device memory, int64) describe the degrees. The block state
// lives in shared memory (no workspace); one launch walks all degrees on `stream`.
void made_affine_inverse_cuda(int dtype, int act, int mode, double clamp, int64_t n, int64_t d,
                              const std::vector<int64_t>& hidden, std::uintptr_t u,
                              std::uintptr_t init, const std::vector<std::uintptr_t>& weights,
                              const std::vector<std::uintptr_t>& biases,
                              const std::vector<int64_t>& bounds, std::uintptr_t bounds_dev,
                              std::uintptr_t x, std::uintptr_t logdet, std::uintptr_t stream);
#endif

// Shared argument checks (sizes only; pointers are checked by each entry point).
inline void made_check_sizes(const char* name, int act, int mode, double clamp, int64_t n,
                             int64_t d, const std::vector<int64_t>& hidden,
                             const std::vector<std::uintptr_t>& weights,
                             const std::vector<std::uintptr_t>& biases) {
  const std::string nm(name);
  check(n >= 0, nm + ": negative batch size");
  check(d >= 1, nm + ": need at least one feature");
  check(!hidden.empty(), nm + ": need at least one hidden layer");
  for (int64_t h : hidden) check(h >= 1, nm + ": hidden sizes must be >= 1");
  check(weights.size() == hidden.size() + 1, nm + ": need one weight per layer (hidden + output)");
  check(biases.size() == hidden.size() + 1, nm + ": need one bias per layer (hidden + output)");
  check(act == kRelu || act == kTanh || act == kElu, nm + ": unknown activation code");
  check(mode >= kSoftClamp && mode <= kAdditive, nm + ": unknown scale mode");
  check(mode != kSoftClamp || clamp > 0, nm + ": clamp must be > 0");
}

// bounds must be a valid degree table: non-decreasing, every unit of degree <= d - 1.
inline void made_check_bounds(const char* name, int64_t d, const std::vector<int64_t>& hidden,
                              const int64_t* bounds) {
  const std::string nm(name);
  for (size_t l = 0; l < hidden.size(); ++l) {
    const int64_t* b = bounds + l * (d + 1);
    check(b[0] >= 0, nm + ": bounds must be >= 0");
    for (int64_t m = 1; m <= d; ++m) check(b[m] >= b[m - 1], nm + ": bounds must be non-decreasing");
    check(b[d - 1] == hidden[l] && b[d] == hidden[l],
          nm + ": every hidden unit must have a degree <= d - 1 (bounds[l][d-1] == hidden[l])");
  }
}

// Every check the CPU and CUDA entry points share: sizes, options, dtype, the degree table and
// the buffers (the batch's only when the batch is not empty).
inline void made_check_args(const char* name, int dtype, int act, int mode, double clamp,
                            int64_t n, int64_t d, const std::vector<int64_t>& hidden,
                            std::uintptr_t u, std::uintptr_t init,
                            const std::vector<std::uintptr_t>& weights,
                            const std::vector<std::uintptr_t>& biases,
                            const std::vector<int64_t>& bounds, std::uintptr_t x,
                            std::uintptr_t logdet) {
  const std::string nm(name);
  made_check_sizes(name, act, mode, clamp, n, d, hidden, weights, biases);
  check(dtype == kFloat32 || dtype == kFloat64,
        nm + ": dtype must be float32 or float64 (cast 16-bit inputs first)");
  const int64_t L = int64_t(hidden.size());
  check(int64_t(bounds.size()) == L * (d + 1), nm + ": bounds must have L * (d + 1) entries");
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
}

}  // namespace ff
