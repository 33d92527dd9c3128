"""EPMoE as an nn.Module a custom model calls: construction, validation, capacity."""
import pytest
import torch

from ep_runtime.config import load_config
from ep_runtime.moe import EPMoE

CFG = load_config("tiny", ["world_size=1", "max_tokens=16", "tokens=16"])
M = CFG.model


def _dense(gen):
    e, h, i = M.n_routed_experts, M.hidden_size, M.moe_intermediate_size
    r = lambda *s: torch.randn(*s, generator=gen) / s[-1] ** 0.5  # noqa: E731
    return dict(router_weight=r(e, h), gate=r(e, i, h), up=r(e, i, h), down=r(e, h, i), l1_input_scale=5 / 2688,
                l2_input_scale=torch.full((e,), 2 / 2688), router_bias=torch.zeros(e),
                tid2eid=torch.randint(0, e, (M.vocab_size, M.num_experts_per_tok), generator=gen),
                shared=(r(i, h), r(i, h), r(h, i), 2 / 2688))


def test_a_module_built_from_dense_weights_runs_and_is_deterministic(gen):
    moe = EPMoE.from_dense(CFG, **_dense(gen))
    x = torch.randn(10, M.hidden_size, generator=gen)
    ids = torch.randint(0, M.vocab_size, (10,), generator=gen)
    a, b = moe(x, ids), moe(x, ids)
    assert a.shape == (10, M.hidden_size) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and a.abs().sum() > 0 and torch.equal(a, b)


def test_shared_expert_is_added_to_the_routed_sum(gen):
    d = _dense(gen)
    with_shared = EPMoE.from_dense(CFG, **d)
    without = EPMoE.from_dense(CFG, **{**d, "shared": None})
    x = torch.randn(4, M.hidden_size, generator=gen)
    ids = torch.randint(0, M.vocab_size, (4,), generator=gen)
    assert not torch.equal(with_shared(x, ids), without(x, ids))


def test_more_tokens_than_the_buffer_holds_is_a_clear_error(gen):
    moe = EPMoE.from_dense(CFG, **_dense(gen))
    with pytest.raises(ValueError, match="17 tokens exceed the symmetric buffer capacity max_tokens=16"):
        moe(torch.randn(17, M.hidden_size), torch.zeros(17, dtype=torch.long))


def test_hidden_of_the_wrong_width_is_rejected(gen):
    moe = EPMoE.from_dense(CFG, **_dense(gen))
    with pytest.raises(ValueError, match=r"hidden: expected shape \(T, 256\), got \(4, 128\)"):
        moe(torch.randn(4, 128))


def test_non_finite_hidden_is_rejected(gen):
    moe = EPMoE.from_dense(CFG, **_dense(gen))
    x = torch.randn(4, M.hidden_size)
    x[2, 7] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        moe(x, torch.zeros(4, dtype=torch.long))


def test_integer_hidden_is_rejected(gen):
    moe = EPMoE.from_dense(CFG, **_dense(gen))
    with pytest.raises(TypeError, match="hidden: expected a floating-point tensor"):
        moe(torch.zeros(4, M.hidden_size, dtype=torch.int32))


def test_dense_weights_must_cover_every_expert(gen):
    d = _dense(gen)
    d["gate"] = d["gate"][:-1]
    with pytest.raises(ValueError, match="gate: expected 32 experts"):
        EPMoE.from_dense(CFG, **d)


def test_the_cuda_backend_without_a_gpu_is_a_clear_error(gen):
    with pytest.raises(RuntimeError, match="backend: 'cuda' needs an sm_90 CUDA device"):
        EPMoE.from_dense(CFG.replace(backend="cuda"), **_dense(gen))


def test_outputs_do_not_alias_the_communication_buffer(gen):
    moe = EPMoE.from_dense(CFG, **_dense(gen))
    ids = torch.zeros(4, dtype=torch.long)
    first = moe(torch.randn(4, M.hidden_size, generator=gen), ids)
    kept = first.clone()
    moe(torch.randn(4, M.hidden_size, generator=gen), ids)
    assert torch.equal(first, kept)
