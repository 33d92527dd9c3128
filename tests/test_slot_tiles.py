"""The slot tile width the CUDA expert stage picks on the host, where only routing totals are known
(cuda_experts.default_block_n): wide enough for routing's fluctuation, sized by every rank's experts."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ep_runtime.cuda_experts import CudaExpertStage, ExpertWorkspace, block_n_covering, default_block_n
from ep_runtime.experts import ExpertSpec
from ep_runtime.weights import ExpertWeights

TOP_K = 6
CASES = [(8, 48), (64, 48), (100, 48), (128, 48), (256, 48), (512, 48), (300, 384), (1024, 384), (2048, 384)]


def uniform_counts(tokens: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    """Slots per expert of one random top-k routing, every expert equally likely."""
    idx = torch.rand(tokens, experts, generator=gen).topk(TOP_K, dim=1).indices
    return torch.bincount(idx.flatten(), minlength=experts)


@pytest.mark.parametrize("tokens,experts", CASES)
def test_default_tile_holds_nearly_every_experts_slots_under_uniform_random_routing(tokens, experts):
    """An expert past its tile streams its weights again for each further tile, so at most 2 % of the experts may
    overflow (the tile of the mean lets about 40 % do)."""
    gen = torch.Generator().manual_seed(tokens * experts)
    bn = default_block_n(tokens * TOP_K, experts)
    overflow = [(uniform_counts(tokens, experts, gen) > bn).float().mean().item() for _ in range(20)]
    assert sum(overflow) / len(overflow) <= 0.02


@pytest.mark.parametrize("tokens,experts", CASES)
def test_default_tile_is_at_most_twice_the_tile_of_the_mean(tokens, experts):
    mean = tokens * TOP_K / experts
    assert default_block_n(tokens * TOP_K, experts) <= 2 * block_n_covering(math.ceil(mean))


def stage(local: int, expert_begin: int = 0, total: int | None = None) -> CudaExpertStage:
    h, i, t = 128, 64, 2048
    weights = dataclasses.replace(ExpertWeights.empty(local, h, i), layout="sm90")
    workspace = ExpertWorkspace.allocate(t, TOP_K, local, h, i, "cpu", ExpertSpec("bf16"))
    return CudaExpertStage(weights, expert_begin, ExpertSpec("bf16"), workspace, total)


@pytest.mark.parametrize("tokens", [16, 64, 256, 1024])
def test_a_ranks_stage_sizes_its_tiles_by_every_ranks_experts_as_one_stage_of_them_all_would(cpu_devices_pass,
                                                                                                tokens):
    """Under replicated tokens rank r of 8 sees every (token, k) pair but holds an eighth of the experts: its experts
    average T*k/(8E) slots, not T*k/E."""
    all_experts = stage(32)
    assert stage(4, 8, 32).block_n(tokens, TOP_K) == all_experts.block_n(tokens, TOP_K)


def test_a_stage_without_a_total_takes_its_own_experts_for_all_of_them(cpu_devices_pass):
    assert stage(32).num_experts_total == 32
    assert stage(32).block_n(64, TOP_K) == default_block_n(64 * TOP_K, 32)
