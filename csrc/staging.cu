// BF16 hidden states -> NVFP4 (packed E2M1 codes, packed UE4M3 scale words, fp32 global scale) written
// straight into the symmetric activation buffer. Numerics follow NVFP4_SPEC.md section 2 bit for bit; the
// oracle is ep_runtime.nvfp4.quantize.
//
// Dynamic global scale needs amax over the whole tensor before any block can be quantized. Two kernels on
// one stream give that order without a host sync (and capture into a CUDA graph): an amax reduction into a
// scratch word (atomicMax on the bit patterns of non-negative floats, which order like their values, so
// the result does not depend on block scheduling), then the quantize kernel that derives gs from it.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "cuda_check.h"
#include "launch.h"
#include "registry.h"

namespace {

constexpr int kBlock = 16;             // elements per UE4M3 scale
constexpr int kWordElems = 4 * kBlock;  // elements per packed scale word
constexpr int kThreads = 256;

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// |x| max over the tensor, as the bit pattern of a non-negative fp32 (scratch must be zeroed first).
__global__ void __launch_bounds__(kThreads) amax_kernel(const uint4* __restrict__ x, int64_t n_vec,
                                                        unsigned int* __restrict__ amax_bits) {
  ep::enter_grid();
  uint32_t m = 0;  // max of (bf16 bits & 0x7fff): non-negative bf16 bit patterns order like their values
  for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < n_vec; i += (int64_t)gridDim.x * kThreads) {
    const uint4 v = x[i];
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) m = max(m, max(w[j] & 0x7fffu, (w[j] >> 16) & 0x7fffu));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  __shared__ uint32_t warp_max[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) m = max(m, warp_max[w]);
    if (m) atomicMax(amax_bits, m << 16);  // bf16 -> fp32 bits is a shift, order preserved
  }
}

// E2M1 round-to-nearest-even, saturating at 6: counts the boundaries below |v| exactly as the reference
// does (`>` where the lower code is even so ties stay down, `>=` where it is odd so ties go up).
__device__ __forceinline__ uint32_t e2m1_code(float v) {
  const float a = fabsf(v);
  const uint32_t mag = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
  return mag | (signbit(v) ? 8u : 0u);
}

// One thread per 64 elements: four 16-blocks, i.e. 32 code bytes and one scale word.
// gs: static -> *static_gs; dynamic -> 448*6/amax (amax 0 -> 1) rounded as the reference rounds it.
__global__ void __launch_bounds__(kThreads) quantize_kernel(const uint4* __restrict__ x, int64_t n_words,
                                                            const float* __restrict__ static_gs,
                                                            const unsigned int* __restrict__ amax_bits,
                                                            uint4* __restrict__ q, uint32_t* __restrict__ sf_words,
                                                            float* __restrict__ gs_out) {
  ep::enter_grid();
  float gs;
  if (static_gs != nullptr) {
    gs = *static_gs;
  } else {
    const float amax = __uint_as_float(*amax_bits);
    // One correctly rounded division, as NVFP4_SPEC writes it (and as the reference computes it).
    gs = amax > 0.f ? __fdiv_rn(2688.0f, amax) : 1.0f;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *gs_out = gs;
  for (int64_t wi = blockIdx.x * (int64_t)kThreads + threadIdx.x; wi < n_words; wi += (int64_t)gridDim.x * kThreads) {
    uint32_t word = 0;
    uint32_t codes[8];  // 4 blocks x 2 words of 8 nibbles
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint4 lo = x[wi * 8 + b * 2], hi = x[wi * 8 + b * 2 + 1];
      const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      float v[kBlock];
      float bmax = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        v[2 * j] = bf16_bits_to_float(w[j] & 0xffffu);
        v[2 * j + 1] = bf16_bits_to_float(w[j] >> 16);
        bmax = fmaxf(bmax, fmaxf(fabsf(v[2 * j]), fabsf(v[2 * j + 1])));
      }
      // Same fp32 operation order as the reference: (gs * bmax) / 6, RNE to e4m3 with saturation.
      const __nv_fp8_storage_t sf = __nv_cvt_float_to_fp8(__fdiv_rn(__fmul_rn(gs, bmax), 6.0f), __NV_SATFINITE, __NV_E4M3);
      const float sf_f = __half2float(__half(__nv_cvt_fp8_to_halfraw(sf, __NV_E4M3)));
      word |= uint32_t(sf) << (8 * b);
      uint32_t c0 = 0, c1 = 0;
      if (sf_f > 0.f) {
        const float ratio = __fdiv_rn(gs, sf_f);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          c0 |= e2m1_code(__fmul_rn(v[j], ratio)) << (4 * j);
          c1 |= e2m1_code(__fmul_rn(v[8 + j], ratio)) << (4 * j);
        }
      }
      codes[2 * b] = c0;
      codes[2 * b + 1] = c1;
    }
    q[wi * 2] = make_uint4(codes[0], codes[1], codes[2], codes[3]);
    q[wi * 2 + 1] = make_uint4(codes[4], codes[5], codes[6], codes[7]);
    sf_words[wi] = word;
  }
}

int grid_for(int64_t items, int per_sm_blocks) {
  const int64_t need = (items + kThreads - 1) / kThreads;
  return (int)std::max<int64_t>(1, std::min<int64_t>(need, (int64_t)ep::num_sms() * per_sm_blocks));
}

// x: bf16 (n_elems), n_elems % 64 == 0, 16-byte aligned; q: uint8 (n_elems/2); sf_words: int32 (n_elems/64);
// gs_out: fp32 (1). static_gs == 0 selects the dynamic scale, which needs amax_scratch (one 4-byte word).
void stage_nvfp4(std::uintptr_t x, int64_t n_elems, std::uintptr_t static_gs, std::uintptr_t amax_scratch,
                 std::uintptr_t q, std::uintptr_t sf_words, std::uintptr_t gs_out, std::uintptr_t stream) {
  EP_REQUIRE(n_elems % kWordElems == 0, "stage_nvfp4: n_elems must be a multiple of 64");
  EP_REQUIRE(static_gs != 0 || amax_scratch != 0, "stage_nvfp4: dynamic scale needs amax_scratch");
  const cudaStream_t s = ep::as_stream(stream);
  const int64_t n_words = n_elems / kWordElems;
  if (static_gs == 0) {
    EP_CUDA_CHECK(cudaMemsetAsync(ep::as_ptr<void>(amax_scratch), 0, sizeof(unsigned int), s));
    if (n_elems > 0) {  // a plain launch: it follows the memset, and a programmatic edge joins two kernels only
      amax_kernel<<<grid_for(n_elems / 8, 4), kThreads, 0, s>>>(ep::as_ptr<const uint4>(x), n_elems / 8,
                                                               ep::as_ptr<unsigned int>(amax_scratch));
      EP_CHECK_LAUNCH();
    }
  }
  ep::launch(quantize_kernel, grid_for(n_words, 8), kThreads, 0, s, ep::as_ptr<const uint4>(x), n_words,
             static_gs ? ep::as_ptr<const float>(static_gs) : nullptr, ep::as_ptr<const unsigned int>(amax_scratch),
             ep::as_ptr<uint4>(q), ep::as_ptr<uint32_t>(sf_words), ep::as_ptr<float>(gs_out));
}

void bind_staging(pybind11::module_& m) {
  m.def("stage_nvfp4", &stage_nvfp4, "BF16 -> NVFP4 into caller-provided buffers (see csrc/staging.cu)",
        pybind11::arg("x"), pybind11::arg("n_elems"), pybind11::arg("static_gs"), pybind11::arg("amax_scratch"),
        pybind11::arg("q"), pybind11::arg("sf_words"), pybind11::arg("gs_out"), pybind11::arg("stream"));
}

}  // namespace
EP_REGISTER_BINDINGS(bind_staging);
