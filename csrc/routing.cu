// Routing's expert selection: the k largest scores of each token in the order a stable descending sort gives
// them (the lower index first among equal scores), which torch.topk does not promise and torch.sort pays a
// full radix sort for (measured: 21.5 us for one token of 384 experts, a tenth of a decode layer). route_v4 is
// the whole DeepSeek-V4 routing of NVFP4_SPEC section 6 after the router GEMM in one launch: in an eager decode
// forward each of the dozen small torch kernels it replaces cost more host time than its GPU time.
#include "cuda_check.h"
#include "launch.h"
#include "registry.h"

#include <cstdint>

namespace {

constexpr int kTopkWarps = 8;  // rows per CTA, one warp each

// A key per (score, index) that orders like (score descending, index ascending): the score's bits made
// monotonic (-0 counts as +0, so they tie; NaN above +inf, as torch.sort puts it), then the complemented
// index. Every key is unique and lies strictly between 0 and ~0.
__device__ __forceinline__ uint64_t selection_key(float v, int i) {
  const uint32_t b = __float_as_uint(v + 0.0f);
  const uint32_t u = isnan(v) ? 0xFFFFFFFFu : (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return static_cast<uint64_t>(u) << 32 | (0xFFFFFFFEu - static_cast<uint32_t>(i));
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
    uint64_t best = 0;
    for (int i = lane; i < n; i += 32) {
      const uint64_t key = selection_key(r[i], i);
      if (key < prev && key > best) best = key;
    }
    for (int d = 16; d > 0; d >>= 1) {
      const uint64_t other = __shfl_xor_sync(0xffffffffu, best, d);
      best = other > best ? other : best;
    }
    if (lane == 0) out[static_cast<size_t>(row) * k + j] = 0xFFFFFFFEu - static_cast<uint32_t>(best);
    prev = best;
  }
}

// sqrt(softplus(x)) as torch computes it in fp32 (threshold 20, beta 1), so the scores match bit for bit.
__device__ __forceinline__ float sqrt_softplus(float x) { return sqrtf(x > 20.0f ? x : log1pf(expf(x))); }

// One warp per token. Selection (unless given_ids holds hash-routed ids) by the biased scores, as
// topk_stable_kernel selects; lane j < k then holds expert j and its unbiased score. Weights are the scores over
// their sum, added in ascending j, plus 1e-20, times the scaling factor (two roundings, as the spec writes it).
__global__ void __launch_bounds__(kTopkWarps * 32)
    route_v4_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                    const int* __restrict__ given_ids, int rows, int n, int k, float scaling, int* __restrict__ ids,
                    float* __restrict__ weights) {
  ep::enter_grid();
  const int row = blockIdx.x * kTopkWarps + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp leaves together
  const int lane = threadIdx.x & 31;
  const float* r = logits + static_cast<size_t>(row) * n;
  int mine = 0;  // lane j's expert, j < k
  if (given_ids != nullptr) {
    if (lane < k) mine = given_ids[static_cast<size_t>(row) * k + lane];
  } else {
    uint64_t prev = ~0ull;
    for (int j = 0; j < k; ++j) {
      uint64_t best = 0;
      for (int i = lane; i < n; i += 32) {
        const float s = sqrt_softplus(r[i]);
        const uint64_t key = selection_key(bias != nullptr ? s + bias[i] : s, i);
        if (key < prev && key > best) best = key;
      }
      for (int d = 16; d > 0; d >>= 1) {
        const uint64_t other = __shfl_xor_sync(0xffffffffu, best, d);
        best = other > best ? other : best;
      }
      if (lane == j) mine = static_cast<int>(0xFFFFFFFEu - static_cast<uint32_t>(best));
      prev = best;
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
  if (rows == 0) return;
  ep::launch(route_v4_kernel, (rows + kTopkWarps - 1) / kTopkWarps, kTopkWarps * 32, 0, ep::as_stream(stream),
             ep::as_ptr<const float>(logits), ep::as_ptr<const float>(bias), ep::as_ptr<const int>(given_ids), rows,
             n, k, scaling, ep::as_ptr<int>(ids), ep::as_ptr<float>(weights));
}

void bind_routing(pybind11::module_& m) {
  m.def("topk_stable", &topk_stable, "indices of each row's k largest scores, lower index first among ties");
  m.def("route_v4", &route_v4, "DeepSeek-V4 routing from router logits: int32 ids and fp32 weights per token");
}

}  // namespace
EP_REGISTER_BINDINGS(bind_routing);
