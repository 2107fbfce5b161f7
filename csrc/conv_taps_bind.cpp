#include "bindings.h"
#include "conv_taps.h"

namespace ff {
void bind_conv_taps(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("conv_tap_sum_cpu", &conv_tap_sum_cpu, py::arg("dtype"), py::arg("n"), py::arg("h"),
        py::arg("w"), py::arg("c"), py::arg("taps_ptr"), py::arg("bias_ptr"), py::arg("out_ptr"),
        py::arg("nthreads"));
  m.def("conv_tap_shift_cpu", &conv_tap_shift_cpu, py::arg("dtype"), py::arg("n"), py::arg("h"),
        py::arg("w"), py::arg("c"), py::arg("grad_ptr"), py::arg("shifted_ptr"),
        py::arg("nthreads"));
  m.def("relu_grad_sum_cpu", &relu_grad_sum_cpu, py::arg("dtype"), py::arg("rows"), py::arg("c"),
        py::arg("grad_ptr"), py::arg("act_ptr"), py::arg("sum_ptr"), py::arg("nthreads"));
  m.def("bias_relu_cpu", &bias_relu_cpu, py::arg("dtype"), py::arg("rows"), py::arg("c"),
        py::arg("y_ptr"), py::arg("bias_ptr"), py::arg("nthreads"));
}
}  // namespace ff
