// Shared scalar math, storage types and checks for the CPU (.cpp) and CUDA (.cu) kernels.
// No PyTorch headers: Python allocates every buffer and passes raw pointers and sizes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FF_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace ff {

// dtype codes shared with fastflow/ops/_backend.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

inline void check(bool ok, const std::string& msg) {
  // std::invalid_argument becomes ValueError in Python (pybind11).
  if (!ok) throw std::invalid_argument("fastflow._C: " + msg);
}

inline void check_ptr(std::uintptr_t p, int64_t count, const char* name) {
  check(count >= 0, std::string(name) + ": negative size");
  check(count == 0 || p != 0, std::string(name) + ": null pointer for a non-empty buffer");
}

#if !defined(__CUDACC__)
// Host SIMD level for kernels compiled per ISA (see coupling_cpu.cpp): 2 = AVX-512 (F, DQ, VL,
// BW), 1 = AVX2 + FMA, 0 = baseline. The environment variable FASTFLOW_CPU_ISA=base|avx2 caps it
// (read on every call, so tests can run every variant in one process); detection is cached.
enum CpuIsa : int { kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
inline int cpu_isa_level() {
  static const int detected = [] {
    int best = kIsaBase;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
      best = kIsaAvx512;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      best = kIsaAvx2;
#endif
    return best;
  }();
  const char* cap = std::getenv("FASTFLOW_CPU_ISA");
  if (cap == nullptr) return detected;
  if (std::string(cap) == "base") return kIsaBase;
  if (std::string(cap) == "avx2" && detected > kIsaAvx2) return kIsaAvx2;
  return detected;
}
#endif

// ---------------------------------------------------------------------------------------------
// Storage types for 16-bit floats on the host. Arithmetic always happens in float.
#if !defined(__CUDACC__)
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};
#endif

template <typename T>
struct Acc {
  using type = float;  // fp32 accumulation for fp32, bf16 and fp16
};
template <>
struct Acc<double> {
  using type = double;
};

FF_HOST_DEVICE float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}
FF_HOST_DEVICE uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

FF_HOST_DEVICE float load(float v) { return v; }
FF_HOST_DEVICE double load(double v) { return v; }
template <typename T>
FF_HOST_DEVICE T store(typename Acc<T>::type v);
template <>
FF_HOST_DEVICE float store<float>(float v) {
  return v;
}
template <>
FF_HOST_DEVICE double store<double>(double v) {
  return v;
}

#if defined(__CUDACC__)
FF_HOST_DEVICE float load(__nv_bfloat16 v) { return __bfloat162float(v); }
FF_HOST_DEVICE float load(__half v) { return __half2float(v); }
template <>
FF_HOST_DEVICE __nv_bfloat16 store<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
FF_HOST_DEVICE __half store<__half>(float v) {
  return __float2half_rn(v);
}
#else
FF_HOST_DEVICE float load(bf16 v) { return bits_to_float(uint32_t(v.bits) << 16); }
template <>
FF_HOST_DEVICE bf16 store<bf16>(float v) {
  uint32_t u = float_to_bits(v);
  // round to nearest even; NaN stays a (quiet) NaN
  uint32_t r = (v != v) ? 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(r >> 16)};
}
FF_HOST_DEVICE float load(f16 v) {
  _Float16 h;
  memcpy(&h, &v.bits, 2);
  return float(h);
}
template <>
FF_HOST_DEVICE f16 store<f16>(float v) {
  _Float16 h = _Float16(v);
  f16 r;
  memcpy(&r.bits, &h, 2);
  return r;
}
#endif

// ---------------------------------------------------------------------------------------------
// Elementary functions. fp64 and device code use the accurate library versions. Host fp32 uses
// branch-free Cephes-style polynomials (a few ulp; see test_fast_fp32_math_is_accurate_over_a_wide_range) so that loops over them vectorize: glibc's
// scalar expf/tanhf would make the fused kernel slower than torch's vectorized (Sleef) ops.
FF_HOST_DEVICE double ff_exp(double x) { return exp(x); }
FF_HOST_DEVICE double ff_tanh(double x) { return tanh(x); }
FF_HOST_DEVICE double ff_log1p(double x) { return log1p(x); }
FF_HOST_DEVICE double ff_log(double x) { return log(x); }

#if defined(__CUDA_ARCH__)
FF_HOST_DEVICE float ff_exp(float x) { return expf(x); }
FF_HOST_DEVICE float ff_tanh(float x) { return tanhf(x); }
FF_HOST_DEVICE float ff_log1p(float x) { return log1pf(x); }
FF_HOST_DEVICE float ff_log(float x) { return logf(x); }
#else
FF_HOST_DEVICE float ff_exp(float x) {
  // exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2]
  float xc = x > 88.3762626647949f ? 88.3762626647949f : x;
  xc = xc < -87.3365478515625f ? -87.3365478515625f : xc;
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
  y = y * bits_to_float(uint32_t(e) << 23);
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
  float e = ff_exp(2.0f * (ax > 40.0f ? 40.0f : ax));
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = x < 0.0f ? -big : big;
  float r = ax < 0.625f ? small : big;
  return x != x ? x : r;
}
#endif

// ---------------------------------------------------------------------------------------------
// Coupling scale functions s = scale_fn(raw). Codes shared with fastflow/ops/coupling.py.
enum ScaleMode : int { kSoftClamp = 0, kGlowSigmoid = 1, kIdentity = 2, kAdditive = 3 };

// Returns s and writes exp(s) and ds/draw. `c` is the soft-clamp bound.
template <int Mode, typename A>
FF_HOST_DEVICE A scale_fn(A raw, A c, A inv_c, A& exp_s, A& ds) {
  if (Mode == kSoftClamp) {
    A t = ff_tanh(raw * inv_c);
    A s = c * t;
    exp_s = ff_exp(s);
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

// Expands BODY with `scalar_t` bound to the storage type for a dtype code.
#if defined(__CUDACC__)
#define FF_BF16_T __nv_bfloat16
#define FF_F16_T __half
#else
#define FF_BF16_T ::ff::bf16
#define FF_F16_T ::ff::f16
#endif
#define FF_DISPATCH_FLOAT(DTYPE, NAME, ...)                                   \
  switch (DTYPE) {                                                            \
    case ::ff::kFloat32: {                                                    \
      using scalar_t = float;                                                 \
      __VA_ARGS__();                                                          \
      break;                                                                  \
    }                                                                         \
    case ::ff::kFloat64: {                                                    \
      using scalar_t = double;                                                \
      __VA_ARGS__();                                                          \
      break;                                                                  \
    }                                                                         \
    case ::ff::kBFloat16: {                                                   \
      using scalar_t = FF_BF16_T;                                             \
      __VA_ARGS__();                                                          \
      break;                                                                  \
    }                                                                         \
    case ::ff::kFloat16: {                                                    \
      using scalar_t = FF_F16_T;                                              \
      __VA_ARGS__();                                                          \
      break;                                                                  \
    }                                                                         \
    default:                                                                  \
      ::ff::check(false, std::string(NAME) + ": unsupported dtype code " +    \
                             std::to_string(DTYPE));                          \
  }

#define FF_DISPATCH_MODE(MODE, NAME, ...)                                                   \
  switch (MODE) {                                                                           \
    case ::ff::kSoftClamp: {                                                                \
      constexpr int kMode = ::ff::kSoftClamp;                                               \
      __VA_ARGS__();                                                                        \
      break;                                                                                \
    }                                                                                       \
    case ::ff::kGlowSigmoid: {                                                              \
      constexpr int kMode = ::ff::kGlowSigmoid;                                             \
      __VA_ARGS__();                                                                        \
      break;                                                                                \
    }                                                                                       \
    case ::ff::kIdentity: {                                                                 \
      constexpr int kMode = ::ff::kIdentity;                                                \
      __VA_ARGS__();                                                                        \
      break;                                                                                \
    }                                                                                       \
    case ::ff::kAdditive: {                                                                 \
      constexpr int kMode = ::ff::kAdditive;                                                \
      __VA_ARGS__();                                                                        \
      break;                                                                                \
    }                                                                                       \
    default:                                                                                \
      ::ff::check(false, std::string(NAME) + ": unknown scale mode " + std::to_string(MODE)); \
  }
