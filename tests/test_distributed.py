"""Expert parallelism on CPU ranks (gloo): the EP output equals the single-process reference; host barriers and
collectives fail within their timeout, naming the rank."""
import contextlib
import datetime
import re
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from ep_runtime.checkpoint import synthetic_layer, write_synthetic_checkpoint
from ep_runtime.config import load_config
from ep_runtime.dist_utils import fallback_device, init_process_group, share_rows, spawn_local
from ep_runtime.moe import EPMoE
from ep_runtime.symm import CpuBackend, SymmBuffer, make_backend

V3_STYLE = ["scoring_func=sigmoid", "num_hash_layers=0", "n_group=4", "topk_group=2", "swiglu_limit=null"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt"), load_config("tiny").model, num_layers=2,
                                      shards=8)


def _inputs(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(cfg.runtime.tokens, cfg.model.hidden_size, generator=g)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.runtime.tokens,), generator=g)
    return hidden, ids


def _rank_layer(rank, world, ckpt, overrides):
    """This CPU rank's layer of the checkpoint, its process group joined."""
    cfg = load_config("tiny", [f"world_size={world}", *overrides])
    init_process_group(torch.device("cpu"), 60)
    return cfg, EPMoE.from_checkpoint(ckpt, cfg, cfg.runtime.layer, rank, world)


def _ep_worker(rank, world, ckpt, overrides, seed, out_dir):
    cfg, moe = _rank_layer(rank, world, ckpt, overrides)
    hidden, ids = _inputs(cfg, seed)
    out = moe(hidden, ids)
    torch.save(out, f"{out_dir}/out{rank}.pt")


def _single_process(ckpt, overrides, seed):
    cfg = load_config("tiny", ["world_size=1", *overrides])
    moe = EPMoE.from_checkpoint(ckpt, cfg, cfg.runtime.layer, 0, 1)
    return moe(*_inputs(cfg, seed))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("world", [2, 4, 8])  # world=1 would compare the reference with itself
def test_ep_output_equals_the_single_process_reference(ckpt, tmp_path, world):
    seed = int(torch.seed() % 2**31)
    overrides = ["tokens=48", "layer=1"]
    spawn_local(_ep_worker, world, str(ckpt), overrides, seed, str(tmp_path))
    ref = _single_process(ckpt, overrides, seed)
    outs = [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]
    for out in outs:
        assert torch.equal(out, outs[0])  # every rank holds the same all-reduced result
    assert _rel(outs[0], ref) <= 1e-5


def _two_forwards_worker(rank, world, ckpt, out_dir):
    cfg, moe = _rank_layer(rank, world, ckpt, ["layer=1"])
    first = moe(*_inputs(cfg, 1))
    kept = first.clone()
    moe(*_inputs(cfg, 2))
    torch.save(torch.equal(first, kept), f"{out_dir}/kept{rank}.pt")


def test_every_ranks_output_outlives_the_next_forward_through_the_all_reduce_buffer(ckpt, tmp_path):
    spawn_local(_two_forwards_worker, 2, str(ckpt), str(tmp_path))
    assert all(torch.load(tmp_path / f"kept{r}.pt") for r in range(2))


def _no_tokens_worker(rank, world, ckpt, out_dir):
    cfg, moe = _rank_layer(rank, world, ckpt, ["layer=1"])
    empty = moe(torch.zeros(0, cfg.model.hidden_size), torch.zeros(0, dtype=torch.long))
    torch.save((tuple(empty.shape), moe(*_inputs(cfg, 3))), f"{out_dir}/after{rank}.pt")


def test_ranks_run_a_forward_of_no_tokens_together_and_go_on(ckpt, tmp_path):
    spawn_local(_no_tokens_worker, 2, str(ckpt), str(tmp_path))
    (shape0, out0), (shape1, out1) = (torch.load(tmp_path / f"after{r}.pt") for r in range(2))
    assert shape0 == shape1 == (0, load_config("tiny").model.hidden_size)
    assert torch.equal(out0, out1) and out0.abs().sum() > 0


# W4A16 keeps h in bf16: each rank runs the shared expert on its quarter of the tokens, a matmul of another
# shape whose fp32 sums may round differently, and an element of h may then land one bf16 ulp (2^-8) away,
# moving the output by ~1e-5 of its norm (seen: 3.0e-5). A wrong layout is off by far more.
@pytest.mark.parametrize("overrides,tol", [
    (["layer=0"], 1e-5),  # hash-routed layer (tid2eid)
    (["layer=1", "act_mode=bf16", "act_scale=static"], 1e-4),  # W4A16 with checkpoint scales
    (["layer=1", "act_scale=static", *V3_STYLE], 1e-5),  # V3 routing, no clamp
], ids=["hash-layer", "w4a16-static", "v3-routing"])
def test_ep_modes_on_four_ranks_equal_the_reference(ckpt, tmp_path, overrides, tol):
    seed = int(torch.seed() % 2**31)
    overrides = ["tokens=32", *overrides]
    spawn_local(_ep_worker, 4, str(ckpt), overrides, seed, str(tmp_path))
    assert _rel(torch.load(tmp_path / "out0.pt"), _single_process(ckpt, overrides, seed)) <= tol


def _write(out_dir, rank, call):
    """Run call() on this rank; record how long it took and what it raised."""
    start = time.monotonic()
    try:
        call()
        msg = "no error"
    except (TimeoutError, RuntimeError, TypeError, ValueError) as e:
        msg = str(e)
    (Path(out_dir) / f"rank{rank}.txt").write_text(f"{time.monotonic() - start:.1f}\n{msg}")


def _read(out_dir, rank):
    elapsed, msg = (Path(out_dir) / f"rank{rank}.txt").read_text().split("\n", 1)
    return float(elapsed), msg


def _barrier_worker(rank, world, absent, out_dir):
    init_process_group(torch.device("cpu"), 60)
    backend = CpuBackend()
    if rank == absent:
        time.sleep(5)  # alive, but never reaches the barrier in time
        return
    _write(out_dir, rank, lambda: backend.barrier(timeout_s=1))


@pytest.mark.parametrize("absent", [0, 1])
def test_every_rank_at_the_barrier_fails_within_the_timeout_naming_the_absent_rank(tmp_path, absent):
    spawn_local(_barrier_worker, 3, absent, str(tmp_path))
    for rank in {0, 1, 2} - {absent}:
        elapsed, msg = _read(tmp_path, rank)
        assert elapsed < 1 + 2
        assert msg == f"rank {rank}: barrier over 3 ranks timed out after 1s waiting for rank(s) [{absent}]"


def _store_host_gone_worker(rank, world, out_dir):
    init_process_group(torch.device("cpu"), 60)
    if rank == 0:  # hosts the group's store (spawn_local's rendezvous), and ends
        return
    time.sleep(2)
    _write(out_dir, rank, lambda: CpuBackend().barrier(timeout_s=30))


def test_a_barrier_whose_store_host_has_ended_fails_at_once_naming_the_rank(tmp_path):
    spawn_local(_store_host_gone_worker, 3, str(tmp_path))
    for rank in (1, 2):
        elapsed, msg = _read(tmp_path, rank)
        assert elapsed < 10
        assert msg.startswith(f"rank {rank}: barrier over 3 ranks lost the group's store"), msg


def _other_dtype_worker(rank, world, out_dir):
    init_process_group(torch.device("cpu"), 60)
    dtype = torch.bfloat16 if rank == 1 else torch.float32  # as if rank 1 were configured with runtime.dtype bfloat16
    _write(out_dir, rank, lambda: SymmBuffer(CpuBackend(), 4, 128, 2, dtype))


def test_ranks_whose_buffers_differ_fail_naming_the_region_instead_of_aborting(tmp_path):
    spawn_local(_other_dtype_worker, 2, str(tmp_path))
    for rank in range(2):
        ours, theirs = ("torch.float32", "torch.bfloat16")[::1 if rank == 0 else -1]
        assert _read(tmp_path, rank)[1] == (f"region: expected the same value on every rank, rank {rank} has ('y', "
                                            f"(4, 128), '{ours}'), rank {1 - rank} has ('y', (4, 128), '{theirs}')")


def _gather_worker(rank, world, out_dir):
    init_process_group(torch.device("cpu"), 60)
    buffer = SymmBuffer(CpuBackend(), 4, 128, 2, torch.float32, "bf16", sources=world)
    _write(out_dir, rank, lambda: buffer.gather(5))


def test_a_gather_of_more_tokens_than_a_rank_stages_is_refused(tmp_path):
    spawn_local(_gather_worker, 2, str(tmp_path))
    for rank in range(2):
        assert _read(tmp_path, rank)[1] == "num_tokens: 5 tokens exceed the symmetric buffer capacity max_tokens=4"


def _cuda_cpu_backend_worker(rank, world, out_dir):
    init_process_group(torch.device("cpu"), 60)
    backend = make_backend("cpu", torch.device("cuda", rank), 0)  # plain tensors summed by NCCL on GPUs
    # An NCCL group's collectives need CUDA tensors and a stream: the barrier must wait through the store alone.
    no_collectives = [mock.patch.object(dist, name, side_effect=AssertionError(f"the barrier called dist.{name}"))
                      for name in ("barrier", "all_reduce", "all_gather", "all_gather_object", "broadcast")]
    with contextlib.ExitStack() as stack:
        for patch in no_collectives:
            stack.enter_context(patch)
        _write(out_dir, rank, lambda: [backend.barrier(timeout_s=10) for _ in range(3)])


def test_cpu_backend_barrier_works_on_an_nccl_process_group(tmp_path):
    spawn_local(_cuda_cpu_backend_worker, 2, str(tmp_path))
    assert [_read(tmp_path, rank)[1] for rank in range(2)] == ["no error"] * 2


def _all_reduce_worker(rank, world, out_dir):
    init_process_group(torch.device("cpu"), 60)
    group = dist.new_group(timeout=datetime.timedelta(seconds=1))
    if rank == 1:
        time.sleep(4)  # never joins the all-reduce
        return
    _write(out_dir, rank, lambda: CpuBackend(group).all_reduce_(torch.ones(8)))


def test_an_all_reduce_without_its_peer_fails_naming_this_rank(tmp_path):
    spawn_local(_all_reduce_worker, 2, str(tmp_path))
    elapsed, msg = _read(tmp_path, 0)
    assert elapsed < 1 + 2
    assert re.match(r"rank 0: sum all-reduce over 2 ranks failed after \d+\.\ds: .*Timed out", msg, re.S)


# token_mode 'dp': each rank stages and routes its own tokens; the ranks all-gather them, and each rank gets its own
# tokens' rows back by a reduce-scatter of the partial outputs.
DP = ["token_mode=dp", "act_scale=static"]


def _dp_worker(rank, world, ckpt, overrides, seed, out_dir):
    cfg, moe = _rank_layer(rank, world, ckpt, overrides)
    out = moe(*_inputs(cfg, seed + rank))  # every rank its own tokens
    torch.save(out, f"{out_dir}/out{rank}.pt")


def _dp_reference(ckpt, overrides, seed, world):
    """One process holding every expert, over all ranks' tokens in rank order."""
    cfg = load_config("tiny", ["world_size=1", *overrides])
    parts = [_inputs(cfg, seed + r) for r in range(world)]
    hidden, ids = (torch.cat([p[i] for p in parts]) for i in range(2))
    moe = EPMoE.from_checkpoint(ckpt, cfg.replace(max_tokens=hidden.shape[0], tokens=hidden.shape[0]),
                                cfg.runtime.layer, 0, 1)
    return moe(hidden, ids)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_dp_ranks_get_their_own_tokens_rows_of_the_single_process_reference(ckpt, tmp_path, world):
    seed = int(torch.seed() % 2**31)
    overrides = ["tokens=24", "layer=1", *DP]
    spawn_local(_dp_worker, world, str(ckpt), overrides, seed, str(tmp_path))
    ref = _dp_reference(ckpt, overrides, seed, world)
    for rank in range(world):
        out = torch.load(tmp_path / f"out{rank}.pt")
        assert out.shape == (24, ref.shape[1])
        assert _rel(out, ref[rank * 24:(rank + 1) * 24]) <= 1e-5


@pytest.mark.parametrize("overrides,tol", [
    (["layer=0"], 1e-5),  # hash-routed layer: each rank's own token ids
    (["layer=1", "act_mode=bf16"], 1e-4),  # W4A16 (see the replicated case for the tolerance)
    (["layer=1", *V3_STYLE], 1e-5),
], ids=["hash-layer", "w4a16", "v3-routing"])
def test_dp_modes_on_four_ranks_equal_the_reference(ckpt, tmp_path, overrides, tol):
    seed = int(torch.seed() % 2**31)
    overrides = ["tokens=16", *DP, *overrides]
    spawn_local(_dp_worker, 4, str(ckpt), overrides, seed, str(tmp_path))
    ref = _dp_reference(ckpt, overrides, seed, 4)
    assert max(_rel(torch.load(tmp_path / f"out{r}.pt"), ref[r * 16:(r + 1) * 16]) for r in range(4)) <= tol


def _dp_uneven_worker(rank, world, ckpt, overrides, seed, out_dir):
    cfg, moe = _rank_layer(rank, world, ckpt, overrides)
    hidden, ids = _inputs(cfg, seed + rank)
    t = 8 + 4 * rank
    torch.save(moe(hidden[:t], ids[:t]), f"{out_dir}/out{rank}.pt")


def test_dp_ranks_with_different_token_counts_each_get_their_own_rows(ckpt, tmp_path):
    """With checks on, the forward pads every rank's tokens to the largest count and drops the padding's outputs."""
    seed = int(torch.seed() % 2**31)
    overrides = ["layer=0", *DP]  # the hash layer: the padding's token ids are routed too
    spawn_local(_dp_uneven_worker, 4, str(ckpt), overrides, seed, str(tmp_path))
    cfg = load_config("tiny", ["world_size=1", *overrides])
    parts = [_inputs(cfg, seed + r) for r in range(4)]
    counts = [8 + 4 * r for r in range(4)]
    hidden, ids = (torch.cat([p[i][:n] for p, n in zip(parts, counts)]) for i in range(2))
    ref = EPMoE.from_checkpoint(ckpt, cfg, 0, 0, 1)(hidden, ids)
    rows = torch.tensor([0, *counts]).cumsum(0)
    for r in range(4):
        out = torch.load(tmp_path / f"out{r}.pt")
        assert out.shape == (counts[r], ref.shape[1]) and _rel(out, ref[rows[r]:rows[r + 1]]) <= 1e-5


def _dp_load_worker(rank, world, ckpt, out_dir):
    cfg, moe = _rank_layer(rank, world, ckpt, ["layer=0", "expert_load=true", *DP])  # padding gets token id 0
    hidden, ids = _inputs(cfg, rank)
    t = 3 + 4 * rank  # rank 0's 3 tokens are padded to rank 1's 7
    moe(hidden[:t], ids[:t])
    topk_idx, _ = moe.router(hidden[:t], ids[:t])
    own = torch.bincount(topk_idx.reshape(-1).long(), minlength=cfg.model.n_routed_experts)
    torch.save((moe.expert_load, own), f"{out_dir}/load{rank}.pt")


def test_dp_ranks_count_the_expert_load_of_their_own_tokens_not_the_padding(ckpt, tmp_path):
    spawn_local(_dp_load_worker, 2, str(ckpt), str(tmp_path))
    topk = load_config("tiny").model.num_experts_per_tok
    for rank, t in ((0, 3), (1, 7)):
        load, own = torch.load(tmp_path / f"load{rank}.pt")
        assert torch.equal(load, own) and int(load.sum()) == t * topk


def _dp_bad_input_worker(rank, world, ckpt, bad, out_dir):
    cfg, moe = _rank_layer(rank, world, ckpt, ["layer=0", *DP])  # the hash layer checks token ids too
    hidden, ids = _inputs(cfg, rank)
    if rank == 1 and bad == "nan":
        hidden[3, 5] = float("nan")
    if rank == 1 and bad == "token-id":
        ids[2] = cfg.model.vocab_size
    if rank == 1 and bad == "capacity":
        hidden = torch.randn(cfg.runtime.max_tokens + 1, cfg.model.hidden_size)
        ids = torch.zeros(hidden.shape[0], dtype=torch.long)
    if rank == 1 and bad == "ids-list":
        ids = ids.tolist()
    if rank == 1 and bad == "0-d hidden":
        hidden = torch.tensor(1.0)
    if rank == 1 and bad == "hidden-list":
        hidden = hidden.tolist()
    _write(out_dir, rank, lambda: moe(hidden, ids))


@pytest.mark.parametrize("bad,message", [
    ("nan", "hidden: expected finite values"),
    ("token-id", "input_ids: expected token ids in [0, 512)"),
    ("capacity", "hidden: 257 tokens exceed the symmetric buffer capacity max_tokens=256"),
    ("ids-list", "input_ids: expected None or a torch.Tensor, got list"),  # raised before any check once
    ("0-d hidden", "hidden: expected shape (T, 256), got ()"),
    ("hidden-list", "hidden: expected a floating-point tensor, got list"),
])
def test_a_dp_rank_whose_input_fails_a_check_fails_every_rank_at_once_naming_it(ckpt, tmp_path, bad, message):
    spawn_local(_dp_bad_input_worker, 4, str(ckpt), bad, str(tmp_path))
    elapsed, mine = _read(tmp_path, 1)
    assert mine.startswith(message) and elapsed < 5, mine
    for rank in (0, 2, 3):
        elapsed, msg = _read(tmp_path, rank)
        assert msg == "hidden: the ranks run their forwards together (token_mode 'dp'), and the input of rank(s) [1] " \
                      "failed its checks (their errors say why)" and elapsed < 5, msg


def _replicated_count_worker(rank, world, ckpt, bad, out_dir):
    cfg, moe = _rank_layer(rank, world, ckpt, ["layer=0"])  # the hash layer checks token ids too
    hidden, ids = _inputs(cfg, 0)  # the same tokens on every rank, as replicated mode needs
    if rank == 1 and bad == "ids-short":
        ids = ids[:-1]
    if rank == 1 and bad == "fewer":
        hidden, ids = hidden[:-3], ids[:-3]
    if rank == 1 and bad == "capacity":
        hidden = torch.randn(cfg.runtime.max_tokens + 1, cfg.model.hidden_size)
    if rank == 1 and bad == "hidden-list":
        hidden = hidden.tolist()
    _write(out_dir, rank, lambda: moe(hidden, ids))


COUNTS = "hidden: every rank runs the same tokens (token_mode 'replicated'), but the ranks hold [64, 61, 64, 64] " \
         "tokens (in rank order)"
FAILED_1 = "hidden: the ranks run their forwards together (token_mode 'replicated'), and the input of rank(s) [1] " \
           "failed its checks (their errors say why)"


@pytest.mark.parametrize("bad,mine,theirs", [
    ("fewer", COUNTS, COUNTS),
    ("capacity", "hidden: 257 tokens exceed the symmetric buffer capacity max_tokens=256", FAILED_1),
    ("hidden-list", "hidden: expected a floating-point tensor, got list", FAILED_1),
    ("ids-short", "input_ids: expected shape (64,), got (63,)", FAILED_1),  # the router's check, after the exchange once
])
def test_replicated_ranks_whose_token_counts_or_inputs_are_wrong_all_fail_at_once(ckpt, tmp_path, bad, mine, theirs):
    """Before, different counts made gloo abort the process in the all-reduce (the P2P kernels would have summed stale
    rows), and a rank's bad input left the others waiting for it."""
    spawn_local(_replicated_count_worker, 4, str(ckpt), bad, str(tmp_path))
    elapsed, msg = _read(tmp_path, 1)
    assert msg == mine and elapsed < 5, msg
    for rank in (0, 2, 3):
        elapsed, msg = _read(tmp_path, rank)
        assert msg == theirs and elapsed < 5, msg


def _load_failure_worker(rank, world, ckpt, bad, out_dir):
    cfg = load_config("tiny", [f"world_size={world}"])
    init_process_group(torch.device("cpu"), 60)
    path, device = ckpt, "cpu"
    if rank == 1 and bad == "missing":
        path = Path(out_dir) / "no-such-checkpoint"  # rank 1's checkpoint is not there; the others' is
    if rank == 1 and bad == "device":
        device = "cuda:99"  # a device this rank does not have
    _write(out_dir, rank, lambda: EPMoE.from_checkpoint(path, cfg, 0, rank, world, device=device))


@pytest.mark.parametrize("bad,mine", [("missing", "checkpoint: {out}/no-such-checkpoint does not exist"),
                                      ("device", "device: expected ")])
def test_a_rank_whose_load_fails_fails_every_rank_at_once_naming_it(ckpt, tmp_path, bad, mine):
    """Before, its peers waited out the group's 60 s timeout in the all-reduce of input scales, not naming it."""
    spawn_local(_load_failure_worker, 4, str(ckpt), bad, str(tmp_path))
    elapsed, msg = _read(tmp_path, 1)
    assert msg.startswith(mine.format(out=tmp_path)) and elapsed < 10, msg
    for rank in (0, 2, 3):
        elapsed, msg = _read(tmp_path, rank)
        assert msg == f"rank {rank}: layer 0 of {ckpt} failed to load on rank(s) [1] (their errors say why); this " \
                      f"rank's load is dropped" and elapsed < 10, msg


def _dense_scale_worker(rank, world, out_dir):
    cfg = load_config("tiny", [f"world_size={world}", "num_hash_layers=0"])
    init_process_group(torch.device("cpu"), 60)
    m, g = cfg.model, torch.Generator().manual_seed(0)
    e, h, i = m.n_routed_experts, m.hidden_size, m.moe_intermediate_size
    l2 = torch.full((e,), 2 / 2688)
    l2[e - 1] = 0.0  # the last rank's expert: a rank checking only its own slice would fail alone
    shared = (torch.randn(i, h, generator=g), torch.randn(i, h, generator=g), torch.randn(h, i, generator=g), 2 / 2688)
    _write(out_dir, rank, lambda: EPMoE.from_dense(
        cfg, torch.randn(e, h, generator=g), torch.randn(e, i, h, generator=g), torch.randn(e, i, h, generator=g),
        torch.randn(e, h, i, generator=g), 5 / 2688, l2, shared=shared, rank=rank, world_size=world))


def test_a_bad_scale_of_another_ranks_expert_in_dense_weights_fails_every_rank(tmp_path):
    """ExpertWeights.from_dense sees a rank's own slice only; each rank checks the whole tensor first."""
    spawn_local(_dense_scale_worker, 2, str(tmp_path))
    for rank in (0, 1):
        elapsed, msg = _read(tmp_path, rank)
        assert msg == "l2_input_scale: expected a finite positive scale, got 0.0 at index (31,)" and elapsed < 5, msg


def _share_rows_worker(rank, world, out_dir):
    dist.init_process_group(timeout=datetime.timedelta(seconds=30))  # no backend named: torch picks per device
    group = dist.new_group(list(range(world)))  # not the default group
    problem = ValueError(f"rank {rank}'s own failure") if rank == 2 else None
    _write(out_dir, rank, lambda: Path(out_dir, f"rows{rank}.txt").write_text(repr(share_rows(
        [rank, 0.5 * rank], problem, "a test's rows", fallback_device(group), group))))


def test_shared_rows_come_back_in_rank_order_with_the_failed_ranks(tmp_path):
    """Over a group created without naming a backend, which is not the default group."""
    spawn_local(_share_rows_worker, 3, str(tmp_path))
    for rank in (0, 1):
        assert (tmp_path / f"rows{rank}.txt").read_text() == "([[0.0, 0.0], [1.0, 0.5], [0.0, 0.0]], [2])"
    assert _read(tmp_path, 2)[1] == "rank 2's own failure"


def _dp_no_tokens_worker(rank, world, ckpt, out_dir):
    cfg, moe = _rank_layer(rank, world, ckpt, ["layer=1", *DP])
    empty = moe(torch.zeros(0, cfg.model.hidden_size), torch.zeros(0, dtype=torch.long))
    torch.save((tuple(empty.shape), moe(*_inputs(cfg, rank))), f"{out_dir}/after{rank}.pt")


def test_dp_ranks_run_a_forward_of_no_tokens_together_and_go_on(ckpt, tmp_path):
    spawn_local(_dp_no_tokens_worker, 2, str(ckpt), str(tmp_path))
    (shape0, out0), (shape1, out1) = (torch.load(tmp_path / f"after{r}.pt") for r in range(2))
    assert shape0 == shape1 == (0, load_config("tiny").model.hidden_size)
    assert out0.abs().sum() > 0 and out1.abs().sum() > 0 and not torch.equal(out0, out1)


def _collectives_worker(rank, world, out_dir):
    init_process_group(torch.device("cpu"), 60)
    backend = CpuBackend()
    mine = torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * rank
    gathered, ids = torch.full((3 * world, 2), float("nan")), torch.full((2 * world,), -1, dtype=torch.int32)
    backend.all_gather([gathered, ids], [mine, torch.tensor([rank, -rank], dtype=torch.int32)])
    partial = torch.arange(3 * world * 2, dtype=torch.float32).view(3 * world, 2) * (rank + 1)
    reduced = backend.reduce_scatter(partial, torch.full((3, 2), float("nan")))
    torch.save((gathered, ids, reduced), f"{out_dir}/c{rank}.pt")


def test_the_cpu_backend_all_gathers_in_rank_order_and_reduce_scatters_each_ranks_rows(tmp_path):
    world = 3
    spawn_local(_collectives_worker, world, str(tmp_path))
    rows = torch.arange(6, dtype=torch.float32).view(3, 2)
    scale = sum(q + 1 for q in range(world))
    for rank in range(world):
        gathered, ids, reduced = torch.load(tmp_path / f"c{rank}.pt")
        assert torch.equal(gathered, torch.cat([rows + 100 * q for q in range(world)]))
        assert ids.tolist() == [v for q in range(world) for v in (q, -q)]
        assert torch.equal(reduced, (torch.arange(6, dtype=torch.float32).view(3, 2) + 6 * rank) * scale)


def _dp_scratch_worker(rank, world, ckpt, out_dir):
    cfg, _ = _rank_layer(rank, world, ckpt, ["layer=1", "act_scale=static"])
    replicated = EPMoE.from_checkpoint(ckpt, cfg, 1, rank, world)
    _write(out_dir, rank, lambda: EPMoE.from_checkpoint(ckpt, cfg.replace(token_mode="dp"), 1, rank, world,
                                                        scratch=replicated.scratch))


def test_a_dp_layer_refuses_the_scratch_of_a_replicated_one(ckpt, tmp_path):
    spawn_local(_dp_scratch_worker, 2, str(ckpt), str(tmp_path))
    assert _read(tmp_path, 0)[1] == "scratch: this layer needs token sources 2, the scratch was made for 1"


def _dp_scales_worker(rank, world, out_dir):
    init_process_group(torch.device("cpu"), 60)
    cfg = load_config("tiny", [f"world_size={world}", *DP])
    weights = synthetic_layer(cfg.model, 1, rank, world, 0, "cpu")
    weights.experts.l1_input_scale.fill_(0.5 * (rank + 1))  # each rank's own max, never agreed on
    _write(out_dir, rank, lambda: EPMoE(cfg, weights, rank, world))


def test_dp_ranks_whose_static_input_scales_differ_are_refused_on_every_rank(tmp_path):
    spawn_local(_dp_scales_worker, 2, str(tmp_path))
    for rank in range(2):
        assert _read(tmp_path, rank)[1] == ("weights.experts.l1_input_scale (token_mode 'dp'): expected the same value "
                                            f"on every rank, rank {rank} has {0.5 * (rank + 1)}, rank {1 - rank} has "
                                            f"{0.5 * (2 - rank)}")
