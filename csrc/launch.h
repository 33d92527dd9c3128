// Kernel launches with programmatic dependent launch (PDL). A kernel launched through ep::launch may be
// scheduled while the kernel before it on the stream is still running: its CTAs take the SMs that kernel's CTAs
// leave, set up their shared memory, and only then wait for it to finish. That hides a launch and a prologue
// per kernel boundary, which a decode layer of a few dozen microseconds pays several times. So every kernel
// launched here calls ep::wait_previous_grid() before it reads or writes any global memory that another kernel
// writes or reads (weights and launch parameters excepted), in every CTA and before any early return:
// a grid that ends without waiting could end before its predecessor, and its successor would wait on it alone.
#pragma once
#include <atomic>
#include <map>
#include <mutex>
#include <utility>

#include "cuda_check.h"

namespace ep {

// Process-wide switch (on by default), read at each launch: a graph captured with it keeps its edges.
inline std::atomic<bool>& programmatic_launch() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

// What a call site's launches need to know about a kernel on the device they run on (its shared-memory limit set,
// its occupancy): cudaFuncSetAttribute and the occupancy query act on the current device only, so a process that
// drives several devices asks on each. compute() runs once per (device, key) for the call site (whose lambda type
// gives it its own table); its exceptions propagate and leave nothing recorded.
template <typename Compute>
int once_per_device(int key, Compute&& compute) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, int> known;
  int dev = 0;
  EP_CUDA_CHECK(cudaGetDevice(&dev));
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find({dev, key});
  if (it != known.end()) return it->second;
  const int value = compute();
  known.emplace(std::make_pair(dev, key), value);
  return value;
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = programmatic_launch().load(std::memory_order_relaxed) ? 1 : 0;
  EP_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace ep

#ifdef __CUDACC__
namespace ep {
// Lets the next kernel on the stream start launching: its CTAs still wait for this grid to end before they touch
// memory, so calling this first only lets them take SMs as this grid's CTAs leave. Without the call the release
// comes as this grid's warps end.
__device__ __forceinline__ void release_next_grid() { cudaTriggerProgrammaticLaunchCompletion(); }
// Returns once the previous kernel on the stream has ended and its writes are visible (at once without PDL).
__device__ __forceinline__ void wait_previous_grid() { cudaGridDependencySynchronize(); }
// The start of a kernel with nothing to set up before it waits.
__device__ __forceinline__ void enter_grid() {
  release_next_grid();
  wait_previous_grid();
}
}  // namespace ep
#endif
