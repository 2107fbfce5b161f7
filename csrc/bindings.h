// Each kernel family registers its entry points in its own <family>_bind.cpp, so families are
// added without touching each other's files; bindings.cpp calls every registration function.
// Every entry point is declared with its argument names (py::arg) and Python calls it by keyword,
// so two swapped integers (a pointer and a stride) cannot pass silently.
#pragma once
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <tuple>
#include <utility>

namespace ff {
void bind_conv_taps(pybind11::module_& m);
void bind_coupling(pybind11::module_& m);
void bind_invconv(pybind11::module_& m);
void bind_made(pybind11::module_& m);
void bind_mlp(pybind11::module_& m);
void bind_spline(pybind11::module_& m);

// {name: code} of a constant table Python keeps a copy of (checked by tests/test_bindings.py).
inline pybind11::dict code_table(std::initializer_list<std::pair<const char*, int>> items) {
  pybind11::dict d;
  for (const auto& [name, code] : items) d[name] = code;
  return d;
}

// m.def(name, f, args..., tail...): `args` is a tuple of the py::arg an entry point's CPU and
// CUDA versions share, `tail` the ones that differ (nthreads; workspace, stream).
template <typename F, typename Args, typename... Tail>
void def_with_args(pybind11::module_& m, const char* name, F f, const Args& args,
                   const Tail&... tail) {
  std::apply([&](const auto&... a) { m.def(name, f, a..., tail...); }, args);
}
}  // namespace ff
