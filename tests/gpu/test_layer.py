"""The whole MoE layer on one GPU: CUDA expert stage vs the reference path, graph replay, capacity."""
import copy
import gc

import pytest
import torch

from ep_runtime import cuda_graphs
from ep_runtime.checkpoint import synthetic_layer
from ep_runtime.moe import EPMoE, cuda_backend_available

from layer_case import cosine, eager_and_replayed, layer_config, layer_inputs, poison_module, residual_model

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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_a_layer_on_a_gpu_other_than_the_current_one_captures_and_replays_its_eager_bits(seed):
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() != dev.index
    cfg = layer_config(1, "backend=cuda", seed=seed)
    moe = EPMoE.from_synthetic(cfg, device=dev)
    eager, replayed = eager_and_replayed(moe, layer_inputs(cfg, seed, dev))
    assert torch.equal(replayed, eager)


def test_a_cuda_layer_built_in_inference_mode_runs_outside_it(seed):
    cfg = layer_config(1, "backend=cuda", "expert_load=true", seed=seed)
    with torch.inference_mode():  # as a server may load its model
        built_there = EPMoE.from_synthetic(cfg, device=DEV)
    x = layer_inputs(cfg, seed, DEV)
    with torch.no_grad():
        assert torch.equal(built_there(x), EPMoE.from_synthetic(cfg, device=DEV)(x))
    assert int(built_there.expert_load.sum()) == x.shape[0] * cfg.model.num_experts_per_tok


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_non_contiguous_hidden_gives_the_bits_of_its_contiguous_copy_on_the_gpu(seed, dtype):
    cfg = layer_config(1, "backend=cuda", seed=seed)
    moe = EPMoE.from_synthetic(cfg, device=DEV)
    transposed = layer_inputs(cfg, seed, DEV).to(dtype).t().contiguous().t()
    assert torch.equal(moe(transposed), moe(transposed.contiguous()))


def test_a_deep_copy_of_a_cuda_layer_shares_its_scratch_and_gives_its_bits(seed):
    cfg = layer_config(1, "backend=cuda", seed=seed)
    moe = EPMoE.from_synthetic(cfg, device=DEV)
    twin = copy.deepcopy(moe)
    x = layer_inputs(cfg, seed, DEV)
    assert twin.scratch is moe.scratch and twin.experts.w13.data_ptr() != moe.experts.w13.data_ptr()
    assert twin._stage.workspace is moe.scratch.routed
    assert torch.equal(twin(x), moe(x))


def test_weights_handed_over_as_strided_cpu_views_load_onto_the_gpu(seed):
    cfg = layer_config(1, "backend=cuda", seed=seed)
    m = cfg.model
    views = synthetic_layer(m, cfg.runtime.layer, 0, 1, seed, "cpu")
    w2 = views.experts.w2
    every_other = torch.zeros(*w2.shape[:-1], 2 * w2.shape[-1], dtype=w2.dtype)
    every_other[..., ::2] = w2
    views.experts.w2 = every_other[..., ::2]  # the same bytes, not dense: .to(cuda) makes them contiguous
    moe = EPMoE(cfg, views, device=DEV)
    dense = EPMoE(cfg, synthetic_layer(m, cfg.runtime.layer, 0, 1, seed, "cpu"), device=DEV)
    x = layer_inputs(cfg, seed, DEV)
    assert torch.equal(moe(x), dense(x))


def test_saving_a_cuda_layer_whole_is_refused_with_what_to_do_instead(seed, tmp_path):
    moe = EPMoE.from_synthetic(layer_config(1, "backend=cuda", seed=seed), device=DEV)
    with pytest.raises(TypeError, match="LayerScratch: a scratch of the cuda backend on 1 rank.* "
                                        "EPMoE.from_checkpoint"):
        torch.save(moe, tmp_path / "layer.pt")


def test_repeated_forwards_are_bitwise_identical(seed):
    cfg = layer_config(1, "backend=cuda", seed=seed)
    moe = EPMoE.from_synthetic(cfg, device=DEV)
    x = layer_inputs(cfg, seed, DEV)
    poison_module(moe)
    first = moe(x)
    poison_module(moe)  # the second forward must rewrite everything, not find the first one's results
    assert torch.equal(first, moe(x))


def test_a_profiled_cuda_forward_and_replay_show_their_ranges_and_kernels(seed):
    cfg = layer_config(1, "backend=cuda", seed=seed)
    moe = EPMoE.from_synthetic(cfg, device=DEV)
    x = layer_inputs(cfg, seed, DEV)
    captured = moe.capture(x)
    with torch.profiler.profile() as prof:  # CPU and CUDA
        moe(x)
        captured.replay()
        torch.cuda.synchronize()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cpu = torch.autograd.DeviceType.CPU
    ranges = [e.name for e in events if e.name.startswith("ep_moe.") and e.device_type == cpu]
    stages = ["checks", "staging", "shared_expert", "routing", "prepare", "experts", "finalize"]
    assert ranges == ["ep_moe.forward", *(f"ep_moe.{s}" for s in stages), "ep_moe.replay"]
    # On the GPU's timeline the eager forward's experts range spans the grouped GEMMs it launched.
    experts = [e for e in events if e.name == "ep_moe.experts" and e.device_type != cpu]
    gemms = [e for e in events if "grouped_gemm_kernel" in e.name and e.device_type != cpu]
    assert len(experts) == 1 and len(gemms) >= 2
    span = experts[0].time_range
    assert any(span.start <= g.time_range.start and g.time_range.end <= span.end for g in gemms)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic-algorithms"])
def test_expert_load_counts_eager_forwards_and_graph_replays_alike(seed, deterministic):
    cfg = layer_config(1, "backend=cuda", "expert_load=true", seed=seed)
    moe = EPMoE.from_synthetic(cfg, device=DEV)
    x = layer_inputs(cfg, seed, DEV)
    topk_idx, _ = moe.router(x)
    routed = torch.bincount(topk_idx.reshape(-1).long(), minlength=cfg.model.n_routed_experts)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        moe(x)
        assert torch.equal(moe.expert_load, routed)
        captured = moe.capture(x)
        assert torch.equal(moe.expert_load, routed)  # the capture's warm-up forwards are not counted
        captured.replay()
        captured.replay()
        torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(moe.expert_load, 3 * routed)


def test_more_tokens_than_capacity_is_refused(seed):
    cfg = layer_config(1, "backend=cuda", seed=seed)
    moe = EPMoE.from_synthetic(cfg, device=DEV)
    with pytest.raises(ValueError, match="exceed the symmetric buffer capacity max_tokens=512"):
        moe(torch.randn(513, cfg.model.hidden_size, device=DEV, dtype=torch.bfloat16))


@pytest.mark.parametrize("mode", [["act_scale=static"], ["act_scale=dynamic"], ["act_mode=bf16"]],
                         ids=["w4a4-static", "w4a4-dynamic", "w4a16"])
def test_a_forward_of_no_tokens_returns_no_rows_eagerly_and_in_a_graph(mode, seed):
    cfg = layer_config(1, "backend=cuda", *mode, seed=seed)
    moe = EPMoE.from_synthetic(cfg, device=DEV)
    x = torch.empty(0, cfg.model.hidden_size, device=DEV, dtype=torch.bfloat16)
    assert moe(x).shape == (0, cfg.model.hidden_size)
    assert moe.capture(x).replay().shape == (0, cfg.model.hidden_size)
    y = layer_inputs(cfg, seed, DEV)
    assert torch.equal(moe(y), moe(y))  # and the layer runs on as before


def _two_layers(seed, share):
    """Two layers of one config with their own weights; the second uses the first's scratch when share."""
    cfg = layer_config(1, "backend=cuda", seed=seed)
    first = EPMoE.from_synthetic(cfg, device=DEV)
    second = EPMoE.from_synthetic(cfg.replace(seed=seed + 1), device=DEV, scratch=first.scratch if share else None)
    return first, second


def test_layers_sharing_a_scratch_give_the_bits_they_give_alone(seed):
    alone, sharing = _two_layers(seed, share=False), _two_layers(seed, share=True)
    assert sharing[0].scratch is sharing[1].scratch
    xs = [layer_inputs(layer_config(1, f"tokens={t}", seed=seed), seed + t, DEV) for t in (256, 3)]
    for moe in (*alone, sharing[0]):
        poison_module(moe)
    expected = [moe(x) for x in xs for moe in alone]
    got = [moe(x) for x in xs for moe in sharing]  # interleaved, each output kept past the next forward
    for g, want in zip(got, expected):
        assert torch.isfinite(g).all() and torch.equal(g, want)
    assert not torch.equal(got[0], got[1])


def test_a_layer_sharing_a_scratch_adds_only_its_weights_to_device_memory(seed):
    cfg = layer_config(1, "backend=cuda", seed=seed)
    first = EPMoE.from_synthetic(cfg, device=DEV)
    gc.collect()  # temporaries in reference cycles would count until the collector runs
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(DEV)
    second = EPMoE.from_synthetic(cfg.replace(seed=seed + 1), device=DEV, scratch=first.scratch)
    gc.collect()
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated(DEV) - before
    weights = second.experts.nbytes() + second.shared.nbytes() + sum(b.nbytes for b in second.router.tensors())
    print(f"grown {grown} bytes, weights {weights}, scratch {first.scratch.nbytes()}")
    # The margin covers each stage's small per-layer tables (the shared expert's dense slots, static h scales, about
    # 12 KB) and about 1 MB more that two runs counted before the collector ran first; a scratch of its own (30 MB
    # here) would not fit in it.
    margin = 4 << 20
    assert weights <= grown <= weights + margin and first.scratch.nbytes() > 4 * margin


def test_a_graph_of_two_layers_sharing_a_scratch_replays_their_eager_bits(seed):
    first, second = _two_layers(seed, share=True)
    x = layer_inputs(layer_config(1, seed=seed), seed, DEV)
    poison_module(first)
    eager = second(first(x).to(torch.bfloat16))  # the second layer reads the first's output, as in a model
    out = {}

    def step() -> None:
        out["y"] = second(first(x, check=False).to(torch.bfloat16), check=False)

    graph = cuda_graphs.capture(step)
    poison_module(first)
    out["y"].fill_(float("nan"))
    graph.replay()
    assert torch.isfinite(out["y"]).all() and torch.equal(out["y"], eager)


def test_a_model_compiled_whole_gives_the_eager_bits(seed):
    torch._dynamo.reset()
    first, second = _two_layers(seed, share=True)
    model = residual_model(first, second)
    compiled = torch.compile(model, fullgraph=True)  # inductor
    for t in (256, 3, 17):  # the third count runs the graph traced for dynamic shapes on the second
        x = layer_inputs(layer_config(1, f"tokens={t}", seed=seed), seed + t, DEV)
        poison_module(first)
        want = model(x)
        poison_module(first)
        got = compiled(x)
        assert torch.isfinite(got).all() and torch.equal(got, want)


def test_a_model_compiled_with_cuda_graphs_replays_the_eager_bits(seed):
    torch._dynamo.reset()
    first, second = _two_layers(seed, share=True)
    model = residual_model(first, second, check=False)
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    for i in range(4):  # warm-up, capture, then replays on new inputs
        x = layer_inputs(layer_config(1, seed=seed), seed + i, DEV)
        poison_module(first)
        want = model(x).clone()
        poison_module(first)
        got = compiled(x).clone()
        assert torch.isfinite(got).all() and torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")  # refused before it launches anything
def test_capturing_a_forward_that_syncs_for_its_checks_is_refused(seed):
    cfg = layer_config(1, "backend=cuda", seed=seed)
    moe = EPMoE.from_synthetic(cfg, device=DEV)
    x = layer_inputs(cfg, seed, DEV)
    moe(x)
    with pytest.raises(ValueError, match="check: expected False while a CUDA graph is captured"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            moe(x)
    assert torch.equal(moe(x), moe(x))  # and the layer runs on as before


def test_a_cuda_layer_refuses_a_scratch_of_the_reference_backend(seed):
    cfg = layer_config(1, seed=seed)
    reference = EPMoE.from_synthetic(cfg.replace(backend="reference"), device=DEV)
    with pytest.raises(ValueError, match="scratch: this layer needs backend 'cuda', the scratch was made for "
                                         "'reference'"):
        EPMoE.from_synthetic(cfg.replace(backend="cuda"), device=DEV, scratch=reference.scratch)
