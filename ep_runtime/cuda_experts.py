"""The expert stage on the CUDA kernels: align -> L1 (+ SwiGLU + requant) -> L2 -> combine.

Same contract as experts.expert_stage (the oracle): this rank's partial output (T, H) for its local experts.
All buffers live in an ExpertWorkspace sized for the largest batch, allocated once, so a CUDA graph captured
around cuda_expert_stage replays on the same addresses. Nothing here synchronizes with the host.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from . import ops
from .experts import Activations, ExpertSpec
from .nvfp4 import NVFP4Tensor
from .weights import ExpertWeights


@dataclass
class ExpertWorkspace:
    """Slot metadata and intermediates for up to max_tokens tokens of top-k routing (S = max_tokens * topk)."""

    max_tokens: int
    topk: int
    num_experts: int
    hidden: int
    inter: int
    counts: torch.Tensor  # int32 (E,)
    offsets: torch.Tensor  # int32 (E+1,)
    slot_pair: torch.Tensor  # int32 (S,)
    pair_slot: torch.Tensor  # int32 (S,)
    x_bf16: torch.Tensor  # (max_tokens, H) decode*sf of the NVFP4 input (W4A4)
    h_f32: torch.Tensor  # (S, I) fp32 h before dynamic requantization
    hq_data: torch.Tensor  # uint8 (S, I/2)
    hq_scale: torch.Tensor  # float8_e4m3fn (S, I/16)
    h_bf16: torch.Tensor  # (S, I): L2's operand (exact decode*sf of hq, or h itself in W4A16)
    h_gs: torch.Tensor  # fp32 (E,) global scale of each expert's h
    amax_ws: torch.Tensor  # int32 (E,) bit patterns of per-expert amax (dynamic scale)
    y_slot: torch.Tensor  # fp32 (S, H)

    @classmethod
    def allocate(cls, max_tokens: int, topk: int, num_experts: int, hidden: int, inter: int,
                 device: torch.device | str, spec: ExpertSpec = ExpertSpec()) -> "ExpertWorkspace":
        s = max_tokens * topk
        dev = torch.device(device)

        def buf(shape: tuple[int, ...], dtype: torch.dtype, needed: bool = True) -> torch.Tensor:
            return torch.empty(shape if needed else (0,) * len(shape), dtype=dtype, device=dev)

        nvfp4 = spec.act_mode == "nvfp4"
        dynamic = nvfp4 and spec.l2_scale_mode == "dynamic"
        return cls(
            max_tokens, topk, num_experts, hidden, inter,
            counts=buf((num_experts,), torch.int32), offsets=buf((num_experts + 1,), torch.int32),
            slot_pair=buf((s,), torch.int32), pair_slot=buf((s,), torch.int32),
            x_bf16=buf((max_tokens, hidden), torch.bfloat16, nvfp4),
            h_f32=buf((s, inter), torch.float32, dynamic),
            hq_data=buf((s, inter // 2), torch.uint8, nvfp4),
            hq_scale=buf((s, inter // 16), torch.float8_e4m3fn, nvfp4),
            h_bf16=buf((s, inter), torch.bfloat16),
            h_gs=buf((num_experts,), torch.float32), amax_ws=buf((num_experts,), torch.int32),
            y_slot=buf((s, hidden), torch.float32),
        )

    def check_fits(self, num_tokens: int, topk: int, weights: ExpertWeights, spec: ExpertSpec) -> None:
        want = (weights.num_experts, weights.hidden_size, weights.intermediate_size)
        if (self.num_experts, self.hidden, self.inter) != want:
            raise ValueError(f"workspace: built for (E, H, I) = {(self.num_experts, self.hidden, self.inter)}, "
                             f"weights have {want}")
        if topk != self.topk or num_tokens > self.max_tokens:
            raise ValueError(f"workspace: holds {self.max_tokens} tokens of top-{self.topk}, got {num_tokens} "
                             f"tokens of top-{topk}")
        if spec.act_mode == "nvfp4" and self.hq_data.numel() == 0:
            raise ValueError("workspace: allocated for act_mode 'bf16', the spec asks for 'nvfp4'")
        if spec.act_mode == "nvfp4" and spec.l2_scale_mode == "dynamic" and self.h_f32.numel() == 0:
            raise ValueError("workspace: allocated without the dynamic-scale buffer, the spec asks for it")

    def slots(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """slot_pair, pair_slot views for num_tokens tokens."""
        n = num_tokens * self.topk
        return self.slot_pair[:n], self.pair_slot[:n]


def default_block_n(num_pairs: int, num_experts: int) -> int:
    """Slot tile width: the smallest that covers the average local expert's slots (at most 128)."""
    per_expert = -(-num_pairs // num_experts)
    return next((b for b in ops.BLOCK_NS if b >= per_expert), ops.BLOCK_NS[-1])


def _check_args(acts: Activations, topk_idx: torch.Tensor, topk_weights: torch.Tensor, weights: ExpertWeights,
                spec: ExpertSpec, out: torch.Tensor | None, workspace: ExpertWorkspace | None,
                block_n: int | None) -> None:
    """Every check of cuda_expert_stage's arguments, naming them. The ops check again what they are handed, but
    only when their turn comes (after earlier kernels ran), naming the workspace views passed to them."""
    weights.require_layout("sm90", "the CUDA expert stage (tile them once with sm90_layout.tile_)")
    e, hidden, inter = ops.check_l1_weights(weights.w13, weights.w13_scale, weights.w13_alpha, "weights.")
    if ops.check_l2_weights(weights.w2, weights.w2_scale, weights.w2_alpha, "weights.") != (e, hidden, inter):
        raise ValueError(f"weights.w2: expected shape {(e, hidden, inter // 2)} (that of weights.w13), got "
                         f"{tuple(weights.w2.shape)}")
    used = ["w13", "w13_scale", "w13_alpha", "w2", "w2_scale", "w2_alpha"]
    if spec.act_mode == "nvfp4" and spec.l2_scale_mode == "static":
        ops.check_tensor(weights.l2_input_scale, "weights.l2_input_scale", torch.float32, (e,))
        used.append("l2_input_scale")
    named = {f"weights.{n}": getattr(weights, n) for n in used}
    named["topk_idx"] = ops.check_tensor(topk_idx, "topk_idx", torch.int32, (None, None))
    t, k = topk_idx.shape
    named["topk_weights"] = ops.check_tensor(topk_weights, "topk_weights", torch.float32, (t, k))
    if spec.act_mode == "nvfp4":
        if not isinstance(acts, NVFP4Tensor):
            raise TypeError(f"acts: expected an NVFP4Tensor in act_mode 'nvfp4', got {type(acts).__name__}")
        named["acts.data"] = ops.check_tensor(acts.data, "acts.data", torch.uint8, (t, hidden // 2))
        ops.check_block_scales(acts.scale, "acts.scale", t, hidden)
        named["acts.scale"] = acts.scale
        named["acts.global_scale"] = ops.check_one_value(acts.global_scale, "acts.global_scale")
    else:
        if not isinstance(acts, torch.Tensor):
            raise TypeError(f"acts: expected a bf16 (T, H) tensor in act_mode 'bf16', got {type(acts).__name__}")
        named["acts"] = ops.check_tensor(acts, "acts", torch.bfloat16, (t, hidden))
    if out is not None:
        named["out"] = ops.check_tensor(out, "out", (torch.float32, torch.bfloat16), (t, hidden))
    if block_n is not None:
        ops.check_tiles(block_n, 0, 2 * inter)
    if workspace is not None:
        workspace.check_fits(t, k, weights, spec)
        named.update({f"workspace.{f.name}": getattr(workspace, f.name) for f in fields(workspace)
                      if isinstance(getattr(workspace, f.name), torch.Tensor)})
    ops.check_same_device(named)


def cuda_expert_stage(acts: Activations, topk_idx: torch.Tensor, topk_weights: torch.Tensor, weights: ExpertWeights,
                      expert_begin: int, spec: ExpertSpec, out: torch.Tensor | None = None,
                      workspace: ExpertWorkspace | None = None, block_n: int | None = None) -> torch.Tensor:
    """This rank's partial MoE output (T, H) (fp32 unless out is given as bf16) for its local experts.

    Every argument is checked before the first kernel runs."""
    _check_args(acts, topk_idx, topk_weights, weights, spec, out, workspace, block_n)
    t, k = topk_idx.shape
    e, hidden, inter = weights.num_experts, weights.hidden_size, weights.intermediate_size
    device = weights.w13.device
    ws = workspace or ExpertWorkspace.allocate(t, k, e, hidden, inter, device, spec)
    if out is None:
        out = torch.empty(t, hidden, dtype=torch.float32, device=device)
    if t == 0:
        return out
    n = t * k
    bn = block_n or default_block_n(n, e)
    slot_pair, pair_slot = ws.slots(t)
    ops.moe_align(topk_idx, e, expert_begin, ws.counts, ws.offsets, slot_pair, pair_slot)

    if spec.act_mode == "nvfp4":
        x = ws.x_bf16[:t]
        ops.nvfp4_dequant_rows(acts.data, acts.scale, x)
        x_gs = acts.global_scale.reshape(1)
    else:
        x, x_gs = acts, None

    h_bf16 = ws.h_bf16[:n]
    l1 = dict(swiglu_limit=spec.swiglu_limit, block_n=bn)
    if spec.act_mode == "bf16":
        ops.grouped_l1(weights.w13, weights.w13_scale, weights.w13_alpha, x, None, ws.offsets, slot_pair, k, "bf16",
                       h_bf16=h_bf16, **l1)
        h_gs = None
    elif spec.l2_scale_mode == "static":
        torch.reciprocal(weights.l2_input_scale, out=ws.h_gs)
        ops.grouped_l1(weights.w13, weights.w13_scale, weights.w13_alpha, x, x_gs, ws.offsets, slot_pair, k, "nvfp4",
                       h_gs=ws.h_gs, hq_data=ws.hq_data[:n], hq_scale=ws.hq_scale[:n], h_bf16=h_bf16, **l1)
        h_gs = ws.h_gs
    else:
        h_f32 = ws.h_f32[:n]
        ops.grouped_l1(weights.w13, weights.w13_scale, weights.w13_alpha, x, x_gs, ws.offsets, slot_pair, k, "fp32",
                       out_f32=h_f32, **l1)
        ops.requant_dynamic(h_f32, ws.offsets, ws.amax_ws, ws.hq_data[:n], ws.hq_scale[:n], h_bf16, ws.h_gs)
        h_gs = ws.h_gs

    y_slot = ws.y_slot[:n]
    ops.grouped_l2(weights.w2, weights.w2_scale, weights.w2_alpha, h_bf16, h_gs, ws.offsets, y_slot, bn)
    ops.combine(y_slot, pair_slot, topk_weights, out)
    return out
