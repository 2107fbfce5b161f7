#include <pybind11/stl.h>

#include "bindings.h"
#include "made.h"

namespace ff {
void bind_made(pybind11::module_& m) {
  namespace py = pybind11;
  // activation codes (made.h), as fastflow/ops/made_native.py names them
  m.attr("ACTIVATIONS") = code_table({{"relu", kRelu}, {"tanh", kTanh}, {"elu", kElu}});
  m.attr("made_cuda_max_layers") = kMadeCudaMaxLayers;

  m.def("made_workspace_bytes", &made_workspace_bytes, py::arg("dtype"), py::arg("d"),
        py::arg("hidden"), py::arg("nthreads"));
  const auto walk = std::make_tuple(py::arg("dtype"), py::arg("act"), py::arg("mode"),
                                    py::arg("clamp"), py::arg("n"), py::arg("d"),
                                    py::arg("hidden"), py::arg("u_ptr"), py::arg("init_ptr"),
                                    py::arg("weight_ptrs"), py::arg("bias_ptrs"),
                                    py::arg("bounds"));
  def_with_args(m, "made_affine_inverse_cpu", &made_affine_inverse_cpu, walk, py::arg("x_ptr"),
                py::arg("logdet_ptr"), py::arg("workspace_ptr"), py::arg("workspace_bytes"),
                py::arg("nthreads"));
  def_with_args(m, "made_spline_inverse_cpu", &made_spline_inverse_cpu,
                std::make_tuple(py::arg("dtype"), py::arg("act"), py::arg("n"), py::arg("d"),
                                py::arg("hidden"), py::arg("bins"), py::arg("bound"),
                                py::arg("min_bin_width"), py::arg("min_bin_height"),
                                py::arg("min_derivative"), py::arg("u_ptr"), py::arg("init_ptr"),
                                py::arg("weight_ptrs"), py::arg("bias_ptrs"),
                                py::arg("out_weight_ptr"), py::arg("out_bias_ptr"),
                                py::arg("bounds")),
                py::arg("x_ptr"), py::arg("logdet_ptr"), py::arg("workspace_ptr"),
                py::arg("workspace_bytes"), py::arg("nthreads"));
#if defined(FF_WITH_CUDA)
  def_with_args(m, "made_affine_inverse_cuda", &made_affine_inverse_cuda, walk,
                py::arg("bounds_dev_ptr"), py::arg("x_ptr"), py::arg("logdet_ptr"),
                py::arg("stream"));
  m.def("made_cuda_supported", &made_cuda_supported, py::arg("dtype"), py::arg("d"),
        py::arg("hidden"));
#endif
}
}  // namespace ff
