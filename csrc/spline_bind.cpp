#include "bindings.h"
#include "spline.h"

namespace ff {
void bind_spline(pybind11::module_& m) {
  namespace py = pybind11;
  m.attr("SPLINE_MAX_BINS") = kSplineMaxBins;
  const auto head = std::make_tuple(
      py::arg("dtype"), py::arg("n"), py::arg("m"), py::arg("bins"), py::arg("bound"),
      py::arg("min_bin_width"), py::arg("min_bin_height"), py::arg("min_derivative"),
      py::arg("inverse"), py::arg("in_ptr"), py::arg("widths_ptr"), py::arg("heights_ptr"),
      py::arg("derivatives_ptr"), py::arg("mask_ptr"));
  const auto fwd = std::tuple_cat(head, std::make_tuple(py::arg("out_ptr"), py::arg("logdet_ptr")));
  const auto bwd = std::tuple_cat(
      head, std::make_tuple(py::arg("grad_out_ptr"), py::arg("grad_logdet_ptr"),
                            py::arg("grad_in_ptr"), py::arg("grad_widths_ptr"),
                            py::arg("grad_heights_ptr"), py::arg("grad_derivatives_ptr")));
  def_with_args(m, "rq_spline_cpu", &rq_spline_cpu, fwd, py::arg("nthreads"));
  def_with_args(m, "rq_spline_backward_cpu", &rq_spline_backward_cpu, bwd, py::arg("nthreads"));
#if defined(FF_WITH_CUDA)
  def_with_args(m, "rq_spline_cuda", &rq_spline_cuda, fwd, py::arg("stream"));
  def_with_args(m, "rq_spline_backward_cuda", &rq_spline_backward_cuda, bwd, py::arg("stream"));
#endif
}
}  // namespace ff
