"""The symmetric arena in plain device memory, mapped by the peers through CUDA IPC handles: ranks sharing one GPU.

PyTorch symmetric memory and NVSHMEM refuse several ranks on one GPU. Here each rank allocates its arena from PyTorch's
caching allocator, the ranks all-gather the IPC handles torch.multiprocessing pickles CUDA tensors with, and each maps
its peers' arenas; regions, signals and the P2P kernels are the shared P2PArenaBackend machinery. That is how the
runtime's P2P path runs several ranks on a machine with one GPU. Across GPUs torch maps a peer's arena on the peer's
device, which this rank's kernels may not reach without peer access that nothing here enables: refused, for now.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor

from .dist_utils import collective
from .symm_torch import P2PArenaBackend


class IpcBackend(P2PArenaBackend):
    name = "ipc"

    def _map_arena(self, total: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        arena = torch.empty(total, dtype=torch.uint8, device=self.device)
        handles: list = [None] * self.world_size
        with collective("all-gather of the arenas' CUDA IPC handles", self.group):
            dist.all_gather_object(handles, reduce_tensor(arena), group=self.group)
        peers = [arena if q == self.rank else rebuild(*args) for q, (rebuild, args) in enumerate(handles)]
        for q, peer in enumerate(peers):
            if peer.device != self.device:
                raise ValueError(f"symm_backend: 'ipc' maps the arenas of ranks that share one GPU; rank {q}'s is on "
                                 f"{peer.device}, rank {self.rank}'s on {self.device} (use 'torch' across GPUs)")
        return arena, peers
