"""The GPU expert selection (ops.topk_stable) against a stable descending torch.sort, on fresh random scores
with many ties, signed zeros, infinities and NaN."""
from __future__ import annotations

import pytest
import torch

from ep_runtime.ops import extension_available

pytestmark = pytest.mark.gpu

if not extension_available("topk_stable"):
    pytest.skip("needs an sm_90 CUDA device and the built extension", allow_module_level=True)

from ep_runtime import ops, routing  # noqa: E402
from ep_runtime.routing import route_v3, route_v4  # noqa: E402

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
    monkeypatch.setattr(routing, "_gpu_selection", lambda: False)
    with_sort = route_v4(logits, bias, 6, 2.5), route_v3(logits, bias, 8, 1.0, 8, 4)
    for (ids, w), (ids_ref, w_ref) in zip(with_kernel, with_sort):
        assert torch.equal(ids, ids_ref) and torch.equal(w, w_ref)
