"""Ranks sharing one GPU: a gloo process group (NCCL and the P2P backends want a GPU per rank), the CPU backend's
collectives on CUDA tensors, each rank's CUDA expert stage over its share of the experts, in both token modes, against
the single-GPU reference. What happens around the kernels on several ranks, where a machine has one GPU: the mid-sized
layer on two ranks, and the DeepSeek-V4-Pro layout itself (8 ranks x 48 experts)."""
import pytest
import torch

from ep_runtime.config import Config, load_config
from ep_runtime.dist_utils import init_process_group, spawn_local
from ep_runtime.moe import EPMoE

from layer_case import cosine, layer_config, layer_inputs, poison_module

pytestmark = pytest.mark.gpu

SHARED_GPU = ["backend=cuda", "symm_backend=cpu", "act_scale=static", "max_tokens=256", "tokens=128"]


def _cfg(case: str, token_mode: str, seed: int) -> Config:
    if case == "mid-2-ranks":
        return layer_config(2, *SHARED_GPU, f"token_mode={token_mode}", seed=seed)
    # layer 3: the first of V4-Pro's layers routed by score (0-2 route by token id)
    return load_config("deepseek_v4_pro", ["world_size=8", *SHARED_GPU, f"token_mode={token_mode}", f"seed={seed}",
                                           "layer=3"])


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
    n = x.shape[0]
    ref = EPMoE.from_synthetic(cfg.replace(world_size=1, backend="reference", max_tokens=n, tokens=n),
                               cfg.runtime.layer, device=device)
    poison_module(ref)
    assert cosine(got, ref(x)) >= 0.9999
