#include "bindings.h"
#include "coupling.h"

namespace ff {
void bind_coupling(pybind11::module_& m) {
  m.def("coupling_forward_cpu", &coupling_forward_cpu);
  m.def("coupling_inverse_cpu", &coupling_inverse_cpu);
  m.def("coupling_backward_cpu", &coupling_backward_cpu);
  m.def("coupling_inverse_backward_cpu", &coupling_inverse_backward_cpu);
#if defined(FF_WITH_CUDA)
  m.def("coupling_workspace_bytes", &coupling_workspace_bytes);
  m.def("coupling_forward_cuda", &coupling_forward_cuda);
  m.def("coupling_inverse_cuda", &coupling_inverse_cuda);
  m.def("coupling_backward_cuda", &coupling_backward_cuda);
  m.def("coupling_inverse_backward_cuda", &coupling_inverse_backward_cuda);
#endif
}
}  // namespace ff
