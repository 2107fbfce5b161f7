// The one CPU instruction-set mechanism of the kernels: every CPU kernel family (coupling,
// invconv, MADE, MLP coupling) builds its hot loops once per variant below and picks one per call.
//
// Pattern (the same in every family):
//   1. the loop body is an always-inline template `body<Isa, T>(...)` that reads its vector
//      width and blocking from a per-family tuning struct specialised on Isa; it holds no OpenMP;
//   2. FF_CPU_VARIANTS(name, body, (params), (args)) stamps out one non-inline wrapper per
//      variant, `name_base<T>`, `name_avx2<T>` (target attribute FF_TARGET_AVX2) and
//      `name_avx512<T>` (FF_TARGET_AVX512), each calling body<kIsa..., T>: the body and
//      everything it inlines is compiled for the wrapper's ISA;
//   3. the caller (outside any target attribute, holding the OpenMP region) takes
//      `name_for<T>(cpu_isa_level())` once per call and calls that pointer per range of work.
// Function target attributes, not `#pragma GCC target` around included copies, so GCC and Clang
// build the same variants. The build uses no -march flag: one binary runs on any x86-64.
#pragma once

#include <cstdlib>
#include <cstring>

// Vector-extension values (GCC/Clang `vector_size`) wider than the baseline ISA appear in the
// always-inline bodies, passed between their helpers; they only exist inlined into a wrapper of
// the matching ISA, so the ABI warning for them (-Wpsabi) does not apply. (The wrappers and
// bodies themselves take only pointers and scalars.)
#if defined(__clang__)
#pragma clang diagnostic ignored "-Wpsabi"
#elif defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define FF_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FF_HAVE_X86_VARIANTS 1
// The target strings, once. AVX-512 means F + DQ + VL + BW (what cpu_isa_level detects);
// GCC also gets 512-bit auto-vectorization (its default for AVX-512 targets is 256-bit),
// an option Clang's target attribute does not take.
#define FF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#if defined(__clang__)
#define FF_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#else
#define FF_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")))
#endif
#else
// Elsewhere only the baseline variant is ever picked; the others compile as portable code.
#define FF_TARGET_AVX2
#define FF_TARGET_AVX512
#endif

namespace ff {

// All lanes of the vector-extension type V = s. Use this, never `s + V{}` or `s * v`, for a
// scalar in vector code inside the always-inline bodies: GCC (12) builds the implicit
// scalar-to-vector conversion in the body's own context, which has no target attribute, as
// lane-by-lane inserts of 128-bit halves (4 vinsertps + vinsertf128 per broadcast), and they
// survive inlining into the AVX2/AVX-512 wrapper: this doubled the MLP and MADE micro-kernels'
// time. A filled array copied into V is folded into one broadcast in every variant.
template <typename V, typename T>
FF_INLINE V vsplat(T s) {
  constexpr int kLanes = int(sizeof(V) / sizeof(T));
  T lanes[kLanes];
  for (int i = 0; i < kLanes; ++i) lanes[i] = s;
  V v;
  std::memcpy(&v, lanes, sizeof(V));
  return v;
}

// The variants, narrowest first: 0 = baseline (SSE2 on x86-64), 1 = AVX2 + FMA, 2 = AVX-512.
enum CpuIsa : int { kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
constexpr int kCpuIsaCount = 3;

// Names as FASTFLOW_CPU_ISA and fastflow._C.cpu_isa() spell them (also exported as
// _C.CPU_ISA_NAMES).
inline const char* cpu_isa_name(int level) {
  return level == kIsaAvx512 ? "avx512" : level == kIsaAvx2 ? "avx2" : "base";
}

// Bytes per vector register of a variant.
constexpr int isa_vector_bytes(int isa) {
  return isa == kIsaAvx512 ? 64 : isa == kIsaAvx2 ? 32 : 16;
}
template <int Isa>
constexpr int kIsaVectorBytes = isa_vector_bytes(Isa);

// The variant the CPU kernels run: the widest this CPU supports (detected once), capped by the
// environment variable FASTFLOW_CPU_ISA=base|avx2, which is read on every call so that tests run
// every variant in one process.
inline int cpu_isa_level() {
  static const int detected = [] {
    int best = kIsaBase;
#if defined(FF_HAVE_X86_VARIANTS)
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
  if (std::strcmp(cap, cpu_isa_name(kIsaBase)) == 0) return kIsaBase;
  if (std::strcmp(cap, cpu_isa_name(kIsaAvx2)) == 0 && detected > kIsaAvx2) return kIsaAvx2;
  return detected;
}

// The picker: the variant of a kernel for an ISA level.
template <typename Fn>
Fn pick_isa_variant(int isa, Fn base, Fn avx2, Fn avx512) {
#if defined(FF_HAVE_X86_VARIANTS)
  if (isa == kIsaAvx512) return avx512;
  if (isa == kIsaAvx2) return avx2;
#endif
  return base;
}

}  // namespace ff

// One wrapper per variant around the always-inline template BODY<Isa, T> (see the top of this
// file), and NAME_for<T>(isa), the picker for them. PARAMS and ARGS are parenthesised lists.
#define FF_CPU_VARIANTS(NAME, BODY, PARAMS, ARGS)                                          \
  template <typename T>                                                                   \
  void NAME##_base PARAMS {                                                               \
    BODY<::ff::kIsaBase, T> ARGS;                                                         \
  }                                                                                       \
  template <typename T>                                                                   \
  FF_TARGET_AVX2 void NAME##_avx2 PARAMS {                                                \
    BODY<::ff::kIsaAvx2, T> ARGS;                                                         \
  }                                                                                       \
  template <typename T>                                                                   \
  FF_TARGET_AVX512 void NAME##_avx512 PARAMS {                                            \
    BODY<::ff::kIsaAvx512, T> ARGS;                                                       \
  }                                                                                       \
  template <typename T>                                                                   \
  auto NAME##_for(int isa) {                                                              \
    return ::ff::pick_isa_variant(isa, &NAME##_base<T>, &NAME##_avx2<T>, &NAME##_avx512<T>); \
  }
