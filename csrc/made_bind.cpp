#include <pybind11/stl.h>

#include "bindings.h"
#include "made.h"

namespace ff {
void bind_made(pybind11::module_& m) {
  m.def("made_workspace_bytes", &made_workspace_bytes);
  m.attr("made_cuda_max_layers") = kMadeCudaMaxLayers;
  m.def("made_affine_inverse_cpu", &made_affine_inverse_cpu);
#if defined(FF_WITH_CUDA)
  m.def("made_affine_inverse_cuda", &made_affine_inverse_cuda);
  m.def("made_cuda_supported", &made_cuda_supported, pybind11::arg("dtype"), pybind11::arg("d"),
        pybind11::arg("hidden"));
#endif
}
}  // namespace ff
