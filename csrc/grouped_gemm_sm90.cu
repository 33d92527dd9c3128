// Grouped NVFP4-weight expert GEMMs for Hopper (no FP4 tensor cores): one launch covers every local expert.
//
// Design (see shared/DESIGN.md, bench/NOTES_experts.md):
// - A/B swapped: weight rows are the wgmma M side (64 per warpgroup), slots (tokens) the N side (8..128), so
//   an expert with one token wastes no weight bandwidth and prefill still gets full-width HGMMA tiles (HMMA for
//   slot tiles under 64 wide, except 256-row tiles, which are HGMMA from 32 slots on).
// - Weights are re-tiled once at load (ep_runtime/sm90_layout.py): each 64-row x 64-K atom is 2 KB of
//   packed E2M1 plus 256 B of scales, contiguous, ordered so that one lds.128 hands each lane exactly the
//   codes of its A fragments for four k16 steps, with their bits placed where few instructions extract them.
//   Contiguous atoms let one thread stream them with cp.async.bulk (no per-thread address work on the
//   bandwidth-bound decode path) and keep the activations in natural K order, so they reach wgmma as a plain
//   128B-swizzled shared-memory operand.
// - Dequantization is exact and happens in registers: an E2M1 code placed at bf16 bits 6-8 (+ sign at 15)
//   is its value * 2^-126, and one bf16x2 multiply by sf * 2^118 gives decode * sf * 2^-8 (<= 6 significant
//   bits); the epilogue multiplies by 2^8. Scales are stored pre-encoded as bf16 exponent/mantissa bytes.
//   The dequantized fragment is wgmma's register A operand (RS form), or HMMA's for narrow slot tiles.
// - Warp-specialized: two consumer warpgroups dequantize and multiply; a producer after them (a warpgroup for
//   wgmma tiles, one or two warps for HMMA tiles) fills a ring of stages (weights by bulk copy, evict-first in L2
//   where no other slot tile reads them; the slots' activation rows by cp.async, gathered through slot_pair for
//   L1, or for L2's wgmma tiles, whose slot rows are contiguous, by one TMA copy per chunk; two K chunks per
//   stage, three for HMMA tiles). With wgmma and 128-
//   or 256-row tiles each consumer owns half the rows (256 rows by 128 slots: 128 accumulators per thread,
//   registers moved from the producer by setmaxnreg); otherwise they split K by alternate stages and add their
//   partial sums in the epilogue.
// - Measured on H100: alone, a consumer chunk (dequantization and wgmmas of two warpgroups) keeps the tensor pipe
//   94 % busy (bench/wgmma_probe.cu), but in the kernel the copies and the epilogue add to the tensor time rather
//   than hide under it (and at the board's power cap every instruction lowers the clock). So every instruction
//   counts, on every scheduler: the producer keeps its addresses in registers and spreads its bulk copies over its
//   warps, and the epilogue reads shared memory 16 bytes at a time.
// - No function calls (printf included) anywhere in the kernel: ptxas would serialize every wgmma (C7510).
//   CI checks the sm_90a build for that and for spills.
// - A persistent grid walks tiles (expert, weight-row tile, slot tile) from the device offsets: experts
//   without tokens produce no tiles and read no weights; slot tiles of one weight tile are adjacent in time
//   so prefill re-reads weights from L2. A 256-row kernel's last round, when at most half full, runs as 128-row
//   halves (the same bits) on twice the CTAs; an L1 launch of so few decode tiles that most CTAs would idle runs
//   each tile's K range as up to four pieces on as many CTAs (schedule_units). The epilogue buffer is separate from
//   the ring, so the producer streams the next tile while the consumers finish this one.
// - L1 atoms hold 32 gate rows and the matching 32 up rows, so the epilogue applies both alphas, the clamped
//   SwiGLU and the NVFP4 re-quantization of h without another pass.
#include "cuda_check.h"
#include "experts_device.cuh"
#include "launch.h"
#include "nvfp4_device.cuh"
#include "registry.h"
#include "sm90_fragments.cuh"
#include "sm90_pipeline.cuh"

#include <cuda_bf16.h>
#include <cudaTypedefs.h>
#include <cutlass/arch/reg_reconfig.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace {

using namespace ep::experts;
using namespace ep::nvfp4;
using namespace ep::sm90;
using cutlass::arch::ClusterBarrier;
using cutlass::arch::ClusterTransactionBarrier;

enum Epilogue : int {
  kGateUp = 0,  // L1: gate|up fp32 (S, 2I), before the activation (tests)
  kHNvfp4 = 1,  // L1: h re-quantized with the static per-expert scale: data, scales and exact BF16 copy
  kHBf16 = 2,   // L1: h in BF16 (W4A16)
  kHF32 = 3,    // L1: h fp32 (dynamic L2 scale: quantized by requant_dynamic once amax is known)
  kYSlot = 4,   // L2: y_slot fp32 (S, H)
};

constexpr int kBK = 64;                                  // K elements per stage: one atom
constexpr int kAtomRows = 64;                            // weight rows per atom: one warpgroup's wgmma M
constexpr int kAtomBytes = kAtomRows * kBK / 2;          // packed E2M1 of one atom
constexpr int kAtomScaleBytes = kAtomRows * kBK / 16;    // its UE4M3 scales
constexpr int kConsumers = 256;                          // two warpgroups after the producer
constexpr float kDequantShift = 256.f;                   // undoes the 2^-8 left in the dequantized weights
// Slot tiles from 64 wide use wgmma, narrower ones HMMA; 256-row tiles (from 32 slots on) use wgmma at any width:
// 32 slots on 256 rows cost each weight row half the activation bytes of a 128-row HMMA tile, and ran m=32 (all
// 48 experts) 11 % faster in L1 and 6 % in L2 (eighteenth session), where 128-row wgmma tiles had lost to HMMA.
constexpr int kMinWgmmaSlots = 64;
constexpr int kMinWideSlots = 32;  // slot tiles from this width on may take 256 rows
constexpr bool uses_wgmma(int block_m, int block_n) {
  return block_n >= kMinWgmmaSlots || (block_m == 256 && block_n >= kMinWideSlots);
}
constexpr int kMaxExperts = 1024;                        // local experts one launch takes

struct GemmArgs {
  const uint8_t* w;        // (E, N, K/2) bytes in the SM90 atom layout
  const uint8_t* w_scale;  // (E, N, K/16) bytes in the SM90 atom layout
  const float* w_alpha;    // L1 (E, 2) gate/up, L2 (E,)
  const __nv_bfloat16* act;  // L1: (T, K) indexed by token, L2: (S, K) indexed by slot
  const float* act_gs;     // L1: x global scale (1,), L2: h global scale (E,); null: 1
  const int* offsets;      // (E+1,)
  const int* slot_pair;    // (S,) pair index of each slot (L1 gathers token = pair / topk)
  int topk;
  int num_experts, n_rows, k, inter;
  int epilogue;
  float swiglu_limit;
  const float* h_gs;  // (E,) static h global scale (kHNvfp4)
  float* out_f32;
  uint8_t* hq_data;
  uint8_t* hq_scale;
  __nv_bfloat16* h_bf16;
  // L1's K split of launches of few tiles (schedule_units; split_sums null, as for L2: never): the pieces' unscaled
  // sums [unit][slot][row] and an arrival count per tile, zero between launches (the last piece to arrive resets it).
  float* split_sums;
  int* split_arrivals;
  long split_sum_floats;
  int split_tiles;
  int unit_capacity;  // CTAs resident at once (SMs x CTAs per SM): the units a split may make
  int max_pieces;     // at most this many pieces a tile (0: kMaxPieces)
  // L2's activations, for the tiles that take them by TMA (act_by_tma): made by launch_gemm for those alone.
  CUtensorMap act_map;
};

// L2 with wgmma tiles: a slot tile's rows of `act` are contiguous, so one TMA copy per K chunk brings them
// (128B-swizzled, rows past the activations zero-filled) instead of 16-byte cp.async by every producer thread.
template <bool kWgmma>
__host__ __device__ __forceinline__ bool act_by_tma(const GemmArgs& a) { return kWgmma && a.epilogue == kYSlot; }

// TMA map of the L2 activations (rows x k BF16, row-major): boxes of 64 K by box_rows rows, 128B-swizzled as the
// wgmma stage expects, rows past the end read as zeros. The encoder is the driver's, reached through the runtime
// (no libcuda link).
CUtensorMap act_tensor_map(const void* act, int rows, int k, int box_rows) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    EP_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    EP_REQUIRE(found == cudaDriverEntryPointSuccess && fn != nullptr,
               "grouped_l2: the CUDA driver does not provide cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t row_stride[1] = {static_cast<cuuint64_t>(k) * sizeof(__nv_bfloat16)};
  const cuuint32_t box[2] = {kBK, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t unit_strides[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(act), dims, row_stride, box,
                            unit_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  EP_REQUIRE(r == CUDA_SUCCESS, "grouped_l2: cuTensorMapEncodeTiled failed (CUresult " + std::to_string(r) + ")");
  return map;
}

// The consumer warpgroups' own barrier (the producer never waits on it).
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kConsumers)); }

// Four floats at p (shared memory, 16-byte aligned) by one vector load.
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}

// SwiGLU of G consecutive columns c.. of slot n (c and G multiples of 4), gate/up read four columns at a time
// through gate_up4(n, column, gate, up).
template <int G, typename GateUp4>
__device__ __forceinline__ void swiglu_columns(const GateUp4& gate_up4, int n, int c, float limit, float (&h)[G]) {
#pragma unroll
  for (int i = 0; i < G; i += 4) {
    float gate[4], up[4];
    gate_up4(n, c + i, gate, up);
#pragma unroll
    for (int j = 0; j < 4; ++j) h[i + j] = swiglu(gate[j], up[j], limit);
  }
}

// Shared memory: [activations | weights | scales] x stages, the epilogue tile, the full/empty barriers, the
// per-expert tile prefix and the slot offsets. Activation stages come first and are 1024-byte multiples, as the 128B
// swizzle needs. Narrow slot tiles (decode) share an SM between two or three CTAs; their stages are small, so there
// are still many in flight per SM.
template <int BM, int BN>
struct Tiles {
  static_assert(BM != 256 || BN >= kMinWideSlots, "256-row tiles need wide slot tiles");
  static constexpr bool kWgmma = uses_wgmma(BM, BN);
  static constexpr int kAtoms = BM / kAtomRows;
  // The producer threads follow the two consumer warpgroups (which wgmma needs warpgroup-aligned): a whole
  // warpgroup for wgmma tiles, else one warp (two for 32 slots, whose 24 copies per thread and stage made the
  // one warp's scheduler the slowest, and every stage waits for the slowest consumer warp's release), leaving
  // registers for more CTAs per SM (decode is latency-bound). With 256 rows by 128 slots each consumer thread
  // holds 128 accumulators, more than an even split of the register file gives it, so the producer warpgroup hands
  // most of its registers over (setmaxnreg). 256-row tiles of 32 slots (32 accumulators) run two CTAs per SM, so
  // that one CTA's epilogue overlaps the other's mainloop (m=32: L2 3-7 % faster, the whole expert stage at 256
  // tokens 3-5 %; nineteenth session); their split fits the 80 registers a thread of two 384-thread CTAs gets
  // (setmaxnreg.inc waits forever for registers the SM does not have).
  static constexpr int kProducers = kWgmma ? 128 : BN == 32 ? 64 : 32;
  static constexpr bool kRegSplit = BM == 256;
  static constexpr int kThreads = kConsumers + kProducers;
  static constexpr int kMinBlocks = BN == 8 ? 3 : BN >= kMinWgmmaSlots ? 1 : 2;  // CTAs per SM
  // Registers per thread after setmaxnreg, within what the launch bound gives a CTA (allocated 8 per thread).
  static constexpr int kProducerRegs = kMinBlocks == 1 ? 72 : 40;
  static constexpr int kConsumerRegs = kMinBlocks == 1 ? 216 : 96;
  static constexpr int kSplitRegs = kProducers * kProducerRegs + kConsumers * kConsumerRegs;  // the CTA's total
  static constexpr int kBoundRegs = 65536 / (kThreads * kMinBlocks) / 8 * 8;
  static_assert(!kRegSplit || kSplitRegs <= kThreads * kBoundRegs,
                "the setmaxnreg split must fit the registers the launch bound gives a CTA");
  // ring + epilogue buffer; one CTA per SM may take nearly all of the 227 KB
  // (a few KB stay free for the per-expert tile prefix and slot offsets and the 1 KB each CTA's runtime reserve takes)
  static constexpr int kSmemBudget = (kMinBlocks == 1 ? 220 : 216) * 1024 / kMinBlocks;
  static constexpr int kCopies = BN * 8 / kProducers;  // 16-byte activation copies per producer thread and chunk
  // Producer warps that issue weight copies: each bulk copy costs its issuing warp a few dozen instructions, and
  // every consumer warpgroup's wgmma waits for its slowest warp, so several producer warps spread them, one atom
  // each.
  static constexpr int kCopyIssuers = std::min(kAtoms, kProducers / 32);
  // K chunks (of kBK) per stage: per-stage costs (barrier waits, bulk-copy issue, ring arithmetic, the proxy
  // fence) are paid once per stage, and on Hopper the instructions around the wgmmas do not overlap them (measured:
  // the time of the tensor work and of everything else add up). wgmma tiles take two, HMMA tiles three (the
  // producer warp's share all lands on one scheduler), and 64-row HMMA tiles six: their one atom then brings as
  // many weight bytes per stage as two atoms of three chunks (measured: 6 of 48 experts at m=1 in 65.6 instead
  // of 71.0 us). One count for every HMMA tile of a row count: it decides which chunks each consumer warpgroup
  // sums (split K), so it keeps their bits independent of the slot tile width.
  static constexpr int kChunks = kWgmma ? 2 : BM == 64 ? 6 : 3;
  // Which warpgroup consumes what: with wgmma and 128 or 256 rows each warpgroup owns half the atoms of every
  // stage; otherwise the two warpgroups alternate stages (split K) and each takes all of its stages' atoms,
  // so per-stage costs (barriers, addresses, activation fragments) are paid once per 128 rows.
  static constexpr bool kSplitK = !(kWgmma && kAtoms >= 2);
  static constexpr int kWgAtoms = kSplitK ? kAtoms : kAtoms / 2;
  // 256-row tiles may run as 128-row halves (schedule_units): each warpgroup then takes one atom of the stage.
  static constexpr bool kHalves = kWgmma && BM == 256;
  // L1 launches of few tiles may split each tile's K range over several CTAs (schedule_units): HMMA tiles of 8 and 16
  // slots (decode). 32-slot HMMA tiles are at their register bound, where the split's bookkeeping spilled.
  static constexpr bool kKSplit = !kWgmma && BN <= 16;
  static constexpr int kChunkActBytes = BN * kBK * 2;  // a multiple of 1024, as the 128B swizzle needs
  static constexpr int kActBytes = kChunks * kChunkActBytes;
  static constexpr int kWeightBytes = kAtoms * kChunks * kAtomBytes;  // [atom][chunk]
  static constexpr int kScaleBytes = kAtoms * kChunks * kAtomScaleBytes;
  static constexpr int kStageBytes = kActBytes + kWeightBytes + kScaleBytes;
  // The epilogue goes through shared memory in parts of kEpiSlots slots: a whole 256-row tile of 128 slots would
  // crowd the ring out, so 256-row tiles go in two halves (the first half's accumulators die before its epilogue
  // runs; 32-slot tiles would fit whole, but take the same path: one epilogue for every 256-row tile).
  static constexpr int kEpiSlots = BM == 256 ? BN / 2 : BN;
  static constexpr int kEpiParts = BN / kEpiSlots;
  static constexpr int kEpiStride = BM + 4;  // floats; +4 keeps the fragment stores conflict-free
  static constexpr int kEpiBytes = kEpiSlots * kEpiStride * 4;
  static constexpr int kStages = std::min(24, (kSmemBudget - kEpiBytes) / kStageBytes);
  static_assert(kStages >= 2, "the ring needs two stages so that copies overlap the math");
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kBarrierOffset = kRingBytes + kEpiBytes;
  static constexpr int kTileStartOffset = kBarrierOffset + 2 * kStages * 8;
  // the tile prefix and the slot offsets: E+1 ints each
  static int smem_bytes(int num_experts) { return 1024 + kTileStartOffset + 2 * 4 * (num_experts + 1); }
};

// The kernel's shared-memory copy of the slot offsets [E+1], after the per-expert tile prefix [E+1].
template <typename Int>
__device__ __forceinline__ Int* slot_offsets(Int* tile_start, int num_experts) { return tile_start + num_experts + 1; }

struct Tile {
  int e, slot0, nvalid;
  int slot_tiles;  // of expert e: with one, no other tile reads this tile's weights
  bool half;       // a 128-row half of a 256-row tile: rows from atom row_atom on
  int row_atom;    // the unit's first weight row / 64 within expert e
  int tile, piece, pieces;     // a K split: piece `piece` of `pieces` of tile `tile` (pieces 1: whole)
  int chunk_begin, chunk_end;  // the unit's K chunks (every chunk but in a split)
};

// Work units of the persistent grid: the tiles, except that
// - a 256-row kernel's last round, where at most half full, runs as 128-row halves (unit whole + 2 i + h is half h
//   of tile whole + i), so that twice the CTAs share it. A half gives each warpgroup one of its two atoms over every
//   K chunk in the same order, so the bits stay a whole tile's. (L2 at 128 tokens per expert: 1344 tiles on 132 SMs
//   leave 24 in the last round.)
// - an L1 launch of 8- or 16-slot HMMA tiles whose tiles would leave at least half of the resident CTAs idle (a few
//   active experts at decode, a shared expert's slice) cuts each tile's K range into pieces of whole stages, one unit
//   each: unit (tile << shift) + piece. A lone CTA streams a weight tile at about 16 GB/s, latency-bound on its warps
//   (NOTES_experts.md, thirty-first session). Pieces: a power of two, at most kMaxPieces and as many as fill the
//   resident CTAs, each at least two stages so both consumer warpgroups work. The last piece of a tile to finish adds
//   the pieces' sums in piece order: bits that depend on the piece count, which the launch's tile count sets (the same
//   for the same routing). Measured on an H200 (thirty-third session): one expert's L1 at m=1 16.6 instead of 22.4
//   us, the L1 of a shared expert's slice 10.2-10.5 instead of 15.3-15.5 at four and eight ranks; eight or sixteen
//   pieces were slower than four, and L2 (K = 3072, eight stages) gained nothing from any count, so it does not split.
constexpr int kMaxPieces = 4;
struct Units {
  int count, whole;
  int piece_shift;  // a K split: each tile runs as 1 << piece_shift pieces (0: whole)
};
template <int BM, int BN>
__device__ __forceinline__ Units schedule_units(const GemmArgs& a, int tiles) {
  using TL = Tiles<BM, BN>;
  if constexpr (TL::kKSplit) {
    // Powers of two, so that no unit's decoding divides: a division's code in the unit loop, cold or not, made the
    // decode kernels 2-4 % slower where no launch split.
    const int nstages = (a.k / kBK + TL::kChunks - 1) / TL::kChunks;
    const long limit = min(a.max_pieces > 0 ? a.max_pieces : kMaxPieces, min(kMaxPieces, nstages / 2));
    int shift = 0;
    if (a.split_sums != nullptr && tiles > 0 && tiles <= a.split_tiles) {
      while ((2L << shift) <= limit && (static_cast<long>(tiles) << (shift + 1)) <= a.unit_capacity &&
             (static_cast<long>(tiles) * BM * BN << (shift + 1)) <= a.split_sum_floats) {
        ++shift;
      }
    }
    return Units{tiles << shift, tiles << shift, shift};
  }
  const int tail = tiles % gridDim.x;
  if (!TL::kHalves || tail == 0 || 2 * tail > gridDim.x) return Units{tiles, tiles, 0};
  return Units{tiles + tail, tiles - tail, 0};
}

template <int BM, int BN>
__device__ __forceinline__ Tile decode_unit(const GemmArgs& a, const int* tile_start, const Units& units, int unit) {
  using TL = Tiles<BM, BN>;
  const bool half = TL::kHalves && unit >= units.whole;
  const int tile = half ? units.whole + (unit - units.whole) / 2 : unit >> units.piece_shift;
  const int piece = unit & ((1 << units.piece_shift) - 1);  // 0 unless split
  const int e = expert_of(tile_start, a.num_experts, tile);
  const int* offsets = slot_offsets(tile_start, a.num_experts);
  const int slot_begin = offsets[e];
  const int count = offsets[e + 1] - slot_begin;
  const int mtiles = (count + BN - 1) / BN;
  const int local = tile - tile_start[e];
  const int mt = local % mtiles, nt = local / mtiles;
  const int row_atom = nt * (BM / kAtomRows) + (half ? (unit - units.whole) % 2 * (BM / kAtomRows / 2) : 0);
  const int nchunks = a.k / kBK, nstages = (nchunks + TL::kChunks - 1) / TL::kChunks;
  const int chunk_begin = (piece * nstages >> units.piece_shift) * TL::kChunks;
  const int chunk_end = min(((piece + 1) * nstages >> units.piece_shift) * TL::kChunks, nchunks);
  return Tile{e, slot_begin + mt * BN, min(BN, count - mt * BN), mtiles, half, row_atom,
              tile, piece, 1 << units.piece_shift, chunk_begin, chunk_end};
}

// This CTA's work units in order, as f(tile, last): the producer and the consumers walk the same ones through here.
template <int BM, int BN, typename F>
__device__ __forceinline__ void for_each_unit(const GemmArgs& a, const int* tile_start, F&& f) {
  const Units units = schedule_units<BM, BN>(a, tile_start[a.num_experts]);
  for (int unit = blockIdx.x; unit < units.count; unit += gridDim.x) {
    f(decode_unit<BM, BN>(a, tile_start, units, unit), unit + gridDim.x >= units.count);
  }
}

template <int BM, int BN>
__device__ __forceinline__ void produce(const GemmArgs& a, const int* tile_start, uint8_t* smem, uint64_t* full,
                                        uint64_t* empty) {
  using TL = Tiles<BM, BN>;
  const uint32_t act_ring_u32 = smem_u32(smem);
  uint8_t* w_ring = smem + TL::kStages * TL::kActBytes;
  uint8_t* s_ring = w_ring + TL::kStages * TL::kWeightBytes;
  const int tid = threadIdx.x - kConsumers;
  const int nchunks = a.k / kBK;
  const bool is_l1 = a.epilogue != kYSlot;
  const bool tma = act_by_tma<TL::kWgmma>(a);
  int q = 0;  // stages produced so far: the ring position and barrier phase, mirrored by the consumers
  for_each_unit<BM, BN>(a, tile_start, [&](const Tile& tl, bool) {
    // Copy j moves 16-byte piece tid % 8 of slot row n = tid / 8 + j * kProducers / 8 into its swizzled place;
    // rows past the tile's slots copy no bytes (zero fill) from row 0, so every source pointer is valid and just
    // advances a chunk at a time. The producer's instructions per stage share the schedulers with the
    // consumers' (and delay their wgmmas), so addresses are made once per tile; where a pass covers a multiple
    // of 8 rows the swizzle phase n % 8 is the first row's, which leaves the copies at constant offsets from the
    // first one (no registers).
    constexpr int kPassRows = TL::kProducers / 8;
    const int chunk_begin = TL::kKSplit ? tl.chunk_begin : 0, chunk_end = TL::kKSplit ? tl.chunk_end : nchunks;
    const __nv_bfloat16* src[TL::kCopies];
    uint32_t dst[TL::kCopies];
    const int valid = (tl.nvalid - (tid >> 3) + kPassRows - 1) / kPassRows;  // copies j < valid read slot rows
#pragma unroll
    for (int j = 0; j < TL::kCopies; ++j) {
      const int n = (tid >> 3) + kPassRows * j;
      int row = 0;
      if (j < valid) row = is_l1 ? a.slot_pair[tl.slot0 + n] / a.topk : tl.slot0 + n;
      src[j] = a.act + static_cast<size_t>(row) * a.k + chunk_begin * kBK + 8 * (tid & 7);
      const int phase = (kPassRows % 8 == 0 ? tid >> 3 : n) & 7;
      dst[j] = n * 128 + (((tid & 7) ^ phase) << 4);
    }
    const uint64_t policy = weight_policy(tl.slot_tiles == 1);
    const size_t atom0 = (static_cast<size_t>(tl.e) * (a.n_rows / kAtomRows) + tl.row_atom) * nchunks;
    for (int c0 = chunk_begin; c0 < chunk_end; c0 += TL::kChunks, ++q) {
      const int s = q % TL::kStages, nch = min(TL::kChunks, chunk_end - c0);
      if (q >= TL::kStages) wait_phase(&empty[s], ((q / TL::kStages) & 1) ^ 1);
      if ((tid & 31) == 0 && tid < 32 * TL::kCopyIssuers) {
        // An atom's consecutive K chunks are adjacent in the layout: one copy each for codes and scales.
        // A half tile fills the first atom place of each warpgroup (every other place), from its two atoms.
        constexpr int kIssuerAtoms = TL::kAtoms / TL::kCopyIssuers;
        auto loads = [&](int i) { return !tl.half || i % TL::kWgAtoms == 0; };
        int atoms = 0;
#pragma unroll
        for (int k = 0; k < kIssuerAtoms; ++k) atoms += loads((tid >> 5) * kIssuerAtoms + k);
        const bool act_issuer = tma && tid == 0;
        ClusterTransactionBarrier::arrive_and_expect_tx(
            &full[s], nch * (atoms * (kAtomBytes + kAtomScaleBytes) + (act_issuer ? TL::kChunkActBytes : 0)));
        if (act_issuer) {
          for (int cc = 0; cc < nch; ++cc) {
            tma_load_rows(act_ring_u32 + s * TL::kActBytes + cc * TL::kChunkActBytes, &a.act_map, (c0 + cc) * kBK,
                          tl.slot0, &full[s]);
          }
        }
#pragma unroll
        for (int k = 0; k < kIssuerAtoms; ++k) {
          const int i = (tid >> 5) * kIssuerAtoms + k;
          if (!loads(i)) continue;
          const size_t atom = atom0 + static_cast<size_t>(tl.half ? i / TL::kWgAtoms : i) * nchunks + c0;
          bulk_load(w_ring + s * TL::kWeightBytes + i * TL::kChunks * kAtomBytes, a.w + atom * kAtomBytes, &full[s],
                    nch * kAtomBytes, policy);
          bulk_load(s_ring + s * TL::kScaleBytes + i * TL::kChunks * kAtomScaleBytes,
                    a.w_scale + atom * kAtomScaleBytes, &full[s], nch * kAtomScaleBytes, policy);
        }
      }
#pragma unroll
      for (int cc = 0; cc < TL::kChunks; ++cc) {
        if (cc == nch || tma) break;  // TMA brought this stage's activations
        const uint32_t act_chunk = act_ring_u32 + s * TL::kActBytes + cc * TL::kChunkActBytes;
#pragma unroll
        for (int j = 0; j < TL::kCopies; ++j) {
          cp_async16(act_chunk + dst[j], src[j], j < valid ? 16 : 0);
          src[j] += kBK;
        }
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(&full[s]);
    }
  });
  asm volatile("cp.async.wait_all;" ::: "memory");
}

template <int BM, int BN>
__device__ __forceinline__ void consume(const GemmArgs& a, const int* tile_start, uint8_t* smem, uint64_t* full,
                                        uint64_t* empty) {
  using TL = Tiles<BM, BN>;
  const uint32_t act_ring_u32 = smem_u32(smem);  // MMA operands are read through shared addresses
  const uint8_t* w_ring = smem + TL::kStages * TL::kActBytes;
  const uint8_t* s_ring = w_ring + TL::kStages * TL::kWeightBytes;
  float* epi = reinterpret_cast<float*>(smem + TL::kRingBytes);  // [BN][kEpiStride]
  const int ctid = threadIdx.x, lane = ctid & 31;
  const int wg = ctid >> 7, cw = (ctid >> 5) & 3, g = lane >> 2, t = lane & 3;
  const int nchunks = a.k / kBK;
  const bool is_l1 = a.epilogue != kYSlot;
  // Hands ring stage s back to the producer: one arrival per consumer warp.
  auto release = [&](int s) {
    __syncwarp();
    if (lane == 0) ClusterBarrier::arrive(&empty[s]);
  };
  int q = 0;
  // One work unit with NA atoms per warpgroup (TL::kWgAtoms, or one for a half tile): compile-time, since a run-time
  // atom count cost the 256-row kernel 3.5 % (twelfth session).
  auto run_unit = [&](const Tile& tl, bool last, auto na) {
    constexpr int NA = decltype(na)::value;
    float acc[NA * BN / 2];
#pragma unroll
    for (int i = 0; i < NA * BN / 2; ++i) acc[i] = 0.f;
    const int unit_chunks = TL::kKSplit ? tl.chunk_end - tl.chunk_begin : nchunks;
    const int nstages = (unit_chunks + TL::kChunks - 1) / TL::kChunks;

    // Split K: warpgroup w computes the tile's stages sc = w mod 2, so the summation order depends on the tile
    // alone (not on which CTA runs it). Every consumer warp still waits for and releases every stage: a parity
    // wait cannot tell a phase from the one two fills later, so a warpgroup that skipped stages could pass on
    // a stale phase (or, not gating the producer, fall two fills behind and wait forever).
    for (int sc = 0; sc < nstages; ++sc) {
      const int qs = q + sc, s = qs % TL::kStages;
      wait_phase(&full[s], (qs / TL::kStages) & 1);
      if (TL::kSplitK && (sc & 1) != wg) {
        release(s);
        continue;
      }
      // cp.async data -> wgmma's proxy (TMA writes in that proxy already)
      if (TL::kWgmma && !act_by_tma<TL::kWgmma>(a)) cutlass::arch::fence_view_async_shared();
      // Rolled for wgmma from 64 slots (the chunks' fragments would compete for registers); narrower tiles
      // unrolled start the next chunk's loads under this chunk's math (32-slot HMMA tiles too since the scales
      // take fewer registers: 96 per thread, no spill, 3-5 % faster at m=32; 32-slot wgmma tiles measured so).
#pragma unroll (BN <= 32 ? TL::kChunks : 1)
      for (int cc = 0; cc < TL::kChunks; ++cc) {
        if (sc * TL::kChunks + cc == unit_chunks) break;
        const uint32_t act_chunk = act_ring_u32 + s * TL::kActBytes + cc * TL::kChunkActBytes;
        // wgmma: the warpgroup's atoms of this chunk, dequantized (af[i][st]: atom i's A fragment of k16 step
        // st); each atom's four wgmmas are issued as soon as its fragments are ready, so the next atom's
        // dequantization overlaps them (its fragments live in other registers); all drain at the chunk's end.
        const int atom0 = TL::kSplitK ? 0 : wg * TL::kWgAtoms;  // its first atom place in the stage
        const uint8_t* codes = w_ring + s * TL::kWeightBytes + (atom0 * TL::kChunks + cc) * kAtomBytes + cw * 512 + lane * 16;
        const uint8_t* scales =
            s_ring + s * TL::kScaleBytes + (atom0 * TL::kChunks + cc) * kAtomScaleBytes + cw * 64 + g * 8;
        if constexpr (TL::kWgmma) {
          uint32_t af[NA][4][4];
#pragma unroll
          for (int ia = 0; ia < NA; ++ia) {
            dequant_atom(codes + ia * TL::kChunks * kAtomBytes, scales + ia * TL::kChunks * kAtomScaleBytes, af[ia]);
            float(&acc_i)[BN / 2] = *reinterpret_cast<float(*)[BN / 2]>(acc + ia * (BN / 2));
            wgmma_atom<BN>(act_chunk, af[ia], acc_i);
          }
          // Register A operands cannot stay in flight across stages: ptxas would serialize every wgmma (C7513).
          cute::warpgroup_wait<0>();
          fence_all(acc);
        } else {
          hmma_chunk<BN, NA, TL::kChunks * kAtomBytes, TL::kChunks * kAtomScaleBytes>(act_chunk, codes, scales, acc,
                                                                                       lane);
        }
      }
      release(s);
    }
    q += nstages;

    // Accumulators -> epi[slot][row] (the wgmma D layout: rows g / g+8 of the warp's 16, slots 2t, 2t+1 of
    // each 8) as outputs, one part of kEpiSlots slots at a time. Split K: warpgroup 0 stores its sums, warpgroup 1
    // adds its own and scales. A thread's rows share one output scale: the alpha (over the activations' global
    // scale) times 2^8, the dequantization's shift; multiplying by 2^8 is exact, so the sum rounds once, as in the
    // reference. In L1 an atom's 32 gate rows are warps 0-1's of a warpgroup, its 32 up rows warps 2-3's.
    const int e = tl.e;
    const float alpha = is_l1 ? a.w_alpha[2 * e + (cw >> 1)] : a.w_alpha[e];
    const float* act_gs = a.act_gs == nullptr ? nullptr : is_l1 ? a.act_gs : a.act_gs + e;
    const float scale = __fmul_rn(act_gs ? __fdiv_rn(alpha, *act_gs) : alpha, kDequantShift);
    // f(accumulator index, its epi element, its [slot][row] offset in a piece's sums) for each of this thread's
    // accumulators in part `part`.
    auto for_each_acc = [&](int part, auto&& f) {
#pragma unroll
      for (int i = 0; i < NA; ++i) {
        const int row = (TL::kSplitK ? i : wg * NA + i) * kAtomRows + cw * 16 + g;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          if (8 * j / TL::kEpiSlots != part) continue;
          const int n = 8 * j - part * TL::kEpiSlots + 2 * t;
#pragma unroll
          for (int r = 0; r < 4; ++r) {  // (slot, row): (n, row), (n + 1, row), (n, row + 8), (n + 1, row + 8)
            const int slot = n + (r & 1), row_r = row + 8 * (r >> 1);
            f(i * (BN / 2) + 4 * j + r, epi + slot * TL::kEpiStride + row_r, slot * BM + row_r);
          }
        }
      }
    };
    auto store_acc = [&](int part, auto add, auto scaled) {
      for_each_acc(part, [&](int v, float* dst, int) {
        const float sum = decltype(add)::value ? __fadd_rn(*dst, acc[v]) : acc[v];
        *dst = decltype(scaled)::value ? __fmul_rn(sum, scale) : sum;
      });
    };
    // A piece of a split tile: warpgroup 1 adds its sums to warpgroup 0's (in epi) and stores them unscaled as the
    // piece's; the last piece of the tile to arrive adds every piece's in piece order, scales them into epi and goes
    // on to the epilogue (returns true), the others are done (false). Arrival by the threadfence-reduction pattern:
    // each thread's stores, a fence, a barrier, one atomic; the last one's fence before it reads.
    auto finish_pieces = [&]() -> bool {
      if constexpr (!TL::kKSplit) {
        return true;
      } else {
        float* sums = a.split_sums + static_cast<size_t>(tl.tile) * tl.pieces * BM * BN;
        if (wg == 0) store_acc(0, std::false_type{}, std::false_type{});
        consumer_sync();
        if (wg == 1) {
          for_each_acc(0, [&](int v, float* dst, int off) {
            __stcg(sums + tl.piece * BM * BN + off, __fadd_rn(*dst, acc[v]));
          });
        }
        __threadfence();
        consumer_sync();
        __shared__ int arrived_last;
        if (ctid == 0) {
          const bool is_last = atomicAdd(a.split_arrivals + tl.tile, 1) == tl.pieces - 1;
          if (is_last) a.split_arrivals[tl.tile] = 0;  // ready for the next launch
          arrived_last = is_last;
        }
        consumer_sync();
        if (!arrived_last) return false;
        __threadfence();
        if (wg == 1) {
          for_each_acc(0, [&](int, float* dst, int off) {
            float sum = __ldcg(sums + off);
#pragma unroll 1  // unrolled, this cold path doubled the decode kernels' code (and cost their hot loops 2-4 %)
            for (int p = 1; p < tl.pieces; ++p) sum = __fadd_rn(sum, __ldcg(sums + p * BM * BN + off));
            *dst = __fmul_rn(sum, scale);
          });
        }
        return true;
      }
    };

    constexpr int kRows = (TL::kSplitK ? 1 : 2) * NA * kAtomRows;  // the unit's weight rows
    constexpr int HALF = kRows / 2;  // L1: its intermediate columns
#pragma unroll  // a rolled loop would keep every part's accumulators live through the first part's epilogue
    for (int part = 0; part < TL::kEpiParts && part * TL::kEpiSlots < tl.nvalid; ++part) {
      cute::tma_store_wait<0>();  // this thread's bulk stores of the previous part (or tile) have read epi
      consumer_sync();            // and every consumer is done reading it
      if (TL::kKSplit && tl.pieces > 1) {
        if (!finish_pieces()) {
          if (last) cute::tma_store_wait<0>();  // a previous unit's bulk stores still read epi
          return;
        }
      } else if (TL::kSplitK) {
        if (wg == 0) store_acc(part, std::false_type{}, std::false_type{});
        consumer_sync();
        if (wg == 1) store_acc(part, std::true_type{}, std::true_type{});
      } else {
        store_acc(part, std::false_type{}, std::true_type{});
      }
      const int slot0 = tl.slot0 + part * TL::kEpiSlots;
      const int nvalid = min(TL::kEpiSlots, tl.nvalid - part * TL::kEpiSlots);

      if (!is_l1) {
        // Each slot's row of outputs leaves by one bulk store, which runs on while the consumers start the next
        // tile (the tensor pipe idles during an epilogue, and L2's short K made its stores a large share of it).
        cutlass::arch::fence_view_async_shared();  // the shared-memory writes, before the bulk copies read them
        consumer_sync();
        if (ctid < nvalid) {
          float* out = a.out_f32 + static_cast<size_t>(slot0 + ctid) * a.n_rows + tl.row_atom * kAtomRows;
          cute::SM90_BULK_COPY_S2G::copy(epi + ctid * TL::kEpiStride, out, kRows * 4);
          cute::tma_store_arrive();
          // The CTA's shared memory stays its own until its last bulk stores have read it (the global writes need
          // no wait). Waited for here, on the CTA's last tile, not after the tile loop: a wait there made ptxas
          // spill and serialize the 256-row kernel's wgmmas (C7512).
          if (last) cute::tma_store_wait<0>();
        }
        continue;
      }
      consumer_sync();

      // L1: tile column c (intermediate j0 + c) has its gate in row 64 * (c / 32) + c % 32 and its up 32 below.
      // Columns c..c+3 (c % 4 == 0) sit in one 32-row group, so each half is one 16-byte load.
      auto gate_up4 = [&](int n, int c, float (&gate)[4], float (&up)[4]) {
        const float* p = epi + n * TL::kEpiStride + (c >> 5) * kAtomRows + (c & 31);
        load4(p, gate);
        load4(p + 32, up);
      };
      const int j0 = tl.row_atom * (kAtomRows / 2);  // first intermediate column of this unit

      if (a.epilogue == kGateUp) {
        for (int idx = ctid; idx < nvalid * (HALF / 4); idx += kConsumers) {
          const int n = idx / (HALF / 4), c = 4 * (idx % (HALF / 4));
          float gate[4], up[4];
          gate_up4(n, c, gate, up);
          float* row = a.out_f32 + static_cast<size_t>(slot0 + n) * (2 * a.inter);
          *reinterpret_cast<float4*>(row + j0 + c) = make_float4(gate[0], gate[1], gate[2], gate[3]);
          *reinterpret_cast<float4*>(row + a.inter + j0 + c) = make_float4(up[0], up[1], up[2], up[3]);
        }
      } else if (a.epilogue == kHNvfp4) {
        const float gs = a.h_gs[e];
        for (int idx = ctid; idx < nvalid * (HALF / 16); idx += kConsumers) {
          const int n = idx / (HALF / 16), c = 16 * (idx % (HALF / 16));
          float h[16];
          swiglu_columns(gate_up4, n, c, a.swiglu_limit, h);
          const size_t s = slot0 + n;
          quantize_block16(h, gs, a.hq_data + s * (a.inter / 2) + (j0 + c) / 2,
                           a.hq_scale + s * (a.inter / 16) + (j0 + c) / 16,
                           a.h_bf16 + s * a.inter + j0 + c);
        }
      } else {
        for (int idx = ctid; idx < nvalid * (HALF / 4); idx += kConsumers) {
          const int n = idx / (HALF / 4), c = 4 * (idx % (HALF / 4));
          float h[4];
          swiglu_columns(gate_up4, n, c, a.swiglu_limit, h);
          const size_t off = static_cast<size_t>(slot0 + n) * a.inter + j0 + c;
          if (a.epilogue == kHF32) {
            *reinterpret_cast<float4*>(a.out_f32 + off) = make_float4(h[0], h[1], h[2], h[3]);
          } else {
            __nv_bfloat162 lo = __floats2bfloat162_rn(h[0], h[1]), hi = __floats2bfloat162_rn(h[2], h[3]);
            *reinterpret_cast<uint2*>(a.h_bf16 + off) =
                make_uint2(*reinterpret_cast<uint32_t*>(&lo), *reinterpret_cast<uint32_t*>(&hi));
          }
        }
      }
    }
  };
  for_each_unit<BM, BN>(a, tile_start, [&](const Tile& tl, bool last) {
    if constexpr (TL::kHalves) {
      if (tl.half) return run_unit(tl, last, std::integral_constant<int, 1>{});
    }
    run_unit(tl, last, std::integral_constant<int, TL::kWgAtoms>{});
  });
}

template <int BM, int BN>
__global__ void __launch_bounds__(Tiles<BM, BN>::kThreads, Tiles<BM, BN>::kMinBlocks)
    grouped_gemm_kernel(const __grid_constant__ GemmArgs a) {
  using TL = Tiles<BM, BN>;
  extern __shared__ uint8_t smem_raw[];
  // Rounded up to 1024 bytes (the 128B swizzle) by pointer arithmetic, not through an integer, so the compiler
  // still knows every pointer below is shared memory and the epilogue's loads and stores are LDS/STS, not generic.
  uint8_t* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + TL::kBarrierOffset);
  uint64_t* empty = full + TL::kStages;
  int* tile_start = reinterpret_cast<int*>(smem + TL::kTileStartOffset);  // [E+1], then the offsets [E+1]
  const int tid = threadIdx.x, lane = tid & 31;
  const int row_tiles = a.n_rows / BM;

  // No early release of the next grid (it is released as this one's warps end): its CTAs would take the SMs
  // ours leave first, and where ours carry uneven work (a tile more for the low block indices) a persistent
  // kernel after us would put its own busier CTAs on the same SMs. Measured from 3d7bf2b (NOTES_experts.md):
  // sparse L1 chained 13 % slower with it in one run; the W4A16 stage of 1 and 8 tokens 1-2 % faster without it.
  if (tid == 32) {
    for (int s = 0; s < TL::kStages; ++s) {
      ClusterBarrier::init(&full[s], TL::kProducers + TL::kCopyIssuers);  // cp.async arrivals + bulk-copy issuers
      ClusterBarrier::init(&empty[s], kConsumers / 32);  // one arrival per consumer warp
    }
    cutlass::arch::fence_barrier_init();
  }
  ep::wait_previous_grid();  // from here on: offsets, slots and activations that earlier kernels wrote
  if (tid < 32) {
    // The slot offsets are read once, into shared memory: the tile prefix and every unit's decoding read the copy
    // (from global, each unit's decoding delayed its first copies: the W4A16 stage of 128 tokens 2 % slower on an
    // H200, twenty-second session).
    int* offsets = slot_offsets(tile_start, a.num_experts);
    for (int e = lane; e <= a.num_experts; e += 32) offsets[e] = a.offsets[e];
    __syncwarp();
    warp_exclusive_scan(
        lane, a.num_experts, [&](int e) { return (offsets[e + 1] - offsets[e] + BN - 1) / BN * row_tiles; },
        [&](int e, int prefix) { tile_start[e] = prefix; });
  }
  __syncthreads();
  if (tid >= kConsumers) {
    if constexpr (TL::kRegSplit) cutlass::arch::warpgroup_reg_dealloc<TL::kProducerRegs>();
    produce<BM, BN>(a, tile_start, smem, full, empty);
  } else {
    if constexpr (TL::kRegSplit) cutlass::arch::warpgroup_reg_alloc<TL::kConsumerRegs>();
    consume<BM, BN>(a, tile_start, smem, full, empty);
  }
}
// Per-expert amax of h (fp32 (S, I)): one warp per slot row; max is exact, so atomics stay deterministic.
__global__ void h_amax_kernel(const float* __restrict__ h, const int* __restrict__ offsets, int num_experts, int inter,
                              unsigned* __restrict__ amax_bits) {
  ep::enter_grid();
  const int warps = gridDim.x * blockDim.x / 32;
  const int lane = threadIdx.x & 31;
  const int num_slots = offsets[num_experts];
  for (int s = (blockIdx.x * blockDim.x + threadIdx.x) / 32; s < num_slots; s += warps) {
    float m = 0.f;
    for (int c = lane * 4; c < inter; c += 128) {
      const float4 v = *reinterpret_cast<const float4*>(h + static_cast<size_t>(s) * inter + c);
      m = fmax_nan(m, fmax_nan(fmax_nan(fabsf(v.x), fabsf(v.y)), fmax_nan(fabsf(v.z), fabsf(v.w))));
    }
    // A NaN wins the max (its bits exceed every finite value's too): its expert's scale is then 1, as the reference's.
    for (int d = 16; d > 0; d >>= 1) m = fmax_nan(m, __shfl_xor_sync(0xffffffffu, m, d));
    if (lane == 0) atomicMax(amax_bits + expert_of(offsets, num_experts, s), __float_as_uint(m));
  }
}

// Dynamic L2 scale: gs_e = 448*6 / amax_e, correctly rounded (amax 0 -> 1), then every 16-block of h is
// quantized with it.
__global__ void h_requant_kernel(const float* __restrict__ h, const int* __restrict__ offsets, int num_experts,
                                 int inter, const unsigned* __restrict__ amax_bits, uint8_t* __restrict__ hq_data,
                                 uint8_t* __restrict__ hq_scale, __nv_bfloat16* __restrict__ h_bf16,
                                 float* __restrict__ h_gs) {
  ep::wait_previous_grid();  // no early release: a grouped GEMM follows (see moe_align_kernel)
  auto gs_of = [&](int e) { return dynamic_global_scale(__uint_as_float(amax_bits[e])); };
  const int stride = gridDim.x * blockDim.x;
  const int first = blockIdx.x * blockDim.x + threadIdx.x;
  for (int e = first; e < num_experts; e += stride) h_gs[e] = gs_of(e);
  const int blocks_per_row = inter / 16;
  const long total = static_cast<long>(offsets[num_experts]) * blocks_per_row;
  for (long i = first; i < total; i += stride) {
    const int s = static_cast<int>(i / blocks_per_row), b = static_cast<int>(i % blocks_per_row);
    float x[16];
    const float4* src = reinterpret_cast<const float4*>(h + static_cast<size_t>(s) * inter + 16 * b);
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const float4 q = src[v];
      x[4 * v] = q.x, x[4 * v + 1] = q.y, x[4 * v + 2] = q.z, x[4 * v + 3] = q.w;
    }
    quantize_block16(x, gs_of(expert_of(offsets, num_experts, s)), hq_data + static_cast<size_t>(s) * (inter / 2) + 8 * b,
                     hq_scale + static_cast<size_t>(s) * (inter / 16) + b, h_bf16 + static_cast<size_t>(s) * inter + 16 * b);
  }
}

// decode(q) * sf as BF16 (exact), no global scale: the W4A4 GEMM's activation operand.
__global__ void nvfp4_dequant_rows_kernel(const uint8_t* __restrict__ data, const uint8_t* __restrict__ scale,
                                          long num_blocks, __nv_bfloat16* __restrict__ out) {
  ep::wait_previous_grid();  // no early release: a grouped GEMM follows (see moe_align_kernel)
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < num_blocks;
       i += static_cast<long>(gridDim.x) * blockDim.x) {
    uint32_t pairs[8];
    dequant16(*reinterpret_cast<const uint2*>(data + 8 * i), e4m3_to_float(scale[i]), pairs);
    store_bf16x16(out + 16 * i, pairs);
  }
}

template <int BM, int BN>
void launch_gemm(const GemmArgs& a, int max_slots, cudaStream_t stream) {
  using TL = Tiles<BM, BN>;
  auto kernel = grouped_gemm_kernel<BM, BN>;
  // CTAs per SM: the per-expert tile prefix and slot offsets share the CTA's shared memory, so it depends on the
  // expert count (three decode CTAs fit beside each other for a rank's few dozen experts, not for a thousand). Asked
  // once per device and expert count, with the kernel's shared-memory limit set before the first query.
  const int per_sm = ep::once_per_device(a.num_experts, [&] {
    if constexpr (TL::kRegSplit) {
      // setmaxnreg only moves registers within the CTA's allocation, which the kernel's compiled register count sets:
      // below the split's total the consumers' setmaxnreg.inc would wait forever (the ring's 20 s trap).
      cudaFuncAttributes attr{};
      EP_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
      if (attr.numRegs * TL::kThreads < TL::kSplitRegs)
        throw std::runtime_error("grouped gemm: the " + std::to_string(BM) + "x" + std::to_string(BN) +
                                 " kernel was compiled to " + std::to_string(attr.numRegs) +
                                 " registers per thread, too few for its setmaxnreg split");
    }
    EP_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, TL::smem_bytes(kMaxExperts)));
    int blocks = 0;
    EP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, TL::kThreads,
                                                                TL::smem_bytes(a.num_experts)));
    return std::max(blocks, 1);
  });
  // Upper bound of the units any routing can produce, so the grid is fixed for a given shape (graph-safe): the
  // tiles, times the pieces a K split may cut each into (schedule_units; never more units than CTAs resident).
  const long max_tiles = static_cast<long>(max_slots / BN + a.num_experts) * (a.n_rows / BM);
  const int unit_capacity = ep::num_sms() * per_sm;
  const long max_pieces = TL::kKSplit && a.split_sums != nullptr ? kMaxPieces : 1;
  const int grid = static_cast<int>(std::min<long>(max_tiles * max_pieces, unit_capacity));
  if (grid <= 0) return;
  GemmArgs args = a;
  args.unit_capacity = unit_capacity;
  if (act_by_tma<TL::kWgmma>(a) && max_slots > 0) args.act_map = act_tensor_map(a.act, max_slots, a.k, BN);
  ep::launch(kernel, grid, TL::kThreads, TL::smem_bytes(a.num_experts), stream, args);
}

// Weight rows per tile: 128 gives each consumer warpgroup its own 64 rows; 64 doubles the tiles so that a
// few active experts still spread over every SM (sparse decode); 256 (slot tiles of 32 and more, on wgmma) halves
// the activation bytes each weight row costs, which bound prefill on L2 bandwidth, and m=32 too. block_m 0 counts
// the tiles of the slots spread evenly over as many experts as they can reach (the host knows the slot count, not the
// routing) and picks 256 where they fill the GPU four times over, else 128 where they fill it once, else 64:
// a shared expert (one expert, every token) thus gets prefill tiles from its slot tiles alone, where counting
// experts gave it 64-row tiles (measured in the layer at 8192 tokens: 3.6 ms). HMMA tiles take 64 rows
// - always with 8 slots: measured never slower than 128 rows, from 1 to 48 active experts at m=1 and at m=4
//   and 8 (L1 m=1, all active: 0.407 against 0.412 ms), while 16-slot tiles lose 5-7 % at m=16;
// - with 16 or 32 slots where 128-row tiles would load the SMs unevenly by at least 15 %, since a 64-row tile
//   streams a little slower. The count takes tile t to run on SM t mod SMs, which the hardware does not do
//   (bench/smid_probe.cu), and equal work per SM did not speed sparse decode up on an H200 (twenty-second session),
//   so the count is a proxy: the rule stands on measurement (6 of 48 experts at m=1 in L1: 65.6 us with 64-row tiles
//   against 72.4 with 128). bench/NOTES_experts.md has the numbers.
template <int BN>
void dispatch_m(const GemmArgs& a, int max_slots, int block_m, cudaStream_t stream) {
  auto fits = [&](int bm) { return a.n_rows % bm == 0 && (bm != 256 || BN >= kMinWideSlots); };
  if (block_m == 0) {
    const long active = std::min(a.num_experts, std::max(max_slots, 1));
    const long slot_tiles = std::max(1L, ((max_slots + active - 1) / active + BN - 1) / BN);  // per active expert
    auto tiles = [&](int bm) { return active * slot_tiles * (a.n_rows / bm); };
    const int sms = ep::num_sms();
    auto fills = [&](int bm, int times) { return fits(bm) && tiles(bm) >= times * sms; };
    block_m = fills(256, 4) ? 256 : fills(128, 1) ? 128 : 64;
    auto busiest_rows = [&](int bm) { return (tiles(bm) + sms - 1) / sms * bm; };
    if (!uses_wgmma(block_m, BN) && (BN == 8 || busiest_rows(64) * 20 <= busiest_rows(128) * 17)) block_m = 64;
  }
  EP_REQUIRE((block_m == 64 || block_m == 128 || block_m == 256) && fits(block_m),
             "grouped gemm: block_m must be 0, 64, 128 (row count a multiple of 128) or 256 (row count a multiple "
             "of 256, block_n >= 32), got " + std::to_string(block_m) + " for " + std::to_string(a.n_rows) +
                 " rows and block_n " + std::to_string(BN));
  if constexpr (BN >= kMinWideSlots) {
    if (block_m == 256) return launch_gemm<256, BN>(a, max_slots, stream);
  }
  if (block_m == 128) launch_gemm<128, BN>(a, max_slots, stream);
  else launch_gemm<64, BN>(a, max_slots, stream);
}

void dispatch(const GemmArgs& a, int max_slots, int block_n, int block_m, cudaStream_t stream) {
  switch (block_n) {
    case 8: return dispatch_m<8>(a, max_slots, block_m, stream);
    case 16: return dispatch_m<16>(a, max_slots, block_m, stream);
    case 32: return dispatch_m<32>(a, max_slots, block_m, stream);
    case 64: return dispatch_m<64>(a, max_slots, block_m, stream);
    case 128: return dispatch_m<128>(a, max_slots, block_m, stream);
    default: EP_REQUIRE(false, "grouped gemm: block_n must be 8, 16, 32, 64 or 128, got " + std::to_string(block_n));
  }
}

void check_shape(int num_experts, int k, const char* what) {
  EP_REQUIRE(num_experts >= 1 && num_experts <= kMaxExperts,
             std::string(what) + ": num_experts must be in [1, " + std::to_string(kMaxExperts) + "], got " +
                 std::to_string(num_experts));
  EP_REQUIRE(k > 0 && k % 64 == 0, std::string(what) + ": K must be a positive multiple of 64, got " + std::to_string(k));
}

// L1's K split workspace as the Python side hands it over (ops.check_split); sums 0: no split.
struct SplitWorkspace {
  std::uintptr_t sums;      // fp32, sum_floats of them
  long sum_floats;
  std::uintptr_t arrivals;  // int32, one per tile of a launch that splits (tiles of them), zero
  int tiles;
  int max_pieces;
};

// The fields L1 and L2 share: the tiled weights with their alphas, the activations, the slot offsets and the K
// split's workspace (sums 0: no split).
GemmArgs gemm_args(std::uintptr_t w, std::uintptr_t w_scale, std::uintptr_t w_alpha, std::uintptr_t act,
                   std::uintptr_t act_gs, std::uintptr_t offsets, int num_experts, int n_rows, int k, int epilogue,
                   const SplitWorkspace& split) {
  EP_REQUIRE(split.max_pieces >= 0, "grouped gemm: max_pieces must be >= 0, got " + std::to_string(split.max_pieces));
  GemmArgs a{};
  a.split_sums = ep::as_ptr<float>(split.sums);
  a.split_arrivals = ep::as_ptr<int>(split.arrivals);
  a.split_sum_floats = split.sum_floats;
  a.split_tiles = split.tiles;
  a.max_pieces = split.max_pieces;
  if (a.split_arrivals == nullptr || split.sum_floats <= 0 || split.tiles <= 0) a.split_sums = nullptr;
  a.w = ep::as_ptr<const uint8_t>(w);
  a.w_scale = ep::as_ptr<const uint8_t>(w_scale);
  a.w_alpha = ep::as_ptr<const float>(w_alpha);
  a.act = ep::as_ptr<const __nv_bfloat16>(act);
  a.act_gs = ep::as_ptr<const float>(act_gs);
  a.offsets = ep::as_ptr<const int>(offsets);
  a.num_experts = num_experts;
  a.n_rows = n_rows;
  a.k = k;
  a.epilogue = epilogue;
  return a;
}

void grouped_l1(std::uintptr_t w13, std::uintptr_t w13_scale, std::uintptr_t w13_alpha, std::uintptr_t act,
                std::uintptr_t x_gs, std::uintptr_t offsets, std::uintptr_t slot_pair, int topk, int num_experts,
                int hidden, int inter, int max_slots, int epilogue, float swiglu_limit, std::uintptr_t h_gs,
                std::uintptr_t out_f32, std::uintptr_t hq_data, std::uintptr_t hq_scale, std::uintptr_t h_bf16,
                std::uintptr_t split_sums, long split_sum_floats, std::uintptr_t split_arrivals, int split_tiles,
                int max_pieces, int block_n, int block_m, std::uintptr_t stream) {
  check_shape(num_experts, hidden, "grouped_l1");
  EP_REQUIRE(inter > 0 && inter % 32 == 0, "grouped_l1: intermediate size must be a positive multiple of 32, got " +
                                               std::to_string(inter));
  EP_REQUIRE(epilogue >= kGateUp && epilogue <= kHF32, "grouped_l1: bad epilogue " + std::to_string(epilogue));
  GemmArgs a = gemm_args(w13, w13_scale, w13_alpha, act, x_gs, offsets, num_experts, 2 * inter, hidden, epilogue,
                         SplitWorkspace{split_sums, split_sum_floats, split_arrivals, split_tiles, max_pieces});
  a.slot_pair = ep::as_ptr<const int>(slot_pair);
  a.topk = topk;
  a.inter = inter;
  a.swiglu_limit = swiglu_limit;
  a.h_gs = ep::as_ptr<const float>(h_gs);
  a.out_f32 = ep::as_ptr<float>(out_f32);
  a.hq_data = ep::as_ptr<uint8_t>(hq_data);
  a.hq_scale = ep::as_ptr<uint8_t>(hq_scale);
  a.h_bf16 = ep::as_ptr<__nv_bfloat16>(h_bf16);
  dispatch(a, max_slots, block_n, block_m, ep::as_stream(stream));
}

void grouped_l2(std::uintptr_t w2, std::uintptr_t w2_scale, std::uintptr_t w2_alpha, std::uintptr_t act,
                std::uintptr_t h_gs, std::uintptr_t offsets, int num_experts, int hidden, int inter, int max_slots,
                std::uintptr_t y_slot, int block_n, int block_m, std::uintptr_t stream) {
  check_shape(num_experts, inter, "grouped_l2");
  EP_REQUIRE(hidden > 0 && hidden % 64 == 0,
             "grouped_l2: hidden size must be a positive multiple of 64, got " + std::to_string(hidden));
  GemmArgs a = gemm_args(w2, w2_scale, w2_alpha, act, h_gs, offsets, num_experts, hidden, inter, kYSlot,
                         SplitWorkspace{});  // L2 never splits K (schedule_units)
  a.out_f32 = ep::as_ptr<float>(y_slot);
  dispatch(a, max_slots, block_n, block_m, ep::as_stream(stream));
}

void requant_dynamic(std::uintptr_t h_f32, std::uintptr_t offsets, int num_experts, int inter, int max_slots,
                     std::uintptr_t amax_ws, std::uintptr_t hq_data, std::uintptr_t hq_scale, std::uintptr_t h_bf16,
                     std::uintptr_t h_gs, std::uintptr_t stream) {
  EP_REQUIRE(inter % 16 == 0, "requant_dynamic: intermediate size must be a multiple of 16");
  cudaStream_t s = ep::as_stream(stream);
  EP_CUDA_CHECK(cudaMemsetAsync(ep::as_ptr<void>(amax_ws), 0, sizeof(unsigned) * num_experts, s));
  // A plain launch: it follows the memset, and a programmatic edge joins two kernels only.
  const int rows_grid = std::max(1, std::min((max_slots + 7) / 8, ep::num_sms() * 8));
  h_amax_kernel<<<rows_grid, 256, 0, s>>>(ep::as_ptr<const float>(h_f32), ep::as_ptr<const int>(offsets), num_experts,
                                          inter, ep::as_ptr<unsigned>(amax_ws));
  EP_CHECK_LAUNCH();
  const long blocks = static_cast<long>(max_slots) * (inter / 16);
  const int q_grid =
      static_cast<int>(std::max(1L, std::min((blocks + 255) / 256, static_cast<long>(ep::num_sms()) * 8)));
  ep::launch(h_requant_kernel, q_grid, 256, 0, s, ep::as_ptr<const float>(h_f32), ep::as_ptr<const int>(offsets),
             num_experts, inter, ep::as_ptr<const unsigned>(amax_ws), ep::as_ptr<uint8_t>(hq_data),
             ep::as_ptr<uint8_t>(hq_scale), ep::as_ptr<__nv_bfloat16>(h_bf16), ep::as_ptr<float>(h_gs));
}

void nvfp4_dequant_rows(std::uintptr_t data, std::uintptr_t scale, int rows, int k, std::uintptr_t out,
                        std::uintptr_t stream) {
  EP_REQUIRE(k % 16 == 0, "nvfp4_dequant_rows: K must be a multiple of 16, got " + std::to_string(k));
  const long blocks = static_cast<long>(rows) * (k / 16);
  if (blocks == 0) return;
  const int grid = static_cast<int>(std::min((blocks + 255) / 256, static_cast<long>(ep::num_sms()) * 16));
  ep::launch(nvfp4_dequant_rows_kernel, grid, 256, 0, ep::as_stream(stream), ep::as_ptr<const uint8_t>(data),
             ep::as_ptr<const uint8_t>(scale), blocks, ep::as_ptr<__nv_bfloat16>(out));
}

void bind_grouped_gemm(pybind11::module_& m) {
  m.def("grouped_l1", &grouped_l1, "L1 grouped GEMM over all local experts with the fused SwiGLU/requant epilogue");
  m.def("grouped_l2", &grouped_l2, "L2 grouped GEMM over all local experts, y_slot fp32");
  m.def("requant_dynamic", &requant_dynamic, "per-expert amax of h, then NVFP4 quantization of h");
  m.def("nvfp4_dequant_rows", &nvfp4_dequant_rows, "NVFP4 rows -> BF16 decode*sf (no global scale)");
}

}  // namespace
EP_REGISTER_BINDINGS(bind_grouped_gemm);
