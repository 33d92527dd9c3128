// How fast can the tensor pipe run the prefill tile's products, and what does the dequantization cost it?
// Every SM runs one CTA whose consumer warpgroups repeat the grouped GEMM's per-chunk work (64 K of a weight
// tile against a slot tile in shared memory, random data) with nothing else around it: no producer, no
// barriers, no epilogue. Variants:
//   rs_fixed  A fragments dequantized once, then only the register-A wgmmas (the tensor pipe's ceiling for RS)
//   rs_deq    the kernel's consumer chunk: dequantize each atom from shared memory, issue its wgmmas, drain
//   ss_fixed  A (BF16) read from shared memory by the wgmma itself (SS form)
//   ss_deq    dequantize into shared memory (128B-swizzled BF16), then SS wgmmas
// with 2 (or 1) consumer warpgroups, each owning 2 atoms x 128 slots (256x128 tile) or 1 atom x 256 slots (128x256).
// Cycles per chunk are printed next to the tensor-pipe minimum (1024 for 256x128x64 at 2048 BF16 MACs per cycle).
// Build and run on the GPU machine:
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch=sm_90a -Icsrc -I<cutlass>/include bench/wgmma_probe.cu
// Result on an H100 (bench/NOTES_experts.md, ninth session): two warpgroups, 256x128: rs_fixed 1024 cycles per chunk
// (the minimum), rs_deq 1087 (94 %), ss_fixed 1024, ss_deq 1995; 128x256: rs_deq 1024, ss_deq 1255. One warpgroup
// alone: rs_fixed 560 and rs_deq 834 against a minimum of 512. So the consumer's dequantization nearly hides under
// two warpgroups' wgmmas; what the grouped GEMM loses beyond that is outside this loop.
#include "cuda_check.h"
#include "sm90_fragments.cuh"

#include <cute/arch/mma_sm90_desc.hpp>

#include <algorithm>
#include <cstdio>
#include <vector>

using namespace ep::sm90;

namespace {

enum Mode : int { kRsFixed, kRsDeq, kSsFixed, kSsDeq };
constexpr int kChunkBytesB = 256 * 128;    // slot tile: up to 256 slots x 64 K BF16, 128B-swizzled
constexpr int kAtomA = 64 * 128;           // one atom's 64 rows x 64 K BF16 (SS forms)
constexpr int kAtomCodes = 2048 + 256;     // one atom's codes + scales in the SM90 layout
constexpr int kChunks = 2;                 // buffers the chunks alternate between
constexpr int kSmemB = kChunks * kChunkBytesB;
constexpr int kSmemA = kChunks * 4 * kAtomA;
constexpr int kSmemCodes = kChunks * 4 * kAtomCodes;
constexpr int kSmem = 1024 + kSmemB + kSmemA + kSmemCodes;

template <int N>
struct GmmaSS;
template <>
struct GmmaSS<128> {
  using Op = cute::SM90::GMMA::MMA_64x128x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
};
template <>
struct GmmaSS<256> {
  using Op = cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
};
template <int N, size_t... I>
__device__ __forceinline__ void gmma_ss_impl(uint64_t da, uint64_t db, float (&d)[N / 2], std::index_sequence<I...>) {
  GmmaSS<N>::Op::fma(da, db, d[I]...);
}

__device__ __forceinline__ uint32_t hash(uint32_t x) {
  x ^= x >> 16, x *= 0x7feb352du, x ^= x >> 15, x *= 0x846ca68bu, x ^= x >> 16;
  return x;
}

// A fragment word (row r of the atom, k pair at byte offset kb of its 128-byte row) -> its swizzled place.
__device__ __forceinline__ uint32_t swz(int r, int kb) { return r * 128 + ((((kb >> 4) ^ r) & 7) << 4) + (kb & 15); }

template <int Mode, int NA, int BN>
__global__ void __launch_bounds__(256, 1) probe(int iters, int warpgroups, float* sink, long long* cycles) {
  extern __shared__ uint8_t raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t{1023});
  uint8_t* b_buf = smem;
  uint8_t* a_buf = b_buf + kSmemB;
  uint8_t* c_buf = a_buf + kSmemA;
  // Random BF16 of magnitude 2^-7..2 (B and A), random codes, scale bytes in the encoder's range.
  for (int i = threadIdx.x; i < (kSmemB + kSmemA) / 4; i += blockDim.x) {
    const uint32_t h = hash(i * 2654435761u + blockIdx.x);
    const uint32_t lo = (h & 0x807Fu) | ((120 + (h >> 7) % 8) << 7), hi = ((h >> 16) & 0x807Fu) | ((120 + (h >> 23) % 8) << 7);
    reinterpret_cast<uint32_t*>(b_buf)[i] = lo | hi << 16;
  }
  for (int i = threadIdx.x; i < kSmemCodes; i += blockDim.x) {
    const uint32_t h = hash(i * 40503u + 7 * blockIdx.x + 1);
    c_buf[i] = (i % kAtomCodes) < 2048 ? h & 0xFF : 8 + h % 136;
  }
  __syncthreads();
  const int wg = threadIdx.x >> 7, cw = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if (wg >= warpgroups) return;
  float acc[NA][BN / 2];
#pragma unroll
  for (int i = 0; i < NA; ++i)
#pragma unroll
    for (int j = 0; j < BN / 2; ++j) acc[i][j] = 0.f;
  auto codes = [&](int c, int ia) { return c_buf + (c * 4 + wg * NA + ia) * kAtomCodes + cw * 512 + lane * 16; };
  auto scales = [&](int c, int ia) { return c_buf + (c * 4 + wg * NA + ia) * kAtomCodes + 2048 + cw * 64 + g * 8; };
  auto a_atom = [&](int c, int ia) { return a_buf + (c * 4 + wg * NA + ia) * kAtomA; };
  uint32_t af[NA][4][4];
  if (Mode == kRsFixed) {
#pragma unroll
    for (int ia = 0; ia < NA; ++ia) dequant_atom(codes(0, ia), scales(0, ia), af[ia]);
  }
  const long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
    const int c = it & (kChunks - 1);
    const uint32_t b_chunk = smem_u32(b_buf + c * kChunkBytesB);
#pragma unroll
    for (int ia = 0; ia < NA; ++ia) {
      if constexpr (Mode == kRsFixed || Mode == kRsDeq) {
        if (Mode == kRsDeq) dequant_atom(codes(c, ia), scales(c, ia), af[ia]);
        wgmma_atom<BN>(b_chunk, af[ia], acc[ia]);
      } else {
        if constexpr (Mode == kSsDeq) {
          // The warp's 16 rows of the atom, written where an SS descriptor reads them (128B swizzle).
          dequant_atom(codes(c, ia), scales(c, ia), af[ia]);
          uint8_t* a = a_atom(c, ia);
#pragma unroll
          for (int st = 0; st < 4; ++st) {
            const int r = cw * 16 + g, kb = 32 * st + 4 * t;
            *reinterpret_cast<uint32_t*>(a + swz(r, kb)) = af[ia][st][0];
            *reinterpret_cast<uint32_t*>(a + swz(r + 8, kb)) = af[ia][st][1];
            *reinterpret_cast<uint32_t*>(a + swz(r, kb + 16)) = af[ia][st][2];
            *reinterpret_cast<uint32_t*>(a + swz(r + 8, kb + 16)) = af[ia][st][3];
          }
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
          asm volatile("bar.sync %0, 128;" ::"r"(1 + wg));
        }
        const uint32_t la = act_desc_low(smem_u32(a_atom(c, ia))), lb = act_desc_low(b_chunk);
        fence_all(acc[ia]);
        cute::warpgroup_arrive();
#pragma unroll
        for (int st = 0; st < 4; ++st) {
          gmma_ss_impl<BN>(act_desc(la + 2 * st), act_desc(lb + 2 * st), acc[ia], std::make_index_sequence<BN / 2>{});
        }
        cute::warpgroup_commit_batch();
      }
    }
    cute::warpgroup_wait<0>();
#pragma unroll
    for (int ia = 0; ia < NA; ++ia) fence_all(acc[ia]);
  }
  const long long t1 = clock64();
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < NA; ++i)
#pragma unroll
    for (int j = 0; j < BN / 2; ++j) s += acc[i][j];
  sink[blockIdx.x * 256 + threadIdx.x] = s;
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

template <int Mode, int NA, int BN>
void run(const char* name, int warpgroups, int iters) {
  auto kernel = probe<Mode, NA, BN>;
  const int sms = ep::num_sms();
  EP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  float* sink = nullptr;
  long long* cycles = nullptr;
  EP_CUDA_CHECK(cudaMalloc(&sink, sms * 256 * sizeof(float)));
  EP_CUDA_CHECK(cudaMalloc(&cycles, sms * sizeof(long long)));
  cudaEvent_t e0, e1;
  EP_CUDA_CHECK(cudaEventCreate(&e0));
  EP_CUDA_CHECK(cudaEventCreate(&e1));
  kernel<<<sms, 256, kSmem>>>(iters / 4, warpgroups, sink, cycles);  // warm-up
  EP_CHECK_LAUNCH();
  float best_ms = 1e30f;
  std::vector<long long> cyc(sms);
  double best_cycles = 0;
  for (int rep = 0; rep < 5; ++rep) {
    EP_CUDA_CHECK(cudaEventRecord(e0));
    kernel<<<sms, 256, kSmem>>>(iters, warpgroups, sink, cycles);
    EP_CHECK_LAUNCH();
    EP_CUDA_CHECK(cudaEventRecord(e1));
    EP_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0.f;
    EP_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    EP_CUDA_CHECK(cudaMemcpy(cyc.data(), cycles, sms * sizeof(long long), cudaMemcpyDeviceToHost));
    long long mx = 0;
    for (long long c : cyc) mx = std::max(mx, c);
    if (ms < best_ms) best_ms = ms, best_cycles = static_cast<double>(mx);
  }
  const double macs = static_cast<double>(sms) * iters * warpgroups * NA * 64.0 * BN * 64.0;
  const double min_cycles = warpgroups * NA * 64.0 * BN * 64.0 / 2048.0;  // per chunk, 2048 BF16 MACs per cycle
  std::printf("%-9s %dWG %dx%-3d: %7.1f cycles/chunk (min %6.1f, %5.1f %%), %6.1f TFLOP/s at %4.0f MHz\n", name,
              warpgroups, NA, BN, best_cycles / iters, min_cycles, 100.0 * min_cycles * iters / best_cycles,
              2.0 * macs / (best_ms * 1e-3) / 1e12, best_cycles / (best_ms * 1e3));
  EP_CUDA_CHECK(cudaFree(sink));
  EP_CUDA_CHECK(cudaFree(cycles));
}

}  // namespace

int main() {  // a CUDA error ends it with the failing call's message (EP_CUDA_CHECK throws)
  const int iters = 20000;
  for (int wgs : {2, 1}) {
    run<kRsFixed, 2, 128>("rs_fixed", wgs, iters);
    run<kRsDeq, 2, 128>("rs_deq", wgs, iters);
    run<kSsFixed, 2, 128>("ss_fixed", wgs, iters);
    run<kSsDeq, 2, 128>("ss_deq", wgs, iters);
    run<kRsFixed, 1, 256>("rs_fixed", wgs, iters);
    run<kRsDeq, 1, 256>("rs_deq", wgs, iters);
    run<kSsFixed, 1, 256>("ss_fixed", wgs, iters);
    run<kSsDeq, 1, 256>("ss_deq", wgs, iters);
  }
  return 0;
}
