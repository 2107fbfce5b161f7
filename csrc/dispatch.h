// Dispatch macros: a runtime dtype code or scale mode to a compile-time type or constant.
#pragma once

#include <string>

#include "checks.h"
#include "scale.h"
#include "storage.h"

// Expands BODY with `scalar_t` bound to the storage type for a dtype code.
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
