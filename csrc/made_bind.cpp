#include <pybind11/stl.h>

#include "bindings.h"
#include "made.h"

namespace ff {
void bind_made(pybind11::module_& m) {
  m.def("made_workspace_bytes", &made_workspace_bytes);
  m.def("made_affine_inverse_cpu", &made_affine_inverse_cpu);
#if defined(FF_WITH_CUDA)
  m.def("made_affine_inverse_cuda", &made_affine_inverse_cuda);
#endif
}
}  // namespace ff
