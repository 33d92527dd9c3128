// Routing's expert selection: the k largest scores of each token in the order a stable descending sort gives
// them (the lower index first among equal scores), which torch.topk does not promise and torch.sort pays a
// full radix sort for (measured: 21.5 us for one token of 384 experts, a tenth of a decode layer). route_v4 is
// the whole DeepSeek-V4 routing of NVFP4_SPEC section 6 after the router GEMM in one launch: in an eager decode
// forward each of the dozen small torch kernels it replaces cost more host time than its GPU time.
#include "bf16_device.cuh"
#include "cuda_check.h"
#include "launch.h"
#include "registry.h"

#include <cstdint>

namespace {

constexpr int kTopkWarps = 8;  // rows per CTA, one warp each
// route_v4 keeps its CTA's score bits in shared memory: 4 bytes per expert and row, within the 48 KB a launch gets
// without asking (ops.MAX_ROUTE_EXPERTS).
constexpr int kMaxRouteExperts = 48 * 1024 / (4 * kTopkWarps);

// A key per (score, index) that orders like (score descending, index ascending): the score's bits made
// monotonic (-0 counts as +0, so they tie; NaN above +inf, as torch.sort puts it), then the complemented
// index. Every key is unique and lies strictly between 0 and ~0.
__device__ __forceinline__ uint32_t monotonic_bits(float v) {
  const uint32_t b = __float_as_uint(v + 0.0f);
  return isnan(v) ? 0xFFFFFFFFu : (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ uint64_t selection_key(uint32_t bits, int i) {
  return static_cast<uint64_t>(bits) << 32 | (0xFFFFFFFEu - static_cast<uint32_t>(i));
}
__device__ __forceinline__ int key_index(uint64_t key) {
  return static_cast<int>(0xFFFFFFFEu - static_cast<uint32_t>(key));
}

// The largest key below prev of a row whose keys key_of(i) a warp holds spread over its lanes, on every lane.
template <typename KeyOf>
__device__ __forceinline__ uint64_t next_key(int n, int lane, uint64_t prev, KeyOf key_of) {
  uint64_t best = 0;
  for (int i = lane; i < n; i += 32) {
    const uint64_t key = key_of(i);
    if (key < prev && key > best) best = key;
  }
  for (int d = 16; d > 0; d >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffffu, best, d);
    best = other > best ? other : best;
  }
  return best;
}

// One warp per row: k rounds, each the warp's largest key below the previous round's.
__global__ void __launch_bounds__(kTopkWarps * 32)
    topk_stable_kernel(const float* __restrict__ scores, int rows, int n, int k, int64_t* __restrict__ out) {
  ep::enter_grid();
  const int row = blockIdx.x * kTopkWarps + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp leaves together
  const int lane = threadIdx.x & 31;
  const float* r = scores + static_cast<size_t>(row) * n;
  uint64_t prev = ~0ull;
  for (int j = 0; j < k; ++j) {
    prev = next_key(n, lane, prev, [&](int i) { return selection_key(monotonic_bits(r[i]), i); });
    if (lane == 0) out[static_cast<size_t>(row) * k + j] = key_index(prev);
  }
}

// Router logits of a few tokens: (T, H) bf16 hidden states times the (E, H) bf16 router weight, fp32 out. Each
// product of two bf16 values is exact in fp32, so these are the products the GEMM forms, summed in fp32 in a fixed
// order. At decode a GEMM library splits K over two kernels (6 us for one token on an H200, on every rank's critical
// path) where the job is streaming the 5.5 MB weight once: 3 us here. Its cost grows with the tokens (the products
// and the sums' reduction run on the CUDA cores), past the library's from 5 tokens on (ops.ROUTER_LOGITS_MAX_TOKENS).
constexpr int kLogitThreads = 256;  // they split H: each warp's sums are added, then the warps' in warp order
constexpr int kLogitRows = 4;       // experts per CTA: each hidden chunk a thread loads serves all of them
constexpr int kLogitChunks = 2;     // 16-byte chunks per thread, row and token in flight at once (H <= 4096 a round)
constexpr int kLogitTokens = 8;     // tokens per pass

// CTA b takes experts [4b, 4b + 4) for every token, kTokens at a time. Its thread i adds the products of the rows'
// 16-byte chunks i, i + 256, i + 512, ... (chunks = H / 8) to 0; each warp adds its lanes' sums by an xor butterfly,
// then the first threads the warps' sums in warp order.
template <int kTokens>
__global__ void __launch_bounds__(kLogitThreads)
    router_logits_kernel(const uint4* __restrict__ hidden, const uint4* __restrict__ weight, int tokens, int experts,
                         int chunks, float* __restrict__ logits) {
  constexpr int kWarps = kLogitThreads / 32;
  __shared__ float partial[kWarps][kLogitRows][kTokens];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int e0 = blockIdx.x * kLogitRows, rows = min(kLogitRows, experts - e0);
  const uint4* w_rows = weight + static_cast<size_t>(e0) * chunks;
  ep::release_next_grid();
  // No kernel writes the router weight: its lines head for L2 while the kernel before (staging) ends.
  for (int i = threadIdx.x * 8; i < rows * chunks; i += kLogitThreads * 8) {  // a 128-byte line each
    asm volatile("prefetch.global.L2 [%0];" ::"l"(w_rows + i));
  }
  ep::wait_previous_grid();
  const uint4 zero = make_uint4(0, 0, 0, 0);  // past the last chunk: products of +0 leave a sum's bits as they are
  for (int t0 = 0; t0 < tokens; t0 += kTokens) {
    float acc[kLogitRows][kTokens] = {};
    for (int c0 = threadIdx.x; c0 < chunks; c0 += kLogitThreads * kLogitChunks) {
      // Every load of a round is in flight before its first product: issued token by token, after the previous
      // token's products, they cost a memory latency per token (at 8 tokens 10.0 against 7.2 us on an H200).
      uint4 wq[kLogitRows][kLogitChunks], xq[kTokens][kLogitChunks];
#pragma unroll
      for (int u = 0; u < kLogitChunks; ++u) {
        const int c = c0 + u * kLogitThreads;
#pragma unroll
        for (int r = 0; r < kLogitRows; ++r) {
          wq[r][u] = r < rows && c < chunks ? __ldg(w_rows + static_cast<size_t>(r) * chunks + c) : zero;
        }
#pragma unroll
        for (int t = 0; t < kTokens; ++t) {
          xq[t][u] = t0 + t < tokens && c < chunks ? __ldg(hidden + static_cast<size_t>(t0 + t) * chunks + c) : zero;
        }
      }
#pragma unroll
      for (int u = 0; u < kLogitChunks; ++u) {
        float w[kLogitRows][8];
#pragma unroll
        for (int r = 0; r < kLogitRows; ++r) ep::bf16x8_to_float(wq[r][u], w[r]);
#pragma unroll
        for (int t = 0; t < kTokens; ++t) {
          float x[8];
          ep::bf16x8_to_float(xq[t][u], x);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
#pragma unroll
            for (int r = 0; r < kLogitRows; ++r) acc[r][t] = fmaf(w[r][i], x[i], acc[r][t]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kLogitRows; ++r) {
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        float v = acc[r][t];
        for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
        if (lane == 0) partial[warp][r][t] = v;
      }
    }
    __syncthreads();
    const int r = threadIdx.x / kTokens, t = threadIdx.x % kTokens;
    if (r < rows && t0 + t < tokens) {
      float sum = partial[0][r][t];
      for (int w = 1; w < kWarps; ++w) sum += partial[w][r][t];
      logits[static_cast<size_t>(t0 + t) * experts + e0 + r] = sum;
    }
    __syncthreads();  // partial is written again by the next pass
  }
}

// sqrt(softplus(x)) as torch computes it in fp32 (threshold 20, beta 1), so the scores match bit for bit.
__device__ __forceinline__ float sqrt_softplus(float x) { return sqrtf(x > 20.0f ? x : log1pf(expf(x))); }

// One warp per token. Selection (unless given_ids holds hash-routed ids) by the biased scores, as
// topk_stable_kernel selects; lane j < k then holds expert j and its unbiased score. Weights are the scores over
// their sum, added in ascending j, plus 1e-20, times the scaling factor (two roundings, as the spec writes it).
// The CTA's threads first turn its rows' logits into the selection's score bits in shared memory, each once: the
// k rounds then only compare. (Computed in every round by the token's own warp, the scores of one decode token
// took 18 us of latency, a seventh of a one-GPU decode layer's graph.)
__global__ void __launch_bounds__(kTopkWarps * 32)
    route_v4_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                    const int* __restrict__ given_ids, int rows, int n, int k, float scaling, int* __restrict__ ids,
                    float* __restrict__ weights) {
  extern __shared__ uint32_t score_bits[];  // [kTopkWarps][n], rows of this CTA
  ep::enter_grid();
  const int row0 = blockIdx.x * kTopkWarps;
  if (given_ids == nullptr) {
    const int count = min(kTopkWarps, rows - row0) * n;
    const float* block_logits = logits + static_cast<size_t>(row0) * n;
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
      const float s = sqrt_softplus(block_logits[e]);
      score_bits[e] = monotonic_bits(bias != nullptr ? s + bias[e % n] : s);
    }
    __syncthreads();
  }
  const int warp = threadIdx.x / 32, row = row0 + warp;
  if (row >= rows) return;  // the whole warp leaves together
  const int lane = threadIdx.x & 31;
  const float* r = logits + static_cast<size_t>(row) * n;
  int mine = 0;  // lane j's expert, j < k
  if (given_ids != nullptr) {
    if (lane < k) mine = given_ids[static_cast<size_t>(row) * k + lane];
  } else {
    const uint32_t* bits = score_bits + warp * n;
    uint64_t prev = ~0ull;
    for (int j = 0; j < k; ++j) {
      prev = next_key(n, lane, prev, [&](int i) { return selection_key(bits[i], i); });
      if (lane == j) mine = key_index(prev);
    }
  }
  // A given id outside [0, n) reads nothing and gives a NaN weight (the ids come from a table on the device).
  const float s = lane >= k ? 0.0f : mine >= 0 && mine < n ? sqrt_softplus(r[mine]) : __int_as_float(0x7FC00000);
  float sum = 0.0f;
  for (int j = 0; j < k; ++j) sum += __shfl_sync(0xffffffffu, s, j);
  if (lane < k) {
    ids[static_cast<size_t>(row) * k + lane] = mine;
    weights[static_cast<size_t>(row) * k + lane] = s / (sum + 1e-20f) * scaling;
  }
}

void topk_stable(std::uintptr_t scores, int rows, int n, int k, std::uintptr_t out, std::uintptr_t stream) {
  EP_REQUIRE(n >= 1 && k >= 1 && k <= n, "topk_stable: expected 1 <= k <= n, got k=" + std::to_string(k) +
                                             " and n=" + std::to_string(n));
  if (rows == 0) return;
  ep::launch(topk_stable_kernel, (rows + kTopkWarps - 1) / kTopkWarps, kTopkWarps * 32, 0, ep::as_stream(stream),
             ep::as_ptr<const float>(scores), rows, n, k, ep::as_ptr<int64_t>(out));
}

void route_v4(std::uintptr_t logits, std::uintptr_t bias, std::uintptr_t given_ids, int rows, int n, int k,
              float scaling, std::uintptr_t ids, std::uintptr_t weights, std::uintptr_t stream) {
  EP_REQUIRE(n >= 1 && k >= 1 && k <= n && k <= 32, "route_v4: expected 1 <= k <= min(n, 32), got k=" +
                                                        std::to_string(k) + " and n=" + std::to_string(n));
  EP_REQUIRE(given_ids != 0 || n <= kMaxRouteExperts, "route_v4: expected at most " +
                                                          std::to_string(kMaxRouteExperts) + " experts, got " +
                                                          std::to_string(n));
  if (rows == 0) return;
  const size_t smem = given_ids != 0 ? 0 : sizeof(uint32_t) * kTopkWarps * n;
  ep::launch(route_v4_kernel, (rows + kTopkWarps - 1) / kTopkWarps, kTopkWarps * 32, smem, ep::as_stream(stream),
             ep::as_ptr<const float>(logits), ep::as_ptr<const float>(bias), ep::as_ptr<const int>(given_ids), rows,
             n, k, scaling, ep::as_ptr<int>(ids), ep::as_ptr<float>(weights));
}

void router_logits(std::uintptr_t hidden, std::uintptr_t weight, int tokens, int experts, int hidden_size,
                   std::uintptr_t logits, std::uintptr_t stream) {
  EP_REQUIRE(hidden_size > 0 && hidden_size % 8 == 0,
             "router_logits: expected a hidden size that is a positive multiple of 8, got " +
                 std::to_string(hidden_size));
  if (tokens == 0 || experts == 0) return;
  const int ctas = (experts + kLogitRows - 1) / kLogitRows;
  const auto launch_for = [&](auto kernel) {
    ep::launch(kernel, ctas, kLogitThreads, 0, ep::as_stream(stream), ep::as_ptr<const uint4>(hidden),
               ep::as_ptr<const uint4>(weight), tokens, experts, hidden_size / 8, ep::as_ptr<float>(logits));
  };
  // The fewest sums per thread that hold the tokens; more tokens take passes of kLogitTokens.
  if (tokens == 1) {
    launch_for(router_logits_kernel<1>);
  } else if (tokens == 2) {
    launch_for(router_logits_kernel<2>);
  } else if (tokens <= 4) {
    launch_for(router_logits_kernel<4>);
  } else {
    launch_for(router_logits_kernel<kLogitTokens>);
  }
}

void bind_routing(pybind11::module_& m) {
  m.def("router_logits", &router_logits, "fp32 router logits of bf16 hidden states and a bf16 router weight");
  m.def("topk_stable", &topk_stable, "indices of each row's k largest scores, lower index first among ties");
  m.def("route_v4", &route_v4, "DeepSeek-V4 routing from router logits: int32 ids and fp32 weights per token");
}

}  // namespace
EP_REGISTER_BINDINGS(bind_routing);
