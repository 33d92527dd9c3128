"""CUDA expert stage (csrc/moe_align.cu, csrc/grouped_gemm_sm90.cu) against the oracle in ep_runtime/experts.py.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_experts_cuda.py`. Fresh random operands every
run; the oracle runs in fp32 on the same device (no TF32) with the same quantized operands. Every output
buffer is poisoned before a kernel runs.
"""
from __future__ import annotations

import pytest
import torch

from e2m1_ties import on_boundary, tie_blocks
from ep_runtime import nvfp4
from ep_runtime.experts import ExpertSpec, SlotMap, combine, l1_reference, l2_reference, map_slots, quantize_h, swiglu
from ep_runtime.nvfp4 import NVFP4Tensor
from ep_runtime.ops import extension_available
from ep_runtime.sm90_layout import tile_
from ep_runtime.weights import ExpertWeights

pytestmark = pytest.mark.gpu


if not extension_available("grouped_l1", "moe_align"):
    pytest.skip("needs an sm_90 CUDA device and the built extension", allow_module_level=True)

from ep_runtime import cuda_graphs, ops  # noqa: E402
from ep_runtime.cuda_experts import CudaExpertStage, ExpertWorkspace, cuda_expert_stage  # noqa: E402

DEV = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = False

W4A4 = ExpertSpec("nvfp4", "static", 10.0)
W4A4_DYNAMIC = ExpertSpec("nvfp4", "dynamic", None)
W4A16 = ExpertSpec("bf16", "static", 10.0)
SPECS = {"w4a4": W4A4, "w4a4_dynamic": W4A4_DYNAMIC, "w4a16": W4A16}


# ---- inputs ----

def random_weights(e: int, h: int, i: int, gen: torch.Generator) -> ExpertWeights:
    """Any bytes are valid E2M1 codes; scales spread over 2^-4..2^4 with random mantissas, alphas sized so
    gate/up come out O(1) for O(1) inputs."""
    def scales(*shape: int) -> torch.Tensor:
        v = torch.exp2(torch.rand(*shape, generator=gen) * 8 - 4)
        return v.to(torch.float8_e4m3fn)

    w = ExpertWeights.empty(e, h, i, DEV)
    w.w13.copy_(torch.randint(0, 256, w.w13.shape, generator=gen, dtype=torch.uint8))
    w.w13_scale.copy_(scales(e, 2 * i, h // 16))
    w.w13_alpha.copy_(torch.rand(e, 2, generator=gen) * 0.5 / (3 * h ** 0.5) + 0.25 / (3 * h ** 0.5))
    w.w2.copy_(torch.randint(0, 256, w.w2.shape, generator=gen, dtype=torch.uint8))
    w.w2_scale.copy_(scales(e, h, i // 16))
    w.w2_alpha.copy_(torch.rand(e, generator=gen) * 0.5 / (3 * i ** 0.5) + 0.25 / (3 * i ** 0.5))
    w.l1_input_scale.fill_(4.0 / 2688)
    w.l2_input_scale.copy_(torch.rand(e, generator=gen) * 4 / 2688 + 2 / 2688)
    return w


def random_acts(t: int, h: int, weights: ExpertWeights, spec: ExpertSpec, gen: torch.Generator):
    x = torch.randn(t, h, generator=gen).to(DEV, torch.bfloat16)
    if spec.act_mode == "bf16":
        return x
    return nvfp4.quantize(x, 1.0 / weights.l1_input_scale)


def routing(kind: str, t: int, k: int, e_local: int, gen: torch.Generator, expert_begin: int = 0,
            e_total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_idx (T, k) int32 of global ids (distinct per token) and fp32 weights.

    uniform: every expert; uneven: a skewed distribution with some experts idle; one_expert: every token's
    first choice is local expert 0 and the rest are other ranks' experts; half_idle: only even local experts.
    """
    e_total = e_total or e_local
    if kind == "uniform":
        logits = torch.rand(t, e_total, generator=gen)
    elif kind == "uneven":
        logits = torch.rand(t, e_total, generator=gen) * torch.linspace(0.05, 3.0, e_total) ** 3
    elif kind == "half_idle":
        logits = torch.rand(t, e_total, generator=gen)
        logits[:, expert_begin + 1:expert_begin + e_local:2] = -1.0
    elif kind == "one_expert":
        logits = torch.rand(t, e_total, generator=gen)
        logits[:, expert_begin:expert_begin + e_local] = -1.0
        logits[:, expert_begin] = 2.0
    else:
        raise ValueError(kind)
    idx = logits.topk(k, dim=1).indices.int()
    w = torch.rand(t, k, generator=gen) + 0.1
    return idx.to(DEV), (w / w.sum(1, keepdim=True)).to(DEV)


# ---- helpers ----

def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def cosine(a: torch.Tensor, ref: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), ref.double().flatten(), dim=0).item()


def matches_stage_reference(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """The issue's cosine >= 0.9999, and the norm too (rel-L2 within what that cosine allows at equal norms): a
    constant factor, such as a wrong scale of the one expert that takes every slot, leaves the cosine at 1."""
    return cosine(out, ref) >= 0.9999 and rel_l2(out, ref) <= 0.015


def uneven_case(spec: ExpertSpec, e: int, h: int, i: int, t: int, k: int, gen: torch.Generator):
    """Random weights and activations for e local experts, t tokens routed top-k unevenly: (weights, acts, idx, w)."""
    weights = random_weights(e, h, i, gen)
    acts = random_acts(t, h, weights, spec, gen)
    idx, w = routing("uneven", t, k, e, gen)
    return weights, acts, idx, w


def poison(ws: ExpertWorkspace) -> None:
    for name in ("h_f32", "h_bf16", "y_slot", "h_gs", "x_bf16", "split_sums"):
        getattr(ws, name).fill_(float("nan"))
    for name in ("counts", "offsets", "slot_pair", "pair_slot", "amax_ws"):
        getattr(ws, name).fill_(0x7A7A7A7A)
    ws.hq_data.fill_(0xA5)
    ws.hq_scale.view(torch.uint8).fill_(0x7F)  # e4m3 NaN


def tiled(weights: ExpertWeights) -> ExpertWeights:
    """A copy in the kernels' layout; the row-layout original stays for the oracle."""
    return tile_(weights.clone())


def slots_from_workspace(ws: ExpertWorkspace, t: int) -> SlotMap:
    slot_pair, _ = ws.slots(t)
    return SlotMap(ws.counts.clone(), ws.offsets.clone(), slot_pair.clone(), ws.topk)


def run_stage(acts, idx, w, weights, spec, expert_begin=0, block_n=None, ws=None):
    t, k = idx.shape
    ws = ws or ExpertWorkspace.allocate(t, k, weights.num_experts, weights.hidden_size, weights.intermediate_size,
                                        DEV, spec)
    poison(ws)
    out = torch.full((t, weights.hidden_size), float("nan"), device=DEV)
    cuda_expert_stage(acts, idx, w, tiled(weights), expert_begin, spec, out=out, workspace=ws, block_n=block_n)
    return out, ws


def pair_slots(slots: SlotMap) -> torch.Tensor:
    """The combine's pair -> slot map (-1 for another rank's expert) of a SlotMap."""
    n = slots.slot_pair.shape[0]
    pair_slot = torch.full((n,), -1, dtype=torch.int32, device=DEV)
    pair_slot[slots.slot_pair[: slots.num_slots].long()] = torch.arange(slots.num_slots, dtype=torch.int32, device=DEV)
    return pair_slot


def l1_gate_up(acts, slots: SlotMap, weights, spec, block_n: int = 8, block_m: int = 0, split: dict | None = None,
               max_pieces: int = 0) -> torch.Tensor:
    t = slots.slot_pair.shape[0] // slots.topk
    if spec.act_mode == "nvfp4":
        x = torch.full((t, weights.hidden_size), float("nan"), dtype=torch.bfloat16, device=DEV)
        ops.nvfp4_dequant_rows(acts.data, acts.scale, x)
        x_gs = acts.global_scale.reshape(1)
    else:
        x, x_gs = acts, None
    gu = torch.full((slots.slot_pair.shape[0], 2 * weights.intermediate_size), float("nan"), device=DEV)
    kw = tiled(weights)
    ops.grouped_l1(kw.w13, kw.w13_scale, kw.w13_alpha, x, x_gs, slots.offsets, slots.slot_pair,
                   slots.topk, "gate_up", out_f32=gu, block_n=block_n, block_m=block_m, max_pieces=max_pieces,
                   **(split or {}))
    return gu[: slots.num_slots]


def slots_to_cpu(slots: SlotMap) -> SlotMap:
    return SlotMap(slots.counts.cpu(), slots.offsets.cpu(), slots.slot_pair.cpu(), slots.topk)


# ---- moe_align ----

@pytest.mark.parametrize("kind", ["uniform", "uneven", "half_idle", "one_expert"])
@pytest.mark.parametrize("t,k,e_local,ranks", [(1, 6, 48, 1), (37, 6, 16, 1), (1500, 8, 32, 4), (3000, 6, 384, 1)])
def test_moe_align_equals_map_slots(kind, t, k, e_local, ranks, gen):
    rank = ranks - 1 if ranks > 1 else 0
    begin = rank * e_local
    idx, _ = routing(kind, t, k, e_local, gen, begin, e_local * ranks)
    ref = map_slots(idx, e_local, begin)
    counts, offsets = torch.full((e_local,), -7, dtype=torch.int32, device=DEV), torch.full(
        (e_local + 1,), -7, dtype=torch.int32, device=DEV)
    slot_pair, pair_slot = (torch.full((t * k,), -7, dtype=torch.int32, device=DEV) for _ in range(2))
    ops.moe_align(idx, e_local, begin, counts, offsets, slot_pair, pair_slot, num_experts_total=e_local * ranks,
                  check=True)
    assert torch.equal(counts, ref.counts) and torch.equal(offsets, ref.offsets)
    assert torch.equal(slot_pair, ref.slot_pair)
    inverse = torch.full((t * k,), -1, dtype=torch.int32, device=DEV)
    n = ref.num_slots
    inverse[ref.slot_pair[:n].long()] = torch.arange(n, dtype=torch.int32, device=DEV)
    assert torch.equal(pair_slot, inverse)


def test_moe_align_check_rejects_ids_out_of_range(gen):
    idx, _ = routing("uniform", 4, 2, 8, gen)
    idx[2, 1] = 8
    bufs = [torch.empty(n, dtype=torch.int32, device=DEV) for n in (8, 9, 8, 8)]
    with pytest.raises(ValueError, match="topk_idx"):
        ops.moe_align(idx, 8, 0, *bufs, check=True)


def test_checked_ops_take_moe_aligns_metadata_and_give_the_unchecked_bits(gen):
    """check=True reads the device metadata on the host: real metadata passes, and the outputs are the bits an
    unchecked call writes."""
    e, h, i, t, k = 8, 256, 128, 37, 4
    weights, x, idx, w = uneven_case(W4A16, e, h, i, t, k, gen)
    kw, slots = tiled(weights), map_slots(idx, e, 0)
    pair_slot = pair_slots(slots)
    outs = []
    for check in (False, True):
        hb = torch.full((t * k, i), float("nan"), dtype=torch.bfloat16, device=DEV)
        y = torch.full((t * k, h), float("nan"), device=DEV)
        out = torch.full((t, h), float("nan"), device=DEV)
        ops.grouped_l1(kw.w13, kw.w13_scale, kw.w13_alpha, x, None, slots.offsets, slots.slot_pair, k, "bf16",
                       swiglu_limit=10.0, h_bf16=hb, check=check)
        ops.grouped_l2(kw.w2, kw.w2_scale, kw.w2_alpha, hb, None, slots.offsets, y, check=check)
        ops.combine(y, pair_slot, w, out, check=check)
        outs.append(out)
    assert torch.isfinite(outs[1]).all() and torch.equal(outs[0], outs[1])


def test_checked_l1_refuses_offsets_past_its_slots_before_writing_anything(gen):
    e, h, i, t, k = 8, 256, 128, 5, 2
    weights, x, idx, _ = uneven_case(W4A16, e, h, i, t, k, gen)
    kw, slots = tiled(weights), map_slots(idx, e, 0)
    offsets = slots.offsets.clone()
    offsets[-1] = t * k + 64  # a slot count the outputs do not reserve
    hb = torch.full((t * k, i), float("nan"), dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match=rf"offsets: .* got offsets\[{e}\] = {t * k + 64}"):
        ops.grouped_l1(kw.w13, kw.w13_scale, kw.w13_alpha, x, None, offsets, slots.slot_pair, k, "bf16",
                       swiglu_limit=10.0, h_bf16=hb, check=True)
    torch.cuda.synchronize()
    assert torch.isnan(hb).all()


@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")  # refused before it launches anything
def test_checked_ops_are_refused_while_a_graph_is_captured(gen):
    e, h, i, t, k = 8, 256, 128, 5, 2
    weights, x, idx, _ = uneven_case(W4A16, e, h, i, t, k, gen)
    kw, slots = tiled(weights), map_slots(idx, e, 0)
    hb = torch.full((t * k, i), float("nan"), dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="check: expected False while a CUDA graph is captured"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            ops.grouped_l1(kw.w13, kw.w13_scale, kw.w13_alpha, x, None, slots.offsets, slots.slot_pair, k, "bf16",
                           swiglu_limit=10.0, h_bf16=hb, check=True)
    torch.cuda.synchronize()
    assert torch.isnan(hb).all()


# ---- combine ----

@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,k,hidden,ranks", [(1, 6, 7168, 1), (37, 8, 320, 4), (5, 16, 1024, 3)])
def test_combine_equals_the_reference_combine_bitwise(t, k, hidden, ranks, out_dtype, gen):
    """Slots of other ranks' experts count nothing; a token with none gets zeros; k is summed in ascending order.
    With other ranks, the last token goes to their experts only (3 ranks: 16 of them for top-16)."""
    e_local = 8
    e_total = max(e_local * ranks, k)
    idx, w = routing("uniform", t, k, e_local, gen, 0, e_total)
    if ranks > 1:
        idx[-1] = (e_local + torch.randperm(e_total - e_local, generator=gen)[:k]).to(DEV, torch.int32)
    slots = map_slots(idx, e_local, 0)
    pair_slot = pair_slots(slots)
    y_slot = torch.randn(t * k, hidden, generator=gen).to(DEV)  # a row per pair; rows past num_slots go unread
    out = torch.full((t, hidden), float("nan"), dtype=out_dtype, device=DEV)
    ops.combine(y_slot, pair_slot, w, out)
    ref = combine(y_slot, slots, w, t)
    assert torch.equal(out, ref.to(out_dtype))
    no_local = ~(idx < e_local).any(1)
    assert bool(no_local.any()) == (ranks > 1)  # one rank owns every expert: every token has a local one
    assert torch.equal(out[no_local], torch.zeros_like(out[no_local]))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("begin,rows", [(0, 9), (3, 4), (8, 1)])
def test_combine_adds_the_addend_rows_before_the_cast(begin, rows, out_dtype, gen):
    """out = cast(routed fp32 sum + addend) on tokens [begin, begin + rows), cast(routed sum) elsewhere, bitwise."""
    t, k, e_local, hidden = 9, 6, 16, 512
    idx, w = routing("uniform", t, k, e_local, gen, 0, 2 * e_local)  # some tokens without a local expert
    slots = map_slots(idx, e_local, 0)
    pair_slot = pair_slots(slots)
    y_slot = torch.randn(t * k, hidden, generator=gen).to(DEV)
    addend = torch.randn(rows, hidden, generator=gen).to(DEV)
    out = torch.full((t, hidden), float("nan"), dtype=out_dtype, device=DEV)
    ops.combine(y_slot, pair_slot, w, out, addend, begin)
    ref = combine(y_slot, slots, w, t)
    ref[begin: begin + rows] += addend
    assert torch.equal(out, ref.to(out_dtype))


# ---- L1 / requant / L2 in isolation ----

@pytest.mark.parametrize("spec_name", ["w4a4", "w4a16"])
@pytest.mark.parametrize("e,h,i,t,block_n", [(6, 512, 256, 40, 8), (5, 192, 320, 33, 16), (3, 1024, 512, 200, 64),
                                              (2, 768, 384, 300, 128)])
def test_l1_gate_up_matches_reference(spec_name, e, h, i, t, block_n, gen):
    spec = SPECS[spec_name]
    weights = random_weights(e, h, i, gen)
    acts = random_acts(t, h, weights, spec, gen)
    idx, _ = routing("uneven", t, min(4, e), e, gen)
    slots = map_slots(idx, e, 0)
    got = l1_gate_up(acts, slots, weights, spec, block_n)
    assert rel_l2(got, l1_reference(acts, slots, weights, spec)) <= 4e-3


@pytest.mark.parametrize("h", [256, 320])
def test_l1_slot_tile_width_does_not_change_bits_within_one_mma_path(h, gen):
    """Slot tiles of 8-32 (HMMA) and of 64-128 (wgmma) each sum every output's K in one order whatever their
    width (and, for wgmma, whether the tile has 128 or 256 rows; 256-row tiles are wgmma from 32 slots on). Between
    the paths, and between 64 and 128 rows (which decide whether the two consumer warpgroups split K and add their
    halves), only the fp32 rounding of the sum differs."""
    weights = random_weights(4, h, 128, gen)
    acts = random_acts(70, h, weights, W4A4, gen)
    slots = map_slots(routing("uneven", 70, 3, 4, gen)[0], 4, 0)
    outs = {(bn, bm): l1_gate_up(acts, slots, weights, W4A4, bn, bm) for bn in ops.BLOCK_NS for bm in (64, 128)}
    outs.update({(bn, 256): l1_gate_up(acts, slots, weights, W4A4, bn, 256) for bn in (32, 64, 128)})
    for bm in (64, 128):
        for path in ((8, 16, 32), (64, 128)):
            assert all(torch.equal(outs[(path[0], bm)], outs[(bn, bm)]) for bn in path[1:])
    # 128- and 256-row wgmma tiles both give each warpgroup whole atoms over all of K: the same sums
    assert all(torch.equal(outs[(bn, 256)], outs[(64, 128)]) for bn in (32, 64, 128))
    assert all(rel_l2(o, outs[(8, 64)]) <= 1e-6 for o in outs.values())


@pytest.mark.parametrize("hidden", [512, 384])
def test_l2_slot_tile_width_does_not_change_bits_within_the_hmma_path(hidden, gen):
    """L2's 8-, 16- and 32-slot tiles sum each output in one order whatever their width, with an even and an odd
    number of 128-row tiles per expert, and several slot tiles per expert."""
    e, i, t, k = 5, 256, 120, 4  # about 3 slot tiles of 32 per expert, unevenly
    weights = random_weights(e, hidden, i, gen)
    slots = map_slots(routing("uneven", t, k, e, gen)[0], e, 0)
    n, kw = slots.num_slots, tiled(weights)
    h_in = torch.randn(n, i, generator=gen).to(DEV, torch.bfloat16)
    ys = {bn: torch.full((n, hidden), float("nan"), device=DEV) for bn in (8, 16, 32)}
    for bn, y in ys.items():
        ops.grouped_l2(kw.w2, kw.w2_scale, kw.w2_alpha, h_in, None, slots.offsets, y, bn, 128)
    assert torch.equal(ys[32], ys[8]) and torch.equal(ys[16], ys[8])
    assert rel_l2(ys[32], l2_reference(h_in, torch.ones(e, device=DEV), slots, weights, W4A16)) <= 4e-3


@pytest.mark.parametrize("block_m", [64, 128])
def test_hmma_tiles_of_64_and_128_rows_match_the_reference_over_a_long_k(block_m, gen):
    """K = 7168 is 112 chunks: 64-row HMMA tiles take six per stage (the last stage holds four), 128-row tiles
    three; the two consumer warpgroups alternate stages either way and add their sums."""
    e, h, i = 3, 7168, 512
    weights = random_weights(e, h, i, gen)
    acts = random_acts(20, h, weights, W4A4, gen)
    slots = map_slots(routing("uneven", 20, 2, e, gen)[0], e, 0)
    got = l1_gate_up(acts, slots, weights, W4A4, 8, block_m)
    assert rel_l2(got, l1_reference(acts, slots, weights, W4A4)) <= 4e-3


def split_workspace() -> dict:
    sums, arrivals = ops.split_workspace(DEV)
    return dict(split_sums=sums.fill_(float("nan")), split_arrivals=arrivals)  # poison: each piece writes its sums


def few_tile_launch(block_n: int, block_m: int, gen: torch.Generator):
    """L1 of a decode step's tokens on two of a rank's three experts: K = 7168, 2I = 1024 rows per expert, so 16 or 8
    tiles an expert, a few dozen CTAs of the hundreds resident. Returns (run, reference): run(max_pieces, split
    workspace or None) gives gate|up, poisoned before the launch."""
    e, t = 3, block_n + 3
    idx = (torch.arange(t) % 2).int().view(-1, 1).to(DEV)  # experts 0 and 1, expert 2 idle
    slots = map_slots(idx, e, 0)
    weights = random_weights(e, 7168, 512, gen)
    acts = random_acts(t, 7168, weights, W4A16, gen)

    def run(max_pieces: int, split: dict | None) -> torch.Tensor:
        return l1_gate_up(acts, slots, weights, W4A16, block_n, block_m, split, max_pieces)
    return run, l1_reference(acts, slots, weights, W4A16)


@pytest.mark.parametrize("block_n,block_m", [(8, 64), (8, 128), (16, 64), (16, 128)])
def test_an_l1_launch_of_few_tiles_splits_k_over_ctas_and_matches_the_reference(block_n, block_m, gen):
    """Tiles that would leave most CTAs idle run as pieces of their K range on several CTAs; the last piece of a
    tile adds the pieces in piece order. Against the same launch run whole (max_pieces=1, or no workspace): the
    same sums to fp32 rounding, not the same bits (which shows the pieces ran); two pieces at most, other bits
    again; repeated, the same bits, and the arrival counts back at zero."""
    run, ref = few_tile_launch(block_n, block_m, gen)
    split = split_workspace()
    pieces = run(0, split)
    assert rel_l2(pieces, ref) <= 4e-3
    whole = run(1, split)
    assert torch.equal(whole, run(0, None))
    assert rel_l2(pieces, whole) <= 1e-5 and not torch.equal(pieces, whole)
    two = run(2, split)
    assert rel_l2(two, whole) <= 1e-5 and not torch.equal(two, whole) and not torch.equal(two, pieces)
    for _ in range(3):
        split["split_sums"].fill_(float("nan"))
        assert torch.equal(run(0, split), pieces)
    assert not split["split_arrivals"].any()


@pytest.mark.parametrize("block_n,block_m", [(32, 128), (64, 64)])
def test_l1_tiles_of_32_slots_and_more_never_split_k(block_n, block_m, gen):
    run, _ = few_tile_launch(block_n, block_m, gen)
    assert torch.equal(run(0, split_workspace()), run(0, None))


@pytest.mark.parametrize("block_n", [32, 64, 128])
def test_256_row_tiles_match_the_reference_in_l1_and_l2(block_n, gen):
    """256-row tiles: each warpgroup holds two atoms' accumulators and the epilogue runs in two slot halves."""
    e, h, i, t, k = 3, 512, 256, 200, 2
    weights = random_weights(e, h, i, gen)
    acts = random_acts(t, h, weights, W4A16, gen)
    slots = map_slots(routing("uneven", t, k, e, gen)[0], e, 0)
    got = l1_gate_up(acts, slots, weights, W4A16, block_n, 256)
    assert rel_l2(got, l1_reference(acts, slots, weights, W4A16)) <= 4e-3
    n, kw = slots.num_slots, tiled(weights)
    h_in = torch.randn(n, i, generator=gen).to(DEV, torch.bfloat16)
    y = torch.full((n, h), float("nan"), device=DEV)
    ops.grouped_l2(kw.w2, kw.w2_scale, kw.w2_alpha, h_in, None, slots.offsets, y, block_n, 256)
    assert rel_l2(y, l2_reference(h_in, torch.ones(e, device=DEV), slots, weights, W4A16)) <= 4e-3


@pytest.mark.parametrize("block_n", [32, 128])
@pytest.mark.parametrize("extra", ["a few", "all but one"])
def test_256_row_tiles_give_the_bits_of_128_row_tiles_whether_or_not_the_last_round_runs_as_halves(extra, block_n,
                                                                                                      gen):
    """One 256-row tile per expert on a grid of one or two CTAs per SM: 2 x SMs + 5 tiles leave a last round at most
    half full, which runs as 128-row halves (one atom per warpgroup, over all of K in order); 4 x SMs - 1 leave one
    too full for halves, which runs as whole tiles. Either way each output is the sum of its 128-row wgmma tile (64
    slots: 32-slot tiles of 128 rows are HMMA ones, which sum in another order), in L1 and in L2, and matches the
    reference."""
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    e = 2 * sms + 5 if extra == "a few" else 4 * sms - 1
    h, i = 1024, 128  # L1: 2i = 256 rows, K 1024 (16 chunks, more stages than the ring); L2: 1024 rows
    counts = torch.randint(1, block_n + 1, (e,), generator=gen)  # one slot tile per expert
    idx = torch.repeat_interleave(torch.arange(e), counts).int().view(-1, 1).to(DEV)
    slots = map_slots(idx, e, 0)
    weights = random_weights(e, h, i, gen)
    acts = random_acts(idx.shape[0], h, weights, W4A16, gen)
    tiles = {"256 rows": (block_n, 256), "128 rows": (64, 128)}  # (block_n, block_m)
    gu = {name: l1_gate_up(acts, slots, weights, W4A16, *tile) for name, tile in tiles.items()}
    assert torch.equal(gu["256 rows"], gu["128 rows"])
    assert rel_l2(gu["256 rows"], l1_reference(acts, slots, weights, W4A16)) <= 4e-3
    n, kw = slots.num_slots, tiled(weights)
    w2, w2_scale = kw.w2[:, :256].contiguous(), kw.w2_scale[:, :256].contiguous()  # 256 rows: one tile per expert
    h_in = torch.randn(n, i, generator=gen).to(DEV, torch.bfloat16)
    ys = {name: torch.full((n, 256), float("nan"), device=DEV) for name in tiles}
    for name, y in ys.items():
        ops.grouped_l2(w2, w2_scale, kw.w2_alpha, h_in, None, slots.offsets, y, *tiles[name])
    assert torch.equal(ys["256 rows"], ys["128 rows"])
    ref = l2_reference(h_in, torch.ones(e, device=DEV), slots, weights, W4A16)[:, :256]
    assert rel_l2(ys["256 rows"], ref) <= 4e-3


@pytest.mark.parametrize("limit", [10.0, None])
@pytest.mark.parametrize("block_n,block_m", [(8, 64), (32, 128), (32, 256), (128, 256)])
def test_l1_activation_is_the_clamped_swiglu_of_its_own_gate_up_to_a_few_ulp(block_n, block_m, limit, gen):
    """The epilogue's SwiGLU against the reference's on the kernel's own gate|up, value by value, within 2^-20
    relative (a few ulp: exp's last step may fuse with the 1 +, the division rounds as IEEE's). Alphas 40x the
    usual spread gate and up over the clamp and far into silu's negative tail, where exp(-g) overflows."""
    e, h, i, t, k = 3, 512, 256, 150, 2
    weights = random_weights(e, h, i, gen)
    weights.w13_alpha.mul_(40.0)
    acts = random_acts(t, h, weights, W4A16, gen)
    slots = map_slots(routing("uneven", t, k, e, gen)[0], e, 0)
    gu = l1_gate_up(acts, slots, weights, W4A16, block_n, block_m)
    gate = gu[:, :i]
    assert (gate > 10.0).any() and (gate < -90.0).any() and (gu[:, i:].abs() > 10.0).any()
    kw = tiled(weights)
    h_f32 = torch.full((t * k, i), float("nan"), device=DEV)
    ops.grouped_l1(kw.w13, kw.w13_scale, kw.w13_alpha, acts, None, slots.offsets, slots.slot_pair, k, "fp32",
                   swiglu_limit=limit, out_f32=h_f32, block_n=block_n, block_m=block_m)
    ref = swiglu(gu, limit)
    assert torch.isfinite(h_f32[: slots.num_slots]).all()
    # products below the smallest normal float round to a fixed grid, so they are held to it absolutely
    assert ((h_f32[: slots.num_slots] - ref).abs() <= 2.0 ** -20 * ref.abs() + 2.0 ** -126).all()


@pytest.mark.parametrize("limit", [10.0, None])
@pytest.mark.parametrize("nan_in", ["gate and up", "gate", "up"])
def test_l1_activation_of_a_nan_gate_or_up_is_nan_as_in_the_reference(nan_in, limit, gen):
    """A NaN that reaches L1 unchecked (check=False) stays NaN through the clamp, as torch's clamp keeps it (fminf /
    fmaxf had turned it into the limits, and silu(10) * -10 into a plausible h): an activation makes its token's gate
    and up NaN, a NaN alpha (unchecked with check=False) expert 0's gate or its up alone."""
    e, h, i, t, k = 2, 256, 128, 6, 1
    weights = random_weights(e, h, i, gen)
    acts = random_acts(t, h, weights, W4A16, gen)
    slots = map_slots(routing("uniform", t, k, e, gen)[0], e, 0)
    kw = tiled(weights)
    if nan_in == "gate and up":
        acts[1, 3] = float("nan")
    else:
        kw.w13_alpha[0, 0 if nan_in == "gate" else 1] = float("nan")
    gu, h_f32 = (torch.full((t * k, n), 7.0, device=DEV) for n in (2 * i, i))
    for epilogue, out in (("gate_up", gu), ("fp32", h_f32)):
        ops.grouped_l1(kw.w13, kw.w13_scale, kw.w13_alpha, acts, None, slots.offsets, slots.slot_pair, k, epilogue,
                       swiglu_limit=limit, out_f32=out)
    ref = swiglu(gu[: slots.num_slots], limit)
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    assert torch.equal(torch.isnan(h_f32[: slots.num_slots]), torch.isnan(ref))


@pytest.mark.parametrize("block_n", [8, 64])
def test_every_ue4m3_scale_dequantizes_exactly_in_the_kernel(block_n, gen):
    """Weight row r of expert x takes block scale byte 1 + (256 x + r) % 126 all along K: every positive finite
    UE4M3 value (subnormals and 448 included) passes through the kernel's scale decoding, in HMMA (8 slots) and
    wgmma (64) tiles. Each output column is checked on its own scale, so a tiny scale decoded wrongly shows."""
    e, h, i, t, k = 2, 256, 256, 48, 2
    weights = random_weights(e, h, i, gen)
    rows = torch.arange(e * h, device=DEV).reshape(e, h, 1)
    weights.w2_scale.view(torch.uint8).copy_((1 + rows % 126).to(torch.uint8).expand(e, h, i // 16))
    slots = map_slots(routing("uneven", t, k, e, gen)[0], e, 0)
    n, kw = slots.num_slots, tiled(weights)
    h_in = torch.randn(n, i, generator=gen).to(DEV, torch.bfloat16)
    y = torch.full((n, h), float("nan"), device=DEV)
    ops.grouped_l2(kw.w2, kw.w2_scale, kw.w2_alpha, h_in, None, slots.offsets, y, block_n, 0)
    ref = l2_reference(h_in, torch.ones(e, device=DEV), slots, weights, W4A16)
    for x in range(e):
        lo, hi = slots.offsets[x].item(), slots.offsets[x + 1].item()
        err = (y[lo:hi] - ref[lo:hi]).norm(dim=0) / ref[lo:hi].norm(dim=0)
        assert err.max().item() <= 4e-3, f"expert {x}: worst column {err.argmax().item()} off by {err.max().item():.2e}"


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_h_requant_equals_quantize_h_bitwise(mode, gen):
    """Given the kernel's own fp32 h, its NVFP4 bytes, scales and bf16 decode (and, with dynamic scaling, the
    per-expert global scales) are the reference's exactly."""
    e, h, i, t, k = 5, 256, 192, 50, 3
    spec = ExpertSpec("nvfp4", mode, 10.0)
    weights = random_weights(e, h, i, gen)
    acts = random_acts(t, h, weights, spec, gen)
    idx, _ = routing("uneven", t, k, e, gen)
    slots = map_slots(idx, e, 0)
    x = torch.empty(t, h, dtype=torch.bfloat16, device=DEV)
    ops.nvfp4_dequant_rows(acts.data, acts.scale, x)
    x_gs = acts.global_scale.reshape(1)
    s = t * k
    h_f32 = torch.full((s, i), float("nan"), device=DEV)
    kw = tiled(weights)
    ops.grouped_l1(kw.w13, kw.w13_scale, kw.w13_alpha, x, x_gs, slots.offsets, slots.slot_pair, k,
                   "fp32", swiglu_limit=10.0, out_f32=h_f32)
    hq_data = torch.full((s, i // 2), 0xA5, dtype=torch.uint8, device=DEV)
    hq_scale = torch.full((s, i // 16), 0x7F, dtype=torch.uint8, device=DEV).view(torch.float8_e4m3fn)
    h_bf16 = torch.full((s, i), float("nan"), dtype=torch.bfloat16, device=DEV)
    h_gs = torch.full((e,), float("nan"), device=DEV)
    if mode == "static":
        h_gs.copy_(1.0 / weights.l2_input_scale)
        ops.grouped_l1(kw.w13, kw.w13_scale, kw.w13_alpha, x, x_gs, slots.offsets, slots.slot_pair, k,
                       "nvfp4", swiglu_limit=10.0, h_gs=h_gs, hq_data=hq_data, hq_scale=hq_scale, h_bf16=h_bf16)
    else:
        amax = torch.empty(e, dtype=torch.int32, device=DEV)
        ops.requant_dynamic(h_f32, slots.offsets, amax, hq_data, hq_scale, h_bf16, h_gs)
    n = slots.num_slots
    # against the oracle of record, on the CPU
    ref, ref_gs = quantize_h(h_f32[:n].cpu(), slots_to_cpu(slots), weights.to("cpu"), spec)
    ref, ref_gs = NVFP4Tensor(ref.data.to(DEV), ref.scale.to(DEV), ref.global_scale.to(DEV)), ref_gs.to(DEV)
    assert torch.equal(hq_data[:n], ref.data)
    assert torch.equal(hq_scale[:n].view(torch.uint8), ref.scale.view(torch.uint8))
    if mode == "dynamic":  # static: h_gs is 1/l2_input_scale written above, which grouped_l1 only reads
        used = slots.counts > 0
        assert torch.equal(h_gs[used], ref_gs[used])
    assert torch.equal(h_bf16[:n].float(), nvfp4.block_dequantize(ref.data, ref.scale))


def test_h_requant_rounds_values_on_e2m1_boundaries_to_the_even_code_as_the_reference_does(gen):
    """h built from blocks on every E2M1 boundary, one block per expert at 6 * 448 (so each expert's dynamic global
    scale is exactly 1 and every block scale a power of two): the bytes, scales and bf16 decode are the reference's."""
    e, i, t, k = 4, 256, 40, 2
    spec = ExpertSpec("nvfp4", "dynamic", 10.0)
    idx, _ = routing("uneven", t, k, e, gen)
    slots = map_slots(idx, e, 0)
    s, n = t * k, slots.num_slots
    h_f32 = torch.full((s, i), float("nan"), device=DEV)
    h_f32[:n] = tie_blocks(n, i, gen, k_range=(-9, 8)).to(DEV)
    for x in range(e):  # the expert's first slot starts with its amax block
        first = int(slots.offsets[x])
        if int(slots.counts[x]) > 0:
            h_f32[first, :16] = tie_blocks(1, 16, gen, k_range=(8, 8)).to(DEV) * (448 / 256)
    hq_data = torch.full((s, i // 2), 0xA5, dtype=torch.uint8, device=DEV)
    hq_scale = torch.full((s, i // 16), 0x7F, dtype=torch.uint8, device=DEV).view(torch.float8_e4m3fn)
    h_bf16 = torch.full((s, i), float("nan"), dtype=torch.bfloat16, device=DEV)
    h_gs = torch.full((e,), float("nan"), device=DEV)
    amax = torch.empty(e, dtype=torch.int32, device=DEV)
    ops.requant_dynamic(h_f32, slots.offsets, amax, hq_data, hq_scale, h_bf16, h_gs)
    weights = random_weights(e, 256, i, gen).to("cpu")  # quantize_h reads only the expert count under dynamic scales
    ref, ref_gs = quantize_h(h_f32[:n].cpu(), slots_to_cpu(slots), weights, spec)
    used = slots.counts > 0
    assert bool((ref_gs[used.cpu()] == 1).all()), "the test's h did not give unit global scales"
    assert torch.equal(hq_data[:n].cpu(), ref.data)
    assert torch.equal(hq_scale[:n].view(torch.uint8).cpu(), ref.scale.view(torch.uint8))
    assert torch.equal(h_gs[used].cpu(), ref_gs[used.cpu()])
    assert torch.equal(h_bf16[:n].float().cpu(), nvfp4.block_dequantize(ref.data, ref.scale))
    codes = nvfp4.unpack_nibbles(hq_data[:n].cpu()).reshape(n, i)
    assert bool(((codes[on_boundary(h_f32[:n].cpu())] & 7) % 2 == 0).all()), "a boundary value took an odd code"


def one_column_weights(h: int, gate: float, up: torch.Tensor) -> ExpertWeights:
    """Weights (on DEV) whose only nonzero codes sit in K column 0: every gate row holds `gate` (E2M1 4.0 times its
    block scale) and up row j of expert x holds up[x, j] (E2M1 +-0.5 times a block scale of 2|up|, exact in UE4M3
    for the values the tie tests use); alphas and input scales 1, every other block scale 1."""
    e, i = up.shape
    w13 = torch.zeros(e, 2 * i, h // 2, dtype=torch.uint8)
    w13_scale = torch.ones(e, 2 * i, h // 16)
    w13[:, :i, 0] = 6
    w13_scale[:, :i, 0] = gate / 4
    w13[:, i:, 0] = torch.where(up == 0, 0, torch.where(up < 0, 9, 1)).to(torch.uint8)
    w13_scale[:, i:, 0] = torch.where(up == 0, 1.0, 2 * up.abs())
    w = ExpertWeights.empty(e, h, i, DEV)
    w.w13.copy_(w13)
    w.w13_scale.copy_(w13_scale.to(torch.float8_e4m3fn))
    w.w2.zero_()
    w.w2_scale.copy_(torch.ones(w.w2_scale.shape).to(torch.float8_e4m3fn))
    for name in ("w13_alpha", "w2_alpha", "l1_input_scale", "l2_input_scale"):
        getattr(w, name).fill_(1.0)
    return w


@pytest.mark.parametrize("block_n,block_m", [(8, 64), (32, 128), (32, 256), (128, 256)])
def test_l1_epilogue_rounds_h_on_e2m1_boundaries_to_the_even_code_as_the_reference_does(block_n, block_m, gen):
    """Every token is x = e_0, so an expert's gate|up is its weights' K column 0: gate 32 (where silu is the identity
    in fp32) and up that expert's row of tie blocks over 32. Its h, the kernel's own fp32 output, is then the tie
    blocks exactly, and the fused static requantization (global scale 1) must give the reference's bytes, scales and
    bf16 decode, no boundary value with an odd code, in HMMA and wgmma tiles alike."""
    e, h, i, t, k = 3, 256, 256, 60, 2
    target = tie_blocks(e, i, gen, k_range=(-3, 6))
    weights = one_column_weights(h, 32.0, target / 32)
    x = torch.zeros(t, h, dtype=torch.bfloat16, device=DEV)
    x[:, 0] = 1.0
    slots = map_slots(routing("uneven", t, k, e, gen)[0], e, 0)
    n, kw = slots.num_slots, tiled(weights)
    expected = target.to(DEV)[torch.repeat_interleave(torch.arange(e, device=DEV), slots.counts.long())]
    h_f32 = torch.full((t * k, i), float("nan"), device=DEV)
    ops.grouped_l1(kw.w13, kw.w13_scale, kw.w13_alpha, x, None, slots.offsets, slots.slot_pair, k, "fp32",
                   swiglu_limit=None, out_f32=h_f32, block_n=block_n, block_m=block_m)
    assert torch.equal(h_f32[:n], expected), "the test's premise: the kernel's h is the tie blocks"
    hq_data = torch.full((t * k, i // 2), 0xA5, dtype=torch.uint8, device=DEV)
    hq_scale = torch.full((t * k, i // 16), 0x7F, dtype=torch.uint8, device=DEV).view(torch.float8_e4m3fn)
    h_bf16 = torch.full((t * k, i), float("nan"), dtype=torch.bfloat16, device=DEV)
    ops.grouped_l1(kw.w13, kw.w13_scale, kw.w13_alpha, x, None, slots.offsets, slots.slot_pair, k, "nvfp4",
                   swiglu_limit=None, h_gs=torch.ones(e, device=DEV), hq_data=hq_data, hq_scale=hq_scale,
                   h_bf16=h_bf16, block_n=block_n, block_m=block_m)
    ref, _ = quantize_h(h_f32[:n].cpu(), slots_to_cpu(slots), weights.to("cpu"), ExpertSpec("nvfp4", "static", None))
    assert torch.equal(hq_data[:n].cpu(), ref.data)
    assert torch.equal(hq_scale[:n].view(torch.uint8).cpu(), ref.scale.view(torch.uint8))
    assert torch.equal(h_bf16[:n].float().cpu(), nvfp4.block_dequantize(ref.data, ref.scale))
    codes = nvfp4.unpack_nibbles(hq_data[:n].cpu()).reshape(n, i)
    assert bool(((codes[on_boundary(expected.cpu())] & 7) % 2 == 0).all()), "a boundary value took an odd code"


@pytest.mark.parametrize("spec_name", ["w4a4", "w4a4_dynamic", "w4a16"])
def test_l2_matches_reference_on_the_kernels_own_h(spec_name, gen):
    spec = SPECS[spec_name]
    e, h, i, t, k = 6, 384, 256, 64, 4
    weights, acts, idx, w = uneven_case(spec, e, h, i, t, k, gen)
    _, ws = run_stage(acts, idx, w, weights, spec)
    slots = slots_from_workspace(ws, t)
    n = slots.num_slots
    if spec.act_mode == "nvfp4":  # the static h scale is the stage's own, not the workspace's
        h_gs = ws.h_gs if spec.l2_scale_mode == "dynamic" else 1.0 / weights.l2_input_scale
        hq = NVFP4Tensor(ws.hq_data[:n], ws.hq_scale[:n], h_gs)
        ref = l2_reference(hq, h_gs, slots, weights, spec)
    else:
        ref = l2_reference(ws.h_bf16[:n], torch.ones(e, device=DEV), slots, weights, spec)
    assert rel_l2(ws.y_slot[:n], ref) <= 4e-3


# ---- the whole stage ----

def reference_stage(acts, idx, w, weights, expert_begin, spec):
    slots = map_slots(idx, weights.num_experts, expert_begin)
    h = swiglu(l1_reference(acts, slots, weights, spec), spec.swiglu_limit)
    hq, h_gs = quantize_h(h, slots, weights, spec)
    return combine(l2_reference(hq, h_gs, slots, weights, spec), slots, w, idx.shape[0])


@pytest.mark.parametrize("spec_name", ["w4a4", "w4a4_dynamic", "w4a16"])
@pytest.mark.parametrize("kind,t", [("uniform", 1), ("uniform", 96), ("uneven", 300), ("half_idle", 50),
                                    ("one_expert", 40)])
def test_expert_stage_matches_oracle(spec_name, kind, t, gen):
    spec = SPECS[spec_name]
    e, h, i, k = 8, 512, 256, 4
    weights = random_weights(e, h, i, gen)
    acts = random_acts(t, h, weights, spec, gen)
    # one_expert: the other choices go to another rank's experts, so one local expert holds every slot
    idx, w = routing(kind, t, k, e, gen, e_total=2 * e if kind == "one_expert" else e)
    out, _ = run_stage(acts, idx, w, weights, spec)
    assert matches_stage_reference(out, reference_stage(acts, idx, w, weights, 0, spec))


@pytest.mark.parametrize("spec_name", ["w4a4", "w4a4_dynamic", "w4a16"])
def test_an_unchecked_nan_token_comes_out_nan_as_in_the_reference(spec_name, gen):
    """Its row is NaN, the other rows finite and the reference's (in dynamic mode the experts it reached take the
    scale 1, as the reference's NaN amax gives them)."""
    spec = SPECS[spec_name]
    e, h, i, t, k = 4, 256, 128, 16, 2
    weights = random_weights(e, h, i, gen)
    x = torch.randn(t, h, generator=gen).to(DEV, torch.bfloat16)
    x[5, 17] = float("nan")
    acts = x if spec.act_mode == "bf16" else nvfp4.quantize(x, 1.0 / weights.l1_input_scale, check=False)
    idx, w = routing("uniform", t, k, e, gen)
    out, _ = run_stage(acts, idx, w, weights, spec)
    ref = reference_stage(acts, idx, w, weights, 0, spec)
    assert torch.isnan(out[5]).all() and torch.equal(torch.isnan(out), torch.isnan(ref))
    others = torch.arange(t, device=DEV) != 5
    assert matches_stage_reference(out[others], ref[others])


def test_expert_stage_on_one_rank_of_four_zeroes_tokens_without_local_experts(gen):
    e_local, ranks, rank, t, k = 4, 4, 2, 64, 2
    weights = random_weights(e_local, 256, 128, gen)
    acts = random_acts(t, 256, weights, W4A4, gen)
    idx, w = routing("uniform", t, k, e_local, gen, rank * e_local, e_local * ranks)
    out, _ = run_stage(acts, idx, w, weights, W4A4, expert_begin=rank * e_local)
    local = ((idx >= rank * e_local) & (idx < (rank + 1) * e_local)).any(1)
    assert (~local).any() and local.any()
    assert torch.equal(out[~local], torch.zeros_like(out[~local]))
    ref = reference_stage(acts, idx, w, weights, rank * e_local, W4A4)
    assert matches_stage_reference(out[local], ref[local])


@pytest.mark.parametrize("e,h,i", [(3, 192, 64), (4, 320, 192), (2, 64, 64)])
def test_expert_stage_on_small_odd_shapes(e, h, i, gen):
    t, k = 21, 2
    weights = random_weights(e, h, i, gen)
    acts = random_acts(t, h, weights, W4A4, gen)
    idx, w = routing("uneven", t, k, e, gen)
    out, _ = run_stage(acts, idx, w, weights, W4A4)
    assert matches_stage_reference(out, reference_stage(acts, idx, w, weights, 0, W4A4))


@pytest.mark.parametrize("t", [4, 160])
def test_expert_stage_at_v4_pro_shape(t, gen):
    """H=7168, I=3072, top-6, with 4 local experts (the full 48 take minutes in the fp32 oracle)."""
    e, h, i, k = 4, 7168, 3072, 6
    weights = random_weights(e, h, i, gen)
    acts = random_acts(t, h, weights, W4A4, gen)
    idx, w = routing("uneven", t, k, 2 * e, gen)  # half of each token's choices belong to other ranks
    out, ws = run_stage(acts, idx, w, weights, W4A4)
    slots = slots_from_workspace(ws, t)
    assert rel_l2(l1_gate_up(acts, slots, weights, W4A4), l1_reference(acts, slots, weights, W4A4)) <= 4e-3
    assert matches_stage_reference(out, reference_stage(acts, idx, w, weights, 0, W4A4))


@pytest.mark.parametrize("spec_name", ["w4a4", "w4a4_dynamic", "w4a16"])
@pytest.mark.parametrize("t", [1, 70])
def test_dense_run_of_one_expert_gives_the_bits_of_routing_every_token_to_it(spec_name, t, gen):
    """The shared expert's path: run_dense (no align, no combine) against the stage routing every token to its one
    expert with weight 1, which adds each output to +0 once."""
    spec = SPECS[spec_name]
    weights = random_weights(1, 512, 256, gen)
    acts = random_acts(t, 512, weights, spec, gen)
    stage = CudaExpertStage(tiled(weights), 0, spec, ExpertWorkspace.allocate(128, 1, 1, 512, 256, DEV, spec))
    poison(stage.workspace)
    dense = stage.run_dense(acts).clone()
    poison(stage.workspace)
    routed = stage(acts, torch.zeros(t, 1, dtype=torch.int32, device=DEV), torch.ones(t, 1, device=DEV))
    assert torch.equal(dense + 0.0, routed)
    ref = reference_stage(acts, torch.zeros(t, 1, dtype=torch.int32, device=DEV), torch.ones(t, 1, device=DEV),
                          weights, 0, spec)
    assert matches_stage_reference(dense, ref)


def test_dense_run_needs_one_expert_at_top_1(gen):
    weights = random_weights(2, 256, 128, gen)
    stage = CudaExpertStage(tiled(weights), 0, W4A4, ExpertWorkspace.allocate(8, 1, 2, 256, 128, DEV, W4A4))
    with pytest.raises(ValueError, match="run_dense: needs one expert at top-1, got 2 experts and a workspace of top-1"):
        stage.run_dense(random_acts(4, 256, weights, W4A4, gen))


def test_expert_stage_is_bitwise_repeatable(gen):
    weights = random_weights(8, 512, 256, gen)
    acts = random_acts(200, 512, weights, W4A4, gen)
    idx, w = routing("uneven", 200, 4, 8, gen)
    first, _ = run_stage(acts, idx, w, weights, W4A4)
    for _ in range(3):
        again, _ = run_stage(acts, idx, w, weights, W4A4)
        assert torch.equal(first, again)


@pytest.fixture(scope="module")
def v4_pro_rank_weights():
    """One V4-Pro rank's 48 experts (1.8 GB packed), in the kernels' layout."""
    return tile_(random_weights(48, 7168, 3072, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("block_n,block_m", [(8, 128), (8, 64), (32, 128), (32, 256), (64, 64), (128, 128),
                                              (128, 256)])
def test_the_stage_ring_gives_the_same_bits_over_many_back_to_back_launches(v4_pro_rank_weights, block_n, block_m,
                                                                            gen):
    """A full rank at decode: every CTA cycles its stage ring hundreds of times, with the two consumer
    warpgroups free to drift apart. A pipeline race shows up as a launch failure, as a barrier wait that traps
    after 20 s, or as bits that differ between launches."""
    kw = v4_pro_rank_weights
    t, k = 8, 6
    idx, _ = routing("uniform", t, k, 48, gen)
    slots = map_slots(idx, 48, 0)
    n = slots.num_slots
    x = torch.randn(t, 7168, generator=gen).to(DEV, torch.bfloat16)
    h = [torch.full((t * k, 3072), float("nan"), dtype=torch.bfloat16, device=DEV) for _ in range(2)]
    y = [torch.full((t * k, 7168), float("nan"), device=DEV) for _ in range(2)]

    def run(out: int) -> None:
        ops.grouped_l1(kw.w13, kw.w13_scale, kw.w13_alpha, x, None, slots.offsets, slots.slot_pair, k, "bf16",
                       swiglu_limit=10.0, h_bf16=h[out], block_n=block_n, block_m=block_m)
        ops.grouped_l2(kw.w2, kw.w2_scale, kw.w2_alpha, h[out], None, slots.offsets, y[out], block_n, block_m)

    run(0)
    for _ in range(40):
        run(1)
    torch.cuda.synchronize()
    assert torch.isfinite(y[0][:n]).all()
    assert torch.equal(h[0][:n], h[1][:n]) and torch.equal(y[0][:n], y[1][:n])


@pytest.mark.parametrize("spec_name", ["w4a4", "w4a4_dynamic", "w4a16"])
def test_cuda_graph_replay_gives_the_eager_bits(spec_name, gen):
    spec = SPECS[spec_name]
    e, h, i, t, k = 8, 512, 256, 48, 4
    weights, acts, idx, w = uneven_case(spec, e, h, i, t, k, gen)
    ws = ExpertWorkspace.allocate(t, k, e, h, i, DEV, spec)
    eager, _ = run_stage(acts, idx, w, weights, spec, ws=ws)
    out = torch.empty(t, h, device=DEV)
    kw = tiled(weights)
    graph = cuda_graphs.capture(lambda: cuda_expert_stage(acts, idx, w, kw, 0, spec, out=out, workspace=ws))
    poison(ws)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    # new routing written into the same input buffer: the replay follows it (no host-side sizes baked in)
    idx2, w2 = routing("one_expert", t, k, e, gen)
    idx.copy_(idx2)
    w.copy_(w2)
    graph.replay()
    torch.cuda.synchronize()
    assert matches_stage_reference(out, reference_stage(acts, idx, w, weights, 0, spec))


def test_programmatic_launch_switch_returns_the_previous_setting_and_the_context_restores_it():
    with ops.programmatic_launch(False):
        assert ops.set_programmatic_launch(True) is False
        assert ops.set_programmatic_launch(True) is True
        with ops.programmatic_launch(False):
            assert ops.set_programmatic_launch(False) is False
        assert ops.set_programmatic_launch(True) is True


@pytest.mark.parametrize("sizes", ["64 tokens", "1-3 tokens, K split"])
@pytest.mark.parametrize("how", ["eager", "graph"])
@pytest.mark.parametrize("spec_name", ["w4a4", "w4a4_dynamic", "w4a16"])
def test_back_to_back_stages_under_programmatic_launch_give_each_batch_the_bits_of_plain_launches(spec_name, how,
                                                                                                  sizes, gen):
    """With programmatic dependent launch each kernel may start while the one before it ends. Stages on batches
    of different routing run back to back over one workspace: a kernel that touched the workspace before
    the previous kernel had ended would mix two batches' slots. Each output must be the bits of that batch's stage
    run alone with plain launches, and match the oracle. Batches of 1-3 tokens on a few experts with K = 7168 run
    L1's tiles as K pieces, each batch with the piece count its tile count gives: the pieces' sums and arrival
    counts must carry nothing over either."""
    spec = SPECS[spec_name]
    if sizes == "64 tokens":
        e, h, i, k, t = 16, 1024, 512, 6, 64
        weights = random_weights(e, h, i, gen)
        batches = [(random_acts(t, h, weights, spec, gen), *routing(kind, t, k, e, gen))
                   for kind in ("uniform", "one_expert", "uneven", "half_idle")]
    else:
        e, h, i, k, t = 4, 7168, 512, 2, 3
        weights = random_weights(e, h, i, gen)
        batches = [(random_acts(n, h, weights, spec, gen), *routing("uneven", n, k, e, gen)) for n in (1, 3, 2)]
    kw = tiled(weights)
    ws = ExpertWorkspace.allocate(t, k, e, h, i, DEV, spec)
    with ops.programmatic_launch(False):
        expected = [cuda_expert_stage(a, idx, w, kw, 0, spec, workspace=ws) for a, idx, w in batches]
    for out, (a, idx, w) in zip(expected, batches):
        assert matches_stage_reference(out, reference_stage(a, idx, w, weights, 0, spec))
    outs = [torch.empty_like(out) for out in expected]

    def run() -> None:
        for (a, idx, w), out in zip(batches, outs):
            cuda_expert_stage(a, idx, w, kw, 0, spec, out=out, workspace=ws)

    replay = cuda_graphs.capture(run).replay if how == "graph" else run
    for _ in range(3):
        poison(ws)
        for out in outs:
            out.fill_(float("nan"))
        replay()
        torch.cuda.synchronize()
        for out, ref in zip(outs, expected):
            assert torch.equal(out, ref)
    assert not ws.split_arrivals.any()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("spec_name", ["w4a4", "w4a4_dynamic", "w4a16"])
def test_stage_on_a_gpu_other_than_the_current_one_gives_the_bits_it_gives_on_the_current_one(spec_name, gen):
    """Every kernel launches on its tensors' device, on that device's stream, with grids sized for that device,
    whichever device is current."""
    spec = SPECS[spec_name]
    e, h, i, t, k = 8, 512, 256, 48, 4
    weights, acts, idx, w = uneven_case(spec, e, h, i, t, k, gen)
    second = torch.device("cuda", 1)
    with torch.cuda.device(0):
        expected, _ = run_stage(acts, idx, w, weights, spec)
        if spec.act_mode == "nvfp4":
            acts = NVFP4Tensor(acts.data.to(second), acts.scale.to(second), acts.global_scale.to(second))
        else:
            acts = acts.to(second)
        out = torch.full((t, h), float("nan"), device=second)
        # no workspace: the stage allocates its own on its tensors' device
        cuda_expert_stage(acts, idx.to(second), w.to(second), tiled(weights).to(second), 0, spec, out=out)
        assert torch.cuda.current_device() == 0
        assert torch.equal(out.cpu(), expected.cpu())


def test_bf16_output_is_the_rounded_fp32_output(gen):
    weights = random_weights(4, 256, 128, gen)
    acts = random_acts(30, 256, weights, W4A4, gen)
    idx, w = routing("uneven", 30, 2, 4, gen)
    ref, ws = run_stage(acts, idx, w, weights, W4A4)
    out = torch.full((30, 256), float("nan"), dtype=torch.bfloat16, device=DEV)
    cuda_expert_stage(acts, idx, w, tiled(weights), 0, W4A4, out=out, workspace=ws)
    assert torch.equal(out, ref.to(torch.bfloat16))


def test_top_0_routing_is_refused_before_any_kernel(gen):
    # It passed every check but the combine's, in C++, after align, dequantization, L1 and L2 had run.
    weights = random_weights(4, 256, 128, gen)
    acts = random_acts(6, 256, weights, W4A4, gen)
    idx, w = routing("uneven", 6, 2, 4, gen)
    out = torch.full((6, 256), float("nan"), device=DEV)
    with pytest.raises(ValueError, match=r"topk_idx: expected at least one expert per token, got shape \(6, 0\)"):
        cuda_expert_stage(acts, idx[:, :0].contiguous(), w[:, :0].contiguous(), tiled(weights), 0, W4A4, out=out)
    torch.cuda.synchronize()
    assert out.isnan().all()
