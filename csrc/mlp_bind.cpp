#include <pybind11/stl.h>

#include "bindings.h"
#include "mlp.h"

namespace ff {
void bind_mlp(pybind11::module_& m) {
  namespace py = pybind11;
  m.attr("MLP_ACTS_ROW_ALIGN_BYTES") = kMlpRowAlignBytes;
  m.attr("MLP_ACTS_ROW_QUANTUM") = kMlpRowQuantum;
  m.def("mlp_coupling_workspace_bytes", &mlp_coupling_workspace_bytes, py::arg("dtype"),
        py::arg("n"), py::arg("sizes"), py::arg("nthreads"));
  m.def("mlp_coupling_acts_shape", &mlp_coupling_acts_shape, py::arg("dtype"), py::arg("n"),
        py::arg("sizes"));
  m.def("mlp_coupling_acts_columns", &mlp_coupling_acts_columns, py::arg("dtype"),
        py::arg("sizes"));
  const auto head = std::make_tuple(py::arg("dtype"), py::arg("mode"), py::arg("clamp"),
                                    py::arg("n"), py::arg("d"), py::arg("cut"), py::arg("parity"),
                                    py::arg("n_ctx"), py::arg("sizes"));
  const auto ws = std::make_tuple(py::arg("workspace_ptr"), py::arg("workspace_bytes"),
                                  py::arg("nthreads"));
  const auto ctx = py::arg("ctx_ptr"), params = py::arg("params_ptr");
  const auto acts = py::arg("acts_ptr"), acts_numel = py::arg("acts_numel");
  def_with_args(m, "mlp_coupling_forward_cpu", &mlp_coupling_forward_cpu,
                std::tuple_cat(head, std::make_tuple(py::arg("x_ptr"), ctx, params,
                                                     py::arg("y_ptr"), py::arg("logdet_ptr"), acts,
                                                     acts_numel),
                               ws));
  def_with_args(m, "mlp_coupling_backward_cpu", &mlp_coupling_backward_cpu,
                std::tuple_cat(head,
                               std::make_tuple(py::arg("x_ptr"), ctx, params, acts, acts_numel,
                                               py::arg("grad_y_ptr"), py::arg("grad_logdet_ptr"),
                                               py::arg("grad_x_ptr"), py::arg("grad_ctx_ptr"),
                                               py::arg("grad_params_ptr")),
                               ws));
  def_with_args(m, "mlp_coupling_inverse_cpu", &mlp_coupling_inverse_cpu,
                std::tuple_cat(head, std::make_tuple(py::arg("y_ptr"), ctx, params,
                                                     py::arg("x_ptr"), py::arg("logdet_ptr")),
                               ws));
  const auto mhead = std::make_tuple(py::arg("dtype"), py::arg("mode"), py::arg("clamp"),
                                     py::arg("n"), py::arg("d"), py::arg("sizes"));
  def_with_args(m, "made_density_forward_cpu", &made_density_forward_cpu,
                std::tuple_cat(mhead, std::make_tuple(py::arg("x_ptr"), params, py::arg("u_ptr"),
                                                      py::arg("logdet_ptr"), acts, acts_numel),
                               ws));
  def_with_args(m, "made_density_backward_cpu", &made_density_backward_cpu,
                std::tuple_cat(mhead, std::make_tuple(py::arg("x_ptr"), params, acts, acts_numel,
                                                      py::arg("grad_u_ptr"),
                                                      py::arg("grad_logdet_ptr"),
                                                      py::arg("grad_x_ptr"),
                                                      py::arg("grad_params_ptr")),
                               ws));
}
}  // namespace ff
