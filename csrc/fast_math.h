// Elementary functions for the kernels. fp64 and device code use the accurate library versions.
// Host fp32 uses branch-free Cephes-style polynomials (a few ulp; see
// test_fast_fp32_math_is_accurate_over_a_wide_range) so that loops over them vectorize: glibc's
// scalar expf/tanhf would make the fused kernels slower than torch's vectorized (Sleef) ops.
#pragma once

#include <cmath>
#include <cstdint>

#include "storage.h"

namespace ff {

FF_HOST_DEVICE double ff_exp(double x) { return exp(x); }
FF_HOST_DEVICE double ff_exp_in_range(double x) { return exp(x); }
FF_HOST_DEVICE double ff_tanh(double x) { return tanh(x); }
FF_HOST_DEVICE double ff_log1p(double x) { return log1p(x); }
FF_HOST_DEVICE double ff_log(double x) { return log(x); }

#if defined(__CUDA_ARCH__)
FF_HOST_DEVICE float ff_exp(float x) { return expf(x); }
FF_HOST_DEVICE float ff_exp_in_range(float x) { return expf(x); }
FF_HOST_DEVICE float ff_tanh(float x) { return tanhf(x); }
FF_HOST_DEVICE float ff_log1p(float x) { return log1pf(x); }
FF_HOST_DEVICE float ff_log(float x) { return logf(x); }
#else
// exp(xc) for xc in [-87.3365478515625, 88.3762626647949] (not NaN): ff_exp without its range
// handling, for callers whose argument is in range by construction (ff_tanh's exp(2 |x|)).
FF_HOST_DEVICE float ff_exp_in_range(float xc) {
  // exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2]
  // round to nearest with the 1.5 * 2^23 trick: branch-free where floorf is a libm call
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  float y = p * r * r + r + 1.0f;
  int32_t e = int32_t(n) + 127;
  return y * bits_to_float(uint32_t(e) << 23);
}

FF_HOST_DEVICE float ff_exp(float x) {
  float xc = x > 88.3762626647949f ? 88.3762626647949f : x;
  xc = xc < -87.3365478515625f ? -87.3365478515625f : xc;
  float y = ff_exp_in_range(xc);
  y = x > 88.72283935546875f ? INFINITY : y;
  y = x < -103.972084045410f ? 0.0f : y;
  return x != x ? x : y;
}

FF_HOST_DEVICE float ff_log(float x) {
  // for x > 0 finite and normal (callers guarantee it)
  uint32_t u = float_to_bits(x);
  float e = float(int32_t((u >> 23) & 0xffu) - 126);
  float m = bits_to_float((u & 0x7fffffu) | 0x3f000000u);  // [0.5, 1)
  bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  float z = m * m;
  float y = 7.0376836292E-2f;
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

FF_HOST_DEVICE float ff_log1p(float x) {
  // for x in [0, inf): log(1 + x) corrected for the rounding of 1 + x (Goldberg's trick)
  float u = 1.0f + x;
  float lu = ff_log(u);
  float r = lu * (x / (u - 1.0f));
  r = u == 1.0f ? x : r;
  return x == INFINITY ? x : r;
}

FF_HOST_DEVICE float ff_tanh(float x) {
  float ax = fabsf(x);
  // small |x|: odd polynomial (Cephes tanhf); large: 1 - 2 / (exp(2|x|) + 1)
  float z = x * x;
  float p = -5.70498872745E-3f;
  p = p * z + 2.06390887954E-2f;
  p = p * z - 5.37397155531E-2f;
  p = p * z + 1.33314422036E-1f;
  p = p * z - 3.33332819422E-1f;
  float small = p * z * x + x;
  // 2 |x| in [0, 80] (NaN: the result is replaced below)
  float e = ff_exp_in_range(2.0f * (ax > 40.0f ? 40.0f : ax));
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = x < 0.0f ? -big : big;
  float r = ax < 0.625f ? small : big;
  return x != x ? x : r;
}
#endif

}  // namespace ff
