"""Plain torch.distributed plumbing: join a torchrun job, or spawn local ranks when not under torchrun."""
from __future__ import annotations

import datetime
import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(kind: str, local_rank: int, world_size: int) -> torch.device:
    """cpu | cuda | auto (one GPU per rank when there are enough of them, else CPU)."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' requested but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if kind != "cpu":
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'auto', got {kind!r}")
    return torch.device("cpu")


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """gloo for CPU ranks, NCCL for GPU ranks; rendezvous from the environment (torchrun or spawn_local)."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # several ranks share the few cores of a CPU machine
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_local(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run fn(rank, world_size, *args) in world_size fresh processes with the torchrun environment set."""
    mp.spawn(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
