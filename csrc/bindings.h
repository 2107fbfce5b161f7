// Each kernel family registers its entry points in its own <family>_bind.cpp, so families are
// added without touching each other's files; bindings.cpp calls every registration function.
#pragma once
#include <pybind11/pybind11.h>

namespace ff {
void bind_coupling(pybind11::module_& m);
void bind_invconv(pybind11::module_& m);
void bind_made(pybind11::module_& m);
void bind_mlp(pybind11::module_& m);
}  // namespace ff
