"""Argument validation of the staging and all-reduce wrappers and of the symmetric buffer: bad input fails with a
clear error, on CPU."""
from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch

from ep_runtime.allreduce import (SymmAllReduce, resolve_oneshot_max_bytes, validate_all_gather_args,
                                  validate_all_reduce_args, validate_reduce_scatter_args)
from ep_runtime.dist_utils import CommError, CommMismatchError, CommTimeoutError, check_same_values, host_barrier
from ep_runtime.staging import validate_stage_args
from ep_runtime.symm import CpuBackend, SymmBuffer, make_backend, region_bytes
from ep_runtime.symm_torch import TorchSymmBackend, timeout_from_env

H = 128


def _stage_args(t: int = 4, cap: int = 8, h: int = H) -> dict:
    return dict(hidden=torch.randn(t, h).to(torch.bfloat16), x=torch.empty(cap, h // 2, dtype=torch.uint8),
                x_sf=torch.empty(cap, h // 64, dtype=torch.int32), x_global=torch.empty(1),
                global_scale=None, amax_scratch=torch.zeros(1, dtype=torch.int32))


def test_stage_rejects_non_bf16_hidden() -> None:
    args = _stage_args()
    args["hidden"] = args["hidden"].float()
    with pytest.raises(TypeError, match=r"hidden: expected dtype torch.bfloat16, got torch.float32"):
        validate_stage_args(**args)


def test_stage_rejects_hidden_size_not_a_multiple_of_64() -> None:
    args = _stage_args()
    args["hidden"] = torch.randn(4, 96).to(torch.bfloat16)
    with pytest.raises(ValueError, match="hidden: hidden size must be a multiple of 64, got 96"):
        validate_stage_args(**args)


def test_stage_rejects_more_tokens_than_capacity() -> None:
    with pytest.raises(ValueError, match="hidden: 9 tokens exceed the staging buffer capacity max_tokens=8"):
        validate_stage_args(**_stage_args(t=9, cap=8))


def test_stage_rejects_scale_words_of_the_wrong_shape() -> None:
    args = _stage_args()
    args["x_sf"] = torch.empty(8, H // 16, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"x_sf: expected shape \(8, 2\), got \(8, 8\)"):
        validate_stage_args(**args)


def test_stage_rejects_float8_scales_instead_of_packed_words() -> None:
    args = _stage_args()
    args["x_sf"] = torch.empty(8, H // 16, dtype=torch.uint8).view(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="x_sf: expected dtype torch.int32"):
        validate_stage_args(**args)


def test_stage_rejects_non_contiguous_hidden() -> None:
    args = _stage_args()
    args["hidden"] = torch.randn(H, 4).to(torch.bfloat16).t()
    with pytest.raises(ValueError, match="hidden: expected a contiguous tensor"):
        validate_stage_args(**args)


def test_stage_rejects_a_global_scale_with_several_values() -> None:
    args = _stage_args()
    args["global_scale"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"global_scale: expected one value, got shape \(2,\)"):
        validate_stage_args(**args)


def test_stage_rejects_cpu_tensors_once_everything_else_is_right() -> None:
    with pytest.raises(ValueError, match="hidden: expected a CUDA tensor, got device cpu"):
        validate_stage_args(**_stage_args())


def test_all_reduce_rejects_an_unknown_algorithm() -> None:
    with pytest.raises(ValueError, match=r"algo: expected one of \('auto', 'oneshot', 'twoshot'\), got 'ring'"):
        validate_all_reduce_args(torch.zeros(8, dtype=torch.bfloat16), "ring")


def test_all_reduce_rejects_integer_tensors() -> None:
    with pytest.raises(TypeError, match="t: expected dtype torch.bfloat16 or torch.float32, got torch.int32"):
        validate_all_reduce_args(torch.zeros(8, dtype=torch.int32), "auto")


def test_all_reduce_rejects_sizes_that_are_not_whole_16_byte_vectors() -> None:
    with pytest.raises(ValueError, match=r"t: size must be a multiple of 16 bytes, got 14 bytes \(shape \(7,\)\)"):
        validate_all_reduce_args(torch.zeros(7, dtype=torch.bfloat16), "auto")


def test_all_reduce_rejects_non_contiguous_tensors() -> None:
    with pytest.raises(ValueError, match="t: expected a contiguous tensor"):
        validate_all_reduce_args(torch.zeros(16, 8, dtype=torch.bfloat16)[:, ::2], "auto")


def test_all_reduce_rejects_cpu_tensors() -> None:
    with pytest.raises(ValueError, match="t: expected a CUDA tensor in symmetric memory, got device cpu"):
        validate_all_reduce_args(torch.zeros(8, dtype=torch.bfloat16), "auto")


_BUF64 = torch.zeros(64)  # one allocation, two arguments over it


@pytest.mark.parametrize("inp,out,error,message", [
    (torch.zeros(64, dtype=torch.int32), torch.zeros(32, dtype=torch.int32), TypeError,
     "inp: expected dtype torch.bfloat16 or torch.float32, got torch.int32"),
    (torch.zeros(64), torch.zeros(32, dtype=torch.bfloat16), TypeError,
     "out: expected dtype torch.float32, got torch.bfloat16"),
    (torch.zeros(64), torch.zeros(16), ValueError, "out: expected 1/2 of inp's 64 elements, got 16"),
    (torch.zeros(4), torch.zeros(2), ValueError, "out: expected whole 16-byte vectors, got 8 bytes"),
    (torch.zeros(64, 2)[:, 0], torch.zeros(32), ValueError, "inp: expected a contiguous tensor"),
    (torch.zeros(64), torch.zeros(32), ValueError, "inp: expected a CUDA tensor, got device cpu"),
    (_BUF64, _BUF64[32:], ValueError, "out: expected memory apart from inp, got 128 bytes in common"),
], ids=["int-input", "dtype-mismatch", "chunk-size", "vectors", "strided", "cpu", "out-in-inp"])
def test_reduce_scatter_arguments_are_checked_by_name(inp, out, error, message) -> None:
    with pytest.raises(error, match=re.escape(message)):
        validate_reduce_scatter_args(inp, out, 2)


@pytest.mark.parametrize("outs,inps,error,message", [
    ([], [], ValueError, "outs, inps: expected 1 to 4 pairs of tensors, got 0 and 0"),
    ([torch.zeros(8)] * 5, [torch.zeros(4)] * 5, ValueError, "outs, inps: expected 1 to 4 pairs of tensors, got 5"),
    ([torch.zeros(8)], [torch.zeros(4, dtype=torch.int32)], TypeError,
     "outs[0]: expected dtype torch.int32, got torch.float32"),
    ([torch.zeros(8), torch.zeros(6, dtype=torch.uint8)], [torch.zeros(4), torch.zeros(3, dtype=torch.uint8)],
     ValueError, "inps[1]: expected whole 4-byte words, got 3 bytes"),
    ([torch.zeros(6)], [torch.zeros(4)], ValueError, "outs[0]: expected 2 x inps[0]'s 4 elements, got 6"),
    ([torch.zeros(8)], [torch.zeros(4)], ValueError, "inps[0]: expected a CUDA tensor, got device cpu"),
    ([_BUF64[:8]], [_BUF64[4:8]], ValueError, "outs[0]: expected memory apart from inps[0], got 16 bytes in common"),
], ids=["none", "five", "dtype-mismatch", "words", "size", "cpu", "inp-in-out"])
def test_all_gather_arguments_are_checked_by_name(outs, inps, error, message) -> None:
    with pytest.raises(error, match=re.escape(message)):
        validate_all_gather_args(outs, inps, 2)


def test_all_reduce_needs_one_signal_block_per_rank() -> None:
    with pytest.raises(ValueError, match="signal_ptrs: expected 4 pointers, got 3"):
        SymmAllReduce(0, 4, [16, 32, 48], lambda t, name: [], timeout_s=1.0)


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("inf"), float("nan"), 2e10, True])
def test_all_reduce_rejects_a_timeout_that_is_not_finite_positive_seconds(timeout_s: float) -> None:
    # inf once wrapped to 0 ns in the kernels' 64-bit conversion: every wait timed out at once
    with pytest.raises(ValueError, match=re.escape(f"timeout_s: expected seconds in (0, 1e+09], got {timeout_s!r}")):
        SymmAllReduce(0, 2, [16, 32], lambda t, name: [], timeout_s=timeout_s)


def test_torch_backend_needs_a_cuda_device() -> None:
    with pytest.raises(ValueError, match="device: TorchSymmBackend needs a CUDA device, got cpu"):
        TorchSymmBackend(device="cpu")


@pytest.mark.parametrize("kind", ["torch", "ipc", "nvshmem"])
def test_a_gpu_symmetric_backend_needs_a_cuda_device(kind) -> None:
    with pytest.raises(ValueError, match=f"symm_backend: '{kind}' needs a CUDA device, got cpu"):
        make_backend(kind, torch.device("cpu"), 1 << 20)


def test_an_unknown_symmetric_backend_is_named() -> None:
    with pytest.raises(ValueError, match="symm_backend: expected 'cpu', 'torch', 'ipc', 'nvshmem' or 'auto', got "
                                         "'shmem'"):
        make_backend("shmem", torch.device("cpu"), 1 << 20)


def test_region_bytes_aligns_every_region_to_256_bytes() -> None:
    assert region_bytes([("a", (3,), torch.uint8), ("b", (1,), torch.float32)]) == 512
    assert region_bytes([("y", (64, 7168), torch.bfloat16)]) == 64 * 7168 * 2


def _buffer(act_mode: str = "nvfp4") -> SymmBuffer:
    return SymmBuffer(CpuBackend(local=True), 16, H, 6, torch.float32, act_mode)


def test_set_routing_rejects_ids_of_fewer_columns_than_topk() -> None:
    with pytest.raises(ValueError, match=r"topk_idx: expected shape \(T, 6\), got \(4, 1\)"):
        _buffer().set_routing(torch.zeros(4, 1, dtype=torch.int32), torch.ones(4, 1))


def test_set_routing_rejects_int64_ids() -> None:
    with pytest.raises(TypeError, match="topk_idx: expected dtype torch.int32, got torch.int64"):
        _buffer().set_routing(torch.zeros(4, 6, dtype=torch.int64), torch.ones(4, 6))


def test_set_routing_rejects_weights_for_another_number_of_tokens() -> None:
    with pytest.raises(ValueError, match=r"topk_weights: expected shape \(4, 6\), got \(5, 6\)"):
        _buffer().set_routing(torch.zeros(4, 6, dtype=torch.int32), torch.ones(5, 6))


def test_set_routing_leaves_the_buffer_untouched_when_the_weights_are_wrong() -> None:
    buf = _buffer()
    buf.topk_idx.fill_(-1)
    with pytest.raises(TypeError, match="topk_weights: expected dtype torch.float32, got torch.bfloat16"):
        buf.set_routing(torch.zeros(4, 6, dtype=torch.int32), torch.ones(4, 6, dtype=torch.bfloat16))
    assert bool((buf.topk_idx == -1).all())


def test_set_routing_over_capacity_names_the_ids() -> None:
    with pytest.raises(ValueError, match="topk_idx: 20 tokens exceed the symmetric buffer capacity max_tokens=16"):
        _buffer().set_routing(torch.zeros(20, 6, dtype=torch.int32), torch.ones(20, 6))


def test_stage_rejects_hidden_of_another_width() -> None:
    with pytest.raises(ValueError, match=rf"hidden: expected shape \(T, {H}\), got \(4, 1\)"):
        _buffer("bf16").stage(torch.randn(4, 1).to(torch.bfloat16))


def test_stage_in_bf16_mode_rejects_fp32_hidden() -> None:
    with pytest.raises(TypeError, match="hidden: expected dtype torch.bfloat16, got torch.float32"):
        _buffer("bf16").stage(torch.randn(4, H))


def test_stage_in_nvfp4_mode_rejects_integer_hidden() -> None:
    with pytest.raises(TypeError, match="hidden: expected a floating-point dtype, got torch.int32"):
        _buffer().stage(torch.zeros(4, H, dtype=torch.int32))


def test_all_reduce_settings_that_differ_between_ranks_are_named_with_both_values() -> None:
    gathered = [{"oneshot_max_bytes": 65536, "max_ctas": 0}, {"oneshot_max_bytes": 1024, "max_ctas": 0}]
    with pytest.raises(ValueError, match="oneshot_max_bytes: expected the same value on every rank, rank 1 has 1024, "
                                         "rank 0 has 65536"):
        check_same_values(gathered, rank=1)


def test_all_reduce_settings_equal_on_every_rank_pass() -> None:
    check_same_values([{"oneshot_max_bytes": 1024, "max_ctas": 8} for _ in range(4)], rank=2)  # equal, not the same


@pytest.mark.parametrize("view,n,message", [
    ("routing", 17, "num_tokens: 17 tokens exceed the symmetric buffer capacity max_tokens=16"),
    ("routing", -1, "num_tokens: expected a token count >= 0, got -1"),
    ("activations", 17, "num_tokens: 17 tokens exceed the symmetric buffer capacity max_tokens=16"),
    ("activations", -2, "num_tokens: expected a token count >= 0, got -2"),
])
def test_the_buffers_row_views_refuse_counts_outside_its_capacity(view, n, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(_buffer(), view)(n)


@pytest.mark.parametrize("timeout_s", [-1.0, float("inf"), float("nan")])
def test_a_host_barrier_refuses_a_timeout_that_is_not_finite_positive_seconds(timeout_s) -> None:
    with pytest.raises(ValueError, match=re.escape(f"timeout_s: expected seconds in (0, 1e+09], got {timeout_s!r}")):
        host_barrier(timeout_s)


@pytest.mark.parametrize("variable,value,read", [
    ("EP_SYMM_TIMEOUT_S", "ten", timeout_from_env), ("EP_SYMM_TIMEOUT_S", "-1", timeout_from_env),
    ("EP_ALLREDUCE_ONESHOT_MAX_BYTES", "64k", lambda: resolve_oneshot_max_bytes(2)),
    ("EP_ALLREDUCE_ONESHOT_MAX_BYTES", "-5", lambda: resolve_oneshot_max_bytes(2)),
    ("EP_ALLREDUCE_ONESHOT_MAX_BYTES", "\u00b2", lambda: resolve_oneshot_max_bytes(2)),  # a digit to str.isdigit
])
def test_a_malformed_environment_setting_is_named(monkeypatch, variable, value, read) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=rf"{variable}: expected .*, got '{value}'"):
        read()


def test_a_buffer_of_one_ranks_tokens_has_nothing_to_gather() -> None:
    with pytest.raises(ValueError, match=r"gather: this buffer holds one rank's tokens \(token_mode 'replicated'\)"):
        _buffer().gather(4)


def test_a_buffer_takes_every_ranks_tokens_or_its_own_only() -> None:
    with pytest.raises(ValueError, match="sources: expected 1 or the backend's world_size 1, got 4"):
        SymmBuffer(CpuBackend(local=True), 16, H, 6, torch.float32, sources=4)


def test_a_dp_buffer_gathers_world_size_times_the_rows_and_reduces_them_in_y() -> None:
    regions = {name: shape for name, shape, _ in SymmBuffer.layout(16, H, 6, torch.float32, "nvfp4", sources=4)}
    assert regions["x"] == (16, H // 2) and regions["x_gathered"] == (64, H // 2)
    assert regions["x_sf_gathered"] == (64, H // 64) and regions["topk_weights_gathered"] == (64, 6)
    assert regions["y"] == (64, H) and "x_global_gathered" not in regions


@pytest.mark.parametrize("timeout_s", [float("inf"), 2e10])
def test_the_kernels_refuse_a_timeout_past_their_range_too(timeout_s: float) -> None:
    # A direct caller of the extension: 64-bit nanoseconds would wrap (inf became 0 ns). Checked before any CUDA call.
    _C = pytest.importorskip("ep_runtime._C")
    with pytest.raises(ValueError, match=re.escape("allreduce: timeout_s must be in (0, 1e9] seconds")):
        _C.device_barrier([16], 0, timeout_s, 1, 0)


@pytest.mark.parametrize("error", [CommTimeoutError("rank 0: timed out", 0, [2], [1]),
                                   CommMismatchError("rank 1: asked for other sizes", 1, [0], [3], [3])])
def test_comm_errors_survive_pickling_and_copying_with_their_ranks(error) -> None:
    """They may cross process boundaries (multiprocessing pools, futures)."""
    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(again) is type(error) and str(again) == str(error) and isinstance(again, CommError)
        assert vars(again) == vars(error)


# ---- what the host reads from the kernels' status words (csrc/allreduce.cu Args::status) ----

class _Status:
    def __init__(self, words: list[int]):
        self.words = words

    def read(self) -> list[int]:
        return list(self.words)


def _report(rank: int, world: int, phase: int = 0, missing=(), disagreed=(), gave_up=(), timeout_s=None) -> CommError:
    """The error a communicator raises for these status words: [0] phase + 1, then 8 words (kMaxRanks) per group."""
    words = [0] * (1 + 3 * 8)
    words[0] = phase + 1
    for group, ranks in enumerate((missing, disagreed, gave_up)):
        for q in ranks:
            words[1 + 8 * group + q] = 1
    comm = SymmAllReduce.__new__(SymmAllReduce)  # no GPU: only what raise_if_failed reads
    comm.rank, comm.world_size, comm.timeout_s, comm.status = rank, world, 1.0, _Status(words)
    with pytest.raises(CommError) as e:
        comm.raise_if_failed(timeout_s)
    return e.value


def test_a_rank_that_timed_out_names_the_ranks_it_waited_for() -> None:
    e = _report(0, 2, missing=[1], gave_up=[0])
    assert type(e) is CommTimeoutError and (e.missing, e.gave_up) == ([1], [0])
    assert str(e) == ("rank 0: symmetric-memory waiting for peers' inputs timed out after 1s waiting for rank(s) [1] "
                      "of 2; every rank must call reset_signals() before the next collective")


def test_a_rank_that_left_on_seeing_a_peer_give_up_names_both() -> None:
    e = _report(1, 3, phase=4, missing=[2], gave_up=[0])
    assert str(e).startswith("rank 1: symmetric-memory reduce-scatter stopped waiting for rank(s) [2] of 3; rank(s) "
                             "[0] gave up waiting in a barrier (a timeout, in this call or an earlier one), after which "
                             "no P2P collective of any rank moves data")


def test_a_call_refused_after_this_ranks_own_timeout_says_so() -> None:
    e = _report(0, 2, phase=5, gave_up=[0])
    assert str(e).startswith("rank 0: symmetric-memory all-gather moved no data; this rank gave up waiting")
    assert e.missing == []


def test_a_mismatch_is_reported_as_one_even_beside_a_timeout() -> None:
    e = _report(0, 2, missing=[1], disagreed=[1], gave_up=[0])
    assert type(e) is CommMismatchError and (e.disagreed, e.missing, e.gave_up) == ([1], [1], [0])
    assert ", and rank(s) [1] of 2 did not come within 1s;" in str(e)


def test_a_barrier_with_its_own_timeout_reports_that_timeout() -> None:
    assert "timed out after 60s waiting for rank(s) [1] of 2" in str(_report(0, 2, 3, [1], gave_up=[0], timeout_s=60))
