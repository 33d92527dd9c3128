"""Host time of an eager V4-Pro layer forward on one GPU (one rank of 384 experts, W4A4 static), per stage
(perf_counter at EPMoE.stage_marker, after a sync, median of 30) and per forward (back to back, no sync, mean of 200),
and micro timings of a few host-side pieces. The GPU work of an eager decode forward is a fraction of its host time,
so this is what an eager caller waits for.

    CUDA_VISIBLE_DEVICES=0 python bench/host_stages.py         (TOKENS=1,128 by default)
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ep_runtime import ops  # noqa: E402
from ep_runtime.config import load_config  # noqa: E402
from ep_runtime.moe import EPMoE  # noqa: E402


def mean_us(fn: Callable[[], object], n: int = 2000) -> float:
    """Mean host microseconds per call of n back-to-back calls (after 50 warm-up calls)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return dt


def _device_guard(dev: torch.device) -> None:
    """Enter and leave a device guard (what ops.launch skips when the tensors' device is the current one)."""
    with torch.cuda.device(dev):
        pass


def stage_us(moe: EPMoE, x: torch.Tensor) -> dict[str, float]:
    """Median host microseconds from each stage mark to the next over 30 forwards (after 10), each after a sync."""
    per: dict[str, list[float]] = {}
    for it in range(40):
        marks = []
        moe.stage_marker = lambda name: marks.append((name, time.perf_counter()))
        torch.cuda.synchronize()
        marks.append(("start", time.perf_counter()))
        moe(x, check=False)
        marks.append(("return", time.perf_counter()))
        moe.stage_marker = lambda name: None
        if it >= 10:
            for (_, a), (name, b) in zip(marks, marks[1:]):
                per.setdefault(name, []).append((b - a) * 1e6)
    return {name: statistics.median(v) for name, v in per.items()}


def main() -> None:
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    tokens = [int(t) for t in os.environ.get("TOKENS", "1,128").split(",")]
    cfg = load_config("deepseek_v4_pro", ["world_size=1", f"max_tokens={max(tokens)}",
                                          "backend=cuda", "act_mode=nvfp4", "act_scale=static"])
    moe = EPMoE.from_synthetic(cfg, cfg.model.num_hash_layers, 0, 1, device=dev)
    g = torch.Generator(device=dev).manual_seed(1)
    with torch.inference_mode():
        for t in tokens:
            x = torch.randn(t, cfg.model.hidden_size, generator=g, device=dev).to(torch.bfloat16)
            stages = stage_us(moe, x)
            print(f"T={t} host us per stage: " + "  ".join(f"{k} {v:.0f}" for k, v in stages.items()), flush=True)
            print(f"T={t} forward host us: {mean_us(lambda: moe(x, check=False), 200):.0f}", flush=True)
        a = torch.zeros(16, device=dev)
        print("micro us:",
              "empty", f"{mean_us(lambda: torch.empty(16, device=dev)):.2f}",
              "add", f"{mean_us(lambda: a.add(1)):.2f}",
              "cuda.device enter+exit", f"{mean_us(lambda: _device_guard(dev)):.2f}",
              "current_stream", f"{mean_us(lambda: torch.cuda.current_stream(dev).cuda_stream):.2f}",
              "raw stream", f"{mean_us(lambda: torch._C._cuda_getCurrentRawStream(0)):.2f}",
              "check_tensor", f"{mean_us(lambda: ops.check_tensor(a, 'a', torch.float32, (16,))):.2f}",
              flush=True)


if __name__ == "__main__":
    main()
