// Slot metadata for the local experts (NVFP4_SPEC section 7) and the deterministic weighted combine.
//
// moe_align reproduces experts.map_slots exactly: slots are ordered by (local expert, t, k), i.e. a stable
// counting sort of the (t, k) pairs by local expert. One CTA walks the pairs in chunks; within a chunk a
// warp ranks equal experts with __match_any_sync and per-warp histograms give each warp its base, so the
// result never depends on scheduling. Everything stays on the device: no host sync, fixed launch shape,
// CUDA-graph capturable. Ids outside [expert_begin, expert_begin + num_local) belong to other ranks and
// are skipped.
#include "cuda_check.h"
#include "experts_device.cuh"
#include "launch.h"
#include "registry.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace {

constexpr int kAlignThreads = 512;
constexpr int kAlignWarps = kAlignThreads / 32;
constexpr int kMaxLocalExperts = 1024;

__device__ __forceinline__ int local_expert(const int* topk_idx, int p, int expert_begin, int num_local) {
  const int e = topk_idx[p] - expert_begin;
  return (e >= 0 && e < num_local) ? e : -1;
}

__global__ void __launch_bounds__(kAlignThreads) moe_align_kernel(const int* __restrict__ topk_idx, int num_pairs,
                                                                 int num_local, int expert_begin,
                                                                 int* __restrict__ counts, int* __restrict__ offsets,
                                                                 int* __restrict__ slot_pair,
                                                                 int* __restrict__ pair_slot) {
  // No early release of the next grid: that is a persistent GEMM whose CTAs would take every SM and idle there
  // for as long as this one CTA walks the pairs, keeping the kernels of other streams (the shared expert) off
  // those SMs meanwhile. The same holds for every kernel a grouped GEMM follows.
  ep::wait_previous_grid();
  extern __shared__ int smem[];
  int* hist = smem;                                // [kAlignWarps][num_local] per-chunk counts
  int* cursor = smem + kAlignWarps * num_local;    // [num_local + 1] running counts, then offsets
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int i = tid; i < kAlignWarps * num_local; i += kAlignThreads) hist[i] = 0;
  for (int i = tid; i <= num_local; i += kAlignThreads) cursor[i] = 0;
  __syncthreads();

  // Pass 1: rank of every local pair among the pairs of its expert (stored in pair_slot for now).
  for (int base = 0; base < num_pairs; base += kAlignThreads) {
    const int p = base + tid;
    const int e = p < num_pairs ? local_expert(topk_idx, p, expert_begin, num_local) : -1;
    const unsigned same = __match_any_sync(0xffffffffu, e);
    const int warp_rank = __popc(same & ((1u << lane) - 1u));
    if (e >= 0 && warp_rank == 0) hist[warp * num_local + e] = __popc(same);
    __syncthreads();
    if (e >= 0) {
      int rank = cursor[e] + warp_rank;
      for (int w = 0; w < warp; ++w) rank += hist[w * num_local + e];
      pair_slot[p] = rank;
    }
    __syncthreads();
    for (int x = tid; x < num_local; x += kAlignThreads) {
      int run = cursor[x];
      for (int w = 0; w < kAlignWarps; ++w) {
        run += hist[w * num_local + x];
        hist[w * num_local + x] = 0;
      }
      cursor[x] = run;
    }
    __syncthreads();
  }

  // Counts and offsets; cursor becomes the offsets (cursor[num_local] the number of slots).
  if (warp == 0) {
    ep::experts::warp_exclusive_scan(
        lane, num_local, [&](int x) { return cursor[x]; },
        [&](int x, int prefix) {
          if (x < num_local) counts[x] = cursor[x];
          offsets[x] = prefix;
          cursor[x] = prefix;
        });
  }
  __syncthreads();

  // Pass 2: ranks -> slots, both directions of the map; unused slots are -1.
  for (int p = tid; p < num_pairs; p += kAlignThreads) {
    const int e = local_expert(topk_idx, p, expert_begin, num_local);
    if (e >= 0) {
      const int s = cursor[e] + pair_slot[p];
      pair_slot[p] = s;
      slot_pair[s] = p;
    } else {
      pair_slot[p] = -1;
    }
  }
  for (int s = cursor[num_local] + tid; s < num_pairs; s += kAlignThreads) slot_pair[s] = -1;
}

constexpr int kCombineThreads = 256;
constexpr int kCombineChunk = 4;  // routing weights whose rows one thread loads at once

// y[t] = sum over k ascending of w[t,k] * y_slot[slot(t,k)], fp32, unfused mul/add like the reference, plus the
// addend's row for tokens [addend_begin, addend_begin + addend_rows) (the shared expert's output) before the cast.
// A token's columns are split over gridDim.y CTAs, each thread taking a float4 of columns at a time. For
// kCombineChunk weights at once the thread reads their slots, then loads all their rows, then adds them in order:
// in decode a token's combine is a few CTAs whose time is load latency, so no row load waits for another (the
// addend's is loaded first, beside them).
template <typename OutT>
__global__ void __launch_bounds__(kCombineThreads)
    combine_kernel(const float* __restrict__ y_slot, const int* __restrict__ pair_slot,
                   const float* __restrict__ topk_weights, int topk, int hidden, const float* __restrict__ addend,
                   int addend_begin, int addend_rows, OutT* __restrict__ out) {
  ep::enter_grid();
  const int t = blockIdx.x;
  const int* slots = pair_slot + static_cast<size_t>(t) * topk;
  const float* weights = topk_weights + static_cast<size_t>(t) * topk;
  const bool added = addend != nullptr && t >= addend_begin && t - addend_begin < addend_rows;
  const float* add_row = added ? addend + static_cast<size_t>(t - addend_begin) * hidden : nullptr;
  for (int c = (blockIdx.y * kCombineThreads + threadIdx.x) * 4; c < hidden; c += gridDim.y * kCombineThreads * 4) {
    const float4 a = added ? *reinterpret_cast<const float4*>(add_row + c) : make_float4(0.f, 0.f, 0.f, 0.f);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = 0; k0 < topk; k0 += kCombineChunk) {
      int s[kCombineChunk];
      float4 v[kCombineChunk];
#pragma unroll
      for (int j = 0; j < kCombineChunk; ++j) s[j] = k0 + j < topk ? slots[k0 + j] : -1;
#pragma unroll
      for (int j = 0; j < kCombineChunk; ++j) {
        if (s[j] >= 0) v[j] = *reinterpret_cast<const float4*>(y_slot + static_cast<size_t>(s[j]) * hidden + c);
      }
#pragma unroll
      for (int j = 0; j < kCombineChunk; ++j) {
        if (s[j] < 0) continue;
        const float w = weights[k0 + j];
        acc[0] = __fadd_rn(acc[0], __fmul_rn(w, v[j].x));
        acc[1] = __fadd_rn(acc[1], __fmul_rn(w, v[j].y));
        acc[2] = __fadd_rn(acc[2], __fmul_rn(w, v[j].z));
        acc[3] = __fadd_rn(acc[3], __fmul_rn(w, v[j].w));
      }
    }
    if (added) {
      acc[0] = __fadd_rn(acc[0], a.x);
      acc[1] = __fadd_rn(acc[1], a.y);
      acc[2] = __fadd_rn(acc[2], a.z);
      acc[3] = __fadd_rn(acc[3], a.w);
    }
    OutT* dst = out + static_cast<size_t>(t) * hidden + c;
    if constexpr (sizeof(OutT) == 4) {
      *reinterpret_cast<float4*>(dst) = make_float4(acc[0], acc[1], acc[2], acc[3]);
    } else {
      __nv_bfloat162 lo = __floats2bfloat162_rn(acc[0], acc[1]), hi = __floats2bfloat162_rn(acc[2], acc[3]);
      *reinterpret_cast<uint2*>(dst) =
          make_uint2(*reinterpret_cast<uint32_t*>(&lo), *reinterpret_cast<uint32_t*>(&hi));
    }
  }
}

void moe_align(std::uintptr_t topk_idx, int num_tokens, int topk, int num_local, int expert_begin,
               std::uintptr_t counts, std::uintptr_t offsets, std::uintptr_t slot_pair, std::uintptr_t pair_slot,
               std::uintptr_t stream) {
  EP_REQUIRE(num_local >= 1 && num_local <= kMaxLocalExperts,
             "moe_align: num_local must be in [1, 1024], got " + std::to_string(num_local));
  const size_t smem = sizeof(int) * (static_cast<size_t>(kAlignWarps) * num_local + num_local + 1);
  ep::once_per_device(0, [] {
    EP_CUDA_CHECK(cudaFuncSetAttribute(moe_align_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(sizeof(int) * (kAlignWarps * kMaxLocalExperts +
                                                                       kMaxLocalExperts + 1))));
    return 1;
  });
  ep::launch(moe_align_kernel, 1, kAlignThreads, smem, ep::as_stream(stream), ep::as_ptr<const int>(topk_idx),
             num_tokens * topk, num_local, expert_begin, ep::as_ptr<int>(counts), ep::as_ptr<int>(offsets),
             ep::as_ptr<int>(slot_pair), ep::as_ptr<int>(pair_slot));
}

void combine(std::uintptr_t y_slot, std::uintptr_t pair_slot, std::uintptr_t topk_weights, int num_tokens, int topk,
             int hidden, std::uintptr_t addend, int addend_begin, int addend_rows, std::uintptr_t out, bool out_bf16,
             std::uintptr_t stream) {
  EP_REQUIRE(hidden % 4 == 0, "combine: hidden must be a multiple of 4, got " + std::to_string(hidden));
  EP_REQUIRE(topk >= 1, "combine: topk must be at least 1, got " + std::to_string(topk));
  EP_REQUIRE(addend_begin >= 0 && addend_rows >= 0 && addend_begin + addend_rows <= num_tokens,
             "combine: the addend's rows must lie within the tokens, got rows [" + std::to_string(addend_begin) +
                 ", " + std::to_string(addend_begin + addend_rows) + ") of " + std::to_string(num_tokens));
  if (num_tokens == 0) return;
  // Few tokens (decode) spread each token's columns over several CTAs; many tokens take a CTA each, whose
  // threads then loop over the columns.
  const int column_blocks = (hidden / 4 + kCombineThreads - 1) / kCombineThreads;
  const int per_token = (4 * ep::num_sms() + num_tokens - 1) / num_tokens;
  const dim3 grid(num_tokens, std::max(1, std::min(column_blocks, per_token)));
  auto run = [&](auto* typed_out) {
    ep::launch(combine_kernel<std::remove_pointer_t<decltype(typed_out)>>, grid, kCombineThreads, 0,
               ep::as_stream(stream), ep::as_ptr<const float>(y_slot), ep::as_ptr<const int>(pair_slot),
               ep::as_ptr<const float>(topk_weights), topk, hidden, ep::as_ptr<const float>(addend), addend_begin,
               addend_rows, typed_out);
  };
  if (out_bf16) run(ep::as_ptr<__nv_bfloat16>(out));
  else run(ep::as_ptr<float>(out));
}

void bind_moe_align(pybind11::module_& m) {
  m.def("moe_align", &moe_align, "slot metadata (counts, offsets, slot_pair, pair_slot) from topk_idx");
  m.def("moe_combine", &combine,
        "deterministic weighted combine of per-slot outputs, plus an addend's rows, into (T, H)");
}

}  // namespace
EP_REGISTER_BINDINGS(bind_moe_align);
