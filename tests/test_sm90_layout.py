"""The SM90 weight layout (ep_runtime/sm90_layout.py), checked against the kernel's fragment rules as written
in csrc/grouped_gemm_sm90.cu: where each (row, k) element and each (row, k16) scale must sit."""
from __future__ import annotations

import pytest
import torch

from ep_runtime import nvfp4, sm90_layout
from ep_runtime.experts import ExpertSpec, expert_stage
from ep_runtime.weights import ExpertWeights


def kernel_pair(words: torch.Tensor, pair: int) -> torch.Tensor:
    """csrc/grouped_gemm_sm90.cu e2m1_pair<I>, transcribed: the bf16x2 bits of pair I of each 32-bit word."""
    def rotr(w: torch.Tensor, r: int) -> torch.Tensor:
        return ((w >> r) | (w << (32 - r))) & 0xFFFFFFFF

    bits = 0x81C081C0
    if pair == 0:
        return (words << 6) & bits
    if pair == 1:
        return (words << 2) & bits
    if pair == 2:
        return rotr(words, 20) & bits
    return (rotr(words, 24) & 0x00400040) | (words & 0x81808180)


def test_each_lanes_fragment_words_decode_to_its_elements(gen):
    """Lane (g, t) of warp cw loads 16 bytes at cw*512 + lane*16 of the atom: bytes [r*8 + v*4, +4) are the word
    of row 16cw+8r+g for k16 steps 2v, 2v+1, and half e of its pair 2sp+h is k = 16*st + 8h + 2t + e, as a bf16
    of value * 2^-126."""
    n, k = 128, 192
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    b = sm90_layout.tile_packed(packed).view(-1, 4).long()
    words = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)
    pairs = torch.stack([kernel_pair(words, i) for i in range(4)], dim=1)  # (words, pair)

    row = torch.arange(n).view(n, 1)
    col = torch.arange(k).view(1, k)
    nb, rr, kb, kk = row // 64, row % 64, col // 64, col % 64
    cw, r, g = rr // 16, (rr % 16) // 8, rr % 8
    st, h, t, e = kk // 16, (kk % 16) // 8, (kk % 8) // 2, kk % 2
    v, sp = st // 2, st % 2
    byte = (nb * (k // 64) + kb) * 2048 + cw * 512 + (g * 4 + t) * 16 + r * 8 + v * 4
    word_idx, pair, half = torch.broadcast_tensors(byte // 4, 2 * sp + h, e)
    bf16 = ((pairs[word_idx, pair] >> (16 * half)) & 0xFFFF).to(torch.int16).view(torch.bfloat16).float()
    assert torch.equal(bf16 * 2.0 ** 126, nvfp4.e2m1_decode(codes))


def test_tile_scales_puts_each_scale_where_its_rows_lanes_read_it(gen):
    n, k = 128, 192
    scales = torch.randint(0, 256, (n, k // 16), generator=gen, dtype=torch.uint8)
    tiled = sm90_layout.tile_scales(scales).flatten()
    row = torch.arange(n).view(n, 1)
    step = torch.arange(k // 16).view(1, -1)
    rr, kb, st = row % 64, step // 4, step % 4
    cw, r, g = rr // 16, (rr % 16) // 8, rr % 8
    pos = ((row // 64) * (k // 64) + kb) * 256 + cw * 64 + g * 8 + r * 4 + st
    assert torch.equal(tiled[pos.flatten()].view(n, -1), scales)


def test_gate_up_row_order_pairs_32_gate_rows_with_their_up_rows():
    order = sm90_layout.gate_up_row_order(64)
    assert order[:32].tolist() == list(range(32)) and order[32:64].tolist() == list(range(64, 96))
    assert order[64:96].tolist() == list(range(32, 64)) and order[96:].tolist() == list(range(96, 128))


def test_tile_in_place_reorders_l1_rows_then_tiles_every_expert(gen):
    w = ExpertWeights.synthetic(range(3), 128, 64, seed=1, device="cpu")
    before = w.clone()
    out = sm90_layout.tile_(w)
    assert out is w and w.layout == "sm90"
    order = sm90_layout.gate_up_row_order(64)
    for e in range(3):  # synthetic scales are never zero, so no codes are zeroed before tiling
        l1_scales = sm90_layout.scale_words(before.w13_scale[e].view(torch.uint8)[order])
        l2_scales = sm90_layout.scale_words(before.w2_scale[e].view(torch.uint8))
        assert torch.equal(w.w13[e], sm90_layout.tile_packed(before.w13[e][order]))
        assert torch.equal(w.w13_scale[e].view(torch.uint8), l1_scales)
        assert torch.equal(w.w2[e], sm90_layout.tile_packed(before.w2[e]))
        assert torch.equal(w.w2_scale[e].view(torch.uint8), l2_scales)
    assert torch.equal(w.w13_alpha, before.w13_alpha) and torch.equal(w.l2_input_scale, before.l2_input_scale)


def test_tile_rejects_sizes_that_are_not_multiples_of_64():
    w = ExpertWeights.empty(1, 96, 64)
    with pytest.raises(ValueError, match="multiples of 64.*hidden=96"):
        sm90_layout.tile_(w)


def test_tile_rejects_weights_already_tiled(gen):
    w = sm90_layout.tile_(ExpertWeights.synthetic(range(1), 64, 64, seed=1, device="cpu"))
    with pytest.raises(ValueError, match="expected layout 'rows'"):
        sm90_layout.tile_(w)


def test_reference_stage_rejects_tiled_weights(gen):
    w = sm90_layout.tile_(ExpertWeights.synthetic(range(2), 64, 64, seed=1, device="cpu"))
    idx = torch.tensor([[0], [1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="the reference expert stage takes layout 'rows', got 'sm90'"):
        expert_stage(torch.randn(2, 64).bfloat16(), idx, torch.ones(2, 1), w, 0, ExpertSpec("bf16", "static", None))


def test_cuda_stage_rejects_row_layout_weights():
    from ep_runtime.cuda_experts import cuda_expert_stage

    w = ExpertWeights.synthetic(range(2), 64, 64, seed=1, device="cpu")
    idx = torch.tensor([[0], [1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA expert stage.*takes layout 'sm90', got 'rows'"):
        cuda_expert_stage(torch.randn(2, 64).bfloat16(), idx, torch.ones(2, 1), w, 0,
                          ExpertSpec("bf16", "static", None))


def test_encoded_scale_rebuilds_the_exact_bf16_of_every_ue4m3_value_times_2_pow_118():
    """Each half of the kernel's scale_pair: bf16 bits = (byte << 4) | SCALE_FIXED_BITS."""
    raw = torch.arange(1, 0x7F, dtype=torch.uint8)  # every positive finite UE4M3, subnormals included
    enc = sm90_layout.encode_scales(raw).int()
    rebuilt = ((enc << 4) | sm90_layout.SCALE_FIXED_BITS).to(torch.int16).view(torch.bfloat16).float()
    assert torch.equal(rebuilt, raw.view(torch.float8_e4m3fn).float() * 2.0 ** 118)
    assert sm90_layout.encode_scales(torch.tensor([0, 0x80], dtype=torch.uint8)).tolist() == [0, 0]


def test_scale_pair_reads_every_scale_of_its_step_from_the_stored_words(gen):
    """The kernel's scale_pair<K> on a lane's word w: ((K ? rotr(w, 8) : w) & 0x0FF00FF0) | 0x70007000 holds
    steps K and K + 2 of that row as bf16 sf * 2^118 in its low and high halves."""
    n, k = 128, 192
    raw = torch.randint(1, 0x7F, (n, k // 16), generator=gen, dtype=torch.uint8)
    words = sm90_layout.scale_words(raw).view(-1, 4).long()
    words = words[:, 0] | words[:, 1] << 8 | words[:, 2] << 16 | words[:, 3] << 24
    row = torch.arange(n).view(n, 1)
    step = torch.arange(k // 16).view(1, -1)
    rr, kb, st = row % 64, step // 4, step % 4
    cw, r, g = rr // 16, (rr % 16) // 8, rr % 8
    w = words[(((row // 64) * (k // 64) + kb) * 256 + cw * 64 + g * 8 + r * 4) // 4]
    rotr8 = ((w >> 8) | (w << 24)) & 0xFFFFFFFF
    pair = (torch.where(st % 2 == 1, rotr8, w) & 0x0FF00FF0) | 0x70007000
    half = (pair >> (16 * (st // 2))) & 0xFFFF
    got = half.to(torch.int16).view(torch.bfloat16).float()
    assert torch.equal(got, raw.view(torch.float8_e4m3fn).float() * 2.0 ** 118)


def test_tiling_zeroes_the_codes_of_blocks_whose_scale_is_zero(gen):
    w = ExpertWeights.synthetic(range(1), 64, 64, seed=1, device="cpu")
    w.w2_scale.view(torch.uint8)[0, 5, 2] = 0
    w.w2[0, 5].fill_(0x77)
    expected = w.w2[0].clone()
    expected[5, 16:24] = 0
    sm90_layout.tile_(w)
    assert torch.equal(w.w2[0], sm90_layout.tile_packed(expected))


@pytest.mark.parametrize("stack", ["w13_scale", "w2_scale"])
@pytest.mark.parametrize("byte", [0x7F, 0xFF, 0x81, 0xC0])
def test_tiling_rejects_nan_or_negative_scales_and_leaves_weights_untouched(stack, byte):
    w = ExpertWeights.synthetic(range(2), 64, 64, seed=1, device="cpu")
    getattr(w, stack).view(torch.uint8)[1, 3, 0] = byte
    before = w.clone()
    with pytest.raises(ValueError, match=rf"weights.{stack}: block scales must be finite, non-negative UE4M3; "
                                         rf"found byte 0x{byte:02X} at \(1, 3, 0\)"):
        sm90_layout.tile_(w)
    assert w.layout == "rows" and torch.equal(w.w13, before.w13) and torch.equal(w.w2, before.w2)
