// Every CUDA API return and every launch is checked; failures surface in Python as RuntimeError with
// the call site.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <cstdint>
#include <string>

#define EP_CUDA_CHECK(expr)                                                                    \
  do {                                                                                         \
    cudaError_t ep_err_ = (expr);                                                              \
    if (ep_err_ != cudaSuccess) {                                                              \
      /* the runtime also keeps a failed call's error as the thread's last error, which the */ \
      /* next launch check would report again at an unrelated call: it is cleared here */      \
      (void)cudaGetLastError();                                                                \
      throw std::runtime_error(std::string("CUDA error at " __FILE__ ":") +                    \
                               std::to_string(__LINE__) + " (" #expr "): " +                   \
                               cudaGetErrorString(ep_err_));                                   \
    }                                                                                          \
  } while (0)

// After a <<<...>>> launch: catches bad configurations immediately (not asynchronous faults).
#define EP_CHECK_LAUNCH() EP_CUDA_CHECK(cudaGetLastError())

#define EP_REQUIRE(cond, msg)                                                                  \
  do {                                                                                         \
    if (!(cond)) throw std::invalid_argument(std::string(msg));                                \
  } while (0)

namespace ep {
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
// SMs of the current device (asked per call: a process may drive more than one device).
inline int num_sms() {
  int dev = 0, sms = 0;
  EP_CUDA_CHECK(cudaGetDevice(&dev));
  EP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}
template <typename T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace ep
