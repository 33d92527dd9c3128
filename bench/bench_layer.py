"""Whole MoE layer latency, V4-Pro shape (384 experts / W per rank), eager vs CUDA graph, per-stage breakdown.

    python bench/bench_layer.py                          # one GPU
    torchrun --nproc-per-node N bench/bench_layer.py     # N GPUs, one rank each

Every rank runs the same fixed number of iterations (collectives must pair up). Stage times come from CUDA events
recorded between the stages of eager forwards (EPMoE.stage_marker); on the GPU the shared expert runs on its own stream
beside routing and the routed experts, whose combine waits for it and adds its output, so what is left of it after them
counts in the experts stage. The graph is timed twice: as the runtime captures it, and captured with the kernels'
programmatic dependent launch off (graph_nopdl_ms). The eager forward and the graphs are timed in rounds that rotate
their order (medians of all rounds). With --kernels each row also lists the GPU time of every kernel in
one CUDA-graph replay (torch.profiler); kernels on different streams overlap, so their sum can exceed the replay. With
--chain N it also times one graph of N layers in a row (the model's next layers, sharing the first one's scratch, each
reading the previous one's output), as a model runs them: chain_graph_ms, for all N. With --compile it also times the
N layers in a row compiled by torch.compile with CUDA graphs (compiled_graph_ms, for all N: the graph trees' replay
with their host work and input copy), after all the rest (in a probe on one H200, eager forwards timed between
compiled replays read 0.55-0.7 ms at one token against 0.37 before; the cause was not found). --token-mode dp runs
data-parallel attention's layer: each rank its own --tokens, every rank's run through its experts.
Writes JSON (GPU name, date, commit) to $OUT or bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

from ep_runtime import cuda_graphs, ops
from ep_runtime.config import load_config
from ep_runtime.dist_utils import init_process_group
from ep_runtime.moe import STAGES, EPMoE
from ep_runtime.provenance import provenance


def _events_ms(fn, iters: int) -> list[float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _rotating_ms(modes: dict, iters: int, rounds: int = 4) -> dict[str, float]:
    """The median of each mode's iters timings, taken in rounds that rotate the modes' order: the GPU's clock drifts
    as it warms up under load (at 1024 tokens on one H200 graphs timed after the eager forwards read 6 % slower than
    eager, and 5 % faster in rotation), and every rank runs the same calls in the same order."""
    times: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name] += _events_ms(modes[name], -(-iters // rounds))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _stage_breakdown(moe: EPMoE, x: torch.Tensor, iters: int) -> dict[str, float]:
    # the stages are moe.STAGES (result files before 2026-11-29 say all_reduce for finalize; before 9bd48e5 they have
    # no checks or shared_expert: routing held the shared expert's launch)
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    for _ in range(iters):
        events = [("start", torch.cuda.Event(enable_timing=True))]
        events[0][1].record()

        def mark(name: str) -> None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.append((name, ev))

        moe.stage_marker = mark
        moe(x, check=False)
        moe.stage_marker = lambda name: None
        events[-1][1].synchronize()
        for (_, a), (name, b) in zip(events, events[1:]):
            per_stage[name].append(a.elapsed_time(b))
    return {s: statistics.median(v) for s, v in per_stage.items() if v}


def _graph_kernels_us(replay, iters: int) -> dict[str, float]:
    """GPU microseconds per replay of each kernel the graph launches (summed over its launches), longest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            replay()
        torch.cuda.synchronize()
    kernels = {e.key: e.device_time_total / iters for e in prof.key_averages() if e.device_time_total > 0}
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1]))


def _in_a_row(layers: list[EPMoE]):
    """The layers' forward in a row, each reading the previous one's output, as a model runs them."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        for moe in layers:
            x = moe(x, check=False)
        return x

    return forward


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,16,128,1024,8192")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--act-mode", default="nvfp4", choices=("nvfp4", "bf16"))
    p.add_argument("--token-mode", default="replicated", choices=("replicated", "dp"),
                   help="dp: --tokens counts each rank's own tokens (the experts see world_size times as many)")
    p.add_argument("--kernels", action="store_true", help="per-kernel GPU time of one graph replay (profiler)")
    p.add_argument("--chain", type=int, default=1,
                   help="also time one graph of this many layers in a row, sharing one scratch (as in a model)")
    p.add_argument("--compile", action="store_true",
                   help="also time the layers (--chain) compiled by torch.compile with CUDA graphs (reduce-overhead)")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    tokens = [int(t) for t in args.tokens.split(",")]
    cfg = load_config("deepseek_v4_pro", [f"world_size={world}", f"max_tokens={max(tokens)}",
                                          "backend=cuda", f"act_mode={args.act_mode}", "act_scale=static",
                                          f"token_mode={args.token_mode}"])
    init_process_group(device, cfg.runtime.barrier_timeout_s)
    layer = cfg.model.num_hash_layers  # the first top-k routed layer (hash layers need token ids)
    moe = EPMoE.from_synthetic(cfg, layer, rank, world, device=device)
    # The chain's other layers: the model's next layers' weights, the first layer's scratch.
    chain = [moe] + [EPMoE.from_synthetic(cfg, layer + i, rank, world, device=device, scratch=moe.scratch)
                     for i in range(1, args.chain)]
    if world > 1:
        dist.barrier()
    rows, inputs = [], []  # the inputs again for the compiled layers
    g = torch.Generator(device=device).manual_seed(1234 + (rank if args.token_mode == "dp" else 0))
    with torch.inference_mode():
        for t in tokens:
            x = torch.randn(t, cfg.model.hidden_size, generator=g, device=device).to(torch.bfloat16)
            for _ in range(3):
                moe(x, check=False)
            stages = _stage_breakdown(moe, x, args.iters)
            # The same layer also captured with the kernels' programmatic dependent launch off (what it buys per layer).
            with ops.programmatic_launch(False):
                captured_nopdl = moe.capture(x)
            captured = moe.capture(x)
            modes = {"eager": lambda: moe(x, check=False), "graph": captured.replay,
                     "graph_nopdl": captured_nopdl.replay}
            if len(chain) > 1:
                forward = _in_a_row(chain)
                modes["chain_graph"] = cuda_graphs.capture(lambda: forward(x)).replay
            times = _rotating_ms(modes, args.iters)
            eager, graph, graph_nopdl = times["eager"], times["graph"], times["graph_nopdl"]
            row = {"tokens": t, **{f"{name}_ms": ms for name, ms in times.items()}, "stages_ms": stages}
            if args.kernels:
                row["graph_kernels_us"] = _graph_kernels_us(captured.graph.replay, args.iters)  # no ep_moe.replay range
            del captured, captured_nopdl, modes
            rows.append(row)
            inputs.append(x)
            if rank == 0:
                print(f"T={t:5d}  eager {eager:8.3f} ms  graph {graph:8.3f} ms (no PDL {graph_nopdl:.3f})  " +
                      "  ".join(f"{k} {v:.3f}" for k, v in stages.items()), flush=True)
                if len(chain) > 1:
                    per_layer = row["chain_graph_ms"] / len(chain)
                    print(f"         {len(chain)} layers in one graph {row['chain_graph_ms']:.3f} ms: "
                          f"{per_layer:.3f} ms per layer", flush=True)
                if args.kernels:
                    kernels = row["graph_kernels_us"]
                    top = "; ".join(f"{name[:60]} {us:.1f}" for name, us in list(kernels.items())[:8])
                    busy = sum(kernels.values())
                    print(f"         kernels {busy:.1f} us busy of {graph * 1e3:.1f}: {top}", flush=True)
        if args.compile:  # after everything else: a probe's eager forwards read slower after compiled replays
            # One compiled callable for every token count: Dynamo traces again for the second count (then with a
            # dynamic one), and the CUDA graph trees record a graph per count.
            compiled = torch.compile(_in_a_row(chain), fullgraph=True, mode="reduce-overhead")
            for x, row in zip(inputs, rows):
                for _ in range(3):  # warm-up, capture, a replay
                    compiled(x)
                row["compiled_graph_ms"] = statistics.median(_events_ms(lambda: compiled(x), args.iters))
                if rank == 0:
                    print(f"T={row['tokens']:5d}  {len(chain)} layers compiled with CUDA graphs "
                          f"{row['compiled_graph_ms']:.3f} ms: {row['compiled_graph_ms'] / len(chain):.3f} ms per "
                          f"layer", flush=True)
    if rank == 0:
        result = {"benchmark": "layer", **provenance(device), "world_size": world,
                  "experts_per_rank": cfg.experts_per_rank, "act_mode": args.act_mode, "act_scale": "static",
                  "token_mode": args.token_mode,
                  "hidden": cfg.model.hidden_size, "moe_intermediate": cfg.model.moe_intermediate_size,
                  "topk": cfg.model.num_experts_per_tok, "max_tokens": cfg.runtime.max_tokens,
                  "scratch_bytes": moe.scratch.nbytes(), "chain_layers": len(chain), "compiled": args.compile,
                  "iters": args.iters,
                  "rows": rows}
        out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
        gpu = torch.cuda.get_device_name(device).replace(" ", "_")
        mode = "" if args.token_mode == "replicated" else f"_{args.token_mode}"
        path = os.path.join(out_dir, f"layer_{world}x{gpu}_{args.act_mode}{mode}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
