// Hopper copy and wait primitives of the expert GEMM pipeline: 16-byte cp.async, bulk and TMA copies that complete
// on an mbarrier, bulk stores, and bounded waits. Device-only, no torch: shared by the grouped GEMM kernel and the
// bench probes.
#pragma once
#include <cuda.h>  // CUtensorMap (types only: the encoder comes from the runtime's driver entry point)
#include <cutlass/arch/barrier.h>

#include <cstdint>

#include "sm90_fragments.cuh"  // smem_u32

namespace ep::sm90 {

__device__ __forceinline__ void cp_async16(uint32_t smem_dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void bulk_copy(void* smem_dst, const void* src, int bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(smem_dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}

// Bytes (a multiple of 16, both addresses 16-byte aligned) from shared to global memory, in this thread's current
// bulk group; the thread commits the group and waits for its reads before the source is written again.
__device__ __forceinline__ void bulk_store(void* dst, const void* smem_src, int bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_u32(smem_src)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// This thread's bulk stores have read their shared-memory sources (so it may write them again, or exit: as in
// CUTLASS's TMA store epilogue, the global writes need no wait before the grid completes).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }

// Box (64 K, BN slot rows) of the activations at (k0, row0) into a 1024-byte aligned stage chunk.
__device__ __forceinline__ void tma_load_rows(uint32_t smem_dst, const CUtensorMap* map, int k0, int row0, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(k0), "r"(row0), "r"(smem_u32(bar))
      : "memory");
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
