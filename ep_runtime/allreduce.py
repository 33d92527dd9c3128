"""Sum all-reduce of a tensor in symmetric memory over NVLink peer pointers (csrc/allreduce.cu).

One-shot (every rank reads every peer and keeps its own sum) for small tensors, two-shot (reduce-scatter of
1/W chunks, then the reduced chunks pushed to every peer) for large ones; `auto` picks by size. Every
element is summed in fp32 in ascending rank order, so both algorithms give the same bits on every rank. Token mode
'dp' adds a reduce-scatter (each rank sums its own chunk the same way) and an all-gather of up to four tensors in one
launch (each rank stores its chunk into every peer's copy).

The kernels synchronize through signal words in symmetric memory and give up after `timeout_s`: they then
write the missing peers into host-mapped status words, which this module turns into a CommTimeoutError
naming them: at once with `check=True` (which syncs), otherwise on the next call. A rank that gives up also marks
itself in every rank's signal block, and every later P2P collective of every rank that sees the mark moves no data and
reports it (ranks still waiting leave at once): after a timeout the ranks' signal epochs disagree, so every rank must
call the owner's `reset_signals()` before the next call.
At their first barrier the ranks also compare what each was asked to do (the collective, its grid, its tensor's
offset in the arena, sizes, dtype and algorithm): where a rank's call differs, as with token counts that differ
between ranks, the CTAs that meet a peer's move nothing (any beyond a peer's smaller grid wait out the timeout), and
the next check reports a CommMismatchError naming the ranks whose call differed from its own.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
from typing import Callable, Sequence

import torch

from .dist_utils import CommMismatchError, CommTimeoutError, check_timeout
from .ops import check_operands, check_tensor, define_op, launch

ALGOS = ("auto", "oneshot", "twoshot")
_ALGO_CODE = {"oneshot": 0, "twoshot": 1}
_DTYPE_CODE = {torch.bfloat16: 0, torch.float32: 1}
_PHASES = ("waiting for peers' inputs", "one-shot read/write hand-off", "two-shot gather", "barrier", "reduce-scatter",
           "all-gather")
MAX_GATHER_SEGMENTS = 4  # tensors one all_gather call takes (csrc/allreduce.cu kMaxSegments)
# One-shot up to this many bytes, two-shot above. Measured on 2 and 4 H200s (bench/results/allreduce_*.json):
# one-shot wins only at 14 KB (1 token x 7168 bf16), two-shot from 229 KB (16 tokens) on. W=8 is unmeasured.
DEFAULT_ONESHOT_MAX_BYTES = {2: 64 << 10, 4: 64 << 10, 8: 32 << 10}


def resolve_oneshot_max_bytes(world_size: int, value: int | None = None) -> int:
    """The one-shot/two-shot threshold: value, else EP_ALLREDUCE_ONESHOT_MAX_BYTES, else the measured default."""
    if value is not None:
        return value
    env = os.environ.get("EP_ALLREDUCE_ONESHOT_MAX_BYTES")
    if not env:
        return DEFAULT_ONESHOT_MAX_BYTES.get(world_size, 256 << 10)
    if not re.fullmatch(r"[0-9]+", env):  # a count of bytes, >= 0
        raise ValueError(f"EP_ALLREDUCE_ONESHOT_MAX_BYTES: expected a whole number of bytes, got {env!r}")
    return int(env)


def validate_all_reduce_args(t: torch.Tensor, algo: str) -> None:
    """The checks that need no GPU: algorithm name, dtype, layout, size granularity, device."""
    if algo not in ALGOS:
        raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t: expected a tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"t: expected dtype torch.bfloat16 or torch.float32, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"t: expected a contiguous tensor, got strides {t.stride()}")
    if (t.numel() * t.element_size()) % 16:
        raise ValueError(f"t: size must be a multiple of 16 bytes, got {t.numel() * t.element_size()} bytes "
                         f"(shape {tuple(t.shape)})")
    if t.device.type != "cuda":
        raise ValueError(f"t: expected a CUDA tensor in symmetric memory, got device {t.device}")
    if t.data_ptr() % 16:
        raise ValueError(f"t: data must be 16-byte aligned, got address {t.data_ptr():#x}")


def validate_reduce_scatter_args(inp: torch.Tensor, out: torch.Tensor, world_size: int) -> None:
    """inp: every rank's rows (world_size equal chunks of whole 16-byte vectors), bf16 or fp32; out: a chunk of it."""
    check_tensor(inp, "inp", tuple(_DTYPE_CODE))
    check_tensor(out, "out", inp.dtype)
    if inp.numel() != world_size * out.numel():
        raise ValueError(f"out: expected 1/{world_size} of inp's {inp.numel()} elements, got {out.numel()}")
    if (out.numel() * out.element_size()) % 16:
        raise ValueError(f"out: expected whole 16-byte vectors, got {out.numel() * out.element_size()} bytes")
    check_operands({"out": out}, {"inp": inp})


def validate_all_gather_args(outs: list[torch.Tensor], inps: list[torch.Tensor], world_size: int) -> None:
    """Up to MAX_GATHER_SEGMENTS pairs: outs[i] holds world_size copies of inps[i]'s bytes (whole 4-byte words, from
    4-byte aligned inputs: the kernel copies words where a chunk is not whole 16-byte vectors)."""
    if len(outs) != len(inps) or not 0 < len(outs) <= MAX_GATHER_SEGMENTS:
        raise ValueError(f"outs, inps: expected 1 to {MAX_GATHER_SEGMENTS} pairs of tensors, got {len(outs)} and "
                         f"{len(inps)}")
    for i, (out, inp) in enumerate(zip(outs, inps)):
        if not isinstance(inp, torch.Tensor):
            raise TypeError(f"inps[{i}]: expected a tensor, got {type(inp).__name__}")
        if not inp.is_contiguous():
            raise ValueError(f"inps[{i}]: expected a contiguous tensor, got strides {inp.stride()}")
        check_tensor(out, f"outs[{i}]", inp.dtype)
        if out.numel() != world_size * inp.numel():
            raise ValueError(f"outs[{i}]: expected {world_size} x inps[{i}]'s {inp.numel()} elements, got "
                             f"{out.numel()}")
        if (inp.numel() * inp.element_size()) % 4:
            raise ValueError(f"inps[{i}]: expected whole 4-byte words, got {inp.numel() * inp.element_size()} bytes")
    check_operands({f"outs[{i}]": t for i, t in enumerate(outs)}, {f"inps[{i}]": t for i, t in enumerate(inps)})
    for i, inp in enumerate(inps):
        if inp.data_ptr() % 4:
            raise ValueError(f"inps[{i}]: expected 4-byte aligned data, got address {inp.data_ptr():#x}")


class HostStatus:
    """Status words in mapped pinned host memory: kernels write them, the host reads them with no copy."""

    def __init__(self) -> None:
        from . import _C

        self._C = _C
        self.words = _C.allreduce_status_words()
        self._host = _C.host_status_alloc(self.words)
        self.device_ptr = _C.host_status_device_ptr(self._host)
        self._view = (ctypes.c_int32 * self.words).from_address(self._host)

    def read(self) -> list[int]:
        return list(self._view)

    def clear(self) -> None:
        ctypes.memset(self._host, 0, self.words * 4)

    def __del__(self) -> None:
        # At interpreter exit the CUDA context may already be gone; the memory goes with the process then.
        if getattr(self, "_host", 0):
            with contextlib.suppress(RuntimeError):
                self._C.host_status_free(self._host)


class SymmAllReduce:
    """The all-reduce and device barrier of one group of ranks over one symmetric arena.

    `locate(t, name)` returns t's address on every rank (it raises, naming t, if t is not in the arena); `signal_ptrs`
    are the ranks' zeroed signal blocks (csrc/allreduce_signals.cuh), one per rank.
    """

    def __init__(self, rank: int, world_size: int, signal_ptrs: Sequence[int],
                 locate: Callable[[torch.Tensor, str], list[int]], timeout_s: float = 10.0,
                 oneshot_max_bytes: int | None = None, max_ctas: int = 0):
        check_timeout(timeout_s)
        if len(signal_ptrs) != world_size:
            raise ValueError(f"signal_ptrs: expected {world_size} pointers, got {len(signal_ptrs)}")
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.signal_ptrs = list(signal_ptrs)
        self._locate = locate
        self.oneshot_max_bytes = resolve_oneshot_max_bytes(world_size, oneshot_max_bytes)
        self.max_ctas = max_ctas  # grid cap, identical on every rank (0: one CTA per SM)
        self.status = HostStatus()
        self._id = len(_registry)
        _registry.append(self)

    def pick(self, nbytes: int, algo: str = "auto") -> str:
        if algo != "auto":
            return algo
        return "oneshot" if nbytes <= self.oneshot_max_bytes else "twoshot"

    def raise_if_failed(self, timeout_s: float | None = None) -> None:
        """Raises the failure the kernels recorded since the last reset, if any (timeout_s: the one the failed call
        waited, where it was not the communicator's)."""
        st = self.status.read()
        if st[0] == 0:
            return
        waited_s = self.timeout_s if timeout_s is None else timeout_s
        # [0] phase + 1, then a word per possible peer: missing, disagreed, gave up (csrc/allreduce.cu Args::status)
        per_peer = (len(st) - 1) // 3
        missing, disagreed, gave_up = ([q for q in range(self.world_size) if st[1 + k * per_peer + q]]
                                       for k in range(3))
        phase = _PHASES[st[0] - 1] if 0 < st[0] <= len(_PHASES) else f"phase {st[0] - 1}"
        reset = "every rank must call reset_signals() before the next collective"
        # A rank that gave up (timed out) latches every rank's P2P collectives until the reset, and the ranks still
        # waiting leave (naming whom they waited for) as soon as they see it.
        timed_out = self.rank in gave_up and bool(missing)
        who = [f"rank(s) {[q for q in gave_up if q != self.rank]}"] if set(gave_up) - {self.rank} else []
        if self.rank in gave_up and not timed_out:
            who.append("this rank")
        latched = (f"; {' and '.join(who)} gave up waiting in a barrier (a timeout, in this call or an earlier one), "
                   f"after which no P2P collective of any rank moves data" if who else "")
        of = f"rank(s) {missing} of {self.world_size}"
        if disagreed:
            also = (f", and {of} did not come within {waited_s:g}s" if timed_out else
                    f", and {of} had not come when a rank gave up" if missing else "")
            what = "all-reduce" if st[0] == 1 else phase  # the ranks compare their calls at a first barrier
            raise CommMismatchError(
                f"rank {self.rank}: symmetric-memory {what}: rank(s) {disagreed} of {self.world_size} were asked for "
                f"another collective, or for other sizes (a token count that differs between ranks), tensor, dtype or "
                f"algorithm than this rank, so it moved no data{also}{latched}; {reset}", self.rank, disagreed, missing,
                gave_up)
        waited = (f" timed out after {waited_s:g}s waiting for {of}" if timed_out
                  else f" stopped waiting for {of}" if missing else " moved no data")
        raise CommTimeoutError(f"rank {self.rank}: symmetric-memory {phase}{waited}{latched}; {reset}", self.rank,
                               missing, gave_up)

    def __call__(self, t: torch.Tensor, algo: str = "auto", check: bool = False) -> torch.Tensor:
        """Sum t over the ranks, in place, on the current stream; returns t."""
        validate_all_reduce_args(t, algo)
        self.raise_if_failed()
        nbytes = t.numel() * t.element_size()
        if self.world_size > 1 and nbytes:
            _all_reduce_op(t, self._id, _ALGO_CODE[self.pick(nbytes, algo)])
            if check:
                torch.cuda.current_stream(t.device).synchronize()
                self.raise_if_failed()
        return t

    def reduce_scatter(self, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = this rank's chunk (inp's rows split world_size ways) of the sum over ranks of inp, in the all-reduce's
        order and bits; inp lies in the arena (the launch says so, naming it), out anywhere. Returns out."""
        validate_reduce_scatter_args(inp, out, self.world_size)
        self.raise_if_failed()
        if inp.numel():
            _reduce_scatter_op(inp, out, self._id)
        return out

    def all_gather(self, outs: list[torch.Tensor], inps: list[torch.Tensor]) -> None:
        """outs[i] = every rank's inps[i], in rank order, in one launch; outs lie in the arena, inps anywhere."""
        validate_all_gather_args(outs, inps, self.world_size)
        self.raise_if_failed()
        _all_gather_op(outs, inps, self._id)

    def launch(self, t: torch.Tensor, algo_code: int) -> None:
        launch("all_reduce", t.device, self._locate(t, "t"), self.signal_ptrs, self.rank, t.numel() * t.element_size(),
               _DTYPE_CODE[t.dtype], algo_code, self.timeout_s, self.status.device_ptr, self.max_ctas)

    def barrier(self, device: torch.device, timeout_s: float | None = None) -> None:
        """Device barrier among the ranks on `device` (the arena's) and its current stream, then a host sync and a
        status check."""
        timeout_s = self.timeout_s if timeout_s is None else check_timeout(timeout_s)
        self.raise_if_failed()
        launch("device_barrier", device, self.signal_ptrs, self.rank, timeout_s, self.status.device_ptr)
        torch.cuda.current_stream(device).synchronize()
        self.raise_if_failed(timeout_s)


# Custom ops see plain ints; they find their communicator here (communicators live for the process).
_registry: list[SymmAllReduce] = []


def _all_reduce_impl(t: torch.Tensor, comm: int, algo: int) -> None:
    _registry[comm].launch(t, algo)


_all_reduce_op = define_op("symm_all_reduce_(Tensor(a!) t, int comm, int algo) -> ()", _all_reduce_impl)


def _reduce_scatter_impl(inp: torch.Tensor, out: torch.Tensor, comm: int) -> None:
    c = _registry[comm]
    launch("reduce_scatter", out.device, c._locate(inp, "inp"), c.signal_ptrs, c.rank, out.numel() * out.element_size(),
           _DTYPE_CODE[inp.dtype], out.data_ptr(), c.timeout_s, c.status.device_ptr, c.max_ctas)


def _all_gather_impl(outs: list[torch.Tensor], inps: list[torch.Tensor], comm: int) -> None:
    c = _registry[comm]
    base = c._locate(outs[0], "outs[0]")
    launch("all_gather", outs[0].device, base, c.signal_ptrs, c.rank, [t.data_ptr() for t in inps],
           [c._locate(t, f"outs[{i}]")[c.rank] - base[c.rank] for i, t in enumerate(outs)],
           [t.numel() * t.element_size() for t in inps],
           c.timeout_s, c.status.device_ptr, c.max_ctas)


_reduce_scatter_op = define_op("symm_reduce_scatter(Tensor inp, Tensor(a!) out, int comm) -> ()", _reduce_scatter_impl)
_all_gather_op = define_op("symm_all_gather(Tensor(a!)[] outs, Tensor[] inps, int comm) -> ()", _all_gather_impl)
