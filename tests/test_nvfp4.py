"""NVFP4_SPEC sections 1-3, rule by rule, with hand-derived expected values."""
import math
import re

import pytest
import torch

from ep_runtime import nvfp4

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _bytes(*b):
    return torch.tensor(b, dtype=torch.uint8)


def test_e2m1_codes_decode_to_the_non_uniform_grid():
    codes = torch.arange(16, dtype=torch.uint8)
    assert nvfp4.e2m1_decode(codes).tolist() == GRID + [-v for v in GRID]


def test_e2m1_ties_go_to_the_even_code():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert nvfp4.e2m1_encode(ties).tolist() == [0, 2, 2, 4, 4, 6, 6]


def test_e2m1_rounds_to_nearest_on_the_non_uniform_grid():
    v = torch.tensor([0.26, 0.74, 2.4, 2.6, 3.4, 3.6, 4.9, 5.1])
    assert nvfp4.e2m1_decode(nvfp4.e2m1_encode(v)).tolist() == [0.5, 0.5, 2.0, 3.0, 3.0, 4.0, 4.0, 6.0]


def test_e2m1_saturates_at_six():
    assert nvfp4.e2m1_encode(torch.tensor([6.5, 100.0, -1e30])).tolist() == [7, 7, 15]


def test_e2m1_negative_values_set_the_sign_bit():
    assert nvfp4.e2m1_encode(torch.tensor([-1.5, -6.0])).tolist() == [0x8 | 3, 0x8 | 7]


def test_e2m1_small_negative_values_encode_as_negative_zero():
    code = nvfp4.e2m1_encode(torch.tensor([-0.1]))
    assert code.tolist() == [0x8]
    assert nvfp4.e2m1_decode(code).tolist() == [0.0]


def test_even_elements_go_in_the_low_nibble():
    codes = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert nvfp4.pack_nibbles(codes).tolist() == [0x21, 0x43]
    assert nvfp4.unpack_nibbles(_bytes(0x21, 0x43)).tolist() == [1, 2, 3, 4]


def test_scale_bytes_are_bit_reinterpreted_not_value_cast():
    # 0x3F = sign 0, exponent 0111 (bias 7), mantissa 111 -> 1.875; a value cast would read 63.
    data = _bytes(0x22).repeat(8).reshape(1, 8)  # sixteen codes of 1.0
    scale = _bytes(0x3F).reshape(1, 1).view(torch.float8_e4m3fn)
    assert nvfp4.block_dequantize(data, scale).unique().tolist() == [1.875]


def test_block_dequantize_rejects_value_scales_given_as_bytes():
    with pytest.raises(TypeError, match="scale"):
        nvfp4.block_dequantize(_bytes(0x22).repeat(8).reshape(1, 8), _bytes(0x3F).reshape(1, 1))


def test_block_dequantize_rejects_scales_for_fewer_rows_than_the_data():
    data = _bytes(0x22).repeat(32).reshape(4, 8)  # four rows of sixteen codes
    scale = _bytes(0x38).reshape(1, 1).view(torch.float8_e4m3fn)  # one row of scales: would broadcast
    with pytest.raises(ValueError, match=r"scale: expected shape \(4, 1\) .*got \(1, 1\)"):
        nvfp4.block_dequantize(data, scale)


def test_scale_words_are_little_endian():
    scales = _bytes(0x01, 0x02, 0x03, 0x04, 0x00, 0x00, 0x00, 0x80).view(torch.float8_e4m3fn).reshape(1, 8)
    words = nvfp4.pack_scales_u32(scales)
    assert words.tolist() == [[0x04030201, -(2**31)]]
    assert nvfp4.unpack_scales_u32(words).view(torch.uint8).tolist() == scales.view(torch.uint8).tolist()


def test_dynamic_global_scale_is_2688_over_amax():
    x = torch.zeros(2, 16)
    x[1, 3] = -3.0
    assert nvfp4.quantize(x).global_scale.item() == 2688.0 / 3.0


def test_all_zero_tensor_gets_global_scale_one():
    q = nvfp4.quantize(torch.zeros(1, 32))
    assert q.global_scale.item() == 1.0
    assert q.data.eq(0).all() and q.scale.float().eq(0).all()


def test_block_scale_is_block_amax_over_six():
    # A block of 6.0 at gs = 1 needs sf = 1 and codes 6.0 (0x7); a scale 6x too large would give codes 1.0.
    q = nvfp4.quantize(torch.full((1, 16), 6.0), global_scale=1.0)
    assert q.scale.float().tolist() == [[1.0]]
    assert q.data.unique().tolist() == [0x77]


def test_block_scale_saturates_at_448():
    q = nvfp4.quantize(torch.full((1, 16), 10.0), global_scale=1000.0)  # 1000*10/6 -> 448
    assert q.scale.float().tolist() == [[448.0]]
    assert q.data.unique().tolist() == [0x77]  # 10 * 1000/448 saturates at 6


def test_zero_block_encodes_zeros_next_to_a_nonzero_block():
    x = torch.zeros(1, 32)
    x[0, 16:] = 1.0
    q = nvfp4.quantize(x, global_scale=1.0)
    assert q.scale.float()[0, 0].item() == 0.0
    assert q.data[0, :8].eq(0).all()


def test_static_global_scale_is_used_as_given():
    x = torch.tensor([[3.0] + [0.0] * 15])
    q = nvfp4.quantize(x, global_scale=2.0)  # sf = e4m3(2*3/6) = 1, code = 3*2/1 = 6
    assert q.global_scale.item() == 2.0
    assert q.scale.float().item() == 1.0
    assert nvfp4.dequantize(q)[0, 0].item() == 3.0


def _encode_by_search(v: float) -> int:
    """Independent model: nearest grid value, ties to the even code, saturating; sign bit from signbit."""
    a = min(abs(v), 6.0)
    dists = [abs(a - g) for g in GRID]
    best = min(dists)
    code = min(c for c, d in enumerate(dists) if d == best and (c % 2 == 0 or dists.count(best) == 1))
    return code | (8 if math.copysign(1.0, v) < 0 else 0)


def test_e2m1_encode_matches_an_exhaustive_search_on_random_values(gen):
    v = torch.randn(4000, generator=gen) * 3
    v = torch.cat([v, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, -0.0])])
    assert nvfp4.e2m1_encode(v).tolist() == [_encode_by_search(x) for x in v.tolist()]


def test_dequantize_of_quantize_is_close_on_random_data(gen):
    x = torch.randn(64, 256, generator=gen)
    err = (nvfp4.dequantize(nvfp4.quantize(x)) - x).norm() / x.norm()
    assert 0.0 < err < 0.15  # 4-bit elements: ~10% relative error, never zero on random data


def test_representable_values_round_trip_exactly(gen):
    codes = torch.randint(0, 16, (8, 64), generator=gen, dtype=torch.uint8)
    codes[:, ::16] = 7  # every block holds 6.0, so sf = 1 at gs = 1
    x = nvfp4.e2m1_decode(codes)
    q = nvfp4.quantize(x, global_scale=1.0)
    assert torch.equal(nvfp4.dequantize(q), x)


@pytest.mark.parametrize("global_scale", [None, 4.0], ids=["dynamic", "static"])
def test_zero_rows_quantize_and_dequantize_to_zero_rows(global_scale):
    q = nvfp4.quantize(torch.zeros(0, 64), global_scale)
    assert q.data.shape == (0, 32) and q.scale.shape == (0, 4)
    assert nvfp4.dequantize(q).shape == (0, 64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_rejects_non_finite_input(bad):
    x = torch.ones(1, 16)
    x[0, 5] = bad
    with pytest.raises(ValueError, match=r"x: expected finite values"):
        nvfp4.quantize(x)


def test_quantize_rejects_a_global_scale_with_several_values():
    with pytest.raises(ValueError, match=r"global_scale: expected one value, got shape \(2,\)"):
        nvfp4.quantize(torch.ones(2, 16), global_scale=torch.tensor([1.0, 2.0]))


def test_quantize_rejects_k_not_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize(torch.ones(2, 24))


def test_quantize_rejects_integer_input():
    with pytest.raises(TypeError, match="floating-point"):
        nvfp4.quantize(torch.ones(2, 16, dtype=torch.int32))


def test_weight_writer_rule():
    w = torch.zeros(1, 48)
    w[0, :16], w[0, 16:32] = 1.0, 0.5
    q, sf, ws2 = nvfp4.quantize_weight(w)
    assert ws2.item() == pytest.approx(1.0 / 2688, rel=1e-7)
    assert sf.float().tolist() == [[448.0, 224.0, 1.0]]  # amax/(6*ws2); a zero block stores 1.0
    assert q[0, :16].unique().tolist() == [0x77] and q[0, 16:].eq(0).all()
    w_hat = nvfp4.block_dequantize(q, sf) * ws2
    assert torch.allclose(w_hat, w, rtol=1e-6)


def test_dynamic_global_scale_is_one_correctly_rounded_division(gen):
    amax = torch.rand(2000, generator=gen) * 10 + 1e-3
    for a in amax.tolist():
        a32 = torch.tensor(a, dtype=torch.float32)
        expected = torch.tensor(2688.0 / a32.double().item(), dtype=torch.float32).item()
        assert nvfp4.dynamic_global_scale(a32.reshape(1)).item() == expected


@pytest.mark.parametrize("value,message", [
    (1e-50, "s: expected a finite positive scale, got 1e-50 (as fp32: 0.0)"),  # the kernels' fp32 loses it
    (float("nan"), "s: expected a finite positive scale, got nan"),
    (1e-40, "s: expected a finite positive scale, got 1e-40 (as fp32: 9.99994610111476e-41) (below fp32's smallest "
            "normal number, 1.1754943508222875e-38: its reciprocal is infinite)"),  # a scale the runtime divides by
    (torch.ones(2), "s: expected one value, got shape (2,)"),
    ("0.5", "s: expected a number or a tensor, got str"),
])
def test_a_scale_is_checked_as_the_fp32_the_kernels_use_and_reported_as_given(value, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        nvfp4.positive_scale(value, "s")


def test_a_subnormal_scale_passes_where_the_runtime_only_multiplies_by_it():
    nvfp4.check_positive_scale(torch.tensor(1e-40), "weight_scale_2")  # an alpha: never inverted
    with pytest.raises(ValueError, match="input_scale: expected a finite positive scale"):
        nvfp4.check_positive_scale(torch.tensor(1e-40), "input_scale", divisor=True)
