"""All-reduce of the MoE output (T x 7168 bf16) across the GPUs of one node: ours vs NCCL vs torch symm-mem.

    torchrun --nproc-per-node N bench/bench_allreduce.py [--iters 30] [--reps 20]

Every rank runs the same FIXED number of iterations (never adaptive: ranks that pick different counts
deadlock). Each iteration replays a CUDA graph of `reps` back-to-back all-reduces and is timed with CUDA
events, so the numbers are GPU time per all-reduce, free of Python launch overhead; the column `ours_eager`
is the same op launched from Python each time (what an un-captured forward pays). Reported: median over
iterations of the slowest rank. NVLink floor: every GPU must receive 2(W-1)/W of the tensor (reduce-scatter
plus all-gather) at the nominal 450 GB/s per direction of an H100 SXM's NVLink 4.

Writes JSON (GPU name, date, commit, per-size medians, the measured one-shot/two-shot crossover) to
bench/results/allreduce_<W>x<gpu>.json and, when $OUT is set, to $OUT as well.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

for _var, _val in (("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NCCL_NVLS_ENABLE", "0"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_var, _val)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ep_runtime import cuda_graphs
from ep_runtime.provenance import provenance
from ep_runtime.symm import region_bytes
from ep_runtime.symm_torch import TorchSymmBackend  # noqa: E402

H = 7168
NVLINK_BYTES_PER_S = 450e9
SIZES = [1, 16, 32, 64, 128, 256, 512, 1024, 2048, 8192]


def _time_us(fn: Callable[[], None], iters: int, reps: int, warmup: int, use_graph: bool) -> float:
    """Median microseconds per call, max over ranks. `fn` is one collective call on the current stream."""
    if use_graph:
        graph = cuda_graphs.capture(lambda: [fn() for _ in range(reps)], warmup=1)
        step = graph.replay
    else:
        def step() -> None:
            for _ in range(reps):
                fn()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    med = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med.item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="*", default=SIZES)
    args = ap.parse_args()

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    max_t = max(args.sizes)
    be = TorchSymmBackend(device, capacity_bytes=region_bytes([("y", (max_t, H), torch.bfloat16)]))
    y = be.empty("y", (max_t, H), torch.bfloat16)
    plain = torch.empty(max_t, H, dtype=torch.bfloat16, device=device)

    import torch.distributed._symmetric_memory as symm_mem

    tsym = symm_mem.empty(max_t * H, dtype=torch.bfloat16, device=device)
    symm_mem.rendezvous(tsym, dist.group.WORLD)
    group_name = dist.group.WORLD.group_name

    rows = []
    for t in args.sizes:
        n = t * H
        nbytes = n * 2
        y[:t].normal_()
        plain[:t].normal_()
        tsym[:n].normal_()
        yv, pv, sv = y[:t], plain[:t], tsym[:n]
        cases: dict[str, tuple[Callable[[], None], bool]] = {
            "ours_oneshot": (lambda: be.all_reduce_(yv, algo="oneshot"), True),
            "ours_twoshot": (lambda: be.all_reduce_(yv, algo="twoshot"), True),
            "ours_auto": (lambda: be.all_reduce_(yv), True),
            "ours_eager": (lambda: be.all_reduce_(yv), False),
            "nccl": (lambda: dist.all_reduce(pv), True),
            "torch_symm_one_shot": (lambda: torch.ops.symm_mem.one_shot_all_reduce(sv, "sum", group_name), True),
            "torch_symm_two_shot": (lambda: torch.ops.symm_mem.two_shot_all_reduce_(sv, "sum", group_name), True),
        }
        row: dict[str, object] = {"tokens": t, "bytes": nbytes,
                                  "nvlink_floor_us": 2 * (world - 1) / world * nbytes / NVLINK_BYTES_PER_S * 1e6}
        for name, (fn, graph) in cases.items():
            try:
                row[name + "_us"] = _time_us(fn, args.iters, args.reps, args.warmup, graph)
            except Exception as e:  # a baseline that cannot run here is reported, not fatal
                row[name + "_us"] = None
                row[name + "_error"] = f"{type(e).__name__}: {e}"[:300]
                torch.cuda.synchronize()
                dist.barrier()
        be.comm.raise_if_failed()
        rows.append(row)
        if rank == 0:
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                           if not k.endswith("_error")), flush=True)
            for k, v in row.items():
                if k.endswith("_error"):
                    print(f"  {k}: {v}", flush=True)

    crossover = next((r["bytes"] for r in rows if r.get("ours_twoshot_us") is not None
                      and r.get("ours_oneshot_us") is not None and r["ours_twoshot_us"] < r["ours_oneshot_us"]), None)
    if rank == 0:
        gpu = torch.cuda.get_device_name(device)
        result = {"bench": "allreduce", "world_size": world, "gpu": gpu, "hidden": H, "dtype": "bfloat16",
                  **provenance(device), "iters": args.iters, "reps": args.reps,
                  "method": "median over iters of CUDA-event time per call (graph of reps calls), max over ranks",
                  "oneshot_max_bytes_in_use": be.comm.oneshot_max_bytes,
                  "first_size_where_twoshot_wins_bytes": crossover, "rows": rows}
        name = f"allreduce_{world}x{gpu.replace(' ', '_').replace('/', '_')}.json"
        outs = [Path(__file__).resolve().parent / "results"]
        if os.environ.get("OUT"):
            outs.append(Path(os.environ["OUT"]))
        for d in outs:
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(json.dumps(result, indent=1))
        print(f"one-shot/two-shot crossover: two-shot first wins at {crossover} bytes "
              f"(in use: one-shot up to {be.comm.oneshot_max_bytes} bytes)", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
