// Hopper MMA operands of the expert GEMMs: exact NVFP4 dequantization of a weight atom's codes and scales
// (the SM90 atom layout of ep_runtime/sm90_layout.py) straight into wgmma / HMMA A fragments, and the issue of
// those products. Device-only, no torch: shared by the grouped GEMM kernel and the bench probes.
#pragma once
#include <cuda_bf16.h>
#include <cute/arch/mma_sm90_gmma.hpp>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace ep::sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint4 lds128(const void* p) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(smem_u32(p)));
  return v;
}

__device__ __forceinline__ uint2 lds64(const void* p) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(smem_u32(p)));
  return v;
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m, which lands in the m-th word.
__device__ __forceinline__ uint4 ldsm_x4(uint32_t smem_addr) {
  uint4 v;
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(smem_addr));
  return v;
}

__device__ __forceinline__ void mma_bf16(float& c0, float& c1, float& c2, float& c3, const uint32_t (&a)[4],
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

__device__ __forceinline__ uint32_t rotr(uint32_t w, int r) { return __funnelshift_r(w, w, r); }

// Pair I of a weight word as a bf16x2 holding value * 2^-126 per half: E2M1 code bits m, e0, e1 at bf16
// bits 6-8 (a bf16 whose exponent field is the E2M1 exponent: code 1 = 0.5 is a bf16 subnormal) and the sign
// at 15. sm90_layout.STORED placed the bits so that pairs 0 and 1 take a left shift and an AND, pair 2 a rotate and
// an AND, pair 3 a rotate and two LOPs: 9 instructions per word. ptxas issues the left shifts as IMADs on the FMA
// pipe, so 7 of them load the integer pipe, which the dequantization keeps busy in decode (9 when pairs 1-3 were
// rotated: 3-7 % slower from m=1 to m=128 on an H200, NOTES_experts.md, twenty-first session). A right shift does not
// go there: as IMAD.HI instead of pair 3's rotate it made decode no faster and m=32 to m=128 3-6 % slower (thirtieth
// session). Pair 3's OR is in PTX: written in C, ptxas spilled 4 bytes in the 128x32 kernel.
template <int I>
__device__ __forceinline__ uint32_t e2m1_pair(uint32_t w) {
  constexpr uint32_t kBits = 0x81C081C0u;  // bits 6-8 and 15 of each half
  if constexpr (I == 0) return (w << 6) & kBits;
  if constexpr (I == 1) return (w << 2) & kBits;
  if constexpr (I == 2) return rotr(w, 20) & kBits;
  uint32_t d;  // (rotr(w, 24) & bits 6 and 22) | (w & the rest)
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(rotr(w, 24)), "n"(0x00400040), "r"(w & 0x81808180u));
  return d;
}

// Scale bytes K and K+2 (K = 0 or 1) of a lane's scale word w -> bf16x2 (s_K, s_K+2) with s = sf * 2^118. Each
// byte is bits 4-11 of the bf16 of s (sm90_layout.encode_scales): 2^109 <= s < 2^127 for every nonzero UE4M3, so
// bits 12-14 are always set, the sign clear and bits 0-3 zero. The load rotated each word left by 4 bits, which puts
// bytes 0 and 2 at bits 4-11 of the halves: one LOP3 (mask, or in bits 12-14) rebuilds them, and bytes 1 and 3 take
// a rotate first. In PTX because written in C ptxas splits the mask and the OR into two LOP3s (it keeps neither
// constant in a register); 6 instructions per word before, 3 now.
template <int K>
__device__ __forceinline__ uint32_t scale_pair(uint32_t w) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(K == 0 ? w : rotr(w, 8)), "n"(0x0FF00FF0), "r"(0x70007000u));
  return d;
}

// (x.H, x.H) from half H of a bf16x2: ptxas folds it into the multiply that takes it as an operand selector
// (.H0_H0 / .H1_H1), so it costs no instruction.
template <int H>
__device__ __forceinline__ uint32_t bcast_half(uint32_t x) {
  const __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(&x);
  const __nv_bfloat162 r = H == 0 ? __low2bfloat162(v) : __high2bfloat162(v);
  return *reinterpret_cast<const uint32_t*>(&r);
}

// wgmma A fragment of one k16 step: (row g, k 2t..), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..).
// Word wg / wg8 holds rows g / g+8 of two steps; SP picks the step, so pair 2SP is k 2t.. and pair 2SP+1
// is k 2t+8.. (see sm90_layout.py).
template <int SP>
__device__ __forceinline__ void dequant_step(uint32_t wg, uint32_t wg8, uint32_t sg, uint32_t sg8, uint32_t (&a)[4]) {
  a[0] = bf16x2_mul(e2m1_pair<2 * SP>(wg), sg);
  a[1] = bf16x2_mul(e2m1_pair<2 * SP>(wg8), sg8);
  a[2] = bf16x2_mul(e2m1_pair<2 * SP + 1>(wg), sg);
  a[3] = bf16x2_mul(e2m1_pair<2 * SP + 1>(wg8), sg8);
}

template <int N>
struct Gmma;
#define EP_GMMA_RS(N)                                                                                  \
  template <>                                                                                        \
  struct Gmma<N> {                                                                                   \
    using Op = cute::SM90::GMMA::MMA_64x##N##x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K,        \
                                                                cute::SM90::GMMA::Major::K>;        \
  };
EP_GMMA_RS(8)
EP_GMMA_RS(16)
EP_GMMA_RS(32)
EP_GMMA_RS(64)
EP_GMMA_RS(128)
EP_GMMA_RS(256)
#undef EP_GMMA_RS

// f(std::integral_constant<int, i>) for i = 0..N-1, unrolled at compile time (template arguments inside f).
template <typename F, int... I>
__device__ __forceinline__ void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

template <int N, size_t... I>
__device__ __forceinline__ void gmma_impl(const uint32_t (&a)[4], uint64_t desc, float (&d)[N / 2],
                                          std::index_sequence<I...>) {
  Gmma<N>::Op::fma(a[0], a[1], a[2], a[3], desc, d[I]...);
}

// D(64 x N) += A(64 x 16, registers) * B(16 x N, shared memory), fp32 accumulators.
template <int N>
__device__ __forceinline__ void gmma(const uint32_t (&a)[4], uint64_t desc, float (&d)[N / 2]) {
  gmma_impl<N>(a, desc, d, std::make_index_sequence<N / 2>{});
}

// Keeps registers in place across wgmma issue/wait: the compiler may neither reuse nor move them.
template <typename T, int N>
__device__ __forceinline__ void fence_all(T (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(r[i]);
}

// Shared-memory descriptor of a K-major BF16 operand with the 128-byte swizzle: rows of 64 elements
// (128 B), 8-row groups 1024 B apart. Its high word is a constant; the low word holds the start address
// (addr >> 4: shared addresses stay below 2^18, so no mask) and the leading-byte-offset field 1, so a k16
// step (32 B further inside the row) is + 2 on the low word alone.
__device__ __forceinline__ uint64_t act_desc(uint32_t low) {
  return static_cast<uint64_t>((1u << 30) | (1024 >> 4)) << 32 | low;
}
__device__ __forceinline__ uint32_t act_desc_low(uint32_t smem_addr) { return (smem_addr >> 4) | (1u << 16); }

// A fragments of k16 step ST of an atom, dequantized from this lane's 16 code bytes wv and its warp's 8 scale
// bytes sv of the atom.
template <int ST>
__device__ __forceinline__ void dequant_k16(const uint4& wv, const uint2& sv, uint32_t (&af)[4]) {
  dequant_step<ST & 1>(ST < 2 ? wv.x : wv.y, ST < 2 ? wv.z : wv.w, bcast_half<ST / 2>(scale_pair<ST & 1>(sv.x)),
                       bcast_half<ST / 2>(scale_pair<ST & 1>(sv.y)), af);
}

// One atom's A fragments for its four k16 steps, dequantized: `codes` and `scales` point at this lane's 16 code
// bytes and its warp's 8 scale bytes of the atom.
__device__ __forceinline__ void dequant_atom(const uint8_t* codes, const uint8_t* scales, uint32_t (&af)[4][4]) {
  const uint4 wv = lds128(codes);
  const uint2 sv = lds64(scales);
  dequant_k16<0>(wv, sv, af[0]);
  dequant_k16<1>(wv, sv, af[1]);
  dequant_k16<2>(wv, sv, af[2]);
  dequant_k16<3>(wv, sv, af[3]);
}

// acc (64 rows x BN slots, wgmma D layout) += one atom (its fragments af) x one K chunk of the activation stage,
// issued as one wgmma group. Not waited for: the caller drains.
template <int BN>
__device__ __forceinline__ void wgmma_atom(uint32_t act_chunk, uint32_t (&af)[4][4], float (&acc)[BN / 2]) {
  const uint32_t low = act_desc_low(act_chunk);
  // Pinned: the fragments are complete before the wgmmas that read them are issued.
  fence_all(reinterpret_cast<uint32_t(&)[16]>(af));
  fence_all(acc);
  cute::warpgroup_arrive();
#pragma unroll
  for (int st = 0; st < 4; ++st) gmma<BN>(af[st], act_desc(low + 2 * st), acc);
  cute::warpgroup_commit_batch();
}

// The same product for narrow slot tiles by HMMA (m16n8k16 A/C layouts are a warp's slice of wgmma's): this
// warp's 16 rows of each of NA atoms (codes / scales: atom 0's lane and warp pointers, later atoms every
// kCodeStride / kScaleStride bytes) x one K chunk of the swizzled activation stage. Groups of k16 steps go
// outermost, so each group's B fragments (conflict-free ldmatrix.x4) serve every atom, and each atom's A fragments
// are dequantized one step at a time; per accumulator the steps still add in order 0..3.
template <int BN, int NA, int kCodeStride, int kScaleStride>
__device__ __forceinline__ void hmma_chunk(uint32_t act_chunk, const uint8_t* codes, const uint8_t* scales,
                                           float (&acc)[NA * BN / 2], int lane) {
  // k16 steps per group: two, except with 32 slots, whose accumulators leave registers for one step's B only.
  constexpr int kS = BN == 32 ? 1 : 2;
  constexpr int kJ = 2 / kS;  // 8-slot groups per ldmatrix.x4 (its four 8x8 matrices: kJ groups x kS steps x b0/b1)
  // Lanes 8m..8m+7 point at the rows of matrix m: slot group m / (2 kS) of the load, 16-byte piece
  // 2 kS G + m % (2 kS) of group G, swizzled by the row (an XOR: group G's offset is group 0's XOR (2 kS G) << 4).
  // The chunk being 1024-byte aligned, the XOR applies to the lane's offset in it, which stays in a register for the
  // whole kernel: each load's address is then one add (an add and an XOR when applied to the address).
  const int m = lane >> 3;
  const uint32_t lane_off = (8 * (m / (2 * kS)) + (lane & 7)) * 128 + (((m % (2 * kS)) ^ (lane & 7)) << 4);
  uint4 wv[NA];
  uint2 sv[NA];
#pragma unroll
  for (int i = 0; i < NA; ++i) wv[i] = lds128(codes + i * kCodeStride), sv[i] = lds64(scales + i * kScaleStride);
  static_for<4 / kS>([&](auto group) {
    constexpr int G = decltype(group)::value;
    // b[j][st]: (b0, b1) of step kS G + st for slots 8j..8j+7 (matrix w of load l: slot group l kJ + w / (2 kS)).
    uint32_t b[BN / 8][kS][2];
#pragma unroll
    for (int l = 0; l < BN / 8 / kJ; ++l) {
      const uint4 v = ldsm_x4(act_chunk + (lane_off ^ (kS * G << 5)) + l * kJ * 1024);
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) b[l * kJ + w / (2 * kS)][(w / 2) % kS][w % 2] = words[w];
    }
#pragma unroll
    for (int i = 0; i < NA; ++i) {
      float* d = acc + i * (BN / 2);
      static_for<kS>([&](auto st) {
        uint32_t af[4];
        dequant_k16<kS * G + decltype(st)::value>(wv[i], sv[i], af);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          mma_bf16(d[4 * j], d[4 * j + 1], d[4 * j + 2], d[4 * j + 3], af, b[j][st][0], b[j][st][1]);
        }
      });
    }
  });
}

}  // namespace ep::sm90
