"""CUDA-graph capture the way every caller here needs it: warm up on a side stream, then capture."""
from __future__ import annotations

from typing import Callable

import torch


def capture(fn: Callable[[], object], warmup: int = 2) -> torch.cuda.CUDAGraph:
    """Run fn `warmup` times on a side stream (lazy initialization, allocator pools), then capture one call.

    Collective code must be captured the same number of times, with the same warm-up, on every rank."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
