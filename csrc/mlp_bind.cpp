#include <pybind11/stl.h>

#include "bindings.h"
#include "mlp.h"

namespace ff {
void bind_mlp(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("mlp_coupling_workspace_bytes", &mlp_coupling_workspace_bytes, py::arg("dtype"),
        py::arg("n"), py::arg("sizes"), py::arg("nthreads"));
  m.def("mlp_coupling_acts_shape", &mlp_coupling_acts_shape, py::arg("dtype"), py::arg("n"),
        py::arg("sizes"));
  m.def("mlp_coupling_forward_cpu", &mlp_coupling_forward_cpu, py::arg("dtype"), py::arg("mode"),
        py::arg("clamp"), py::arg("n"), py::arg("d"), py::arg("cut"), py::arg("parity"),
        py::arg("n_ctx"), py::arg("sizes"), py::arg("x_ptr"), py::arg("ctx_ptr"),
        py::arg("params_ptr"), py::arg("y_ptr"), py::arg("logdet_ptr"), py::arg("acts_ptr"),
        py::arg("acts_numel"), py::arg("workspace_ptr"), py::arg("workspace_bytes"),
        py::arg("nthreads"));
  m.def("mlp_coupling_backward_cpu", &mlp_coupling_backward_cpu, py::arg("dtype"), py::arg("mode"),
        py::arg("clamp"), py::arg("n"), py::arg("d"), py::arg("cut"), py::arg("parity"),
        py::arg("n_ctx"), py::arg("sizes"), py::arg("x_ptr"), py::arg("ctx_ptr"),
        py::arg("params_ptr"), py::arg("acts_ptr"), py::arg("acts_numel"), py::arg("grad_y_ptr"),
        py::arg("grad_logdet_ptr"), py::arg("grad_x_ptr"), py::arg("grad_ctx_ptr"),
        py::arg("grad_params_ptr"), py::arg("workspace_ptr"), py::arg("workspace_bytes"),
        py::arg("nthreads"));
  m.def("mlp_coupling_inverse_cpu", &mlp_coupling_inverse_cpu, py::arg("dtype"), py::arg("mode"),
        py::arg("clamp"), py::arg("n"), py::arg("d"), py::arg("cut"), py::arg("parity"),
        py::arg("n_ctx"), py::arg("sizes"), py::arg("y_ptr"), py::arg("ctx_ptr"),
        py::arg("params_ptr"), py::arg("x_ptr"), py::arg("logdet_ptr"), py::arg("workspace_ptr"),
        py::arg("workspace_bytes"), py::arg("nthreads"));
}
}  // namespace ff
