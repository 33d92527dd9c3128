#include "registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "ep_runtime CUDA kernels (raw pointers + stream; validation lives in ep_runtime/ops.py)";
  for (auto bind : ep::binders()) bind(m);
}
