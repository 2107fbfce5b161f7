#include <pybind11/stl.h>

#include "bindings.h"
#include "invconv.h"

namespace ff {
void bind_invconv(pybind11::module_& m) {
  m.def("invconv_cpu_isa", &invconv_cpu_isa);
  m.def("lu_weight_workspace_bytes", &lu_weight_workspace_bytes);
  m.def("lu_weight_cpu", &lu_weight_cpu);
  m.def("channel_affine_cpu", &channel_affine_cpu);
  m.def("channel_affine_grad_workspace_bytes_cpu", &channel_affine_grad_workspace_bytes_cpu);
  m.def("channel_affine_grad_params_cpu", &channel_affine_grad_params_cpu);
#if defined(FF_WITH_CUDA)
  m.def("lu_weight_cuda", &lu_weight_cuda);
  m.def("channel_affine_cuda", &channel_affine_cuda);
  m.def("channel_affine_grad_workspace_bytes_cuda", &channel_affine_grad_workspace_bytes_cuda);
  m.def("channel_affine_grad_params_cuda", &channel_affine_grad_params_cuda);
#endif
}
}  // namespace ff
