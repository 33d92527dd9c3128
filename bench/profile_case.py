"""One grouped GEMM configuration of a V4-Pro rank, launched a few times, for a profiler (ncu) to read, or timed
(--time: median CUDA-graph replay) to compare kernel variants on one machine.

    ncu --clock-control none -k regex:grouped_gemm_kernel --launch-skip 1 --launch-count 1 \
        python bench/profile_case.py --layer l1 --m 2048 [--block-n 128 --block-m 256]
    python bench/profile_case.py --layer l1 --m 32 --time
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_experts import (DEV, E, H, I, graphed, median_ms, offsets_for, random_nvfp4_weights,  # noqa: E402
                                 spread_counts)
from ep_runtime import ops  # noqa: E402
from ep_runtime.cuda_experts import block_n_covering  # noqa: E402
from ep_runtime.sm90_layout import gate_up_row_order, tile_stack_  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layer", choices=("l1", "l2"), default="l1")
    p.add_argument("--m", type=int, default=1, help="tokens per active expert")
    p.add_argument("--active", type=int, default=E, help="active experts, spread evenly (the sparse case: 6)")
    p.add_argument("--block-n", type=int, default=0, help="0: the narrowest tile holding an expert's m slots")
    p.add_argument("--block-m", type=int, default=0, help="0: what the kernel picks")
    p.add_argument("--launches", type=int, default=3)
    p.add_argument("--time", action="store_true", help="print the median graph-replay time and TFLOP/s")
    args = p.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    counts = spread_counts(args.m, args.active)
    s = sum(counts)
    offsets = offsets_for(counts)
    bn = args.block_n or block_n_covering(args.m)
    if args.layer == "l1":
        w = random_nvfp4_weights(E, 2 * I, H, gen)
        tile_stack_(w[0], w[1], gate_up_row_order(I, DEV))
        x = torch.randn(s, H, device=DEV, generator=gen).to(torch.bfloat16)
        h = torch.empty(s, I, dtype=torch.bfloat16, device=DEV)
        slot_pair = torch.arange(s, dtype=torch.int32, device=DEV)
        run = lambda: ops.grouped_l1(w[0], w[1], w[2], x, None, offsets, slot_pair, 1, "bf16",  # noqa: E731
                                     swiglu_limit=10.0, h_bf16=h, block_n=bn, block_m=args.block_m)
    else:
        w = random_nvfp4_weights(E, H, I, gen)
        tile_stack_(w[0], w[1])
        h = torch.randn(s, I, device=DEV, generator=gen).to(torch.bfloat16)
        y = torch.empty(s, H, device=DEV)
        run = lambda: ops.grouped_l2(w[0], w[1], w[2], h, None, offsets, y, bn, args.block_m)  # noqa: E731
    for _ in range(args.launches):
        run()
    torch.cuda.synchronize()
    if args.time:
        n, k = (2 * I, H) if args.layer == "l1" else (H, I)
        ms = median_ms(graphed(run), 20)
        print(f"{args.layer} m={args.m} active={args.active} block_n={bn} "
              f"block_m={args.block_m}: {ms:.4f} ms, "
              f"{2 * s * n * k / ms / 1e9:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
