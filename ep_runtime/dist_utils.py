"""Plain torch.distributed plumbing: join a torchrun job, or spawn local ranks when not under torchrun; a host
barrier and collective calls that fail naming this rank instead of hanging or failing anonymously."""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import MAX_TIMEOUT_S


class CommError(Exception):
    """A P2P collective failed on the GPU (which cannot raise): every rank must call its backend's reset_signals()
    before the next collective. `rank` is this rank."""


class CommTimeoutError(CommError, TimeoutError):
    """A barrier gave up waiting; `missing` lists the ranks it was still waiting for when it stopped, `gave_up` the
    ranks found to have given up waiting themselves (in this call or an earlier one: until the reset, no P2P
    collective moves data)."""

    def __init__(self, message: str, rank: int, missing: list[int], gave_up: list[int] | None = None):
        super().__init__(message)
        self.rank, self.missing, self.gave_up = rank, missing, list(gave_up or [])

    def __reduce__(self):  # pickle and copy rebuild it from these (the default passes the message alone)
        return type(self), (self.args[0], self.rank, self.missing, self.gave_up)


class CommMismatchError(CommError, RuntimeError):
    """Ranks met in a collective that they were asked to run differently (another collective, other sizes such as a
    token count that differs between ranks, another tensor, dtype or algorithm); `disagreed` lists the ranks whose call
    differed from this rank's, `missing` and `gave_up` as in CommTimeoutError."""

    def __init__(self, message: str, rank: int, disagreed: list[int], missing: list[int],
                 gave_up: list[int] | None = None):
        super().__init__(message)
        self.rank, self.disagreed, self.missing, self.gave_up = rank, disagreed, missing, list(gave_up or [])

    def __reduce__(self):
        return type(self), (self.args[0], self.rank, self.disagreed, self.missing, self.gave_up)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank_and_size() -> tuple[int, int]:
    """This process's rank among the ranks of its node, and their number: torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE (without them, or outside any job, the ranks are taken to share one node)."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return int(os.environ.get("LOCAL_RANK", rank)), int(os.environ.get("LOCAL_WORLD_SIZE", world))


def pick_device(kind: str) -> torch.device:
    """cpu | cuda | auto (cuda when a GPU is visible, else cpu). On cuda every rank of this node takes its own GPU,
    the one of its local rank: too few GPUs for this node's ranks is an error, never a silent fallback to CPU."""
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'auto', got {kind!r}")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but no CUDA device is visible")
    local_rank, local_world = local_rank_and_size()
    visible = torch.cuda.device_count()
    if local_world > visible:
        raise RuntimeError(f"device: {local_world} ranks on this node need a GPU each, got {visible} visible GPUs; "
                           f"run at most {visible} ranks per node or pass --device cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def resolve_device(device: torch.device | str) -> torch.device:
    """A device named in full ("cuda" is the current one) that this process has: the CPU or a visible GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: expected a device this process has, got {device} (no CUDA device is visible)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device: expected cuda:0..cuda:{torch.cuda.device_count() - 1}, got {device}")
    elif device.type != "cpu":
        raise ValueError(f"device: expected a CPU or CUDA device, got {device}")
    return device


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """gloo for CPU ranks, NCCL for GPU ranks; rendezvous from the environment (torchrun or spawn_local)."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def check_timeout(timeout_s: float) -> float:
    """A barrier's timeout: finite and positive seconds (the kernels count in 64-bit nanoseconds, where infinity
    would wrap to no time at all)."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout_s: expected seconds in (0, {MAX_TIMEOUT_S:g}], got {timeout_s!r}")
    return float(timeout_s)


# Per process group, how many barriers this rank has entered: the ranks' n-th barriers meet on the same keys.
_barrier_count: dict[str, int] = {}


def host_barrier(timeout_s: float, group: dist.ProcessGroup | None = None) -> None:
    """Wait on the host for every rank of the group, through the group's store, so it works over any backend (gloo,
    NCCL). After timeout_s every waiting rank raises CommTimeoutError naming itself and the ranks that did not
    arrive. A rank that timed out has left its group's barriers out of step: end the job."""
    check_timeout(timeout_s)
    group = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world == 1:
        return
    n = _barrier_count.get(group.group_name, 0)
    _barrier_count[group.group_name] = n + 1
    store = group.get_group_store()
    keys = [f"ep_runtime/barrier/{n}/{q}" for q in range(world)]
    store.set(keys[rank], "1")
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
    except dist.DistNetworkError as e:  # the store's host (rank 0 of a spawned job) is gone: nobody to ask
        raise RuntimeError(f"rank {rank}: barrier over {world} ranks lost the group's store (its host process, rank 0 "
                           f"unless torchrun hosts it, has ended?): {e}") from None
    except dist.DistError:
        missing = [q for q, key in enumerate(keys) if not store.check([key])]
        raise CommTimeoutError(f"rank {rank}: barrier over {world} ranks timed out after {timeout_s:g}s waiting "
                               f"for rank(s) {missing}", rank, missing) from None
    # Every rank that set its key here has left barrier n - 1, so nobody waits on that one's keys any more.
    if n:
        store.delete_key(f"ep_runtime/barrier/{n - 1}/{rank}")


@contextlib.contextmanager
def collective(what: str, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Around one torch.distributed collective: its failure (a timeout, a peer gone) is re-raised as a
    RuntimeError that names this rank, the collective, the group size and how long it waited."""
    start = time.monotonic()
    try:
        yield
    except RuntimeError as e:  # gloo and NCCL errors, torch.distributed.DistError included
        raise RuntimeError(f"rank {dist.get_rank(group)}: {what} over {dist.get_world_size(group)} ranks failed "
                           f"after {time.monotonic() - start:.1f}s: {e}") from e


def share_rows(row: Sequence[float], problem: BaseException | None, what: str, device: torch.device,
               group: dist.ProcessGroup | None = None) -> tuple[list[list[float]], list[int]]:
    """Collective: every rank's row of numbers (token counts, scales) and which ranks failed the step before, by one
    all-reduce on `device` (one the group's backend takes: the rank's layer device, or fallback_device), so that a
    rank whose own step failed does not leave its peers waiting for it in a later collective until the group's
    timeout. A rank passing its `problem` re-raises it once the others know; the others get every rank's row (in rank
    order; zeros for a failed rank) and the failed ranks, to raise an error naming them."""
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    table = torch.zeros(ranks, len(row) + 1, dtype=torch.float64)  # exact for counts and fp32 scales
    if problem is None:
        table[rank, :-1] = torch.tensor(row, dtype=torch.float64)
    else:
        table[rank, -1] = 1
    table = table.to(device)  # filled on the host: one copy, not a kernel per entry, in every checked forward
    with collective(what, group):
        dist.all_reduce(table, group=group)
    if problem is not None:
        raise problem
    rows = table.tolist()
    return [r[:-1] for r in rows], [q for q, r in enumerate(rows) if r[-1]]


def fallback_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """A device for share_rows where the rank has none of its own (it failed to find it): the host, unless the group
    runs on NCCL alone, then the current GPU."""
    backend = dist.get_backend(group)
    nccl_only = "nccl" in backend and "gloo" not in backend
    return torch.device("cuda", torch.cuda.current_device()) if nccl_only else torch.device("cpu")


def check_same_on_every_rank(values: dict[str, Any], group: dist.ProcessGroup | None = None) -> None:
    """Collective: every rank must hold the same values (settings that index shared memory, region layouts)."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    with collective(f"all-gather of {', '.join(values)}", group):
        dist.all_gather_object(gathered, values, group=group)
    check_same_values(gathered, dist.get_rank(group))


def check_same_values(gathered: list[dict[str, Any]], rank: int) -> None:
    """Raise ValueError naming the first of rank `rank`'s values that another rank holds differently."""
    for name, value in gathered[rank].items():
        for q, theirs in enumerate(gathered):
            if theirs.get(name) != value:
                raise ValueError(f"{name}: expected the same value on every rank, rank {rank} has {value!r}, "
                                 f"rank {q} has {theirs.get(name)!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # several ranks share the few cores of a CPU machine
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_local(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run fn(rank, world_size, *args) in world_size fresh processes with the torchrun environment set."""
    mp.spawn(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
