"""Ranks sharing one GPU: a gloo process group (NCCL wants a GPU per rank), each rank's CUDA expert stage over its share
of the experts, against the single-GPU reference: with the CPU backend's collectives on CUDA tensors in both token
modes, and with the IPC backend's P2P all-reduce (PyTorch symmetric memory and NVSHMEM refuse ranks sharing a GPU),
eager and replayed from a CUDA graph. What happens around the kernels on several ranks, where a machine has one GPU:
the mid-sized layer on two ranks, and the DeepSeek-V4-Pro layout itself (8 ranks x 48 experts)."""
import pytest
import torch

from ep_runtime.config import Config, load_config
from ep_runtime.dist_utils import init_process_group, spawn_local
from ep_runtime.moe import EPMoE

from layer_case import cosine, eager_and_replayed, layer_config, layer_inputs, poison_module

pytestmark = pytest.mark.gpu

SHARED_GPU = ["backend=cuda", "act_scale=static", "max_tokens=256", "tokens=128"]


def _cfg(case: str, token_mode: str, seed: int, symm_backend: str = "cpu") -> Config:
    overrides = [*SHARED_GPU, f"token_mode={token_mode}", f"symm_backend={symm_backend}"]
    if case == "mid-2-ranks":
        return layer_config(2, *overrides, seed=seed)
    # layer 3: the first of V4-Pro's layers routed by score (0-2 route by token id)
    return load_config("deepseek_v4_pro", ["world_size=8", *overrides, f"seed={seed}", "layer=3"])


def _rank_inputs(cfg: Config, seed: int, rank: int, device: torch.device) -> torch.Tensor:
    return layer_inputs(cfg, seed + (rank if cfg.runtime.token_mode == "dp" else 0), device)


def _worker(rank, world, case, token_mode, seed, out_dir):
    init_process_group(torch.device("cpu"), 60)  # gloo
    device = torch.device("cuda", 0)
    cfg = _cfg(case, token_mode, seed)
    moe = EPMoE.from_synthetic(cfg, cfg.runtime.layer, rank, world, device=device)
    poison_module(moe)
    out = moe(_rank_inputs(cfg, seed, rank, device))
    torch.save(out.cpu(), f"{out_dir}/out{rank}.pt")


def _reference(cfg: Config, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    ref = EPMoE.from_synthetic(cfg.replace(world_size=1, backend="reference", max_tokens=n, tokens=n),
                               cfg.runtime.layer, device=x.device)
    poison_module(ref)
    return ref(x)


@pytest.mark.parametrize("token_mode", ["replicated", "dp"])
@pytest.mark.parametrize("case", ["mid-2-ranks", "v4-pro-8-ranks"])
def test_ranks_sharing_a_gpu_match_the_single_gpu_reference(tmp_path, case, token_mode):
    seed, device = int(torch.seed() % 2**30), torch.device("cuda", 0)
    cfg = _cfg(case, token_mode, seed)
    world = cfg.runtime.world_size
    spawn_local(_worker, world, case, token_mode, seed, str(tmp_path))
    outs = [torch.load(tmp_path / f"out{r}.pt").to(device) for r in range(world)]
    if token_mode == "dp":
        x, got = torch.cat([_rank_inputs(cfg, seed, r, device) for r in range(world)]), torch.cat(outs)
    else:
        x, got = _rank_inputs(cfg, seed, 0, device), outs[0]
        assert all(torch.equal(o, outs[0]) for o in outs)
    assert cosine(got, _reference(cfg, x)) >= 0.9999


def _ipc_worker(rank, world, case, seed, out_dir):
    init_process_group(torch.device("cpu"), 60)  # gloo
    device = torch.device("cuda", 0)
    cfg = _cfg(case, "replicated", seed, symm_backend="ipc")
    moe = EPMoE.from_synthetic(cfg, cfg.runtime.layer, rank, world, device=device)
    eager, replayed = eager_and_replayed(moe, _rank_inputs(cfg, seed, rank, device))
    torch.save((moe.buffer.backend.name, eager.cpu(), replayed.cpu()), f"{out_dir}/out{rank}.pt")


@pytest.mark.parametrize("case", ["mid-2-ranks", "v4-pro-8-ranks"])
def test_ranks_sharing_a_gpu_all_reduce_through_ipc_mapped_memory_eager_and_replayed(tmp_path, case):
    seed, device = int(torch.seed() % 2**30), torch.device("cuda", 0)
    cfg = _cfg(case, "replicated", seed, symm_backend="ipc")
    world = cfg.runtime.world_size
    spawn_local(_ipc_worker, world, case, seed, str(tmp_path))
    results = [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]
    assert {name for name, _, _ in results} == {"ipc"}
    assert all(torch.equal(eager, results[0][1]) and torch.equal(replayed, eager) for _, eager, replayed in results)
    assert cosine(results[0][1].to(device), _reference(cfg, _rank_inputs(cfg, seed, 0, device))) >= 0.9999
