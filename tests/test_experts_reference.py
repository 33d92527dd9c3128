"""The reference expert stage (NVFP4_SPEC sections 4, 5, 7) against hand values and an independent model."""
import math

import pytest
import torch

from ep_runtime import nvfp4
from ep_runtime.experts import ExpertSpec, combine, expert_stage, map_slots, swiglu
from ep_runtime.weights import ExpertWeights

E, H, I, TOPK = 6, 128, 64, 3


def _random_experts(gen):
    w = ExpertWeights.synthetic(range(E), H, I, int(torch.randint(2**31, (1,), generator=gen)), "cpu")
    w.l2_input_scale.copy_((1.5 + 3 * torch.rand(E, generator=gen)) / 2688)  # each expert's own static h scale
    return w


def test_slots_are_ordered_by_expert_then_token_then_k():
    topk_idx = torch.tensor([[1, 0], [0, 2]], dtype=torch.int32)
    s = map_slots(topk_idx, num_local=2, expert_begin=0)
    assert s.counts.tolist() == [2, 1]
    assert s.offsets.tolist() == [0, 2, 3]
    assert s.slot_pair.tolist() == [1, 2, 0, -1]  # (t0,k1), (t1,k0) for expert 0; (t0,k0) for expert 1


def test_slots_skip_experts_owned_by_other_ranks():
    topk_idx = torch.tensor([[4, 5], [7, 4]], dtype=torch.int32)
    s = map_slots(topk_idx, num_local=2, expert_begin=4)
    assert s.counts.tolist() == [2, 1] and s.slot_pair.tolist() == [0, 3, 1, -1]


def test_swiglu_clamps_gate_from_above_only_and_up_on_both_sides():
    gate_up = torch.tensor([[20.0, -3.0, -30.0, -30.0, 0.5, 2.0]])  # gate = [20, -3, -30], up = [-30, 0.5, 2]
    h = swiglu(gate_up, limit=10.0)
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    assert h[0].tolist() == pytest.approx([silu(10.0) * -10.0, silu(-3.0) * 0.5, silu(-30.0) * 2.0], rel=1e-6)


@pytest.mark.parametrize("limit", [float("nan"), float("inf"), 0.0, -10.0])
def test_spec_rejects_a_swiglu_limit_that_is_not_a_finite_positive_number(limit):
    with pytest.raises(ValueError, match="swiglu_limit: expected None or a finite number > 0"):
        ExpertSpec("nvfp4", "static", limit)


def test_swiglu_without_limit_does_not_clamp():
    h = swiglu(torch.tensor([[20.0, -30.0]]), limit=None)
    assert h.item() == pytest.approx(20 / (1 + math.exp(-20)) * -30.0, rel=1e-6)


def test_combine_applies_each_weight_once_in_k_order():
    topk_idx = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    s = map_slots(topk_idx, 2, 0)  # slots: (t0,k0), (t1,k1), (t0,k1), (t1,k0)
    y_slot = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    w = torch.tensor([[0.5, 0.25], [2.0, 1.0]])
    assert combine(y_slot, s, w, 2).tolist() == [[0.5 * 1 + 0.25 * 3], [2.0 * 4 + 1.0 * 2]]


def test_combine_sums_in_fp32_with_k_ascending():
    # 1 + 1e8 rounds to 1e8 in fp32, so k ascending gives 0 where k descending, or the slots' (experts') order, gives 1
    s = map_slots(torch.tensor([[2, 1, 0]], dtype=torch.int32), 3, 0)  # slots: (t0,k2), (t0,k1), (t0,k0)
    y = combine(torch.tensor([[-1e8], [1e8], [1.0]]), s, torch.ones(1, 3), 1)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    assert y.item() == ((f32(1.0) + f32(1e8)) + f32(-1e8)).item() == 0.0


def test_tokens_without_local_experts_get_zero():
    topk_idx = torch.tensor([[0, 1], [5, 4]], dtype=torch.int32)
    s = map_slots(topk_idx, 2, 0)
    y = combine(torch.ones(2, 3), s, torch.ones(2, 2), 2)
    assert y[1].eq(0).all() and y[0].eq(2).all()


def _naive_stage(x, topk_idx, topk_w, weights, spec, gs_x):
    """Independent model: per (token, k) loop in float64 over fully dequantized tensors; the per-expert h
    scale is found by grouping slots per expert first (dynamic) or taken from the weights (static)."""
    w13, w2 = (t.double() for t in weights.dequantized())
    if spec.act_mode == "nvfp4":
        xq = nvfp4.quantize(x, gs_x)
        x_hat = nvfp4.dequantize(xq).double()
    else:
        x_hat = x.to(torch.bfloat16).double()
    t_count = x.shape[0]
    h = {}
    for t in range(t_count):
        for k in range(TOPK):
            e = int(topk_idx[t, k])
            gate, up = (w13[e] @ x_hat[t]).float().chunk(2)
            if spec.swiglu_limit is not None:  # the spec's SwiGLU, written out here rather than taken from experts.py
                gate, up = gate.clamp(max=spec.swiglu_limit), up.clamp(-spec.swiglu_limit, spec.swiglu_limit)
            h[(t, k)] = gate * torch.sigmoid(gate) * up
    out = torch.zeros(t_count, H, dtype=torch.float64)
    for e in range(E):
        pairs = [p for p in h if int(topk_idx[p]) == e]
        if not pairs:
            continue
        he = torch.stack([h[p] for p in pairs])
        if spec.act_mode == "nvfp4":
            g = 1 / weights.l2_input_scale[e] if spec.l2_scale_mode == "static" else None
            he_hat = nvfp4.dequantize(nvfp4.quantize(he, g)).double()
        else:
            he_hat = he.to(torch.bfloat16).double()
        for (t, k), hrow in zip(pairs, he_hat):
            out[t] += float(topk_w[t, k]) * (w2[e] @ hrow)
    return out


@pytest.mark.parametrize("act_mode,scale_mode,limit", [("nvfp4", "dynamic", 10.0), ("nvfp4", "static", 10.0),
                                                       ("bf16", "static", None)])
def test_expert_stage_matches_an_independent_per_token_model(gen, act_mode, scale_mode, limit):
    weights = _random_experts(gen)
    spec = ExpertSpec(act_mode, scale_mode, limit)
    t_count = 9
    x = torch.randn(t_count, H, generator=gen) * 2
    topk_idx = torch.stack([torch.randperm(E, generator=gen)[:TOPK] for _ in range(t_count)]).int()
    topk_idx[:, 0] = 1  # one crowded expert, and expert 5 likely idle: uneven routing
    topk_w = torch.rand(t_count, TOPK, generator=gen)
    gs_x = None if scale_mode == "dynamic" else 1 / weights.l1_input_scale
    acts = nvfp4.quantize(x, gs_x) if act_mode == "nvfp4" else x.to(torch.bfloat16)
    got = expert_stage(acts, topk_idx, topk_w, weights, 0, spec)
    ref = _naive_stage(x, topk_idx, topk_w, weights, spec, gs_x)
    # bf16 h: gate/up summed in another order can land an element of h one bf16 ulp (2^-8) away, which moves the
    # output by up to ~1e-4 of its norm per element (seen: 7.7e-4 where the flip hit a row's largest element, 4 seeds
    # in 1500 above 1e-4); a wrong stage is off by more than 1e-2.
    tol = 2e-3 if act_mode == "bf16" else 1e-5
    assert ((got.double() - ref).norm() / ref.norm()).item() < tol


def test_unknown_backend_is_rejected(gen):
    weights = _random_experts(gen)
    with pytest.raises(ValueError, match=r"^backend: expected 'reference' or 'cuda', got 'magic'$"):
        expert_stage(nvfp4.quantize(torch.randn(1, H)), torch.zeros(1, TOPK, dtype=torch.int32),
                     torch.ones(1, TOPK), weights, 0, ExpertSpec(), backend="magic")


def _stage_args(gen, t=5):
    acts = nvfp4.quantize(torch.randn(t, H, generator=gen))
    idx = torch.randint(0, E, (t, TOPK), generator=gen, dtype=torch.int32)
    return acts, idx, torch.rand(t, TOPK, generator=gen)


@pytest.mark.parametrize("bad,error,message", [
    ("weights-short", ValueError, r"topk_weights: expected shape \(5, 3\) \(topk_idx's\), got \(5, 2\)"),
    ("no-experts", ValueError, r"topk_idx: expected at least one expert per token, got shape \(5, 0\)"),
    ("bf16-acts", TypeError, "acts: expected an NVFP4Tensor in act_mode 'nvfp4', got Tensor"),
    ("rows-short", ValueError, r"acts: expected codes \(5, 64\) and scales \(5, 8\) for 5 tokens of hidden 128, got "
                               r"\(4, 64\) and \(4, 8\)"),
])
def test_the_reference_stage_names_an_argument_that_does_not_fit_the_others(gen, bad, error, message):
    # These raised IndexError, AttributeError or a matmul's shape error from deep inside torch.
    acts, idx, w = _stage_args(gen)
    if bad == "weights-short":
        w = w[:, :2]
    if bad == "no-experts":
        idx, w = idx[:, :0], w[:, :0]
    if bad == "bf16-acts":
        acts = torch.randn(5, H, generator=gen).bfloat16()
    if bad == "rows-short":
        acts = nvfp4.NVFP4Tensor(acts.data[:4], acts.scale[:4], acts.global_scale)
    with pytest.raises(error, match=message):
        expert_stage(acts, idx, w, _random_experts(gen), 0, ExpertSpec("nvfp4", "dynamic", None))
