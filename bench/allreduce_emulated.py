"""Latency of the P2P all-reduce kernels between W ranks emulated in one process on one GPU: each rank a zeroed arena
and a stream, a CUDA graph of CALLS calls per rank, the ranks' graphs replayed together. It times the kernels' own
synchronization on one GPU's memory (no NVLink): how a change to the barriers moves it, not what a node's ranks see
(bench_allreduce.py, under torchrun). Usage: python bench/allreduce_emulated.py [LABEL] (a build's name in the output).
"""
from __future__ import annotations

import sys

import torch

from ep_runtime import _C
from ep_runtime.allreduce import SymmAllReduce

CALLS, REPS = 200, 15
CASES = [(2, 14336, "oneshot"), (4, 14336, "oneshot"), (2, 229376, "twoshot"), (4, 229376, "twoshot")]


def time_per_call_us(world: int, nbytes: int, algo: str) -> list[float]:
    """Microseconds per call of each replay, sorted (a replay ends when the last rank's graph does)."""
    data = 1 << 20
    arenas = [torch.zeros(data + _C.allreduce_signal_bytes(), dtype=torch.uint8, device="cuda") for _ in range(world)]
    sig = [a.data_ptr() + data for a in arenas]

    def locator(r: int):
        return lambda t, name: [a.data_ptr() + (t.data_ptr() - arenas[r].data_ptr()) for a in arenas]

    comms = [SymmAllReduce(r, world, sig, locator(r), 10.0, max_ctas=8) for r in range(world)]
    streams = [torch.cuda.Stream() for _ in range(world)]
    bufs = [arenas[r][:nbytes].view(torch.bfloat16).normal_() for r in range(world)]
    graphs = [torch.cuda.CUDAGraph() for _ in range(world)]
    torch.cuda.synchronize()
    for r in range(world):
        with torch.cuda.graph(graphs[r], stream=streams[r]):
            for _ in range(CALLS):
                comms[r](bufs[r], algo=algo)
    times = []
    for _ in range(REPS):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(world)]
        start.record()
        for r in range(world):
            streams[r].wait_event(start)
            with torch.cuda.stream(streams[r]):
                graphs[r].replay()
                ends[r].record()
        torch.cuda.synchronize()
        times.append(max(start.elapsed_time(e) for e in ends) * 1e3 / CALLS)
    for c in comms:
        c.raise_if_failed()
    return sorted(times)


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "this build"
    for world, nbytes, algo in CASES:
        t = time_per_call_us(world, nbytes, algo)
        print(f"{label} world={world} bytes={nbytes} {algo}: median {t[REPS // 2]:.2f} us/call (min {t[0]:.2f}, "
              f"max {t[-1]:.2f})")


if __name__ == "__main__":
    main()
