"""The whole MoE layer on one GPU: CUDA expert stage vs the reference path, graph replay, capacity."""
import pytest
import torch

from ep_runtime.moe import EPMoE, cuda_backend_available

from layer_case import cosine, layer_config, layer_inputs, poison_module

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


@pytest.fixture
def seed():
    """Fresh weights (runtime.seed) and inputs every run."""
    seed = int(torch.seed() % 2**31)
    print(f"seed {seed}")
    return seed


@pytest.mark.parametrize("mode", [["act_scale=static"], ["act_scale=dynamic"], ["act_mode=bf16"]],
                         ids=["w4a4-static", "w4a4-dynamic", "w4a16"])
def test_cuda_layer_matches_the_reference_layer(mode, seed):
    assert cuda_backend_available(DEV)
    cfg = layer_config(1, *mode, seed=seed)
    x = layer_inputs(cfg, seed, DEV)
    fast = EPMoE.from_synthetic(cfg.replace(backend="cuda"), device=DEV)
    ref = EPMoE.from_synthetic(cfg.replace(backend="reference"), device=DEV)
    poison_module(fast)
    poison_module(ref)
    got, expected = fast(x), ref(x)
    print(f"cosine {cosine(got, expected):.7f}, differing elements {(got != expected).sum().item()}")
    assert fast.backend == "cuda" and ref.backend == "reference"
    assert cosine(got, expected) >= 0.9999


def test_graph_replay_gives_the_eager_bits(seed):
    cfg = layer_config(1, "backend=cuda", seed=seed)
    moe = EPMoE.from_synthetic(cfg, device=DEV)
    x = layer_inputs(cfg, seed, DEV)
    poison_module(moe)
    eager = moe(x).clone()
    captured = moe.capture(x)
    poison_module(moe)
    captured.out.fill_(float("nan"))
    assert torch.equal(captured.replay(), eager)
    x2 = layer_inputs(cfg, seed + 1, DEV)
    captured.hidden.copy_(x2)
    poison_module(moe)
    replayed = captured.replay().clone()
    poison_module(moe)
    assert torch.equal(replayed, moe(x2))


def test_repeated_forwards_are_bitwise_identical(seed):
    cfg = layer_config(1, "backend=cuda", seed=seed)
    moe = EPMoE.from_synthetic(cfg, device=DEV)
    x = layer_inputs(cfg, seed, DEV)
    poison_module(moe)
    first = moe(x)
    poison_module(moe)  # the second forward must rewrite everything, not find the first one's results
    assert torch.equal(first, moe(x))


def test_more_tokens_than_capacity_is_refused(seed):
    cfg = layer_config(1, "backend=cuda", seed=seed)
    moe = EPMoE.from_synthetic(cfg, device=DEV)
    with pytest.raises(ValueError, match="exceed the symmetric buffer capacity max_tokens=512"):
        moe(torch.randn(513, cfg.model.hidden_size, device=DEV, dtype=torch.bfloat16))
