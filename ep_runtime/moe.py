"""EPMoE: one expert-parallel MoE layer as an nn.Module.

forward: staging -> routing -> experts (L1, SwiGLU, requant, L2, combine) + this rank's share of the shared
expert -> all-reduce.
Replicated-token mode: every rank sees all T tokens, computes its local experts [rank*E/W, (rank+1)*E/W)
and the partial outputs are summed by the buffer's all-reduce.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from . import cuda_graphs
from .checkpoint import CheckpointReader, LayerWeights, Naming, load_layer, synthetic_layer
from .config import Config
from .experts import ExpertSpec, expert_stage
from .nvfp4 import NVFP4Tensor
from .routing import Router
from .sm90_layout import tile_
from .symm import CpuBackend, SymmBuffer, make_backend, region_bytes
from .weights import ExpertWeights


def cuda_backend_available(device: torch.device) -> bool:
    """The CUDA expert stage runs on sm_90 devices when the extension was built."""
    from .ops import extension_available

    return device.type == "cuda" and extension_available("grouped_l1", "moe_align")


class EPMoE(nn.Module):
    """One MoE layer of an expert-parallel model. It takes ownership of `weights`: on the CUDA backend their
    expert tensors are re-tiled in place for the SM90 kernels."""

    def __init__(self, cfg: Config, weights: LayerWeights, rank: int = 0, world_size: int = 1,
                 buffer: SymmBuffer | None = None, device: torch.device | str = "cpu"):
        super().__init__()
        m, rt = cfg.model, cfg.runtime
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" means the current device; name it
            device = torch.device("cuda", torch.cuda.current_device())
        if m.n_routed_experts % world_size:
            raise ValueError(f"world_size: must divide n_routed_experts={m.n_routed_experts}, got {world_size}")
        n_local = m.n_routed_experts // world_size
        if weights.experts.num_experts != n_local:
            raise ValueError(f"weights: expected {n_local} local experts for world_size={world_size}, "
                             f"got {weights.experts.num_experts}")
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.expert_begin = rank * n_local
        self.router = Router(m, weights.router_weight, weights.router_bias, weights.tid2eid).to(device)
        self.experts = weights.experts.to(device)
        self.shared = weights.shared.to(device) if weights.shared is not None else None
        self.spec = ExpertSpec(act_mode=rt.act_mode, l2_scale_mode=rt.act_scale, swiglu_limit=m.swiglu_limit)
        if rt.backend == "auto":
            self.backend = "cuda" if cuda_backend_available(device) else "reference"
        else:
            if rt.backend == "cuda" and not cuda_backend_available(device):
                raise RuntimeError(f"backend: 'cuda' needs an sm_90 CUDA device and the built extension "
                                   f"(device {device})")
            self.backend = rt.backend
        if self.backend == "cuda":  # the module owns its weights: re-tiled in place, once
            tile_(self.experts)
            if self.shared is not None:
                tile_(self.shared)
        if buffer is None:
            shape = (rt.max_tokens, m.hidden_size, m.num_experts_per_tok, rt.torch_dtype, rt.act_mode)
            # One rank owns every expert: nothing to exchange, whatever process group may exist.
            backend = CpuBackend(device=device, local=True) if world_size == 1 else \
                make_backend(rt.symm_backend, device, region_bytes(SymmBuffer.layout(*shape)))
            buffer = SymmBuffer(backend, *shape)
        self.buffer = buffer
        self._workspace = self._shared_workspace = self._shared_y = self._shared_stream = None
        if self.backend == "cuda":
            from .cuda_experts import ExpertWorkspace

            n = rt.max_tokens
            self._workspace = ExpertWorkspace.allocate(n, m.num_experts_per_tok, n_local, m.hidden_size,
                                                       m.moe_intermediate_size, device, self.spec)
            if self.shared is not None:
                self._shared_workspace = ExpertWorkspace.allocate(n, 1, 1, m.hidden_size,
                                                                  self.shared.intermediate_size, device, self.spec)
                self._shared_y = torch.empty(n, m.hidden_size, dtype=torch.float32, device=device)
                self._shared_stream = torch.cuda.Stream(device)
        # Called with a stage name after each stage of forward; benchmarks record CUDA events there.
        self.stage_marker: Callable[[str], None] = lambda name: None
        # Every token visits the shared expert once with weight 1: its routing is constant.
        self._shared_idx = torch.zeros(rt.max_tokens, 1, dtype=torch.int32, device=device)
        self._shared_w = torch.ones(rt.max_tokens, 1, dtype=torch.float32, device=device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, cfg: Config, layer: int = 0, rank: int = 0, world_size: int = 1,
                        buffer: SymmBuffer | None = None, device: torch.device | str = "cpu",
                        naming: Naming = Naming(), progress: bool = False) -> "EPMoE":
        """Load this rank's share of one MoE layer. Ranks agree on the layer's static input scale (the max
        over all experts' gate/up input scales) with one MAX all-reduce, so the staged x is rank-independent."""
        weights = load_layer(CheckpointReader(path, naming), cfg.model, layer, rank, world_size, progress)
        if world_size > 1:
            scale = weights.experts.l1_input_scale.to(device)
            dist.all_reduce(scale, op=dist.ReduceOp.MAX)
            weights.experts.l1_input_scale.copy_(scale)
            if weights.shared is not None:
                weights.shared.l1_input_scale.copy_(scale)
        return cls(cfg, weights, rank, world_size, buffer, device)

    @classmethod
    def from_synthetic(cls, cfg: Config, layer: int = 0, rank: int = 0, world_size: int = 1,
                       buffer: SymmBuffer | None = None, device: torch.device | str = "cpu") -> "EPMoE":
        """A model-sized layer of random weights generated on the device (see checkpoint.synthetic_layer)."""
        weights = synthetic_layer(cfg.model, layer, rank, world_size, cfg.runtime.seed, device)
        return cls(cfg, weights, rank, world_size, buffer, device)

    @classmethod
    def from_dense(cls, cfg: Config, router_weight: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor, l1_input_scale: float, l2_input_scale: torch.Tensor,
                   router_bias: torch.Tensor | None = None, tid2eid: torch.Tensor | None = None,
                   shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
                   rank: int = 0, world_size: int = 1, buffer: SymmBuffer | None = None,
                   device: torch.device | str = "cpu") -> "EPMoE":
        """Build from dense BF16/fp32 weights of ALL experts: gate/up (E, I, H), down (E, H, I); only this rank's
        experts are quantized (ModelOpt writer rules). shared = (gate, up, down, l2_input_scale) of the shared
        expert, dense (I_s, H), (I_s, H), (H, I_s)."""
        e_total = cfg.model.n_routed_experts
        for name, t in (("gate", gate), ("up", up), ("down", down)):
            if t.shape[0] != e_total:
                raise ValueError(f"{name}: expected {e_total} experts in dim 0, got shape {tuple(t.shape)}")
        n_local = e_total // world_size
        local = slice(rank * n_local, (rank + 1) * n_local)
        experts = ExpertWeights.from_dense(gate[local], up[local], down[local], l1_input_scale,
                                           l2_input_scale[local])
        shared_w = None
        if shared is not None:
            sg, su, sd, s_l2 = shared
            shared_w = ExpertWeights.from_dense(sg[None], su[None], sd[None], l1_input_scale,
                                                torch.tensor([float(s_l2)]))
        return cls(cfg, LayerWeights(router_weight, router_bias, tid2eid, experts, shared_w), rank, world_size,
                   buffer, device)

    def _validate(self, hidden: torch.Tensor, input_ids: torch.Tensor | None) -> None:
        h = self.cfg.model.hidden_size
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            raise TypeError(f"hidden: expected a floating-point tensor, got "
                            f"{getattr(hidden, 'dtype', type(hidden).__name__)}")
        if hidden.dim() != 2 or hidden.shape[1] != h:
            raise ValueError(f"hidden: expected shape (T, {h}), got {tuple(hidden.shape)}")
        if hidden.device != self.device:
            raise ValueError(f"hidden: expected device {self.device}, got {hidden.device}")
        self.buffer.check_tokens(hidden.shape[0])
        if input_ids is not None and input_ids.device != self.device:
            raise ValueError(f"input_ids: expected device {self.device}, got {input_ids.device}")

    def stage_activations(self, hidden: torch.Tensor, check: bool = True):
        """Staging: quantize the layer input into the symmetric buffer (static or dynamic global scale)."""
        gs = None if self.cfg.runtime.act_scale == "dynamic" else 1.0 / self.experts.l1_input_scale
        if self.spec.act_mode == "bf16":
            return self.buffer.stage(hidden.to(torch.bfloat16), check=check)
        return self.buffer.stage(hidden, gs, check=check)

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        """check=False skips the checks that sync with the host (non-finite input, token-id range), as CUDA-graph
        capture requires; shapes, dtypes and capacity are always checked."""
        mark = self.stage_marker
        self._validate(hidden, input_ids)
        t = hidden.shape[0]
        acts = self.stage_activations(hidden, check)
        mark("staging")
        shared = self._start_shared_expert(acts, t)
        topk_idx, topk_weights = self.buffer.set_routing(*self.router(hidden, input_ids, check))
        mark("routing")
        y = self.buffer.y[:t]
        if self.backend == "cuda":  # the combine writes straight into the all-reduce buffer
            expert_stage(acts, topk_idx, topk_weights, self.experts, self.expert_begin, self.spec, "cuda",
                         self._workspace, y)
        else:
            y.copy_(expert_stage(acts, topk_idx, topk_weights, self.experts, self.expert_begin, self.spec))
        mark("experts")
        if shared is not None:
            lo, hi, out = shared
            if self._shared_stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(self._shared_stream)
            y[lo:hi] += out
        mark("shared")
        self.buffer.backend.all_reduce_(y)
        mark("all_reduce")
        # A copy: never hand out a view of the communication buffer.
        return y.to(self.cfg.runtime.torch_dtype, copy=True)

    def _start_shared_expert(self, acts: NVFP4Tensor | torch.Tensor,
                             t: int) -> tuple[int, int, torch.Tensor] | None:
        """This rank's slice [lo, hi) of the shared expert and its output, or None. On the CUDA backend it runs
        on its own stream from right after staging, beside routing and the routed experts, which it does not
        need (in decode they leave most SMs idle); forward joins it before adding its output."""
        if self.shared is None:
            return None
        lo, hi = self._shared_token_slice(t)
        if hi <= lo:
            return None
        args = (_rows(acts, lo, hi), self._shared_idx[: hi - lo], self._shared_w[: hi - lo], self.shared, 0,
                self.spec, self.backend, self._shared_workspace)
        if self._shared_stream is None:
            return lo, hi, expert_stage(*args)
        self._shared_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._shared_stream):
            return lo, hi, expert_stage(*args, self._shared_y[: hi - lo])

    def _shared_token_slice(self, t: int) -> tuple[int, int]:
        """The tokens whose shared-expert output this rank adds before the all-reduce, which then adds each
        token's exactly once. Tokens are split over ranks (1/W of the compute each) when every row quantizes on
        its own; a dynamic h scale is an amax over all the expert's tokens, so rank 0 then takes them all."""
        if self.spec.act_mode == "nvfp4" and self.spec.l2_scale_mode == "dynamic":
            return (0, t) if self.rank == 0 else (0, 0)
        return self.rank * t // self.world_size, (self.rank + 1) * t // self.world_size

    def capture(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None) -> "CapturedLayer":
        """Capture forward on these (static) inputs into a CUDA graph; copy new inputs into
        `captured.hidden` / `captured.input_ids` and call `captured.replay()`. Every rank must capture and
        replay the same number of times (the graph holds the all-reduce)."""
        return CapturedLayer(self, hidden, input_ids)


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
        self.hidden, self.input_ids = hidden.clone(), None if input_ids is None else input_ids.clone()
        self.out: torch.Tensor | None = None

        def step() -> None:
            self.out = moe(self.hidden, self.input_ids, check=False)

        self.graph = cuda_graphs.capture(step)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out
