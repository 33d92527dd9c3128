// The Python switch of programmatic dependent launch (csrc/launch.h).
#include "launch.h"
#include "registry.h"

namespace {
void bind_launch(pybind11::module_& m) {
  m.def(
      "set_programmatic_launch",
      [](bool enabled) { return ep::programmatic_launch().exchange(enabled); },
      "turns programmatic dependent launch of every kernel here on or off; returns the previous setting");
}
}  // namespace
EP_REGISTER_BINDINGS(bind_launch);
