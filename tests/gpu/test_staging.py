"""Staging kernel (csrc/staging.cu) == ep_runtime.nvfp4.quantize, bit for bit, on fresh random data.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_staging.py`. The oracle runs on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from e2m1_ties import on_boundary, tie_blocks
from ep_runtime import nvfp4
from ep_runtime.ops import extension_available

pytestmark = pytest.mark.gpu


if not extension_available("stage_nvfp4"):
    pytest.skip("needs an sm_90 CUDA device and the built extension", allow_module_level=True)

from ep_runtime.staging import stage_nvfp4  # noqa: E402

DEV = torch.device("cuda")
CAP = 64  # buffer rows; tests stage fewer and check the rest stays untouched
AMAX = torch.zeros(1, dtype=torch.int32, device=DEV)  # the amax word a SymmBuffer owns


def _poisoned_buffers(hidden: int, cap: int = CAP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.full((cap, hidden // 2), 0xA5, dtype=torch.uint8, device=DEV)
    x_sf = torch.full((cap, hidden // 64), 0x5A5A5A5A, dtype=torch.int32, device=DEV)
    x_global = torch.full((1,), float("nan"), dtype=torch.float32, device=DEV)
    return x, x_sf, x_global


def _random_hidden(t: int, h: int, gen: torch.Generator) -> torch.Tensor:
    # Magnitudes spread over many octaves so block scales cover the e4m3 range, including blocks whose
    # scale rounds to zero and blocks that saturate.
    mag = torch.exp2(torch.randn(t, h // 16, 1, generator=gen) * 6).expand(t, h // 16, 16).reshape(t, h)
    return (torch.randn(t, h, generator=gen) * mag).to(torch.bfloat16)


def _assert_staged_equals_reference(hidden_cpu: torch.Tensor, x, x_sf, x_global, global_scale=None) -> None:
    ref = nvfp4.quantize(hidden_cpu, global_scale, check=True)
    t = hidden_cpu.shape[0]
    assert torch.equal(x[:t].cpu(), ref.data), "packed E2M1 codes differ"
    assert torch.equal(x_sf[:t].cpu(), nvfp4.pack_scales_u32(ref.scale)), "packed UE4M3 scale words differ"
    assert torch.equal(x_global.cpu().view(torch.int32), ref.global_scale.reshape(1).view(torch.int32)), \
        f"global scale differs: {x_global.item()} vs {ref.global_scale.item()}"


@pytest.mark.parametrize("t,h", [(1, 64), (1, 7168), (7, 4096), (33, 7168), (64, 2048)])
def test_dynamic_scale_matches_reference_bitwise(t: int, h: int, gen: torch.Generator) -> None:
    hidden = _random_hidden(t, h, gen)
    x, x_sf, x_global = _poisoned_buffers(h)
    stage_nvfp4(hidden.to(DEV), x, x_sf, x_global, AMAX)
    torch.cuda.synchronize()
    _assert_staged_equals_reference(hidden, x, x_sf, x_global)


@pytest.mark.parametrize("boost", [0.5, 1.0, 16.0])  # 16: many block scales saturate at 448, codes at 6
def test_static_scale_matches_reference_bitwise(boost: float, gen: torch.Generator) -> None:
    hidden = _random_hidden(17, 7168, gen)
    input_scale = hidden.float().abs().amax() / (448 * 6) * torch.rand((), generator=gen).add(0.5)
    gs = (1 / input_scale * boost).reshape(())
    x, x_sf, x_global = _poisoned_buffers(7168)
    stage_nvfp4(hidden.to(DEV), x, x_sf, x_global, AMAX, global_scale=gs.to(DEV))
    torch.cuda.synchronize()
    _assert_staged_equals_reference(hidden, x, x_sf, x_global, gs)


def test_values_on_e2m1_boundaries_round_to_the_even_code_as_the_reference_rounds_them(gen: torch.Generator) -> None:
    values = tie_blocks(6, 1024, gen)
    hidden = values.to(torch.bfloat16)
    gs = torch.tensor(1.0)
    x, x_sf, x_global = _poisoned_buffers(1024)
    stage_nvfp4(hidden.to(DEV), x, x_sf, x_global, AMAX, global_scale=gs.to(DEV))
    torch.cuda.synchronize()
    _assert_staged_equals_reference(hidden, x, x_sf, x_global, gs)
    codes = nvfp4.unpack_nibbles(x[:6].cpu()).reshape(values.shape)
    assert bool(((codes[on_boundary(values)] & 7) % 2 == 0).all()), "a boundary value took an odd code"


def test_all_zero_blocks_get_zero_scales_and_codes(gen: torch.Generator) -> None:
    hidden = _random_hidden(5, 1024, gen)
    hidden[:, 64:128] = 0
    hidden[2] = 0
    hidden[3, 16:32] = -0.0  # a zero block made of negative zeros still encodes as code 0 (scale 0)
    x, x_sf, x_global = _poisoned_buffers(1024)
    stage_nvfp4(hidden.to(DEV), x, x_sf, x_global, AMAX)
    torch.cuda.synchronize()
    _assert_staged_equals_reference(hidden, x, x_sf, x_global)
    assert int(x[2].count_nonzero()) == 0 and int(x_sf[2].count_nonzero()) == 0


def test_negative_values_and_negative_zero_keep_the_sign_bit(gen: torch.Generator) -> None:
    # magnitudes within one octave: every block has a non-zero scale, so -0.0 must encode as 0x8
    hidden = -(torch.rand(3, 512, generator=gen) + 1).to(torch.bfloat16)
    hidden[1, ::3] = -0.0
    x, x_sf, x_global = _poisoned_buffers(512)
    stage_nvfp4(hidden.to(DEV), x, x_sf, x_global, AMAX)
    torch.cuda.synchronize()
    _assert_staged_equals_reference(hidden, x, x_sf, x_global)
    codes = nvfp4.unpack_nibbles(x[1].cpu())
    assert bool(((codes[::3] & 8) != 0).all())


def test_all_zero_input_gets_unit_global_scale() -> None:
    hidden = torch.zeros(4, 256, dtype=torch.bfloat16)
    x, x_sf, x_global = _poisoned_buffers(256)
    stage_nvfp4(hidden.to(DEV), x, x_sf, x_global, AMAX)
    torch.cuda.synchronize()
    _assert_staged_equals_reference(hidden, x, x_sf, x_global)
    assert x_global.item() == 1.0


def test_rows_past_the_staged_tokens_stay_untouched(gen: torch.Generator) -> None:
    hidden = _random_hidden(9, 512, gen)
    x, x_sf, x_global = _poisoned_buffers(512)
    stage_nvfp4(hidden.to(DEV), x, x_sf, x_global, AMAX)
    torch.cuda.synchronize()
    assert bool((x[9:] == 0xA5).all()) and bool((x_sf[9:] == 0x5A5A5A5A).all())


def test_returned_views_dequantize_like_the_reference(gen: torch.Generator) -> None:
    hidden = _random_hidden(11, 2048, gen)
    x, x_sf, x_global = _poisoned_buffers(2048)
    staged = stage_nvfp4(hidden.to(DEV), x, x_sf, x_global, AMAX)
    ref = nvfp4.quantize(hidden)
    got = nvfp4.dequantize(nvfp4.NVFP4Tensor(staged.data.cpu(), staged.scale.cpu(), staged.global_scale.cpu()))
    assert torch.equal(got, nvfp4.dequantize(ref))


@pytest.mark.parametrize("static", [False, True])
def test_cuda_graph_replay_gives_the_same_bits_as_the_reference(static: bool, gen: torch.Generator) -> None:
    h = 7168
    src = torch.empty(13, h, dtype=torch.bfloat16, device=DEV)
    gs = torch.empty((), dtype=torch.float32, device=DEV)
    x, x_sf, x_global = _poisoned_buffers(h)
    src.copy_(_random_hidden(13, h, gen))
    gs.fill_(3.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (allocates the amax scratch word)
        stage_nvfp4(src, x, x_sf, x_global, AMAX, global_scale=gs if static else None)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stage_nvfp4(src, x, x_sf, x_global, AMAX, global_scale=gs if static else None)
    for _ in range(2):  # fresh data each replay: the graph must re-derive amax and scales
        hidden = _random_hidden(13, h, gen)
        src.copy_(hidden)
        new_gs = torch.rand((), generator=gen) * 100 + 1
        gs.copy_(new_gs)
        x.fill_(0xA5)
        x_sf.fill_(0x5A5A5A5A)
        graph.replay()
        torch.cuda.synchronize()
        _assert_staged_equals_reference(hidden, x, x_sf, x_global, new_gs if static else None)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_an_unchecked_nan_stages_as_the_reference_quantizes_it(static: bool, gen: torch.Generator) -> None:
    """check=False lets a NaN through: its block's scale is NaN and its codes 0, as in the reference, so its token's
    outputs are NaN rather than plausible values (a dynamic global scale is then 1, as the reference's)."""
    hidden = _random_hidden(3, 256, gen)
    hidden[1, 37] = float("nan")
    gs = torch.tensor(2.0) if static else None
    x, x_sf, x_global = _poisoned_buffers(256)
    stage_nvfp4(hidden.to(DEV), x, x_sf, x_global, AMAX, global_scale=None if gs is None else gs.to(DEV), check=False)
    torch.cuda.synchronize()
    ref = nvfp4.quantize(hidden, gs, check=False)
    assert int(ref.scale.view(torch.uint8)[1, 2]) == 0x7F  # the reference's NaN scale for the block holding it
    assert torch.equal(x[:3].cpu(), ref.data) and torch.equal(x_sf[:3].cpu(), nvfp4.pack_scales_u32(ref.scale))
    assert torch.equal(x_global.cpu().view(torch.int32), ref.global_scale.reshape(1).view(torch.int32))


def test_check_rejects_non_finite_input() -> None:
    hidden = torch.randn(2, 64, dtype=torch.bfloat16, device=DEV)
    hidden[1, 5] = float("inf")
    x, x_sf, x_global = _poisoned_buffers(64)
    with pytest.raises(ValueError, match="hidden: expected finite values"):
        stage_nvfp4(hidden, x, x_sf, x_global, AMAX, check=True)


def test_check_rejects_a_non_positive_static_scale() -> None:
    hidden = torch.randn(2, 64, dtype=torch.bfloat16, device=DEV)
    x, x_sf, x_global = _poisoned_buffers(64)
    with pytest.raises(ValueError, match="global_scale"):
        stage_nvfp4(hidden, x, x_sf, x_global, AMAX, global_scale=torch.zeros((), device=DEV), check=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_staging_on_a_gpu_other_than_the_current_one_matches_reference_bitwise(gen: torch.Generator) -> None:
    second = torch.device("cuda", 1)
    hidden = _random_hidden(7, 4096, gen)
    x, x_sf, x_global = (b.to(second) for b in _poisoned_buffers(4096))
    with torch.cuda.device(0):
        stage_nvfp4(hidden.to(second), x, x_sf, x_global, torch.zeros(1, dtype=torch.int32, device=second))
    torch.cuda.synchronize(second)
    _assert_staged_equals_reference(hidden, x, x_sf, x_global)
