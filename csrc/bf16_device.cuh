// BF16 on the device as the kernels read it: 16-byte chunks of hidden states or router weights widened to fp32.
#pragma once
#include <cstdint>

namespace ep {

// The eight bf16 values of a 16-byte chunk as fp32, in memory order (exactly: bf16 is fp32's upper half).
__device__ __forceinline__ void bf16x8_to_float(const uint4& v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

}  // namespace ep
