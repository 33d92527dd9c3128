// BF16 hidden states -> NVFP4 (packed E2M1 codes, packed UE4M3 scale words, fp32 global scale) written
// straight into the symmetric activation buffer. Numerics follow NVFP4_SPEC.md section 2 bit for bit; the
// oracle is ep_runtime.nvfp4.quantize.
//
// Dynamic global scale needs amax over the whole tensor before any block can be quantized. Two kernels on
// one stream give that order without a host sync (and capture into a CUDA graph): an amax reduction into a
// scratch word (atomicMax on the bit patterns of non-negative floats, which order like their values, so
// the result does not depend on block scheduling), then the quantize kernel that derives gs from it.
#include <cstdint>

#include "bf16_device.cuh"
#include "cuda_check.h"
#include "launch.h"
#include "nvfp4_device.cuh"
#include "registry.h"

namespace {

constexpr int kBlock = 16;             // elements per UE4M3 scale
constexpr int kWordElems = 4 * kBlock;  // elements per packed scale word
constexpr int kThreads = 256;

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

// One thread per 64 elements: four 16-blocks, i.e. 32 code bytes and one scale word. Six CTAs per SM (40 registers):
// at 41-42 registers five fit, and 8192 tokens took 1-4 % longer on an H200 (bench/NOTES_experts.md, 29th session).
__global__ void __launch_bounds__(kThreads, 6) quantize_kernel(const uint4* __restrict__ x, int64_t n_words,
                                                            const float* __restrict__ static_gs,
                                                            const unsigned int* __restrict__ amax_bits,
                                                            uint4* __restrict__ q, uint32_t* __restrict__ sf_words,
                                                            float* __restrict__ gs_out) {
  ep::enter_grid();
  // gs: the static scale, or 448*6/amax of the tensor as the reference rounds it.
  const float gs = static_gs != nullptr ? *static_gs : ep::nvfp4::dynamic_global_scale(__uint_as_float(*amax_bits));
  if (blockIdx.x == 0 && threadIdx.x == 0) *gs_out = gs;
  for (int64_t wi = blockIdx.x * (int64_t)kThreads + threadIdx.x; wi < n_words; wi += (int64_t)gridDim.x * kThreads) {
    uint32_t word = 0;
    uint2 codes[2];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      float v[kBlock];
      ep::bf16x8_to_float(x[wi * 8 + b * 2], v);
      ep::bf16x8_to_float(x[wi * 8 + b * 2 + 1], v + 8);
      const ep::nvfp4::Block16 q16 = ep::nvfp4::quantize16(v, gs);
      word |= q16.sf << (8 * b);
      codes[b & 1] = q16.codes;
      // Two blocks' codes per 16-byte store and four scales per word: on quantize_block16's 8- and 1-byte stores per
      // block the kernel took 4.5 against 3.7 us at one token (bench/NOTES_experts.md, twenty-eighth session).
      if (b & 1) q[wi * 2 + (b >> 1)] = make_uint4(codes[0].x, codes[0].y, codes[1].x, codes[1].y);
    }
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
  // As many CTAs as fit on the GPU at once: a grid-stride loop over more runs the excess as a second, partial wave.
  const int per_sm = ep::once_per_device(0, [] {
    int blocks = 0;
    EP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, quantize_kernel, kThreads, 0));
    return std::max(blocks, 1);
  });
  ep::launch(quantize_kernel, grid_for(n_words, per_sm), kThreads, 0, s, ep::as_ptr<const uint4>(x), n_words,
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
