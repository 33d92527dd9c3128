"""EPMoE: one expert-parallel MoE layer as an nn.Module.

forward: staging -> routing -> prepare -> experts (L1, SwiGLU, requant, L2, combine, which adds this rank's share of the
shared expert) -> finalize.
Replicated-token mode: every rank sees all T tokens, computes its local experts [rank*E/W, (rank+1)*E/W)
and the partial outputs are summed by the buffer's all-reduce (prepare has nothing to do).
DP mode (runtime.token_mode 'dp'): each rank stages and routes its own T tokens, prepare all-gathers every rank's
(NVFP4 or bf16 activations, topk ids and weights), the local experts run over all W*T of them, and finalize
reduce-scatters the partial outputs so that each rank gets the sums of its own tokens' rows.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.profiler import record_function

from . import cuda_graphs
from .checkpoint import CheckpointReader, LayerWeights, Naming, load_layer, synthetic_layer
from .config import Config, ModelConfig, local_expert_count
from .dist_utils import check_same_on_every_rank, fallback_device, resolve_device, share_rows
from .experts import Addend, ExpertSpec, expert_stage
from .layer_op import moe_layer_op, register
from .nvfp4 import NVFP4Tensor, check_finite, check_positive_scale, positive_scale
from .ops import refuse_host_checks_while_capturing
from .routing import Router
from .sm90_layout import check_tileable, tile_
from .scratch import LayerScratch, scratch_needs, shared_split, token_sources
from .symm import SymmBuffer
from .weights import ExpertWeights, check_dense


# The stages of a forward, in order: EPMoE.stage_marker hears of each as it ends, and a profiler sees each as a range.
# checks: the input's shape and device (with several ranks every check, agreed on by all; else the value checks run in
# the stages that need them); shared_expert: its launch onto its own stream.
STAGES = ("checks", "staging", "shared_expert", "routing", "prepare", "experts", "finalize")


def _no_marker(stage: str) -> None:
    """The default stage marker: a module-level function rather than a lambda, so that a layer pickles (torch.save)."""


class _StageRanges:
    """While a profiler records: a range ep_moe.<stage> around each stage of a forward in turn. Each stage's mark
    closes its range, tells the layer's stage marker and opens the next stage's; close() ends whichever is open (a
    stage that raised). Only then: with no profiler the forward calls the marker alone (a range costs 5 us even then,
    and an object per stage about 0.5 us)."""

    def __init__(self, marker: Callable[[str], None]):
        self.marker, self.stage, self.open = marker, 0, None
        self._open_next()

    def _open_next(self) -> None:
        if self.stage < len(STAGES):
            self.open = record_function(f"ep_moe.{STAGES[self.stage]}")
            self.open.__enter__()
            self.stage += 1

    def close(self) -> None:
        if self.open is not None:
            self.open.__exit__(None, None, None)
            self.open = None

    def mark(self, name: str) -> None:
        self.close()
        self.marker(name)
        self._open_next()


def cuda_backend_available(device: torch.device) -> bool:
    """The CUDA expert stage runs on sm_90 devices when the extension was built."""
    from .ops import extension_available

    return device.type == "cuda" and extension_available("grouped_l1", "moe_align")


class EPMoE(nn.Module):
    """One MoE layer of an expert-parallel model. It takes ownership of `weights`: on the CUDA backend, expert
    weights already on the device are re-tiled in place for the SM90 kernels (their layout then says 'sm90');
    weights elsewhere are copied to the device and keep their bytes. A failed construction changes nothing.
    With world_size > 1 the default process group must exist and have this rank and size.

    `scratch` is the memory its forward writes (scratch.LayerScratch): allocated here when None, or another layer's
    `scratch` of the same shapes, so that all MoE layers of a model on a rank share one."""

    def __init__(self, cfg: Config, weights: LayerWeights, rank: int = 0, world_size: int = 1,
                 scratch: LayerScratch | None = None, device: torch.device | str = "cpu"):
        super().__init__()
        m, rt = cfg.model, cfg.runtime
        device = resolve_device(device)
        n_local = _check_placement(m, rank, world_size)
        if weights.experts.num_experts != n_local:
            raise ValueError(f"weights: expected {n_local} local experts for world_size={world_size}, "
                             f"got {weights.experts.num_experts}")
        _check_shared_present(m, weights.shared is not None, "weights.shared")
        stacks = [("weights.experts", weights.experts, n_local, m.moe_intermediate_size)]
        if weights.shared is not None:
            stacks.append(("weights.shared", weights.shared, 1, m.shared_intermediate_size))
        for name, w, n, inter in stacks:
            w.check_sizes(name, n, m.hidden_size, inter)
            w.require_layout("rows", "EPMoE", name)
            w.check_values(name)
        if rt.backend == "auto":
            self.backend = "cuda" if cuda_backend_available(device) else "reference"
        else:
            if rt.backend == "cuda" and not cuda_backend_available(device):
                raise RuntimeError(f"backend: 'cuda' needs an sm_90 CUDA device and the built extension "
                                   f"(device {device})")
            self.backend = rt.backend
        spec = ExpertSpec.of(cfg)
        if scratch is not None:
            if not isinstance(scratch, LayerScratch):
                raise TypeError(f"scratch: expected a LayerScratch (another layer's .scratch), got "
                                f"{type(scratch).__name__}")
            scratch.check(scratch_needs(cfg, rank, world_size, device, self.backend))
        # Already on the device, these are the caller's objects, so the tiling below relabels what it re-tiles.
        experts = weights.experts.to(device)
        shared = weights.shared.to(device) if weights.shared is not None else None
        if self.backend == "cuda":  # both stacks, as the kernels will read them, checked before either is tiled
            for (name, *_), w in zip(stacks, (experts, shared)):
                check_tileable(w, name)
            if token_sources(cfg, world_size) == 1:  # dp ranks run it on their own tokens, from row 0
                _check_shared_rows_aligned(m, spec, world_size)
        if token_sources(cfg, world_size) > 1 and spec.act_mode == "nvfp4":
            # Gathered tokens are dequantized with this rank's global scale: every rank's must be the same one
            # (from_checkpoint agrees on the max; weights made otherwise may not).
            check_same_on_every_rank({"weights.experts.l1_input_scale (token_mode 'dp')":
                                      float(weights.experts.l1_input_scale)})
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.expert_begin = rank * n_local
        self.router = Router(m, weights.router_weight, weights.router_bias, weights.tid2eid, device)
        self.experts, self.shared = experts, shared
        self.spec = spec
        if scratch is None:
            scratch = LayerScratch.allocate(cfg, rank, world_size, device, self.backend)
        self.scratch = scratch
        self._handle = register(self)  # names this layer to torch.compile's graphs (layer_op)
        self._stage = self._shared_stage = self._shared_slice_stage = None
        # runtime.expert_load: int64 per routed expert (all of the model's), the (token, k) assignments of this rank's
        # tokens since it was last zeroed, added to by every forward: in replicated mode every rank's tokens are all
        # the tokens, so every rank holds the layer's counts; in dp mode its own tokens' (not the rows forward pads;
        # rows a caller pads count as tokens).
        self.expert_load, self._one = None, None
        if rt.expert_load:  # counted into by forwards outside inference mode too, as the scratch is written
            with torch.inference_mode(False):
                self.expert_load = torch.zeros(m.n_routed_experts, dtype=torch.int64, device=device)
            self._one = torch.ones(1, dtype=torch.int64, device=device)  # expanded as index_add_'s source
        # Called with a stage's name after each stage of forward (STAGES, in order): benchmarks record events there.
        self.stage_marker: Callable[[str], None] = _no_marker
        # The layer input's static global scale, once rather than in every forward.
        self._l1_gs = None if rt.act_scale == "dynamic" else 1.0 / self.experts.l1_input_scale
        self._split_tokens, inter = shared_split(cfg, world_size, self.backend)
        if self.backend == "cuda":
            from .cuda_experts import CudaExpertStage

            # This rank's slice of the shared expert's intermediate dim, for forwards of a few tokens (new tensors,
            # made before anything is tiled).
            shared_slice = None
            if self._split_tokens:  # a shared expert on the CUDA backend
                shared_slice = self.shared.intermediate_slice(rank * inter, (rank + 1) * inter)
            # Last, once nothing else can fail: the module owns its weights, re-tiled in place.
            tile_(self.experts)
            self._stage = CudaExpertStage(self.experts, self.expert_begin, self.spec, scratch.routed,
                                          m.n_routed_experts)
            if self.shared is not None:
                tile_(self.shared)
                self._shared_stage = CudaExpertStage(self.shared, 0, self.spec, scratch.shared)
            if shared_slice is not None:
                tile_(shared_slice)
                self._shared_slice_stage = CudaExpertStage(shared_slice, 0, self.spec, scratch.shared_slice)

    def _apply(self, fn, recurse: bool = True) -> "EPMoE":
        """Module.to / half / cuda: the layer's numerics are fixed at load (NVFP4 experts, an fp32 router), so a dtype
        conversion leaves it as it is; its weights, workspaces and symmetric buffer cannot move, so a device change is
        refused (build the layer on the device it runs on)."""
        device = fn(torch.empty(0, device=self.device)).device
        if device != self.device:
            raise ValueError(f"device: an EPMoE layer stays on the device it was built on ({self.device}); got a "
                             f"conversion to {device}")
        return self

    def __setstate__(self, state: dict) -> None:
        """A copy (copy.copy, copy.deepcopy) is another layer: it gets its own handle for torch.compile's graphs, and
        its own expert load count (from the original's counts); it shares the original's scratch."""
        super().__setstate__(state)
        self._handle = register(self)
        if self.expert_load is not None:
            with torch.inference_mode(False):  # counted into outside inference mode too, whatever mode copies it
                self.expert_load = self.expert_load.clone()

    def extra_repr(self) -> str:
        """What print(model) shows of the layer: its share of the experts and how it runs them."""
        m, rt = self.cfg.model, self.cfg.runtime
        n = self.experts.num_experts
        act = "bf16" if rt.act_mode == "bf16" else f"nvfp4 ({rt.act_scale} scales)"
        return (f"experts=[{self.expert_begin}, {self.expert_begin + n}) of {m.n_routed_experts} (rank {self.rank} of "
                f"{self.world_size}), shared_expert={self.shared is not None}, hidden={m.hidden_size}, "
                f"intermediate={m.moe_intermediate_size}, backend={self.backend}, activations={act}, "
                f"token_mode={rt.token_mode}, device={self.device}")

    @property
    def buffer(self) -> SymmBuffer:
        """The symmetric buffer of this layer's scratch."""
        return self.scratch.buffer

    @classmethod
    def from_checkpoint(cls, path: str | Path, cfg: Config, layer: int = 0, rank: int = 0, world_size: int = 1,
                        scratch: LayerScratch | None = None, device: torch.device | str = "cpu",
                        naming: Naming = Naming(), progress: bool = False) -> "EPMoE":
        """Load this rank's share of one MoE layer. Ranks agree on the layer's static input scale (the max over all
        experts' gate/up input scales) in one all-reduce (dist_utils.share_rows), so the staged x is rank-independent,
        and fail together if any rank's load failed."""
        _check_placement(cfg.model, rank, world_size)  # the process group, which the agreement below needs
        weights, failure, found = None, None, None
        try:
            found = resolve_device(device)  # before the read: a bad device found after it wastes the whole read
            weights = load_layer(CheckpointReader(path, naming), cfg.model, layer, rank, world_size, progress)
        except Exception as e:  # its peers must not wait for it in the agreement below
            if world_size == 1:
                raise
            failure = e
        if world_size > 1:
            # The ranks agree on the layer's static input scale (the largest) and fail together if any rank's load
            # failed, naming it.
            mine = 0.0 if failure is not None else float(weights.experts.l1_input_scale)
            rows, failed = share_rows([mine], failure, "all-reduce of the layer's input scales and load outcomes",
                                      found if found is not None else fallback_device())
            if failed:
                raise RuntimeError(f"rank {rank}: layer {layer} of {path} failed to load on rank(s) {failed} (their "
                                   f"errors say why); this rank's load is dropped")
            scale = torch.tensor(max(r[0] for r in rows), dtype=torch.float32)
            weights.experts.l1_input_scale.copy_(scale)
            if weights.shared is not None:
                weights.shared.l1_input_scale.copy_(scale)
        return cls(cfg, weights, rank, world_size, scratch, found)

    @classmethod
    def from_synthetic(cls, cfg: Config, layer: int = 0, rank: int = 0, world_size: int = 1,
                       scratch: LayerScratch | None = None, device: torch.device | str = "cpu") -> "EPMoE":
        """A model-sized layer of random weights generated on the device (see checkpoint.synthetic_layer)."""
        _check_placement(cfg.model, rank, world_size)
        device = resolve_device(device)
        weights = synthetic_layer(cfg.model, layer, rank, world_size, cfg.runtime.seed, device)
        return cls(cfg, weights, rank, world_size, scratch, device)

    @classmethod
    def from_dense(cls, cfg: Config, router_weight: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor, l1_input_scale: float, l2_input_scale: torch.Tensor,
                   router_bias: torch.Tensor | None = None, tid2eid: torch.Tensor | None = None,
                   shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
                   rank: int = 0, world_size: int = 1, scratch: LayerScratch | None = None,
                   device: torch.device | str = "cpu") -> "EPMoE":
        """Build from dense BF16/fp32 weights of ALL experts: gate/up (E, I, H), down (E, H, I); only this rank's
        experts are quantized (ModelOpt writer rules). shared = (gate, up, down, l2_input_scale) of the shared
        expert, dense (I_s, H), (I_s, H), (H, I_s)."""
        m = cfg.model
        e, h, i = m.n_routed_experts, m.hidden_size, m.moe_intermediate_size
        n_local = _check_placement(m, rank, world_size)
        for name, t, shape in (("gate", gate, (e, i, h)), ("up", up, (e, i, h)), ("down", down, (e, h, i)),
                               ("l2_input_scale", l2_input_scale, (e,))):
            check_dense(name, t, shape, per_expert=True)
        # Every rank checks every expert's scales (ExpertWeights.from_dense only sees its slice): a bad one fails all
        # ranks alike instead of one, whose peers would then wait for it.
        positive_scale(l1_input_scale, "l1_input_scale")
        check_positive_scale(l2_input_scale, "l2_input_scale", divisor=True)
        _check_shared_present(m, shared is not None, "shared")
        if shared is not None:
            sg, su, sd, s_l2 = shared
            i_s = m.shared_intermediate_size
            for name, t, shape in (("shared gate", sg, (i_s, h)), ("shared up", su, (i_s, h)),
                                   ("shared down", sd, (h, i_s))):
                check_dense(name, t, shape)
            positive_scale(s_l2, "shared l2_input_scale")
        local = slice(rank * n_local, (rank + 1) * n_local)
        experts = ExpertWeights.from_dense(gate[local], up[local], down[local], l1_input_scale,
                                           l2_input_scale[local])
        shared_w = None
        if shared is not None:
            shared_w = ExpertWeights.from_dense(sg[None], su[None], sd[None], l1_input_scale,
                                                torch.tensor([float(s_l2)]))
        return cls(cfg, LayerWeights(router_weight, router_bias, tid2eid, experts, shared_w), rank, world_size,
                   scratch, device)

    def _validate(self, hidden: torch.Tensor, input_ids: torch.Tensor | None, check: bool) -> None:
        h = self.cfg.model.hidden_size
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            raise TypeError(f"hidden: expected a floating-point tensor, got "
                            f"{getattr(hidden, 'dtype', type(hidden).__name__)}")
        if hidden.dim() != 2 or hidden.shape[1] != h:
            raise ValueError(f"hidden: expected shape (T, {h}), got {tuple(hidden.shape)}")
        if hidden.device != self.device:
            raise ValueError(f"hidden: expected device {self.device}, got {hidden.device}")
        if input_ids is not None and not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: expected None or a torch.Tensor, got {type(input_ids).__name__}")
        _check_forward_only(hidden)
        self.buffer.check_tokens(hidden.shape[0])
        if check:
            refuse_host_checks_while_capturing(hidden)
        if input_ids is not None and input_ids.device != self.device:
            raise ValueError(f"input_ids: expected device {self.device}, got {input_ids.device}")

    def _agree_on_inputs(self, hidden: torch.Tensor, input_ids: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Several ranks with checks on. A rank whose input fails a check would leave the others waiting for it in the
        next collective, and token counts that differ would make the gather or all-reduce read stale rows (gloo
        aborts). Every rank runs all the checks of its forward (its own, staging's and the router's, which sync the
        host), the ranks share the outcomes and counts (dist_utils.share_rows), and all of them raise if any input
        failed, naming the ranks; the forward then runs unchecked. In dp mode the inputs come back padded with rows of
        zeros (token id 0) to the largest count, as the gather needs the same count everywhere (their outputs are
        dropped); in replicated mode, whose ranks hold the same tokens, differing counts are an error (equal counts of
        different tokens go unnoticed). Returns the inputs and this rank's own token count."""
        refuse_host_checks_while_capturing(hidden)  # on every rank alike, before any collective
        dp = self.buffer.sources > 1
        mode = self.cfg.runtime.token_mode
        problem, count = None, 0
        try:
            self._validate(hidden, input_ids, True)
            check_finite(hidden, "hidden")
            self.router.check_token_ids(hidden, input_ids)
            count = hidden.shape[0]
        except Exception as e:  # whatever a rank's input raises, the others must not wait for it
            problem = e
        rows, failed = share_rows([count], problem, f"all-reduce of the ranks' input checks (token_mode '{mode}')",
                                  self.device, self.buffer.backend.group)
        if failed:
            raise ValueError(f"hidden: the ranks run their forwards together (token_mode '{mode}'), and the input of "
                             f"rank(s) {failed} failed its checks (their errors say why)")
        counts = [int(r[0]) for r in rows]
        if not dp:
            if len(set(counts)) > 1:
                raise ValueError(f"hidden: every rank runs the same tokens (token_mode 'replicated'), but the ranks "
                                 f"hold {counts} tokens (in rank order)")
            return hidden, input_ids, count
        pad = max(counts) - count
        if not pad:
            return hidden, input_ids, count
        hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])])
        return hidden, None if input_ids is None else torch.cat([input_ids, input_ids.new_zeros(pad)]), count

    def stage_activations(self, hidden: torch.Tensor, check: bool = True) -> NVFP4Tensor | torch.Tensor:
        """Staging: quantize the layer input into the symmetric buffer (static or dynamic global scale)."""
        if self.spec.act_mode == "bf16":
            return self.buffer.stage(hidden.to(torch.bfloat16), check=check)
        return self.buffer.stage(hidden, self._l1_gs, check=check)

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        """check=False skips the checks that sync with the host (non-finite input, token-id range), as CUDA-graph
        capture requires; shapes, dtypes and capacity are always checked. Under torch.compile the layer is one opaque
        op (layer_op) that runs this forward. In token_mode 'dp' the ranks may hold different numbers of tokens with
        check=True (the forward pads to the largest); check=False needs the same number on every rank.

        While a profiler records (torch.profiler; Nsight Systems through torch.autograd.profiler.emit_nvtx), the
        forward is a range named ep_moe.forward around a range ep_moe.<stage> for each of STAGES."""
        if torch.compiler.is_compiling():
            _check_forward_only(hidden)  # the compiled graph runs the op without grad: checked here or never
            return moe_layer_op(hidden, input_ids, self._handle, check)
        if not torch.autograd._profiler_enabled():  # 40 ns
            return self._forward(hidden, input_ids, check, self.stage_marker)
        with record_function("ep_moe.forward"):
            ranges = _StageRanges(self.stage_marker)
            try:
                return self._forward(hidden, input_ids, check, ranges.mark)
            finally:
                ranges.close()

    def _forward(self, hidden: torch.Tensor, input_ids: torch.Tensor | None, check: bool,
                 mark: Callable[[str], None]) -> torch.Tensor:
        if check and self.world_size > 1:
            hidden, input_ids, own = self._agree_on_inputs(hidden, input_ids)  # dp: as many rows as the largest rank's
            check = False  # its checks ran on every rank's input, and every rank's passed
        else:
            self._validate(hidden, input_ids, check)
            own = hidden.shape[0]
        # Any layout in, the same bits out: the staging kernel reads rows, and the router's GEMM sums in an order that
        # follows the layout (no copy for a contiguous input).
        hidden = hidden.contiguous()
        t = hidden.shape[0]
        mark("checks")
        acts = self.stage_activations(hidden, check)
        mark("staging")
        shared = self._start_shared_expert(acts, t)  # runs beside routing and the routed experts
        mark("shared_expert")
        topk_idx, topk_weights = self.router(hidden, input_ids, check, out=self.buffer.routing(t))
        if self.expert_load is not None:  # integer sums: the same whatever order the atomics land in
            ids = topk_idx[:own].reshape(-1)
            self.expert_load.index_add_(0, ids, self._one.expand(ids.numel()))
        mark("routing")
        if self.buffer.sources > 1:  # prepare (dp): every rank's staged tokens and routing, in rank order
            acts, topk_idx, topk_weights = self.buffer.gather(t)
        n = t * self.buffer.sources  # the tokens the experts see
        mark("prepare")
        # The partial output goes to the buffer for the all-reduce or reduce-scatter; one rank has nothing to reduce,
        # so its combine writes the output itself: no copy out of the buffer (1.2 us of a 120 us decode layer graph
        # on one H200).
        reduce = self.world_size > 1
        y = self.buffer.y[:n] if reduce else self.output_like(hidden)
        if self._stage is not None:  # the combine adds the shared expert's rows
            self._stage.run(acts, topk_idx, topk_weights, y, addend=shared)  # its own buffers' views: no checks
        else:
            routed = expert_stage(acts, topk_idx, topk_weights, self.experts, self.expert_begin, self.spec)
            if shared is not None:
                shared.add_to(routed)
            y.copy_(routed)
        mark("experts")
        if self.buffer.sources > 1:  # dp: this rank's rows of every rank's partial sums
            y = self.buffer.backend.reduce_scatter(y, self.output_like(hidden))
        elif reduce:
            self.buffer.backend.all_reduce_(y)
            y = y.clone()  # never hand out a view of the communication buffer
        mark("finalize")
        return y if t == own else y[:own]

    def output_like(self, hidden: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor of the shape, dtype and device of forward(hidden)'s output."""
        return hidden.new_empty((hidden.shape[0], self.cfg.model.hidden_size), dtype=self.buffer.y.dtype)

    def _start_shared_expert(self, acts: NVFP4Tensor | torch.Tensor, t: int) -> Addend | None:
        """This rank's part of the shared expert's output, as the routed sum's addend, or None: its slice [lo, hi) of
        the tokens, or with few tokens on the CUDA backend (scratch.shared_split) every token through its slice of the
        intermediate dim, whose partial sums the all-reduce adds. On the CUDA backend it runs dense (no align, no
        combine) on its own stream from right after staging, beside routing and the routed experts, which it does not
        need (in decode they leave most SMs idle); the routed combine waits for it. (Staging on that stream too, beside
        the router GEMM, made 2-GPU graphs 1-2 % slower at 16 and 128 tokens.)"""
        if self.shared is None:
            return None
        split = t <= self._split_tokens  # 0 where this layer has no slice (scratch.shared_split)
        lo, hi = (0, t) if split else self._shared_token_slice(t)
        if hi <= lo:
            return None
        rows = _rows(acts, lo, hi)
        at = lo + (self.rank * t if self.buffer.sources > 1 else 0)  # dp: its tokens follow the lower ranks' in y
        if self._shared_stage is None:  # the reference routes every token to it once, with weight 1
            n = hi - lo
            ids = torch.zeros(n, 1, dtype=torch.int32, device=self.device)
            return Addend(at, expert_stage(rows, ids, torch.ones(n, 1, device=self.device), self.shared, 0, self.spec))
        stream, done = self.scratch.stream, self.scratch.shared_done
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            values = (self._shared_slice_stage if split else self._shared_stage).run_dense(rows)
            done.record()
        return Addend(at, values, done)

    def _shared_token_slice(self, t: int) -> tuple[int, int]:
        """The tokens whose shared-expert output this rank adds before the all-reduce or reduce-scatter, which then
        adds each token's exactly once: in dp mode all of this rank's own, else see _shared_tokens_split."""
        if self.buffer.sources > 1:
            return 0, t
        if not _shared_tokens_split(self.spec):
            return (0, t) if self.rank == 0 else (0, 0)
        return self.rank * t // self.world_size, (self.rank + 1) * t // self.world_size

    def capture(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None) -> "CapturedLayer":
        """Capture forward on these (static) inputs into a CUDA graph; copy new inputs into
        `captured.hidden` / `captured.input_ids` and call `captured.replay()`. Every rank must capture and
        replay the same number of times (the graph holds the all-reduce)."""
        return CapturedLayer(self, hidden, input_ids)


def _check_forward_only(hidden: torch.Tensor) -> None:
    """The layer has no backward. The reference path would backpropagate through the routing weights alone, past the
    quantized experts, and a compiled graph through nothing: gradients that look right and are not."""
    if hidden.requires_grad and torch.is_grad_enabled():
        raise ValueError("hidden: expected a tensor that does not require grad (EPMoE runs forward only: its NVFP4 "
                         "expert kernels have no backward; call it under torch.no_grad() or torch.inference_mode(), or "
                         "pass hidden.detach()), got one that requires grad")


def _check_placement(m: ModelConfig, rank: int, world_size: int) -> int:
    """This rank's number of local experts. Ranks all-reduce over the default process group, so with more
    than one rank it must exist and agree with rank and world_size."""
    n_local = local_expert_count(m.n_routed_experts, rank, world_size)
    if world_size > 1:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"world_size: {world_size} ranks need an initialized default process group "
                             f"(torch.distributed.init_process_group), found none")
        if dist.get_world_size() != world_size:
            raise ValueError(f"world_size: expected the default process group's size {dist.get_world_size()}, "
                             f"got {world_size}")
        if dist.get_rank() != rank:
            raise ValueError(f"rank: expected this process's rank in the default process group, "
                             f"{dist.get_rank()}, got {rank}")
    return n_local


def _check_shared_present(m: ModelConfig, present: bool, name: str) -> None:
    """The config decides whether the layer has a shared expert: weights without it would silently drop it."""
    if present != (m.n_shared_experts > 0):
        want = f"the shared expert (model.n_shared_experts={m.n_shared_experts})" if m.n_shared_experts else \
            "none (model.n_shared_experts=0)"
        raise ValueError(f"{name}: expected {want}, got {'one' if present else 'none'}")


def _shared_tokens_split(spec: ExpertSpec) -> bool:
    """Whether the ranks split the shared expert's tokens (1/W of the compute each), which they do when every row
    quantizes on its own; a dynamic h scale is an amax over all the expert's tokens, so rank 0 then takes them all."""
    return not spec.dynamic_h_scale


def _check_shared_rows_aligned(m: ModelConfig, spec: ExpertSpec, world_size: int) -> None:
    """forward hands the CUDA shared-expert stage, unchecked, rank r's rows of the staged activations from row
    r*T/W on: with NVFP4 activations their block scales, hidden/16 bytes a row, must start 16-byte aligned for any
    T (bf16 rows always do)."""
    split = m.n_shared_experts > 0 and world_size > 1 and _shared_tokens_split(spec)
    if split and spec.act_mode == "nvfp4" and m.hidden_size % 256:
        raise ValueError(f"model.hidden_size: with {world_size} ranks each runs the shared expert on a slice of the "
                         f"tokens, whose NVFP4 scale rows (hidden/16 bytes each) must start 16-byte aligned: expected "
                         f"a multiple of 256 on the CUDA backend, got {m.hidden_size}")


def _rows(acts: NVFP4Tensor | torch.Tensor, lo: int, hi: int) -> NVFP4Tensor | torch.Tensor:
    if isinstance(acts, NVFP4Tensor):
        return NVFP4Tensor(acts.data[lo:hi], acts.scale[lo:hi], acts.global_scale)
    return acts[lo:hi]


class CapturedLayer:
    def __init__(self, moe: EPMoE, hidden: torch.Tensor, input_ids: torch.Tensor | None):
        if moe.device.type != "cuda":
            raise ValueError(f"capture: needs a CUDA device, got {moe.device}")
        if moe.backend != "cuda":
            raise ValueError("capture: the reference expert stage syncs with the host; use backend 'cuda'")
        self.moe = moe
        self.hidden, self.input_ids = hidden.clone(), None if input_ids is None else input_ids.clone()
        self.out: torch.Tensor | None = None

        def step() -> None:
            self.out = moe(self.hidden, self.input_ids, check=False)

        load = None if moe.expert_load is None else moe.expert_load.clone()
        try:
            with torch.cuda.device(moe.device):  # the capture's streams are the current device's (replays set it)
                self.graph = cuda_graphs.capture(step)
        finally:
            if load is not None:  # the capture's warm-up forwards ran no tokens of the caller's
                moe.expert_load.copy_(load)

    def replay(self) -> torch.Tensor:
        """Replays the captured forward (asynchronously, as graph replays are). A replay's P2P collective that timed
        out waiting for a peer cannot raise from the GPU, and its output is invalid: the first replay called after it
        completed (after a sync, or after the timeout has passed) raises a CommTimeoutError naming the peer (a
        CommMismatchError where the ranks' calls differed: another token count); every rank must then call its P2P
        buffer backend's reset_signals(). While a profiler records, the call is a range named ep_moe.replay."""
        self.moe.buffer.backend.raise_if_failed()
        with record_function("ep_moe.replay") if torch.autograd._profiler_enabled() else contextlib.nullcontext():
            self.graph.replay()
        return self.out
