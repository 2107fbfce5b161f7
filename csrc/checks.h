// Argument checks and raw pointers, shared by every kernel family (CPU and CUDA host code).
// No PyTorch headers: Python allocates every buffer and passes raw pointers (integers) and sizes;
// each entry point checks what it will read before touching memory.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ff {

inline void check(bool ok, const std::string& msg) {
  // std::invalid_argument becomes ValueError in Python (pybind11).
  if (!ok) throw std::invalid_argument("fastflow._C: " + msg);
}

// `count` elements at p: a non-empty buffer needs a pointer. (Messages built only on failure:
// this runs for every buffer of every call.)
inline void check_ptr(std::uintptr_t p, int64_t count, const char* name) {
  if (count < 0) check(false, std::string(name) + ": negative size");
  if (count != 0 && p == 0)
    check(false, std::string(name) + ": null pointer for a non-empty buffer");
}

// Raw pointer (an integer from Python) as a typed pointer.
template <typename P>
inline P* ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

}  // namespace ff

// A check whose message is only built when it fails (for checks on a per-step path).
#define FF_CHECK(cond, msg)                 \
  do {                                      \
    if (!(cond)) ::ff::check(false, (msg)); \
  } while (0)
