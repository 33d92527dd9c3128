// Device helpers shared by the expert kernels: the activation of the L1 epilogue and slot bookkeeping (the NVFP4
// numerics are nvfp4_device.cuh).
#pragma once
#include <cstdint>

#include "nvfp4_device.cuh"

namespace ep::experts {

// Clamped SwiGLU (NVFP4_SPEC section 5); limit = +inf disables the clamp. silu as the reference computes it, with
// the IEEE division: `__expf` and `__fdividef` were 1.5-3 % faster in L1 at m >= 512 (bench/NOTES_experts.md,
// eleventh session) but moved h by up to ~1e-5, beyond what the spec lets a kernel differ by.
__device__ __forceinline__ float swiglu(float gate, float up, float limit) {
  using ep::nvfp4::fmax_nan, ep::nvfp4::fmin_nan;  // a NaN gate or up stays NaN, as the reference's clamp keeps it
  const float g = fmin_nan(gate, limit);
  const float u = fmin_nan(fmax_nan(up, -limit), limit);
  return __fmul_rn(__fdiv_rn(g, 1.0f + expf(-g)), u);
}

// Index of the expert whose [offsets[e], offsets[e+1]) holds slot s (offsets ascending, E+1 entries).
__device__ __forceinline__ int expert_of(const int* offsets, int num_experts, int s) {
  int lo = 0, hi = num_experts;  // invariant: offsets[lo] <= s < offsets[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (offsets[mid] <= s) lo = mid; else hi = mid;
  }
  return lo;
}

// Exclusive prefix sum over n values computed by value(i), by one warp (each lane scans a contiguous
// segment); store(i, prefix) receives every prefix and store(n, total) the total. Call from all 32 lanes.
template <typename Value, typename Store>
__device__ __forceinline__ void warp_exclusive_scan(int lane, int n, Value value, Store store) {
  const int seg = (n + 31) / 32;
  const int lo = min(lane * seg, n), hi = min(lo + seg, n);
  int sum = 0;
  for (int i = lo; i < hi; ++i) sum += value(i);
  int incl = sum;
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += v;
  }
  int run = incl - sum;
  for (int i = lo; i < hi; ++i) {
    const int v = value(i);
    store(i, run);
    run += v;
  }
  if (lane == 31) store(n, incl);
}

}  // namespace ep::experts
