// How fast can one SM, and all of them, read DRAM by each load path? Decode streams the weights by bulk copy (the TMA
// unit) at about 22-23 GB/s per SM on an H100 and on an H200 alike (2.9 and 3.0 TB/s over 132 SMs), though the H200's
// copy bandwidth is 42 % higher: is that a limit of the path per SM? Each CTA reads its own slice of a buffer far
// larger than L2 and nothing consumes the bytes:
//   bulk     one thread keeps `stages` stages in flight, each one bulk copy of `bytes` (or two: `bytes`, then `second`,
//            as the decode kernels bring an atom's codes and then its scales), by cp.async.bulk into shared memory with
//            an mbarrier per stage, evict-first as the decode kernels' weights; or `issuers` warps, one stream each
//   cpasync  256 threads keep the 16-byte cp.async pieces of `stages` stages of 16 KB in flight (commit / wait_group)
//   ldg      1024 threads keep `stages` 16-byte loads each in flight into registers (ld.global.nc, folded by XOR)
//   bulk+ldg warp 0 streams the first half of the slice by bulk copy while the other 31 warps read the second by ldg
// on 1, 12 and every SM (one CTA each; `per_sm` CTAs per SM where named). Build and run on the GPU machine:
//   nvcc -O3 -std=c++17 -arch=sm_90a -Icsrc -I<cutlass>/include bench/stream_probe.cu -o /tmp/sp && /tmp/sp
// Result on two H200s (bench/NOTES_experts.md, twentieth session): over every SM each path reads 4.3-4.5 TB/s
// (32.6-34.1 GB/s per SM), the decode kernel's ring shape too (three CTAs per SM, three stages of 12 KB + 1.5 KB: 4.46
// TB/s), except one stream of small copies per CTA (1.5 KB: 0.62 TB/s, 4 KB: 1.6). One SM alone: one stream of bulk
// copies completes about 3 M copies a second up to 16 KB each (16 KB: 49-64 GB/s with 4 to 12 stages alike; 48 KB:
// 147-184), four streams 182 GB/s, cp.async 104-118, ldg 78-133. So the memory path does not hold decode at about
// 3 TB/s on an H200: the kernel without its dequantization streams 4.4.
#include "cuda_check.h"
#include "sm90_pipeline.cuh"

#include <algorithm>
#include <cstdio>
#include <vector>

namespace {

using namespace ep::sm90;
using cutlass::arch::ClusterBarrier;
using cutlass::arch::ClusterTransactionBarrier;

constexpr size_t kBuffer = size_t(4) << 30;  // 80x the L2 of an H200: nothing read is still cached

// Bulk copies through `stages` shared-memory stages, by the calling thread alone: each stage is one copy of `a` bytes,
// then one of `b` (none when 0), as the decode kernels bring an atom's codes and then its scales.
__device__ void bulk_stream(const uint8_t* p, size_t len, int stages, int a, int b, uint8_t* smem, uint64_t* bar) {
  for (int s = 0; s < stages; ++s) ClusterBarrier::init(&bar[s], 1);
  cutlass::arch::fence_barrier_init();
  const uint64_t policy = weight_policy(true);
  const int bytes = a + b;
  const long n = static_cast<long>(len / bytes);
  for (long i = 0; i < n; ++i) {
    const int s = static_cast<int>(i % stages);
    if (i >= stages) wait_phase(&bar[s], ((i / stages) - 1) & 1);
    ClusterTransactionBarrier::arrive_and_expect_tx(&bar[s], bytes);
    uint8_t* dst = smem + static_cast<size_t>(s) * bytes;
    bulk_load(dst, p + i * bytes, &bar[s], a, policy);
    if (b > 0) bulk_load(dst + a, p + i * bytes + a, &bar[s], b, policy);
  }
  for (long i = n > stages ? n - stages : 0; i < n; ++i) wait_phase(&bar[i % stages], (i / stages) & 1);
}

// 16-byte loads by `threads` threads (thread t of them is `t`), `U` in flight each, XOR-folded into *sink.
template <int U>
__device__ void ldg_stream(const uint8_t* p, size_t len, int t, int threads, unsigned* sink) {
  const uint4* q = reinterpret_cast<const uint4*>(p);
  const long n = static_cast<long>(len / 16);
  uint4 acc = make_uint4(0, 0, 0, 0);
  long i = t;
  for (; i + static_cast<long>(U - 1) * threads < n; i += static_cast<long>(U) * threads) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = __ldg(q + i + static_cast<long>(u) * threads);
#pragma unroll
    for (int u = 0; u < U; ++u) acc.x ^= v[u].x, acc.y ^= v[u].y, acc.z ^= v[u].z, acc.w ^= v[u].w;
  }
  for (; i < n; i += threads) {
    const uint4 v = __ldg(q + i);
    acc.x ^= v.x, acc.y ^= v.y, acc.z ^= v.z, acc.w ^= v.w;
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) atomicAdd(sink, 1u);  // keeps the loads; never true here
}

// Lane 0 of each of the first `issuers` warps streams its part of the CTA's slice through its own stages.
__global__ void read_bulk(const uint8_t* src, size_t slice, int stages, int a, int b, int issuers) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const int w = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0 && w < issuers) {
    const size_t part = slice / issuers, ring = static_cast<size_t>(stages) * (a + b);
    bulk_stream(src + blockIdx.x * slice + w * part, part, stages, a, b, smem + w * ring,
                reinterpret_cast<uint64_t*>(smem + issuers * ring) + w * stages);
  }
}

template <int STAGES>
__global__ void read_cpasync(const uint8_t* src, size_t slice) {
  extern __shared__ __align__(1024) uint8_t smem[];
  constexpr int kStage = 16 * 1024;
  const uint8_t* p = src + blockIdx.x * slice;
  const uint32_t base = smem_u32(smem);
  const long n = static_cast<long>(slice / kStage);
  for (long i = 0; i < n; ++i) {
    const int s = static_cast<int>(i % STAGES);
    for (int j = threadIdx.x; j < kStage / 16; j += blockDim.x) {
      cp_async16(base + s * kStage + 16 * j, p + i * kStage + 16 * j, 16);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 1) : "memory");
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
}

template <int U>
__global__ void read_ldg(const uint8_t* src, size_t slice, unsigned* sink) {
  ldg_stream<U>(src + blockIdx.x * slice, slice, threadIdx.x, blockDim.x, sink);
}

__global__ void read_bulk_ldg(const uint8_t* src, size_t slice, int stages, int bytes, unsigned* sink) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint8_t* p = src + blockIdx.x * slice;
  if (threadIdx.x < 32) {
    if (threadIdx.x == 0) {
      bulk_stream(p, slice / 2, stages, bytes, 0, smem,
                  reinterpret_cast<uint64_t*>(smem + static_cast<size_t>(stages) * bytes));
    }
  } else {
    ldg_stream<4>(p + slice / 2, slice / 2, threadIdx.x - 32, blockDim.x - 32, sink);
  }
}

enum class Path { kBulk, kCpAsync, kLdg, kBulkLdg };

struct Probe {
  Path path;
  int stages;
  int bytes = 0;    // bulk: per copy (the first of a stage's two)
  int second = 0;   // bulk: a second copy per stage of this many bytes
  int issuers = 1;  // bulk: warps issuing, one stream each
  int per_sm = 1;   // CTAs per SM (run on every SM only)
};

const char* name(Path p) {
  return p == Path::kBulk ? "bulk" : p == Path::kCpAsync ? "cpasync" : p == Path::kLdg ? "ldg" : "bulk+ldg";
}

int threads(const Probe& p) {
  return p.path == Path::kBulk ? 32 * p.issuers : p.path == Path::kCpAsync ? 256 : 1024;
}

size_t smem_bytes(const Probe& p) {
  constexpr size_t kBarriers = 1024;
  switch (p.path) {
    case Path::kBulk: return static_cast<size_t>(p.issuers) * p.stages * (p.bytes + p.second) + kBarriers;
    case Path::kBulkLdg: return static_cast<size_t>(p.stages) * p.bytes + kBarriers;
    case Path::kCpAsync: return static_cast<size_t>(p.stages) * 16384;
    default: return 0;
  }
}

template <typename K, typename... A>
void run(K kernel, const Probe& p, int grid, A... args) {
  const size_t smem = smem_bytes(p);
  EP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, threads(p), smem>>>(args...);
  EP_CHECK_LAUNCH();
}

void launch(const Probe& p, int grid, const uint8_t* src, size_t slice, unsigned* sink) {
  switch (p.path) {
    case Path::kBulk: return run(read_bulk, p, grid, src, slice, p.stages, p.bytes, p.second, p.issuers);
    case Path::kBulkLdg: return run(read_bulk_ldg, p, grid, src, slice, p.stages, p.bytes, sink);
    case Path::kCpAsync:
      return p.stages == 4 ? run(read_cpasync<4>, p, grid, src, slice) : run(read_cpasync<8>, p, grid, src, slice);
    case Path::kLdg:
      return p.stages == 2   ? run(read_ldg<2>, p, grid, src, slice, sink)
             : p.stages == 4 ? run(read_ldg<4>, p, grid, src, slice, sink)
                             : run(read_ldg<8>, p, grid, src, slice, sink);
  }
}

}  // namespace

int main() {  // a CUDA error ends it with the failing call's message (EP_CUDA_CHECK throws)
  const int sms = ep::num_sms();
  cudaDeviceProp prop{};
  EP_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  uint8_t* buf = nullptr;
  unsigned* sink = nullptr;
  EP_CUDA_CHECK(cudaMalloc(&buf, kBuffer));
  EP_CUDA_CHECK(cudaMalloc(&sink, sizeof(unsigned)));
  EP_CUDA_CHECK(cudaMemset(buf, 0x5a, kBuffer));

  const std::vector<Probe> probes = {
      {Path::kBulk, 4, 16384},
      {Path::kBulk, 8, 16384},
      {Path::kBulk, 12, 16384},
      {Path::kBulk, 4, 49152},
      {Path::kBulk, 3, 13824, 0, 1, 3},  // the 64x8 decode kernel's ring: 3 CTAs x 3 stages
      // Copy sizes, and a stage as the decode kernels bring it: 12 KB of codes, then 1.5 KB of scales.
      {Path::kBulk, 8, 1536},
      {Path::kBulk, 8, 4096},
      {Path::kBulk, 8, 12288},
      {Path::kBulk, 8, 12288, 1536},
      {Path::kBulk, 3, 12288, 1536, 1, 3},
      {Path::kBulk, 3, 16384, 0, 4},  // four warps issuing, one stream each
      {Path::kBulk, 3, 12288, 1536, 4},
      {Path::kCpAsync, 4},
      {Path::kCpAsync, 8},
      {Path::kLdg, 2},
      {Path::kLdg, 4},
      {Path::kLdg, 8},
      {Path::kBulkLdg, 8, 16384},
  };
  cudaEvent_t t0, t1;
  EP_CUDA_CHECK(cudaEventCreate(&t0));
  EP_CUDA_CHECK(cudaEventCreate(&t1));
  std::printf("%s, %d SMs; GB/s = bytes read / kernel time (median of 3, each on bytes not read before it)\n",
              prop.name, sms);
  std::printf("%-9s %6s %7s %6s %7s %7s %6s %6s %10s %12s\n", "path", "stages", "bytes", "second", "issuers",
              "threads", "per_sm", "SMs", "GB/s", "GB/s per SM");
  for (const Probe& pr : probes) {
    for (int used : {1, 12, sms}) {
      if (pr.per_sm > 1 && used < sms) continue;  // a small grid spreads its CTAs over as many SMs
      const int grid = used * pr.per_sm;
      // Slices of at most 64 MB in units that every copy size and half-slice divides; three runs over disjoint
      // parts of the buffer.
      constexpr size_t kUnit = 13824 * 256;
      const size_t slice = std::min<size_t>(64ull << 20, kBuffer / 3 / grid) / kUnit * kUnit;
      std::vector<float> ms;
      for (int rep = 0; rep < 3; ++rep) {
        const uint8_t* src = buf + static_cast<size_t>(rep) * grid * slice;
        EP_CUDA_CHECK(cudaEventRecord(t0));
        launch(pr, grid, src, slice, sink);
        EP_CUDA_CHECK(cudaEventRecord(t1));
        EP_CUDA_CHECK(cudaEventSynchronize(t1));
        float t = 0.f;
        EP_CUDA_CHECK(cudaEventElapsedTime(&t, t0, t1));
        ms.push_back(t);
      }
      std::sort(ms.begin(), ms.end());
      const double gbs = static_cast<double>(grid) * slice / (ms[1] * 1e6);
      std::printf("%-9s %6d %7d %6d %7d %7d %6d %6d %10.0f %12.1f\n", name(pr.path), pr.stages, pr.bytes, pr.second,
                  pr.issuers, threads(pr), pr.per_sm, used, gbs, gbs / used);
    }
  }
  EP_CUDA_CHECK(cudaFree(buf));
  EP_CUDA_CHECK(cudaFree(sink));
  return 0;
}
