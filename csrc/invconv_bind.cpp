#include "bindings.h"

namespace ff {
// Placeholder until the invconv kernels land: registers nothing.
void bind_invconv(pybind11::module_& m) {}
}  // namespace ff
