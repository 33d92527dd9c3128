"""EPMoE as an nn.Module a custom model calls: construction, validation, capacity."""
import copy
import dataclasses
import pickle
import re

import pytest
import torch

from ep_runtime import moe as moe_module
from ep_runtime import nvfp4
from ep_runtime.checkpoint import synthetic_layer
from ep_runtime.config import load_config
from ep_runtime.dist_utils import init_process_group, spawn_local
from ep_runtime.experts import ExpertSpec, expert_stage
from ep_runtime.moe import EPMoE
from ep_runtime.scratch import LayerScratch, shared_split
from ep_runtime.weights import ExpertWeights

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
    without = EPMoE.from_dense(_without_shared_expert(CFG), **{**d, "shared": None})
    x = torch.randn(4, M.hidden_size, generator=gen)
    ids = torch.randint(0, M.vocab_size, (4,), generator=gen)
    y, routed = with_shared(x, ids), without(x, ids)
    # The shared expert on its own: every token once with weight 1, on x staged as CFG stages it (act_scale=dynamic).
    spec = ExpertSpec(CFG.runtime.act_mode, CFG.runtime.act_scale, M.swiglu_limit)
    t = x.shape[0]
    shared = expert_stage(nvfp4.quantize(x), torch.zeros(t, 1, dtype=torch.int32), torch.ones(t, 1),
                          with_shared.shared, 0, spec)
    # fp32 on CPU: y = fl(routed + shared), so y - routed misses shared by at most one rounding of the sum and one
    # of the difference, each within half an ulp (2^-24 relative) of |y| and |shared|; 2^-23 leaves a margin.
    assert ((y - routed) - shared).abs().le(2**-23 * (y.abs() + shared.abs())).all()
    assert shared.abs().sum() > 0


def _without_shared_expert(cfg):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_shared_experts=0))


def test_dense_weights_must_have_a_shared_expert_exactly_when_the_config_does(gen):
    d = _dense(gen)
    with pytest.raises(ValueError, match=r"shared: expected the shared expert \(model.n_shared_experts=1\), got none"):
        EPMoE.from_dense(CFG, **{**d, "shared": None})
    with pytest.raises(ValueError, match=r"shared: expected none \(model.n_shared_experts=0\), got one"):
        EPMoE.from_dense(_without_shared_expert(CFG), **d)


def test_layer_weights_without_the_configured_shared_expert_are_rejected():
    with pytest.raises(ValueError, match=r"weights.shared: expected the shared expert"):
        EPMoE(CFG, dataclasses.replace(_layer(), shared=None))


def test_more_tokens_than_the_buffer_holds_is_a_clear_error(gen):
    moe = EPMoE.from_dense(CFG, **_dense(gen))
    with pytest.raises(ValueError, match="17 tokens exceed the symmetric buffer capacity max_tokens=16"):
        moe(torch.randn(17, M.hidden_size), torch.zeros(17, dtype=torch.long))


def test_hidden_of_the_wrong_width_is_rejected(gen):
    moe = EPMoE.from_dense(CFG, **_dense(gen))
    with pytest.raises(ValueError, match=r"hidden: expected shape \(T, 256\), got \(4, 128\)"):
        moe(torch.randn(4, 128))


@pytest.mark.parametrize("act_mode", ["nvfp4", "bf16"])
def test_non_finite_hidden_is_rejected(gen, act_mode):
    moe = EPMoE.from_dense(CFG.replace(act_mode=act_mode), **_dense(gen))
    x = torch.randn(4, M.hidden_size)
    x[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"^hidden: expected finite values, found nan at index \[2, 7\]$"):
        moe(x, torch.zeros(4, dtype=torch.long))


def test_integer_hidden_is_rejected(gen):
    moe = EPMoE.from_dense(CFG, **_dense(gen))
    with pytest.raises(TypeError, match="hidden: expected a floating-point tensor"):
        moe(torch.zeros(4, M.hidden_size, dtype=torch.int32))


def test_hidden_that_requires_grad_is_refused_outside_no_grad(gen):
    moe = EPMoE.from_dense(CFG, **_dense(gen))
    x = torch.randn(4, M.hidden_size, generator=gen, requires_grad=True)
    ids = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"hidden: expected a tensor that does not require grad \(EPMoE runs forward "
                                         r"only"):
        moe(x, ids)
    with torch.no_grad():
        assert torch.equal(moe(x, ids), moe(x.detach(), ids))


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


@pytest.mark.parametrize("overrides", [[], ["act_scale=static"], ["act_mode=bf16", "act_scale=static"],
                                       ["scoring_func=sigmoid", "num_hash_layers=0", "n_group=4", "topk_group=2"]],
                         ids=["w4a4-dynamic", "w4a4-static", "w4a16", "v3-routing"])
@pytest.mark.parametrize("layer", [0, 1], ids=["hash-layer", "routed-layer"])
def test_a_forward_of_no_tokens_returns_no_rows(overrides, layer):
    """A rank may get an empty batch; its layer still runs (its peers' all-reduce needs it) and returns (0, H)."""
    cfg = load_config("tiny", ["world_size=1", "max_tokens=16", "tokens=16", *overrides])
    out = EPMoE.from_synthetic(cfg, layer, 0, 1)(torch.randn(0, M.hidden_size), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, M.hidden_size) and out.dtype == cfg.runtime.torch_dtype


def _layer(world_size=1):
    """Synthetic row-layout weights of rank 0 for CFG."""
    return synthetic_layer(M, 0, 0, world_size, 0, "cpu")


def _same_bytes(a: ExpertWeights, b: ExpertWeights) -> bool:
    return a.layout == b.layout and all(torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
                                        for x, y in zip(a._tensors().values(), b._tensors().values()))


@pytest.fixture
def cuda_simulated(monkeypatch, cpu_devices_pass):
    """Construction takes the CUDA backend (tiling, workspaces, stages) on CPU tensors, which on a GPU are the
    caller's own tensors whenever the weights already are on the device; forward is never run, so the side stream
    and its events are placeholders."""
    monkeypatch.setattr(moe_module, "cuda_backend_available", lambda device: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: object())
    monkeypatch.setattr(torch.cuda, "Event", lambda: object())


def test_a_failed_construction_leaves_the_callers_weights_as_they_were(cuda_simulated):
    w = _layer()
    w.shared.w2_scale.view(torch.uint8)[0, 1, 0] = 0x7F  # NaN, in the stack checked after the routed experts'
    experts, shared = w.experts.clone(), w.shared.clone()
    with pytest.raises(ValueError, match=r"weights.shared.w2_scale: block scales must be finite, non-negative UE4M3; "
                                         r"found byte 0x7F at \(0, 1, 0\)"):
        EPMoE(CFG, w)
    assert _same_bytes(w.experts, experts) and _same_bytes(w.shared, shared)


def test_a_non_contiguous_stack_fails_construction_before_any_stack_is_tiled(cuda_simulated):
    w = _layer()
    w.shared.w2 = w.shared.w2.transpose(1, 2).contiguous().transpose(1, 2)  # the same bytes, column-major
    experts, shared = w.experts.clone(), w.shared.clone()
    with pytest.raises(ValueError, match=r"weights.shared.w2: expected a contiguous tensor"):
        EPMoE(CFG, w)
    assert w.experts.layout == w.shared.layout == "rows"
    assert _same_bytes(w.experts, experts) and _same_bytes(w.shared, shared)


def test_a_bad_shared_expert_scale_names_the_shared_expert(cuda_simulated):
    w = _layer()
    w.shared.w2_scale.view(torch.uint8)[0, 1, 0] = 0x7F
    with pytest.raises(ValueError, match="weights.shared.w2_scale: block scales must be finite"):
        EPMoE(CFG, w)


def test_weights_tiled_in_place_say_so_to_the_caller(cuda_simulated):
    w = _layer()
    moe = EPMoE(CFG, w)
    assert moe.experts is w.experts and w.experts.layout == "sm90"
    assert moe.shared is w.shared and w.shared.layout == "sm90"


def test_weights_already_tiled_are_rejected(cuda_simulated, monkeypatch):
    w = _layer()
    EPMoE(CFG, w)
    monkeypatch.setattr(moe_module, "cuda_backend_available", lambda device: False)
    with pytest.raises(ValueError, match="weights.experts: EPMoE takes layout 'rows', got 'sm90'"):
        EPMoE(CFG, w)


@pytest.mark.parametrize("rank", [-1, 4])
def test_a_rank_outside_the_world_is_rejected(rank):
    with pytest.raises(ValueError, match=f"rank: expected 0..3, got {rank}"):
        EPMoE(CFG, _layer(4), rank=rank, world_size=4)


@pytest.mark.parametrize("world_size", [0, 3])
def test_a_world_size_not_dividing_the_experts_is_rejected(gen, world_size):
    with pytest.raises(ValueError, match=f"world_size: must divide n_routed_experts=32, got {world_size}"):
        EPMoE.from_dense(CFG, **_dense(gen), world_size=world_size)


@pytest.mark.parametrize("name,index", [("gate", 0), ("gate", 2), ("up", 2), ("down", 1)])
def test_dense_weights_of_the_wrong_size_are_rejected(gen, name, index):
    d = _dense(gen)
    d[name] = d[name].narrow(index, 0, d[name].shape[index] - 1)  # one expert (index 0), row or column short
    with pytest.raises(ValueError, match=f"{name}: expected 32 experts of shape .*, got shape"):
        EPMoE.from_dense(CFG, **d)


@pytest.mark.parametrize("index,name", [(0, "shared gate"), (2, "shared down")])
def test_a_shared_dense_weight_of_the_wrong_size_is_rejected(gen, index, name):
    d = _dense(gen)
    shared = list(d["shared"])
    shared[index] = shared[index][:64]
    with pytest.raises(ValueError, match=f"{name}: expected shape"):
        EPMoE.from_dense(CFG, **{**d, "shared": tuple(shared)})


def test_l2_input_scale_of_the_wrong_shape_is_rejected(gen):
    with pytest.raises(ValueError, match=r"l2_input_scale: expected shape \(32,\), got shape \(\)"):
        EPMoE.from_dense(CFG, **{**_dense(gen), "l2_input_scale": torch.tensor(2 / 2688)})


def test_a_non_finite_dense_weight_is_named_with_its_expert(gen):
    d = _dense(gen)
    d["gate"][3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"gate: expected finite values, found nan at index \[3, 0, 0\]"):
        EPMoE.from_dense(CFG, **d)


@pytest.mark.parametrize("stack", ["experts", "shared"])
def test_expert_weights_of_another_hidden_size_are_rejected(stack):
    w = _layer()
    setattr(w, stack, ExpertWeights.synthetic(range(getattr(w, stack).num_experts), 128, 128, 0, "cpu"))
    with pytest.raises(ValueError, match=f"weights.{stack}.w13: expected torch.uint8 of shape"):
        EPMoE(CFG, w)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_a_non_positive_or_non_finite_l1_input_scale_is_rejected(gen, scale):
    with pytest.raises(ValueError, match="l1_input_scale: expected a finite positive scale"):
        EPMoE.from_dense(CFG, **{**_dense(gen), "l1_input_scale": scale})


def test_a_negative_l2_input_scale_is_rejected(gen):
    d = _dense(gen)
    d["l2_input_scale"][5] = -1.0
    with pytest.raises(ValueError, match="l2_input_scale: expected a finite positive scale"):
        EPMoE.from_dense(CFG, **d)


def test_a_zero_shared_l2_input_scale_is_rejected(gen):
    d = _dense(gen)
    d["shared"] = (*d["shared"][:3], 0.0)
    with pytest.raises(ValueError, match="shared l2_input_scale: expected a finite positive scale"):
        EPMoE.from_dense(CFG, **d)


def _scratch(cfg=CFG, world_size=1):
    return LayerScratch.allocate(cfg, 0, world_size, torch.device("cpu"), "reference")


def test_a_scratch_made_for_the_layer_is_used():
    scratch = _scratch()
    moe = EPMoE(CFG, _layer(), scratch=scratch)
    assert moe.scratch is scratch and moe.buffer is scratch.buffer


def _model(**changes):
    return dataclasses.replace(CFG, model=dataclasses.replace(M, **changes))


@pytest.mark.parametrize("cfg,message", [
    (CFG.replace(act_mode="bf16"), "act_mode 'nvfp4', the scratch was made for 'bf16'"),
    (CFG.replace(act_scale="static"), "act_scale 'dynamic', the scratch was made for 'static'"),
    (CFG.replace(dtype="bfloat16"), "output dtype torch.float32, the scratch was made for torch.bfloat16"),
    (CFG.replace(max_tokens=32), "max_tokens 16, the scratch was made for 32"),
    (_model(num_experts_per_tok=2), "topk 6, the scratch was made for 2"),
    (_model(moe_intermediate_size=64), "moe_intermediate_size 128, the scratch was made for 64"),
    (_model(n_shared_experts=0), "shared expert intermediate size 128, the scratch was made for 0"),
], ids=["act_mode", "act_scale", "dtype", "max_tokens", "topk", "intermediate", "shared"])
def test_a_scratch_made_for_other_shapes_is_rejected(cfg, message):
    with pytest.raises(ValueError, match=f"scratch: this layer needs {message}"):
        EPMoE(CFG, _layer(), scratch=_scratch(cfg))


def test_a_symmetric_buffer_in_place_of_a_scratch_is_rejected():
    with pytest.raises(TypeError, match="scratch: expected a LayerScratch .*, got SymmBuffer"):
        EPMoE(CFG, _layer(), scratch=_scratch().buffer)


def test_layers_sharing_a_scratch_give_the_outputs_they_give_alone(gen):
    seed = int(torch.randint(0, 2**30, (1,), generator=gen))
    cfgs = [CFG.replace(seed=seed), CFG.replace(seed=seed + 1)]  # two layers' weights
    alone = [EPMoE.from_synthetic(cfg, 1) for cfg in cfgs]
    first = EPMoE.from_synthetic(cfgs[0], 1)
    sharing = [first, EPMoE.from_synthetic(cfgs[1], 1, scratch=first.scratch)]
    xs = [torch.randn(t, M.hidden_size, generator=gen) for t in (16, 5)]
    expected = [layer(x) for x in xs for layer in alone]
    got = [layer(x) for x in xs for layer in sharing]  # interleaved, each output kept past the next forward
    for g, want in zip(got, expected):
        assert torch.isfinite(g).all() and torch.equal(g, want)
    assert not torch.equal(got[0], got[1])  # two layers, two sets of weights


def test_several_ranks_without_a_process_group_are_rejected():
    with pytest.raises(ValueError, match="world_size: 2 ranks need an initialized default process group"):
        EPMoE(CFG, _layer(2), world_size=2)


def _group_worker(rank, world, out_dir):
    init_process_group(torch.device("cpu"), 60)
    attempts = {"size": dict(rank=rank, world_size=4), "rank": dict(rank=world - 1 - rank, world_size=world),
                "scratch": dict(rank=rank, world_size=world, scratch=_scratch())}
    for name, kwargs in attempts.items():
        try:
            EPMoE.from_synthetic(CFG, **kwargs)
            msg = "no error"
        except ValueError as e:
            msg = str(e)
        with open(f"{out_dir}/{name}{rank}.txt", "w") as f:
            f.write(msg)


@pytest.fixture(scope="module")
def group_errors(tmp_path_factory):
    """What construction says on each of two gloo ranks when its arguments disagree with the process group."""
    out = tmp_path_factory.mktemp("group")
    spawn_local(_group_worker, 2, str(out))
    return lambda name, rank: (out / f"{name}{rank}.txt").read_text()


def test_a_world_size_other_than_the_process_groups_is_rejected(group_errors):
    assert group_errors("size", 0) == "world_size: expected the default process group's size 2, got 4"


def test_a_rank_other_than_the_process_groups_is_rejected(group_errors):
    assert group_errors("rank", 1) == "rank: expected this process's rank in the default process group, 1, got 0"


def test_a_scratch_made_for_another_world_is_rejected(group_errors):
    assert group_errors("scratch", 0) == "scratch: this layer needs world_size 2, the scratch was made for 1"


@pytest.mark.parametrize("hidden,world_size,act_scale,ok", [
    (320, 2, "static", False),  # rank 1's scale rows could start at 20 bytes past a boundary
    (512, 2, "static", True),
    (320, 1, "static", True),  # one rank takes every token from row 0
    (320, 2, "dynamic", True),  # rank 0 takes every token (the h amax spans them)
])
def test_the_cuda_shared_expert_token_split_needs_16_byte_aligned_scale_rows(hidden, world_size, act_scale, ok):
    cfg = load_config("tiny", [f"hidden_size={hidden}", f"act_scale={act_scale}"])
    spec = ExpertSpec(cfg.runtime.act_mode, cfg.runtime.act_scale)
    if ok:
        moe_module._check_shared_rows_aligned(cfg.model, spec, world_size)
    else:
        with pytest.raises(ValueError, match=r"model\.hidden_size: .* expected a multiple of 256 .*, got 320"):
            moe_module._check_shared_rows_aligned(cfg.model, spec, world_size)


@pytest.mark.parametrize("overrides,world_size,backend,want", [
    ([], 2, "cuda", (4, 64)),  # tiny: a shared expert of 128 intermediate columns, 64 per rank
    (["act_mode=bf16", "act_scale=dynamic"], 2, "cuda", (4, 64)),  # W4A16 has no h scale
    (["max_tokens=2", "tokens=2"], 2, "cuda", (2, 64)),  # the slice's workspace holds at most max_tokens
    (["shared_split_tokens=0"], 2, "cuda", (0, 0)),
    ([], 1, "cuda", (0, 0)),  # one rank runs the whole expert
    ([], 2, "reference", (0, 0)),
    (["act_scale=dynamic"], 2, "cuda", (0, 0)),  # an amax over the whole intermediate dim
    ([], 4, "cuda", (0, 0)),  # 32 columns a rank: not a whole 64-column tile
    (["n_shared_experts=0"], 2, "cuda", (0, 0)),
])
def test_few_tokens_split_the_shared_expert_by_its_intermediate_dim_where_the_kernels_can(overrides, world_size,
                                                                                          backend, want):
    cfg = load_config("tiny", ["act_scale=static", "max_tokens=64", "tokens=16", *overrides])
    assert shared_split(cfg, world_size, backend) == want


@pytest.mark.parametrize("stack,field,index,value,message", [
    ("experts", "w13_alpha", (3, 1), float("nan"), "weights.experts.w13_alpha: expected a finite positive scale, got "
                                                   "nan at index (3, 1)"),
    ("experts", "w2_alpha", (0,), -1.0, "weights.experts.w2_alpha: expected a finite positive scale, got -1.0 at index "
                                        "(0,)"),
    ("experts", "l2_input_scale", (5,), 0.0, "weights.experts.l2_input_scale: expected a finite positive scale, got 0.0 "
                                             "at index (5,)"),
    ("shared", "l1_input_scale", (), float("inf"), "weights.shared.l1_input_scale: expected a finite positive scale, "
                                                   "got inf"),
    ("experts", "l2_input_scale", (3,), 1e-40, "weights.experts.l2_input_scale: expected a finite positive scale, got "
                                               "9.99994610111476e-41 (below fp32's smallest normal number"),
])
def test_a_global_or_input_scale_that_is_not_finite_positive_is_rejected_at_construction(stack, field, index, value,
                                                                                      message):
    # Before, the reference backend took them: an l2_input_scale of 0 dropped an expert's output, NaN ones made NaN.
    w = _layer()
    getattr(getattr(w, stack), field)[index] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        EPMoE(CFG, w)


def test_a_nan_block_scale_is_rejected_on_the_reference_backend_too():
    w = _layer()
    w.experts.w13_scale.view(torch.uint8)[2, 7, 1] = 0xFF  # -NaN
    with pytest.raises(ValueError, match=r"weights.experts.w13_scale: block scales must be finite, "
                                         r"non-negative UE4M3; found byte 0xFF at \(2, 7, 1\)"):
        EPMoE(CFG, w)


def test_a_non_finite_router_weight_is_rejected_at_construction():
    w = _layer()
    w.router_weight[4, 9] = float("nan")
    with pytest.raises(ValueError, match=r"router weight: expected finite values, found nan at index \[4, 9\]"):
        EPMoE(CFG, w)


def test_a_float_hash_table_is_rejected_rather_than_truncated(gen):
    d = _dense(gen)
    with pytest.raises(TypeError, match="router tid2eid: expected an integer dtype"):
        EPMoE.from_dense(CFG, **{**d, "tid2eid": d["tid2eid"].float() + 0.25})


def test_dense_parameters_are_copied_and_the_output_does_not_require_grad(gen):
    d = _dense(gen)
    params = {k: torch.nn.Parameter(d[k].clone()) for k in ("router_weight", "gate", "up", "down")}
    moe = EPMoE.from_dense(CFG, **{**d, **params})
    x, ids = torch.randn(4, M.hidden_size, generator=gen), torch.randint(0, M.vocab_size, (4,), generator=gen)
    y = moe(x, ids)
    assert not y.requires_grad and not moe.experts.w13_alpha.requires_grad
    with torch.no_grad():
        for p in params.values():
            p.mul_(2)  # the caller's parameters change; the layer built from them does not
    assert torch.equal(moe(x, ids), y)


def test_module_conversions_leave_the_layers_weights_and_outputs_as_they_were(gen):
    moe = EPMoE.from_dense(CFG, **_dense(gen))
    x, ids = torch.randn(4, M.hidden_size, generator=gen), torch.randint(0, M.vocab_size, (4,), generator=gen)
    y = moe(x, ids)
    model = torch.nn.Sequential(moe)
    model.to(torch.bfloat16)  # converted the router's fp32 weight alone, and every forward then failed
    model.double()
    assert torch.equal(moe(x, ids), y)


def test_moving_the_layer_to_another_device_is_refused():
    # Its experts, workspaces and symmetric buffer stay where they were made; only the router would have moved.
    with pytest.raises(ValueError, match=r"device: an EPMoE layer stays on the device it was built on \(cpu\); got a "
                                         r"conversion to meta"):
        torch.nn.Sequential(EPMoE(CFG, _layer())).to("meta")


def test_the_layer_has_no_state_dict_to_load_in_part():
    # Its weights are fixed at load; load_state_dict had rewritten the router's fp32 weight but not its bf16 copy.
    assert EPMoE(CFG, _layer()).state_dict() == {}


@pytest.mark.parametrize("hidden,error,message", [
    (torch.tensor(1.0), ValueError, "hidden: expected shape (T, 256), got ()"),
    ([[1.0] * 256], TypeError, "hidden: expected a floating-point tensor, got list"),
])
def test_a_hidden_that_is_no_matrix_is_a_clear_error(hidden, error, message):
    with pytest.raises(error, match=re.escape(message)):
        EPMoE(CFG, _layer())(hidden)


def test_input_ids_that_are_not_a_tensor_are_a_clear_error(gen):
    with pytest.raises(TypeError, match="input_ids: expected None or a torch.Tensor, got list"):
        EPMoE(CFG, _layer())(torch.randn(2, M.hidden_size, generator=gen), [1, 2])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_before_the_checkpoint_is_read(tmp_path):
    with pytest.raises(ValueError, match=r"device: expected a device this process has, got cuda:0 \(no CUDA device"):
        EPMoE.from_checkpoint(tmp_path / "never-read", CFG, device="cuda:0")


@pytest.mark.parametrize("name,kw", [("world_size", dict(world_size=2.0)), ("rank", dict(rank=0.0))])
def test_a_rank_or_world_size_that_is_not_an_int_is_rejected(gen, name, kw):
    with pytest.raises(TypeError, match=f"{name}: expected an int, got float"):
        EPMoE.from_dense(CFG, **_dense(gen), **kw)


def _tokens(gen, t: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and token ids (layer 0 routes by hash)."""
    return torch.randn(t, M.hidden_size, generator=gen), torch.randint(0, M.vocab_size, (t,), generator=gen)


def _profiled_ranges(run) -> list:
    """The ep_moe.* ranges a CPU profile of run() records, in the order they start."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    ranges = [e for e in prof.events() if e.name.startswith("ep_moe.")]
    return sorted(ranges, key=lambda e: e.time_range.start)


def test_the_stage_marker_hears_every_stage_in_order(gen):
    moe = EPMoE(CFG, _layer())
    heard = []
    moe.stage_marker = heard.append
    moe(*_tokens(gen))
    assert heard == list(moe_module.STAGES)


def test_a_profiled_forward_is_a_range_around_one_range_per_stage_in_order(gen):
    moe = EPMoE(CFG, _layer())
    tokens = _tokens(gen)
    names = [e.name for e in _profiled_ranges(lambda: moe(*tokens))]
    assert names == ["ep_moe.forward", "ep_moe.checks", "ep_moe.staging", "ep_moe.shared_expert", "ep_moe.routing",
                     "ep_moe.prepare", "ep_moe.experts", "ep_moe.finalize"]


def test_the_stage_ranges_lie_inside_the_forward_range_one_after_another(gen):
    moe = EPMoE(CFG, _layer())
    tokens = _tokens(gen)
    forward, *stages = _profiled_ranges(lambda: moe(*tokens))
    assert all(forward.time_range.start <= s.time_range.start and s.time_range.end <= forward.time_range.end
               for s in stages)
    assert all(a.time_range.end <= b.time_range.start for a, b in zip(stages, stages[1:]))


def test_a_stage_that_raises_is_the_last_range_and_reaches_no_marker(gen, monkeypatch):
    moe = EPMoE(CFG, _layer())
    heard = []
    moe.stage_marker = heard.append

    def broken_router(*args, **kwargs):
        raise RuntimeError("router failed")

    monkeypatch.setattr(moe.router, "forward", broken_router)

    def run():
        with pytest.raises(RuntimeError, match="router failed"):
            moe(*_tokens(gen))

    ranges = _profiled_ranges(run)
    assert [e.name for e in ranges] == ["ep_moe.forward", "ep_moe.checks", "ep_moe.staging", "ep_moe.shared_expert",
                                        "ep_moe.routing"]
    forward, *stages = ranges
    assert all(s.time_range.start <= s.time_range.end <= forward.time_range.end for s in stages)  # none left open
    assert heard == ["checks", "staging", "shared_expert"]


def test_an_unprofiled_forward_opens_no_range(gen, monkeypatch):
    # record_function costs about 5 us a call even with no profiler recording: a decode forward's host time is 400 us
    def refuse(name):
        raise AssertionError(f"opened range {name} with no profiler recording")

    monkeypatch.setattr(moe_module, "record_function", refuse)
    moe = EPMoE(CFG, _layer())
    assert moe(*_tokens(gen)).shape == (3, M.hidden_size)


def test_expert_load_is_not_counted_unless_asked_for():
    assert EPMoE(CFG, _layer()).expert_load is None


def _routed_counts(moe: EPMoE, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each routed expert's (token, k) assignments, from the layer's router run on its own."""
    topk_idx, _ = moe.router(hidden, ids)
    return torch.bincount(topk_idx.reshape(-1).long(), minlength=M.n_routed_experts)


def test_expert_load_adds_every_forwards_routing(gen):
    moe = EPMoE(CFG.replace(expert_load=True), _layer())
    first, second = _tokens(gen, 5), _tokens(gen, 7)
    moe(*first)
    moe(*second)
    expected = _routed_counts(moe, *first) + _routed_counts(moe, *second)
    assert moe.expert_load.dtype == torch.int64 and moe.expert_load.shape == (M.n_routed_experts,)
    assert torch.equal(moe.expert_load, expected)
    assert int(moe.expert_load.sum()) == 12 * M.num_experts_per_tok


def test_expert_load_counts_again_from_zero_once_zeroed(gen):
    moe = EPMoE(CFG.replace(expert_load=True), _layer())
    moe(*_tokens(gen, 4))
    moe.expert_load.zero_()
    tokens = _tokens(gen, 3)
    moe(*tokens)
    assert torch.equal(moe.expert_load, _routed_counts(moe, *tokens))


def test_a_copy_of_a_layer_counts_its_expert_load_on_its_own(gen):
    moe = EPMoE(CFG.replace(expert_load=True), _layer())
    moe(*_tokens(gen, 4))
    twin = copy.copy(moe)
    assert torch.equal(twin.expert_load, moe.expert_load)
    twin(*_tokens(gen, 2))
    assert int(twin.expert_load.sum()) == 6 * M.num_experts_per_tok
    assert int(moe.expert_load.sum()) == 4 * M.num_experts_per_tok


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_non_contiguous_hidden_gives_the_bits_of_its_contiguous_copy(gen, dtype):
    moe = EPMoE(CFG, _layer())
    hidden, ids = _tokens(gen, 7)
    transposed = hidden.to(dtype).t().contiguous().t()  # the same values, column-major
    assert not transposed.is_contiguous()
    assert torch.equal(moe(transposed, ids), moe(transposed.contiguous(), ids))


def test_a_layer_built_in_inference_mode_runs_outside_it(gen):
    cfg = CFG.replace(expert_load=True)
    with torch.inference_mode():  # as a server may load its model
        built_there = EPMoE(cfg, _layer())
    tokens = _tokens(gen, 5)
    with torch.no_grad():
        assert torch.equal(built_there(*tokens), EPMoE(cfg, _layer())(*tokens))
    assert int(built_there.expert_load.sum()) == 5 * M.num_experts_per_tok


@pytest.mark.parametrize("needs", [dict(backend="cuda"), dict(world_size=2)])
def test_a_scratch_of_streams_or_peers_refuses_to_be_pickled(needs):
    scratch = EPMoE(CFG, _layer()).scratch
    other = LayerScratch({**scratch.needs, **needs}, scratch.buffer)  # as made for the CUDA backend, or two ranks
    with pytest.raises(TypeError, match=r"LayerScratch: a scratch of the \w+ backend on \d rank\(s\) cannot be "
                                        r"pickled \(torch.save\)"):
        pickle.dumps(other)


def test_a_deep_copy_of_a_layer_shares_its_scratch(gen):
    moe = EPMoE(CFG, _layer())
    twin = copy.deepcopy(moe)
    assert twin.scratch is moe.scratch and twin.experts.w13 is not moe.experts.w13
    tokens = _tokens(gen, 5)
    assert torch.equal(twin(*tokens), moe(*tokens))


def test_a_deep_copy_of_a_cuda_layer_runs_its_stages_on_the_shared_workspaces(cuda_simulated):
    twin = copy.deepcopy(EPMoE(CFG, _layer()))
    assert twin._stage.workspace is twin.scratch.routed and twin._shared_stage.workspace is twin.scratch.shared
    assert twin._stage.weights is twin.experts


def test_a_copy_made_in_inference_mode_runs_outside_it(gen):
    moe = EPMoE(CFG.replace(expert_load=True), _layer())
    with torch.inference_mode():
        twin = copy.deepcopy(moe)
    tokens = _tokens(gen, 3)
    with torch.no_grad():
        assert torch.equal(twin(*tokens), moe(*tokens))
    assert int(twin.expert_load.sum()) == 3 * M.num_experts_per_tok


def test_a_layer_saved_whole_loads_back_giving_the_same_outputs(gen, tmp_path):
    moe = EPMoE(CFG, _layer())
    tokens = _tokens(gen, 5)
    torch.save(moe, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert torch.equal(loaded(*tokens), moe(*tokens))


@pytest.mark.parametrize("changes,activations", [(dict(act_mode="bf16"), "bf16"),
                                                  (dict(act_scale="static"), "nvfp4 (static scales)"),
                                                  (dict(act_scale="dynamic"), "nvfp4 (dynamic scales)")])
def test_printing_a_layer_shows_its_share_of_the_experts_and_how_it_runs_them(changes, activations):
    text = repr(EPMoE(CFG.replace(**changes), _layer()))
    assert f"experts=[0, {M.n_routed_experts}) of {M.n_routed_experts} (rank 0 of 1), shared_expert=True" in text
    assert f"backend=reference, activations={activations}, token_mode=replicated, device=cpu" in text
    assert f"Router(experts={M.n_routed_experts}, topk={M.num_experts_per_tok}, by=token id (hash))" in text


def test_printing_a_sigmoid_router_given_a_hash_table_names_its_scoring(gen):
    # V3 scoring routes by scores whatever table it is handed
    cfg = load_config("tiny", ["world_size=1", "max_tokens=16", "tokens=16", "scoring_func=sigmoid",
                               "num_hash_layers=0"])
    text = repr(EPMoE.from_dense(cfg, **_dense(gen)))
    assert f"Router(experts={M.n_routed_experts}, topk={M.num_experts_per_tok}, by=sigmoid)" in text
