// Hopper copy and wait primitives of the expert GEMM pipeline that CuTe does not spell the way the kernel needs them:
// 16-byte cp.async with a source size, a TMA box copy without a cache hint, bulk copies with an L2 eviction policy,
// and bounded waits. Plain bulk copies and bulk stores are CuTe's (`cute::SM90_BULK_COPY_G2S`,
// `cute::SM90_BULK_COPY_S2G`, `cute::tma_store_arrive/wait`).
// Device-only, no torch: shared by the grouped GEMM kernel and the bench probes.
#pragma once
#include <cuda.h>  // CUtensorMap (types only: the encoder comes from the runtime's driver entry point)
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include <cstdint>

#include "sm90_fragments.cuh"  // smem_u32

namespace ep::sm90 {

__device__ __forceinline__ void cp_async16(uint32_t smem_dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_dst), "l"(src), "r"(src_bytes));
}

// Box (64 K, BN slot rows) of the activations at (k0, row0) into a 1024-byte aligned stage chunk.
__device__ __forceinline__ void tma_load_rows(uint32_t smem_dst, const CUtensorMap* map, int k0, int row0, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(k0), "r"(row0), "r"(smem_u32(bar))
      : "memory");
}

// cp.async.bulk of `bytes` from global to shared memory, completing on `bar`, under an L2 policy (weight_policy).
__device__ __forceinline__ void bulk_load(void* smem_dst, const void* src, uint64_t* bar, int bytes, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          smem_u32(smem_dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
}

// The L2 policy for weight bytes: evict_first where no other tile reads them (an expert with one slot tile), else
// evict_normal, since the expert's next slot tiles re-read them from L2 right after. Measured on H100 against the
// default policy (bench/NOTES_experts.md, thirteenth session): decode 1-5 % faster, DRAM bytes within 1 %.
__device__ __forceinline__ uint64_t weight_policy(bool read_once) {
  uint64_t p;
  if (read_once) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  } else {
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(p));
  }
  return p;
}

// Spins until cond() holds. A protocol error must not hang the GPU: after 20 s the thread traps, which the host
// sees as a launch failure. No printf: it is a function call, and a call anywhere in a wgmma kernel makes ptxas
// serialize every wgmma (C7510).
template <typename Cond>
__device__ __forceinline__ void spin_until(Cond cond) {
  if (cond()) return;
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  while (!cond()) {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start > 20000000000ull) __trap();
  }
}

// Waits for the phase of parity `parity` of a pipeline barrier.
__device__ __forceinline__ void wait_phase(uint64_t* bar, uint32_t parity) {
  spin_until([&] { return cutlass::arch::ClusterBarrier::try_wait(bar, parity); });
}

}  // namespace ep::sm90
