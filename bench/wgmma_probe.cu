// How fast can the tensor pipe run the prefill tile's products, and what do the dequantization and the copies cost
// it? Every SM runs one CTA whose consumer warpgroups repeat the grouped GEMM's per-chunk work (64 K of a weight
// tile against a slot tile in shared memory, random data) with nothing else around it (no barriers, no epilogue,
// and no producer except in the last two variants). Variants:
//   rs_fixed  A fragments dequantized once, then only the register-A wgmmas (the tensor pipe's ceiling for RS)
//   rs_deq    the kernel's consumer chunk: dequantize each atom from shared memory, issue its wgmmas, drain
//   ss_fixed  A (BF16) read from shared memory by the wgmma itself (SS form)
//   ss_deq    dequantize into shared memory (128B-swizzled BF16), then SS wgmmas
//   rs_bulk   rs_deq while a third warpgroup copies a 256x128 stage's bytes per chunk (16 KB of activations and
//             9 KB of weights, L2-resident) into shared memory by bulk copy, paced by the consumers' progress
//   rs_cpasync the same with the activations by 16-byte cp.async from every copier thread (L1's gather path)
//   rs_half   rs_bulk with half the activation bytes: what each CTA of a 2-CTA cluster would still fetch if the
//             pair multicast every activation chunk (the other half, written by the peer, is not emulated, so this
//             bounds what multicast could gain)
//   rs_wonly  rs_bulk with the weights only (activations that cost nothing)
//   rs_spin   the copier warpgroup polls the consumers' progress as in rs_bulk but copies nothing
//   rs_nap    rs_bulk with the copier sleeping 64 ns between polls of the progress word
// with 2 (or 1) consumer warpgroups, each owning 2 atoms x 128 slots (256x128 tile) or 1 atom x 256 slots (128x256).
// Cycles per chunk are printed next to the tensor-pipe minimum (1024 for 256x128x64 at 2048 BF16 MACs per cycle).
// Build and run on the GPU machine:
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch=sm_90a -Icsrc -I<cutlass>/include bench/wgmma_probe.cu
// Result on an H100 (bench/NOTES_experts.md, ninth session, second run): two warpgroups, 256x128: rs_fixed 1024
// cycles per chunk (the minimum), rs_deq 1095 (94 %), ss_fixed 1024, ss_deq 1778; 128x256: rs_deq 1024, ss_deq 1157.
// One warpgroup alone: rs_fixed 563 and rs_deq 793 against a minimum of 512. With a stage's copies streaming in
// beside them: rs_bulk 1212, rs_cpasync 1290 cycles. So the dequantization hides under two warpgroups' wgmmas.
// Tenth session: rs_half 1223 and rs_wonly 1158-1182, while rs_spin (polling, no copies) takes 1170 and rs_nap
// 1138: most of what the copier costs here is its polling of the progress word, not the bytes it moves. The kernel
// itself says otherwise (twelfth session): with its real copies, half of the activation bytes each SM receives is
// 3-8 % of its time, though multicast, which halves what the L2 cache reads but not what each SM receives, gained
// nothing.
#include "cuda_check.h"
#include "sm90_fragments.cuh"
#include "sm90_pipeline.cuh"

#include <cute/arch/mma_sm90_desc.hpp>
#include <cutlass/arch/reg_reconfig.h>

#include <algorithm>
#include <cstdio>
#include <vector>

using namespace ep::sm90;

namespace {

enum Mode : int { kRsFixed, kRsDeq, kSsFixed, kSsDeq, kRsBulk, kRsCpAsync, kRsHalf, kRsWeightsOnly, kRsSpin, kRsNap };
constexpr bool copies(int mode) { return mode >= kRsBulk; }
constexpr int threads(int mode) { return copies(mode) ? 384 : 256; }
constexpr int kActBytes = 16384, kWeightBytes = 9216, kCopyBytes = kActBytes + kWeightBytes;  // one chunk's copies
// Activation bytes the copier brings by bulk copy per chunk.
constexpr int bulk_act_bytes(int mode) {
  return mode == kRsBulk || mode == kRsNap ? kActBytes : mode == kRsHalf ? kActBytes / 2 : 0;
}
constexpr int kSourceChunks = 8;  // per CTA, rotating: 132 x 8 x 25 KB stays in the 50 MB L2
constexpr int kChunkBytesB = 256 * 128;    // slot tile: up to 256 slots x 64 K BF16, 128B-swizzled
constexpr int kAtomA = 64 * 128;           // one atom's 64 rows x 64 K BF16 (SS forms)
constexpr int kAtomCodes = 2048 + 256;     // one atom's codes + scales in the SM90 layout
constexpr int kChunks = 2;                 // buffers the chunks alternate between
constexpr int kSmemB = kChunks * kChunkBytesB;
constexpr int kSmemA = kChunks * 4 * kAtomA;
constexpr int kSmemCodes = kChunks * 4 * kAtomCodes;
constexpr int kSmem = 1024 + kSmemB + kSmemA + kSmemCodes + 64;  // + progress counter and two barriers

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

// The copier warpgroup: chunk i's bytes into buffer i % 2 (the A region, unused by the RS forms) once the consumers
// have started chunk i, as the grouped GEMM's producer keeps the ring ahead of them.
template <int Mode>
__device__ __forceinline__ void copy_chunks(int iters, const uint8_t* src, uint8_t* dst_buf, volatile int* progress,
                                            uint64_t* bar) {
  const int ctid = threadIdx.x - 256;
  for (int i = 0; i < iters; ++i) {
    spin_until([&] {
      if (Mode == kRsNap) __nanosleep(64);
      return *progress > i;
    });
    if constexpr (Mode == kRsSpin) continue;
    const int b = i & 1;
    if (i >= 2) wait_phase(&bar[b], ((i >> 1) - 1) & 1);
    uint8_t* dst = dst_buf + b * kCopyBytes;
    const uint8_t* s = src + (static_cast<size_t>(blockIdx.x) * kSourceChunks + i % kSourceChunks) * kCopyBytes;
    if (ctid == 0) {
      constexpr int kAct = bulk_act_bytes(Mode);
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&bar[b], kAct + kWeightBytes);
      if (kAct > 0) cute::SM90_BULK_COPY_G2S::copy(s, &bar[b], dst, kAct);
      cute::SM90_BULK_COPY_G2S::copy(s + kActBytes, &bar[b], dst + kActBytes, kWeightBytes);
    }
    if constexpr (Mode == kRsCpAsync) {
#pragma unroll
      for (int j = 0; j < kActBytes / 16 / 128; ++j) {
        const int piece = ctid + 128 * j;
        cp_async16(smem_u32(dst + 16 * piece), s + 16 * piece, 16);
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(&bar[b]);
    }
  }
  for (int i = iters > 2 && Mode != kRsSpin ? iters - 2 : iters; i < iters; ++i) {
    wait_phase(&bar[i & 1], (i >> 1) & 1);
  }
}

template <int Mode, int NA, int BN>
__global__ void __launch_bounds__(threads(Mode), 1)
    probe(int iters, int warpgroups, const uint8_t* src, float* sink, long long* cycles) {
  extern __shared__ uint8_t raw[];
  // Rounded up by pointer arithmetic so that the compiler keeps every pointer below in the shared space.
  uint8_t* smem = raw + ((1024u - (smem_u32(raw) & 1023u)) & 1023u);
  uint8_t* b_buf = smem;
  uint8_t* a_buf = b_buf + kSmemB;
  uint8_t* c_buf = a_buf + kSmemA;
  volatile int* progress = reinterpret_cast<volatile int*>(c_buf + kSmemCodes);
  uint64_t* bar = reinterpret_cast<uint64_t*>(c_buf + kSmemCodes + 16);
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
  if (threadIdx.x == 0) {
    *progress = 0;
    for (int b = 0; b < 2; ++b) cutlass::arch::ClusterBarrier::init(&bar[b], Mode == kRsCpAsync ? 129 : 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  if constexpr (copies(Mode)) {
    if (threadIdx.x >= 256) {
      cutlass::arch::warpgroup_reg_dealloc<40>();
      copy_chunks<Mode>(iters, src, a_buf, progress, bar);
      return;
    }
    cutlass::arch::warpgroup_reg_alloc<232>();
  }
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
    if (copies(Mode) && threadIdx.x == 0) *progress = it + 1;
    const uint32_t b_chunk = smem_u32(b_buf + c * kChunkBytesB);
#pragma unroll
    for (int ia = 0; ia < NA; ++ia) {
      if constexpr (Mode != kSsFixed && Mode != kSsDeq) {
        if (Mode != kRsFixed) dequant_atom(codes(c, ia), scales(c, ia), af[ia]);
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

__global__ void fill_random(uint32_t* p, long n) {
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < n; i += static_cast<long>(gridDim.x) * blockDim.x) {
    p[i] = hash(static_cast<uint32_t>(i) * 2246822519u + 3);
  }
}

template <int Mode, int NA, int BN>
void run(const char* name, int warpgroups, int iters, const uint8_t* src) {
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
  kernel<<<sms, threads(Mode), kSmem>>>(iters / 4, warpgroups, src, sink, cycles);  // warm-up
  EP_CHECK_LAUNCH();
  float best_ms = 1e30f;
  std::vector<long long> cyc(sms);
  double best_cycles = 0;
  for (int rep = 0; rep < 5; ++rep) {
    EP_CUDA_CHECK(cudaEventRecord(e0));
    kernel<<<sms, threads(Mode), kSmem>>>(iters, warpgroups, src, sink, cycles);
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
  uint8_t* src = nullptr;  // what the copier warpgroup streams in
  const long src_bytes = static_cast<long>(ep::num_sms()) * kSourceChunks * kCopyBytes;
  EP_CUDA_CHECK(cudaMalloc(&src, src_bytes));
  fill_random<<<256, 256>>>(reinterpret_cast<uint32_t*>(src), src_bytes / 4);
  EP_CHECK_LAUNCH();
  for (int wgs : {2, 1}) {
    run<kRsFixed, 2, 128>("rs_fixed", wgs, iters, src);
    run<kRsDeq, 2, 128>("rs_deq", wgs, iters, src);
    run<kSsFixed, 2, 128>("ss_fixed", wgs, iters, src);
    run<kSsDeq, 2, 128>("ss_deq", wgs, iters, src);
    run<kRsFixed, 1, 256>("rs_fixed", wgs, iters, src);
    run<kRsDeq, 1, 256>("rs_deq", wgs, iters, src);
    run<kSsFixed, 1, 256>("ss_fixed", wgs, iters, src);
    run<kSsDeq, 1, 256>("ss_deq", wgs, iters, src);
  }
  run<kRsBulk, 2, 128>("rs_bulk", 2, iters, src);
  run<kRsCpAsync, 2, 128>("rs_cpasync", 2, iters, src);
  run<kRsHalf, 2, 128>("rs_half", 2, iters, src);
  run<kRsWeightsOnly, 2, 128>("rs_wonly", 2, iters, src);
  run<kRsSpin, 2, 128>("rs_spin", 2, iters, src);
  run<kRsNap, 2, 128>("rs_nap", 2, iters, src);
  run<kRsDeq, 2, 128>("rs_deq", 2, iters, src);  // again at the end: the clock after the copy variants
  EP_CUDA_CHECK(cudaFree(src));
  return 0;
}
