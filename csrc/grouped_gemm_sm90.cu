// Grouped NVFP4-weight expert GEMMs for Hopper (no FP4 tensor cores): one launch covers every local expert.
//
// Layout choices (see shared/DESIGN.md):
// - A/B swapped: weight rows are the MMA M side (16 per m16n8k16), slots (tokens) the N side, so an expert
//   with 1..8 tokens wastes no weight bandwidth. Packed weights, their scales and the BF16 activations
//   stream through a 2-4 stage cp.async ring (16-byte copies; decode is bound by how many weight bytes are
//   in flight), and each lane dequantizes its own weight words exactly to BF16 in registers: an E2M1
//   nibble placed at bf16 bits 6-8 (+ sign at 15) is its value * 2^-126, and one bf16x2 multiply by
//   sf * 2^118 gives decode * sf * 2^-8 exactly (<= 6 significant bits); the epilogue multiplies by 2^8.
// - K is permuted consistently on both operands: lane (g, t) owns the 64 K elements [32t, 32t+32) and
//   [128+32t, 128+32t+32) of every 256-wide chunk, so each lane's weight bytes are two aligned 16-byte
//   copies and nibble pairs (i, i+4) of a 32-bit word form one bf16x2 register. Activations (BF16) are staged
//   per chunk in the same permuted, XOR-swizzled order (conflict-free loads).
// - A persistent grid walks tiles (expert, weight-row tile, slot tile) from the device offsets: experts
//   without tokens produce no tiles and read no weights; slot tiles of one weight tile are adjacent in time
//   so prefill re-reads weights from L2.
// - L1 tiles hold gate rows j..j+BM/2-1 and the matching up rows, so the epilogue applies both alphas,
//   the clamped SwiGLU and the NVFP4 re-quantization of h without another pass.
#include "cuda_check.h"
#include "experts_device.cuh"
#include "registry.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

namespace {

using namespace ep::experts;

enum Epilogue : int {
  kGateUp = 0,  // L1: gate|up fp32 (S, 2I), before the activation (tests)
  kHNvfp4 = 1,  // L1: h re-quantized with the static per-expert scale: data, scales and exact BF16 copy
  kHBf16 = 2,   // L1: h in BF16 (W4A16)
  kHF32 = 3,    // L1: h fp32 (dynamic L2 scale: quantized by requant_dynamic once amax is known)
  kYSlot = 4,   // L2: y_slot fp32 (S, H)
};

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBK = 256;              // K elements per pipeline chunk
constexpr int kActRowBytes = kBK * 2;  // one slot's BF16 chunk in shared memory
constexpr int kScaleRowBytes = kBK / 16;  // one weight row's UE4M3 scales of a chunk
constexpr float kDequantShift = 256.f;  // undoes the 2^-8 left in the dequantized weights

struct GemmArgs {
  const uint8_t* w;        // (E, N, K/2)
  const uint8_t* w_scale;  // (E, N, K/16)
  const float* w_alpha;    // L1 (E, 2) gate/up, L2 (E,)
  const __nv_bfloat16* act;  // L1: (T, K) indexed by token, L2: (S, K) indexed by slot
  const float* act_gs;     // L1: x global scale (1,), L2: h global scale (E,); null: 1
  const int* offsets;      // (E+1,)
  const int* slot_pair;    // (S,) pair index of each slot (L1 gathers token = pair / topk)
  int topk;
  int num_experts, n_rows, k, inter;
  int epilogue;
  float swiglu_limit;
  const float* h_gs;  // (E,) static h global scale (kHNvfp4)
  float* out_f32;
  uint8_t* hq_data;
  uint8_t* hq_scale;
  __nv_bfloat16* h_bf16;
};

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* src, int src_bytes) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async4(void* smem_dst, const void* src, int src_bytes) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ uint4 lds128(const void* p) {
  uint4 v;
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// Nibbles I and I+4 of w as a bf16x2 (low, high) holding value * 2^-126 each. Isolated at bits 4I / 16+4I, a
// multiply by 2^(6-4I) + 2^(12-4I) puts one copy of each nibble at bits 6-9 / 22-25 and one at 12-15 / 28-31
// (no overlaps, no carries); the mask keeps the magnitude bits of the first copy and the sign bit of the
// second. The multiply runs on the FMA pipe: the integer pipe is what bounds the dequantization.
template <int I>
__device__ __forceinline__ uint32_t e2m1_pair(uint32_t w) {
  const uint32_t x = I < 2 ? w & (0x000F000Fu << (4 * I)) : (w >> (4 * I)) & 0x000F000Fu;
  const uint32_t spread = I == 1 ? 0x104u : 0x1040u;
  uint32_t p;
  asm("mul.lo.u32 %0, %1, %2;" : "=r"(p) : "r"(x), "r"(spread));
  return p & 0x81C081C0u;
}

// Two UE4M3 scales (low byte first) -> bf16x2 (s0, s0) and (s1, s1) of sf * 2^118, exactly: e4m3 -> f16 is
// exact and every nonzero UE4M3 is a normal f16, whose exponent and top 3 mantissa bits shifted right by 3
// sit where bf16 keeps them; rebias the exponent by (127 + 118) - 15 = 230. Zero stays zero.
// 2^109 <= sf * 2^118 < 2^127, so no overflow.
__device__ __forceinline__ void scale_pair_bf16x2(uint32_t two, uint32_t& s0, uint32_t& s1) {
  uint32_t h;
  asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.rn.f16x2.e4m3x2 %0, t; }" : "=r"(h) : "r"(two));
  const uint32_t b = (((h >> 3) & 0x0FFF0FFFu) + 0x73007300u) & __vcmpne2(h, 0u);
  s0 = prmt(b, 0u, 0x1010);
  s1 = prmt(b, 0u, 0x3232);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared-memory ring: each stage holds one K chunk of the tile's packed weights (per lane: MI*4 16-byte
// words, interleaved across lanes so lds.128 is conflict-free), their scales and the slots' activations.
// Decode tiles (NI <= 2) keep 4 chunks in flight, except the smallest tile, which keeps 3 so that 5 CTAs fit
// an SM (sparse decode: more tiles resident in the first wave); wide slot tiles trade depth for occupancy.
template <int MI, int NI>
struct Tiles {
  static constexpr int BM = kWarps * 16 * MI;
  static constexpr int BN = 8 * NI;
  static constexpr int kStages = MI == 1 && NI == 1 ? 3 : NI <= 2 ? 4 : NI == 4 ? 3 : 2;
  static constexpr int kWordsPerLane = MI * 4;  // [m16 tile][row g / g+8][run]
  static constexpr int kWeightBytes = kWordsPerLane * kThreads * 16;
  static constexpr int kScaleBytes = BM * kScaleRowBytes;
  static constexpr int kActBytes = BN * kActRowBytes;
  static constexpr int kStageBytes = kWeightBytes + kScaleBytes + kActBytes;
  static constexpr int kEpiStride = BM + 4;  // floats; +4 keeps the fragment stores conflict-free
  static constexpr int kMainBytes = std::max(kStages * kStageBytes, BN * kEpiStride * 4);
  static int smem_bytes(int num_experts) { return kMainBytes + 4 * (num_experts + 1 + BN); }
};

template <int MI, int NI>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(const GemmArgs a) {
  using TL = Tiles<MI, NI>;
  constexpr int BM = TL::BM, BN = TL::BN;
  extern __shared__ __align__(16) uint8_t smem[];
  int* tile_start = reinterpret_cast<int*>(smem + TL::kMainBytes);  // [E+1]
  int* act_row = tile_start + a.num_experts + 1;                     // [BN], -1: no slot
  float* epi = reinterpret_cast<float*>(smem);                       // [BN][kEpiStride], after the K loop

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int n_tiles = a.n_rows / BM;
  const int K = a.k;
  const size_t w_row_bytes = K / 2, s_row_bytes = K / 16;
  const int nchunks = (K + kBK - 1) / kBK;
  const bool is_l1 = a.epilogue != kYSlot;
  const bool scale_rows_aligned = K % kBK == 0;

  if (warp == 0) {
    warp_exclusive_scan(
        lane, a.num_experts,
        [&](int e) { return (a.offsets[e + 1] - a.offsets[e] + BN - 1) / BN * n_tiles; },
        [&](int e, int prefix) { tile_start[e] = prefix; });
  }
  __syncthreads();
  const int total = tile_start[a.num_experts];

  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int e = expert_of(tile_start, a.num_experts, tile);
    const int slot_begin = a.offsets[e];
    const int count = a.offsets[e + 1] - slot_begin;
    const int mtiles = (count + BN - 1) / BN;
    const int local = tile - tile_start[e];
    const int nt = local / mtiles, mt = local % mtiles;
    const int slot0 = slot_begin + mt * BN;
    const int nvalid = min(BN, count - mt * BN);

    __syncthreads();  // the previous tile's epilogue is done with shared memory
    if (tid < BN) {
      int row = -1;
      if (tid < nvalid) row = is_l1 ? a.slot_pair[slot0 + tid] / a.topk : slot0 + tid;
      act_row[tid] = row;
    }
    __syncthreads();

    // Per lane: the addresses of its weight words (rows g and g+8 of each m16 tile) and, for lanes < BM,
    // of one tile row's scales.
    auto weight_row = [&](int trow) {
      const int wrow = !is_l1 ? nt * BM + trow
                       : trow < BM / 2 ? nt * (BM / 2) + trow
                                       : a.inter + nt * (BM / 2) + trow - BM / 2;
      return static_cast<size_t>(e) * a.n_rows + wrow;
    };
    const uint8_t* wp[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int r = 0; r < 2; ++r) wp[mi][r] = a.w + weight_row(warp * 16 * MI + mi * 16 + r * 8 + g) * w_row_bytes + 16 * t;
    const uint8_t* sp = a.w_scale + weight_row(tid < BM ? tid : 0) * s_row_bytes;

    auto load_chunk = [&](int c) {
      uint8_t* stage = smem + (c % TL::kStages) * TL::kStageBytes;
      uint4* wdst = reinterpret_cast<uint4*>(stage);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int run = 0; run < 2; ++run) {
            const bool ok = c * kBK + run * 128 + 32 * t < K;
            const uint8_t* src = wp[mi][r] + c * (kBK / 2) + run * 64;
            cp_async16(wdst + ((mi * 2 + r) * 2 + run) * kThreads + tid, ok ? src : a.w, ok ? 16 : 0);
          }
      if (scale_rows_aligned) {
        if (tid < BM) cp_async16(stage + TL::kWeightBytes + tid * kScaleRowBytes, sp + c * kScaleRowBytes, 16);
      } else {
        // K % 256 != 0: scale rows are only 4-byte aligned and the last chunk is partial
#pragma unroll
        for (int id = tid; id < BM * 4; id += kThreads) {
          const int row = id >> 2, word = id & 3;
          const bool ok = c * kBK + word * 64 < K;
          const uint8_t* src = a.w_scale + weight_row(row) * s_row_bytes + c * kScaleRowBytes + 4 * word;
          cp_async4(stage + TL::kWeightBytes + row * kScaleRowBytes + 4 * word, ok ? src : a.w_scale, ok ? 4 : 0);
        }
      }
      uint8_t* act_stage = stage + TL::kWeightBytes + TL::kScaleBytes;
#pragma unroll
      for (int id = tid; id < BN * 32; id += kThreads) {
        const int n = id >> 5, p = id & 31;
        const int owner = (p & 15) >> 2, j = (p & 3) | ((p >> 4) << 2);
        uint8_t* dst = act_stage + n * kActRowBytes + owner * 128 + 16 * (j ^ (owner | ((n & 1) << 2)));
        const int elem = c * kBK + p * 8;
        const int row = act_row[n];
        const bool ok = row >= 0 && elem < K;
        const __nv_bfloat16* src = ok ? a.act + static_cast<size_t>(row) * K + elem : a.act;
        cp_async16(dst, src, ok ? 16 : 0);
      }
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

#pragma unroll
    for (int c = 0; c < TL::kStages - 1; ++c) {
      if (c < nchunks) load_chunk(c);
      cp_async_commit();
    }

    const int swz = t | ((g & 1) << 2);
    for (int c = 0; c < nchunks; ++c) {
      cp_async_wait<TL::kStages - 2>();
      __syncthreads();  // chunk c visible to all; everyone is done reading chunk c-1's stage
      if (c + TL::kStages - 1 < nchunks) load_chunk(c + TL::kStages - 1);
      cp_async_commit();

      const uint8_t* stage = smem + (c % TL::kStages) * TL::kStageBytes;
      uint4 wv[MI][2][2];
      uint32_t sc[MI][2][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int run = 0; run < 2; ++run) wv[mi][r][run] = lds128(stage + 16 * (((mi * 2 + r) * 2 + run) * kThreads + tid));
          const uint8_t* srow = stage + TL::kWeightBytes + (warp * 16 * MI + mi * 16 + r * 8 + g) * kScaleRowBytes;
          scale_pair_bf16x2(*reinterpret_cast<const uint16_t*>(srow + 2 * t), sc[mi][r][0], sc[mi][r][1]);
          scale_pair_bf16x2(*reinterpret_cast<const uint16_t*>(srow + 8 + 2 * t), sc[mi][r][2], sc[mi][r][3]);
        }
      }
      const uint8_t* act_stage = stage + TL::kWeightBytes + TL::kScaleBytes + g * kActRowBytes + t * 128;

#pragma unroll
      for (int q = 0; q < 8; ++q) {
        uint4 bv[NI];
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) bv[ni] = lds128(act_stage + ni * 8 * kActRowBytes + 16 * (q ^ swz));
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          uint32_t af[MI][4];
#pragma unroll
          for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const uint32_t w = word_of(wv[mi][r][q >> 2], q & 3);
              const uint32_t s = sc[mi][r][q >> 1];
              af[mi][r] = bf16x2_mul(half ? e2m1_pair<2>(w) : e2m1_pair<0>(w), s);
              af[mi][r + 2] = bf16x2_mul(half ? e2m1_pair<3>(w) : e2m1_pair<1>(w), s);
            }
          }
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) {
            const uint32_t lo = half ? bv[ni].y : bv[ni].x, hi = half ? bv[ni].w : bv[ni].z;
            const uint32_t b0 = prmt(lo, hi, 0x5410), b1 = prmt(lo, hi, 0x7632);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) mma_bf16(acc[mi][ni], af[mi], b0, b1);
          }
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // all warps are done with the stages: the epilogue tile reuses them

#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int row = warp * 16 * MI + mi * 16 + g, n = ni * 8 + 2 * t;
        epi[n * TL::kEpiStride + row] = acc[mi][ni][0];
        epi[(n + 1) * TL::kEpiStride + row] = acc[mi][ni][1];
        epi[n * TL::kEpiStride + row + 8] = acc[mi][ni][2];
        epi[(n + 1) * TL::kEpiStride + row + 8] = acc[mi][ni][3];
      }
    }
    __syncthreads();

    if (!is_l1) {
      const float alpha = a.act_gs ? __fdiv_rn(a.w_alpha[e], a.act_gs[e]) : a.w_alpha[e];
      for (int idx = tid; idx < nvalid * (BM / 4); idx += kThreads) {
        const int n = idx / (BM / 4), c = 4 * (idx % (BM / 4));
        const float* src = epi + n * TL::kEpiStride + c;
        float4 v;
        v.x = __fmul_rn(__fmul_rn(src[0], kDequantShift), alpha);
        v.y = __fmul_rn(__fmul_rn(src[1], kDequantShift), alpha);
        v.z = __fmul_rn(__fmul_rn(src[2], kDequantShift), alpha);
        v.w = __fmul_rn(__fmul_rn(src[3], kDequantShift), alpha);
        *reinterpret_cast<float4*>(a.out_f32 + static_cast<size_t>(slot0 + n) * a.n_rows + nt * BM + c) = v;
      }
      continue;
    }

    constexpr int HALF = BM / 2;
    const float x_gs = a.act_gs ? a.act_gs[0] : 1.f;
    const float alpha_g = a.act_gs ? __fdiv_rn(a.w_alpha[2 * e], x_gs) : a.w_alpha[2 * e];
    const float alpha_u = a.act_gs ? __fdiv_rn(a.w_alpha[2 * e + 1], x_gs) : a.w_alpha[2 * e + 1];
    auto gate_up = [&](int n, int c, float& gate, float& up) {
      gate = __fmul_rn(__fmul_rn(epi[n * TL::kEpiStride + c], kDequantShift), alpha_g);
      up = __fmul_rn(__fmul_rn(epi[n * TL::kEpiStride + HALF + c], kDequantShift), alpha_u);
    };
    const int j0 = nt * HALF;  // first intermediate column of this tile

    if (a.epilogue == kGateUp) {
      for (int idx = tid; idx < nvalid * HALF; idx += kThreads) {
        const int n = idx / HALF, c = idx % HALF;
        float gate, up;
        gate_up(n, c, gate, up);
        float* row = a.out_f32 + static_cast<size_t>(slot0 + n) * (2 * a.inter);
        row[j0 + c] = gate;
        row[a.inter + j0 + c] = up;
      }
    } else if (a.epilogue == kHNvfp4) {
      const float gs = a.h_gs[e];
      for (int idx = tid; idx < nvalid * (HALF / 16); idx += kThreads) {
        const int n = idx / (HALF / 16), c = 16 * (idx % (HALF / 16));
        float h[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          float gate, up;
          gate_up(n, c + i, gate, up);
          h[i] = swiglu(gate, up, a.swiglu_limit);
        }
        const size_t s = slot0 + n;
        quantize_block16(h, gs, a.hq_data + s * (a.inter / 2) + (j0 + c) / 2, a.hq_scale + s * (a.inter / 16) + (j0 + c) / 16,
                         a.h_bf16 + s * a.inter + j0 + c);
      }
    } else {
      for (int idx = tid; idx < nvalid * (HALF / 4); idx += kThreads) {
        const int n = idx / (HALF / 4), c = 4 * (idx % (HALF / 4));
        float h[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float gate, up;
          gate_up(n, c + i, gate, up);
          h[i] = swiglu(gate, up, a.swiglu_limit);
        }
        const size_t off = static_cast<size_t>(slot0 + n) * a.inter + j0 + c;
        if (a.epilogue == kHF32) {
          *reinterpret_cast<float4*>(a.out_f32 + off) = make_float4(h[0], h[1], h[2], h[3]);
        } else {
          __nv_bfloat162 lo = __floats2bfloat162_rn(h[0], h[1]), hi = __floats2bfloat162_rn(h[2], h[3]);
          *reinterpret_cast<uint2*>(a.h_bf16 + off) =
              make_uint2(*reinterpret_cast<uint32_t*>(&lo), *reinterpret_cast<uint32_t*>(&hi));
        }
      }
    }
  }
}

// Per-expert amax of h (fp32 (S, I)): one warp per slot row; max is exact, so atomics stay deterministic.
__global__ void h_amax_kernel(const float* __restrict__ h, const int* __restrict__ offsets, int num_experts, int inter,
                              unsigned* __restrict__ amax_bits) {
  const int warps = gridDim.x * blockDim.x / 32;
  const int lane = threadIdx.x & 31;
  const int num_slots = offsets[num_experts];
  for (int s = (blockIdx.x * blockDim.x + threadIdx.x) / 32; s < num_slots; s += warps) {
    float m = 0.f;
    for (int c = lane * 4; c < inter; c += 128) {
      const float4 v = *reinterpret_cast<const float4*>(h + static_cast<size_t>(s) * inter + c);
      m = fmaxf(m, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    }
    for (int d = 16; d > 0; d >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, d));
    if (lane == 0) atomicMax(amax_bits + expert_of(offsets, num_experts, s), __float_as_uint(m));
  }
}

// Dynamic L2 scale: gs_e = 448*6 / amax_e, correctly rounded (amax 0 -> 1), then every 16-block of h is
// quantized with it.
__global__ void h_requant_kernel(const float* __restrict__ h, const int* __restrict__ offsets, int num_experts,
                                 int inter, const unsigned* __restrict__ amax_bits, uint8_t* __restrict__ hq_data,
                                 uint8_t* __restrict__ hq_scale, __nv_bfloat16* __restrict__ h_bf16,
                                 float* __restrict__ h_gs) {
  auto gs_of = [&](int e) {
    const float amax = __uint_as_float(amax_bits[e]);
    return amax > 0.f ? __fdiv_rn(448.f * 6.f, amax) : 1.f;
  };
  const int stride = gridDim.x * blockDim.x;
  const int first = blockIdx.x * blockDim.x + threadIdx.x;
  for (int e = first; e < num_experts; e += stride) h_gs[e] = gs_of(e);
  const int blocks_per_row = inter / 16;
  const long total = static_cast<long>(offsets[num_experts]) * blocks_per_row;
  for (long i = first; i < total; i += stride) {
    const int s = static_cast<int>(i / blocks_per_row), b = static_cast<int>(i % blocks_per_row);
    float x[16];
    const float4* src = reinterpret_cast<const float4*>(h + static_cast<size_t>(s) * inter + 16 * b);
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const float4 q = src[v];
      x[4 * v] = q.x, x[4 * v + 1] = q.y, x[4 * v + 2] = q.z, x[4 * v + 3] = q.w;
    }
    quantize_block16(x, gs_of(expert_of(offsets, num_experts, s)), hq_data + static_cast<size_t>(s) * (inter / 2) + 8 * b,
                     hq_scale + static_cast<size_t>(s) * (inter / 16) + b, h_bf16 + static_cast<size_t>(s) * inter + 16 * b);
  }
}

// decode(q) * sf as BF16 (exact), no global scale: the W4A4 GEMM's activation operand.
__global__ void nvfp4_dequant_rows_kernel(const uint8_t* __restrict__ data, const uint8_t* __restrict__ scale,
                                          long num_blocks, __nv_bfloat16* __restrict__ out) {
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < num_blocks;
       i += static_cast<long>(gridDim.x) * blockDim.x) {
    const uint2 codes = *reinterpret_cast<const uint2*>(data + 8 * i);
    const float sf = e4m3_to_float(scale[i]);
    uint32_t v[8];  // bf16 pairs
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t word = j < 4 ? codes.x : codes.y, sh = 8 * (j & 3);
      const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(e2m1_decode((word >> sh) & 0xF) * sf));
      const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(e2m1_decode((word >> (sh + 4)) & 0xF) * sf));
      v[j] = lo | (hi << 16);
    }
    reinterpret_cast<uint4*>(out + 16 * i)[0] = make_uint4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<uint4*>(out + 16 * i)[1] = make_uint4(v[4], v[5], v[6], v[7]);
  }
}

int num_sms() {
  static int n = [] {
    int dev = 0, v = 0;
    EP_CUDA_CHECK(cudaGetDevice(&dev));
    EP_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    return v;
  }();
  return n;
}

template <int MI, int NI>
void launch_gemm(const GemmArgs& a, int max_slots, cudaStream_t stream) {
  using TL = Tiles<MI, NI>;
  auto kernel = grouped_gemm_kernel<MI, NI>;
  const int smem = TL::smem_bytes(a.num_experts);
  static int occupancy = [&] {
    EP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       TL::smem_bytes(1024)));
    int blocks = 0;
    EP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, TL::smem_bytes(1024)));
    return std::max(blocks, 1);
  }();
  // Upper bound of the tiles any routing can produce, so the grid is fixed for a given shape.
  const long max_tiles = static_cast<long>(max_slots / TL::BN + a.num_experts) * (a.n_rows / TL::BM);
  const int grid = static_cast<int>(std::min<long>(max_tiles, static_cast<long>(num_sms()) * occupancy));
  if (grid <= 0) return;
  kernel<<<grid, kThreads, smem, stream>>>(a);
  EP_CHECK_LAUNCH();
}

// Weight rows per tile: 128 reuses each activation fragment twice and halves the tiles' fixed costs; 64
// doubles the tiles so that a few active experts still spread over every SM (sparse decode). block_m 0
// picks 128 unless even every expert being active could not fill the GPU four times over with 128-row tiles.
template <int NI>
void dispatch_m(const GemmArgs& a, int max_slots, int block_m, bool rows128_ok, cudaStream_t stream) {
  if (block_m == 0) {
    const long active_bound = std::min(a.num_experts, std::max(max_slots, 1));
    block_m = rows128_ok && active_bound * (a.n_rows / 128) >= 4L * num_sms() ? 128 : 64;
  }
  EP_REQUIRE(block_m == 64 || (block_m == 128 && rows128_ok),
             "grouped gemm: block_m must be 0, 64 or 128 (128 needs the row count to be a multiple of 128), got " +
                 std::to_string(block_m));
  if (block_m == 128) launch_gemm<2, NI>(a, max_slots, stream);
  else launch_gemm<1, NI>(a, max_slots, stream);
}

void dispatch(const GemmArgs& a, int max_slots, int block_n, int block_m, bool rows128_ok, cudaStream_t stream) {
  switch (block_n) {
    case 8: return dispatch_m<1>(a, max_slots, block_m, rows128_ok, stream);
    case 16: return dispatch_m<2>(a, max_slots, block_m, rows128_ok, stream);
    case 32: return dispatch_m<4>(a, max_slots, block_m, rows128_ok, stream);
    case 64: return dispatch_m<8>(a, max_slots, block_m, rows128_ok, stream);
    default: EP_REQUIRE(false, "grouped gemm: block_n must be 8, 16, 32 or 64, got " + std::to_string(block_n));
  }
}

void check_shape(int num_experts, int k, const char* what) {
  EP_REQUIRE(num_experts >= 1 && num_experts <= 1024,
             std::string(what) + ": num_experts must be in [1, 1024], got " + std::to_string(num_experts));
  EP_REQUIRE(k > 0 && k % 64 == 0, std::string(what) + ": K must be a positive multiple of 64, got " + std::to_string(k));
}

void grouped_l1(std::uintptr_t w13, std::uintptr_t w13_scale, std::uintptr_t w13_alpha, std::uintptr_t act,
                std::uintptr_t x_gs, std::uintptr_t offsets, std::uintptr_t slot_pair, int topk, int num_experts,
                int hidden, int inter, int max_slots, int epilogue, float swiglu_limit, std::uintptr_t h_gs,
                std::uintptr_t out_f32, std::uintptr_t hq_data, std::uintptr_t hq_scale, std::uintptr_t h_bf16,
                int block_n, int block_m, std::uintptr_t stream) {
  check_shape(num_experts, hidden, "grouped_l1");
  EP_REQUIRE(inter > 0 && inter % 64 == 0, "grouped_l1: intermediate size must be a positive multiple of 64, got " +
                                               std::to_string(inter));
  EP_REQUIRE(epilogue >= kGateUp && epilogue <= kHF32, "grouped_l1: bad epilogue " + std::to_string(epilogue));
  GemmArgs a{};
  a.w = ep::as_ptr<const uint8_t>(w13);
  a.w_scale = ep::as_ptr<const uint8_t>(w13_scale);
  a.w_alpha = ep::as_ptr<const float>(w13_alpha);
  a.act = ep::as_ptr<const __nv_bfloat16>(act);
  a.act_gs = ep::as_ptr<const float>(x_gs);
  a.offsets = ep::as_ptr<const int>(offsets);
  a.slot_pair = ep::as_ptr<const int>(slot_pair);
  a.topk = topk;
  a.num_experts = num_experts;
  a.n_rows = 2 * inter;
  a.k = hidden;
  a.inter = inter;
  a.epilogue = epilogue;
  a.swiglu_limit = swiglu_limit;
  a.h_gs = ep::as_ptr<const float>(h_gs);
  a.out_f32 = ep::as_ptr<float>(out_f32);
  a.hq_data = ep::as_ptr<uint8_t>(hq_data);
  a.hq_scale = ep::as_ptr<uint8_t>(hq_scale);
  a.h_bf16 = ep::as_ptr<__nv_bfloat16>(h_bf16);
  dispatch(a, max_slots, block_n, block_m, inter % 64 == 0, ep::as_stream(stream));
}

void grouped_l2(std::uintptr_t w2, std::uintptr_t w2_scale, std::uintptr_t w2_alpha, std::uintptr_t act,
                std::uintptr_t h_gs, std::uintptr_t offsets, int num_experts, int hidden, int inter, int max_slots,
                std::uintptr_t y_slot, int block_n, int block_m, std::uintptr_t stream) {
  check_shape(num_experts, inter, "grouped_l2");
  EP_REQUIRE(hidden > 0 && hidden % 64 == 0,
             "grouped_l2: hidden size must be a positive multiple of 64, got " + std::to_string(hidden));
  GemmArgs a{};
  a.w = ep::as_ptr<const uint8_t>(w2);
  a.w_scale = ep::as_ptr<const uint8_t>(w2_scale);
  a.w_alpha = ep::as_ptr<const float>(w2_alpha);
  a.act = ep::as_ptr<const __nv_bfloat16>(act);
  a.act_gs = ep::as_ptr<const float>(h_gs);
  a.offsets = ep::as_ptr<const int>(offsets);
  a.num_experts = num_experts;
  a.n_rows = hidden;
  a.k = inter;
  a.epilogue = kYSlot;
  a.out_f32 = ep::as_ptr<float>(y_slot);
  dispatch(a, max_slots, block_n, block_m, hidden % 128 == 0, ep::as_stream(stream));
}

void requant_dynamic(std::uintptr_t h_f32, std::uintptr_t offsets, int num_experts, int inter, int max_slots,
                     std::uintptr_t amax_ws, std::uintptr_t hq_data, std::uintptr_t hq_scale, std::uintptr_t h_bf16,
                     std::uintptr_t h_gs, std::uintptr_t stream) {
  EP_REQUIRE(inter % 16 == 0, "requant_dynamic: intermediate size must be a multiple of 16");
  cudaStream_t s = ep::as_stream(stream);
  EP_CUDA_CHECK(cudaMemsetAsync(ep::as_ptr<void>(amax_ws), 0, sizeof(unsigned) * num_experts, s));
  const int rows_grid = std::max(1, std::min((max_slots + 7) / 8, num_sms() * 8));
  h_amax_kernel<<<rows_grid, 256, 0, s>>>(ep::as_ptr<const float>(h_f32), ep::as_ptr<const int>(offsets), num_experts,
                                          inter, ep::as_ptr<unsigned>(amax_ws));
  EP_CHECK_LAUNCH();
  const long blocks = static_cast<long>(max_slots) * (inter / 16);
  const int q_grid = static_cast<int>(std::max(1L, std::min((blocks + 255) / 256, static_cast<long>(num_sms()) * 8)));
  h_requant_kernel<<<q_grid, 256, 0, s>>>(ep::as_ptr<const float>(h_f32), ep::as_ptr<const int>(offsets), num_experts,
                                          inter, ep::as_ptr<const unsigned>(amax_ws), ep::as_ptr<uint8_t>(hq_data),
                                          ep::as_ptr<uint8_t>(hq_scale), ep::as_ptr<__nv_bfloat16>(h_bf16),
                                          ep::as_ptr<float>(h_gs));
  EP_CHECK_LAUNCH();
}

void nvfp4_dequant_rows(std::uintptr_t data, std::uintptr_t scale, int rows, int k, std::uintptr_t out,
                        std::uintptr_t stream) {
  EP_REQUIRE(k % 16 == 0, "nvfp4_dequant_rows: K must be a multiple of 16, got " + std::to_string(k));
  const long blocks = static_cast<long>(rows) * (k / 16);
  if (blocks == 0) return;
  const int grid = static_cast<int>(std::min((blocks + 255) / 256, static_cast<long>(num_sms()) * 16));
  nvfp4_dequant_rows_kernel<<<grid, 256, 0, ep::as_stream(stream)>>>(
      ep::as_ptr<const uint8_t>(data), ep::as_ptr<const uint8_t>(scale), blocks, ep::as_ptr<__nv_bfloat16>(out));
  EP_CHECK_LAUNCH();
}

void bind_grouped_gemm(pybind11::module_& m) {
  m.def("grouped_l1", &grouped_l1, "L1 grouped GEMM over all local experts with the fused SwiGLU/requant epilogue");
  m.def("grouped_l2", &grouped_l2, "L2 grouped GEMM over all local experts, y_slot fp32");
  m.def("requant_dynamic", &requant_dynamic, "per-expert amax of h, then NVFP4 quantization of h");
  m.def("nvfp4_dequant_rows", &nvfp4_dequant_rows, "NVFP4 rows -> BF16 decode*sf (no global scale)");
}

}  // namespace
EP_REGISTER_BINDINGS(bind_grouped_gemm);
