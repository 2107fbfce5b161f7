// Rational-quadratic spline kernels (Durkan et al. 2019), elementwise, identity tails outside
// [-B, B]. The specification is fastflow/ops/spline.py (reference_rq_spline{,_inverse}).
//
// `n` samples of `m` elements; element e = b * m + i has its own spline from the unnormalised
// parameters widths[e * K .. +K), heights[e * K .. +K), derivatives[e * (K-1) .. +(K-1)) (all
// contiguous). Normalisation (softmax + minimum sizes, softplus derivatives) happens per element
// inside the kernel. `mask` (may be 0) is m bytes broadcast over the batch: where 0 the element
// passes through and adds nothing to the log-det. `logdet`/`grad_logdet` are fp32 (fp64 for
// fp64). `inverse` selects the direction; the backward of the inverse recomputes the root from
// its input y (nothing but the op's inputs is saved).
//   forward:  y = spline(x), logdet[b] = sum_i log dy/dx;  inverse: x = spline^-1(y), -sum log dy/dx
//   backward: from in (x or y), params, grad_out, grad_logdet -> grad_in, grad_widths,
//             grad_heights, grad_derivatives
#pragma once
#include <cmath>
#include <cstdint>
#include <string>

#include "dispatch.h"
#include "fast_math.h"

namespace ff {

// The kernels keep one element's normalised sizes in registers/stack: at most this many bins
// (Python runs the reference above it).
constexpr int kSplineMaxBins = 64;

// Host-side constants of a call (computed in double, as the reference's Python scalars are).
struct SplineConsts {
  double bound;      // B
  double two_bound;  // 2 B
  double min_w, scale_w;  // frac = min_w + scale_w * softmax, scale_w = 1 - K min_w
  double min_h, scale_h;
  double min_d, shift_d;  // d = min_d + softplus(raw + shift_d), shift_d = log(expm1(1 - min_d))
};

inline SplineConsts spline_consts(int k, double bound, double min_w, double min_h,
                                  double min_d) {
  return SplineConsts{bound,        2 * bound, min_w, 1 - min_w * k, min_h, 1 - min_h * k,
                      min_d,        std::log(std::expm1(1 - min_d))};
}

void rq_spline_cpu(int dtype, int64_t n, int64_t m, int bins, double bound, double min_bin_width,
                   double min_bin_height, double min_derivative, bool inverse, std::uintptr_t in,
                   std::uintptr_t widths, std::uintptr_t heights, std::uintptr_t derivatives,
                   std::uintptr_t mask, std::uintptr_t out, std::uintptr_t logdet, int nthreads);
void rq_spline_backward_cpu(int dtype, int64_t n, int64_t m, int bins, double bound,
                            double min_bin_width, double min_bin_height, double min_derivative,
                            bool inverse, std::uintptr_t in, std::uintptr_t widths,
                            std::uintptr_t heights, std::uintptr_t derivatives,
                            std::uintptr_t mask, std::uintptr_t grad_out,
                            std::uintptr_t grad_logdet, std::uintptr_t grad_in,
                            std::uintptr_t grad_widths, std::uintptr_t grad_heights,
                            std::uintptr_t grad_derivatives, int nthreads);
#if defined(FF_WITH_CUDA)
void rq_spline_cuda(int dtype, int64_t n, int64_t m, int bins, double bound,
                    double min_bin_width, double min_bin_height, double min_derivative,
                    bool inverse, std::uintptr_t in, std::uintptr_t widths,
                    std::uintptr_t heights, std::uintptr_t derivatives, std::uintptr_t mask,
                    std::uintptr_t out, std::uintptr_t logdet, std::uintptr_t stream);
void rq_spline_backward_cuda(int dtype, int64_t n, int64_t m, int bins, double bound,
                             double min_bin_width, double min_bin_height, double min_derivative,
                             bool inverse, std::uintptr_t in, std::uintptr_t widths,
                             std::uintptr_t heights, std::uintptr_t derivatives,
                             std::uintptr_t mask, std::uintptr_t grad_out,
                             std::uintptr_t grad_logdet, std::uintptr_t grad_in,
                             std::uintptr_t grad_widths, std::uintptr_t grad_heights,
                             std::uintptr_t grad_derivatives, std::uintptr_t stream);
#endif

// ---------------------------------------------------------------------------------------------
// Argument checks shared by the CPU and CUDA entry points.

inline void check_spline_options_native(const char* name, int64_t n, int64_t m, int bins,
                                        double bound, double min_w, double min_h,
                                        double min_d) {
  FF_CHECK(n >= 0 && m >= 0, std::string(name) + ": negative size");
  FF_CHECK(bins >= 1 && bins <= kSplineMaxBins,
           std::string(name) + ": bins must be in [1, " + std::to_string(kSplineMaxBins) + "]");
  FF_CHECK(bound > 0 && std::isfinite(bound), std::string(name) + ": bound must be > 0");
  FF_CHECK(min_w >= 0 && min_w * bins < 1,
           std::string(name) + ": min_bin_width must be in [0, 1 / bins)");
  FF_CHECK(min_h >= 0 && min_h * bins < 1,
           std::string(name) + ": min_bin_height must be in [0, 1 / bins)");
  FF_CHECK(min_d > 0 && min_d < 1, std::string(name) + ": min_derivative must be in (0, 1)");
}

inline void check_spline(const char* name, int64_t n, int64_t m, int bins, double bound,
                         double min_w, double min_h, double min_d, std::uintptr_t in,
                         std::uintptr_t widths, std::uintptr_t heights,
                         std::uintptr_t derivatives, std::uintptr_t out,
                         std::uintptr_t logdet) {
  check_spline_options_native(name, n, m, bins, bound, min_w, min_h, min_d);
  const int64_t e = n * m;
  check_ptr(in, e, "in");
  check_ptr(widths, e * bins, "widths");
  check_ptr(heights, e * bins, "heights");
  check_ptr(derivatives, e * (bins - 1), "derivatives");
  check_ptr(out, e, "out");
  check_ptr(logdet, n, "logdet");
}

inline void check_spline_backward(const char* name, int64_t n, int64_t m, int bins, double bound,
                                  double min_w, double min_h, double min_d, std::uintptr_t in,
                                  std::uintptr_t widths, std::uintptr_t heights,
                                  std::uintptr_t derivatives, std::uintptr_t grad_out,
                                  std::uintptr_t grad_logdet, std::uintptr_t grad_in,
                                  std::uintptr_t grad_widths, std::uintptr_t grad_heights,
                                  std::uintptr_t grad_derivatives) {
  check_spline(name, n, m, bins, bound, min_w, min_h, min_d, in, widths, heights, derivatives,
               grad_out, grad_logdet);
  const int64_t e = n * m;
  check_ptr(grad_in, e, "grad_in");
  check_ptr(grad_widths, e * bins, "grad_widths");
  check_ptr(grad_heights, e * bins, "grad_heights");
  check_ptr(grad_derivatives, e * (bins - 1), "grad_derivatives");
}

// ---------------------------------------------------------------------------------------------
// Per-element math shared by the CPU and CUDA kernels. `A` is the compute type (fp32, or fp64).

// softplus as torch computes it (beta 1, threshold 20) and its derivative
template <typename A>
FF_HOST_DEVICE A spline_softplus(A v) {
  return v > A(20) ? v : ff_log1p(ff_exp(v));
}
template <typename A>
FF_HOST_DEVICE A spline_softplus_grad(A v) {
  const A z = ff_exp(v);
  return v > A(20) ? A(1) : z / (z + A(1));
}

// Normalised fractions of one element's K raw sizes into p[] (the softmax, kept for the
// backward) and returns nothing; p[i] = exp(raw_i - max) / sum.
template <typename T, typename A>
FF_HOST_DEVICE void spline_softmax(const T* raw, int k, A* p) {
  A mx = load(raw[0]);
  for (int i = 1; i < k; ++i) {
    const A v = load(raw[i]);
    mx = v > mx ? v : mx;
  }
  A sum = 0;
  for (int i = 0; i < k; ++i) {
    p[i] = ff_exp(load(raw[i]) - mx);
    sum += p[i];
  }
  const A inv = A(1) / sum;
  for (int i = 0; i < k; ++i) p[i] = p[i] * inv;
}

// Knot j of the table from softmax p: -B, -B + 2B cumsum(frac)[j-1] (j = 1..K-1), B.
// Bin search as the reference: idx = the number of interior knots <= v (v in [-B, B]), so a
// value on a knot belongs to the bin on its right. Returns idx and the knots at idx, idx + 1.
template <typename A>
FF_HOST_DEVICE int spline_find_bin(const A* p, int k, A min_f, A scale_f, A two_b, A b, A v,
                                   A& lo, A& hi) {
  A cum = 0;
  int idx = 0;
  lo = -b;
  hi = b;
  for (int j = 1; j < k; ++j) {
    cum += min_f + scale_f * p[j - 1];
    const A knot = two_b * cum - b;
    const bool ge = v >= knot;
    hi = (!ge && j == idx + 1) ? knot : hi;
    lo = ge ? knot : lo;
    idx = ge ? j : idx;
  }
  return idx;
}

// The knots at idx and idx + 1 of a table (no search).
template <typename A>
FF_HOST_DEVICE void spline_knots_at(const A* p, int k, A min_f, A scale_f, A two_b, A b, int idx,
                                    A& lo, A& hi) {
  A cum = 0;
  lo = -b;
  hi = b;
  for (int j = 1; j < k; ++j) {
    cum += min_f + scale_f * p[j - 1];
    const A knot = two_b * cum - b;
    lo = j == idx ? knot : lo;
    hi = j == idx + 1 ? knot : hi;
  }
}

// Knot derivative j of the table (1 at both ends).
template <typename T, typename A>
FF_HOST_DEVICE A spline_knot_derivative(const T* raw_d, int k, int j, A min_d, A shift_d) {
  return (j == 0 || j == k) ? A(1) : min_d + spline_softplus(load(raw_d[j - 1]) + shift_d);
}

FF_HOST_DEVICE float spline_sqrt(float v) { return sqrtf(v); }
FF_HOST_DEVICE double spline_sqrt(double v) { return sqrt(v); }

// y and log dy/dx of a bin at theta.
template <typename A>
FF_HOST_DEVICE A spline_bin_forward(A theta, A yk, A h, A s, A d0, A d1, A& lad) {
  const A t1 = theta * (A(1) - theta);
  const A denom = s + (d1 + d0 - A(2) * s) * t1;
  const A y = yk + h * (s * theta * theta + d0 * t1) / denom;
  const A num =
      d1 * theta * theta + A(2) * s * t1 + d0 * (A(1) - theta) * (A(1) - theta);
  // log(s^2 num / denom^2) with one log (s, num, denom are bounded away from 0 and inf by the
  // minimum bin sizes and derivatives)
  const A r = s / denom;
  lad = ff_log(r * r * num);
  return y;
}

// The stable root theta in [0, 1] of the bin's quadratic for dy = y - y_k (reference's form).
template <typename A>
FF_HOST_DEVICE A spline_bin_root(A dy, A h, A s, A d0, A d1) {
  const A e = d1 + d0 - A(2) * s;
  const A a = h * (s - d0) + dy * e;
  const A bq = h * d0 - dy * e;
  const A c = -s * dy;
  A disc = bq * bq - A(4) * a * c;
  disc = disc > A(0) ? disc : A(0);
  A t = A(2) * c / (-bq - spline_sqrt(disc));
  t = t > A(0) ? t : A(0);  // also maps NaN (0 / 0) to 0
  return t < A(1) ? t : A(1);
}

// Reverse mode of spline_bin_forward with theta and s as independent inputs: given gy = dL/dy,
// gl = dL/dlad, accumulates dL/dtheta, dL/dh (explicit), dL/ds, dL/dd0, dL/dd1 (dL/dyk = gy).
template <typename A>
FF_HOST_DEVICE void spline_bin_vjp(A theta, A h, A s, A d0, A d1, A gy, A gl, A& g_theta, A& g_h,
                                   A& g_s, A& g_d0, A& g_d1) {
  const A t1 = theta * (A(1) - theta);
  const A e = d1 + d0 - A(2) * s;
  const A D = s + e * t1;
  const A N = s * theta * theta + d0 * t1;
  const A om = A(1) - theta;
  const A num = d1 * theta * theta + A(2) * s * t1 + d0 * om * om;
  const A inv_d = A(1) / D;
  const A g_N = gy * h * inv_d;
  const A g_D = -gy * h * N * inv_d * inv_d - A(2) * gl * inv_d;
  const A g_num = gl / num;
  g_h = gy * N * inv_d;
  A gs = A(2) * gl / s + g_N * theta * theta + g_D;
  A gt = g_N * A(2) * s * theta;
  A gd0 = g_N * t1;
  A g_t1 = g_N * d0 + g_D * e;
  const A g_e = g_D * t1;
  A gd1 = g_e;
  gd0 += g_e;
  gs -= A(2) * g_e;
  gd1 += g_num * theta * theta;
  gd0 += g_num * om * om;
  gt += g_num * (A(2) * d1 * theta - A(2) * d0 * om);
  gs += g_num * A(2) * t1;
  g_t1 += g_num * A(2) * s;
  gt += g_t1 * (A(1) - A(2) * theta);
  g_theta = gt;
  g_s = gs;
  g_d0 = gd0;
  g_d1 = gd1;
}

// d lad / d theta of a bin (for the inverse's implicit rule).
template <typename A>
FF_HOST_DEVICE A spline_bin_dlad_dtheta(A theta, A s, A d0, A d1) {
  const A t1 = theta * (A(1) - theta);
  const A e = d1 + d0 - A(2) * s;
  const A D = s + e * t1;
  const A om = A(1) - theta;
  const A num = d1 * theta * theta + A(2) * s * t1 + d0 * om * om;
  const A dnum = A(2) * d1 * theta - A(2) * d0 * om + A(2) * s * (A(1) - A(2) * theta);
  return dnum / num - A(2) * e * (A(1) - A(2) * theta) / D;
}

// Softmax-table backward: the knots at idx (gradient g_lo) and idx + 1 (g_hi) -> raw grads.
template <typename A, typename T>
FF_HOST_DEVICE void spline_table_backward(const A* p, int k, A scale_f, A two_b, int idx, A g_lo,
                                          A g_hi, T* g_raw) {
  // knot j (1..K-1) = -B + 2B sum_{i<j} frac_i: d knot_j / d p_i = 2B scale_f for i < j
  const A c_lo = idx >= 1 ? two_b * scale_f * g_lo : A(0);
  const A c_hi = idx + 1 <= k - 1 ? two_b * scale_f * g_hi : A(0);
  A dot = 0;
  for (int i = 0; i < k; ++i) {
    const A gp = (i < idx ? c_lo : A(0)) + (i <= idx ? c_hi : A(0));
    dot += p[i] * gp;
  }
  for (int i = 0; i < k; ++i) {
    const A gp = (i < idx ? c_lo : A(0)) + (i <= idx ? c_hi : A(0));
    g_raw[i] = store<T>(p[i] * (gp - dot));
  }
}

// One element, forward (Inverse = false) or inverse: returns out and adds the log-det term.
template <bool Inverse, typename T, typename A>
FF_HOST_DEVICE A spline_elem(A v, const T* rw, const T* rh, const T* rd, int k,
                             const SplineConsts& cs, bool mk, A* pw, A* ph, A& lad_out) {
  const A b = A(cs.bound);
  lad_out = A(0);
  if (!mk || !(v >= -b && v <= b)) return v;
  const A two_b = A(cs.two_bound);
  spline_softmax(rw, k, pw);
  spline_softmax(rh, k, ph);
  A xk, xk1, yk, yk1;
  int idx;
  if (Inverse) {
    idx = spline_find_bin(ph, k, A(cs.min_h), A(cs.scale_h), two_b, b, v, yk, yk1);
    spline_knots_at(pw, k, A(cs.min_w), A(cs.scale_w), two_b, b, idx, xk, xk1);
  } else {
    idx = spline_find_bin(pw, k, A(cs.min_w), A(cs.scale_w), two_b, b, v, xk, xk1);
    spline_knots_at(ph, k, A(cs.min_h), A(cs.scale_h), two_b, b, idx, yk, yk1);
  }
  const A w = xk1 - xk, h = yk1 - yk, s = h / w;
  const A d0 = spline_knot_derivative(rd, k, idx, A(cs.min_d), A(cs.shift_d));
  const A d1 = spline_knot_derivative(rd, k, idx + 1, A(cs.min_d), A(cs.shift_d));
  A lad;
  if (Inverse) {
    const A theta = spline_bin_root(v - yk, h, s, d0, d1);
    spline_bin_forward(theta, yk, h, s, d0, d1, lad);
    lad_out = -lad;
    return xk + theta * w;
  }
  A theta = (v - xk) / w;
  theta = theta < A(0) ? A(0) : (theta > A(1) ? A(1) : theta);
  const A y = spline_bin_forward(theta, yk, h, s, d0, d1, lad);
  lad_out = lad;
  return y;
}

// One element's backward: writes grad_in (returned) and the element's K + K + K-1 raw grads.
template <bool Inverse, typename T, typename A>
FF_HOST_DEVICE A spline_elem_backward(A v, const T* rw, const T* rh, const T* rd, int k,
                                      const SplineConsts& cs, bool mk, A g_out, A gl, A* pw,
                                      A* ph, T* gw, T* gh, T* gd) {
  const A b = A(cs.bound);
  if (!mk || !(v >= -b && v <= b)) {
    for (int i = 0; i < k; ++i) gw[i] = store<T>(A(0));
    for (int i = 0; i < k; ++i) gh[i] = store<T>(A(0));
    for (int i = 0; i < k - 1; ++i) gd[i] = store<T>(A(0));
    return g_out;
  }
  const A two_b = A(cs.two_bound);
  spline_softmax(rw, k, pw);
  spline_softmax(rh, k, ph);
  A xk, xk1, yk, yk1;
  int idx;
  if (Inverse) {
    idx = spline_find_bin(ph, k, A(cs.min_h), A(cs.scale_h), two_b, b, v, yk, yk1);
    spline_knots_at(pw, k, A(cs.min_w), A(cs.scale_w), two_b, b, idx, xk, xk1);
  } else {
    idx = spline_find_bin(pw, k, A(cs.min_w), A(cs.scale_w), two_b, b, v, xk, xk1);
    spline_knots_at(ph, k, A(cs.min_h), A(cs.scale_h), two_b, b, idx, yk, yk1);
  }
  const A w = xk1 - xk, h = yk1 - yk, s = h / w;
  const A md = A(cs.min_d), sd = A(cs.shift_d);
  const A d0 = spline_knot_derivative(rd, k, idx, md, sd);
  const A d1 = spline_knot_derivative(rd, k, idx + 1, md, sd);
  A g_theta, g_h, g_s, g_d0, g_d1, g_in, g_xk, g_w, g_yk;
  if (Inverse) {
    const A theta = spline_bin_root(v - yk, h, s, d0, d1);
    // x = xk + theta w, lad_inv = -lad(theta); theta from F(theta) = y (implicit rule)
    const A t1 = theta * (A(1) - theta);
    const A om = A(1) - theta;
    const A D = s + (d1 + d0 - A(2) * s) * t1;
    const A num = d1 * theta * theta + A(2) * s * t1 + d0 * om * om;
    const A f_theta = h * s * num / (D * D);  // dy/dtheta > 0
    const A g_th_total = g_out * w - gl * spline_bin_dlad_dtheta(theta, s, d0, d1);
    const A lam = g_th_total / f_theta;
    spline_bin_vjp(theta, h, s, d0, d1, -lam, -gl, g_theta, g_h, g_s, g_d0, g_d1);
    g_in = lam;
    g_yk = -lam;
    g_xk = g_out;
    g_w = g_out * theta - g_s * s / w;
    g_h += g_s / w;
  } else {
    A theta = (v - xk) / w;
    theta = theta < A(0) ? A(0) : (theta > A(1) ? A(1) : theta);
    spline_bin_vjp(theta, h, s, d0, d1, g_out, gl, g_theta, g_h, g_s, g_d0, g_d1);
    g_in = g_theta / w;
    g_yk = g_out;
    g_xk = -g_theta / w;
    g_w = -g_s * s / w - g_theta * theta / w;
    g_h += g_s / w;
  }
  // w = xk1 - xk, h = yk1 - yk
  spline_table_backward(pw, k, A(cs.scale_w), two_b, idx, g_xk - g_w, g_w, gw);
  spline_table_backward(ph, k, A(cs.scale_h), two_b, idx, g_yk - g_h, g_h, gh);
  for (int i = 0; i < k - 1; ++i) gd[i] = store<T>(A(0));
  // interior knot j has raw derivative j - 1; the bin's ends are knots idx and idx + 1
  if (idx >= 1) gd[idx - 1] = store<T>(g_d0 * spline_softplus_grad(load(rd[idx - 1]) + sd));
  if (idx + 1 <= k - 1) gd[idx] = store<T>(g_d1 * spline_softplus_grad(load(rd[idx]) + sd));
  return g_in;
}

}  // namespace ff
