"""The symmetric arena in plain device memory, mapped by the peers through CUDA IPC handles.

No symmetric-memory library: each rank allocates its arena from PyTorch's caching allocator, the ranks all-gather the
IPC handles torch.multiprocessing pickles CUDA tensors with, and each maps its peers' arenas. Regions, signals and the
P2P all-reduce are the shared P2PArenaBackend machinery. It works wherever CUDA IPC does: the GPUs of one node that
have peer access, and ranks that share one GPU, which PyTorch symmetric memory and NVSHMEM refuse; that is how the
runtime's P2P path runs several ranks on a machine with one GPU.
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
        return arena, [arena if q == self.rank else rebuild(*args) for q, (rebuild, args) in enumerate(handles)]
