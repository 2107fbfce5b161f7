#include <pybind11/stl.h>

#include "bindings.h"
#include "invconv.h"

namespace ff {
void bind_invconv(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("invconv_cpu_isa", &invconv_cpu_isa);
  m.def("lu_weight_workspace_bytes", &lu_weight_workspace_bytes, py::arg("dtype"), py::arg("c"));
  const auto lu = std::make_tuple(
      py::arg("dtype"), py::arg("c"), py::arg("p_ptr"), py::arg("l_ptr"), py::arg("u_ptr"),
      py::arg("log_s_ptr"), py::arg("sign_s_ptr"), py::arg("w_ptr"), py::arg("w_inv_ptr"),
      py::arg("logdet_ptr"), py::arg("workspace_ptr"));
  const auto affine =
      std::make_tuple(py::arg("dtype"), py::arg("n"), py::arg("c"), py::arg("p"), py::arg("x_ptr"),
                      py::arg("w_ptr"), py::arg("b_ptr"), py::arg("y_ptr"));
  const auto grad = std::make_tuple(
      py::arg("dtype"), py::arg("n"), py::arg("c"), py::arg("p"), py::arg("x_ptr"),
      py::arg("grad_y_ptr"), py::arg("grad_w_ptr"), py::arg("grad_b_ptr"),
      py::arg("workspace_ptr"), py::arg("workspace_bytes"));
  const auto nthreads = py::arg("nthreads");
  def_with_args(m, "lu_weight_cpu", &lu_weight_cpu, lu);
  def_with_args(m, "channel_affine_cpu", &channel_affine_cpu, affine, nthreads);
  m.def("channel_affine_grad_workspace_bytes_cpu", &channel_affine_grad_workspace_bytes_cpu,
        py::arg("dtype"), py::arg("c"), nthreads);
  def_with_args(m, "channel_affine_grad_params_cpu", &channel_affine_grad_params_cpu, grad,
                nthreads);
#if defined(FF_WITH_CUDA)
  const auto stream = py::arg("stream");
  def_with_args(m, "lu_weight_cuda", &lu_weight_cuda, lu, stream);
  def_with_args(m, "channel_affine_cuda", &channel_affine_cuda, affine, stream);
  m.def("channel_affine_grad_workspace_bytes_cuda", &channel_affine_grad_workspace_bytes_cuda,
        py::arg("dtype"), py::arg("n"), py::arg("c"), py::arg("p"));
  def_with_args(m, "channel_affine_grad_params_cuda", &channel_affine_grad_params_cuda, grad,
                stream);
#endif
}
}  // namespace ff
