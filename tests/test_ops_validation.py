"""ep_runtime.ops validates every tensor before its address reaches a kernel: wrong dtype -> TypeError, wrong
shape / layout / alignment / device -> ValueError, each naming the argument, what was expected and what came.

All of this runs on the CPU: validation happens before any CUDA call, and for the device check a CPU tensor
is the bad input.
"""
from __future__ import annotations

import pytest
import torch

from ep_runtime import ops

E, H, I, T, K = 4, 128, 64, 5, 2


def good_l1_args() -> dict:
    """Arguments that pass every check but the device one (they live on the CPU)."""
    return dict(
        w13=torch.zeros(E, 2 * I, H // 2, dtype=torch.uint8),
        w13_scale=torch.zeros(E, 2 * I, H // 16, dtype=torch.float8_e4m3fn),
        w13_alpha=torch.ones(E, 2),
        act=torch.zeros(T, H, dtype=torch.bfloat16),
        x_gs=torch.ones(1),
        offsets=torch.zeros(E + 1, dtype=torch.int32),
        slot_pair=torch.zeros(T * K, dtype=torch.int32),
        topk=K,
        epilogue="gate_up",
        out_f32=torch.zeros(T * K, 2 * I),
    )


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


def test_l1_rejects_unknown_epilogue():
    args = good_l1_args()
    args["epilogue"] = "fp8"
    with pytest.raises(ValueError, match="epilogue: expected one of"):
        ops.grouped_l1(**args)


def test_l2_rejects_output_rows_that_differ_from_the_activation_rows():
    with pytest.raises(ValueError, match=r"y_slot: expected shape \(10, 128\), got \(9, 128\)"):
        ops.grouped_l2(torch.zeros(E, H, I // 2, dtype=torch.uint8),
                       torch.zeros(E, H, I // 16, dtype=torch.float8_e4m3fn), torch.ones(E),
                       torch.zeros(10, I, dtype=torch.bfloat16), None, torch.zeros(E + 1, dtype=torch.int32),
                       torch.zeros(9, H))


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


def test_combine_rejects_bf16_routing_weights():
    with pytest.raises(TypeError, match="topk_weights: expected dtype torch.float32, got torch.bfloat16"):
        ops.combine(torch.zeros(T * K, H), torch.zeros(T * K, dtype=torch.int32),
                    torch.zeros(T, K, dtype=torch.bfloat16), torch.zeros(T, H))


def test_combine_rejects_int_output():
    with pytest.raises(TypeError, match="out: expected dtype torch.float32 or torch.bfloat16, got torch.int32"):
        ops.combine(torch.zeros(T * K, H), torch.zeros(T * K, dtype=torch.int32), torch.zeros(T, K),
                    torch.zeros(T, H, dtype=torch.int32))


def test_requant_rejects_mismatched_rows():
    with pytest.raises(ValueError, match=r"hq_data: expected shape \(6, 32\), got \(5, 32\)"):
        ops.requant_dynamic(torch.zeros(6, I), torch.zeros(E + 1, dtype=torch.int32),
                            torch.zeros(E, dtype=torch.int32), torch.zeros(5, I // 2, dtype=torch.uint8),
                            torch.zeros(6, I // 16, dtype=torch.uint8), torch.zeros(6, I, dtype=torch.bfloat16),
                            torch.zeros(E))


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
