// Layout of the signal block each rank keeps in its symmetric arena for the all-reduce kernels.
// flags[slot][src]: written by rank src (remote store), read by the owner; tags[slot][src]: what rank src was asked to
// do in its current call (allreduce.cu call_tag), left there before its flag; epochs[slot]: the owner's own
// last epoch for that CTA slot; gave_up[src]: set by rank src (remote store) when it gave up waiting in a barrier,
// after which no rank that sees it signals again until the block is zeroed (allreduce.cu cta_barrier). Slots
// 0..kMaxCtas-1 belong to all-reduce CTAs, kBarrierSlot to the standalone barrier. The whole block must be zero before
// first use.
#pragma once
#include <cstdint>

namespace ep::allreduce {

constexpr int kMaxRanks = 8;
constexpr int kMaxCtas = 256;
constexpr int kBarrierSlot = kMaxCtas;
constexpr int kSlots = kMaxCtas + 1;
constexpr int64_t kFlagsBytes = int64_t(kSlots) * kMaxRanks * 4;
constexpr int64_t kTagsBytes = kFlagsBytes;
constexpr int64_t kEpochsBytes = int64_t(kSlots) * 4;
constexpr int64_t kSignalBytes = (kFlagsBytes + kTagsBytes + kEpochsBytes + kMaxRanks * 4 + 255) / 256 * 256;

__host__ __device__ inline uint32_t* flag_ptr(std::uintptr_t sig, int slot, int src) {
  return reinterpret_cast<uint32_t*>(sig) + slot * kMaxRanks + src;
}
__host__ __device__ inline uint32_t* tag_ptr(std::uintptr_t sig, int slot, int src) {
  return reinterpret_cast<uint32_t*>(sig + kFlagsBytes) + slot * kMaxRanks + src;
}
__host__ __device__ inline uint32_t* epoch_ptr(std::uintptr_t sig, int slot) {
  return reinterpret_cast<uint32_t*>(sig + kFlagsBytes + kTagsBytes) + slot;
}
__host__ __device__ inline uint32_t* gave_up_ptr(std::uintptr_t sig, int src) {
  return reinterpret_cast<uint32_t*>(sig + kFlagsBytes + kTagsBytes + kEpochsBytes) + src;
}

}  // namespace ep::allreduce
