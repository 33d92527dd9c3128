"""GPU SymmBackends over one peer-mapped arena; here the PyTorch symmetric-memory one (CUDA P2P backend).

One symmetric arena per process, allocated and mapped once at construction (before any CUDA-graph
capture); `empty()` carves named regions out of it at 256-byte aligned offsets, identical on every rank,
so capacities and addresses never change. The arena ends with the all-reduce signal block. Peer pointers are
the same offsets in the peers' mappings of the arena.

NVLink multicast stays off (our machines disable it): the all-reduce uses plain P2P loads and stores.
"""
from __future__ import annotations

import logging
import math
import os

import torch
import torch.distributed as dist

from .allreduce import SymmAllReduce, resolve_oneshot_max_bytes
from .config import MAX_TIMEOUT_S
from .dist_utils import check_same_on_every_rank, check_timeout, collective, host_barrier, resolve_device
from .symm import align as _align

for _var, _val in (("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NCCL_NVLS_ENABLE", "0"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_var, _val)

log = logging.getLogger("ep_runtime")

DEFAULT_CAPACITY_BYTES = 256 << 20
# Device-side barriers give up after this long. Ranks must reach their first collective within it of each
# other, so start-up skew (one rank still loading weights) wants a host barrier first, or a larger value.
DEFAULT_TIMEOUT_S = 10.0


def timeout_from_env() -> float:
    """The P2P backends' barrier timeout: EP_SYMM_TIMEOUT_S seconds, else DEFAULT_TIMEOUT_S."""
    env = os.environ.get("EP_SYMM_TIMEOUT_S") or str(DEFAULT_TIMEOUT_S)  # unset or empty: the default
    try:
        return check_timeout(float(env))
    except ValueError:
        raise ValueError(f"EP_SYMM_TIMEOUT_S: expected seconds in (0, {MAX_TIMEOUT_S:g}], got {env!r}") from None


class P2PArenaBackend:
    """A SymmBackend over one arena that every rank maps (peer pointers over NVLink/P2P). Subclasses only say
    how the arena is allocated and mapped (`_map_arena`); regions, peer pointers, signals and the all-reduce
    are shared. Also `reset_signals()` and the all-reduce algorithm choice
    (`all_reduce_(t, algo=..., check=...)`, see ep_runtime.allreduce). all_gather and reduce_scatter (token_mode
    'dp') are P2P kernels with the same barriers."""

    name = "p2p"

    def __init__(self, device: torch.device | str, group: dist.ProcessGroup | None = None,
                 capacity_bytes: int | None = None, timeout_s: float | None = None,
                 oneshot_max_bytes: int | None = None):
        self.device = resolve_device(device)  # named: the kernel launches need its index
        if self.device.type != "cuda":
            raise ValueError(f"device: {type(self).__name__} needs a CUDA device, got {self.device}")
        if not dist.is_initialized():
            raise RuntimeError(f"{type(self).__name__}: torch.distributed must be initialized first "
                               f"(init_process_group)")
        from . import _C

        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.capacity = _align(capacity_bytes if capacity_bytes is not None else DEFAULT_CAPACITY_BYTES)
        if timeout_s is None:
            timeout_s = timeout_from_env()
        # Every rank's kernels work on the same signal blocks and buffers: a rank picking another algorithm or grid
        # than its peers would race with them or time out, and one with another capacity would look for its peers'
        # signal blocks (which follow the capacity) elsewhere in their arenas.
        settings = {"oneshot_max_bytes": resolve_oneshot_max_bytes(self.world_size, oneshot_max_bytes), "max_ctas": 0}
        check_same_on_every_rank({**settings, "capacity_bytes": self.capacity}, self.group)
        signal_bytes = _C.allreduce_signal_bytes()
        total = self.capacity + signal_bytes
        self._arena, self._peers = self._map_arena(total)
        self._peer_base = [p.data_ptr() for p in self._peers]
        self._regions: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self._used = 0

        self._signals = self._arena[self.capacity:]
        self.comm = SymmAllReduce(self.rank, self.world_size, [b + self.capacity for b in self._peer_base],
                                  self._locate, timeout_s, **settings)
        self._zero_signals()
        log.info("%s: rank %d/%d on %s, arena %.1f MiB (+%d B signals), one-shot up to %d B, "
                 "barrier timeout %.1fs, multicast disabled", type(self).__name__, self.rank, self.world_size,
                 self.device, self.capacity / 2**20, signal_bytes, self.comm.oneshot_max_bytes, timeout_s)

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Carve a named region (collective: every rank must carve the same regions in the same order)."""
        if name in self._regions:
            raise ValueError(f"name: region {name!r} already exists")
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        offset = _align(self._used)
        # First, so that ranks carving other regions fail together, naming the region, before one of them overflows.
        check_same_on_every_rank({"region": (name, offset, shape, str(dtype))}, self.group)
        if offset + nbytes > self.capacity:
            raise ValueError(f"{name}: {nbytes} bytes at offset {offset} exceed the symmetric arena of "
                             f"{self.capacity} bytes; construct the backend with capacity_bytes >= "
                             f"{_align(offset + nbytes)} (see region_bytes)")
        self._regions[name] = (offset, shape, dtype)
        self._used = offset + nbytes
        log.info("%s: region %s %s %s at offset %d (%d B), arena used %d/%d B", type(self).__name__, name, shape,
                 dtype, offset, nbytes, self._used, self.capacity)
        return self._view(self._arena, name)

    def barrier(self, timeout_s: float) -> None:
        self.comm.barrier(self.device, timeout_s)

    def raise_if_failed(self) -> None:
        self.comm.raise_if_failed()

    def all_reduce_(self, t: torch.Tensor, algo: str = "auto", check: bool = False) -> torch.Tensor:
        return self.comm(t, algo=algo, check=check)

    def all_gather(self, outs: list[torch.Tensor], inps: list[torch.Tensor]) -> None:
        self.comm.all_gather(outs, inps)

    def reduce_scatter(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.comm.reduce_scatter(inp, out)

    def reset_signals(self) -> None:
        """Collective: bring every rank's signal epochs back to zero (needed after a barrier timeout). A rank that
        does not come within the backend's timeout is named in a CommTimeoutError."""
        torch.cuda.synchronize(self.device)
        host_barrier(self.comm.timeout_s, self.group)
        self._zero_signals()

    def _zero_signals(self) -> None:
        self._signals.zero_()
        self.comm.status.clear()
        torch.cuda.synchronize(self.device)
        host_barrier(self.comm.timeout_s, self.group)

    def _view(self, arena: torch.Tensor, name: str) -> torch.Tensor:
        offset, shape, dtype = self._regions[name]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return arena[offset:offset + nbytes].view(dtype).view(shape)

    def _locate(self, t: torch.Tensor, name: str) -> list[int]:
        offset = t.data_ptr() - self._arena.data_ptr()
        if offset < 0 or offset + t.numel() * t.element_size() > self.capacity:
            raise ValueError(f"{name}: expected a tensor inside this rank's symmetric arena (a region from empty()), "
                             f"got address {t.data_ptr():#x} outside [{self._arena.data_ptr():#x}, "
                             f"+{self.capacity})")
        return [base + offset for base in self._peer_base]


class TorchSymmBackend(P2PArenaBackend):
    """The arena in PyTorch symmetric memory (CUDA backend: cuMem + P2P), rendezvoused once at start-up."""

    name = "torch"

    def _map_arena(self, total: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        import torch.distributed._symmetric_memory as symm_mem

        arena = symm_mem.empty(total, dtype=torch.uint8, device=self.device)
        handle = symm_mem.rendezvous(arena, self.group)
        # get_buffer offsets count from the peer's allocation base, which may sit below our tensor (the
        # implicit memory pool); measure the gap on this rank and insist it is the same on every rank.
        gap = arena.data_ptr() - handle.get_buffer(self.rank, (1,), torch.uint8, 0).data_ptr()
        gaps = [None] * self.world_size
        with collective("all-gather of the arena offsets", self.group):
            dist.all_gather_object(gaps, gap, group=self.group)
        if gap < 0 or len(set(gaps)) != 1:
            raise RuntimeError(f"TorchSymmBackend: the arena sits at different offsets of the ranks' symmetric "
                               f"allocations ({gaps}); allocate it before any other symmetric memory")
        self._handle = handle  # owns the peer mappings the views below point into
        return arena, [handle.get_buffer(r, (gap + total,), torch.uint8, 0)[gap:] for r in range(self.world_size)]
