"""The expert stage on the CUDA kernels: align -> L1 (+ SwiGLU + requant) -> L2 -> combine (+ an addend).

Same contract as experts.expert_stage (the oracle): this rank's partial output (T, H) for its local experts.
All buffers live in an ExpertWorkspace sized for the largest batch, allocated once, so a CUDA graph captured
around a CudaExpertStage call replays on the same addresses. Nothing here synchronizes with the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from . import ops
from .experts import Activations, Addend, ExpertSpec, check_experts_per_token
from .nvfp4 import NVFP4Tensor
from .weights import ExpertWeights


def _workspace_layout(max_tokens: int, topk: int, num_experts: int, hidden: int, inter: int,
                      spec: ExpertSpec) -> list[tuple[str, tuple[int, ...], torch.dtype, bool]]:
    """(field, shape, dtype, whether the spec uses it) of every workspace buffer."""
    s = max_tokens * topk
    nvfp4, dynamic = spec.act_mode == "nvfp4", spec.dynamic_h_scale
    return [("counts", (num_experts,), torch.int32, True), ("offsets", (num_experts + 1,), torch.int32, True),
            ("slot_pair", (s,), torch.int32, True), ("pair_slot", (s,), torch.int32, True),
            ("x_bf16", (max_tokens, hidden), torch.bfloat16, nvfp4),
            ("h_f32", (s, inter), torch.float32, dynamic),
            ("hq_data", (s, inter // 2), torch.uint8, nvfp4),
            ("hq_scale", (s, inter // 16), torch.float8_e4m3fn, nvfp4),
            ("h_bf16", (s, inter), torch.bfloat16, True), ("h_gs", (num_experts,), torch.float32, dynamic),
            ("amax_ws", (num_experts,), torch.int32, dynamic), ("y_slot", (s, hidden), torch.float32, True)]


@dataclass(frozen=True)
class ExpertWorkspace:
    """Slot metadata and intermediates for up to max_tokens tokens of top-k routing (S = max_tokens * topk).
    Buffers a spec does not use are allocated empty for it (the kernels then only receive their address)."""

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
    h_gs: torch.Tensor  # fp32 (E,) global scale of each expert's h (dynamic)
    amax_ws: torch.Tensor  # int32 (E,) bit patterns of per-expert amax (dynamic)
    y_slot: torch.Tensor  # fp32 (S, H)
    # L1's K split of launches of few tiles (ops.grouped_l1): the pieces' sums and the tiles' arrival counts, zero
    # between launches; empty: no split.
    split_sums: torch.Tensor  # fp32
    split_arrivals: torch.Tensor  # int32

    def __deepcopy__(self, memo: dict) -> "ExpertWorkspace":
        """Part of a LayerScratch, which deep copies of a layer share: the copy's stages run on the same workspace."""
        return self

    @classmethod
    def allocate(cls, max_tokens: int, topk: int, num_experts: int, hidden: int, inter: int,
                 device: torch.device | str, spec: ExpertSpec = ExpertSpec(), split: bool = True) -> "ExpertWorkspace":
        """split=False leaves the K split's buffers empty: every tile then runs whole on one CTA."""
        dev = torch.device(device)
        sums, arrivals = ops.split_workspace(dev, split)
        return cls(max_tokens, topk, num_experts, hidden, inter, **{
            name: torch.empty(shape if used else (0,) * len(shape), dtype=dtype, device=dev)
            for name, shape, dtype, used in _workspace_layout(max_tokens, topk, num_experts, hidden, inter, spec)},
            split_sums=sums, split_arrivals=arrivals)

    def check(self, weights: ExpertWeights, spec: ExpertSpec) -> dict[str, torch.Tensor]:
        """Fits these weights, and every buffer the spec uses has its dtype, shape and layout; returns the buffers
        by name."""
        want = (weights.num_experts, weights.hidden_size, weights.intermediate_size)
        if (self.num_experts, self.hidden, self.inter) != want:
            raise ValueError(f"workspace: built for (E, H, I) = {(self.num_experts, self.hidden, self.inter)}, "
                             f"weights have {want}")
        named = {f"workspace.{name}": ops.check_tensor(getattr(self, name), f"workspace.{name}", dtype,
                                                       shape if used else None)
                 for name, shape, dtype, used in _workspace_layout(self.max_tokens, self.topk, *want, spec)}
        ops.check_split(self.split_sums, self.split_arrivals, "workspace.")
        named.update({"workspace.split_sums": self.split_sums, "workspace.split_arrivals": self.split_arrivals})
        return named

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every buffer the kernels write, by name."""
        return {f"workspace.{f.name}": getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def check_tokens(self, num_tokens: int, topk: int) -> None:
        if topk != self.topk or num_tokens > self.max_tokens:
            raise ValueError(f"workspace: holds {self.max_tokens} tokens of top-{self.topk}, got {num_tokens} "
                             f"tokens of top-{topk}")

    def slots(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """slot_pair, pair_slot views for num_tokens tokens."""
        n = num_tokens * self.topk
        return self.slot_pair[:n], self.pair_slot[:n]


def block_n_covering(slots: int) -> int:
    """The narrowest slot tile that holds `slots` slots (the widest beyond that)."""
    return next((b for b in ops.BLOCK_NS if b >= slots), ops.BLOCK_NS[-1])


def default_block_n(num_pairs: int, num_experts: int) -> int:
    """Slot tile width for num_pairs (token, k) pairs routed over num_experts experts (every rank's, not only this
    rank's): the narrowest tile that holds an expert's slots at the mean plus two standard deviations of uniform
    routing (about sqrt(mean)). Routing totals are all the host knows; an expert past its tile streams its weights
    once more for each further tile, which costs more than a wider tile's idle columns. On an H200 (a rank's 48
    experts, random top-6 routing) this made the stage 16-23 % faster than the tile of the mean at 8 and 16 slots per
    expert, 2-9 % at 32, and it picked the fastest tile (or one within 2 %) for 48, 96 and 192 experts at means of 4
    to 16 (NOTES_experts.md, thirtieth session)."""
    mean = num_pairs / num_experts
    return block_n_covering(math.ceil(mean + 2.0 * math.sqrt(mean)))


def _check_weights(weights: ExpertWeights, spec: ExpertSpec) -> dict[str, torch.Tensor]:
    """The stacked weights the stage reads, in the SM90 layout; returns them by name."""
    weights.require_layout("sm90", "the CUDA expert stage (tile them once with sm90_layout.tile_)")
    e, hidden, inter = ops.check_l1_weights(weights.w13, weights.w13_scale, weights.w13_alpha, "weights.")
    if ops.check_l2_weights(weights.w2, weights.w2_scale, weights.w2_alpha, "weights.") != (e, hidden, inter):
        raise ValueError(f"weights.w2: expected shape {(e, hidden, inter // 2)} (that of weights.w13), got "
                         f"{tuple(weights.w2.shape)}")
    used = ["w13", "w13_scale", "w13_alpha", "w2", "w2_scale", "w2_alpha"]
    if spec.static_h_scale:
        ops.check_tensor(weights.l2_input_scale, "weights.l2_input_scale", torch.float32, (e,))
        used.append("l2_input_scale")
    return {f"weights.{n}": getattr(weights, n) for n in used}


class CudaExpertStage:
    """The expert stage of one weight stack on the CUDA kernels.

    The weights, spec and workspace are checked once, here; each call checks only its own arguments (activations,
    routing, output) and then launches the registered ops unchecked. An eager forward's host time then stays
    near its launches (the ops' own wrappers would check the weights and workspace again at every kernel).
    The static L2 scale 1/l2_input_scale is computed here once too. EPMoE holds one stage per weight stack."""

    def __init__(self, weights: ExpertWeights, expert_begin: int, spec: ExpertSpec, workspace: ExpertWorkspace,
                 num_experts_total: int | None = None):
        named = _check_weights(weights, spec)
        if not isinstance(workspace, ExpertWorkspace):
            raise TypeError(f"workspace: expected an ExpertWorkspace, got {type(workspace).__name__}")
        named.update(workspace.check(weights, spec))
        if isinstance(expert_begin, bool) or not isinstance(expert_begin, int) or expert_begin < 0:
            raise ValueError(f"expert_begin: expected an int >= 0, got {expert_begin!r}")
        # The experts the tokens are routed over (all ranks'): what sizes the slot tiles. Default: the fewest there
        # can be, expert_begin + this stack's (the stack's own when it starts at expert 0).
        least = expert_begin + weights.num_experts
        total = least if num_experts_total is None else num_experts_total
        if isinstance(total, bool) or not isinstance(total, int) or total < least:
            raise ValueError(f"num_experts_total: expected an int >= expert_begin + local experts = {least}, got "
                             f"{num_experts_total!r}")
        ops.check_same_device(named)
        self.weights, self.expert_begin, self.spec, self.workspace = weights, expert_begin, spec, workspace
        self.num_experts_total = total
        self._static_h_gs = torch.reciprocal(weights.l2_input_scale) if spec.static_h_scale else None
        self._epilogue = ops.EPILOGUES["bf16" if spec.act_mode == "bf16" else "nvfp4" if spec.static_h_scale
                                       else "fp32"]
        self._swiglu_limit = float("inf") if spec.swiglu_limit is None else float(spec.swiglu_limit)
        # One expert at top-1 (the shared expert) may run dense: its slots are then the tokens in order, whose
        # offsets for t tokens are row t of this table, (0, t) (rows of 16 bytes, as every kernel operand starts).
        self._dense_slots = self._dense_offsets = None
        if weights.num_experts == 1 and workspace.topk == 1:
            n, dev = workspace.max_tokens, weights.w13.device
            self._dense_slots = torch.arange(n, dtype=torch.int32, device=dev)
            self._dense_offsets = torch.zeros(n + 1, 4, dtype=torch.int32, device=dev)
            self._dense_offsets[:, 1] = torch.arange(n + 1, dtype=torch.int32, device=dev)

    def _check_call(self, acts: Activations, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                    out: torch.Tensor | None, block_n: int | None, addend: Addend | None) -> None:
        hidden = self.weights.hidden_size
        named = {"topk_idx": ops.check_tensor(topk_idx, "topk_idx", torch.int32, (None, None))}
        t, k = topk_idx.shape
        check_experts_per_token(t, k)  # else every kernel but the combine's would run first
        named["topk_weights"] = ops.check_tensor(topk_weights, "topk_weights", torch.float32, (t, k))
        if self.spec.act_mode == "nvfp4":
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
            ops.check_tensor(out, "out", (torch.float32, torch.bfloat16), (t, hidden))
        if block_n is not None:
            ops.check_tiles(block_n, 0, 2 * self.weights.intermediate_size)
        if addend is not None:
            if not isinstance(addend, Addend):
                raise TypeError(f"addend: expected an Addend, got {type(addend).__name__}")
            ops.check_addend(addend.values, addend.begin, t, hidden)
            named["addend.values"] = addend.values
        self.workspace.check_tokens(t, k)
        named["weights.w13"] = self.weights.w13
        ops.check_operands({"out": out}, {**named, **self.workspace.buffers()})

    def block_n(self, tokens: int, topk: int) -> int:
        """The slot tile width of a call of `tokens` tokens at top-`topk` (unless the call names one)."""
        return default_block_n(tokens * topk, self.num_experts_total)

    def __call__(self, acts: Activations, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 out: torch.Tensor | None = None, block_n: int | None = None,
                 addend: Addend | None = None) -> torch.Tensor:
        """This rank's partial MoE output (T, H) (fp32 unless out is given as bf16) for its local experts, plus the
        addend's rows."""
        self._check_call(acts, topk_idx, topk_weights, out, block_n, addend)
        return self.run(acts, topk_idx, topk_weights, out, block_n, addend)

    def run(self, acts: Activations, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
            out: torch.Tensor | None = None, block_n: int | None = None,
            addend: Addend | None = None) -> torch.Tensor:
        """__call__ without its checks, for a caller whose arguments are its own buffers' views, valid by
        construction (EPMoE's forward: the staged activations, the routing rows and the all-reduce buffer)."""
        w, ws = self.weights, self.workspace
        t, k = topk_idx.shape
        if out is None:
            out = torch.empty(t, w.hidden_size, dtype=torch.float32, device=w.w13.device)
        if t == 0:
            return out
        slot_pair, pair_slot = ws.slots(t)
        ops.moe_align_op(topk_idx, w.num_experts, self.expert_begin, ws.counts, ws.offsets, slot_pair, pair_slot)
        y_slot = self._gemms(acts, t, k, ws.offsets, slot_pair, block_n or self.block_n(t, k))
        if addend is not None and addend.ready is not None:  # as late as possible: the GEMMs ran beside its stream
            torch.cuda.current_stream(out.device).wait_event(addend.ready)
        ops.combine_op(y_slot, pair_slot, topk_weights, None if addend is None else addend.values,
                       0 if addend is None else addend.begin, out)
        return out

    def run_dense(self, acts: Activations) -> torch.Tensor:
        """Every token once through the stack's one expert with weight 1 (the shared expert), unchecked like run: the
        slots are the tokens in order, so nothing is aligned or combined. Returns the output, fp32 (T, H): a view of
        the workspace, valid until the stage runs again."""
        if self._dense_slots is None:
            raise ValueError(f"run_dense: needs one expert at top-1, got {self.weights.num_experts} experts and a "
                             f"workspace of top-{self.workspace.topk}")
        t = (acts.data if isinstance(acts, NVFP4Tensor) else acts).shape[0]
        if t == 0:
            return self.workspace.y_slot[:0]
        return self._gemms(acts, t, 1, self._dense_offsets[t, :2], self._dense_slots[:t], block_n_covering(t))

    def _gemms(self, acts: Activations, t: int, k: int, offsets: torch.Tensor, slot_pair: torch.Tensor,
               bn: int) -> torch.Tensor:
        """L1 (+ SwiGLU + requant) and L2 of t tokens' t*k slots; returns the slots' outputs (the workspace's)."""
        w, ws = self.weights, self.workspace
        n = t * k
        if self.spec.act_mode == "nvfp4":
            x = ws.x_bf16[:t]
            ops.dequant_rows_op(acts.data, acts.scale, x)
            x_gs = acts.global_scale.reshape(1)
        else:
            x, x_gs = acts, None
        h_bf16, hq_data, hq_scale, h_f32 = ws.h_bf16[:n], ws.hq_data[:n], ws.hq_scale[:n], ws.h_f32[:n]
        ops.grouped_l1_op(w.w13, w.w13_scale, w.w13_alpha, x, x_gs, offsets, slot_pair, k, self._epilogue,
                          self._swiglu_limit, self._static_h_gs, h_f32, hq_data, hq_scale, h_bf16, ws.split_sums,
                          ws.split_arrivals, 0, bn, 0)
        h_gs = self._static_h_gs
        if self._epilogue == ops.EPILOGUES["fp32"]:
            ops.requant_dynamic_op(h_f32, offsets, ws.amax_ws, hq_data, hq_scale, h_bf16, ws.h_gs)
            h_gs = ws.h_gs
        y_slot = ws.y_slot[:n]
        ops.grouped_l2_op(w.w2, w.w2_scale, w.w2_alpha, h_bf16, h_gs, offsets, y_slot, bn, 0)
        return y_slot


def cuda_expert_stage(acts: Activations, topk_idx: torch.Tensor, topk_weights: torch.Tensor, weights: ExpertWeights,
                      expert_begin: int, spec: ExpertSpec, out: torch.Tensor | None = None,
                      workspace: ExpertWorkspace | None = None, block_n: int | None = None,
                      num_experts_total: int | None = None) -> torch.Tensor:
    """One call of CudaExpertStage (a workspace for this call's tokens when none is given): every argument is
    checked before the first kernel runs."""
    if workspace is None:
        _check_weights(weights, spec)
        t, k = ops.check_tensor(topk_idx, "topk_idx", torch.int32, (None, None)).shape
        workspace = ExpertWorkspace.allocate(t, k, weights.num_experts, weights.hidden_size,
                                             weights.intermediate_size, weights.w13.device, spec)
    stage = CudaExpertStage(weights, expert_begin, spec, workspace, num_experts_total)
    return stage(acts, topk_idx, topk_weights, out, block_n)
