"""Symmetric-memory all-reduce (csrc/allreduce.cu): exact, deterministic, graph-safe, and loud on a missing rank.

Two kinds of tests:
- multigpu: the real thing across the GPUs of one node, under torchrun, one process per GPU, every rank running
  the same tests in the same order:

      torchrun --nproc-per-node N -m pytest -m multigpu -q tests/gpu/test_allreduce.py

  (bench/run_gpu.sh runs this on 2 and 4 GPUs). No -x: a rank that stopped early would leave the others waiting in a
  collective. Every rank builds every rank's input from per-rank seeds, so each rank checks its result
  against the exact fp32 ascending-rank sum on its own; assertions come after the collectives.
- gpu: W emulated ranks in one process on one GPU (one buffer and one stream per rank, kernels running
  concurrently, the grid capped so that all ranks' CTAs are resident at once): the same kernels, barriers
  and timeouts, checkable on a single-GPU machine (`python -m pytest -m gpu tests/gpu/test_allreduce.py`).
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from ep_runtime.allreduce import CommTimeoutError, SymmAllReduce
from ep_runtime.dist_utils import CommMismatchError
from ep_runtime.ops import extension_available, launch
from ep_runtime.symm import region_bytes
from ep_runtime.symm_torch import TorchSymmBackend

_TORCHRUN = ("RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available()
             and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"]))


def multigpu(f):
    skip = pytest.mark.skipif(not _TORCHRUN, reason="needs torchrun with WORLD_SIZE > 1 and a GPU per rank")
    return pytest.mark.multigpu(skip(f))


def emulated(f):
    skip = pytest.mark.skipif(_TORCHRUN or not extension_available("all_reduce"),
                              reason="needs one GPU and the built extension")
    return pytest.mark.gpu(skip(f))


H = 7168
MAX_TOKENS = 8192
F32_TOKENS = 1024
TOKENS = [1, 2, 16, 127, 512, 2048, 8192]


@pytest.fixture(scope="module")
def backend() -> TorchSymmBackend:
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=device)
    cap = region_bytes([("bf16", (MAX_TOKENS, H), torch.bfloat16), ("f32", (F32_TOKENS, H), torch.float32)])
    be = TorchSymmBackend(device, capacity_bytes=cap, timeout_s=10.0)
    be.y = be.empty("y", (MAX_TOKENS, H), torch.bfloat16)
    be.y32 = be.empty("y32", (F32_TOKENS, H), torch.float32)
    # A fresh seed per session, chosen by rank 0 and shared: every rank must build the same inputs.
    seed = [torch.seed() % (2**31)]
    dist.broadcast_object_list(seed, src=0)
    be.seed = seed[0]
    print(f"rank {be.rank}: input seed {be.seed}")
    yield be
    dist.barrier()
    dist.destroy_process_group()


def _inputs(seed: int, world: int, t: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Every rank's input for one test case (rank q's from seed*97+q), generated identically on every rank."""
    out = []
    for q in range(world):
        g = torch.Generator(device=device).manual_seed((seed * 97 + q) % 2**63)
        out.append((torch.randn(t, H, generator=g, device=device) * (q + 1)).to(dtype))
    return out


def _ascending_sum(inputs: list[torch.Tensor]) -> torch.Tensor:
    acc = inputs[0].float()
    for x in inputs[1:]:
        acc = acc + x.float()
    return acc.to(inputs[0].dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _run(be: TorchSymmBackend, buf: torch.Tensor, seed: int, t: int, algo: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill rows [0, t) with this rank's input (rows past t poisoned), all-reduce them; return (result, rest)."""
    inputs = _inputs(seed, be.world_size, t, buf.dtype, be.device)
    buf.fill_(float("nan"))
    buf[:t].copy_(inputs[be.rank])
    be.all_reduce_(buf[:t], algo=algo, check=True)
    return buf[:t].clone(), _ascending_sum(inputs)


@multigpu
@pytest.mark.parametrize("algo", ["oneshot", "twoshot", "auto"])
@pytest.mark.parametrize("t", TOKENS)
def test_bf16_result_is_the_fp32_ascending_rank_sum_exactly(backend, algo: str, t: int) -> None:
    """Every rank checks against the same deterministic sum, so the ranks also get identical bits."""
    got, want = _run(backend, backend.y, seed=backend.seed + t, t=t, algo=algo)
    torch.cuda.synchronize()
    assert torch.equal(_bits(got), _bits(want))


@multigpu
@pytest.mark.parametrize("algo", ["oneshot", "twoshot"])
def test_rows_past_the_reduced_tokens_stay_untouched(backend, algo: str) -> None:
    _run(backend, backend.y, seed=backend.seed + 5, t=37, algo=algo)
    torch.cuda.synchronize()
    assert bool(backend.y[37:64].isnan().all())


@multigpu
@pytest.mark.parametrize("algo", ["oneshot", "twoshot"])
@pytest.mark.parametrize("t", [1, 64, 1024])
def test_fp32_result_is_the_fp32_ascending_rank_sum_exactly(backend, algo: str, t: int) -> None:
    got, want = _run(backend, backend.y32, seed=backend.seed + 1000 + t, t=t, algo=algo)
    torch.cuda.synchronize()
    assert torch.equal(_bits(got), _bits(want))


@multigpu
@pytest.mark.parametrize("t", [1, 512, 8192])
def test_agrees_with_nccl_all_reduce_up_to_bf16_rounding(backend, t: int) -> None:
    inputs = _inputs(backend.seed + 2000 + t, backend.world_size, t, torch.bfloat16, backend.device)
    backend.y[:t].copy_(inputs[backend.rank])
    backend.all_reduce_(backend.y[:t], check=True)
    ref = inputs[backend.rank].float()
    dist.all_reduce(ref)  # NCCL, fp32, its own summation order
    torch.cuda.synchronize()
    torch.testing.assert_close(backend.y[:t].float(), ref, rtol=2**-7, atol=1e-5)


@multigpu
@pytest.mark.parametrize("algo", ["oneshot", "twoshot"])
def test_cuda_graph_replay_gives_the_same_bits_as_eager(backend, algo: str) -> None:
    t = 300
    view = backend.y[:t]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        backend.all_reduce_(view, algo=algo)  # warm-up outside capture, as graph capture requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        backend.all_reduce_(view, algo=algo)
    results = []
    for replay in range(3):  # every rank replays the same number of times, on fresh inputs each time
        inputs = _inputs(backend.seed + 4000 + replay, backend.world_size, t, torch.bfloat16, backend.device)
        view.copy_(inputs[backend.rank])
        graph.replay()
        got_graph = view.clone()
        view.copy_(inputs[backend.rank])
        backend.all_reduce_(view, algo=algo, check=True)
        results.append((got_graph, view.clone(), _ascending_sum(inputs)))
    torch.cuda.synchronize()
    backend.comm.raise_if_failed()
    for got_graph, got_eager, want in results:
        assert torch.equal(_bits(got_graph), _bits(got_eager))
        assert torch.equal(_bits(got_graph), _bits(want))


@multigpu
def test_device_barrier_passes_when_every_rank_arrives(backend) -> None:
    backend.barrier(timeout_s=10.0)


@multigpu
def test_device_barrier_runs_on_the_arenas_device_whichever_device_is_current(backend) -> None:
    # It launched on the current device, whose kernel then read the arena's signal words from another GPU.
    other = (backend.device.index + 1) % torch.cuda.device_count()
    with torch.cuda.device(other):
        backend.barrier(timeout_s=10.0)


@multigpu
def test_a_one_shot_threshold_that_differs_between_ranks_is_refused_naming_both_values(backend) -> None:
    mine = 1024 * (backend.rank + 1)  # as if EP_ALLREDUCE_ONESHOT_MAX_BYTES differed between the ranks
    with pytest.raises(ValueError, match=rf"oneshot_max_bytes: expected the same value on every rank, "
                                         rf"rank {backend.rank} has {mine}, rank \d+ has \d+"):
        TorchSymmBackend(backend.device, capacity_bytes=1 << 20, oneshot_max_bytes=mine)


@multigpu
@pytest.mark.parametrize("algo", ["oneshot", "twoshot"])
def test_a_rank_that_skips_the_collective_is_named_within_the_timeout(backend, algo: str) -> None:
    absent = backend.world_size - 1
    timeout = 2.0
    backend.comm.timeout_s = timeout
    err, elapsed = None, 0.0
    try:
        if backend.rank != absent:
            backend.y[:16].normal_()
            start = time.monotonic()
            try:
                backend.all_reduce_(backend.y[:16], algo=algo, check=True)
            except CommTimeoutError as e:
                err = e
            elapsed = time.monotonic() - start
    finally:
        backend.comm.timeout_s = 10.0
        backend.reset_signals()  # every rank, including the absent one: epochs back in step
    # and the group works again afterwards
    got, want = _run(backend, backend.y, seed=backend.seed + 77, t=8, algo=algo)
    torch.cuda.synchronize()
    assert torch.equal(_bits(got), _bits(want))
    if backend.rank != absent:
        assert err is not None, "the all-reduce did not report the absent rank"
        assert err.missing == [absent] and f"rank(s) [{absent}]" in str(err) and f"rank {backend.rank}:" in str(err)
        assert elapsed < timeout + 5.0


class _EmulatedGroup:
    """`world` ranks in this process on one GPU: a zeroed arena (data + signal block) and a stream per rank."""

    def __init__(self, world: int, data_bytes: int, timeout_s: float = 10.0, max_ctas: int = 8):
        from ep_runtime import _C

        self.world = world
        self.arenas = [torch.zeros(data_bytes + _C.allreduce_signal_bytes(), dtype=torch.uint8, device="cuda")
                       for _ in range(world)]
        self.data_bytes = data_bytes
        sig = [a.data_ptr() + data_bytes for a in self.arenas]
        self.comms = [SymmAllReduce(r, world, sig, self._locator(r), timeout_s, oneshot_max_bytes=4096,
                                    max_ctas=max_ctas) for r in range(world)]
        self.streams = [torch.cuda.Stream() for _ in range(world)]

    def _locator(self, rank: int):
        def locate(t: torch.Tensor, name: str) -> list[int]:
            offset = t.data_ptr() - self.arenas[rank].data_ptr()
            return [a.data_ptr() + offset for a in self.arenas]
        return locate

    def reset(self) -> None:
        """What reset_signals() does on every rank: zeroed signal blocks and status words."""
        torch.cuda.synchronize()
        for arena, comm in zip(self.arenas, self.comms):
            arena[self.data_bytes:].zero_()
            comm.status.clear()
        torch.cuda.synchronize()

    def buf(self, rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        return self.arenas[rank][:self.data_bytes].view(dtype)[:n]

    def all_reduce(self, inputs: list[torch.Tensor], algo: str, ranks: list[int] | None = None) -> list[torch.Tensor]:
        bufs = [self.buf(r, x.numel(), x.dtype) for r, x in enumerate(inputs)]
        for b, x in zip(bufs, inputs):
            b.copy_(x)
        torch.cuda.synchronize()
        for r in (ranks if ranks is not None else range(self.world)):
            with torch.cuda.stream(self.streams[r]):
                self.comms[r](bufs[r], algo=algo)
        torch.cuda.synchronize()
        return bufs


def _emulated_inputs(world: int, n: int, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    return [(torch.randn(n, generator=g, device="cuda") * (q + 1)).to(dtype) for q in range(world)]


@emulated
@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("algo", ["oneshot", "twoshot", "auto"])
@pytest.mark.parametrize("n", [8, 8 * 1001, 7168, 3 * 7168, 64 * 7168])  # 64 x 7168: one-shot in 4 rounds
def test_emulated_ranks_get_the_exact_ascending_rank_sum(world: int, algo: str, n: int, gen: torch.Generator) -> None:
    group = _EmulatedGroup(world, 64 * 7168 * 2)
    inputs = _emulated_inputs(world, n, torch.bfloat16, gen)
    outs = group.all_reduce(inputs, algo)
    want = _ascending_sum(inputs)
    for r, out in enumerate(outs):
        group.comms[r].raise_if_failed()
        assert torch.equal(_bits(out), _bits(want)), f"rank {r} differs"


@emulated
@pytest.mark.parametrize("algo", ["oneshot", "twoshot"])
def test_emulated_fp32_variant_is_the_exact_ascending_rank_sum(algo: str, gen: torch.Generator) -> None:
    group = _EmulatedGroup(4, 1 << 20)
    inputs = _emulated_inputs(4, 4 * 10007, torch.float32, gen)
    outs = group.all_reduce(inputs, algo)
    want = _ascending_sum(inputs)
    assert all(torch.equal(_bits(o), _bits(want)) for o in outs)


@emulated
@pytest.mark.parametrize("algo", ["oneshot", "twoshot"])
def test_emulated_repeated_calls_keep_the_epochs_in_step(algo: str, gen: torch.Generator) -> None:
    group = _EmulatedGroup(4, 1 << 20)
    for call in range(5):
        inputs = _emulated_inputs(4, 7168 * (call + 1), torch.bfloat16, gen)
        outs = group.all_reduce(inputs, algo)
        want = _ascending_sum(inputs)
        assert all(torch.equal(_bits(o), _bits(want)) for o in outs), f"call {call}"


@emulated
@pytest.mark.parametrize("algo", ["oneshot", "twoshot"])
def test_emulated_graph_replay_gives_the_exact_sum(algo: str, gen: torch.Generator) -> None:
    world, n = 4, 5 * 7168
    group = _EmulatedGroup(world, 1 << 20)
    bufs = [group.buf(r, n, torch.bfloat16) for r in range(world)]
    graphs = [torch.cuda.CUDAGraph() for _ in range(world)]
    for r in range(world):
        with torch.cuda.graph(graphs[r], stream=group.streams[r]):
            group.comms[r](bufs[r], algo=algo)
    for replay in range(3):
        inputs = _emulated_inputs(world, n, torch.bfloat16, gen)
        for b, x in zip(bufs, inputs):
            b.copy_(x)
        torch.cuda.synchronize()
        for r in range(world):
            with torch.cuda.stream(group.streams[r]):
                graphs[r].replay()
        torch.cuda.synchronize()
        want = _ascending_sum(inputs)
        assert all(torch.equal(_bits(b), _bits(want)) for b in bufs), f"replay {replay}"


@emulated
@pytest.mark.parametrize("algo", ["oneshot", "twoshot"])
def test_emulated_absent_rank_is_named_by_every_other_rank(algo: str, gen: torch.Generator) -> None:
    world = 4
    group = _EmulatedGroup(world, 1 << 20, timeout_s=1.0)
    inputs = _emulated_inputs(world, 7168, torch.bfloat16, gen)
    start = time.monotonic()
    group.all_reduce(inputs, algo, ranks=[0, 1, 2])
    elapsed = time.monotonic() - start
    _assert_every_present_rank_names_the_absent_one(group, present=[0, 1, 2], absent=3,
                                                    phase="waiting for peers' inputs")
    assert elapsed < 6.0


def _assert_every_present_rank_names_the_absent_one(group, present: list[int], absent: int, phase: str) -> None:
    """The first rank to time out gives up and marks itself; the others may leave on seeing that, before their own
    timeouts: every rank names the absent one, and one at least timed out."""
    errors = []
    for r in present:
        with pytest.raises(CommTimeoutError, match=rf"rank {r}: symmetric-memory {phase} .*waiting for rank\(s\) "
                                                   rf"\[{absent}\] of {group.world}") as e:
            group.comms[r].raise_if_failed()
        assert e.value.missing == [absent] and e.value.gave_up and set(e.value.gave_up) <= set(present)
        errors.append(str(e.value))
    assert any("timed out after 1s waiting" in m for m in errors), errors


def _on_every_rank(group: _EmulatedGroup, call, ranks: list[int] | None = None) -> None:
    """call(rank) on each emulated rank's stream, all of them in flight together."""
    torch.cuda.synchronize()
    for r in (ranks if ranks is not None else range(group.world)):
        with torch.cuda.stream(group.streams[r]):
            call(r)
    torch.cuda.synchronize()


@emulated
@pytest.mark.parametrize("world", [1, 2, 3, 8])  # one rank alone copies its chunk
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulated_reduce_scatter_gives_each_rank_the_exact_ascending_sum_of_its_chunk(world, dtype, gen) -> None:
    rows = 37
    group = _EmulatedGroup(world, world * rows * 1024 * 4)
    inputs = _emulated_inputs(world, world * rows * 1024, dtype, gen)
    bufs = [group.buf(r, x.numel(), dtype) for r, x in enumerate(inputs)]
    for b, x in zip(bufs, inputs):
        b.copy_(x)
    outs = [torch.full((rows * 1024,), float("nan"), dtype=dtype, device="cuda") for _ in range(world)]
    _on_every_rank(group, lambda r: group.comms[r].reduce_scatter(bufs[r], outs[r]))
    want = _ascending_sum(inputs).view(world, -1)
    for r in range(world):
        group.comms[r].raise_if_failed()
        assert torch.equal(_bits(outs[r]), _bits(want[r])), f"rank {r} differs"
        assert torch.equal(bufs[r], inputs[r])  # its input is left as it was


@emulated
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("tokens", [1, 6, 33])
def test_emulated_all_gather_puts_every_ranks_rows_in_rank_order_in_one_call(world, tokens, gen) -> None:
    """The regions of token_mode 'dp': packed FP4 rows, their scale words, topk ids and weights (24-byte rows, so
    chunks of odd token counts are not whole 16-byte vectors)."""
    shapes = [((tokens, 3584), torch.uint8), ((tokens, 112), torch.int32), ((tokens, 6), torch.int32),
              ((tokens, 6), torch.float32)]
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(2**62, (1,), generator=gen)))

    def random_rows(shape, dtype):  # random bytes: the copy must carry every bit pattern
        width = shape[1] * torch.empty((), dtype=dtype).element_size()
        return torch.randint(0, 256, (shape[0], width), generator=g, device="cuda", dtype=torch.uint8).view(dtype)

    inps = [[random_rows(shape, dtype) for shape, dtype in shapes] for _ in range(world)]
    group = _EmulatedGroup(world, 4 << 20)
    outs = []
    for r in range(world):
        arena, views, used = group.buf(r, 4 << 20, torch.uint8), [], 0
        for (shape, dtype) in shapes:  # carved at 256-byte boundaries, as the symmetric buffer's regions are
            nbytes = world * shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
            views.append(arena[used:used + nbytes].view(dtype).view(world * shape[0], shape[1]).fill_(0x5A))
            used = (used + nbytes + 255) // 256 * 256
        outs.append(views)
    _on_every_rank(group, lambda r: group.comms[r].all_gather(outs[r], inps[r]))
    for r in range(world):
        group.comms[r].raise_if_failed()
        for i in range(len(shapes)):
            want = torch.cat([inps[q][i] for q in range(world)])
            assert torch.equal(outs[r][i].view(torch.uint8), want.view(torch.uint8)), f"rank {r}, region {i}"


@emulated
@pytest.mark.parametrize("op", ["reduce_scatter", "all_gather"])
def test_emulated_absent_rank_is_named_by_the_token_mode_collectives(op: str, gen: torch.Generator) -> None:
    world = 3
    group = _EmulatedGroup(world, 1 << 20, timeout_s=1.0)
    bufs = [group.buf(r, world * 1024, torch.bfloat16) for r in range(world)]
    mine = [torch.zeros(1024, dtype=torch.bfloat16, device="cuda") for _ in range(world)]
    if op == "reduce_scatter":
        def call(r): group.comms[r].reduce_scatter(bufs[r], mine[r])
    else:
        def call(r): group.comms[r].all_gather([bufs[r]], [mine[r]])
    start = time.monotonic()
    _on_every_rank(group, call, ranks=[0, 1])
    elapsed = time.monotonic() - start
    _assert_every_present_rank_names_the_absent_one(group, present=[0, 1], absent=2, phase=op.replace("_", "-"))
    assert elapsed < 6.0


# ---- the latch: after a rank gives up, no P2P collective of any rank moves data until the reset ----

@emulated
@pytest.mark.parametrize("algo", ["oneshot", "twoshot"])
def test_emulated_rank_later_than_a_timeout_is_refused_instead_of_pairing_with_the_next_call(algo, gen) -> None:
    """Rank 0 gives up on rank 1 while its next call is already queued (as an asynchronous step queues it); rank 1
    comes only then. Without the latch, rank 0's next call reused the epochs of the one that timed out, so it and rank
    1's late call passed each other's barriers and summed rank 0's next input into rank 1's result, with no error on
    rank 1."""
    group = _EmulatedGroup(2, 1 << 20, timeout_s=1.0)
    n = 16 * 7168
    first, following = _emulated_inputs(2, n, torch.bfloat16, gen), _emulated_inputs(2, n, torch.bfloat16, gen)
    bufs = [group.buf(r, n, torch.bfloat16).copy_(first[r]) for r in range(2)]
    torch.cuda.synchronize()
    with torch.cuda.stream(group.streams[0]):
        group.comms[0](bufs[0], algo=algo)
        timed_out = torch.cuda.Event()
        timed_out.record()
        bufs[0].copy_(following[0])
        group.comms[0](bufs[0], algo=algo)
    timed_out.synchronize()
    with torch.cuda.stream(group.streams[1]):
        group.comms[1](bufs[1], algo=algo)
    torch.cuda.synchronize()
    assert torch.equal(bufs[1], first[1]) and torch.equal(bufs[0], following[0])
    with pytest.raises(CommTimeoutError, match=r"rank 1: .* moved no data; rank\(s\) \[0\] gave up waiting") as e:
        group.comms[1].raise_if_failed()
    assert e.value.gave_up == [0] and e.value.missing == []
    with pytest.raises(CommTimeoutError, match=r"rank 0: .* timed out after 1s waiting for rank\(s\) \[1\] of 2"):
        group.comms[0].raise_if_failed()


@emulated
def test_emulated_ranks_still_waiting_leave_when_another_rank_gives_up(gen: torch.Generator) -> None:
    """Rank 2 never comes; rank 0 gives up after 1 s, and rank 1, whose own timeout is 60 s, leaves on seeing that."""
    group = _EmulatedGroup(3, 1 << 20, timeout_s=60.0)
    group.comms[0].timeout_s = 1.0
    start = time.monotonic()
    group.all_reduce(_emulated_inputs(3, 7168, torch.bfloat16, gen), "twoshot", ranks=[0, 1])
    assert time.monotonic() - start < 10.0
    with pytest.raises(CommTimeoutError, match=r"rank 1: .* stopped waiting for rank\(s\) \[2\] of 3; rank\(s\) "
                                               r"\[0\] gave up waiting") as e:
        group.comms[1].raise_if_failed()
    assert e.value.missing == [2] and e.value.gave_up == [0]


@emulated
@pytest.mark.parametrize("op", ["oneshot", "twoshot", "reduce_scatter", "all_gather", "barrier"])
def test_emulated_after_a_timeout_every_collective_moves_nothing_until_the_reset(op: str, gen) -> None:
    group = _EmulatedGroup(2, 1 << 20, timeout_s=1.0)
    group.all_reduce(_emulated_inputs(2, 7168, torch.bfloat16, gen), "oneshot", ranks=[0])  # rank 0 gives up on 1
    for c in group.comms:
        c.status.clear()  # reports read; the signal blocks left as they are
    n = 8 * 7168
    bufs = [group.buf(r, n, torch.bfloat16).copy_(x) for r, x in enumerate(_emulated_inputs(2, n, torch.bfloat16, gen))]
    outs = [torch.full((n // 2,), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    before = [b.clone() for b in bufs]
    calls = {"oneshot": lambda r: group.comms[r](bufs[r], algo="oneshot"),
             "twoshot": lambda r: group.comms[r](bufs[r], algo="twoshot"),
             "reduce_scatter": lambda r: group.comms[r].reduce_scatter(bufs[r], outs[r]),
             "all_gather": lambda r: group.comms[r].all_gather([bufs[r]], [outs[r]]),
             "barrier": lambda r: _device_barrier_alone(group, r)}
    start = time.monotonic()
    _on_every_rank(group, calls[op])
    assert time.monotonic() - start < 1.0  # refused at once, not after a timeout
    for r, who in enumerate(["this rank", r"rank\(s\) \[0\]"]):
        assert torch.equal(bufs[r], before[r]) and bool(outs[r].isnan().all())
        with pytest.raises(CommTimeoutError, match=rf"rank {r}: .* moved no data; {who} gave up") as e:
            group.comms[r].raise_if_failed()
        assert e.value.gave_up == [0]
    group.reset()
    inputs = _emulated_inputs(2, n, torch.bfloat16, gen)
    got = group.all_reduce(inputs, "twoshot")
    for r in range(2):
        group.comms[r].raise_if_failed()
        assert torch.equal(_bits(got[r]), _bits(_ascending_sum(inputs))), f"rank {r} after the reset"


def _device_barrier_alone(group: _EmulatedGroup, rank: int) -> None:
    """The device barrier without the host sync SymmAllReduce.barrier adds (the ranks share this thread)."""
    c = group.comms[rank]
    launch("device_barrier", torch.device("cuda", torch.cuda.current_device()), c.signal_ptrs, rank, c.timeout_s,
           c.status.device_ptr)


# ---- ranks asked for different things: nothing moves, every rank names the others ----
# Sizes large enough that every rank's grid is the cap (8 CTAs), so that the ranks' CTAs pair up and agree on nothing
# but the tags; with grids of other sizes the extra CTAs would also time out waiting for their missing partners.

def _different_sizes(op: str, group: _EmulatedGroup, gen: torch.Generator) -> tuple:
    """Rank 1 is asked for more than rank 0 (all-reduces of one and three one-shot rounds, 64 more elements in the
    reduce-scatter, a token row more in the all-gather): (call, data, want), data being the tensors that must come out
    untouched and want their contents before the call."""
    world = group.world
    if op in ("oneshot", "twoshot"):
        inputs = [_emulated_inputs(world, 16 * 7168 * (1 + 2 * r), torch.bfloat16, gen)[r] for r in range(world)]
        bufs = [group.buf(r, x.numel(), x.dtype).copy_(x) for r, x in enumerate(inputs)]
        return (lambda r: group.comms[r](bufs[r], algo=op)), bufs, [x.clone() for x in inputs]
    if op == "reduce_scatter":
        chunks = [8 * 7168 + 64 * r for r in range(world)]
        bufs = [group.buf(r, world * c, torch.bfloat16).copy_(_emulated_inputs(world, world * c, torch.bfloat16,
                                                                                gen)[r]) for r, c in enumerate(chunks)]
        outs = [torch.full((c,), float("nan"), dtype=torch.bfloat16, device="cuda") for c in chunks]
        data = bufs + outs
        return (lambda r: group.comms[r].reduce_scatter(bufs[r], outs[r])), data, [t.clone() for t in data]
    rows = [33 + r for r in range(world)]
    inps = [torch.randint(0, 256, (n, 3584), dtype=torch.uint8, device="cuda") for n in rows]
    outs = [group.buf(r, world * n * 3584, torch.uint8).view(world * n, 3584).fill_(0x5A) for r, n in enumerate(rows)]
    return (lambda r: group.comms[r].all_gather([outs[r]], [inps[r]])), outs, [t.clone() for t in outs]


@emulated
@pytest.mark.parametrize("op", ["oneshot", "twoshot", "reduce_scatter", "all_gather"])
def test_emulated_ranks_asked_for_other_sizes_move_nothing_and_name_each_other(op: str, gen: torch.Generator) -> None:
    group = _EmulatedGroup(2, 4 << 20, timeout_s=5.0)
    call, data, want = _different_sizes(op, group, gen)
    start = time.monotonic()
    _on_every_rank(group, call)
    assert time.monotonic() - start < 5.0  # no rank waited for a missing CTA
    for r in range(2):
        with pytest.raises(CommMismatchError, match=rf"rank {r}: symmetric-memory .*: rank\(s\) \[{1 - r}\] of 2 "
                                                    r"were asked for another collective, or for other sizes .* moved "
                                                    r"no data"):
            group.comms[r].raise_if_failed()
    for t, before in zip(data, want):
        assert torch.equal(t.view(torch.uint8), before.view(torch.uint8))


def _sound_all_reduce_after_reading_the_reports(group: _EmulatedGroup, gen: torch.Generator) -> None:
    """Every rank's report read and its status words cleared (the signals left as they are): a sound call must then
    give the exact sum, which it does only if every rank took the same barriers in the call that failed."""
    for c in group.comms:
        with pytest.raises(CommMismatchError):
            c.raise_if_failed()
        c.status.clear()
    inputs = _emulated_inputs(group.world, 16 * 7168, torch.bfloat16, gen)
    outs = group.all_reduce(inputs, "twoshot")
    for r, out in enumerate(outs):
        group.comms[r].raise_if_failed()
        assert torch.equal(_bits(out), _bits(_ascending_sum(inputs))), f"rank {r} differs"


@emulated
def test_emulated_ranks_running_different_collectives_at_once_name_each_other(gen: torch.Generator) -> None:
    group = _EmulatedGroup(2, 4 << 20, timeout_s=5.0)
    buf0 = group.buf(0, 16 * 7168, torch.bfloat16).copy_(_emulated_inputs(1, 16 * 7168, torch.bfloat16, gen)[0])
    buf1 = group.buf(1, 16 * 7168, torch.bfloat16).copy_(_emulated_inputs(1, 16 * 7168, torch.bfloat16, gen)[0])
    out1 = torch.full((8 * 7168,), float("nan"), dtype=torch.bfloat16, device="cuda")
    before = [buf0.clone(), buf1.clone()]
    _on_every_rank(group, lambda r: group.comms[0](buf0, algo="twoshot") if r == 0 else
                   group.comms[1].reduce_scatter(buf1, out1))
    with pytest.raises(CommMismatchError, match=r"rank 0: symmetric-memory all-reduce: rank\(s\) \[1\]"):
        group.comms[0].raise_if_failed()
    with pytest.raises(CommMismatchError, match=r"rank 1: symmetric-memory reduce-scatter: rank\(s\) \[0\]"):
        group.comms[1].raise_if_failed()
    assert torch.equal(buf0, before[0]) and torch.equal(buf1, before[1]) and torch.isnan(out1).all()


@emulated
def test_emulated_ranks_on_other_tensors_of_the_same_size_name_each_other(gen: torch.Generator) -> None:
    """Peers address a tensor at this rank's offset in their arenas: the offsets must agree as well as the sizes."""
    group = _EmulatedGroup(2, 4 << 20, timeout_s=5.0)
    n = 16 * 7168
    bufs = [group.arenas[r][2048 * r:2048 * r + 2 * n].view(torch.bfloat16) for r in range(2)]
    for b, x in zip(bufs, _emulated_inputs(2, n, torch.bfloat16, gen)):
        b.copy_(x)
    before = [b.clone() for b in bufs]
    _on_every_rank(group, lambda r: group.comms[r](bufs[r], algo="twoshot"))
    for r in range(2):
        with pytest.raises(CommMismatchError, match=rf"rank {r}: symmetric-memory all-reduce: rank\(s\) \[{1 - r}\]"):
            group.comms[r].raise_if_failed()
        assert torch.equal(bufs[r], before[r])


@emulated
def test_emulated_ranks_that_disagreed_across_kernels_stay_in_step_for_the_next_call(gen: torch.Generator) -> None:
    """A one-shot of three rounds (a barrier each when sound) against a two-shot and against a reduce-scatter: every
    kernel takes the same two barriers after disagreeing."""
    n = 40 * 7168  # 35840 vectors: three one-shot rounds of 8 CTAs x 512 threads x 4 vectors
    for other in ("twoshot", "reduce_scatter"):
        group = _EmulatedGroup(2, 4 << 20, timeout_s=5.0)
        bufs = [group.buf(r, n, torch.bfloat16) for r in range(2)]
        out1 = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda")
        _on_every_rank(group, lambda r: group.comms[0](bufs[0], algo="oneshot") if r == 0 else
                       group.comms[1](bufs[1], algo="twoshot") if other == "twoshot" else
                       group.comms[1].reduce_scatter(bufs[1], out1))
        _sound_all_reduce_after_reading_the_reports(group, gen)


@emulated
@pytest.mark.parametrize("op", ["oneshot", "twoshot", "reduce_scatter", "all_gather"])
def test_emulated_ranks_that_disagreed_on_sizes_stay_in_step_for_the_next_call(op: str, gen: torch.Generator) -> None:
    group = _EmulatedGroup(2, 4 << 20, timeout_s=5.0)
    _on_every_rank(group, _different_sizes(op, group, gen)[0])
    _sound_all_reduce_after_reading_the_reports(group, gen)
