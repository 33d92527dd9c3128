// Layout of the signal block each rank keeps in its symmetric arena for the all-reduce kernels.
// signals[slot][src]: written by rank src (remote store), read by the owner: one 64-bit word, the epoch rank src has
// reached in its barriers for that CTA slot (low half) and what it was asked to do in its current call (high half,
// allreduce.cu call_tag), stored at once so that the tag costs no second remote store to order before the flag;
// epochs[slot]: the owner's own last epoch for that CTA slot; gave_up[src]: set by rank src (remote store) when it gave
// up waiting in a barrier, after which no rank that sees it signals again until the block is zeroed (allreduce.cu
// cta_barrier). Slots 0..kMaxCtas-1 belong to all-reduce CTAs, kBarrierSlot to the standalone barrier. The whole block
// must be zero before first use.
#pragma once
#include <cstdint>

namespace ep::allreduce {

constexpr int kMaxRanks = 8;
constexpr int kMaxCtas = 256;
constexpr int kBarrierSlot = kMaxCtas;
constexpr int kSlots = kMaxCtas + 1;
constexpr int64_t kSignalsBytes = int64_t(kSlots) * kMaxRanks * 8;
constexpr int64_t kEpochsBytes = int64_t(kSlots) * 4;
constexpr int64_t kSignalBytes = (kSignalsBytes + kEpochsBytes + kMaxRanks * 4 + 255) / 256 * 256;

__host__ __device__ inline uint64_t* signal_ptr(std::uintptr_t sig, int slot, int src) {
  return reinterpret_cast<uint64_t*>(sig) + slot * kMaxRanks + src;
}
__host__ __device__ inline uint32_t* epoch_ptr(std::uintptr_t sig, int slot) {
  return reinterpret_cast<uint32_t*>(sig + kSignalsBytes) + slot;
}
__host__ __device__ inline uint32_t* gave_up_ptr(std::uintptr_t sig, int src) {
  return reinterpret_cast<uint32_t*>(sig + kSignalsBytes + kEpochsBytes) + src;
}

}  // namespace ep::allreduce
