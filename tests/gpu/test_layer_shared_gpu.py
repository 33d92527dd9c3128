"""Ranks sharing one GPU: a gloo process group (NCCL wants a GPU per rank), each rank's CUDA expert stage over its share
of the experts, in both token modes, against the single-GPU reference: with the CPU backend's collectives (gloo's, on
CUDA tensors), and with the IPC backend's P2P kernels (PyTorch symmetric memory and NVSHMEM refuse ranks sharing a
GPU), eager and replayed from a CUDA graph. What happens around the kernels on several ranks, where a machine has one
GPU: the mid-sized layer on two ranks, and the DeepSeek-V4-Pro layout itself (8 ranks x 48 experts)."""
import os
import time
from pathlib import Path

import pytest
import torch

from ep_runtime.config import Config, load_config
from ep_runtime.dist_utils import (CommMismatchError, CommTimeoutError, host_barrier, init_process_group,
                                   spawn_local)
from ep_runtime.moe import EPMoE
from ep_runtime.symm_ipc import IpcBackend

from layer_case import cosine, eager_and_replayed, layer_config, layer_inputs, poison_module

pytestmark = pytest.mark.gpu

SHARED_GPU = ["backend=cuda", "act_scale=static", "max_tokens=256", "tokens=128"]


def _cfg(case: str, token_mode: str, seed: int, symm_backend: str) -> Config:
    overrides = [*SHARED_GPU, f"token_mode={token_mode}", f"symm_backend={symm_backend}"]
    if case == "mid-2-ranks":
        return layer_config(2, *overrides, seed=seed)
    # layer 3: the first of V4-Pro's layers routed by score (0-2 route by token id)
    return load_config("deepseek_v4_pro", ["world_size=8", *overrides, f"seed={seed}", "layer=3"])


def _rank_inputs(cfg: Config, seed: int, rank: int, device: torch.device) -> torch.Tensor:
    return layer_inputs(cfg, seed + (rank if cfg.runtime.token_mode == "dp" else 0), device)


def _worker(rank, world, case, token_mode, symm_backend, seed, out_dir):
    init_process_group(torch.device("cpu"), 60)  # gloo
    device = torch.device("cuda", 0)
    cfg = _cfg(case, token_mode, seed, symm_backend)
    moe = EPMoE.from_synthetic(cfg, cfg.runtime.layer, rank, world, device=device)
    x = _rank_inputs(cfg, seed, rank, device)
    if symm_backend == "ipc":  # our P2P kernels, which a CUDA graph captures (gloo's collectives it cannot)
        eager, replayed = eager_and_replayed(moe, x)
    else:
        poison_module(moe)
        eager, replayed = moe(x), None
    torch.save((moe.buffer.backend.name, eager.cpu(), replayed if replayed is None else replayed.cpu()),
               f"{out_dir}/out{rank}.pt")


def _reference(cfg: Config, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    ref = EPMoE.from_synthetic(cfg.replace(world_size=1, backend="reference", max_tokens=n, tokens=n),
                               cfg.runtime.layer, device=x.device)
    poison_module(ref)
    return ref(x)


@pytest.mark.parametrize("symm_backend", ["cpu", "ipc"])
@pytest.mark.parametrize("token_mode", ["replicated", "dp"])
@pytest.mark.parametrize("case", ["mid-2-ranks", "v4-pro-8-ranks"])
def test_ranks_sharing_a_gpu_match_the_single_gpu_reference(tmp_path, case, token_mode, symm_backend):
    """cpu: gloo's collectives on CUDA tensors; ipc: the P2P kernels (the all-reduce, or the all-gather and
    reduce-scatter of token_mode 'dp'), eager and replayed from a CUDA graph."""
    seed, device = int(torch.seed() % 2**30), torch.device("cuda", 0)
    cfg = _cfg(case, token_mode, seed, symm_backend)
    world = cfg.runtime.world_size
    spawn_local(_worker, world, case, token_mode, symm_backend, seed, str(tmp_path))
    results = [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]
    assert {name for name, _, _ in results} == {symm_backend}
    assert all(replayed is None or torch.equal(replayed, eager) for _, eager, replayed in results)
    eager = [e.to(device) for _, e, _ in results]
    if token_mode == "dp":
        x, got = torch.cat([_rank_inputs(cfg, seed, r, device) for r in range(world)]), torch.cat(eager)
    else:
        x, got = _rank_inputs(cfg, seed, 0, device), eager[0]
        assert all(torch.equal(e, eager[0]) for e in eager)
    assert cosine(got, _reference(cfg, x)) >= 0.9999


def _absent_peer_worker(rank, world, seed, out_dir):
    os.environ["EP_SYMM_TIMEOUT_S"] = "1"  # the P2P kernels' barrier timeout
    init_process_group(torch.device("cpu"), 60)
    device = torch.device("cuda", 0)
    cfg = _cfg("mid-2-ranks", "replicated", seed, "ipc")
    moe = EPMoE.from_synthetic(cfg, cfg.runtime.layer, rank, world, device=device)
    captured = moe.capture(_rank_inputs(cfg, seed, rank, device))  # both ranks: warm-up forwards, then the capture
    done = Path(out_dir) / "done"
    if rank == 1:  # alive (its arena stays mapped), but it never replays
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    captured.replay()  # its all-reduce waits 1 s for rank 1, records it and ends
    torch.cuda.synchronize()
    try:
        captured.replay()
        msg = "no error"
    except CommTimeoutError as e:
        msg = str(e)
    done.touch()
    (Path(out_dir) / "rank0.txt").write_text(msg)


def test_a_replay_whose_collective_timed_out_is_reported_by_the_next_replay_after_it_completed(tmp_path):
    """Naming the absent peer. The kernels cannot raise; before, replays went on returning sums without its part."""
    spawn_local(_absent_peer_worker, 2, int(torch.seed() % 2**30), str(tmp_path))
    msg = (tmp_path / "rank0.txt").read_text()
    assert msg.startswith("rank 0: symmetric-memory ") and "timed out after 1s waiting for rank(s) [1] of 2" in msg, msg


def _unequal_counts_worker(rank, world, seed, out_dir):
    os.environ["EP_SYMM_TIMEOUT_S"] = "5"  # where the ranks' grids differ, the CTAs without a partner wait this long
    init_process_group(torch.device("cpu"), 60)
    device = torch.device("cuda", 0)
    cfg = _cfg("mid-2-ranks", "dp", seed, "ipc")
    moe = EPMoE.from_synthetic(cfg, cfg.runtime.layer, rank, world, device=device)
    x = _rank_inputs(cfg, seed, rank, device)[: 4 + rank]  # 4 tokens on rank 0, 5 on rank 1
    try:  # a rank whose gather has ended by the time its forward reaches the reduce-scatter raises there
        moe(x, check=False)  # unchecked, so nothing compares the counts on the host
        torch.cuda.synchronize()
        moe.buffer.backend.raise_if_failed()
        msg = "no error"
    except CommMismatchError as e:
        msg = str(e)
    (Path(out_dir) / f"rank{rank}.txt").write_text(msg)
    host_barrier(30)  # a rank's arena stays mapped until its peer's kernels, which may store into it, have ended


def test_unchecked_dp_forwards_of_unequal_token_counts_are_reported_naming_the_other_rank(tmp_path):
    """check=False in token mode 'dp' needs equal counts on every rank; the P2P gather and reduce-scatter compare the
    ranks' calls, move nothing and report the rank whose count differed (before, they read and wrote wrong rows): in
    the forward, or at the first check of the backend after it."""
    spawn_local(_unequal_counts_worker, 2, int(torch.seed() % 2**30), str(tmp_path))
    for rank in range(2):
        msg = (tmp_path / f"rank{rank}.txt").read_text()
        assert msg.startswith(f"rank {rank}: symmetric-memory ") and f"rank(s) [{1 - rank}] of 2 were asked" in msg, msg


def _capacity_worker(rank, world, out_dir):
    init_process_group(torch.device("cpu"), 60)
    try:
        IpcBackend(torch.device("cuda", 0), capacity_bytes=(1 + rank) << 20)
        msg = "no error"
    except ValueError as e:
        msg = str(e)
    (Path(out_dir) / f"rank{rank}.txt").write_text(msg)


def test_p2p_ranks_with_arenas_of_other_capacities_are_refused_on_every_rank(tmp_path):
    """Each rank finds its peers' signal blocks after its own capacity in their arenas."""
    spawn_local(_capacity_worker, 2, str(tmp_path))
    for rank in range(2):
        msg = (tmp_path / f"rank{rank}.txt").read_text()
        assert msg.startswith("capacity_bytes: expected the same value on every rank"), msg
