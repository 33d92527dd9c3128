"""EPMoE under torch.compile: a model traces whole around its MoE layers, each one opaque op that runs the eager
forward (CPU reference path here; tests/gpu/test_layer.py compiles the CUDA path with inductor and CUDA graphs)."""
import copy
import gc

import pytest
import torch

from ep_runtime import layer_op
from ep_runtime.config import load_config
from ep_runtime.dist_utils import init_process_group, spawn_local
from ep_runtime.moe import EPMoE

CFG = load_config("tiny", ["world_size=1", "max_tokens=64"])


class TwoLayers(torch.nn.Module):
    """What a model does with its MoE layers: residual adds around a hash layer and a routed one sharing a scratch."""

    def __init__(self, cfg=CFG, rank=0, world_size=1):
        super().__init__()
        self.hash = EPMoE.from_synthetic(cfg, layer=0, rank=rank, world_size=world_size)
        self.routed = EPMoE.from_synthetic(cfg, layer=1, rank=rank, world_size=world_size, scratch=self.hash.scratch)

    def forward(self, hidden, input_ids):
        hidden = hidden + self.hash(hidden, input_ids)
        return hidden + self.routed(hidden)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(cfg, tokens, gen):
    hidden = torch.randn(tokens, cfg.model.hidden_size, generator=gen).to(torch.bfloat16)
    return hidden, torch.randint(0, cfg.model.vocab_size, (tokens,), generator=gen)


def test_a_model_compiles_whole_and_gives_the_eager_bits(gen):
    model = TwoLayers()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for t in (16, 5, 9):  # the third count runs the graph traced for dynamic shapes on the second
            hidden, ids = _inputs(CFG, t, gen)
            want = model(hidden, ids)
            got = compiled(hidden, ids)
            assert got.shape == (t, CFG.model.hidden_size) and got.dtype == want.dtype
            assert torch.equal(got, want)


def test_a_compiled_model_counts_the_expert_load_as_the_eager_one(gen):
    cfg = CFG.replace(expert_load=True)
    eager, compiled = TwoLayers(cfg), TwoLayers(cfg)
    run = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for t in (16, 5):
            hidden, ids = _inputs(cfg, t, gen)
            eager(hidden, ids)
            run(hidden, ids)
    for layer in ("hash", "routed"):
        want = getattr(eager, layer).expert_load
        assert int(want.sum()) == 21 * cfg.model.num_experts_per_tok
        assert torch.equal(getattr(compiled, layer).expert_load, want)


def test_each_layer_traces_to_one_op():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    model = TwoLayers()
    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend=backend)(*_inputs(CFG, 8, torch.Generator().manual_seed(0)))
    (gm,) = graphs
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count("ep_runtime.moe_layer.default") == 2
    assert not [t for t in targets if t.startswith("ep_runtime.") and t != "ep_runtime.moe_layer.default"]


def test_a_compiled_layer_raises_the_eager_forwards_errors(gen):
    compiled = torch.compile(TwoLayers().routed, fullgraph=True, backend="aot_eager")
    hidden, _ = _inputs(CFG, CFG.runtime.max_tokens + 1, gen)
    with pytest.raises(ValueError, match="hidden: 65 tokens exceed the symmetric buffer capacity max_tokens=64"):
        compiled(hidden)


def _messages(e: BaseException) -> str:
    """An exception's message with its causes' (Dynamo wraps a user exception it cannot trace through)."""
    return str(e) + (" <- " + _messages(e.__cause__) if e.__cause__ is not None else "")


@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_compiled_layer_refuses_hidden_that_requires_grad(gen, fullgraph):
    """The compiled graph would run the op without grad and hand back an output whose backward passes nothing."""
    compiled = torch.compile(TwoLayers().routed, fullgraph=fullgraph, backend="aot_eager")
    hidden = _inputs(CFG, 8, gen)[0].float().requires_grad_()
    with pytest.raises(Exception) as refused:
        compiled(hidden)
    assert "hidden: expected a tensor that does not require grad" in _messages(refused.value)
    if not fullgraph:  # fullgraph makes Dynamo raise its own error, caused by this one
        assert refused.type is ValueError


def test_a_handle_outliving_its_layer_says_so():
    class Layer:
        pass

    layer = Layer()
    handle = layer_op.register(layer)
    assert layer_op.layer_of(handle) is layer
    del layer
    gc.collect()
    with pytest.raises(RuntimeError, match=f"layer: expected the handle of a live EPMoE, got {handle}, whose layer "
                                           f"no longer exists"):
        layer_op.layer_of(handle)


def test_a_copied_layer_compiles_to_itself_not_to_its_original(gen):
    layer = TwoLayers().routed
    twin = copy.deepcopy(layer)
    for t in (twin.router.weight, twin.router.weight_bf16):  # other routing: other outputs
        if t is not None:
            t.neg_()
    hidden, _ = _inputs(CFG, 8, gen)
    with torch.no_grad():
        want = twin(hidden)
        got = torch.compile(twin, fullgraph=True, backend="aot_eager")(hidden)
        assert torch.equal(got, want) and not torch.equal(got, layer(hidden))


def _compiled_ranks_worker(rank, world, token_mode, seed, out_dir):
    init_process_group(torch.device("cpu"), 60)
    dp = ["token_mode=dp", "act_scale=static"] if token_mode == "dp" else []
    cfg = load_config("tiny", [f"world_size={world}", "max_tokens=64", *dp])
    model = TwoLayers(cfg, rank, world)
    # dp: every rank its own tokens
    hidden, ids = _inputs(cfg, 12, torch.Generator().manual_seed(seed + (rank if token_mode == "dp" else 0)))
    with torch.no_grad():
        want = model(hidden, ids)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(hidden, ids)
    torch.save((got, want), f"{out_dir}/out{rank}.pt")


@pytest.mark.parametrize("token_mode", ["replicated", "dp"])
def test_a_compiled_model_on_several_ranks_gives_the_eager_bits(tmp_path, token_mode):
    spawn_local(_compiled_ranks_worker, 2, token_mode, int(torch.seed() % 2**31), str(tmp_path))
    for rank in range(2):
        got, want = torch.load(tmp_path / f"out{rank}.pt")
        assert torch.equal(got, want)


@pytest.mark.parametrize("layer", ["hash", "routed"])
def test_the_layer_ops_fake_agrees_with_its_forward(gen, layer):
    """torch.library.opcheck: the schema, the fake's shapes and dtypes against the real output, and tracing."""
    moe = getattr(TwoLayers(), layer)
    hidden, ids = _inputs(CFG, 7, gen)
    torch.library.opcheck(layer_op.moe_layer_op, (hidden, ids if layer == "hash" else None, moe._handle, True))
