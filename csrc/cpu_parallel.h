// OpenMP helpers shared by the CPU kernels. Parallel regions live here and in the kernels'
// drivers, outside the ISA variants (cpu_isa.h), which only run the loops of one range of work.
#pragma once

#include <cstdint>
#include <string>

#include "checks.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ff {

// Elements of work below which a kernel does not wake the thread pool.
constexpr int64_t kParallelGrain = 1 << 15;

inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline void check_threads(const char* name, int nthreads) {
  check(nthreads >= 1, std::string(name) + ": nthreads must be >= 1");
}

// f(lo, hi) over [0, n) split into one contiguous range per thread (the static schedule); with
// one thread (or none to split) no parallel region at all.
template <typename F>
void parallel_ranges(int64_t n, int nthreads, F&& f) {
  if (n <= 0) return;
  if (nthreads <= 1 || n == 1) {
    f(int64_t(0), n);
    return;
  }
#pragma omp parallel num_threads(nthreads)
  {
#if defined(_OPENMP)
    const int64_t nt = omp_get_num_threads();
#else
    const int64_t nt = 1;
#endif
    const int64_t t = thread_id();
    const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
    if (lo < hi) f(lo, hi);
  }
}

}  // namespace ff
