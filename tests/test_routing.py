"""NVFP4_SPEC section 6: V4 sqrtsoftplus + bias + hash layers, V3 sigmoid group-limited; deterministic ties."""
import math

import pytest
import torch

from ep_runtime.config import ModelConfig
from ep_runtime.routing import Router, route_v3, route_v4


def _sqrtsoftplus(x):
    return math.sqrt(math.log1p(math.exp(x)))


def test_v4_picks_the_highest_scores_and_normalizes_weights_times_scaling():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    ids, w = route_v4(logits, None, k=2, scaling=2.5)
    assert ids.tolist() == [[1, 3]]
    s1, s3 = _sqrtsoftplus(2.0), _sqrtsoftplus(1.0)
    assert w[0].tolist() == pytest.approx([2.5 * s1 / (s1 + s3), 2.5 * s3 / (s1 + s3)], rel=1e-6)


def test_v4_bias_selects_but_does_not_weight():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    ids, w = route_v4(logits, bias, k=2, scaling=1.0)
    assert ids.tolist() == [[2, 1]]
    s2, s1 = _sqrtsoftplus(-1.0), _sqrtsoftplus(2.0)
    assert w[0].tolist() == pytest.approx([s2 / (s1 + s2), s1 / (s1 + s2)], rel=1e-6)


def test_v4_ties_pick_the_lower_expert_index():
    ids, _ = route_v4(torch.zeros(3, 8), None, k=3, scaling=1.0)
    assert ids.tolist() == [[0, 1, 2]] * 3


def test_v4_rejects_k_above_the_number_of_experts():
    with pytest.raises(ValueError, match=r"k: expected 1\.\.4 \(the scores per row\), got 6"):
        route_v4(torch.zeros(1, 4), None, k=6, scaling=1.0)


def test_v4_hash_layer_takes_ids_from_the_table_and_weights_from_scores():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    ids, w = route_v4(logits, None, k=2, scaling=1.0, hash_ids=torch.tensor([[0, 2]]))
    assert ids.tolist() == [[0, 2]]
    s0, s2 = _sqrtsoftplus(0.5), _sqrtsoftplus(-1.0)
    assert w[0].tolist() == pytest.approx([s0 / (s0 + s2), s2 / (s0 + s2)], rel=1e-6)


def test_v3_keeps_only_the_best_groups():
    # 4 groups of 2. Expert 6 has the best single score but its group's top-2 sum is the worst.
    logits = torch.tensor([[2.0, 2.0, 1.5, 1.5, 0.0, 0.0, 3.0, -9.0]])
    ids, w = route_v3(logits, None, k=2, scaling=1.0, n_group=4, topk_group=2)
    assert ids.tolist() == [[0, 1]]
    assert w[0].tolist() == pytest.approx([0.5, 0.5])


def test_v3_rejects_topk_group_above_the_number_of_groups():
    with pytest.raises(ValueError, match=r"topk_group: expected 1\.\.4 \(the scores per row\), got 5"):
        route_v3(torch.zeros(1, 8), None, k=2, scaling=1.0, n_group=4, topk_group=5)


def test_v3_weights_use_unbiased_scores():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    ids, w = route_v3(logits, torch.tensor([10.0, 0, 0, 0]), k=2, scaling=2.0, n_group=1, topk_group=1)
    assert ids.tolist() == [[0, 3]]
    s0, s3 = 1 / (1 + math.exp(0.0)), 1 / (1 + math.exp(-3.0))
    assert w[0].tolist() == pytest.approx([2 * s0 / (s0 + s3), 2 * s3 / (s0 + s3)], rel=1e-6)


def _cfg(**kw):
    base = dict(name="t", hidden_size=64, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
                num_hash_layers=1, vocab_size=10)
    return ModelConfig(**{**base, **kw})


def test_router_hash_layer_needs_input_ids():
    r = Router(_cfg(), torch.randn(8, 64), tid2eid=torch.zeros(10, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="input_ids"):
        r(torch.randn(3, 64))


def test_a_sigmoid_router_handed_a_table_checks_no_token_ids():
    # V3 scoring routes by scores whatever table it holds; the checks of several ranks' inputs call this first
    r = Router(_cfg(scoring_func="sigmoid", num_hash_layers=0, n_group=1, topk_group=1), torch.randn(8, 64),
               tid2eid=torch.zeros(10, 2, dtype=torch.int32))
    r.check_token_ids(torch.randn(3, 64), None)
    r.check_token_ids(torch.randn(3, 64), torch.tensor([0, 10, 99]))


def test_router_rejects_token_ids_outside_the_vocabulary():
    r = Router(_cfg(), torch.randn(8, 64), tid2eid=torch.zeros(10, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 10\)"):
        r(torch.randn(2, 64), torch.tensor([3, 10]))


def test_router_rejects_a_hash_table_with_expert_ids_out_of_range():
    with pytest.raises(ValueError, match=r"router tid2eid: expected expert ids in \[0, 8\), got values in \[8, 8\]"):
        Router(_cfg(), torch.randn(8, 64), tid2eid=torch.full((10, 2), 8, dtype=torch.int32))


def test_router_rejects_a_weight_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"router weight: expected shape \(8, 64\)"):
        Router(_cfg(), torch.randn(8, 32))


def test_router_writes_into_the_rows_it_is_given():
    r = Router(_cfg(num_hash_layers=0), torch.randn(8, 64))
    hidden = torch.randn(3, 64)
    out = torch.full((3, 2), -1, dtype=torch.int32), torch.full((3, 2), float("nan"))
    ids, w = r(hidden, out=out)
    assert ids is out[0] and w is out[1]
    want_ids, want_w = r(hidden)
    assert torch.equal(ids, want_ids) and torch.equal(w, want_w)


def test_router_rejects_rows_of_another_shape_to_write_into():
    r = Router(_cfg(num_hash_layers=0), torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"out\[0\] \(ids\): expected shape \(3, 2\), got \(4, 2\)"):
        r(torch.randn(3, 64), out=(torch.zeros(4, 2, dtype=torch.int32), torch.zeros(4, 2)))


def test_router_keeps_a_bf16_copy_of_a_weight_exact_in_bf16():
    w = torch.randn(8, 64).bfloat16()
    assert torch.equal(Router(_cfg(num_hash_layers=0), w).weight_bf16, w)
    assert torch.equal(Router(_cfg(num_hash_layers=0), w.float()).weight_bf16, w)


def test_router_keeps_no_bf16_copy_of_a_weight_bf16_would_round():
    w = torch.randn(8, 64).bfloat16().float()
    w[3, 5] += w[3, 5].abs() * 2**-12  # below a bf16 ulp
    assert Router(_cfg(num_hash_layers=0), w).weight_bf16 is None


def test_a_hash_layer_refuses_token_ids_of_a_float_dtype():
    router = Router(_cfg(), torch.randn(8, 64), tid2eid=torch.randint(0, 8, (10, 2)))
    with pytest.raises(TypeError, match="input_ids: expected an integer dtype .*, got torch.float32"):
        router(torch.randn(3, 64), torch.zeros(3))
    ids, _ = router(torch.randn(3, 64), torch.tensor([1, 2, 3], dtype=torch.int32))
    assert torch.equal(ids, router.tid2eid[torch.tensor([1, 2, 3])])


@pytest.mark.parametrize("where,value", [("weight", float("nan")), ("bias", float("inf")), ("bias", float("nan"))])
def test_router_rejects_a_non_finite_weight_or_bias(where, value):
    # A NaN weight made every routing weight NaN; an infinite bias picked its expert for every token.
    weight, bias = torch.randn(8, 64), torch.zeros(8)
    (weight if where == "weight" else bias).view(-1)[5] = value
    with pytest.raises(ValueError, match=rf"router {where}: expected finite values, found {value}"):
        Router(_cfg(num_hash_layers=0), weight, bias)


def test_router_rejects_a_hash_table_of_float_ids():
    with pytest.raises(TypeError, match="router tid2eid: expected an integer dtype .*, got torch.float32"):
        Router(_cfg(), torch.randn(8, 64), tid2eid=torch.full((10, 2), 1.5))


def test_router_accepts_a_hash_table_naming_an_expert_twice_for_a_token():
    # The model's own gather gives such a token that expert twice; so does moe_align (one slot per (token, k)).
    r = Router(_cfg(), torch.randn(8, 64), tid2eid=torch.tensor([[3, 3]] * 10, dtype=torch.int32))
    ids, weights = r(torch.randn(2, 64), torch.tensor([0, 9]))
    assert ids.tolist() == [[3, 3], [3, 3]] and torch.allclose(weights[:, 0], weights[:, 1])


def test_router_owns_copies_of_its_tensors_outside_autograd():
    weight = torch.nn.Parameter(torch.randn(8, 64))
    r = Router(_cfg(num_hash_layers=0), weight)
    hidden = torch.randn(3, 64)
    ids, w = r(hidden)
    assert not w.requires_grad and r.weight.data_ptr() != weight.data_ptr()
    with torch.no_grad():
        weight.mul_(-1)  # the caller's parameter changes; the router it was copied into does not
    ids2, w2 = r(hidden)
    assert torch.equal(ids, ids2) and torch.equal(w, w2)


def test_router_rejects_hidden_of_another_width():
    # On a GPU, few tokens went to the router-logits kernel, which read the weight with the hidden's width.
    r = Router(_cfg(num_hash_layers=0), torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"hidden: expected shape \(T, 64\), got \(3, 32\)"):
        r(torch.randn(3, 32))


def test_router_rejects_output_rows_on_another_device():
    r = Router(_cfg(num_hash_layers=0), torch.randn(8, 64))
    out = (torch.empty(3, 2, dtype=torch.int32, device="meta"), torch.empty(3, 2))
    with pytest.raises(ValueError, match=r"out\[0\] \(ids\): expected device cpu, got meta"):
        r(torch.randn(3, 64), out=out)


def test_router_conversions_move_it_but_keep_its_dtypes():
    r = Router(_cfg(), torch.randn(8, 64).bfloat16(), torch.zeros(8), torch.zeros(10, 2, dtype=torch.int32))
    dtypes = [t.dtype for t in r.tensors()]
    r.to(torch.float64).half()
    assert [t.dtype for t in r.tensors()] == dtypes
    r.to("meta")
    assert [t.dtype for t in r.tensors()] == dtypes and all(t.device.type == "meta" for t in r.tensors())


def test_router_keeps_a_transposed_weight_row_major():
    # The GPU's router-logits kernel reads the weight row-major, unchecked: a column-major copy routed wrongly.
    w = torch.randn(64, 8).bfloat16().float().t()  # exact in bf16, so the router keeps a bf16 copy too
    r = Router(_cfg(num_hash_layers=0), w)
    assert r.weight.is_contiguous() and r.weight_bf16 is not None and r.weight_bf16.is_contiguous()
    assert torch.equal(r.weight, w)


def test_router_tensors_follow_share_memory_and_to_empty():
    r = Router(_cfg(), torch.randn(8, 64), torch.zeros(8), torch.zeros(10, 2, dtype=torch.int32))
    r.share_memory()
    assert all(t.is_shared() for t in r.tensors())
    r.to_empty(device="meta")
    assert all(t.device.type == "meta" for t in r.tensors())
