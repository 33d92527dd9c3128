// Each kernel family's .cu file registers its own pybind11 bindings, so families are added or removed
// without touching a central list. Static registrars run when the shared object is loaded, before
// PYBIND11_MODULE's init function.
#pragma once
#include <pybind11/pybind11.h>

#include <vector>

namespace ep {
using Binder = void (*)(pybind11::module_&);
inline std::vector<Binder>& binders() {
  static std::vector<Binder> list;
  return list;
}
struct RegisterBindings {
  explicit RegisterBindings(Binder b) { binders().push_back(b); }
};
}  // namespace ep

#define EP_REGISTER_BINDINGS(fn) static ::ep::RegisterBindings ep_register_bindings_##fn(fn)
