"""The GPU expert selection (ops.topk_stable) against a stable descending torch.sort, on fresh random scores
with many ties, signed zeros, infinities and NaN; the one-kernel V4 routing (ops.route_v4) against the spec's formula
in torch ops on the same device; the router logits kernel (ops.router_logits) against its summation order emulated in
torch."""
from __future__ import annotations

import pytest
import torch

from ep_runtime.ops import extension_available

pytestmark = pytest.mark.gpu

if not extension_available("topk_stable"):
    pytest.skip("needs an sm_90 CUDA device and the built extension", allow_module_level=True)

from ep_runtime import ops, routing  # noqa: E402
from ep_runtime.config import ModelConfig  # noqa: E402
from ep_runtime.routing import Router, route_v3, route_v4  # noqa: E402

DEV = torch.device("cuda")


def tricky_scores(rows: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Few distinct values (so most scores tie), both zeros, +-inf and NaN sprinkled in."""
    s = torch.randint(-3, 4, (rows, n), generator=gen).float() / 2
    pick = torch.rand(rows, n, generator=gen)
    s[pick < 0.05] = -0.0
    s[(pick >= 0.05) & (pick < 0.07)] = float("inf")
    s[(pick >= 0.07) & (pick < 0.09)] = float("-inf")
    s[(pick >= 0.09) & (pick < 0.1)] = float("nan")
    return s.to(DEV)


@pytest.mark.parametrize("rows,n,k", [(1, 384, 6), (37, 256, 8), (500, 8, 4), (3, 1000, 16), (64, 5, 5), (0, 16, 2)])
def test_topk_stable_equals_the_first_k_of_a_stable_descending_sort(rows, n, k, gen):
    scores = tricky_scores(rows, n, gen)
    want = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(ops.topk_stable(scores, k), want)


def test_topk_stable_on_distinct_random_scores(gen):
    scores = torch.randn(300, 384, generator=gen).to(DEV)
    want = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :6]
    assert torch.equal(ops.topk_stable(scores, 6), want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_topk_stable_on_a_gpu_other_than_the_current_one(gen):
    scores = tricky_scores(37, 256, gen).to(torch.device("cuda", 1))
    with torch.cuda.device(0):
        got = ops.topk_stable(scores, 8)
        assert torch.equal(got, torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :8])


def test_routing_on_the_gpu_selects_what_the_stable_sort_selects(gen, monkeypatch):
    """route_v4 / route_v3 with the kernel give the ids and weights of the same routing with torch.sort, on the
    same device (so on the same scores)."""
    logits = (torch.randint(-4, 5, (50, 64), generator=gen).float() / 4).to(DEV)  # coarse, so ties are common
    bias = (torch.randint(-2, 3, (64,), generator=gen).float() / 8).to(DEV)
    with_kernel = route_v4(logits, bias, 6, 2.5), route_v3(logits, bias, 8, 1.0, 8, 4)
    monkeypatch.setattr(routing, "_gpu_kernels", lambda: False)
    with_sort = route_v4(logits, bias, 6, 2.5), route_v3(logits, bias, 8, 1.0, 8, 4)
    for (ids, w), (ids_ref, w_ref) in zip(with_kernel, with_sort):
        assert torch.equal(ids, ids_ref) and torch.equal(w, w_ref)


def spec_v4_routing(logits: torch.Tensor, bias: torch.Tensor | None, k: int, scaling: float,
                    given_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4_SPEC section 6 in torch ops on the kernel's device, with the k-term sum added in ascending k (the order
    the kernel fixes); selection by a stable descending sort."""
    s = torch.sqrt(torch.nn.functional.softplus(logits))
    if given_ids is None:
        b = s + bias if bias is not None else s
        given_ids = torch.sort(b, dim=-1, descending=True, stable=True).indices[:, :k]
    w = s.gather(-1, given_ids.long())
    total = w[:, 0].clone()
    for j in range(1, k):
        total = total + w[:, j]
    return given_ids.to(torch.int32), w / (total.unsqueeze(1) + 1e-20) * scaling


def poisoned_routing(t: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((t, k), -7, dtype=torch.int32, device=DEV),
            torch.full((t, k), float("nan"), device=DEV))


@pytest.mark.parametrize("t,n,k,coarse", [(1, 384, 6, False), (300, 384, 6, False), (50, 64, 6, True),
                                          (7, 40, 32, False), (3, 5, 5, True),
                                          (9, ops.MAX_ROUTE_EXPERTS, 8, True)])
def test_route_v4_kernel_gives_the_spec_routing_bit_for_bit(t, n, k, coarse, gen):
    if coarse:  # few distinct logits and biases: most scores tie
        logits = (torch.randint(-4, 5, (t, n), generator=gen).float() / 4).to(DEV)
        bias = (torch.randint(-2, 3, (n,), generator=gen).float() / 8).to(DEV)
    else:
        logits, bias = (3 * torch.randn(t, n, generator=gen)).to(DEV), (0.1 * torch.randn(n, generator=gen)).to(DEV)
    for b in (bias, None):
        ids, w = poisoned_routing(t, k)
        ops.route_v4(logits, b, 2.5, ids, w)
        want_ids, want_w = spec_v4_routing(logits, b, k, 2.5)
        assert torch.equal(ids, want_ids) and torch.equal(w, want_w)


def test_route_v4_kernel_takes_given_ids_for_hash_layers(gen):
    logits = torch.randn(33, 384, generator=gen).to(DEV)
    given = torch.randint(0, 384, (33, 6), generator=gen, dtype=torch.int32).to(DEV)
    ids, w = poisoned_routing(33, 6)
    ops.route_v4(logits, None, 1.5, ids, w, given)
    want_ids, want_w = spec_v4_routing(logits, None, 6, 1.5, given)
    assert torch.equal(ids, want_ids) and torch.equal(w, want_w)


def test_route_v4_kernel_gives_a_nan_weight_for_a_given_id_out_of_range(gen):
    logits = torch.randn(2, 16, generator=gen).to(DEV)
    given = torch.tensor([[0, 16], [3, 4]], dtype=torch.int32, device=DEV)
    ids, w = poisoned_routing(2, 2)
    ops.route_v4(logits, None, 1.0, ids, w, given)
    assert torch.isnan(w[0]).all() and torch.isfinite(w[1]).all()


def test_router_on_the_gpu_routes_as_its_torch_path_does(gen, monkeypatch):
    """The Router's one-kernel V4 routing against its torch ops on the same device: the same experts, weights
    within the last bit (the torch path's sum adds in its own order)."""
    cfg = ModelConfig(name="t", hidden_size=256, moe_intermediate_size=64, n_routed_experts=384,
                      num_experts_per_tok=6, routed_scaling_factor=2.5)
    router = Router(cfg, torch.randn(384, 256, generator=gen) / 16, 0.1 * torch.randn(384, generator=gen)).to(DEV)
    hidden = torch.randn(64, 256, generator=gen).to(DEV, torch.bfloat16)
    out = poisoned_routing(64, 6)
    ids, w = router(hidden, out=out)
    assert ids is out[0] and w is out[1]
    monkeypatch.setattr(routing, "_gpu_kernels", lambda: False)
    ids_ref, w_ref = router(hidden)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0)


def test_router_gemm_on_bf16_tensor_cores_routes_as_the_fp32_gemm_does(gen):
    """With a router weight exact in bf16 and bf16 hidden states the logits come from a bf16 GEMM with fp32 output:
    the same exact products summed in another order, so the same experts and weights within fp32 rounding."""
    cfg = ModelConfig(name="t", hidden_size=7168, moe_intermediate_size=64, n_routed_experts=384,
                      num_experts_per_tok=6, routed_scaling_factor=2.5)
    weight = (torch.randn(384, 7168, generator=gen) / 84).bfloat16()
    router = Router(cfg, weight, 0.01 * torch.randn(384, generator=gen)).to(DEV)
    assert router.weight_bf16 is not None
    hidden = torch.randn(256, 7168, generator=gen).to(DEV, torch.bfloat16)
    ids, w = router(hidden)
    router.weight_bf16 = None  # the fp32 GEMM
    ids_ref, w_ref = router(hidden)
    # Tokens whose first seven biased scores lie within 1e-4 of each other may rank differently on either GEMM.
    biased = torch.sqrt(torch.nn.functional.softplus(hidden.float() @ router.weight.t())) + router.bias
    top = biased.sort(dim=-1, descending=True).values[:, :7]
    clear = (top[:, :-1] - top[:, 1:]).min(dim=-1).values > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(ids[clear], ids_ref[clear])
    torch.testing.assert_close(w[clear], w_ref[clear], rtol=1e-5, atol=0)


def test_router_selects_among_more_experts_than_the_kernel_holds_by_its_torch_ops(gen):
    """Past ops.MAX_ROUTE_EXPERTS the kernel would refuse the logits; the Router takes its torch path instead."""
    n = ops.MAX_ROUTE_EXPERTS + 64
    cfg = ModelConfig(name="t", hidden_size=256, moe_intermediate_size=64, n_routed_experts=n, num_experts_per_tok=6,
                      routed_scaling_factor=2.5)
    router = Router(cfg, torch.randn(n, 256, generator=gen) / 16, 0.1 * torch.randn(n, generator=gen)).to(DEV)
    hidden = torch.randn(9, 256, generator=gen).to(DEV, torch.bfloat16)
    ids, w = router(hidden, out=poisoned_routing(9, 6))
    logits = hidden.float() @ router.weight.t()
    want_ids, want_w = spec_v4_routing(logits, router.bias, 6, 2.5)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-6, atol=0)


def router_logits_in_the_kernels_order(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ops.router_logits's sums emulated in torch: the exact fp32 products; thread i of 256 adds those of 16-byte
    chunks i, i + 256, ... (8 elements each, in element order) to 0; each warp adds its 32 lanes' sums by an xor
    butterfly; the 8 warps' sums are added in warp order."""
    t, h = hidden.shape
    e, threads = weight.shape[0], 256
    rounds = -(-(h // 8) // threads)
    products = hidden.float()[:, None, :] * weight.float()[None, :, :]  # exact: 8 + 8 significant bits
    products = torch.nn.functional.pad(products, (0, rounds * threads * 8 - h)).view(t, e, rounds, threads, 8)
    acc = torch.zeros(t, e, threads, device=hidden.device)
    for j in range(rounds):
        for q in range(8):
            acc = acc + products[:, :, j, :, q]  # adding a padding zero leaves acc's bits as they are
    lanes = acc.view(t, e, threads // 32, 32)
    for d in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[..., torch.arange(32, device=hidden.device) ^ d]
    warps = lanes[..., 0]
    total = warps[..., 0]
    for w in range(1, threads // 32):
        total = total + warps[..., w]
    return total


@pytest.mark.parametrize("t,e,h", [(1, 384, 7168), (3, 384, 7168), (8, 7, 7168), (16, 385, 1000), (13, 64, 72),
                                   (40, 33, 2048), (2, 6, 9216)])
def test_router_logits_are_the_exact_products_summed_in_the_kernels_fixed_order(t, e, h, gen):
    hidden = torch.randn(t, h, generator=gen).to(DEV, torch.bfloat16)
    weight = (torch.randn(e, h, generator=gen) / 84).to(DEV, torch.bfloat16)
    out = torch.full((t, e), float("nan"), device=DEV)
    ops.router_logits(hidden, weight, out)
    assert torch.equal(out, router_logits_in_the_kernels_order(hidden, weight))
    exact = hidden.double() @ weight.double().t()
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


def test_router_logits_give_the_same_bits_on_every_run(gen):
    hidden = torch.randn(5, 7168, generator=gen).to(DEV, torch.bfloat16)
    weight = (torch.randn(384, 7168, generator=gen) / 84).to(DEV, torch.bfloat16)
    runs = [torch.full((5, 384), float("nan"), device=DEV) for _ in range(3)]
    for out in runs:
        ops.router_logits(hidden, weight, out)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("t", [1, ops.ROUTER_LOGITS_MAX_TOKENS, ops.ROUTER_LOGITS_MAX_TOKENS + 1])
def test_router_takes_a_few_tokens_logits_from_the_router_logits_kernel(t, gen):
    """Up to ops.ROUTER_LOGITS_MAX_TOKENS tokens the Router's logits are the kernel's bits, above them the bf16 GEMM's;
    route_v4 then routes from them."""
    cfg = ModelConfig(name="t", hidden_size=7168, moe_intermediate_size=64, n_routed_experts=384,
                      num_experts_per_tok=6, routed_scaling_factor=2.5)
    router = Router(cfg, (torch.randn(384, 7168, generator=gen) / 84).bfloat16(),
                    0.01 * torch.randn(384, generator=gen)).to(DEV)
    hidden = torch.randn(t, 7168, generator=gen).to(DEV, torch.bfloat16)
    ids, w = router(hidden, out=poisoned_routing(t, 6))
    if t <= ops.ROUTER_LOGITS_MAX_TOKENS:
        logits = torch.full((t, 384), float("nan"), device=DEV)
        ops.router_logits(hidden, router.weight_bf16, logits)
    else:
        logits = torch.mm(hidden, router.weight_bf16.t(), out_dtype=torch.float32)
    want_ids, want_w = spec_v4_routing(logits, router.bias, 6, 2.5)
    assert torch.equal(ids, want_ids) and torch.equal(w, want_w)


def test_router_takes_the_gemm_for_hidden_rows_the_logits_kernel_cannot_read(gen):
    """A non-contiguous hidden of a few tokens (a view the kernel's 16-byte row loads cannot take) goes to the GEMM."""
    cfg = ModelConfig(name="t", hidden_size=7168, moe_intermediate_size=64, n_routed_experts=384,
                      num_experts_per_tok=6, routed_scaling_factor=2.5)
    router = Router(cfg, (torch.randn(384, 7168, generator=gen) / 84).bfloat16(),
                    0.01 * torch.randn(384, generator=gen)).to(DEV)
    hidden = torch.randn(7168, 2, generator=gen).to(DEV, torch.bfloat16).t()
    assert not hidden.is_contiguous()
    want = torch.mm(hidden, router.weight_bf16.t(), out_dtype=torch.float32)
    assert torch.equal(router.logits(hidden), want)


def test_router_built_from_a_transposed_weight_routes_as_from_a_contiguous_one(gen):
    # Few tokens take the router-logits kernel, which reads the weight row-major and unchecked.
    cfg = ModelConfig(name="t", hidden_size=7168, moe_intermediate_size=64, n_routed_experts=384, num_experts_per_tok=6)
    weight = (torch.randn(384, 7168, generator=gen) / 84).bfloat16()
    bias = 0.01 * torch.randn(384, generator=gen)
    plain = Router(cfg, weight, bias, device=DEV)
    transposed = Router(cfg, weight.t().contiguous().t(), bias, device=DEV)  # the same values, column-major
    hidden = torch.randn(3, 7168, generator=gen).bfloat16().to(DEV)
    ids, w = plain(hidden)
    ids_t, w_t = transposed(hidden)
    assert torch.equal(ids, ids_t) and torch.equal(w, w_t)
