#include "bindings.h"

namespace ff {
// Placeholder until the made kernels land: registers nothing.
void bind_made(pybind11::module_& m) {}
}  // namespace ff
