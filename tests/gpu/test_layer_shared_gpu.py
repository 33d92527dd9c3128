"""Two ranks on one GPU: a gloo process group (NCCL and the P2P backends want a GPU per rank), the CPU backend's
collectives on CUDA tensors, each rank's CUDA expert stage over its half of the experts, in both token modes, against
the single-GPU reference. What happens around the kernels on several ranks, where a machine has one GPU."""
import pytest
import torch

from ep_runtime.dist_utils import init_process_group, spawn_local
from ep_runtime.moe import EPMoE

from layer_case import cosine, layer_config, layer_inputs, poison_module

pytestmark = pytest.mark.gpu


def _cfg(world, token_mode, seed):
    return layer_config(world, "backend=cuda", "symm_backend=cpu", "act_scale=static", f"token_mode={token_mode}",
                        "max_tokens=256", "tokens=128", seed=seed)


def _rank_inputs(cfg, seed, rank, device):
    return layer_inputs(cfg, seed + (rank if cfg.runtime.token_mode == "dp" else 0), device)


def _worker(rank, world, token_mode, seed, out_dir):
    init_process_group(torch.device("cpu"), 60)  # gloo
    device = torch.device("cuda", 0)
    cfg = _cfg(world, token_mode, seed)
    moe = EPMoE.from_synthetic(cfg, 0, rank, world, device=device)
    poison_module(moe)
    out = moe(_rank_inputs(cfg, seed, rank, device))
    torch.save(out.cpu(), f"{out_dir}/out{rank}.pt")


@pytest.mark.parametrize("token_mode", ["replicated", "dp"])
def test_two_ranks_sharing_a_gpu_match_the_single_gpu_reference(tmp_path, token_mode):
    seed, world, device = int(torch.seed() % 2**30), 2, torch.device("cuda", 0)
    spawn_local(_worker, world, token_mode, seed, str(tmp_path))
    outs = [torch.load(tmp_path / f"out{r}.pt").to(device) for r in range(world)]
    cfg = _cfg(world, token_mode, seed)
    if token_mode == "dp":
        x, got = torch.cat([_rank_inputs(cfg, seed, r, device) for r in range(world)]), torch.cat(outs)
    else:
        x, got = _rank_inputs(cfg, seed, 0, device), outs[0]
        assert torch.equal(outs[1], outs[0])
    n = x.shape[0]
    ref = EPMoE.from_synthetic(cfg.replace(world_size=1, backend="reference", max_tokens=n, tokens=n), device=device)
    poison_module(ref)
    assert cosine(got, ref(x)) >= 0.9999
