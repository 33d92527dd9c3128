"""ep_runtime.ops validates every tensor before its address reaches a kernel: wrong dtype -> TypeError, wrong
shape / layout / alignment / device -> ValueError, each naming the argument, what was expected and what came.

All of this runs on the CPU: validation happens before any CUDA call, and for the device check a CPU tensor
is the bad input. Where a test needs validation to pass, fake CUDA tensors (FakeTensorMode) stand in, or CPU
tensors with the device check and the kernel launches stubbed out.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ep_runtime import nvfp4, ops, staging
from ep_runtime.cuda_experts import CudaExpertStage, ExpertWorkspace, cuda_expert_stage
from ep_runtime.experts import ExpertSpec
from ep_runtime.weights import ExpertWeights

E, H, I, T, K = 4, 128, 64, 5, 2


def good_l1_args(device: str = "cpu") -> dict:
    """Arguments that pass every check but the device one when they live on the CPU."""
    return dict(
        w13=torch.zeros(E, 2 * I, H // 2, dtype=torch.uint8, device=device),
        w13_scale=torch.zeros(E, 2 * I, H // 16, dtype=torch.float8_e4m3fn, device=device),
        w13_alpha=torch.ones(E, 2, device=device),
        act=torch.zeros(T, H, dtype=torch.bfloat16, device=device),
        x_gs=torch.ones(1, device=device),
        offsets=torch.zeros(E + 1, dtype=torch.int32, device=device),
        slot_pair=torch.zeros(T * K, dtype=torch.int32, device=device),
        topk=K,
        epilogue="gate_up",
        out_f32=torch.zeros(T * K, 2 * I, device=device),
    )


def call_with_one_bad_argument(op, args: dict, name: str, bad, error: type, message: str) -> None:
    """op(**args) with args[name] replaced by bad must raise error matching message."""
    with pytest.raises(error, match=message):
        op(**{**args, name: bad})


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """Same shape and dtype, contiguous, but its data starts one element past a 16-byte boundary."""
    flat = torch.zeros(t.numel() + 16, dtype=t.dtype)
    return flat[1:1 + t.numel()].view(t.shape)


def test_l1_rejects_wrong_weight_dtype():
    args = good_l1_args()
    args["w13"] = args["w13"].to(torch.int8)
    with pytest.raises(TypeError, match=r"w13: expected dtype torch.uint8, got torch.int8"):
        ops.grouped_l1(**args)


def test_l1_rejects_scale_shape_that_does_not_match_the_weights():
    args = good_l1_args()
    args["w13_scale"] = torch.zeros(E, 2 * I, H // 32, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=rf"w13_scale: expected shape \({E}, {2 * I}, {H // 16}\), got"):
        ops.grouped_l1(**args)


def test_l1_rejects_non_contiguous_activations():
    args = good_l1_args()
    args["act"] = torch.zeros(H, T, dtype=torch.bfloat16).t()
    with pytest.raises(ValueError, match="act: expected a contiguous tensor"):
        ops.grouped_l1(**args)


def test_l1_refuses_activations_that_require_grad_outside_no_grad():
    args = good_l1_args()
    args["act"] = torch.zeros(T, H, requires_grad=True).bfloat16()
    with pytest.raises(ValueError, match="act: expected a tensor that does not require grad"):
        ops.grouped_l1(**args)
    with torch.no_grad(), pytest.raises(ValueError, match="w13: expected a CUDA tensor"):  # past every other check
        ops.grouped_l1(**args)


def test_l1_rejects_misaligned_output():
    args = good_l1_args()
    args["out_f32"] = misaligned(args["out_f32"])
    with pytest.raises(ValueError, match="out_f32: expected a 16-byte aligned data pointer"):
        ops.grouped_l1(**args)


def test_l1_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="w13: expected a CUDA tensor, got device cpu"):
        ops.grouped_l1(**good_l1_args())


def test_l1_rejects_hidden_size_not_a_multiple_of_64():
    args = good_l1_args()
    args["w13"] = torch.zeros(E, 2 * I, 48, dtype=torch.uint8)
    with pytest.raises(ValueError, match="hidden.*multiple of 64, got 96"):
        ops.grouped_l1(**args)


def test_l1_rejects_slot_pair_not_sized_tokens_times_topk():
    args = good_l1_args()
    args["slot_pair"] = torch.zeros(T * K + 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="slot_pair: expected 5 \\* topk=2 entries"):
        ops.grouped_l1(**args)


def test_l1_rejects_missing_output_for_its_epilogue():
    args = good_l1_args()
    args["epilogue"] = "nvfp4"
    args["h_gs"] = torch.ones(E)
    with pytest.raises(TypeError, match="hq_data: expected a torch.Tensor, got NoneType"):
        ops.grouped_l1(**args)


def test_l1_rejects_an_odd_weight_row_count():
    args = good_l1_args()
    args["w13"] = torch.zeros(E, 2 * I + 1, H // 2, dtype=torch.uint8)
    args["w13_scale"] = torch.zeros(E, 2 * I + 1, H // 16, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"w13: expected an even row count .*got shape \(4, 129, 64\)"):
        ops.grouped_l1(**args)


@pytest.mark.parametrize("limit", [float("nan"), float("inf"), 0.0, -1.0, "10"])
def test_l1_rejects_a_swiglu_limit_that_is_not_a_finite_positive_number(limit):
    with pytest.raises(ValueError, match="swiglu_limit: expected None or a finite number > 0"):
        ops.grouped_l1(**good_l1_args(), swiglu_limit=limit)


def test_l1_rejects_unknown_epilogue():
    args = good_l1_args()
    args["epilogue"] = "fp8"
    with pytest.raises(ValueError, match="epilogue: expected one of"):
        ops.grouped_l1(**args)


def test_l1_rejects_a_k_split_workspace_without_its_arrival_counts():
    args = good_l1_args()
    with pytest.raises(ValueError, match="split_sums, split_arrivals: expected both or neither, got split_sums alone"):
        ops.grouped_l1(**args, split_sums=torch.zeros(64))


def test_l1_rejects_k_split_arrival_counts_that_are_not_int32():
    args = good_l1_args()
    with pytest.raises(TypeError, match="split_arrivals: expected dtype torch.int32, got torch.int64"):
        ops.grouped_l1(**args, split_sums=torch.zeros(64), split_arrivals=torch.zeros(8, dtype=torch.int64))


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_l1_rejects_a_max_pieces_that_is_not_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="max_pieces: expected an int >= 0"):
        ops.grouped_l1(**good_l1_args(), max_pieces=bad)


def test_l2_rejects_output_rows_that_differ_from_the_activation_rows():
    with pytest.raises(ValueError, match=r"y_slot: expected shape \(10, 128\), got \(9, 128\)"):
        ops.grouped_l2(torch.zeros(E, H, I // 2, dtype=torch.uint8),
                       torch.zeros(E, H, I // 16, dtype=torch.float8_e4m3fn), torch.ones(E),
                       torch.zeros(10, I, dtype=torch.bfloat16), None, torch.zeros(E + 1, dtype=torch.int32),
                       torch.zeros(9, H))


@pytest.mark.parametrize("experts", [0, ops.MAX_LOCAL_EXPERTS + 1])
def test_the_grouped_gemms_refuse_an_expert_count_their_launch_cannot_take(experts):
    with pytest.raises(ValueError, match=rf"w13.shape\[0\] \(experts\): expected an int in \[1, 1024\], got {experts}"):
        ops.check_l1_weights(torch.zeros(experts, 2 * I, H // 2, dtype=torch.uint8),
                             torch.zeros(experts, 2 * I, H // 16, dtype=torch.float8_e4m3fn), torch.ones(experts, 2))
    with pytest.raises(ValueError, match=rf"w2.shape\[0\] \(experts\): expected an int in \[1, 1024\], got {experts}"):
        ops.check_l2_weights(torch.zeros(experts, H, I // 2, dtype=torch.uint8),
                             torch.zeros(experts, H, I // 16, dtype=torch.float8_e4m3fn), torch.ones(experts))


@pytest.mark.parametrize("name,bad", [("topk", 2.0), ("topk", 0), ("block_n", 8.0), ("block_m", 64.0)])
def test_l1_refuses_a_count_that_is_not_an_int_in_range(name, bad):
    with pytest.raises(ValueError, match=rf"{name}: expected .*, got {bad!r}"):
        ops.grouped_l1(**{**good_l1_args(), name: bad})


@pytest.mark.parametrize("num_local,expert_begin,message", [
    (2.0, 0, r"num_local: expected an int in \[1, 1024\], got 2.0"),
    (E, -1, r"expert_begin: expected an int in \[0, 2147483643\], got -1"),
    (E, 2**31, r"expert_begin: expected an int in \[0, 2147483643\], got 2147483648"),
])
def test_moe_align_refuses_expert_numbers_that_are_not_ints_in_range(num_local, expert_begin, message):
    bufs = [torch.zeros(n, dtype=torch.int32) for n in (E, E + 1, T * K, T * K)]
    with pytest.raises(ValueError, match=message):
        ops.moe_align(torch.zeros(T, K, dtype=torch.int32), num_local, expert_begin, *bufs)


def test_combine_refuses_routing_weights_of_no_columns():
    with pytest.raises(ValueError, match=r"topk_weights: expected at least one column \(topk >= 1\), got shape "
                                         r"\(5, 0\)"):
        ops.combine(torch.zeros(0, H), torch.zeros(0, dtype=torch.int32), torch.zeros(T, 0), torch.zeros(T, H))


def test_moe_align_rejects_int64_ids():
    bufs = [torch.zeros(n, dtype=torch.int32) for n in (E, E + 1, T * K, T * K)]
    with pytest.raises(TypeError, match="topk_idx: expected dtype torch.int32, got torch.int64"):
        ops.moe_align(torch.zeros(T, K, dtype=torch.int64), E, 0, *bufs)


def test_moe_align_rejects_offsets_of_the_wrong_length():
    bufs = [torch.zeros(n, dtype=torch.int32) for n in (E, E, T * K, T * K)]
    with pytest.raises(ValueError, match=rf"offsets: expected shape \({E + 1}\), got \({E},\)"):
        ops.moe_align(torch.zeros(T, K, dtype=torch.int32), E, 0, *bufs)


def test_moe_align_rejects_cpu_tensors():
    bufs = [torch.zeros(n, dtype=torch.int32) for n in (E, E + 1, T * K, T * K)]
    with pytest.raises(ValueError, match="topk_idx: expected a CUDA tensor"):
        ops.moe_align(torch.zeros(T, K, dtype=torch.int32), E, 0, *bufs)


def test_dequant_rejects_scales_of_the_wrong_dtype():
    with pytest.raises(TypeError, match="scale: expected dtype torch.float8_e4m3fn or torch.uint8, got torch.float32"):
        ops.nvfp4_dequant_rows(torch.zeros(T, H // 2, dtype=torch.uint8), torch.zeros(T, H // 16),
                               torch.zeros(T, H, dtype=torch.bfloat16))


def test_dequant_accepts_packed_int32_scales_up_to_the_device_check():
    with pytest.raises(ValueError, match="data: expected a CUDA tensor"):
        ops.nvfp4_dequant_rows(torch.zeros(T, H // 2, dtype=torch.uint8), torch.zeros(T, H // 64, dtype=torch.int32),
                               torch.zeros(T, H, dtype=torch.bfloat16))


def test_combine_rejects_y_slot_with_fewer_rows_than_pairs():
    """The kernel reads y_slot at any slot of pair_slot, and slots run up to T*k - 1."""
    with pytest.raises(ValueError, match=r"y_slot: expected shape \(10, \*\), got \(1, 128\)"):
        ops.combine(torch.zeros(1, H), torch.zeros(T * K, dtype=torch.int32), torch.zeros(T, K), torch.zeros(T, H))


def test_combine_rejects_bf16_routing_weights():
    with pytest.raises(TypeError, match="topk_weights: expected dtype torch.float32, got torch.bfloat16"):
        ops.combine(torch.zeros(T * K, H), torch.zeros(T * K, dtype=torch.int32),
                    torch.zeros(T, K, dtype=torch.bfloat16), torch.zeros(T, H))


def test_combine_rejects_int_output():
    with pytest.raises(TypeError, match="out: expected dtype torch.float32 or torch.bfloat16, got torch.int32"):
        ops.combine(torch.zeros(T * K, H), torch.zeros(T * K, dtype=torch.int32), torch.zeros(T, K),
                    torch.zeros(T, H, dtype=torch.int32))


@pytest.mark.parametrize("addend,begin,error,message", [
    (torch.zeros(2, H, dtype=torch.bfloat16), 0, TypeError, "addend: expected dtype torch.float32, got torch.bfloat16"),
    (torch.zeros(2, H + 64), 0, ValueError, r"addend: expected shape \(\*, 128\), got \(2, 192\)"),
    (torch.zeros(2, H), 4, ValueError, r"addend_begin: expected an int in \[0, 3\] so that the addend's 2 rows lie "
                                       r"within the 5 tokens, got 4"),
    (torch.zeros(T + 1, H), 0, ValueError, r"addend: expected at most the 5 tokens' rows, got 6"),
    (torch.zeros(2, H), True, ValueError, r"addend_begin: expected an int in \[0, 3\] .* got True"),
])
def test_combine_rejects_an_addend_outside_the_output(addend, begin, error, message):
    with pytest.raises(error, match=message):
        ops.combine(torch.zeros(T * K, H), torch.zeros(T * K, dtype=torch.int32), torch.zeros(T, K),
                    torch.zeros(T, H), addend, begin)


def test_requant_rejects_mismatched_rows():
    with pytest.raises(ValueError, match=r"hq_data: expected shape \(6, 32\), got \(5, 32\)"):
        ops.requant_dynamic(torch.zeros(6, I), torch.zeros(E + 1, dtype=torch.int32),
                            torch.zeros(E, dtype=torch.int32), torch.zeros(5, I // 2, dtype=torch.uint8),
                            torch.zeros(6, I // 16, dtype=torch.uint8), torch.zeros(6, I, dtype=torch.bfloat16),
                            torch.zeros(E))


# ---- check=True: the device-made values the kernels trust, checked on the host ----

def offsets_of(*counts: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("offsets,message", [
    (torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32), r"got offsets\[0\] = 1"),
    (torch.tensor([0, 4, 2, 6, 8], dtype=torch.int32), r"got offsets\[2\] = 2 after offsets\[1\] = 4"),
    (offsets_of(3, 3, 3, 2), r"got offsets\[4\] = 11"),
])
def test_checked_l1_rejects_offsets_that_are_no_prefix_sum_within_the_slots(launches, offsets, message):
    with pytest.raises(ValueError, match=r"offsets: expected per-expert slot offsets \(0 first, never decreasing, at "
                                         r"most 10 slots in all\), " + message):
        ops.grouped_l1(**{**good_l1_args(), "offsets": offsets}, check=True)
    assert launches == []


def test_checked_l1_rejects_a_used_slot_pair_entry_outside_the_pairs(launches):
    slot_pair = torch.arange(T * K, dtype=torch.int32)
    slot_pair[6] = T * K
    with pytest.raises(ValueError, match=r"slot_pair: expected \(token, k\) pair indices in \[0, 10\), got values "
                                         r"in \[0, 10\]"):
        ops.grouped_l1(**{**good_l1_args(), "offsets": offsets_of(2, 2, 2, 1), "slot_pair": slot_pair}, check=True)
    assert launches == []


def test_checked_l1_ignores_slot_pair_entries_past_the_used_slots(launches):
    slot_pair = torch.arange(T * K, dtype=torch.int32)
    slot_pair[7:] = -1  # rows the kernel never reads
    ops.grouped_l1(**{**good_l1_args(), "offsets": offsets_of(2, 2, 2, 1), "slot_pair": slot_pair}, check=True)
    assert launches == ["grouped_l1"]


def test_checked_l1_rejects_k_split_arrival_counts_left_nonzero(launches):
    arrivals = torch.zeros(8, dtype=torch.int32)
    arrivals[3] = 2
    with pytest.raises(ValueError, match="split_arrivals: expected zeros .*, got 1 nonzero entries"):
        ops.grouped_l1(**good_l1_args(), split_sums=torch.zeros(64), split_arrivals=arrivals, check=True)
    assert launches == []


@pytest.mark.parametrize("name,bad", [("x_gs", torch.tensor([float("nan")])), ("w13_alpha", -torch.ones(E, 2))])
def test_checked_l1_rejects_a_scale_that_is_not_finite_and_positive(launches, name, bad):
    with pytest.raises(ValueError, match=f"{name}: expected a finite positive scale"):
        ops.grouped_l1(**{**good_l1_args(), name: bad}, check=True)
    assert launches == []


def test_unchecked_l1_trusts_the_offsets(launches):
    ops.grouped_l1(**{**good_l1_args(), "offsets": offsets_of(9, 9, 9, 9)})
    assert launches == ["grouped_l1"]


def test_checked_l2_rejects_offsets_past_the_activation_rows(launches):
    with pytest.raises(ValueError, match=r"offsets: .* at most 10 slots in all\), got offsets\[4\] = 12"):
        ops.grouped_l2(torch.zeros(E, H, I // 2, dtype=torch.uint8),
                       torch.zeros(E, H, I // 16, dtype=torch.float8_e4m3fn), torch.ones(E),
                       torch.zeros(10, I, dtype=torch.bfloat16), None, offsets_of(3, 3, 3, 3), torch.zeros(10, H),
                       check=True)
    assert launches == []


def test_checked_l2_rejects_a_global_scale_that_is_not_finite(launches):
    with pytest.raises(ValueError, match="h_gs: expected a finite positive scale, got inf"):
        ops.grouped_l2(torch.zeros(E, H, I // 2, dtype=torch.uint8),
                       torch.zeros(E, H, I // 16, dtype=torch.float8_e4m3fn), torch.ones(E),
                       torch.zeros(10, I, dtype=torch.bfloat16), torch.full((E,), float("inf")),
                       offsets_of(3, 3, 2, 2), torch.zeros(10, H), check=True)
    assert launches == []


def test_checked_requant_rejects_offsets_past_its_rows(launches):
    with pytest.raises(ValueError, match=r"offsets: .* at most 6 slots in all\), got offsets\[4\] = 8"):
        ops.requant_dynamic(torch.zeros(6, I), offsets_of(2, 2, 2, 2), torch.zeros(E, dtype=torch.int32),
                            torch.zeros(6, I // 2, dtype=torch.uint8), torch.zeros(6, I // 16, dtype=torch.uint8),
                            torch.zeros(6, I, dtype=torch.bfloat16), torch.zeros(E), check=True)
    assert launches == []


def test_checked_requant_rejects_decreasing_offsets(launches):
    with pytest.raises(ValueError, match=r"offsets: .* got offsets\[3\] = 1 after offsets\[2\] = 4"):
        ops.requant_dynamic(torch.zeros(6, I), torch.tensor([0, 2, 4, 1, 6], dtype=torch.int32),
                            torch.zeros(E, dtype=torch.int32), torch.zeros(6, I // 2, dtype=torch.uint8),
                            torch.zeros(6, I // 16, dtype=torch.uint8), torch.zeros(6, I, dtype=torch.bfloat16),
                            torch.zeros(E), check=True)
    assert launches == []


@pytest.mark.parametrize("bad", [-2, T * K])
def test_checked_combine_rejects_a_pair_slot_outside_the_slots(launches, bad):
    pair_slot = torch.full((T * K,), -1, dtype=torch.int32)
    pair_slot[4] = bad
    with pytest.raises(ValueError, match=rf"pair_slot: expected slots \(or -1\) in \[-1, 10\), got values in "
                                         rf"\[{min(bad, -1)}, {max(bad, -1)}\]"):
        ops.combine(torch.zeros(T * K, H), pair_slot, torch.zeros(T, K), torch.zeros(T, H), check=True)
    assert launches == []


def test_checked_combine_takes_pairs_of_other_ranks(launches):
    pair_slot = torch.arange(T * K, dtype=torch.int32)
    pair_slot[::3] = -1
    ops.combine(torch.zeros(T * K, H), pair_slot, torch.zeros(T, K), torch.zeros(T, H), check=True)
    assert launches == ["moe_combine"]


def l2_with_tiles(hidden: int, block_n: int, block_m: int) -> None:
    ops.grouped_l2(torch.zeros(E, hidden, I // 2, dtype=torch.uint8),
                   torch.zeros(E, hidden, I // 16, dtype=torch.float8_e4m3fn), torch.ones(E),
                   torch.zeros(10, I, dtype=torch.bfloat16), None, torch.zeros(E + 1, dtype=torch.int32),
                   torch.zeros(10, hidden), block_n=block_n, block_m=block_m)


def test_l2_rejects_128_row_tiles_when_hidden_is_not_a_multiple_of_128():
    with pytest.raises(ValueError, match="block_m: .* divides the weight row count 192; .*got 128 with block_n 8"):
        l2_with_tiles(192, 8, 128)


def test_l2_rejects_256_row_tiles_when_hidden_is_not_a_multiple_of_256():
    with pytest.raises(ValueError, match="block_m: .* divides the weight row count 384; .*got 256 with block_n 64"):
        l2_with_tiles(384, 64, 256)


@pytest.mark.parametrize("block_n", [8, 16])
def test_l2_rejects_256_row_tiles_for_slot_tiles_under_32(block_n):
    with pytest.raises(ValueError, match=rf"block_m: .*256 only with block_n >= 32\), got 256 with block_n {block_n}"):
        l2_with_tiles(512, block_n, 256)


def test_topk_stable_rejects_k_above_the_row_length():
    with pytest.raises(ValueError, match=r"k: expected 1\.\.8 \(the scores per row\), got 9"):
        ops.topk_stable(torch.zeros(2, 8), 9)


def test_topk_stable_rejects_float64_scores():
    with pytest.raises(TypeError, match="scores: expected dtype torch.float32, got torch.float64"):
        ops.topk_stable(torch.zeros(2, 8, dtype=torch.float64), 2)


def test_topk_stable_rejects_cpu_scores():
    with pytest.raises(ValueError, match="scores: expected a CUDA tensor, got device cpu"):
        ops.topk_stable(torch.zeros(2, 8), 2)


def test_programmatic_launch_switch_rejects_a_non_bool():
    with pytest.raises(TypeError, match="enabled: expected a bool, got int"):
        ops.set_programmatic_launch(1)


# ---- V4 routing in one kernel ----

def route_args(t: int = T, n: int = 16, k: int = K) -> dict:
    return dict(logits=torch.zeros(t, n), bias=torch.zeros(n), scaling=1.0,
                ids=torch.zeros(t, k, dtype=torch.int32), weights=torch.zeros(t, k))


@pytest.mark.parametrize("name,bad,error,message", [
    ("logits", torch.zeros(T, 16, dtype=torch.bfloat16), TypeError, "logits: expected dtype torch.float32"),
    ("ids", torch.zeros(T, 33, dtype=torch.int32), ValueError, r"ids.shape\[1\] \(k\): expected 1..16"),
    ("ids", torch.zeros(T, K, dtype=torch.int64), TypeError, "ids: expected dtype torch.int32"),
    ("weights", torch.zeros(T, K + 1), ValueError, r"weights: expected shape \(5, 2\), got \(5, 3\)"),
    ("bias", torch.zeros(15), ValueError, r"bias: expected shape \(16\), got \(15,\)"),
    ("given_ids", torch.zeros(T, K, dtype=torch.int64), TypeError, "given_ids: expected dtype torch.int32"),
])
def test_route_v4_rejects_a_bad_argument(name, bad, error, message):
    call_with_one_bad_argument(ops.route_v4, route_args(), name, bad, error, message)


def test_route_v4_caps_k_at_a_warp_of_experts():
    args = route_args(n=64, k=33)
    with pytest.raises(ValueError, match=r"ids.shape\[1\] \(k\): expected 1..32 \(the scores per row\), got 33"):
        ops.route_v4(**args)


def test_route_v4_caps_the_experts_it_selects_from():
    args = route_args(n=ops.MAX_ROUTE_EXPERTS + 1)
    with pytest.raises(ValueError, match=r"logits.shape\[1\] \(experts\): expected at most 1536 where the kernel "
                                         r"selects \(no given_ids\), got 1537"):
        ops.route_v4(**args)


def test_route_v4_rejects_cpu_logits():
    with pytest.raises(ValueError, match="logits: expected a CUDA tensor, got device cpu"):
        ops.route_v4(**route_args())


# ---- router logits ----

def router_logits_args(t: int = T, e: int = 16, h: int = 64) -> dict:
    return dict(hidden=torch.zeros(t, h, dtype=torch.bfloat16), weight=torch.zeros(e, h, dtype=torch.bfloat16),
                out=torch.zeros(t, e))


@pytest.mark.parametrize("name,bad,error,message", [
    ("hidden", torch.zeros(T, 64), TypeError, "hidden: expected dtype torch.bfloat16, got torch.float32"),
    ("hidden", torch.zeros(T, 60, dtype=torch.bfloat16), ValueError,
     r"hidden: expected a hidden size that is a positive multiple of 8 \(16-byte rows\), got 60"),
    ("hidden", torch.zeros(T, 0, dtype=torch.bfloat16), ValueError,
     r"hidden: expected a hidden size that is a positive multiple of 8 \(16-byte rows\), got 0"),
    ("hidden", torch.zeros(64, T, dtype=torch.bfloat16).t(), ValueError, "hidden: expected a contiguous tensor"),
    ("weight", torch.zeros(16, 72, dtype=torch.bfloat16), ValueError,
     r"weight: expected shape \(\*, 64\), got \(16, 72\)"),
    ("weight", torch.zeros(16, 64), TypeError, "weight: expected dtype torch.bfloat16, got torch.float32"),
    ("out", torch.zeros(T, 15), ValueError, r"out: expected shape \(5, 16\), got \(5, 15\)"),
    ("out", torch.zeros(T, 16, dtype=torch.bfloat16), TypeError, "out: expected dtype torch.float32"),
])
def test_router_logits_rejects_a_bad_argument(name, bad, error, message):
    call_with_one_bad_argument(ops.router_logits, router_logits_args(), name, bad, error, message)


def test_router_logits_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="hidden: expected a CUDA tensor, got device cpu"):
        ops.router_logits(**router_logits_args())


# ---- where kernels launch ----

@pytest.fixture
def fake_cuda(monkeypatch) -> tuple[list[torch.device], list]:
    """A current device, a device guard that switches it, raw streams named by their device, and the launches
    `moe_combine` records with the device current at the time."""
    current = [torch.device("cuda", 0)]
    calls = []

    @contextmanager
    def device_guard(d):
        before, current[0] = current[0], torch.device(d)
        yield
        current[0] = before

    monkeypatch.setattr(torch.cuda, "device", device_guard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0].index)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: f"stream of cuda:{index}", raising=False)
    monkeypatch.setattr(ops, "_ext", lambda: SimpleNamespace(moe_combine=lambda *a: calls.append((current[0], a))))
    return current, calls


def test_kernels_launch_on_the_tensors_device_and_its_stream_whatever_device_is_current(fake_cuda):
    current, calls = fake_cuda
    ops.launch("moe_combine", torch.device("cuda", 1), 7)
    assert calls == [(torch.device("cuda", 1), (7, "stream of cuda:1"))]
    assert current[0] == torch.device("cuda", 0)


# ---- fake tensors (torch.compile, FakeTensorMode) ----

@pytest.fixture
def fake_addresses_raise(monkeypatch) -> None:
    """A fake tensor has no address: torch warns (once per process) that data_ptr() will become an error; make it
    one now."""
    def data_ptr(self):
        raise AssertionError("data_ptr() called on a FakeTensor")

    monkeypatch.setattr(FakeTensor, "data_ptr", data_ptr)


@pytest.mark.usefixtures("fake_addresses_raise")
def test_wrappers_validate_fake_tensors_without_reading_their_addresses():
    with FakeTensorMode():
        ops.grouped_l1(**good_l1_args("cuda"))
        ops.combine(torch.zeros(T * K, H, device="cuda"), torch.zeros(T * K, dtype=torch.int32, device="cuda"),
                    torch.zeros(T, K, device="cuda"), torch.zeros(T, H, device="cuda"))
        assert ops.topk_stable(torch.zeros(T, 8, device="cuda"), K).shape == (T, K)


@pytest.mark.usefixtures("fake_addresses_raise")
def test_fake_tensors_are_checked_for_alignment_by_their_storage_offset():
    with FakeTensorMode():
        args = good_l1_args()
        args["out_f32"] = misaligned(args["out_f32"])
        with pytest.raises(ValueError, match="out_f32: expected a 16-byte aligned data pointer, got address % 16 = 4"):
            ops.grouped_l1(**args)


# ---- staging ----

def stage_buffers(device: str = "cpu") -> dict:
    return dict(hidden=torch.zeros(2, H, dtype=torch.bfloat16, device=device),
                x=torch.zeros(4, H // 2, dtype=torch.uint8, device=device),
                x_sf=torch.zeros(4, H // 64, dtype=torch.int32, device=device), x_global=torch.zeros(1, device=device),
                amax_scratch=torch.zeros(1, dtype=torch.int32, device=device))


def test_staging_rejects_an_amax_scratch_of_the_wrong_dtype_before_the_finite_check_syncs():
    args = stage_buffers()
    args["hidden"][1, 3] = float("inf")
    args["amax_scratch"] = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(TypeError, match="amax_scratch: expected dtype torch.int32, got torch.int64"):
        staging.stage_nvfp4(**args, check=True)


def test_staging_rejects_an_amax_scratch_on_another_device():
    with FakeTensorMode():
        args = stage_buffers("cuda")
        args["amax_scratch"] = torch.zeros(1, dtype=torch.int32)
        with pytest.raises(ValueError, match="amax_scratch: expected a CUDA tensor, got device cpu"):
            staging.stage_nvfp4(**args)


# ---- the CUDA expert stage: every argument checked before its first kernel ----

@pytest.fixture
def launches(monkeypatch, cpu_devices_pass) -> list[str]:
    """The kernels the stage launches, on CPU tensors."""
    launched = []
    monkeypatch.setattr(ops, "launch", lambda kernel, device, *args: launched.append(kernel))
    return launched


def stage_args(act_mode: str = "nvfp4") -> dict:
    weights = dataclasses.replace(ExpertWeights.empty(E, H, I), layout="sm90")
    weights.l2_input_scale.fill_(1.0)
    acts = nvfp4.quantize(torch.ones(T, H)) if act_mode == "nvfp4" else torch.zeros(T, H, dtype=torch.bfloat16)
    return dict(acts=acts, topk_idx=torch.zeros(T, K, dtype=torch.int32), topk_weights=torch.ones(T, K),
                weights=weights, expert_begin=0, spec=ExpertSpec(act_mode))


@pytest.mark.parametrize("act_mode,kernels", [
    ("nvfp4", ["moe_align", "nvfp4_dequant_rows", "grouped_l1", "grouped_l2", "moe_combine"]),
    ("bf16", ["moe_align", "grouped_l1", "grouped_l2", "moe_combine"])])
def test_stage_with_valid_arguments_runs_all_of_its_kernels(launches, act_mode, kernels):
    cuda_expert_stage(**stage_args(act_mode))
    assert launches == kernels


def bad_stage_arguments() -> list:
    """(argument name, a bad value, error type, message): the ways each argument of cuda_expert_stage can be wrong."""
    def nvfp4_acts(rows: int = T, scale_rows: int = T, gs: torch.Tensor = torch.ones(())) -> nvfp4.NVFP4Tensor:
        return nvfp4.NVFP4Tensor(torch.zeros(rows, H // 2, dtype=torch.uint8),
                                 torch.zeros(scale_rows, H // 16, dtype=torch.float8_e4m3fn), gs)

    w2_of_another_inter = dict(w2=torch.empty(E, H, I, dtype=torch.uint8),
                               w2_scale=torch.empty(E, H, I // 8, dtype=torch.float8_e4m3fn))
    cases = {
        "int64_ids": ("topk_idx", torch.zeros(T, K, dtype=torch.int64), TypeError,
                      "topk_idx: expected dtype torch.int32"),
        "transposed_weights": ("topk_weights", torch.ones(K, T), ValueError,
                               r"topk_weights: expected shape \(5, 2\), got \(2, 5\)"),
        "bf16_weights": ("topk_weights", torch.ones(T, K, dtype=torch.bfloat16), TypeError,
                         "topk_weights: expected dtype torch.float32"),
        "weights_on_another_device": ("topk_weights", torch.ones(T, K, device="meta"), ValueError,
                                      "topk_weights: expected device cpu, got meta"),
        "more_act_rows_than_ids": ("acts", nvfp4_acts(rows=T + 1), ValueError,
                                   r"acts.data: expected shape \(5, 64\), got \(6, 64\)"),
        "scales_for_one_row": ("acts", nvfp4_acts(scale_rows=1), ValueError,
                               r"acts.scale: expected shape \(5, 8\), got \(1, 8\)"),
        "two_global_scales": ("acts", nvfp4_acts(gs=torch.ones(2)), ValueError,
                              r"acts.global_scale: expected one value, got shape \(2,\)"),
        "bf16_acts_in_nvfp4_mode": ("acts", torch.zeros(T, H, dtype=torch.bfloat16), TypeError,
                                    "acts: expected an NVFP4Tensor in act_mode 'nvfp4', got Tensor"),
        "out_rows": ("out", torch.empty(K, H), ValueError, r"out: expected shape \(5, 128\), got \(2, 128\)"),
        "fp16_out": ("out", torch.empty(T, H, dtype=torch.float16), TypeError,
                     "out: expected dtype torch.float32 or torch.bfloat16, got torch.float16"),
        "small_workspace": ("workspace", ExpertWorkspace.allocate(T - 1, K, E, H, I, "cpu"), ValueError,
                            "workspace: holds 4 tokens of top-2, got 5 tokens of top-2"),
        "block_n": ("block_n", 12, ValueError, r"block_n: expected one of \(8, 16, 32, 64, 128\), got 12"),
        "fewer_total_experts_than_local": ("num_experts_total", E - 1, ValueError,
                                           r"num_experts_total: expected an int >= expert_begin \+ local experts = 4, "
                                           r"got 3"),
        "float_total_experts": ("num_experts_total", 384.0, ValueError,
                                r"num_experts_total: expected an int >= expert_begin \+ local experts = 4, got 384.0"),
        "w2_unlike_w13": ("weights", dataclasses.replace(ExpertWeights.empty(E, H, I), layout="sm90",
                                                         **w2_of_another_inter), ValueError,
                          r"weights.w2: expected shape \(4, 128, 32\) \(that of weights.w13\), got \(4, 128, 64\)"),
    }
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("name,bad,error,message", bad_stage_arguments())
def test_stage_rejects_a_bad_argument_before_launching_anything(launches, name, bad, error, message):
    call_with_one_bad_argument(cuda_expert_stage, stage_args(), name, bad, error, message)
    assert launches == []


def test_stage_rejects_bf16_activations_of_another_hidden_size_before_launching_anything(launches):
    args = stage_args("bf16")
    args["acts"] = torch.zeros(T, 2 * H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"acts: expected shape \(5, 128\), got \(5, 256\)"):
        cuda_expert_stage(**args)
    assert launches == []


def test_stage_rejects_a_workspace_buffer_of_the_wrong_shape_when_built(cpu_devices_pass):
    args = stage_args()
    ws = ExpertWorkspace.allocate(T, K, E, H, I, "cpu")
    ws = dataclasses.replace(ws, y_slot=torch.empty(T * K, H + 64))
    with pytest.raises(ValueError, match=r"workspace.y_slot: expected shape \(10, 128\), got \(10, 192\)"):
        CudaExpertStage(args["weights"], 0, args["spec"], ws)


def test_stage_rejects_k_split_arrival_counts_that_are_not_int32_when_built(cpu_devices_pass):
    args = stage_args()
    ws = ExpertWorkspace.allocate(T, K, E, H, I, "cpu")
    ws = dataclasses.replace(ws, split_sums=torch.empty(64), split_arrivals=torch.zeros(8, dtype=torch.int64))
    with pytest.raises(TypeError, match="workspace.split_arrivals: expected dtype torch.int32, got torch.int64"):
        CudaExpertStage(args["weights"], 0, args["spec"], ws)


def test_stage_rejects_a_workspace_without_the_buffers_its_spec_uses(cpu_devices_pass):
    args = stage_args()
    ws = ExpertWorkspace.allocate(T, K, E, H, I, "cpu", ExpertSpec("bf16"))
    with pytest.raises(ValueError, match=r"workspace.x_bf16: expected shape \(5, 128\), got \(0, 0\)"):
        CudaExpertStage(args["weights"], 0, args["spec"], ws)


def test_a_built_stage_checks_each_calls_arguments_before_launching_anything(launches):
    args = stage_args()
    stage = CudaExpertStage(args["weights"], 0, args["spec"], ExpertWorkspace.allocate(T, K, E, H, I, "cpu"))
    stage(args["acts"], args["topk_idx"], args["topk_weights"])
    assert len(launches) == 5
    with pytest.raises(ValueError, match=r"topk_weights: expected shape \(5, 2\), got \(5, 3\)"):
        stage(args["acts"], args["topk_idx"], torch.ones(T, K + 1))
    assert len(launches) == 5


# ---- outputs in memory of their own: the kernels take restrict pointers ----

def over(t: torch.Tensor, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """A contiguous tensor of dtype and shape over t's first bytes."""
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return t.reshape(-1).view(torch.uint8)[:n].view(dtype).view(shape)


def overlapping_calls() -> list:
    """(a call whose output shares bytes with an input or another output, the message it must raise)."""
    def l1():
        args = good_l1_args()
        ops.grouped_l1(**{**args, "act": over(args["out_f32"], torch.bfloat16, T, H)})

    def l2():
        y_slot = torch.zeros(T * K, H)
        ops.grouped_l2(torch.zeros(E, H, I // 2, dtype=torch.uint8), torch.zeros(E, H, I // 16, dtype=torch.uint8),
                       torch.ones(E), over(y_slot, torch.bfloat16, T * K, I), None,
                       torch.zeros(E + 1, dtype=torch.int32), y_slot)

    def combine():
        y_slot = torch.zeros(T * K, H)
        ops.combine(y_slot, torch.zeros(T * K, dtype=torch.int32), torch.zeros(T, K), y_slot[:T])

    def moe_align():
        offsets = torch.zeros(E + 1, dtype=torch.int32)
        ops.moe_align(torch.zeros(T, K, dtype=torch.int32), E, 0, offsets[:E], offsets,
                      torch.zeros(T * K, dtype=torch.int32), torch.zeros(T * K, dtype=torch.int32))

    def requant():
        h_f32 = torch.zeros(6, I)
        ops.requant_dynamic(h_f32, torch.zeros(E + 1, dtype=torch.int32), torch.zeros(E, dtype=torch.int32),
                            torch.zeros(6, I // 2, dtype=torch.uint8), torch.zeros(6, I // 16, dtype=torch.uint8),
                            torch.zeros(6, I, dtype=torch.bfloat16), h_f32[0, :E])

    def route():
        args = route_args()
        ops.route_v4(**{**args, "weights": over(args["logits"], torch.float32, T, K)})

    def logits():
        args = router_logits_args()
        ops.router_logits(**{**args, "out": over(args["hidden"], torch.float32, T, 16)})

    def dequant():
        out = torch.zeros(T, H, dtype=torch.bfloat16)
        ops.nvfp4_dequant_rows(over(out, torch.uint8, T, H // 2), torch.zeros(T, H // 16, dtype=torch.uint8), out)

    def stage():
        x = torch.zeros(8, H // 2, dtype=torch.uint8)
        staging.validate_stage_args(over(x, torch.bfloat16, 2, H), x, torch.zeros(8, H // 64, dtype=torch.int32),
                                    torch.zeros(1), None, torch.zeros(1, dtype=torch.int32))

    return [
        pytest.param(l1, r"out_f32: expected memory apart from act, got 1280 bytes in common \(the kernel writes "
                         r"out_f32 while it reads act\)", id="l1"),
        pytest.param(l2, "y_slot: expected memory apart from act, got 1280 bytes", id="l2"),
        pytest.param(combine, "out: expected memory apart from y_slot, got 2560 bytes", id="combine"),
        pytest.param(moe_align, r"counts: expected memory apart from offsets, got 16 bytes in common \(the kernel "
                                r"writes counts while it writes offsets\)", id="moe_align"),
        pytest.param(requant, "h_gs: expected memory apart from h_f32, got 16 bytes", id="requant_dynamic"),
        pytest.param(route, "weights: expected memory apart from logits, got 40 bytes", id="route_v4"),
        pytest.param(logits, "out: expected memory apart from hidden, got 320 bytes", id="router_logits"),
        pytest.param(dequant, "out: expected memory apart from data, got 320 bytes", id="nvfp4_dequant_rows"),
        pytest.param(stage, "x: expected memory apart from hidden, got 512 bytes", id="stage_nvfp4"),
    ]


@pytest.mark.parametrize("call,message", overlapping_calls())
def test_an_output_sharing_bytes_with_another_operand_is_refused_naming_both(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_stage_refuses_an_output_over_its_routing_weights(launches):
    args = stage_args()
    out = torch.empty(T, H)
    args["topk_weights"] = over(out, torch.float32, T, K).fill_(1.0)
    with pytest.raises(ValueError, match="out: expected memory apart from topk_weights, got 40 bytes"):
        cuda_expert_stage(**args, out=out)
    assert launches == []


def test_operands_side_by_side_in_one_buffer_are_accepted():
    """Apart means no byte in common: neighbours in one allocation pass on to the device check."""
    buf = torch.zeros(T * H * 2 + T * 16 * 4)
    hidden = buf[:T * H // 2].view(torch.bfloat16).view(T, H)  # T*H bf16 = T*H/2 fp32 words
    out = buf[T * H // 2:T * H // 2 + T * 16].view(T, 16)
    with pytest.raises(ValueError, match="hidden: expected a CUDA tensor"):
        ops.router_logits(hidden, torch.zeros(16, H, dtype=torch.bfloat16), out)


def test_the_stage_refuses_an_output_inside_its_own_workspace(launches):
    ws = ExpertWorkspace.allocate(T, K, E, H, I, "cpu")
    out = over(ws.y_slot, torch.float32, T, H)
    with pytest.raises(ValueError, match=f"out: expected memory apart from workspace.y_slot, got {T * H * 4} bytes"):
        cuda_expert_stage(**stage_args(), out=out, workspace=ws)
    assert launches == []
