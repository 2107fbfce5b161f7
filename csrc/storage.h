// Floating-point storage types and their codes, for the CPU (.cpp) and CUDA (.cu) kernels:
// fp32, fp64, and bf16/fp16 (stored as 16 bits, loaded to and computed in fp32).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FF_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace ff {

// dtype codes shared with fastflow/_backend.py (DTYPE_CODES; exported as _C.DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Bytes of the accumulation type (fp64 for fp64, else fp32) of a dtype code.
inline int64_t acc_bytes(int dtype) { return dtype == kFloat64 ? 8 : 4; }

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
template <typename T>
using acc_t = typename Acc<T>::type;

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

}  // namespace ff

// The storage type of the 16-bit dtypes in this compilation (host structs or CUDA types).
#if defined(__CUDACC__)
#define FF_BF16_T __nv_bfloat16
#define FF_F16_T __half
#else
#define FF_BF16_T ::ff::bf16
#define FF_F16_T ::ff::f16
#endif
