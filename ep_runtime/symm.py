"""The per-rank communication buffer (NVFP4_SPEC section 8) and the backends that allocate it.

One process holds one SymmBuffer, sized for the largest batch and shared by every MoE layer it runs. It is
allocated once, so its addresses never change and CUDA graphs can replay them. Backends decide what
"symmetric" means: the CPU backend holds plain tensors and reduces through gloo; GPU backends (PyTorch
symmetric memory, NVSHMEM) allocate memory every peer can address and plug in behind the same interface.
"""
from __future__ import annotations

import importlib
import logging
import math
from typing import Protocol, Sequence

import torch
import torch.distributed as dist

from .dist_utils import check_same_on_every_rank, collective, host_barrier
from .nvfp4 import NVFP4Tensor, check_finite, quantize

log = logging.getLogger("ep_runtime")

ALIGN = 256  # region alignment inside a symmetric arena (TMA and 16-byte vector loads need far less)


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def region_bytes(layout: list[tuple[str, tuple[int, ...], torch.dtype]]) -> int:
    """Bytes of an arena holding these (name, shape, dtype) regions carved in order at ALIGN boundaries."""
    used = 0
    for _, shape, dtype in layout:
        used = align(used) + math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return align(used)


class SymmBackend(Protocol):
    name: str
    group: dist.ProcessGroup | None  # None: the default group
    rank: int
    world_size: int
    device: torch.device

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Allocate a named buffer region (a collective call on every rank, once at start-up)."""

    def barrier(self, timeout_s: float) -> None:
        """Wait for every rank; raise (naming the missing ranks) instead of hanging past timeout_s."""

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum t over ranks in place; every rank gets the same bits."""

    def all_gather(self, outs: Sequence[torch.Tensor], inps: Sequence[torch.Tensor]) -> None:
        """outs[i] (world_size * n, ...) = every rank's inps[i] (n, ...), in rank order (up to four pairs)."""

    def reduce_scatter(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (n, ...) = the sum over ranks of their inp's rows [rank * n, (rank + 1) * n); returns out."""

    def raise_if_failed(self) -> None:
        """A collective that failed since the last call (a P2P kernel, which cannot raise: it records the ranks that
        never came, or whose call differed from this rank's, and ends, in a CUDA graph's replay too), as a
        CommTimeoutError or CommMismatchError (both CommErrors) naming them; nothing where collectives raise as they
        fail."""


# torch 2.13 renamed these (the old names warn there); the GPU machines' torch 2.11 has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class GroupCollectives:
    """all_gather and reduce_scatter through the process group's collectives: gloo on CPU ranks, NCCL on GPUs."""

    group: dist.ProcessGroup | None
    world_size: int

    def all_gather(self, outs: Sequence[torch.Tensor], inps: Sequence[torch.Tensor]) -> None:
        for out, inp in zip(outs, inps, strict=True):
            self._collective("all-gather", _all_gather_single, out, inp)

    def reduce_scatter(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self._collective("sum reduce-scatter", _reduce_scatter_single, out, inp)

    def _collective(self, what: str, op, out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1 or not out.numel():  # (no rank sends anything when the tensors are empty)
            return out.copy_(inp)
        with collective(what, self.group):
            op(out, inp, group=self.group)
        return out


class CpuBackend(GroupCollectives):
    """Plain tensors and process-group collectives: CPU ranks (gloo) or one process; on CUDA devices it sums through
    NCCL (slower than the P2P backends, but not bound to one NVLink domain)."""

    name = "cpu"

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu",
                 local: bool = False):
        self.group = group
        self.device = torch.device(device)
        distributed = not local and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if distributed else 0
        self.world_size = dist.get_world_size(group) if distributed else 1

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A region (collective with several ranks, as the P2P backends' carving: ranks built for other shapes or
        dtypes would meet in collectives of other sizes, which gloo answers by aborting the process)."""
        if self.world_size > 1:
            check_same_on_every_rank({"region": (name, tuple(shape), str(dtype))}, self.group)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def barrier(self, timeout_s: float) -> None:
        if self.world_size > 1:
            host_barrier(timeout_s, self.group)

    def raise_if_failed(self) -> None:
        """gloo's and NCCL's collectives raise as they fail (dist_utils.collective names the rank)."""

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            with collective("sum all-reduce", self.group):
                dist.all_reduce(t, group=self.group)
        return t


class SymmBuffer:
    """x (packed FP4), x_sf (packed UE4M3 words), x_global, topk ids/weights and the all-reduce buffer y.

    `sources` is how many ranks' tokens a forward's expert stage reads: 1 where every rank holds all tokens
    (token_mode 'replicated'); world_size in token_mode 'dp', where each rank stages and routes its own tokens and
    `gather` all-gathers them, in rank order, into the `*_gathered` regions (the same names with world_size x the
    rows), and y holds the partial outputs of every rank's tokens for the reduce-scatter."""

    GATHERED = ("x", "x_sf", "topk_idx", "topk_weights")  # what dp mode all-gathers (x_global is the same everywhere)

    @staticmethod
    def layout(max_tokens: int, hidden: int, topk: int, out_dtype: torch.dtype, act_mode: str = "nvfp4",
               sources: int = 1) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The named regions, in allocation order (backends size their symmetric arena from this)."""
        if hidden % 64:
            raise ValueError(f"hidden: expected a multiple of 64, got {hidden}")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens: expected a positive capacity, got {max_tokens}")
        if sources <= 0:
            raise ValueError(f"sources: expected a positive number of ranks, got {sources}")
        if act_mode == "nvfp4":
            acts = [("x", (max_tokens, hidden // 2), torch.uint8), ("x_sf", (max_tokens, hidden // 64), torch.int32),
                    ("x_global", (1,), torch.float32)]
        else:  # W4A16: activations stay bf16
            acts = [("x", (max_tokens, hidden), torch.bfloat16)]
        local = acts + [("topk_idx", (max_tokens, topk), torch.int32),
                        ("topk_weights", (max_tokens, topk), torch.float32)]
        gathered = [(f"{name}_gathered", (sources * max_tokens, *shape[1:]), dtype)
                    for name, shape, dtype in local if sources > 1 and name in SymmBuffer.GATHERED]
        return local + gathered + [("y", (sources * max_tokens, hidden), out_dtype)]

    def __init__(self, backend: SymmBackend, max_tokens: int, hidden: int, topk: int, out_dtype: torch.dtype,
                 act_mode: str = "nvfp4", sources: int = 1):
        if sources not in (1, backend.world_size):
            raise ValueError(f"sources: expected 1 or the backend's world_size {backend.world_size}, got {sources}")
        self.backend, self.max_tokens, self.hidden, self.topk = backend, max_tokens, hidden, topk
        self.act_mode, self.sources = act_mode, sources
        layout = self.layout(max_tokens, hidden, topk, out_dtype, act_mode, sources)
        for name, shape, dtype in layout:
            setattr(self, name, backend.empty(name, shape, dtype))
        self._gathered = [name.removesuffix("_gathered") for name, _, _ in layout if name.endswith("_gathered")]
        # Staging on the GPU reduces the dynamic amax into this word; allocated once for graph replay.
        self._amax = torch.zeros(1, dtype=torch.int32, device=backend.device)
        log.info("SymmBuffer: backend=%s rank=%d/%d max_tokens=%d hidden=%d topk=%d act=%s y=%s sources=%d",
                 backend.name, backend.rank, backend.world_size, max_tokens, hidden, topk, act_mode, out_dtype,
                 sources)

    def check_tokens(self, num_tokens: int, name: str = "hidden", gathered: bool = False) -> None:
        """num_tokens rows fit the buffer: a rank's own regions, or (gathered) the regions of every rank's tokens."""
        if num_tokens > self.max_tokens * (self.sources if gathered else 1):
            held = f"max_tokens={self.max_tokens}"
            held = f"{self.sources} ranks x {held}" if gathered else held
            raise ValueError(f"{name}: {num_tokens} tokens exceed the symmetric buffer capacity {held}")
        if num_tokens < 0:
            raise ValueError(f"{name}: expected a token count >= 0, got {num_tokens}")

    def _check_rows(self, t: torch.Tensor, name: str, dtype: torch.dtype | None, width: int,
                    rows: int | None = None) -> int:
        """t is (T, width) rows for the buffer, T within capacity (and T == rows when given), of this dtype (None:
        any floating-point one) on the buffer's device; returns T."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not (t.dtype == dtype if dtype is not None else t.is_floating_point()):
            want = f"dtype {dtype}" if dtype is not None else "a floating-point dtype"
            raise TypeError(f"{name}: expected {want}, got {t.dtype}")
        if t.dim() != 2 or t.shape[1] != width or (rows is not None and t.shape[0] != rows):
            raise ValueError(f"{name}: expected shape ({'T' if rows is None else rows}, {width}), "
                             f"got {tuple(t.shape)}")
        if t.device != self.y.device:
            raise ValueError(f"{name}: expected device {self.y.device}, got {t.device}")
        self.check_tokens(t.shape[0], name)
        return t.shape[0]

    def activations(self, num_tokens: int, gathered: bool = False) -> NVFP4Tensor | torch.Tensor:
        """Views of the first num_tokens rows of the staged activations (of the gathered ones: every rank's)."""
        self.check_tokens(num_tokens, "num_tokens", gathered)
        x = self.x_gathered if gathered else self.x
        if self.act_mode != "nvfp4":
            return x[:num_tokens]
        x_sf = self.x_sf_gathered if gathered else self.x_sf
        # Little-endian words hold scale 4w in their low byte, so viewing them as bytes is the unpack.
        scale = x_sf[:num_tokens].view(torch.uint8).view(torch.float8_e4m3fn)
        return NVFP4Tensor(x[:num_tokens], scale, self.x_global[0])

    def stage(self, hidden: torch.Tensor, global_scale: torch.Tensor | None = None,
              check: bool = True) -> NVFP4Tensor | torch.Tensor:
        """Quantize hidden (T, H) into x / x_sf / x_global (or copy it, bf16 mode); return the staged views."""
        t = self._check_rows(hidden, "hidden", torch.bfloat16 if self.act_mode != "nvfp4" else None, self.hidden)
        if self.act_mode == "nvfp4" and hidden.is_cuda and hidden.dtype == torch.bfloat16:
            from .staging import stage_nvfp4  # checks hidden itself, beside its launch

            gs = None if global_scale is None else global_scale.reshape(1).float()
            return stage_nvfp4(hidden, self.x, self.x_sf, self.x_global, self._amax, gs, check)
        if self.act_mode != "nvfp4":
            if check:
                check_finite(hidden, "hidden")
            self.x[:t].copy_(hidden)
            return self.activations(t)
        q = quantize(hidden, global_scale, check=check, name="hidden")
        staged = self.activations(t)
        staged.data.copy_(q.data)
        staged.scale.view(torch.uint8).copy_(q.scale.view(torch.uint8))
        self.x_global.copy_(q.global_scale.reshape(1))
        return staged

    def set_routing(self, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy int32 topk ids and fp32 weights, both (T, topk), into the buffer; return the views of the T rows."""
        t = self._check_rows(topk_idx, "topk_idx", self.topk_idx.dtype, self.topk)
        self._check_rows(topk_weights, "topk_weights", self.topk_weights.dtype, self.topk, rows=t)
        rows = self.routing(t)
        rows[0].copy_(topk_idx)
        rows[1].copy_(topk_weights)
        return rows

    def routing(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the topk ids and weights of the first num_tokens rows (a router's `out`)."""
        self.check_tokens(num_tokens, "num_tokens")
        return self.topk_idx[:num_tokens], self.topk_weights[:num_tokens]

    def gather(self, num_tokens: int) -> tuple[NVFP4Tensor | torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prepare (token_mode 'dp'): the staged activations, topk ids and weights of every rank's num_tokens tokens,
        in rank order, as the expert stage reads them. A collective call on every rank, with the same num_tokens
        everywhere (EPMoE's checks make sure of that)."""
        if self.sources == 1:
            raise ValueError("gather: this buffer holds one rank's tokens (token_mode 'replicated'): nothing to gather")
        self.check_tokens(num_tokens, "num_tokens")
        n = self.sources * num_tokens
        if num_tokens:  # one call for every region (the P2P backends: one launch)
            self.backend.all_gather([getattr(self, f"{name}_gathered")[:n] for name in self._gathered],
                                    [getattr(self, name)[:num_tokens] for name in self._gathered])
        return self.activations(n, gathered=True), self.topk_idx_gathered[:n], self.topk_weights_gathered[:n]


# The GPU backends' modules and classes, imported only when chosen.
_GPU_BACKENDS = {"torch": ("symm_torch", "TorchSymmBackend"), "ipc": ("symm_ipc", "IpcBackend"),
                 "nvshmem": ("symm_nvshmem", "NvshmemBackend")}


def make_backend(kind: str, device: torch.device, capacity_bytes: int) -> SymmBackend:
    """cpu | torch | ipc | nvshmem | auto (torch symmetric memory on CUDA, else cpu); capacity_bytes sizes a GPU
    arena. The choice and the capacities are logged by the backend and the SymmBuffer."""
    if kind == "auto":
        kind = "torch" if device.type == "cuda" else "cpu"
    if kind == "cpu":
        return CpuBackend(device=device)
    if kind not in _GPU_BACKENDS:
        raise ValueError(f"symm_backend: expected 'cpu', 'torch', 'ipc', 'nvshmem' or 'auto', got {kind!r}")
    if device.type != "cuda":
        raise ValueError(f"symm_backend: {kind!r} needs a CUDA device, got {device}")
    module, cls = _GPU_BACKENDS[kind]
    return getattr(importlib.import_module(f".{module}", __package__), cls)(device=device,
                                                                            capacity_bytes=capacity_bytes)
