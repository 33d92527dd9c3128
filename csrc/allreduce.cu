// Sum all-reduce over peer-to-peer (NVLink) pointers into symmetric memory, for the W ranks of one node; and the
// reduce-scatter and all-gather of token_mode 'dp', with the same barriers.
// No NVLink multicast anywhere (multimem / cuMulticast are off on our machines).
//
// Determinism: every output element is ((x_0 + x_1) + x_2) + ... in fp32, ranks in ascending order, then
// one rounding to the element type. One-shot and two-shot therefore produce the same bits, on every rank.
//
// Synchronization: each CTA index b has its own flag row; CTA b of every rank touches only the element set
// of CTA b (same grid, same strides on all ranks), so a barrier among the CTAs with index b is enough and no
// grid-wide barrier is needed. Flags carry a per-CTA epoch that advances by the number of barriers each
// call, so flags are never reset between calls (a CUDA graph replays the same kernel with no host input).
// A waiting thread gives up after timeout_ns (%globaltimer), records the missing peer in host-mapped
// status words and the CTA exits; the Python wrapper turns that into an error naming the peer.
// Latch: a rank that gives up also marks itself in every rank's gave_up row, and a kernel that finds any mark in its
// own row as it starts signals nothing and moves nothing, until reset_signals() zeroes the blocks. Without it a rank's
// next call, already queued, would reuse the epochs of the one that timed out and could pair with a late peer's call,
// both passing with the wrong data; and the ranks still waiting leave when they see the mark, not a timeout later.
// Agreement: at a kernel's first barrier every rank also leaves its call's tag (call_tag: the collective, its grid,
// its tensor's place in the arena, its sizes) with each peer and compares theirs with its own. Ranks asked for
// different things (another token count, another collective) would move bytes to and from the wrong places; instead
// every CTA that meets a peer's sees the disagreement, records the peers in the status words, moves nothing and still
// takes one more barrier, so with equal grids the epochs stay in step (CTAs beyond a peer's smaller grid time out).
#include <cuda_bf16.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "allreduce_signals.cuh"
#include "cuda_check.h"
#include "registry.h"

namespace {

using namespace ep::allreduce;

constexpr int kThreads = 512;
constexpr double kMaxTimeoutS = 1e9;  // config.MAX_TIMEOUT_S
constexpr int kOneShotVecsPerThread = 4;  // values a thread holds in registers between read and write

struct Args {
  std::uintptr_t data[kMaxRanks];  // the tensor on each rank (same offset in every rank's symmetric arena)
  std::uintptr_t sig[kMaxRanks];   // each rank's signal block (see allreduce_signals.cuh)
  int rank;
  int world;
  int64_t n_vec;  // 16-byte vectors in the tensor
  unsigned long long timeout_ns;
  uint32_t tag;  // what this rank was asked to do (call_tag), the same on every rank of a sound call; 0: unset
  // host-mapped: [0] phase+1 of the first failed barrier, then a group of kMaxRanks words per kind below, word q of a
  // group set for rank q
  int* status;
};
constexpr int kMissingWords = 1;                  // the peers this rank stopped waiting for
constexpr int kDisagreedWords = 1 + kMaxRanks;    // the peers whose tag differed from this rank's
constexpr int kGaveUpWords = 1 + 2 * kMaxRanks;   // the ranks (this one too) found to have given up
constexpr int kStatusWords = 1 + 3 * kMaxRanks;
constexpr int kGaveUpPollSpins = 64;  // spins between looks at the gave_up row while waiting (it is a slower path)

// A barrier's outcome; a CTA that timed out exits, one that disagreed skips its data movement.
enum : int { kPassed = 0, kDisagreed = 1, kTimedOut = 2 };

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The host reads the status words without a sync: a failure's words are written, fenced, and only then flagged by
// the phase word. The first failure's phase stays: calls refused after it (the latch) would otherwise name themselves.
__device__ void note(const Args& a, int word) { reinterpret_cast<volatile int*>(a.status)[word] = 1; }
__device__ void flag_phase(const Args& a, int phase) {
  __threadfence_system();
  volatile int* st = a.status;
  if (st[0] == 0) st[0] = phase + 1;
  __threadfence_system();
}

// Ranks marked in this rank's gave_up row (the latch, above), as a bit mask.
__device__ uint32_t marked_ranks(const Args& a) {
  uint32_t mask = 0;
  for (int q = 0; q < a.world; ++q)
    if (*reinterpret_cast<volatile uint32_t*>(gave_up_ptr(a.sig[a.rank], q)) != 0) mask |= 1u << q;
  return mask;
}
__device__ void note_marked(const Args& a, uint32_t mask) {
  for (int q = 0; q < a.world; ++q)
    if (mask >> q & 1) note(a, kGaveUpWords + q);
}

__device__ void give_up(const Args& a, int missing, int phase) {
  note(a, kMissingWords + missing);
  note(a, kGaveUpWords + a.rank);
  flag_phase(a, phase);
  for (int q = 0; q < a.world; ++q) st_release_sys(gave_up_ptr(a.sig[q], a.rank), 1);
}

// Barrier among the CTAs with index `slot` on all ranks. Thread t < world signals peer t and waits for it.
// The __syncthreads before the release store orders every thread's earlier reads and writes (including
// stores into peers' memory) before the signal; the one after the acquire load orders every later access.
// With `agree`, thread t first leaves the call's tag with peer t (the release store publishes it) and, once t has
// signalled, compares t's tag with its own. The tag is read before this CTA signals its next barrier, and a peer
// rewrites it only after passing that barrier: so only a kernel's first barrier agrees, and only in kernels with a
// barrier after it (not the standalone barrier).
// The outcome is every thread's, from the barrier instruction itself (a word in shared memory would be reset by a thread
// entering the next barrier while a slower warp had yet to read it).
// A rank latched before the call has left at its kernel's start (begin_call); one latched during it finds out while
// it waits.
__device__ int cta_barrier(const Args& a, int slot, uint32_t epoch, int phase, bool agree = false) {
  __syncthreads();
  const int t = threadIdx.x;
  int seen = kPassed;
  if (t < a.world) {
    if (agree) *tag_ptr(a.sig[t], slot, a.rank) = a.tag;
    st_release_sys(flag_ptr(a.sig[t], slot, a.rank), epoch);
    const uint32_t* mine = flag_ptr(a.sig[a.rank], slot, t);
    const unsigned long long start = global_ns();
    for (uint32_t spins = 1; static_cast<int32_t>(ld_acquire_sys(mine) - epoch) < 0; ++spins) {
      const uint32_t marked = spins % kGaveUpPollSpins == 0 ? marked_ranks(a) : 0;
      if (marked != 0) {
        note(a, kMissingWords + t);  // t had not come when a rank gave up
        note_marked(a, marked);
        flag_phase(a, phase);
        seen = kTimedOut;
        break;
      }
      if (global_ns() - start > a.timeout_ns) {
        give_up(a, t, phase);
        seen = kTimedOut;
        break;
      }
    }
    if (agree && seen == kPassed && *reinterpret_cast<volatile uint32_t*>(tag_ptr(a.sig[a.rank], slot, t)) != a.tag) {
      note(a, kDisagreedWords + t);
      flag_phase(a, phase);
      seen = kDisagreed;
    }
  }
  if (!__syncthreads_or(seen != kPassed)) return kPassed;
  return __syncthreads_or(seen == kTimedOut) ? kTimedOut : kDisagreed;
}

// A kernel's start: false where this rank is latched (a rank marked in its gave_up row: it leaves before it signals
// anything, so no peer can pass a barrier with it); else the previous call's last epoch for this CTA slot, read once
// (advanced once, by store_epoch). Thread t < world looks at word t of the row, beside the epoch's load.
__device__ bool begin_call(const Args& a, int slot, int phase, uint32_t& epoch) {
  __shared__ uint32_t base;
  const int t = threadIdx.x;
  const bool latched = t < a.world && *reinterpret_cast<volatile uint32_t*>(gave_up_ptr(a.sig[a.rank], t)) != 0;
  if (t == 0) base = *epoch_ptr(a.sig[a.rank], slot);
  if (__syncthreads_or(latched)) {
    if (t == 0) {
      note_marked(a, marked_ranks(a));
      flag_phase(a, phase);
    }
    return false;
  }
  epoch = base;
  return true;
}
__device__ void store_epoch(const Args& a, int slot, uint32_t value) {
  if (threadIdx.x == 0) *epoch_ptr(a.sig[a.rank], slot) = value;
}

template <typename T>
struct Vec;
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ static void add(float (&acc)[N], const uint4& v, bool first) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      acc[2 * i] = first ? f.x : __fadd_rn(acc[2 * i], f.x);
      acc[2 * i + 1] = first ? f.y : __fadd_rn(acc[2 * i + 1], f.y);
    }
  }
  __device__ static uint4 pack(const float (&acc)[N]) {
    uint4 out;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    return out;
  }
};
template <>
struct Vec<float> {
  static constexpr int N = 4;
  __device__ static void add(float (&acc)[N], const uint4& v, bool first) {
    const float f[4] = {__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z), __uint_as_float(v.w)};
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = first ? f[i] : __fadd_rn(acc[i], f[i]);
  }
  __device__ static uint4 pack(const float (&acc)[N]) {
    return make_uint4(__float_as_uint(acc[0]), __float_as_uint(acc[1]), __float_as_uint(acc[2]), __float_as_uint(acc[3]));
  }
};

// Sum of vector i over all ranks, ascending rank order. Plain (coherent) loads: peer data changes between
// calls, so the read-only/non-coherent path must not be used.
template <typename T>
__device__ __forceinline__ uint4 reduce_vec(const Args& a, int64_t i) {
  uint4 v[kMaxRanks];
#pragma unroll
  for (int q = 0; q < kMaxRanks; ++q)
    if (q < a.world) v[q] = reinterpret_cast<const uint4*>(a.data[q])[i];
  float acc[Vec<T>::N];
#pragma unroll
  for (int q = 0; q < kMaxRanks; ++q)
    if (q < a.world) Vec<T>::add(acc, v[q], q == 0);
  return Vec<T>::pack(acc);
}

// One-shot: every rank reads every peer's whole tensor and keeps its own result. In place, so a rank may
// overwrite its own elements only after all peers have read them: work goes in rounds of at most
// kOneShotVecsPerThread vectors per thread held in registers, with a barrier between read and write.
template <typename T>
__global__ void __launch_bounds__(kThreads) one_shot_kernel(Args a) {
  const int slot = blockIdx.x;
  uint32_t e0;
  if (!begin_call(a, slot, 0, e0)) return;
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  const int64_t per_round = stride * kOneShotVecsPerThread;
  uint32_t e = e0 + 1;
  const int first = cta_barrier(a, slot, e, 0, true);  // every peer's input is complete
  if (first == kTimedOut) return;
  const int64_t rounds = first == kPassed ? (a.n_vec + per_round - 1) / per_round : 0;  // none where ranks disagree
  for (int64_t r = 0; r < rounds; ++r) {
    uint4 out[kOneShotVecsPerThread];
    const int64_t i0 = r * per_round + (int64_t)blockIdx.x * kThreads + threadIdx.x;
#pragma unroll
    for (int k = 0; k < kOneShotVecsPerThread; ++k)
      if (i0 + k * stride < a.n_vec) out[k] = reduce_vec<T>(a, i0 + k * stride);
    if (cta_barrier(a, slot, ++e, 1) != kPassed) return;  // every peer has read this round's elements of mine
    uint4* own = reinterpret_cast<uint4*>(a.data[a.rank]);
#pragma unroll
    for (int k = 0; k < kOneShotVecsPerThread; ++k)
      if (i0 + k * stride < a.n_vec) own[i0 + k * stride] = out[k];
  }
  // Ranks that disagreed all take one more barrier instead of the rounds' (each saw a tag unlike its own).
  if (first == kDisagreed && cta_barrier(a, slot, ++e, 1) != kPassed) return;
  store_epoch(a, slot, e);
}

// Two-shot: rank r reduces chunk r (reduce-scatter) and pushes the result into chunk r of every rank
// (all-gather by remote stores). Only rank r ever reads or writes chunk r of anyone during the call, and it
// writes an element only after reading it everywhere, so the in-place update needs just two barriers:
// inputs complete, and all pushes into my tensor complete.
template <typename T>
__global__ void __launch_bounds__(kThreads) two_shot_kernel(Args a) {
  const int slot = blockIdx.x;
  uint32_t e0;
  if (!begin_call(a, slot, 0, e0)) return;
  const int64_t chunk = (a.n_vec + a.world - 1) / a.world;
  const int64_t begin = chunk * a.rank;
  const int64_t end = min(a.n_vec, begin + chunk);
  const int first = cta_barrier(a, slot, e0 + 1, 0, true);
  if (first == kTimedOut) return;
  const int64_t last = first == kPassed ? end : begin;  // nothing to move where the ranks disagree
  for (int64_t i = begin + (int64_t)blockIdx.x * kThreads + threadIdx.x; i < last; i += (int64_t)gridDim.x * kThreads) {
    const uint4 sum = reduce_vec<T>(a, i);
#pragma unroll
    for (int k = 0; k < kMaxRanks; ++k) {
      // Start with the next rank so the ranks' stores spread over the links instead of all hitting rank 0.
      const int q = (a.rank + 1 + k) % a.world;
      if (k < a.world) reinterpret_cast<uint4*>(a.data[q])[i] = sum;
    }
  }
  if (cta_barrier(a, slot, e0 + 2, 2) != kPassed) return;
  store_epoch(a, slot, e0 + 2);
}

// Reduce-scatter (token_mode 'dp'): rank r sums chunk r of every rank's tensor, ranks in ascending order in fp32 as
// above, into out (any memory of its own). Two barriers: every rank's tensor is complete; every peer has read its
// chunk of mine, so that my tensor may be written again.
template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_scatter_kernel(Args a, uint4* out) {
  const int slot = blockIdx.x;
  uint32_t e0;
  if (!begin_call(a, slot, 4, e0)) return;
  const int64_t chunk = a.n_vec / a.world;
  const int first = cta_barrier(a, slot, e0 + 1, 4, true);
  if (first == kTimedOut) return;
  const int64_t last = first == kPassed ? chunk : 0;  // nothing to move where the ranks disagree
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < last; i += (int64_t)gridDim.x * kThreads)
    out[i] = reduce_vec<T>(a, chunk * a.rank + i);
  if (cta_barrier(a, slot, e0 + 2, 4) != kPassed) return;
  store_epoch(a, slot, e0 + 2);
}

// All-gather (token_mode 'dp') of up to kMaxSegments tensors at once: rank r stores its chunk of segment s (`units`
// vectors of V from src[s]) at chunk r of every rank's gathered copy, which lies dst_offset[s] bytes from a.data[q] on
// rank q. Two barriers: every rank has come (its earlier reads of the gathered copies are done, in its stream's order);
// every store into mine has landed.
constexpr int kMaxSegments = 4;
struct Segments {
  std::uintptr_t src[kMaxSegments];
  int64_t dst_offset[kMaxSegments];
  int64_t units[kMaxSegments];  // 16-byte vectors where vec16[s], else 4-byte words
  bool vec16[kMaxSegments];
  int count;
};

template <typename V>
__device__ void push_chunk(const Args& a, const V* src, int64_t dst_offset, int64_t units) {
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < units; i += (int64_t)gridDim.x * kThreads) {
    const V v = src[i];
#pragma unroll
    for (int k = 0; k < kMaxRanks; ++k) {
      const int q = (a.rank + 1 + k) % a.world;  // spread the ranks' stores over the links, as two-shot does
      if (k < a.world) reinterpret_cast<V*>(a.data[q] + dst_offset)[units * a.rank + i] = v;
    }
  }
}

__global__ void __launch_bounds__(kThreads) all_gather_kernel(Args a, Segments s) {
  const int slot = blockIdx.x;
  uint32_t e0;
  if (!begin_call(a, slot, 5, e0)) return;
  const int first = cta_barrier(a, slot, e0 + 1, 5, true);
  if (first == kTimedOut) return;
  for (int g = 0; g < (first == kPassed ? s.count : 0); ++g) {  // nothing to move where the ranks disagree
    if (s.vec16[g]) push_chunk(a, reinterpret_cast<const uint4*>(s.src[g]), s.dst_offset[g], s.units[g]);
    else push_chunk(a, reinterpret_cast<const uint32_t*>(s.src[g]), s.dst_offset[g], s.units[g]);
  }
  if (cta_barrier(a, slot, e0 + 2, 5) != kPassed) return;
  store_epoch(a, slot, e0 + 2);
}

__global__ void barrier_kernel(Args a) {
  uint32_t e0;
  if (!begin_call(a, kBarrierSlot, 3, e0)) return;
  if (cta_barrier(a, kBarrierSlot, e0 + 1, 3) != kPassed) return;
  store_epoch(a, kBarrierSlot, e0 + 1);
}

// FNV-1a over a call's defining numbers (the collective's code first, then its grid, the offset of its tensor in the
// symmetric arena, its sizes...): equal calls give equal tags on every rank.
uint32_t call_tag(const std::vector<int64_t>& words) {
  uint32_t h = 2166136261u;
  for (const int64_t w : words)
    for (int b = 0; b < 8; ++b) h = (h ^ static_cast<uint8_t>(static_cast<uint64_t>(w) >> (8 * b))) * 16777619u;
  return h;
}

// Where the call's tensor lies in this rank's arena, as its distance from the rank's signal block (which every rank's
// arena holds at the same offset): peers address the tensor at the same offset in theirs.
int64_t arena_offset(const Args& a) { return static_cast<int64_t>(a.data[a.rank] - a.sig[a.rank]); }

Args make_args(const std::vector<std::uintptr_t>& data, const std::vector<std::uintptr_t>& sig, int rank,
               int64_t n_vec, double timeout_s, std::uintptr_t status) {
  const int world = (int)sig.size();
  EP_REQUIRE(world >= 1 && world <= kMaxRanks, "allreduce: world size must be in [1, 8]");
  EP_REQUIRE(data.empty() || (int)data.size() == world, "allreduce: need one data pointer per rank");
  EP_REQUIRE(rank >= 0 && rank < world, "allreduce: rank out of range");
  // Finite and bounded: the conversion to 64-bit nanoseconds below is undefined past 1.8e10 s, and gave 0 for inf.
  EP_REQUIRE(timeout_s > 0 && timeout_s <= kMaxTimeoutS, "allreduce: timeout_s must be in (0, 1e9] seconds");
  EP_REQUIRE(status != 0, "allreduce: status pointer is null");
  Args a{};
  for (int q = 0; q < world; ++q) {
    if (!data.empty()) {
      EP_REQUIRE(data[q] % 16 == 0, "allreduce: data pointers must be 16-byte aligned");
      a.data[q] = data[q];
    }
    a.sig[q] = sig[q];
  }
  a.rank = rank;
  a.world = world;
  a.n_vec = n_vec;
  a.timeout_ns = (unsigned long long)(timeout_s * 1e9);
  a.status = ep::as_ptr<int>(status);
  return a;
}

int grid_for(int64_t work, int max_ctas) {
  EP_REQUIRE(max_ctas >= 0, "allreduce: max_ctas must be >= 0");
  const int cap = std::min(max_ctas > 0 ? max_ctas : ep::num_sms(), kMaxCtas);
  return (int)std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, cap));
}

// dtype: 0 bf16, 1 fp32. algo: 0 one-shot, 1 two-shot. nbytes % 16 == 0. max_ctas caps the grid (0: one CTA
// per SM); it must be the same on every rank.
void all_reduce(const std::vector<std::uintptr_t>& data, const std::vector<std::uintptr_t>& sig, int rank,
                int64_t nbytes, int dtype, int algo, double timeout_s, std::uintptr_t status, int max_ctas,
                std::uintptr_t stream) {
  EP_REQUIRE(nbytes % 16 == 0, "allreduce: nbytes must be a multiple of 16");
  EP_REQUIRE(dtype == 0 || dtype == 1, "allreduce: dtype code must be 0 (bf16) or 1 (fp32)");
  EP_REQUIRE(algo == 0 || algo == 1, "allreduce: algo code must be 0 (one-shot) or 1 (two-shot)");
  Args a = make_args(data, sig, rank, nbytes / 16, timeout_s, status);
  if (a.n_vec == 0 || a.world == 1) return;
  const int grid = grid_for(algo == 0 ? a.n_vec : (a.n_vec + a.world - 1) / a.world, max_ctas);
  a.tag = call_tag({1, grid, arena_offset(a), nbytes, dtype, algo});
  const cudaStream_t s = ep::as_stream(stream);
  if (algo == 0) {
    if (dtype == 0) one_shot_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(a);
    else one_shot_kernel<float><<<grid, kThreads, 0, s>>>(a);
  } else {
    if (dtype == 0) two_shot_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(a);
    else two_shot_kernel<float><<<grid, kThreads, 0, s>>>(a);
  }
  EP_CHECK_LAUNCH();
}

// data: the whole tensor on every rank (world equal chunks of chunk_bytes, a multiple of 16); out: this rank's chunk
// of the sum, chunk_bytes of its own memory.
void reduce_scatter(const std::vector<std::uintptr_t>& data, const std::vector<std::uintptr_t>& sig, int rank,
                    int64_t chunk_bytes, int dtype, std::uintptr_t out, double timeout_s, std::uintptr_t status,
                    int max_ctas, std::uintptr_t stream) {
  EP_REQUIRE(chunk_bytes % 16 == 0, "reduce_scatter: chunk_bytes must be a multiple of 16");
  EP_REQUIRE(dtype == 0 || dtype == 1, "reduce_scatter: dtype code must be 0 (bf16) or 1 (fp32)");
  EP_REQUIRE(out % 16 == 0, "reduce_scatter: out must be 16-byte aligned");
  Args a = make_args(data, sig, rank, chunk_bytes / 16 * (int64_t)sig.size(), timeout_s, status);
  if (chunk_bytes == 0) return;  // (one rank alone still copies its chunk: the kernel's barriers are with itself)
  const int grid = grid_for(chunk_bytes / 16, max_ctas);
  a.tag = call_tag({2, grid, arena_offset(a), chunk_bytes, dtype});
  uint4* o = ep::as_ptr<uint4>(out);
  if (dtype == 0) reduce_scatter_kernel<__nv_bfloat16><<<grid, kThreads, 0, ep::as_stream(stream)>>>(a, o);
  else reduce_scatter_kernel<float><<<grid, kThreads, 0, ep::as_stream(stream)>>>(a, o);
  EP_CHECK_LAUNCH();
}

// base: an address in the arena on every rank (the same offset everywhere); for each segment, this rank's chunk at
// src (chunk_bytes, a multiple of 4) goes to chunk `rank` of the gathered copy dst_offset bytes from base.
void all_gather(const std::vector<std::uintptr_t>& base, const std::vector<std::uintptr_t>& sig, int rank,
                const std::vector<std::uintptr_t>& src, const std::vector<int64_t>& dst_offset,
                const std::vector<int64_t>& chunk_bytes, double timeout_s, std::uintptr_t status, int max_ctas,
                std::uintptr_t stream) {
  const int n = (int)src.size();
  EP_REQUIRE(n <= kMaxSegments, "all_gather: at most 4 segments per call");
  EP_REQUIRE((int)dst_offset.size() == n && (int)chunk_bytes.size() == n,
             "all_gather: one offset and size per segment");
  Segments s{};
  s.count = n;
  int64_t work = 0;  // in 16-byte vectors whatever the copy's unit, so that every rank launches the same grid
  for (int g = 0; g < n; ++g) {
    const std::string seg = "all_gather: segment " + std::to_string(g) + ": ";
    EP_REQUIRE(chunk_bytes[g] % 4 == 0, seg + "chunk_bytes must be a multiple of 4");
    EP_REQUIRE(src[g] % 4 == 0, seg + "src must be 4-byte aligned");
    EP_REQUIRE(dst_offset[g] % 4 == 0, seg + "dst_offset must be a multiple of 4");
    // 16-byte vectors where every rank's chunk starts on a 16-byte boundary (the bases are 16-byte aligned)
    s.vec16[g] = chunk_bytes[g] % 16 == 0 && src[g] % 16 == 0 && dst_offset[g] % 16 == 0;
    s.src[g] = src[g];
    s.dst_offset[g] = dst_offset[g];
    s.units[g] = chunk_bytes[g] / (s.vec16[g] ? 16 : 4);
    work = std::max(work, (chunk_bytes[g] + 15) / 16);
  }
  Args a = make_args(base, sig, rank, 0, timeout_s, status);
  if (work == 0) return;  // (one rank alone still copies its chunks: the kernel's barriers are with itself)
  const int grid = grid_for(work, max_ctas);
  std::vector<int64_t> words = {3, grid, arena_offset(a), n};
  words.insert(words.end(), dst_offset.begin(), dst_offset.end());
  words.insert(words.end(), chunk_bytes.begin(), chunk_bytes.end());
  a.tag = call_tag(words);
  all_gather_kernel<<<grid, kThreads, 0, ep::as_stream(stream)>>>(a, s);
  EP_CHECK_LAUNCH();
}

void device_barrier(const std::vector<std::uintptr_t>& sig, int rank, double timeout_s, std::uintptr_t status,
                    std::uintptr_t stream) {
  const Args a = make_args({}, sig, rank, 0, timeout_s, status);  // one barrier: no agreement (cta_barrier)
  barrier_kernel<<<1, 32, 0, ep::as_stream(stream)>>>(a);
  EP_CHECK_LAUNCH();
}

// Status words the kernels write and the host reads without a copy or a sync (mapped pinned memory).
std::uintptr_t host_status_alloc(int64_t words) {
  void* p = nullptr;
  EP_CUDA_CHECK(cudaHostAlloc(&p, words * sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(p, 0, words * sizeof(int));
  return reinterpret_cast<std::uintptr_t>(p);
}
std::uintptr_t host_status_device_ptr(std::uintptr_t host) {
  void* d = nullptr;
  EP_CUDA_CHECK(cudaHostGetDevicePointer(&d, reinterpret_cast<void*>(host), 0));
  return reinterpret_cast<std::uintptr_t>(d);
}
void host_status_free(std::uintptr_t host) { EP_CUDA_CHECK(cudaFreeHost(reinterpret_cast<void*>(host))); }

void bind_allreduce(pybind11::module_& m) {
  m.def("allreduce_signal_bytes", [] { return kSignalBytes; });
  m.def("allreduce_max_ranks", [] { return kMaxRanks; });
  m.def("allreduce_status_words", [] { return kStatusWords; });
  m.def("all_reduce", &all_reduce, "in-place sum all-reduce over peer pointers (see csrc/allreduce.cu)",
        pybind11::arg("data"), pybind11::arg("sig"), pybind11::arg("rank"), pybind11::arg("nbytes"),
        pybind11::arg("dtype"), pybind11::arg("algo"), pybind11::arg("timeout_s"), pybind11::arg("status"),
        pybind11::arg("max_ctas"), pybind11::arg("stream"));
  m.def("reduce_scatter", &reduce_scatter, "sum reduce-scatter over peer pointers (see csrc/allreduce.cu)",
        pybind11::arg("data"), pybind11::arg("sig"), pybind11::arg("rank"), pybind11::arg("chunk_bytes"),
        pybind11::arg("dtype"), pybind11::arg("out"), pybind11::arg("timeout_s"), pybind11::arg("status"),
        pybind11::arg("max_ctas"), pybind11::arg("stream"));
  m.def("all_gather", &all_gather, "all-gather of up to 4 tensors by stores to peer pointers (see csrc/allreduce.cu)",
        pybind11::arg("base"), pybind11::arg("sig"), pybind11::arg("rank"), pybind11::arg("src"),
        pybind11::arg("dst_offset"), pybind11::arg("chunk_bytes"), pybind11::arg("timeout_s"), pybind11::arg("status"),
        pybind11::arg("max_ctas"), pybind11::arg("stream"));
  m.def("device_barrier", &device_barrier, pybind11::arg("sig"), pybind11::arg("rank"), pybind11::arg("timeout_s"),
        pybind11::arg("status"), pybind11::arg("stream"));
  m.def("host_status_alloc", &host_status_alloc);
  m.def("host_status_device_ptr", &host_status_device_ptr);
  m.def("host_status_free", &host_status_free);
}

}  // namespace
EP_REGISTER_BINDINGS(bind_allreduce);
