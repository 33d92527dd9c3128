"""Times grouped GEMM cases of a V4-Pro rank in one process: graph-replay medians (ms and TFLOP/s), one line each.

    python bench/ab_time.py "l1:128:128:256,l2:1:8:64:6,stage:8"

A GEMM case is layer:m:block_n:block_m[:active] (layer l1, l2, or l1q: W4A4's activation dequantization and
L1): m tokens on each of `active` (default all 48) experts spread as
in bench_experts.py. A stage case is stage:T[:experts]: the whole W4A16 expert stage (moe_align, L1, L2, combine) of T
tokens routed top-6 uniformly at random over `experts` (default the rank's 48), of which the rank holds the first 48:
192 is a rank of four in V4-Pro's layer, 384 one of eight. Each case is timed as one-call graph replays
and as a chain of calls in one graph (per call; bench_experts.chained). bench/ab_variants.sh runs it once per build
variant and round; it compares builds, it checks nothing (the GPU tests do).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_experts import (DEV, E, H, I, OurCalls, chain_launches, chained, graphed, median_ms,  # noqa: E402
                                 rank_weights, spread_counts)
from ep_runtime.cuda_experts import ExpertWorkspace, cuda_expert_stage  # noqa: E402
from ep_runtime.experts import ExpertSpec  # noqa: E402
from ep_runtime.weights import ExpertWeights  # noqa: E402

TOPK = 6


def stage_case(t: int, experts: int, w1, w2, gen: torch.Generator):
    weights = ExpertWeights(*w1, *w2, torch.ones((), device=DEV), torch.ones(E, device=DEV), layout="sm90")
    spec = ExpertSpec("bf16", "static", 10.0)
    x = torch.randn(t, H, device=DEV, generator=gen).to(torch.bfloat16)
    idx = torch.rand(t, experts, device=DEV, generator=gen).topk(TOPK, dim=1).indices.int()
    w = torch.rand(t, TOPK, device=DEV, generator=gen)
    ws = ExpertWorkspace.allocate(t, TOPK, E, H, I, DEV, spec)
    out = torch.empty(t, H, device=DEV)
    return lambda: cuda_expert_stage(x, idx, w, weights, 0, spec, out=out, workspace=ws, num_experts_total=experts)


def gemm_case(layer: str, m: int, bn: int, bm: int, active: int, w1, w2, gen: torch.Generator):
    ours = OurCalls(spread_counts(m, active), w1, w2, gen)
    n, k = (H, I) if layer == "l2" else (2 * I, H)
    call = {"l1": ours.l1_w4a16, "l1q": ours.l1_w4a4, "l2": ours.l2}[layer]
    return (lambda: call(bn, bm)), 2.0 * ours.slots * n * k


def main(spec: str) -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    w1, w2, _ = rank_weights(gen)
    for case in spec.split(","):
        kind, *fields = case.split(":")
        if kind == "stage":
            t = int(fields[0])
            experts = int(fields[1]) if len(fields) > 1 else E
            label, flops, reps = f"stage T={t} of {experts} experts", 0.0, 20
            run = stage_case(t, experts, w1, w2, gen)
        else:
            m, bn, bm = (int(v) for v in fields[:3])
            active = int(fields[3]) if len(fields) > 3 else E
            label, reps = f"{kind} m={m} active={active} bn={bn} bm={bm}", 20 if m < 2048 else 7
            run, flops = gemm_case(kind, m, bn, bm, active, w1, w2, gen)
        try:
            run()
            torch.cuda.synchronize()
        except Exception as exc:  # a variant that cannot run a case is reported, and the others still run
            print(f"{label}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        ms = median_ms(graphed(run), reps)
        n = chain_launches(ms)
        chain = median_ms(chained(run, n), reps) / n
        tf = f" {flops / ms / 1e9:.0f} TF/s" if flops else ""
        print(f"{label}: {ms:.4f} ms{tf}, chain {chain:.4f} ms ({n} calls)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
