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
    """NaN into every floating-point tensor a forward writes before it reads it, so that anything a forward leaves
    unwritten shows: the buffer's bf16 x (W4A16) or NVFP4 global scale, routing weights and all-reduce buffer y, and
    the expert workspaces (None on the reference backend), the shared expert's outputs among them."""
    buf = moe.buffer
    # x is packed uint8 in W4A4 and x_global exists only then; integer regions (x_sf, topk_idx) are left alone
    tensors = [getattr(buf, name, None) for name in ("x", "x_global", "topk_weights", "y")]
    for workspace in (moe.scratch.routed, moe.scratch.shared, moe.scratch.shared_slice):
        if workspace is not None:
            tensors += [getattr(workspace, f.name) for f in dataclasses.fields(workspace)]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            if t.element_size() == 1:  # e4m3 block scales: the byte 0x7F is NaN
                t.view(torch.uint8).fill_(0x7F)
            else:
                t.fill_(float("nan"))


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
