// Build facts the Python side reports (which architectures this module carries).
#include "cuda_check.h"
#include "registry.h"

namespace {
void bind_info(pybind11::module_& m) {
  m.def("cuda_runtime_version", [] {
    int v = 0;
    EP_CUDA_CHECK(cudaRuntimeGetVersion(&v));
    return v;
  });
}
}  // namespace
EP_REGISTER_BINDINGS(bind_info);
