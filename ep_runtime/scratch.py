"""LayerScratch: the memory an MoE layer's forward writes besides its output, shared by the layers of a model.

A forward writes the symmetric buffer (staged activations, routing, the all-reduce) and, on the CUDA backend, the
workspaces of its routed and shared expert stages (slot metadata, h, the per-slot outputs), and runs the shared
expert on a stream of its own. Nothing in them outlives the forward: the output is a copy, and the next layer's
forward, which runs after it on the stream, overwrites them before it reads them. So the MoE layers of a model on one
rank share one scratch (pass the first layer's `scratch` to the others), whose size is one layer's, not one per layer:
at max_tokens=8192 a DeepSeek-V4-Pro layer's is 2.49 GB on every rank (W4A4, static scales; 3.19 GB with dynamic h
scales), more than the layer's 1.8 GB of weights per rank on 8 ranks. Layers that share one must run one after another
on one stream (as a model's forward runs them), never at once on two streams. In token_mode 'dp' max_tokens counts a
rank's own tokens, and the buffer's gathered regions and the routed experts' workspace hold world_size times as many.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .config import Config
from .experts import ExpertSpec
from .symm import CpuBackend, SymmBuffer, make_backend, region_bytes

if TYPE_CHECKING:  # the CUDA stage's module, imported where a scratch gets workspaces
    from .cuda_experts import ExpertWorkspace

log = logging.getLogger("ep_runtime")


def token_sources(cfg: Config, world_size: int) -> int:
    """How many ranks' tokens a forward's routed experts see: every rank's in token_mode 'dp', else this rank's."""
    return world_size if cfg.runtime.token_mode == "dp" else 1


def shared_split(cfg: Config, world_size: int, backend: str) -> tuple[int, int]:
    """(tokens, intermediate size) of the shared expert's slice that each rank runs over every token of a forward
    of at most `tokens` tokens (runtime.shared_split_tokens), or (0, 0) where the ranks only split its tokens. The
    slices need the CUDA backend with several ranks, no dynamic h scale (an amax over the whole intermediate dim) and
    a width the kernels tile (a multiple of 64 columns); in token_mode 'dp' each rank runs the whole expert on its own
    tokens instead."""
    m, rt = cfg.model, cfg.runtime
    inter = m.shared_intermediate_size
    tokens = min(rt.shared_split_tokens, rt.max_tokens)
    if backend != "cuda" or world_size == 1 or token_sources(cfg, world_size) > 1 or not tokens or not inter or \
            ExpertSpec.of(cfg).dynamic_h_scale or inter % (64 * world_size):
        return 0, 0
    return tokens, inter // world_size


def scratch_needs(cfg: Config, rank: int, world_size: int, device: torch.device, backend: str) -> dict[str, Any]:
    """What a layer's scratch is sized and placed for; layers whose needs are equal can share one."""
    m, rt = cfg.model, cfg.runtime
    return {"backend": backend, "device": device, "rank": rank, "world_size": world_size,
            "max_tokens": rt.max_tokens, "hidden_size": m.hidden_size, "topk": m.num_experts_per_tok,
            "local experts": m.n_routed_experts // world_size, "moe_intermediate_size": m.moe_intermediate_size,
            "shared expert intermediate size": m.shared_intermediate_size,
            "shared expert split (tokens, intermediate)": shared_split(cfg, world_size, backend),
            "act_mode": rt.act_mode, "act_scale": rt.act_scale, "output dtype": rt.torch_dtype,
            "token sources": token_sources(cfg, world_size)}


@dataclass(frozen=True)
class LayerScratch:
    """The symmetric buffer, the expert stages' workspaces and the shared expert's stream (all but the buffer None on
    the reference backend; the shared ones None without a shared expert, shared_slice None without its split), with
    the needs they were made for."""

    needs: dict[str, Any]
    buffer: SymmBuffer
    routed: ExpertWorkspace | None = None
    shared: ExpertWorkspace | None = None
    stream: torch.cuda.Stream | None = None  # the shared expert runs on it, beside routing and the routed experts
    shared_done: torch.cuda.Event | None = None
    shared_slice: ExpertWorkspace | None = None  # the shared expert's intermediate slice (scratch.shared_split)

    def __deepcopy__(self, memo: dict) -> "LayerScratch":
        """A deep copy of a layer (or of a model) shares its scratch, as the layers of a model do: nothing in it
        outlives a forward, and a symmetric buffer has no copy (the peers map this one's arena, not a copy's)."""
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (torch.save of a layer or model) keeps a scratch of one rank's reference path only: a CUDA
        scratch's streams and a symmetric buffer's peers belong to the processes that made them."""
        if self.needs["backend"] == "cuda" or self.needs["world_size"] > 1:
            raise TypeError(f"LayerScratch: a scratch of the {self.needs['backend']} backend on "
                            f"{self.needs['world_size']} rank(s) cannot be pickled (torch.save): its streams and "
                            f"symmetric buffer belong to this process and its peers; save the checkpoint and build the "
                            f"layers with EPMoE.from_checkpoint instead")
        return self.__dict__

    @classmethod
    @torch.inference_mode(False)  # buffers written by every forward, whatever the mode a model is built in
    def allocate(cls, cfg: Config, rank: int, world_size: int, device: torch.device, backend: str) -> "LayerScratch":
        """Allocate a scratch for layers of this config (a collective call with several ranks: the symmetric
        buffer's backend allocates and exchanges its arena)."""
        needs = scratch_needs(cfg, rank, world_size, device, backend)
        m, rt = cfg.model, cfg.runtime
        shape = (rt.max_tokens, m.hidden_size, m.num_experts_per_tok, rt.torch_dtype, rt.act_mode,
                 needs["token sources"])
        # One rank owns every expert: nothing to exchange, whatever process group may exist.
        symm = CpuBackend(device=device, local=True) if world_size == 1 else \
            make_backend(rt.symm_backend, device, region_bytes(SymmBuffer.layout(*shape)))
        buffer = SymmBuffer(symm, *shape)
        scratch = cls(needs, buffer) if backend != "cuda" else cls._with_workspaces(cfg, needs, buffer, device)
        log.info("LayerScratch: %.3f GB for every MoE layer that shares it (backend=%s, max_tokens=%d)",
                 scratch.nbytes() / 1e9, backend, rt.max_tokens)
        return scratch

    @classmethod
    def _with_workspaces(cls, cfg: Config, needs: dict[str, Any], buffer: SymmBuffer,
                         device: torch.device) -> "LayerScratch":
        from .cuda_experts import ExpertWorkspace

        m, rt = cfg.model, cfg.runtime
        spec = ExpertSpec.of(cfg)
        routed = ExpertWorkspace.allocate(rt.max_tokens * needs["token sources"], m.num_experts_per_tok,
                                          needs["local experts"], m.hidden_size, m.moe_intermediate_size, device, spec)
        if not m.n_shared_experts:
            return cls(needs, buffer, routed)
        shared = ExpertWorkspace.allocate(rt.max_tokens, 1, 1, m.hidden_size,
                                          needs["shared expert intermediate size"], device, spec)
        tokens, inter = needs["shared expert split (tokens, intermediate)"]
        shared_slice = ExpertWorkspace.allocate(tokens, 1, 1, m.hidden_size, inter, device, spec) if tokens else None
        return cls(needs, buffer, routed, shared, torch.cuda.Stream(device), torch.cuda.Event(), shared_slice)

    def check(self, needs: dict[str, Any]) -> None:
        """A layer with these needs may use this scratch; else a ValueError naming the first difference."""
        for what, want in needs.items():
            got = self.needs.get(what)
            if got != want:
                raise ValueError(f"scratch: this layer needs {what} {want!r}, the scratch was made for {got!r}")

    def nbytes(self) -> int:
        """Bytes of every tensor it holds (the buffer's arena regions and the workspaces)."""
        tensors = [t for t in vars(self.buffer).values() if isinstance(t, torch.Tensor)]
        for ws in (self.routed, self.shared, self.shared_slice):
            if ws is not None:
                tensors += [t for t in vars(ws).values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)
