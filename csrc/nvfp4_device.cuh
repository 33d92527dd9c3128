// NVFP4 numerics on the device, one copy for every kernel that quantizes or dequantizes activations (staging of
// the hidden states, the L1 epilogue's requantization of h, the dynamic L2 requantization, the W4A4 activation
// dequantization). The rules mirror ep_runtime/nvfp4.py operation for operation (NVFP4_SPEC.md section 2), so the
// bytes match the reference bit for bit given the same fp32 input.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace ep::nvfp4 {

__device__ __forceinline__ float e4m3_to_float(uint32_t byte) {
  __nv_fp8_e4m3 v;
  v.__x = static_cast<__nv_fp8_storage_t>(byte);
  return static_cast<float>(v);
}

// Non-negative fp32 -> UE4M3 byte, round-to-nearest-even, saturating at 448 (nvfp4.e4m3_from_float).
__device__ __forceinline__ uint32_t e4m3_from_float(float v) {
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// fp32 -> E2M1 code, round-to-nearest-even saturating at 6: counts the boundaries below |v| as the reference does
// (`>` where the lower code is even so ties stay down, `>=` where it is odd so ties go up).
__device__ __forceinline__ uint32_t e2m1_encode(float v) {
  const float a = fabsf(v);
  const uint32_t c = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
  return c | (signbit(v) ? 8u : 0u);
}

// Code bits 0-2 at fp32 bits 22-24 read as value * 2^-126 (codes 0-1 as denormals, kept: no -ftz).
__device__ __forceinline__ float e2m1_decode(uint32_t code) {
  const float m = __uint_as_float((code & 7u) << 22) * 0x1p126f;
  return (code & 8u) ? -m : m;
}

// max and min that keep a NaN, as torch's amax and clamp do (fmaxf / fminf drop it): a NaN that reaches a kernel
// unchecked (check=False) stays NaN in its output, as in the reference, instead of turning into plausible values.
__device__ __forceinline__ float fmax_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float fmin_nan(float a, float b) {
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Dynamic global scale 448 * 6 / amax, one correctly rounded division as the spec writes it (amax 0 -> 1).
__device__ __forceinline__ float dynamic_global_scale(float amax) {
  return amax > 0.f ? __fdiv_rn(448.f * 6.f, amax) : 1.f;
}

// One quantized 16-block: codes of elements 0-7 in codes.x, 8-15 in codes.y (element i at bits 4*(i%8)), its
// UE4M3 scale byte and that scale's value.
struct Block16 {
  uint2 codes;
  uint32_t sf;
  float sf_value;
};

__device__ __forceinline__ Block16 quantize16(const float (&x)[16], float gs) {
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmax_nan(amax, fmax_nan(fabsf(x[2 * i]), fabsf(x[2 * i + 1])));
  // The reference's fp32 operation order: (gs * amax) / 6, then RNE to e4m3 with saturation.
  const uint32_t sf = e4m3_from_float(__fdiv_rn(__fmul_rn(gs, amax), 6.0f));
  const float sff = e4m3_to_float(sf);
  uint32_t words[2] = {0u, 0u};
  if (sff > 0.f) {  // a zero scale leaves every code 0
    const float ratio = __fdiv_rn(gs, sff);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      words[0] |= e2m1_encode(__fmul_rn(x[j], ratio)) << (4 * j);
      words[1] |= e2m1_encode(__fmul_rn(x[8 + j], ratio)) << (4 * j);
    }
  }
  return {make_uint2(words[0], words[1]), sf, sff};
}

// decode(q) * sf of a block as 8 bf16 pairs, exact (the product has at most 6 significant bits): the values a
// GEMM consumes in place of the block.
__device__ __forceinline__ void dequant16(uint2 codes, float sf, uint32_t (&pairs)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t word = j < 4 ? codes.x : codes.y, sh = 8 * (j & 3);
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(e2m1_decode((word >> sh) & 0xF) * sf));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(e2m1_decode((word >> (sh + 4)) & 0xF) * sf));
    pairs[j] = lo | (hi << 16);
  }
}

__device__ __forceinline__ void store_bf16x16(__nv_bfloat16* dst, const uint32_t (&pairs)[8]) {
  reinterpret_cast<uint4*>(dst)[0] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
  reinterpret_cast<uint4*>(dst)[1] = make_uint4(pairs[4], pairs[5], pairs[6], pairs[7]);
}

// Quantizes one block of h with global scale gs into its row: 8 code bytes, the scale byte and (optionally) the
// 16 exact BF16 values the next GEMM consumes.
__device__ __forceinline__ void quantize_block16(const float (&x)[16], float gs, uint8_t* data8, uint8_t* scale1,
                                                 __nv_bfloat16* deq16) {
  const Block16 b = quantize16(x, gs);
  *reinterpret_cast<uint2*>(data8) = b.codes;
  *scale1 = static_cast<uint8_t>(b.sf);
  if (deq16 != nullptr) {
    uint32_t pairs[8];
    dequant16(b.codes, b.sf_value, pairs);
    store_bf16x16(deq16, pairs);
  }
}

}  // namespace ep::nvfp4
