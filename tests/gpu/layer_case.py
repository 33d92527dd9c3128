"""The mid-sized V4-style layer the GPU layer tests share (not a test module)."""
import torch

from ep_runtime.config import Config, load_config

LAYER = ["hidden_size=1024", "moe_intermediate_size=512", "n_routed_experts=32", "num_hash_layers=0",
         "dtype=bfloat16", "max_tokens=512", "tokens=256", "layer=0"]


def layer_config(world_size: int, *overrides: str) -> Config:
    return load_config("tiny", [*LAYER, f"world_size={world_size}", *overrides])


def layer_inputs(cfg: Config, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(cfg.runtime.tokens, cfg.model.hidden_size, generator=g, device=device).to(torch.bfloat16)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()
