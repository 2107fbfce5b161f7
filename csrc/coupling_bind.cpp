#include "bindings.h"
#include "coupling.h"

namespace ff {
void bind_coupling(pybind11::module_& m) {
  namespace py = pybind11;
  // scale-function codes (scale.h), as fastflow/ops/coupling.py names them
  m.attr("SCALE_MODES") = code_table({{"softclamp", kSoftClamp},
                                      {"glow", kGlowSigmoid},
                                      {"identity", kIdentity},
                                      {"additive", kAdditive}});

  const auto head = std::make_tuple(py::arg("dtype"), py::arg("mode"), py::arg("clamp"),
                                    py::arg("n"), py::arg("m"));
  const auto fwd = std::tuple_cat(
      head, std::make_tuple(py::arg("x_ptr"), py::arg("x_stride"), py::arg("raw_ptr"),
                            py::arg("raw_stride"), py::arg("shift_ptr"), py::arg("shift_stride"),
                            py::arg("mask_ptr"), py::arg("y_ptr"), py::arg("logdet_ptr")));
  const auto inv = std::tuple_cat(
      head, std::make_tuple(py::arg("y_ptr"), py::arg("y_stride"), py::arg("raw_ptr"),
                            py::arg("raw_stride"), py::arg("shift_ptr"), py::arg("shift_stride"),
                            py::arg("mask_ptr"), py::arg("x_ptr"), py::arg("logdet_ptr")));
  const auto bwd = std::tuple_cat(
      head, std::make_tuple(py::arg("x_ptr"), py::arg("x_stride"), py::arg("raw_ptr"),
                            py::arg("raw_stride"), py::arg("mask_ptr"), py::arg("grad_y_ptr"),
                            py::arg("grad_logdet_ptr"), py::arg("grad_x_ptr"),
                            py::arg("grad_raw_ptr")));
  const auto inv_bwd = std::tuple_cat(
      head, std::make_tuple(py::arg("x_ptr"), py::arg("raw_ptr"), py::arg("raw_stride"),
                            py::arg("mask_ptr"), py::arg("grad_x_ptr"), py::arg("grad_logdet_ptr"),
                            py::arg("grad_y_ptr"), py::arg("grad_raw_ptr"),
                            py::arg("grad_shift_ptr")));
  const auto nthreads = py::arg("nthreads");
  def_with_args(m, "coupling_forward_cpu", &coupling_forward_cpu, fwd, nthreads);
  def_with_args(m, "coupling_inverse_cpu", &coupling_inverse_cpu, inv, nthreads);
  def_with_args(m, "coupling_backward_cpu", &coupling_backward_cpu, bwd, nthreads);
  def_with_args(m, "coupling_inverse_backward_cpu", &coupling_inverse_backward_cpu, inv_bwd,
                nthreads);
#if defined(FF_WITH_CUDA)
  const auto ws = py::arg("workspace_ptr"), stream = py::arg("stream");
  m.def("coupling_workspace_bytes", &coupling_workspace_bytes, py::arg("dtype"), py::arg("n"),
        py::arg("m"));
  def_with_args(m, "coupling_forward_cuda", &coupling_forward_cuda, fwd, ws, stream);
  def_with_args(m, "coupling_inverse_cuda", &coupling_inverse_cuda, inv, ws, stream);
  def_with_args(m, "coupling_backward_cuda", &coupling_backward_cuda, bwd, stream);
  def_with_args(m, "coupling_inverse_backward_cuda", &coupling_inverse_backward_cuda, inv_bwd,
                stream);
#endif
}
}  // namespace ff
