// The coupling scale functions s = scale_fn(raw), shared by the coupling, MADE and MLP coupling
// kernels (CPU and CUDA). Codes shared with fastflow/ops/coupling.py (SCALE_FNS; exported as
// _C.SCALE_MODES).
#pragma once

#include "fast_math.h"

namespace ff {

enum ScaleMode : int { kSoftClamp = 0, kGlowSigmoid = 1, kIdentity = 2, kAdditive = 3 };

// Kernel-internal mode, never a user's: the soft clamp given t = soft_clamp_tanh(raw) in place of
// raw. The CPU coupling loops compute t for a tile of elements in a loop of their own, then the
// rest from it: two short dependency chains (tanh, then exp) instead of one long one let the core
// overlap more elements (~1.3x on the coupling op's fp32 forward). The same operations; the
// compiler may contract them differently (a last-bit difference), and a sample's log-det is summed
// tile by tile. The MLP coupling / MADE kernels (mlp_cpu.cpp) keep t in their stored activations,
// so their backward runs this mode and computes no tanh.
constexpr int kSoftClampTanh = 16;
// The same for a bound c <= kInRangeClamp: |s| <= c keeps exp(s) in ff_exp_in_range's range, so
// its overflow/underflow handling is skipped (the same bits; a shorter chain again).
constexpr int kSoftClampTanhInRange = 17;
constexpr double kInRangeClamp = 87.0;

template <typename A>
FF_HOST_DEVICE A soft_clamp_tanh(A raw, A inv_c) {
  return ff_tanh(raw * inv_c);
}

// Returns s and writes exp(s) and ds/draw. `c` is the soft-clamp bound.
template <int Mode, typename A>
FF_HOST_DEVICE A scale_fn(A raw, A c, A inv_c, A& exp_s, A& ds) {
  if (Mode == kSoftClamp) {
    return scale_fn<kSoftClampTanh, A>(soft_clamp_tanh(raw, inv_c), c, inv_c, exp_s, ds);
  } else if (Mode == kSoftClampTanh || Mode == kSoftClampTanhInRange) {
    const A t = raw;
    A s = c * t;
    exp_s = Mode == kSoftClampTanhInRange ? ff_exp_in_range(s) : ff_exp(s);
    ds = A(1) - t * t;
    return s;
  } else if (Mode == kGlowSigmoid) {
    // s = log sigmoid(a) = -softplus(-a) = -(max(-a, 0) + log1p(exp(-|a|))), a = raw + 2
    A a = raw + A(2);
    A ea = ff_exp(a < A(0) ? a : -a);  // in (0, 1]
    A u = A(1) + ea;
    A inv = A(1) / u;
    // log1p(ea) = log(u) + (ea - (u - 1)) / u: the second term corrects the rounding of u, so
    // the one division serves both log1p and the sigmoid
    A sp = (a < A(0) ? -a : A(0)) + (ff_log(u) + (ea - (u - A(1))) * inv);
    A s = -sp;
    // sigmoid(a) and 1 - sigmoid(a), both from exp(-|a|) without overflow
    A sig = a >= A(0) ? inv : ea * inv;
    exp_s = sig;
    ds = a >= A(0) ? ea * inv : inv;
    return s;
  } else if (Mode == kIdentity) {
    exp_s = ff_exp(raw);
    ds = A(1);
    return raw;
  } else {
    exp_s = A(1);
    ds = A(0);
    return A(0);
  }
}

}  // namespace ff
