"""The expert stage (NVFP4_SPEC sections 4, 5, 7): slots -> L1 -> clamped SwiGLU -> requant -> L2 -> combine.

The functions here are the oracle every kernel is compared against: plain torch in fp32, one expert at a
time, on any device. `expert_stage(..., backend="cuda")` runs the same stage through the CUDA kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import nvfp4
from .nvfp4 import NVFP4Tensor
from .ops import check_swiglu_limit
from .weights import ExpertWeights

if TYPE_CHECKING:  # the CUDA stage imports this module
    from .config import Config
    from .cuda_experts import ExpertWorkspace

Activations = NVFP4Tensor | torch.Tensor  # NVFP4 in W4A4 mode, bf16 (T, H) in W4A16 mode


@dataclass(frozen=True)
class ExpertSpec:
    act_mode: str = "nvfp4"  # nvfp4: W4A4 | bf16: W4A16
    l2_scale_mode: str = "static"  # static: 1/down_proj.input_scale | dynamic: amax of each expert's h
    swiglu_limit: float | None = None

    def __post_init__(self) -> None:
        if self.act_mode not in ("nvfp4", "bf16"):
            raise ValueError(f"act_mode: expected 'nvfp4' or 'bf16', got {self.act_mode!r}")
        if self.l2_scale_mode not in ("static", "dynamic"):
            raise ValueError(f"l2_scale_mode: expected 'static' or 'dynamic', got {self.l2_scale_mode!r}")
        check_swiglu_limit(self.swiglu_limit)

    @classmethod
    def of(cls, cfg: "Config") -> "ExpertSpec":
        """The expert stage a config's layers run."""
        return cls(cfg.runtime.act_mode, cfg.runtime.act_scale, cfg.model.swiglu_limit)

    @property
    def static_h_scale(self) -> bool:
        """h is requantized to NVFP4 with each expert's 1/down_proj.input_scale."""
        return self.act_mode == "nvfp4" and self.l2_scale_mode == "static"

    @property
    def dynamic_h_scale(self) -> bool:
        """h is requantized to NVFP4 with a scale from the amax over each expert's h."""
        return self.act_mode == "nvfp4" and self.l2_scale_mode == "dynamic"


@dataclass(frozen=True)
class Addend:
    """fp32 rows that the combine adds to output rows [begin, begin + len(values)) before the cast (EPMoE: this
    rank's share of the shared expert). ready: an event recorded after values were written on another stream, which
    the combine waits for; None where they were written on the combine's stream."""
    begin: int
    values: torch.Tensor
    ready: torch.cuda.Event | None = None

    def add_to(self, y: torch.Tensor) -> None:
        """The reference path: y (fp32, the routed sum) gets the rows added in place."""
        y[self.begin: self.begin + self.values.shape[0]] += self.values


@dataclass
class SlotMap:
    """Slots are the (token, k) pairs routed to a local expert, ordered by (local expert, t, k)."""

    counts: torch.Tensor  # int32 (E,)
    offsets: torch.Tensor  # int32 (E+1,), exclusive prefix sum of counts
    slot_pair: torch.Tensor  # int32 (T*topk,): pair index t*topk+k of slot s; -1 past offsets[E]
    topk: int

    @property
    def num_slots(self) -> int:
        return int(self.offsets[-1])

    def tokens(self) -> torch.Tensor:
        """Token index of every used slot (host sync: reference path only)."""
        return self.slot_pair[: self.num_slots].long() // self.topk


def map_slots(topk_idx: torch.Tensor, num_local: int, expert_begin: int) -> SlotMap:
    """Slot metadata for the local experts [expert_begin, expert_begin + num_local); other ids are skipped."""
    if topk_idx.dim() != 2 or topk_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_idx: expected an int32/int64 (T, topk) tensor, got {topk_idx.dtype} "
                        f"{tuple(topk_idx.shape)}")
    t, k = topk_idx.shape
    local = topk_idx.reshape(-1).long() - expert_begin
    is_local = (local >= 0) & (local < num_local)
    key = torch.where(is_local, local, torch.full_like(local, num_local))
    order = torch.sort(key, stable=True).indices  # stable: pairs stay in (t, k) order within an expert
    counts = torch.bincount(local[is_local], minlength=num_local)
    offsets = torch.zeros(num_local + 1, dtype=torch.int64, device=topk_idx.device)
    offsets[1:] = torch.cumsum(counts, 0)
    slot_pair = torch.where(torch.arange(t * k, device=topk_idx.device) < offsets[-1], order,
                            torch.full_like(order, -1))
    return SlotMap(counts.int(), offsets.int(), slot_pair.int(), k)


def _expert_rows(slots: SlotMap):
    offs = slots.offsets.tolist()
    for e in range(len(offs) - 1):
        if offs[e + 1] > offs[e]:
            yield e, slice(offs[e], offs[e + 1])


def l1_reference(acts: Activations, slots: SlotMap, weights: ExpertWeights, spec: ExpertSpec) -> torch.Tensor:
    """gate|up (S, 2I) in fp32 with the alphas applied, before the activation."""
    weights.require_layout("rows", "the reference L1")
    tok = slots.tokens()
    if spec.act_mode == "nvfp4":
        a = nvfp4.block_dequantize(acts.data[tok], acts.scale[tok])
        gs = acts.global_scale.float()
    else:
        a = acts[tok].float()
        gs = torch.ones((), device=a.device)
    i = weights.intermediate_size
    out = torch.empty(a.shape[0], 2 * i, dtype=torch.float32, device=a.device)
    for e, rows in _expert_rows(slots):
        w = nvfp4.block_dequantize(weights.w13[e], weights.w13_scale[e])
        alpha = (weights.w13_alpha[e] / gs).repeat_interleave(i)
        out[rows] = (a[rows] @ w.t()) * alpha
    return out


def swiglu(gate_up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """h = silu(min(gate, limit)) * clamp(up, -limit, limit), in fp32 (no clamp when limit is None)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return F.silu(gate) * up


def quantize_h(h: torch.Tensor, slots: SlotMap, weights: ExpertWeights,
               spec: ExpertSpec) -> tuple[Activations, torch.Tensor]:
    """Re-quantize h with one global scale per expert (so the result never depends on the EP layout)."""
    e_count = weights.num_experts
    gs = torch.ones(e_count, dtype=torch.float32, device=h.device)
    if spec.act_mode == "bf16":
        return h.to(torch.bfloat16), gs
    data = torch.empty(h.shape[0], h.shape[1] // 2, dtype=torch.uint8, device=h.device)
    scale = torch.empty(h.shape[0], h.shape[1] // 16, dtype=torch.float8_e4m3fn, device=h.device)
    for e, rows in _expert_rows(slots):
        g = (1.0 / weights.l2_input_scale[e] if spec.l2_scale_mode == "static"
             else nvfp4.dynamic_global_scale(h[rows]))
        q = nvfp4.quantize(h[rows], g, check=False)
        data[rows], scale[rows], gs[e] = q.data, q.scale, q.global_scale
    return NVFP4Tensor(data, scale, gs), gs


def l2_reference(hq: Activations, h_gs: torch.Tensor, slots: SlotMap, weights: ExpertWeights,
                 spec: ExpertSpec) -> torch.Tensor:
    """y_slot (S, H) in fp32: h @ W2^T times w2_alpha / h_gs."""
    weights.require_layout("rows", "the reference L2")
    a = nvfp4.block_dequantize(hq.data, hq.scale) if spec.act_mode == "nvfp4" else hq.float()
    out = torch.empty(a.shape[0], weights.hidden_size, dtype=torch.float32, device=a.device)
    for e, rows in _expert_rows(slots):
        w = nvfp4.block_dequantize(weights.w2[e], weights.w2_scale[e])
        out[rows] = (a[rows] @ w.t()) * (weights.w2_alpha[e] / h_gs[e])
    return out


def combine(y_slot: torch.Tensor, slots: SlotMap, topk_weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """y[t] = sum over k ascending of w[t, k] * y_slot(t, k), fp32; tokens with no local slot get 0."""
    k = slots.topk
    n = slots.num_slots
    slot_of_pair = torch.full((num_tokens * k,), -1, dtype=torch.long, device=y_slot.device)
    slot_of_pair[slots.slot_pair[:n].long()] = torch.arange(n, device=y_slot.device)
    slot_of_pair = slot_of_pair.view(num_tokens, k)
    y = torch.zeros(num_tokens, y_slot.shape[1], dtype=torch.float32, device=y_slot.device)
    for j in range(k):
        s = slot_of_pair[:, j]
        hit = s >= 0
        y[hit] += topk_weights[hit, j].float().unsqueeze(1) * y_slot[s[hit]]
    return y


def expert_stage(acts: Activations, topk_idx: torch.Tensor, topk_weights: torch.Tensor, weights: ExpertWeights,
                 expert_begin: int, spec: ExpertSpec, backend: str = "reference",
                 workspace: "ExpertWorkspace | None" = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's partial MoE output (T, H) for its local experts: fp32, or written into `out` (cuda backend,
    with its preallocated `workspace` so that CUDA graphs replay the same addresses)."""
    if backend == "cuda":
        from .cuda_experts import cuda_expert_stage

        return cuda_expert_stage(acts, topk_idx, topk_weights, weights, expert_begin, spec, out=out,
                                 workspace=workspace)
    if backend != "reference":
        raise ValueError(f"backend: expected 'reference' or 'cuda', got {backend!r}")
    _check_reference_args(acts, topk_idx, topk_weights, weights, spec)
    slots = map_slots(topk_idx, weights.num_experts, expert_begin)
    h = swiglu(l1_reference(acts, slots, weights, spec), spec.swiglu_limit)
    hq, h_gs = quantize_h(h, slots, weights, spec)
    y_slot = l2_reference(hq, h_gs, slots, weights, spec)
    return combine(y_slot, slots, topk_weights, topk_idx.shape[0])


def check_experts_per_token(t: int, k: int) -> None:
    """Routing rows (t, k) name at least one expert per token (a top-0 stage has nothing to combine)."""
    if k < 1:
        raise ValueError(f"topk_idx: expected at least one expert per token, got shape {(t, k)}")


def _check_reference_args(acts: Activations, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                          weights: ExpertWeights, spec: ExpertSpec) -> None:
    """The reference stage's arguments agree with each other (the CUDA stage checks its own, more strictly)."""
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_idx: expected an int32/int64 tensor, got "
                        f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)}")
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx: expected shape (T, topk), got {tuple(topk_idx.shape)}")
    t, k = topk_idx.shape
    check_experts_per_token(t, k)
    if not isinstance(topk_weights, torch.Tensor) or not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights: expected a floating-point tensor, got "
                        f"{getattr(topk_weights, 'dtype', type(topk_weights).__name__)}")
    if tuple(topk_weights.shape) != (t, k):
        raise ValueError(f"topk_weights: expected shape {(t, k)} (topk_idx's), got {tuple(topk_weights.shape)}")
    weights.require_layout("rows", "the reference expert stage")
    h = weights.hidden_size
    if spec.act_mode == "nvfp4":
        if not isinstance(acts, NVFP4Tensor):
            raise TypeError(f"acts: expected an NVFP4Tensor in act_mode 'nvfp4', got {type(acts).__name__}")
        got = (tuple(acts.data.shape), tuple(acts.scale.shape))
        if got != ((t, h // 2), (t, h // 16)):
            raise ValueError(f"acts: expected codes {(t, h // 2)} and scales {(t, h // 16)} for {t} tokens of hidden "
                             f"{h}, got {got[0]} and {got[1]}")
    elif not isinstance(acts, torch.Tensor) or tuple(acts.shape) != (t, h):
        raise ValueError(f"acts: expected a (T, H) = {(t, h)} tensor in act_mode 'bf16', got "
                         f"{type(acts).__name__} {tuple(getattr(acts, 'shape', ()))}")
