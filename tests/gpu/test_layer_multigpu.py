"""The expert-parallel layer across the GPUs of one node, under torchrun (one process per GPU):

    torchrun --nproc-per-node N -m pytest -m multigpu -q tests/gpu/test_layer_multigpu.py

Every rank runs the same tests in the same order; assertions come after the collectives.
"""
import os

import pytest
import torch
import torch.distributed as dist

from ep_runtime import cuda_graphs
from ep_runtime.moe import EPMoE

from layer_case import cosine, eager_and_replayed, layer_config, layer_inputs, poison_module, residual_model

_TORCHRUN = ("RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available()
             and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"]))
pytestmark = [pytest.mark.multigpu,
              pytest.mark.skipif(not _TORCHRUN, reason="needs torchrun with WORLD_SIZE > 1 and a GPU per rank")]


@pytest.fixture(scope="module")
def group():
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    seed = [torch.seed() % 2**31]
    dist.broadcast_object_list(seed, src=0)  # the same fresh weights and inputs on every rank
    print(f"rank {dist.get_rank()}: seed {seed[0]}")
    yield dist.get_rank(), dist.get_world_size(), device, seed[0]
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def layer(group):
    rank, world, device, seed = group
    cfg = layer_config(world, "backend=cuda", "symm_backend=torch", "act_scale=static", seed=seed)
    return cfg, EPMoE.from_synthetic(cfg, 0, rank, world, device=device)


def _gathered(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


def test_ep_output_matches_the_single_gpu_reference_on_every_rank(group, layer):
    rank, world, device, seed = group
    cfg, moe = layer
    x = layer_inputs(cfg, seed, device)
    poison_module(moe)
    out = moe(x)
    outs = _gathered(out, world)
    ref = EPMoE.from_synthetic(cfg.replace(world_size=1, backend="reference"), device=device)
    poison_module(ref)
    expected = ref(x)
    assert all(torch.equal(o, outs[0]) for o in outs)  # the all-reduce gives every rank the same bits
    assert cosine(out, expected) >= 0.9999


def test_graph_replay_gives_the_eager_bits_on_every_rank(group, layer):
    rank, world, device, seed = group
    cfg, moe = layer
    eager, replayed = eager_and_replayed(moe, layer_inputs(cfg, seed + 1, device))
    assert torch.equal(replayed, eager)


def test_a_few_tokens_run_every_rank_on_its_slice_of_the_shared_experts_intermediate_dim(group, layer):
    rank, world, device, seed = group
    cfg, moe = layer
    t = cfg.runtime.shared_split_tokens - 1
    x = layer_inputs(cfg, seed + 3, device)[:t]
    eager, replayed = eager_and_replayed(moe, x)
    sliced = torch.isfinite(moe.scratch.shared_slice.y_slot[:t]).all().item()  # the slice's stage wrote its rows
    outs = _gathered(eager, world)
    ref = EPMoE.from_synthetic(cfg.replace(world_size=1, backend="reference"), device=device)
    poison_module(ref)
    assert sliced
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert torch.equal(replayed, eager)
    assert cosine(eager, ref(x)) >= 0.9999


def test_two_layers_sharing_a_scratch_match_the_reference_and_replay_their_eager_bits(group, layer):
    rank, world, device, seed = group
    cfg, first = layer
    second = EPMoE.from_synthetic(cfg.replace(seed=seed + 1), 0, rank, world, device=device, scratch=first.scratch)
    x = layer_inputs(cfg, seed + 2, device)
    poison_module(first)
    mid = first(x)
    out = second(mid)  # reads the first layer's output, as in a model; its all-reduce follows the first's
    chain = {}

    def step() -> None:
        chain["out"] = second(first(x, check=False), check=False)

    graph = cuda_graphs.capture(step)
    poison_module(first)
    chain["out"].fill_(float("nan"))
    graph.replay()
    replayed = chain["out"].clone()
    outs = _gathered(out, world)
    refs = [EPMoE.from_synthetic(c.replace(world_size=1, backend="reference"), device=device)
            for c in (cfg, cfg.replace(seed=seed + 1))]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert torch.equal(replayed, out)
    assert cosine(mid, refs[0](x)) >= 0.9999 and cosine(out, refs[1](mid)) >= 0.9999


def test_a_model_compiled_with_cuda_graphs_gives_the_eager_bits_on_every_rank(group, layer):
    rank, world, device, seed = group
    cfg, first = layer
    second = EPMoE.from_synthetic(cfg.replace(seed=seed + 1), 0, rank, world, device=device, scratch=first.scratch)
    model = residual_model(first, second, check=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    same = []
    for i in range(4):  # warm-up, capture, then replays on new inputs: the same calls on every rank
        x = layer_inputs(cfg, seed + 10 + i, device)
        poison_module(first)
        want = model(x).clone()
        poison_module(first)
        same.append(torch.equal(compiled(x).clone(), want))
    torch.cuda.synchronize()
    assert all(same)


@pytest.fixture(scope="module")
def dp_layer(group, layer):
    rank, world, device, seed = group
    cfg = layer[0].replace(token_mode="dp", max_tokens=256, tokens=128)
    return cfg, EPMoE.from_synthetic(cfg, 0, rank, world, device=device)


def test_dp_ranks_get_their_own_rows_of_the_single_gpu_reference_eager_and_replayed(group, dp_layer):
    rank, world, device, seed = group
    cfg, moe = dp_layer
    x = layer_inputs(cfg, seed + 20 + rank, device)  # every rank its own tokens
    eager, replayed = eager_and_replayed(moe, x)
    xs, outs = torch.cat(_gathered(x, world)), torch.cat(_gathered(eager, world))
    n = xs.shape[0]
    ref = EPMoE.from_synthetic(cfg.replace(world_size=1, backend="reference", max_tokens=n, tokens=n), device=device)
    poison_module(ref)
    assert torch.equal(replayed, eager)
    assert cosine(outs, ref(xs)) >= 0.9999


def test_nvshmem_backend_sums_like_the_reference(group):
    nvshmem = pytest.importorskip("nvshmem.core")  # noqa: F841  (carried as a wheel on GPU machines)
    from ep_runtime.symm import region_bytes
    from ep_runtime.symm_nvshmem import NvshmemBackend

    rank, world, device, seed = group
    be = NvshmemBackend(device, capacity_bytes=region_bytes([("y", (64, 1024), torch.bfloat16)]))
    y = be.empty("y", (64, 1024), torch.bfloat16)
    inputs = [torch.randn(64, 1024, generator=torch.Generator(device=device).manual_seed(seed + q),
                          device=device).to(torch.bfloat16) for q in range(world)]
    y.copy_(inputs[rank])
    be.all_reduce_(y)
    expected = inputs[0].float()
    for q in inputs[1:]:
        expected = expected + q.float()
    got = y.clone()
    be.close()
    assert torch.equal(got, expected.to(torch.bfloat16))
