"""The weight layout of the SM90 grouped GEMMs (csrc/grouped_gemm_sm90.cu), made once at load.

The kernels stream weights in atoms of 64 rows x 64 K: 2 KB of packed E2M1 then (in the scale tensor) 256 B
of UE4M3, each contiguous, so one bulk copy moves an atom and one 16-byte shared-memory load gives a lane
the codes of its A fragments for the atom's four k16 steps. Atoms are ordered
[expert][row block][K block], so a row block's K stream is sequential in memory. The tensors keep their
shapes ((E, N, K/2) and (E, N, K/16)); only the byte order changes.

Inside an atom, row rr = 16*cw + 8*r + g (warp cw of the consumer warpgroup, fragment row g or g+8) and
k = 16*st + 8*h + 2*t + e with st = 2*v + sp (k16 step st; h: the fragment's k 0-7 or 8-15 half; lane
column t; e: the element of a bf16x2 pair). Byte order is [cw][g][t][r][v] of 32-bit words, each holding
the four bf16x2 pairs (sp, h) of its row and two k16 steps, with their code bits placed where the kernel's
e2m1_pair extracts them cheaply (STORED below). Scales are [cw][g][r][st], each byte encoded
(encode_scales) and each 4-byte word (a row's four k16 steps) rotated left by 4 bits (scale_words). L1 row
blocks hold 32 gate rows then the matching 32 up rows, so the SwiGLU epilogue finds both halves of an output
column in one tile.
"""
from __future__ import annotations

import torch

from . import ops
from .weights import ExpertWeights

LAYOUT = "sm90"
# bf16 bits of sf * 2^118 that every nonzero UE4M3 shares (2^109 <= sf * 2^118 < 2^127: exponent bits 5-7 set, sign
# clear); the kernel ORs them back in
SCALE_FIXED_BITS = 0x7000


def gate_up_row_order(inter: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Row-layout index of each tiled w13 row: blocks of 32 gate rows followed by the same 32 up rows."""
    if inter % 32:
        raise ValueError(f"intermediate size: expected a multiple of 32 for the SM90 layout, got {inter}")
    order = torch.arange(2 * inter, device=device).view(2, inter // 32, 32)
    return order.transpose(0, 1).reshape(-1)


# Where each code bit sits in a 32-bit word. A word holds four bf16x2 pairs I = 2*sp + h; the kernel turns
# pair I into a bf16x2 whose halves are value * 2^-126 (code bits m, e0, e1 at bf16 bits 6-8, sign at 15)
# with e2m1_pair<I>: pairs 0 and 1 are stored 6 and 2 bits below (left shift + AND), pair 2 rotated by 20 bits
# (rotate + AND), and pair 3 in the eight bits left over, six of them in place and two rotated by 24 (rotate, two
# LOPs): 9 instructions for 8 values, 7 of them on the integer pipe (the left shifts can go to the FMA pipe).
# TARGET[e][b]: the bf16x2 bit of element e's code bit b; STORED[I][t]: the word bit holding target bit t.
TARGET = ((6, 7, 8, 15), (22, 23, 24, 31))
STORED = (
    {t: t - 6 for t in TARGET[0] + TARGET[1]},
    {t: t - 2 for t in TARGET[0] + TARGET[1]},
    {t: (t + 20) % 32 for t in TARGET[0] + TARGET[1]},
    {6: 30, 7: 7, 8: 8, 15: 15, 22: 14, 23: 23, 24: 24, 31: 31},  # rotate 24 brings 6, 22; the rest in place
)


def tile_packed(w: torch.Tensor) -> torch.Tensor:
    """One expert's packed E2M1 (N, K/2) uint8 in row layout -> the kernels' words in atom order."""
    n, kh = w.shape
    k = 2 * kh
    nib = torch.stack((w & 0xF, w >> 4), dim=-1).view(n // 64, 4, 2, 8, k // 64, 2, 2, 2, 4, 2)
    # (nb, cw, r, g, kb, v, sp, h, t, e) -> (nb, kb, cw, g, t, r, v, e, sp, h): one word per (..., v)
    codes = nib.permute(0, 4, 1, 3, 8, 2, 5, 9, 6, 7).reshape(-1, 2, 4).int()
    word = torch.zeros(codes.shape[0], dtype=torch.int64, device=w.device)
    for pair, stored in enumerate(STORED):
        for e in range(2):
            for bit, target in enumerate(TARGET[e]):
                word |= ((codes[:, e, pair] >> bit) & 1).long() << stored[target]
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.uint8).view(n, kh)


def tile_scales(s: torch.Tensor) -> torch.Tensor:
    """One expert's UE4M3 scale bytes (N, K/16) uint8 in row layout -> atom order."""
    n, ks = s.shape
    # (nb, cw, r, g, kb, st) -> (nb, kb, cw, g, r, st)
    return s.view(n // 64, 4, 2, 8, ks // 4, 4).permute(0, 4, 1, 3, 2, 5).reshape(n, ks)


def check_tileable(weights: ExpertWeights, name: str = "weights") -> None:
    """What tile_ and the kernels need of row-layout weights beyond ExpertWeights.check_values: raises before it
    changes a byte (a stack the kernels would refuse, non-contiguous say, must not be left tiled)."""
    h, i = weights.hidden_size, weights.intermediate_size
    if h % 64 or i % 64:
        raise ValueError(f"{name}: the SM90 layout needs hidden and intermediate sizes that are multiples of 64, "
                         f"got hidden={h}, intermediate={i}")
    ops.check_l1_weights(weights.w13, weights.w13_scale, weights.w13_alpha, f"{name}.")
    ops.check_l2_weights(weights.w2, weights.w2_scale, weights.w2_alpha, f"{name}.")


def encode_scales(s: torch.Tensor) -> torch.Tensor:
    """UE4M3 scale bytes -> the kernels' byte: bits 4-11 of the bf16 of sf * 2^118 (its low five exponent bits and
    three mantissa bits). Every UE4M3 value (subnormals included) is exact in that form, and its other bits are
    SCALE_FIXED_BITS, so the kernel rebuilds the bf16 with a mask and an OR. Zero encodes as 0 (read back as 2^97);
    zero_unscaled_codes_ makes that harmless."""
    v = s.view(torch.float8_e4m3fn).float()
    bits = (v * 2.0 ** 118).to(torch.bfloat16).view(torch.int16).int()
    return torch.where(v > 0, (bits >> 4) & 0xFF, 0).to(torch.uint8)


def scale_words(s: torch.Tensor) -> torch.Tensor:
    """One expert's UE4M3 scale bytes (N, K/16) in row layout -> the kernels' scale tensor: encoded, in atom order,
    each 4-byte word (a row's four k16 steps in one atom) rotated left by 4 bits, so that the bytes of steps 0 and 2
    sit at bits 4-11 of the two bf16 halves where scale_pair<0> masks them, and steps 1 and 3 one byte rotation
    away."""
    b = tile_scales(encode_scales(s)).view(-1, 4).int()
    # byte i of the little-endian word rotated by 4: its own low nibble over the high nibble of byte i - 1 (mod 4)
    return ((b << 4 | b.roll(1, dims=-1) >> 4) & 0xFF).to(torch.uint8).view(s.shape)


def zero_unscaled_codes_(data: torch.Tensor, scale: torch.Tensor) -> None:
    """Codes of blocks whose scale is zero are worth 0 whatever they are; make them 0 (codes (N, K/2), scale
    bytes (N, K/16)) so the kernels need not test the scale."""
    n, ks = scale.shape
    data.view(n, ks, 8).masked_fill_(((scale & 0x7F) == 0).unsqueeze(-1), 0)


def tile_stack_(data: torch.Tensor, scale: torch.Tensor, row_order: torch.Tensor | None = None) -> None:
    """Re-tiles stacked (E, N, K/2) packed weights and their (E, N, K/16) scales (encoded) in place, one expert at
    a time (peak memory: the stacks plus one expert's temporaries, 0.6 GB measured for a V4-Pro gate|up);
    row_order first permutes each expert's rows. The scales must pass nvfp4.check_scale_bytes."""
    scale = scale.view(torch.uint8)
    for e in range(data.shape[0]):
        d, s = (data[e], scale[e]) if row_order is None else (data[e][row_order], scale[e][row_order])
        zero_unscaled_codes_(d, s)
        data[e].copy_(tile_packed(d))
        scale[e].copy_(scale_words(s))


def tile_(weights: ExpertWeights) -> ExpertWeights:
    """Re-tiles `weights` in place and marks them layout 'sm90'; the reference path no longer takes them."""
    if weights.layout != "rows":
        raise ValueError(f"weights: expected layout 'rows' to tile, got {weights.layout!r}")
    check_tileable(weights)
    weights.check_values()
    tile_stack_(weights.w13, weights.w13_scale, gate_up_row_order(weights.intermediate_size, weights.w13.device))
    tile_stack_(weights.w2, weights.w2_scale)
    weights.layout = LAYOUT
    return weights
