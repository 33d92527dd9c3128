"""Expert parallelism on CPU ranks (gloo): the EP output equals the single-process reference."""
import time

import pytest
import torch

from ep_runtime.checkpoint import write_synthetic_checkpoint
from ep_runtime.config import load_config
from ep_runtime.dist_utils import init_process_group, spawn_local
from ep_runtime.moe import EPMoE
from ep_runtime.symm import CpuBackend

V3_STYLE = ["scoring_func=sigmoid", "n_group=4", "topk_group=2", "swiglu_limit=null"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt"), load_config("tiny").model, num_layers=2,
                                      shards=8)


def _inputs(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(cfg.runtime.tokens, cfg.model.hidden_size, generator=g)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.runtime.tokens,), generator=g)
    return hidden, ids


def _ep_worker(rank, world, ckpt, overrides, seed, out_dir):
    cfg = load_config("tiny", [f"world_size={world}", *overrides])
    init_process_group(torch.device("cpu"), 60)
    moe = EPMoE.from_checkpoint(ckpt, cfg, cfg.runtime.layer, rank, world)
    hidden, ids = _inputs(cfg, seed)
    out = moe(hidden, ids)
    torch.save(out, f"{out_dir}/out{rank}.pt")


def _single_process(ckpt, overrides, seed):
    cfg = load_config("tiny", ["world_size=1", *overrides])
    moe = EPMoE.from_checkpoint(ckpt, cfg, cfg.runtime.layer, 0, 1)
    return moe(*_inputs(cfg, seed))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_ep_output_equals_the_single_process_reference(ckpt, tmp_path, world):
    seed = int(torch.seed() % 2**31)
    overrides = ["tokens=48", "layer=1"]
    spawn_local(_ep_worker, world, str(ckpt), overrides, seed, str(tmp_path))
    ref = _single_process(ckpt, overrides, seed)
    outs = [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]
    for out in outs:
        assert torch.equal(out, outs[0])  # every rank holds the same all-reduced result
    assert _rel(outs[0], ref) <= 1e-5


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


def _barrier_worker(rank, world, out_dir):
    init_process_group(torch.device("cpu"), 60)
    backend = CpuBackend()
    if rank == 1:
        time.sleep(6)  # never reaches the barrier in time
        return
    t0 = time.monotonic()
    try:
        backend.barrier(timeout_s=2)
        msg = "no error"
    except TimeoutError as e:
        msg = str(e)
    with open(f"{out_dir}/barrier.txt", "w") as f:
        f.write(f"{time.monotonic() - t0:.1f}\n{msg}")


def test_a_rank_missing_the_barrier_fails_the_others_within_the_timeout(tmp_path):
    spawn_local(_barrier_worker, 2, str(tmp_path))
    elapsed, msg = (tmp_path / "barrier.txt").read_text().split("\n", 1)
    assert float(elapsed) < 5
    assert msg.startswith("rank 0: barrier not completed") and "Ranks 1 failed" in msg
