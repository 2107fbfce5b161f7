// A whole vector coupling layer in one call each way: ReLU MLP conditioner + affine coupling
// (fastflow/ops/mlp_coupling.py; DESIGN.md, "Fuse where the time is").
//
// x [n, d] splits at `cut`: parity 0: x_a = x[:, :cut], x_b = x[:, cut:]; parity 1: x_a =
// x[:, cut:], x_b = x[:, :cut]. The MLP `sizes` = (in, hidden..., out) reads [x_a, ctx]
// (in = |x_a| + n_ctx, out = 2 |x_b|); its flat parameter vector holds per layer the row-major
// [out, in] weight then the bias (mlp_layout). Hidden activations are ReLU; the output is
// (raw, shift), raw = out[:, :db], shift = out[:, db:], s = scale_fn(raw) (common.h):
//   forward:  y_a = x_a, y_b = x_b * exp(s) + shift, logdet[n] = sum s
//   inverse:  x_a = y_a, x_b = (y_b - shift) * exp(-s), logdet[n] = -sum s
// acts [rows, cols] = mlp_coupling_acts_shape(...): row b holds sample b's hidden activations,
// layer by layer, then the MLP output (raw, shift); layer i (1 <= i <= L = len(sizes) - 1) at
// columns [off_i, off_i + sizes[i]), off_i = sum of pad(sizes[j]) over the kept layers 1 <= j < i,
// pad = rounded up to 64 bytes (the gaps hold zeros), and rows = n rounded up to a multiple of 12
// (the last rows are scratch). Every layer is kept except the first hidden one when its input is
// narrow (4 sizes[0] <= sizes[1], at least one hidden layer): the backward recomputes it from the
// input instead (mlp_coupling_acts_columns gives -1 for it). The forward computes the kept layers
// in place there (acts may be 0: inference) and the backward reads them there; with the soft clamp
// the forward leaves t = tanh(raw / c) in the raw columns of the output (all the backward needs:
// it computes no tanh).
// logdet / grad_logdet are in the dtype (fp32 or fp64: no 16-bit here). Every buffer is
// contiguous. The workspace holds mlp_coupling_workspace_bytes(...) bytes (any alignment).
// Results do not depend on nthreads: weight gradients are summed per fixed group of samples
// (which depends on n only), then over the groups in a fixed order.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "checks.h"

namespace ff {

// acts layout constants (exported as _C.MLP_ACTS_ROW_ALIGN_BYTES and _C.MLP_ACTS_ROW_QUANTUM):
// each layer's columns padded to 64 bytes, rows rounded up to a multiple of 12.
constexpr int64_t kMlpRowAlignBytes = 64;
constexpr int64_t kMlpRowQuantum = 12;

int64_t mlp_coupling_workspace_bytes(int dtype, int64_t n, const std::vector<int64_t>& sizes,
                                     int nthreads);
// (rows, cols) of acts.
std::pair<int64_t, int64_t> mlp_coupling_acts_shape(int dtype, int64_t n,
                                                    const std::vector<int64_t>& sizes);
// The column offset in acts of each layer's outputs (layers 1..L), -1 for a layer not kept (the
// first hidden layer when the backward recomputes it).
std::vector<int64_t> mlp_coupling_acts_columns(int dtype, const std::vector<int64_t>& sizes);

void mlp_coupling_forward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d, int64_t cut,
                              int parity, int64_t n_ctx, const std::vector<int64_t>& sizes,
                              std::uintptr_t x, std::uintptr_t ctx, std::uintptr_t params,
                              std::uintptr_t y, std::uintptr_t logdet, std::uintptr_t acts,
                              int64_t acts_numel, std::uintptr_t workspace, int64_t workspace_bytes,
                              int nthreads);

// grad_ctx may be 0 (not wanted) even with a context.
void mlp_coupling_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d, int64_t cut,
                               int parity, int64_t n_ctx, const std::vector<int64_t>& sizes,
                               std::uintptr_t x, std::uintptr_t ctx, std::uintptr_t params,
                               std::uintptr_t acts, int64_t acts_numel, std::uintptr_t grad_y,
                               std::uintptr_t grad_logdet, std::uintptr_t grad_x,
                               std::uintptr_t grad_ctx, std::uintptr_t grad_params,
                               std::uintptr_t workspace, int64_t workspace_bytes, int nthreads);

void mlp_coupling_inverse_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d, int64_t cut,
                              int parity, int64_t n_ctx, const std::vector<int64_t>& sizes,
                              std::uintptr_t y, std::uintptr_t ctx, std::uintptr_t params,
                              std::uintptr_t x, std::uintptr_t logdet, std::uintptr_t workspace,
                              int64_t workspace_bytes, int nthreads);

// The density direction of an affine MADE layer (MAF; fastflow/ops/made_density.py) on the same
// machinery: the MLP `sizes` = (d, hidden..., 2 d) reads all of x [n, d] (its weights already
// multiplied by their masks: the caller applies them) and outputs (shift, raw), shift = out[:, :d],
// raw = out[:, d:]; u = (x - shift) * exp(-s), logdet[n] = -sum s. acts and the workspace as for
// the coupling (mlp_coupling_acts_shape / _workspace_bytes of the same sizes). No context.
void made_density_forward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d,
                              const std::vector<int64_t>& sizes, std::uintptr_t x,
                              std::uintptr_t params, std::uintptr_t u, std::uintptr_t logdet,
                              std::uintptr_t acts, int64_t acts_numel, std::uintptr_t workspace,
                              int64_t workspace_bytes, int nthreads);

// grad_params: the gradient with respect to the (masked) flat parameters given.
void made_density_backward_cpu(int dtype, int mode, double clamp, int64_t n, int64_t d,
                               const std::vector<int64_t>& sizes, std::uintptr_t x,
                               std::uintptr_t params, std::uintptr_t acts, int64_t acts_numel,
                               std::uintptr_t grad_u, std::uintptr_t grad_logdet,
                               std::uintptr_t grad_x, std::uintptr_t grad_params,
                               std::uintptr_t workspace, int64_t workspace_bytes, int nthreads);

}  // namespace ff
