"""The main job: timed expert-parallel MoE layer forwards, checked against the single-process reference.

    python -m ep_runtime.cli                       # tiny config, synthetic checkpoint, 8 CPU ranks
    torchrun --nproc-per-node 4 -m ep_runtime.cli --config deepseek_v4_pro --checkpoint PATH

Without torchrun it spawns runtime.world_size local ranks itself. Rank 0 prints ONE JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from .checkpoint import write_synthetic_checkpoint
from .config import Config, load_config
from .dist_utils import init_process_group, pick_device, spawn_local, under_torchrun
from .moe import EPMoE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ep_runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="built-in config name or YAML path (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set world_size=4 --set act_mode=bf16")
    p.add_argument("--checkpoint", help="ModelOpt NVFP4 checkpoint dir; default: a synthetic one for the config")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-reference", action="store_true", help="skip the single-process reference check")
    p.add_argument("--out", help="also write the JSON result to this file")
    return p.parse_args(argv)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same hidden states and token ids on every rank (replicated-token mode)."""
    g = torch.Generator().manual_seed(cfg.runtime.seed)
    m, t = cfg.model, cfg.runtime.tokens
    hidden = torch.randn(t, m.hidden_size, generator=g).to(device)
    ids = torch.randint(0, max(m.vocab_size, 1), (t,), generator=g).to(device) if m.vocab_size else None
    return hidden, ids


def _synthetic_checkpoint(cfg: Config, rank: int, world_size: int) -> str:
    """Rank 0 writes a synthetic checkpoint for the config (sharded by rank); every rank gets its path."""
    path = [tempfile.mkdtemp(prefix="ep_runtime_ckpt_") if rank == 0 else None]
    if rank == 0:
        write_synthetic_checkpoint(path[0], cfg.model, num_layers=cfg.runtime.layer + 1, seed=cfg.runtime.seed,
                                   shards=world_size)
    if world_size > 1:
        dist.broadcast_object_list(path, src=0)
    return path[0]


def run_rank(rank: int, world_size: int, cfg: Config, checkpoint: str | None, device_kind: str, reference: bool,
             out_path: str | None) -> dict | None:
    device = pick_device(device_kind, int(os.environ.get("LOCAL_RANK", rank)), world_size)
    init_process_group(device, cfg.runtime.barrier_timeout_s)
    synthetic = checkpoint is None
    if synthetic:
        checkpoint = _synthetic_checkpoint(cfg, rank, world_size)
    try:
        return _timed_forwards(rank, world_size, cfg, checkpoint, device, reference, out_path)
    finally:
        if synthetic and rank == 0:
            shutil.rmtree(checkpoint, ignore_errors=True)


def _timed_forwards(rank: int, world_size: int, cfg: Config, checkpoint: str, device: torch.device,
                    reference: bool, out_path: str | None) -> dict | None:
    moe = EPMoE.from_checkpoint(checkpoint, cfg, cfg.runtime.layer, rank, world_size, device=device,
                                progress=rank == 0)
    hidden, ids = _inputs(cfg, device)
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            moe(hidden, ids)
        times = []
        for _ in range(cfg.runtime.iters):  # a fixed count on every rank: collectives must pair up
            _synchronize(device)
            t0 = time.perf_counter()
            out = moe(hidden, ids)
            _synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
        moe.buffer.backend.barrier(cfg.runtime.barrier_timeout_s)
        if rank != 0:
            return None
        rel = None
        if reference:
            ref_cfg = cfg.replace(world_size=1)
            ref = EPMoE.from_checkpoint(checkpoint, ref_cfg, cfg.runtime.layer, 0, 1, device=device)
            ref.backend = "reference"
            expected = ref(hidden, ids).double()
            rel = ((out.double() - expected).norm() / expected.norm()).item()
    result = {"world_size": world_size, "experts_per_rank": cfg.experts_per_rank, "tokens": cfg.runtime.tokens,
              "backend": moe.backend, "symm_backend": moe.buffer.backend.name, "device": _device_name(device),
              "config": cfg.model.name, "act_mode": cfg.runtime.act_mode, "act_scale": cfg.runtime.act_scale,
              "dtype": cfg.runtime.dtype, "iters": cfg.runtime.iters, "median_ms": statistics.median(times),
              "rel_l2_vs_reference": rel}
    line = json.dumps(result)
    print(line, flush=True)
    if out_path:
        with open(out_path, "w") as f:
            f.write(line + "\n")
    return result


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    job = (cfg, args.checkpoint, args.device, not args.no_reference, args.out)
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
