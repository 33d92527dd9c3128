// Routing's expert selection: the k largest scores of each token in the order a stable descending sort gives
// them (the lower index first among equal scores), which torch.topk does not promise and torch.sort pays a
// full radix sort for (measured: 21.5 us for one token of 384 experts, a tenth of a decode layer).
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

void topk_stable(std::uintptr_t scores, int rows, int n, int k, std::uintptr_t out, std::uintptr_t stream) {
  EP_REQUIRE(n >= 1 && k >= 1 && k <= n, "topk_stable: expected 1 <= k <= n, got k=" + std::to_string(k) +
                                             " and n=" + std::to_string(n));
  if (rows == 0) return;
  ep::launch(topk_stable_kernel, (rows + kTopkWarps - 1) / kTopkWarps, kTopkWarps * 32, 0, ep::as_stream(stream),
             ep::as_ptr<const float>(scores), rows, n, k, ep::as_ptr<int64_t>(out));
}

void bind_routing(pybind11::module_& m) {
  m.def("topk_stable", &topk_stable, "indices of each row's k largest scores, lower index first among ties");
}

}  // namespace
EP_REGISTER_BINDINGS(bind_routing);
