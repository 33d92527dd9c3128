"""The symmetric arena in NVSHMEM memory through nvshmem4py (`nvshmem.core`): the path to multi-node.

Bootstrap by unique id over torch.distributed (rank 0 creates it, broadcast_object_list carries it), then
`nvshmem.core.tensor` allocates the arena collectively and `get_peer_tensor` maps the peers that share this
node's NVLink domain. Regions, signals and the P2P all-reduce are the shared P2PArenaBackend machinery; ranks
on other nodes (no peer mapping) are not supported by that all-reduce yet and are refused clearly.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .dist_utils import collective, host_barrier
from .symm_torch import P2PArenaBackend

for _var, _val in (("NVSHMEM_DISABLE_NVLS", "1"), ("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
    os.environ.setdefault(_var, _val)


class NvshmemBackend(P2PArenaBackend):
    name = "nvshmem"

    def _map_arena(self, total: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        try:
            import nvshmem.core as nvshmem
            from cuda.core.experimental import Device
        except ImportError:
            try:
                import nvshmem.core as nvshmem
                from cuda.core import Device
            except ImportError as e:
                raise RuntimeError("symm_backend 'nvshmem' needs nvshmem4py (pip install nvshmem4py-cu13) and "
                                   f"cuda-core: {e}") from None
        Device(self.device.index).set_current()
        uid = [nvshmem.get_unique_id(empty=self.rank != 0)]
        with collective("broadcast of the NVSHMEM unique id", self.group):
            dist.broadcast_object_list(uid, src=dist.get_global_rank(self.group, 0), group=self.group)
        nvshmem.init(device=Device(self.device.index), uid=uid[0], rank=self.rank, nranks=self.world_size,
                     initializer_method="uid")
        self._nvshmem = nvshmem
        arena = nvshmem.tensor((total,), dtype=torch.uint8)
        peers = []
        for r in range(self.world_size):
            peer = nvshmem.get_peer_tensor(arena, r)
            if peer is None or peer.data_ptr() == 0:
                raise RuntimeError(f"rank {self.rank}: NVSHMEM PE {r} is not reachable by load/store (another "
                                   f"node?); the P2P all-reduce needs every rank in one NVLink domain")
            peers.append(peer)
        return arena, peers

    def close(self) -> None:
        """Collective: free the arena and finalize NVSHMEM (before process exit)."""
        torch.cuda.synchronize(self.device)
        host_barrier(self.comm.timeout_s, self.group)
        self._peers = []
        self._nvshmem.free_tensor(self._arena)
        self._nvshmem.finalize()
