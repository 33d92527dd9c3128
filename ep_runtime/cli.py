"""The main job: timed expert-parallel MoE layer forwards, checked against the single-process reference.

    python -m ep_runtime.cli                       # tiny config, synthetic checkpoint, 8 CPU ranks
    torchrun --nproc-per-node 4 -m ep_runtime.cli --config deepseek_v4_pro --checkpoint PATH

Without torchrun it spawns runtime.world_size local ranks itself. Rank 0 prints ONE JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from .checkpoint import write_synthetic_checkpoint
from .config import Config, load_config
from .dist_utils import (collective, init_process_group, local_rank_and_size, pick_device, spawn_local,
                         under_torchrun)
from .moe import EPMoE
from .provenance import provenance
from .symm import CpuBackend


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ep_runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="auto",
                   help="built-in config name or YAML path (default: deepseek_v4_pro with one rank per GPU when "
                        "GPUs are visible, else tiny on 8 CPU ranks)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set world_size=4 --set act_mode=bf16")
    p.add_argument("--checkpoint", help="ModelOpt NVFP4 checkpoint dir; default: synthetic (files written for "
                                            "the config on CPU; generated in GPU memory on GPUs)")
    p.add_argument("--graph", action="store_true", help="also time CUDA-graph replays of the layer (GPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-reference", action="store_true", help="skip the single-process reference check")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="level of the ep_runtime log on stderr (info: the chosen backends and buffer capacities)")
    args = p.parse_args(argv)
    # Checked before the job starts its ranks, loads and times anything: either would fail only at its end.
    if args.graph and (args.device == "cpu" or not torch.cuda.is_available()):
        p.error(f"--graph: CUDA-graph replays need a GPU, got --device {args.device} "
                f"({'CUDA is available' if torch.cuda.is_available() else 'no CUDA device is visible'})")
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
    if out_dir and os.environ.get("RANK", "0") == "0" and (os.path.isdir(args.out) or not os.path.isdir(out_dir)):
        p.error(f"--out: expected a file in an existing directory, got {args.out}")  # rank 0 writes it
    return args


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(cfg: Config, device: torch.device, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The hidden states and token ids of a rank: the same on every rank, or in token_mode 'dp' each rank's own."""
    g = torch.Generator().manual_seed(cfg.runtime.seed + (rank if cfg.runtime.token_mode == "dp" else 0))
    m, t = cfg.model, cfg.runtime.tokens
    hidden = torch.randn(t, m.hidden_size, generator=g).to(device, cfg.runtime.torch_dtype)
    ids = torch.randint(0, max(m.vocab_size, 1), (t,), generator=g).to(device) if m.vocab_size else None
    return hidden, ids


def _synthetic_checkpoint(cfg: Config, rank: int, world_size: int) -> str:
    """Rank 0 writes a synthetic checkpoint for the config (sharded by rank); every rank gets its path."""
    path = [tempfile.mkdtemp(prefix="ep_runtime_ckpt_") if rank == 0 else None]
    if rank == 0:
        write_synthetic_checkpoint(path[0], cfg.model, num_layers=cfg.runtime.layer + 1, seed=cfg.runtime.seed,
                                   shards=world_size)
    if world_size > 1:
        with collective("broadcast of the synthetic checkpoint path"):
            dist.broadcast_object_list(path, src=0)
    return path[0]


def run_rank(rank: int, world_size: int, cfg: Config, checkpoint: str | None, device_kind: str, reference: bool,
             graph: bool, out_path: str | None, log_level: str) -> dict | None:
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s")  # per process: spawned ranks too
    logging.getLogger("ep_runtime").setLevel(log_level.upper())
    device = pick_device(device_kind)
    init_process_group(device, cfg.runtime.barrier_timeout_s)
    # Files only where every rank can read rank 0's temporary directory (one node); ranks spread over nodes
    # generate their share of the same synthetic layer in memory, as GPU ranks do.
    written = checkpoint is None and device.type == "cpu" and local_rank_and_size()[1] == world_size
    if written:
        checkpoint = _synthetic_checkpoint(cfg, rank, world_size)
    try:
        return _timed_forwards(rank, world_size, cfg, checkpoint, device, reference, graph, out_path)
    finally:
        if written and rank == 0:
            shutil.rmtree(checkpoint, ignore_errors=True)


def _build(cfg: Config, checkpoint: str | None, rank: int, world_size: int, device: torch.device) -> EPMoE:
    if checkpoint is None:
        return EPMoE.from_synthetic(cfg, cfg.runtime.layer, rank, world_size, device=device)
    return EPMoE.from_checkpoint(checkpoint, cfg, cfg.runtime.layer, rank, world_size, device=device,
                                 progress=rank == 0)


def _median_ms(fn, iters: int, device: torch.device) -> float:
    times = []
    for _ in range(iters):  # a fixed count on every rank: collectives must pair up
        _synchronize(device)
        t0 = time.perf_counter()
        fn()
        _synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _timed_forwards(rank: int, world_size: int, cfg: Config, checkpoint: str | None, device: torch.device,
                    reference: bool, graph: bool, out_path: str | None) -> dict | None:
    moe = _build(cfg, checkpoint, rank, world_size, device)
    hidden, ids = _inputs(cfg, device, rank)
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            moe(hidden, ids)
        median = _median_ms(lambda: moe(hidden, ids), cfg.runtime.iters, device)
        out = moe(hidden, ids)
        graph_median = None
        if graph:
            captured = moe.capture(hidden, ids)
            graph_median = _median_ms(captured.replay, cfg.runtime.iters, device)
            if not torch.equal(captured.replay(), out):
                raise RuntimeError(f"rank {rank}: CUDA-graph replay differs from the eager forward")
        sources = moe.buffer.sources
        if sources > 1 and reference:  # dp: every rank's rows, in rank order, against one reference forward
            gathered = out.new_empty(sources * out.shape[0], out.shape[1])
            CpuBackend(moe.buffer.backend.group, device).all_gather([gathered], [out])  # out is not in the arena
            out = gathered
        moe.buffer.backend.barrier(cfg.runtime.barrier_timeout_s)
        if rank != 0:
            return None
        rel = cos = None
        if reference:
            parts = [_inputs(cfg, device, r) for r in range(sources)]
            hidden, ids = torch.cat([p[0] for p in parts]), None if ids is None else torch.cat([p[1] for p in parts])
            n = hidden.shape[0]
            ref = _build(cfg.replace(world_size=1, backend="reference", max_tokens=n, tokens=n), checkpoint, 0, 1,
                         device)
            expected = ref(hidden, ids).double()
            got = out.double()
            rel = ((got - expected).norm() / expected.norm()).item()
            cos = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
    result = {"world_size": world_size, "experts_per_rank": cfg.experts_per_rank, "tokens": cfg.runtime.tokens,
              "backend": moe.backend, "symm_backend": moe.buffer.backend.name, **provenance(device),
              "config": cfg.model.name, "act_mode": cfg.runtime.act_mode, "act_scale": cfg.runtime.act_scale,
              "dtype": cfg.runtime.dtype, "token_mode": cfg.runtime.token_mode, "iters": cfg.runtime.iters,
              "median_ms": median, "graph_median_ms": graph_median, "rel_l2_vs_reference": rel,
              "cosine_vs_reference": cos}
    line = json.dumps(result)
    print(line, flush=True)
    if out_path:
        with open(out_path, "w") as f:
            f.write(line + "\n")
    return result


def _default_config(args: argparse.Namespace) -> str:
    return "deepseek_v4_pro" if args.device != "cpu" and torch.cuda.is_available() else "tiny"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    name = _default_config(args) if args.config == "auto" else args.config
    overrides = list(args.overrides)
    if name != "tiny" and args.config == "auto" and not under_torchrun() and \
            not any(o.split("=")[0].endswith("world_size") for o in overrides):
        overrides.insert(0, f"world_size={torch.cuda.device_count()}")  # one rank per visible GPU
    cfg = load_config(name, overrides)
    if args.graph and cfg.runtime.backend == "reference":
        raise ValueError("--graph: CUDA-graph replays need the cuda backend (the reference expert stage syncs with the "
                         "host), got runtime.backend 'reference'")
    if cfg.runtime.tokens > cfg.runtime.max_tokens:
        raise ValueError(f"runtime.tokens: expected at most max_tokens={cfg.runtime.max_tokens}, got "
                         f"{cfg.runtime.tokens}")
    job = (cfg, args.checkpoint, args.device, not args.no_reference, args.graph, args.out, args.log_level)
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        run_rank(int(os.environ["RANK"]), world, cfg.replace(world_size=world), *job[1:])
        if dist.is_initialized():
            dist.destroy_process_group()
    elif cfg.runtime.world_size == 1:
        run_rank(0, 1, *job)
    else:
        spawn_local(run_rank, cfg.runtime.world_size, *job)


if __name__ == "__main__":
    main()
