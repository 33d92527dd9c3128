"""Times grouped GEMM cases of a V4-Pro rank in one process: graph-replay medians (ms and TFLOP/s), one line each.

    python bench/ab_time.py "l1:128:128:256,l2:1:8:64:6"

A case is layer:m:block_n:block_m[:active]: m tokens on each of `active` (default all 48) experts spread as in
bench_experts.py. bench/ab_variants.sh runs it once per build variant and round; it compares builds, it checks
nothing (the GPU tests do).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_experts import DEV, E, H, I, graphed, median_ms, offsets_for, rank_weights, spread_counts  # noqa: E402
from ep_runtime import ops  # noqa: E402


def main(spec: str) -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    w1, w2, _, _ = rank_weights(gen)
    for case in spec.split(","):
        layer, m, bn, bm, *rest = case.split(":")
        m, bn, bm = int(m), int(bn), int(bm)
        active = int(rest[0]) if rest else E
        counts = spread_counts(m, active)
        s = sum(counts)
        offsets = offsets_for(counts)
        if layer == "l1":
            x = torch.randn(s, H, device=DEV, generator=gen).to(torch.bfloat16)
            h = torch.empty(s, I, dtype=torch.bfloat16, device=DEV)
            slot_pair = torch.arange(s, dtype=torch.int32, device=DEV)
            run = lambda: ops.grouped_l1(w1[0], w1[1], w1[2], x, None, offsets, slot_pair, 1, "bf16",  # noqa: E731
                                         swiglu_limit=10.0, h_bf16=h, block_n=bn, block_m=bm)
            n, k = 2 * I, H
        else:
            h_in = torch.randn(s, I, device=DEV, generator=gen).to(torch.bfloat16)
            y = torch.empty(s, H, device=DEV)
            run = lambda: ops.grouped_l2(w2[0], w2[1], w2[2], h_in, None, offsets, y, bn, bm)  # noqa: E731
            n, k = H, I
        label = f"{layer} m={m} active={active} bn={bn} bm={bm}"
        try:
            run()
            torch.cuda.synchronize()
        except Exception as exc:  # a variant that cannot run a case is reported, and the others still run
            print(f"{label}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        ms = median_ms(graphed(run), 20 if m < 2048 else 7)
        print(f"{label}: {ms:.4f} ms {2 * s * n * k / ms / 1e9:.0f} TF/s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
