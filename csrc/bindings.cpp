#include "bindings.h"
#include "cpu_isa.h"
#include "storage.h"

#include <pybind11/stl.h>

#include <map>
#include <string>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastflow native kernels (CPU, and CUDA when built with it); no PyTorch headers";
  m.def("build_info", [] {
    py::dict d;
#if defined(FF_WITH_CUDA)
    d["cuda"] = true;
    d["cuda_architectures"] = std::string(FF_CUDA_ARCHS);
#else
    d["cuda"] = false;
    d["cuda_architectures"] = std::string();
#endif
#if defined(FF_WITH_OPENMP)
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["compiler"] = std::string(FASTFLOW_VERSION_INFO);
    return d;
  });
  m.def(
      "cpu_isa", [] { return std::string(ff::cpu_isa_name(ff::cpu_isa_level())); },
      "SIMD variant the CPU kernels run (capped by FASTFLOW_CPU_ISA=base|avx2)");
  // Constants Python keeps its own copy of (so the reference backend works without _C), checked
  // against these by tests/test_bindings.py.
  m.attr("DTYPE_CODES") = ff::code_table({{"float32", ff::kFloat32},
                                           {"float64", ff::kFloat64},
                                           {"bfloat16", ff::kBFloat16},
                                           {"float16", ff::kFloat16}});
  py::tuple isas(ff::kCpuIsaCount);
  for (int i = 0; i < ff::kCpuIsaCount; ++i) isas[i] = std::string(ff::cpu_isa_name(i));
  m.attr("CPU_ISA_NAMES") = isas;
  ff::bind_conv_taps(m);
  ff::bind_coupling(m);
  ff::bind_invconv(m);
  ff::bind_made(m);
  ff::bind_mlp(m);
  ff::bind_spline(m);
}
