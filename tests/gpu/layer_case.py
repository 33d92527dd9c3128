"""The mid-sized V4-style layer the GPU layer tests share (not a test module)."""
import dataclasses

import torch

from ep_runtime.config import Config, load_config
from ep_runtime.moe import EPMoE

LAYER = ["hidden_size=1024", "moe_intermediate_size=512", "n_routed_experts=32", "num_hash_layers=0",
         "dtype=bfloat16", "max_tokens=512", "tokens=256", "layer=0"]


def layer_config(world_size: int, *overrides: str, seed: int) -> Config:
    """seed: the synthetic weights' seed (runtime.seed), fresh per run like the inputs."""
    return load_config("tiny", [*LAYER, f"world_size={world_size}", f"seed={seed}", *overrides])


def layer_inputs(cfg: Config, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(cfg.runtime.tokens, cfg.model.hidden_size, generator=g, device=device).to(torch.bfloat16)


def poison_module(moe: EPMoE) -> None:
    """Garbage into everything a forward writes before it reads it, so that anything a forward leaves unwritten shows:
    every region of the symmetric buffer (staged and gathered activations, routing, y) and every tensor of the expert
    workspaces (None on the reference backend; the shared expert's among them): slot metadata, h and its scales, the
    per-slot outputs. Not the K split's arrival counts, which every launch leaves zero for the next."""
    for name, t in vars(moe.buffer).items():
        if isinstance(t, torch.Tensor) and name[0] != "_":
            if name.startswith("topk_idx"):
                t.fill_(-1)  # ids of no expert
            else:
                _poison(t)
    for workspace in (moe.scratch.routed, moe.scratch.shared, moe.scratch.shared_slice):
        if workspace is not None:
            for f in dataclasses.fields(workspace):
                t = getattr(workspace, f.name)
                if f.name == "split_arrivals" or not isinstance(t, torch.Tensor):
                    continue
                if t.dtype == torch.int32:  # counts, offsets, slot maps, amax words
                    t.fill_(0x7A7A7A7A)
                else:
                    _poison(t)


def _poison(t: torch.Tensor) -> None:
    if t.is_floating_point() and t.element_size() > 1:
        t.fill_(float("nan"))
    else:  # e4m3 scales, UE4M3 scale words (the byte 0x7F is NaN) and packed FP4 codes (+6 and -6)
        t.view(torch.uint8).fill_(0x7F)


def eager_and_replayed(moe: EPMoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An eager forward's output, and that of a graph captured on x, replayed over poisoned scratch and output."""
    poison_module(moe)
    eager = moe(x).clone()
    captured = moe.capture(x)
    poison_module(moe)
    captured.out.fill_(float("nan"))
    replayed = captured.replay().clone()
    torch.cuda.synchronize()
    return eager, replayed


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def residual_model(first: EPMoE, second: EPMoE, check: bool = True):
    """Two MoE layers of a model with residual adds, as torch.compile sees them."""
    def model(x: torch.Tensor) -> torch.Tensor:
        x = x + first(x, check=check)
        return x + second(x, check=check)
    return model
