// Device helpers shared by the expert kernels: NVFP4 numerics (GEMM epilogues, requantization, activation
// dequantization) and slot bookkeeping. The quantization rules mirror ep_runtime/nvfp4.py operation for
// operation, so quantized bytes match the reference bit for bit given the same fp32 input.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace ep::experts {

__device__ __forceinline__ float e4m3_to_float(uint32_t byte) {
  __nv_fp8_e4m3 v;
  v.__x = static_cast<__nv_fp8_storage_t>(byte);
  return static_cast<float>(v);
}

// Non-negative fp32 -> UE4M3 byte, round-to-nearest-even, saturating at 448 (nvfp4.e4m3_from_float).
__device__ __forceinline__ uint32_t e4m3_from_float(float v) {
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// fp32 -> E2M1 code with the reference's tie rules: `>` where the lower code is even, `>=` where odd.
__device__ __forceinline__ uint32_t e2m1_encode(float v) {
  const float a = fabsf(v);
  uint32_t c = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
  return c | (signbit(v) ? 8u : 0u);
}

// Code bits 0-2 at fp32 bits 22-24 read as value * 2^-126 (codes 0-1 as denormals, kept: no -ftz).
__device__ __forceinline__ float e2m1_decode(uint32_t code) {
  const float m = __uint_as_float((code & 7u) << 22) * 0x1p126f;
  return (code & 8u) ? -m : m;
}

// Quantizes 16 consecutive fp32 values with global scale gs: writes 8 packed bytes, the UE4M3 scale byte
// and (optionally) the 16 exact BF16 values decode(q)*sf that the next GEMM consumes.
__device__ __forceinline__ void quantize_block16(const float (&x)[16], float gs, uint8_t* data8, uint8_t* scale1,
                                                 __nv_bfloat16* deq16) {
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(x[i]));
  const uint32_t sf = e4m3_from_float(__fdiv_rn(__fmul_rn(gs, amax), 6.0f));
  const float sff = e4m3_to_float(sf);
  const float ratio = sff > 0.f ? __fdiv_rn(gs, sff) : 0.f;
  uint32_t words[2] = {0u, 0u};
  uint32_t deq[8];  // bf16 pairs
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const uint32_t code = sff > 0.f ? e2m1_encode(__fmul_rn(x[i], ratio)) : 0u;
    words[i >> 3] |= code << (4 * (i & 7));
    // exact: decode * sf has <= 6 significant bits
    const uint32_t bits = __bfloat16_as_ushort(__float2bfloat16_rn(e2m1_decode(code) * sff));
    deq[i >> 1] = (i & 1) ? (deq[i >> 1] | (bits << 16)) : bits;
  }
  *reinterpret_cast<uint2*>(data8) = make_uint2(words[0], words[1]);
  *scale1 = static_cast<uint8_t>(sf);
  if (deq16 != nullptr) {
    reinterpret_cast<uint4*>(deq16)[0] = make_uint4(deq[0], deq[1], deq[2], deq[3]);
    reinterpret_cast<uint4*>(deq16)[1] = make_uint4(deq[4], deq[5], deq[6], deq[7]);
  }
}

// Clamped SwiGLU (NVFP4_SPEC section 5); limit = +inf disables the clamp. silu as the reference computes it, with
// the IEEE division: `__expf` and `__fdividef` were 1.5-3 % faster in L1 at m >= 512 (bench/NOTES_experts.md,
// eleventh session) but moved h by up to ~1e-5, beyond what the spec lets a kernel differ by.
__device__ __forceinline__ float swiglu(float gate, float up, float limit) {
  const float g = fminf(gate, limit);
  const float u = fminf(fmaxf(up, -limit), limit);
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
