"""Grouped expert GEMMs on one GPU: ours (W4A16, W4A4) vs torch._grouped_mm on BF16 weights vs two per-expert
loops of matmuls, against the FP4 weight-byte floor. Ours reads the same weights re-tiled (sm90_layout). The loop
`loop_nvfp4` is the design being replaced: a Python loop over the experts that dequantizes each expert's NVFP4
weights to BF16 (exactly, by our kernel, into one reused buffer) and multiplies with torch.mm; `loop` multiplies BF16
copies of the weights made beforehand, a loop that needs 4x the weight memory. `ogs` is the issue's bar kernel,
triton_kernels' matmul_ogs on MXFP4 weights (bench/bar_ogs.py), when that package is importable.

V4-Pro per-rank shapes: E=48 local experts, L1 N=2I=6144 K=H=7168, L2 N=H=7168 K=I=3072; m tokens per active
expert with all 48 active, plus a sparse decode case (6 of 48 experts active, m=1). Times are medians of CUDA
events around CUDA-graph replays (eager medians too). The baseline is the torch._grouped_mm call alone (its output
left in the tensor it allocates; grouped_mm_copy_graph_ms is the older timing that also copied it out). Weights
(1.8 GB packed, 6.3 GB BF16) are far larger than L2, and every call streams all active experts' weights, so no
input rotation is needed. The graph replays of ours and the baselines are timed in rounds (the order rotating), and
each speedup is the median over rounds of the ratio within a round. Ours and torch._grouped_mm are also timed as
chains of launches in one graph (per call: the cost inside a model's graph, with ours' programmatic dependent
launch; ours once more with it off).

    python bench/bench_experts.py --out $OUT/experts.json [--quick] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bar_ogs import MxfpExperts  # noqa: E402
from ep_runtime import cuda_graphs, ops  # noqa: E402
from ep_runtime.cuda_experts import block_n_covering  # noqa: E402
from ep_runtime.nvfp4 import NVFP4Tensor  # noqa: E402
from ep_runtime.provenance import provenance  # noqa: E402
from ep_runtime.sm90_layout import gate_up_row_order, tile_stack_  # noqa: E402

E, H, I = 48, 7168, 3072
LOOPS = ("loop", "loop_nvfp4")  # host loops over the experts: timed eagerly only
COLUMNS = ("ours_w4a16", "ours_w4a4", "grouped_mm", "ogs", *LOOPS)  # timed per layer
CHAINED = ("ours_w4a16", "ours_w4a4", "grouped_mm", "ogs")  # also timed as chains of launches in one graph
RATIOED = ("ours_w4a16", "ours_w4a4", "ogs")  # each over torch._grouped_mm
CHAIN_MS = 4.0
DEV = torch.device("cuda")


def median_ms(fn, reps: int, warmup: int = 3, warm_ms: float = 50.0) -> float:
    """Median of reps timed calls, after at least `warmup` calls and `warm_ms` of running: a short kernel timed
    right after a stretch of host-bound work otherwise meets a GPU still raising its clocks (measured: the same
    sparse-decode kernel 0.084 ms first, 0.072 ms later in one run)."""
    start = time.perf_counter()
    done = 0
    while done < warmup or (time.perf_counter() - start) * 1e3 < warm_ms:
        fn()
        done += 1
        if done % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2]


def gpu_state() -> dict:
    """Temperature, SM clock and power draw now (nvidia-smi), recorded before each layer's timings: at m >= 32 the
    board runs near its power cap, so our compute-heavy kernels' times follow the GPU's state (NOTES_experts.md)."""
    gpu = f"GPU-{torch.cuda.get_device_properties(DEV).uuid}"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=temperature.gpu,clocks.sm,power.draw",
                              "--format=csv,noheader,nounits", f"--id={gpu}"],
                             capture_output=True, text=True, check=True, timeout=10).stdout.split(",")
        return {"temp_c": float(out[0]), "sm_mhz": float(out[1]), "power_w": float(out[2])}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def graphed(fn):
    """Captures fn once (after a warm-up on a side stream) and returns the replay."""
    return cuda_graphs.capture(fn, warmup=1).replay


def chained(fn, launches: int):
    """One graph of `launches` back-to-back calls, replayed (the caller divides by `launches`): what a call costs
    inside a model's graph, where each kernel's launch (and, with programmatic dependent launch, its prologue)
    overlaps the end of the kernel before it. A replay of a one-call graph between two events pays a whole launch
    and the event boundary every call. triton.testing.do_bench_cudagraph times chains like this."""
    def run():
        for _ in range(launches):
            fn()
    return graphed(run)


def chain_launches(single_ms: float) -> int:
    """Calls per chain: about CHAIN_MS of work, at least 2, at most 64."""
    return max(2, min(64, math.ceil(CHAIN_MS / single_ms)))


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return 2 * (1 << 30) / median_ms(lambda: dst.copy_(src), 10) / 1e6


def random_nvfp4_weights(e: int, n: int, k: int, gen: torch.Generator):
    data = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device=DEV, generator=gen)
    scale = torch.exp2(torch.rand(e, n, k // 16, device=DEV, generator=gen) * 8 - 4).to(torch.float8_e4m3fn)
    alpha = torch.full((e, 2) if n == 2 * I else (e,), 1e-3, device=DEV)
    return data, scale, alpha


@dataclass
class Baselines:
    """What the baselines read, per layer: BF16 copies of the weights (torch._grouped_mm and the BF16 loop), the
    NVFP4 (data, scale) in the checkpoint's row layout (the NVFP4 loop) and the bar's MXFP4 experts (None, with
    bar_error saying why, where triton_kernels is missing or fails)."""
    w13_bf16: torch.Tensor
    w2_bf16: torch.Tensor
    w13_rows: tuple[torch.Tensor, torch.Tensor]
    w2_rows: tuple[torch.Tensor, torch.Tensor]
    w13_mx: MxfpExperts | None = None
    w2_mx: MxfpExperts | None = None
    bar_error: str = ""


def rank_weights(gen: torch.Generator, baselines: bool = False):
    """One V4-Pro rank's random NVFP4 experts, (data, scale, alpha) for L1 (rows [gate; up]) and L2, re-tiled in place
    into the kernels' layout; with baselines also what the baselines read (made from the row layout first)."""
    w13 = random_nvfp4_weights(E, 2 * I, H, gen)
    w2 = random_nvfp4_weights(E, H, I, gen)
    base = None
    if baselines:
        base = Baselines(dequant_bf16(w13[0], w13[1]), dequant_bf16(w2[0], w2[1]),
                         (w13[0].clone(), w13[1].clone()), (w2[0].clone(), w2[1].clone()))
        try:
            base.w13_mx, base.w2_mx = MxfpExperts(base.w13_bf16), MxfpExperts(base.w2_bf16)
        except Exception as exc:  # the bar is optional: its column records why it is missing
            base.bar_error = failure(exc)
    tile_stack_(w13[0], w13[1], gate_up_row_order(I, DEV))
    tile_stack_(w2[0], w2[1])
    return w13, w2, base


def dequant_bf16(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """BF16 (E, N, K) weights for the baselines, one expert at a time (decode*sf, exact in BF16)."""
    out = torch.empty(*data.shape[:-1], data.shape[-1] * 2, dtype=torch.bfloat16, device=DEV)
    for e in range(data.shape[0]):
        ops.nvfp4_dequant_rows(data[e], scale[e], out[e])
    return out


def spread_counts(m: int, active: int = E) -> list[int]:
    """Tokens per local expert: m for `active` experts spread evenly over the E, 0 for the rest."""
    stride = E // active
    return [m if e % stride == 0 and e // stride < active else 0 for e in range(E)]


def offsets_for(counts: list[int]) -> torch.Tensor:
    o = [0]
    for c in counts:
        o.append(o[-1] + c)
    return torch.tensor(o, dtype=torch.int32, device=DEV)


class OurCalls:
    """Our kernels on one case's slots (topk=1: slot s is token s), their inputs and outputs made once. Each call
    takes the slot tile width and weight rows per tile (0: the kernel picks); L1 has the runtime's K split of
    launches of few tiles (split["max_pieces"]: 0 the kernel's choice, 1 none)."""

    def __init__(self, counts: list[int], w13, w2, gen: torch.Generator):
        s = sum(counts)
        self.slots, self.w13, self.w2 = s, w13, w2
        self.offsets = offsets_for(counts)
        self.slot_pair = torch.arange(s, dtype=torch.int32, device=DEV)
        self.x = torch.randn(s, H, device=DEV, generator=gen).to(torch.bfloat16)
        self.xq = NVFP4Tensor(
            torch.randint(0, 256, (s, H // 2), dtype=torch.uint8, device=DEV, generator=gen),
            torch.exp2(torch.rand(s, H // 16, device=DEV, generator=gen) * 4 - 2).to(torch.float8_e4m3fn),
            torch.ones((), device=DEV))
        self.x_deq = torch.empty(s, H, dtype=torch.bfloat16, device=DEV)
        self.x_gs = torch.ones(1, device=DEV)
        self.h_bf16 = torch.empty(s, I, dtype=torch.bfloat16, device=DEV)
        self.hq_data = torch.empty(s, I // 2, dtype=torch.uint8, device=DEV)
        self.hq_scale = torch.empty(s, I // 16, dtype=torch.float8_e4m3fn, device=DEV)
        self.h_gs = torch.full((E,), 300.0, device=DEV)
        self.h_in = torch.randn(s, I, device=DEV, generator=gen).to(torch.bfloat16)
        self.y_slot = torch.empty(s, H, device=DEV)
        sums, arrivals = ops.split_workspace(DEV)
        self.split = dict(split_sums=sums, split_arrivals=arrivals, max_pieces=0)

    def l1_w4a16(self, bn: int, bm: int = 0) -> None:
        ops.grouped_l1(*self.w13, self.x, None, self.offsets, self.slot_pair, 1, "bf16", swiglu_limit=10.0,
                       h_bf16=self.h_bf16, block_n=bn, block_m=bm, **self.split)

    def l1_w4a4(self, bn: int, bm: int = 0) -> None:
        """W4A4 L1 with its activations' dequantization (a second launch)."""
        ops.nvfp4_dequant_rows(self.xq.data, self.xq.scale, self.x_deq)
        ops.grouped_l1(*self.w13, self.x_deq, self.x_gs, self.offsets, self.slot_pair, 1, "nvfp4",
                       swiglu_limit=10.0, h_gs=self.h_gs, hq_data=self.hq_data, hq_scale=self.hq_scale,
                       h_bf16=self.h_bf16, block_n=bn, block_m=bm, **self.split)

    def l2(self, bn: int, bm: int = 0) -> None:
        ops.grouped_l2(*self.w2, self.h_in, self.h_gs, self.offsets, self.y_slot, bn, bm)


def bench_case(name: str, counts: list[int], w13, w2, base: Baselines, copy_gbs: float, reps: int,
               rounds: int, gen: torch.Generator, sweep: bool) -> dict:
    ours = OurCalls(counts, w13, w2, gen)
    s, x, h_in = ours.slots, ours.x, ours.h_in
    active = sum(c > 0 for c in counts)
    ends = ours.offsets[1:].contiguous()
    # the narrowest tile that holds every expert's slots: this bench's counts are exact (the stage, which knows only
    # routing totals, leaves room for routing's fluctuation: cuda_experts.default_block_n)
    block_n = block_n_covering(max(counts))
    gu_ref = torch.empty(s, 2 * I, dtype=torch.bfloat16, device=DEV)
    y_ref = torch.empty(s, H, dtype=torch.bfloat16, device=DEV)
    host_offs = ours.offsets.tolist()

    def grouped_mm(a, wb):
        return lambda: torch._grouped_mm(a, wb.transpose(-2, -1), offs=ends)

    def grouped_mm_copy(a, wb, out):
        # The baseline as every result file up to commit 0e75df0 timed it: the product also copied into a
        # preallocated tensor, a read and write of the output that torch._grouped_mm does not need. Timed beside the
        # fair baseline so that those files' ratios can be related to the new ones (they flatter ours).
        product = grouped_mm(a, wb)
        return lambda: out.copy_(product())

    def loop(a, weight_of, out):
        """A Python loop over the experts with tokens: torch.mm of each one's rows by weight_of(e) (BF16, N x K)."""
        def run():
            for e in range(E):
                lo, hi = host_offs[e], host_offs[e + 1]
                if hi > lo:
                    torch.mm(a[lo:hi], weight_of(e).t(), out=out[lo:hi])
        return run

    def dequantized(rows):
        """weight_of for the NVFP4 loop: expert e's weights dequantized into one buffer, reused by every expert."""
        data, scale = rows
        w = torch.empty(data.shape[1], 2 * data.shape[2], dtype=torch.bfloat16, device=DEV)

        def weight_of(e: int) -> torch.Tensor:
            ops.nvfp4_dequant_rows(data[e], scale[e], w)
            return w
        return weight_of

    bar_l1, check_l1 = bar_column(base.w13_mx, base.bar_error, x, counts)
    bar_l2, check_l2 = bar_column(base.w2_mx, base.bar_error, h_in, counts)
    layers = {
        "L1": dict(n=2 * I, k=H, ours_w4a16=partial(ours.l1_w4a16, block_n), ours_w4a4=partial(ours.l1_w4a4, block_n),
                   grouped_mm=grouped_mm(x, base.w13_bf16), ogs=bar_l1, bar_check=check_l1,
                   grouped_mm_copy=grouped_mm_copy(x, base.w13_bf16, gu_ref),
                   loop=loop(x, base.w13_bf16.__getitem__, gu_ref),
                   loop_nvfp4=loop(x, dequantized(base.w13_rows), gu_ref),
                   fp4_bytes=w13[0][0].numel() + w13[1][0].numel()),
        "L2": dict(n=H, k=I, ours_w4a16=partial(ours.l2, block_n), ours_w4a4=partial(ours.l2, block_n),
                   grouped_mm=grouped_mm(h_in, base.w2_bf16), ogs=bar_l2, bar_check=check_l2,
                   grouped_mm_copy=grouped_mm_copy(h_in, base.w2_bf16, y_ref),
                   loop=loop(h_in, base.w2_bf16.__getitem__, y_ref),
                   loop_nvfp4=loop(h_in, dequantized(base.w2_rows), y_ref),
                   fp4_bytes=w2[0][0].numel() + w2[1][0].numel()),
    }
    result = {"case": name, "tokens_per_active_expert": max(counts), "active_experts": active, "slots": s,
              "block_n": block_n}
    for layer, d in layers.items():
        floor_ms = active * d["fp4_bytes"] / (copy_gbs * 1e6)
        flops = 2.0 * s * d["n"] * d["k"]
        row = {"fp4_floor_ms": floor_ms, "gpu_state_before": gpu_state(), **d["bar_check"]}
        graphs = {}
        for col in COLUMNS:
            try:
                row[f"{col}_eager_ms"] = median_ms(d[col], reps)
                if col not in LOOPS:
                    graphs[col] = graphed(d[col])
            except Exception as exc:  # a baseline this torch build lacks is recorded, not fatal
                row[f"{col}_error"] = failure(exc)
        if "grouped_mm" in graphs:  # the same call plus a copy: it runs wherever the baseline did
            graphs["grouped_mm_copy"] = graphed(d["grouped_mm_copy"])
        # Chains (per call, divided below); ours also with programmatic dependent launch off, which is what it buys.
        chains = {f"{col}_chain": (col, True) for col in CHAINED if col in graphs}
        if "ours_w4a16" in graphs:
            chains["ours_w4a16_nopdl_chain"] = ("ours_w4a16", False)
        launches = {}
        for col, (call, pdl) in chains.items():
            launches[col] = chain_launches(row[f"{call}_eager_ms"])
            with ops.programmatic_launch(pdl):  # the graph keeps what it was captured with
                graphs[col] = chained(d[call], launches[col])
        # Graph replays in rounds, each starting one column later: at m >= 32 the board runs near its power cap and
        # a column's time follows the GPU's state, which drifts within a run (NOTES_experts.md), so each
        # ratio is taken within a round and the median over rounds is reported, beside every round's times.
        cols = list(graphs)
        per_round = {col: [] for col in cols}
        for r in range(rounds):
            for i in range(len(cols)):
                col = cols[(i + r) % len(cols)]
                per_round[col].append(median_ms(graphs[col], reps) / launches.get(col, 1))
        for col, times in per_round.items():
            kind = "ms" if col in launches else "graph_ms"  # a chain's times are per call already
            row[f"{col}_{kind}_rounds"] = times
            row[f"{col}_{kind}"] = statistics.median(times)
        for col, n in launches.items():
            row[f"{col}_launches"] = n
        for col in COLUMNS:
            t = row.get(f"{col}_graph_ms", row.get(f"{col}_eager_ms"))
            if t is None:
                continue
            row[f"{col}_tflops"] = flops / t / 1e9
            if col.startswith("ours"):
                row[f"{col}_weight_gbs"] = active * d["fp4_bytes"] / t / 1e6
        for col in RATIOED:
            row.update(speedups(per_round, col, "grouped_mm"))
        row.update(speedups(per_round, "ours_w4a16", "ogs"))
        for col in ("ours_w4a16", "ours_w4a4"):
            for loop_col in LOOPS:
                if col in per_round and row.get(f"{loop_col}_eager_ms"):
                    row[f"{col}_speedup_vs_{loop_col}"] = row[f"{loop_col}_eager_ms"] / row[f"{col}_graph_ms"]
        if "ours_w4a16_nopdl_chain" in per_round:
            row["programmatic_launch_speedup"] = statistics.median(
                o / t for o, t in zip(per_round["ours_w4a16_nopdl_chain"], per_round["ours_w4a16_chain"]))
        if sweep:  # tile shapes worth trying at this m (narrow slot tiles re-read weights per slot tile)
            fn = ours.l1_w4a16 if layer == "L1" else ours.l2
            widths = [b for b in ops.BLOCK_NS if max(counts) <= 16 * b]
            row["ours_w4a16_graph_ms_by_tile"] = {
                f"bn{b}_bm{m}": median_ms(graphed(lambda b=b, m=m: fn(b, m)), reps)
                for b in widths for m in (64, 128, 256) if m < 256 or b >= ops.MIN_WIDE_BLOCK_N}
        result[layer] = row
    return result


def failure(exc: Exception) -> str:
    """How the JSON records what an optional baseline raised."""
    return f"{type(exc).__name__}: {exc}"[:300]


def bar_column(mx: MxfpExperts | None, why_missing: str, a: torch.Tensor, counts: list[int]):
    """The bar kernel's call on a's rows and its check against its own weights (the JSON keys it adds), so that no
    broken call is timed unnoticed. Where the bar cannot run, a call that raises why, which the column records as its
    error, and no check."""
    if mx is None:
        return unavailable(why_missing), {}
    try:
        run = mx.call(a, counts)
    except Exception as exc:  # the bar is optional: its column records why it is missing
        return unavailable(failure(exc)), {}
    try:
        return run, {"ogs_rel_l2_vs_its_weights": mx.rel_l2(a, counts)}
    except Exception as exc:  # a check that cannot run is recorded beside the bar's timings, not fatal
        return run, {"ogs_rel_l2_error": failure(exc)}


def unavailable(reason: str):
    """A call standing in for the bar kernel that cannot run: it raises why."""
    def run():
        raise RuntimeError(f"the bar kernel is unavailable: {reason}")
    return run


def cell(d: dict, key: str, width: int, digits: int) -> str:
    """d[key] right-aligned in `width` columns, or '-' where the run has no such number."""
    v = d.get(key)
    return f"{v:{width}.{digits}f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"


def speedups(per_round: dict[str, list[float]], col: str, over: str) -> dict[str, float]:
    """Median over rounds of over's time / col's time, for single replays and for chains, where both ran."""
    return {f"{col}{suffix}_speedup_vs_{over}": statistics.median(
                b / t for b, t in zip(per_round[over + suffix], per_round[col + suffix]))
            for suffix in ("", "_chain") if col + suffix in per_round and over + suffix in per_round}


def sparse_ratios(results: list[dict]) -> dict:
    """The sparse case's time over its experts' share (6/48) of the all-active m=1 time, per layer and timing."""
    by_case = {r["case"]: r for r in results}
    sparse, full = by_case.get("sparse6_m1"), by_case.get("all48_m1")
    if not sparse or not full:
        return {}
    share = sparse["active_experts"] / full["active_experts"]
    return {f"{layer}_{key}": sparse[layer][key] / (share * full[layer][key])
            for layer in ("L1", "L2") for key in ("ours_w4a16_graph_ms", "ours_w4a16_chain_ms")
            if key in sparse[layer] and key in full[layer]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="m in {1, 8} only")
    p.add_argument("--sweep", action="store_true", help="also time every slot tile width (block_n)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of graph-replay timings per layer (median reported)")
    args = p.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    w13, w2, base = rank_weights(gen, baselines=True)
    ms = [1, 8] if args.quick else [1, 8, 32, 128, 512, 2048]
    cases = [(f"all48_m{m}", spread_counts(m)) for m in ms]
    cases.append(("sparse6_m1", spread_counts(1, 6)))
    results = []
    for name, counts in cases:
        reps = 10 if max(counts) >= 512 else 30
        r = bench_case(name, counts, w13, w2, base, copy_gbs, reps, args.rounds, gen, args.sweep)
        results.append(r)
        print(json.dumps(r), flush=True)
    doc = {**provenance(), "copy_gbs_read_plus_write": copy_gbs, "graph_rounds": args.rounds,
           "shapes": {"E": E, "H": H, "I": I}, "sparse_over_active_share": sparse_ratios(results), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"\n{doc['gpu']}  copy {copy_gbs:.0f} GB/s")
    for r in results:
        for layer in ("L1", "L2"):
            sw = r[layer].get("ours_w4a16_graph_ms_by_tile")
            if sw:
                print(r["case"], layer, "tile sweep (ms):", {b: round(v, 3) for b, v in sw.items()})
    print("sparse over its share of all-active:", {k: round(v, 3) for k, v in doc["sparse_over_active_share"].items()})
    print(f"{'case':<13}{'layer':<4}{'floor':>8}{'w4a16':>8}{'w4a4':>8}{'gmm':>8}{'loop':>8}{'loopq':>8}"
          f"{'x_gmm':>7}{'x_loop':>7}{'x_lpq':>7}{'GB/s':>7}{'TF/s':>6}{'chain':>8}{'x_gmm':>7}{'x_pdl':>7}")
    for r in results:
        for layer in ("L1", "L2"):
            d = r[layer]
            ms = [cell(d, k, 8, 3) for k in ("fp4_floor_ms", "ours_w4a16_graph_ms", "ours_w4a4_graph_ms",
                                             "grouped_mm_graph_ms", "loop_eager_ms", "loop_nvfp4_eager_ms")]
            x = [cell(d, f"ours_w4a16_speedup_vs_{b}", 7, 2) for b in ("grouped_mm", *LOOPS)]
            print(f"{r['case']:<13}{layer:<4}{''.join(ms)}{''.join(x)}{d.get('ours_w4a16_weight_gbs', 0):7.0f}"
                  f"{d.get('ours_w4a16_tflops', 0):6.0f}{cell(d, 'ours_w4a16_chain_ms', 8, 3)}"
                  f"{cell(d, 'ours_w4a16_chain_speedup_vs_grouped_mm', 7, 2)}"
                  f"{cell(d, 'programmatic_launch_speedup', 7, 2)}")
    print("\nthe bar (triton_kernels matmul_ogs, MXFP4): ms, x_gmm single / chain, ours W4A16 over it single / chain")
    for r in results:
        for layer in ("L1", "L2"):
            d = r[layer]
            if "ogs_graph_ms" not in d:
                print(r["case"], layer, d.get("ogs_error", "-"))
                continue
            x = [cell(d, k, 7, 2) for k in ("ogs_speedup_vs_grouped_mm", "ogs_chain_speedup_vs_grouped_mm",
                                             "ours_w4a16_speedup_vs_ogs", "ours_w4a16_chain_speedup_vs_ogs")]
            rel = d.get("ogs_rel_l2_vs_its_weights")
            check = f"rel-L2 {rel:.1e}" if rel is not None else d.get("ogs_rel_l2_error", "-")
            print(f"{r['case']:<13}{layer:<4}{cell(d, 'ogs_graph_ms', 8, 3)}{''.join(x)}  {check}")


if __name__ == "__main__":
    main()
