"""Model and runtime configuration: YAML files under configs/, overridable with `key=value` strings."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 1
    num_moe_layers: int = 1
    num_hash_layers: int = 0
    scoring_func: str = "sqrtsoftplus"  # sqrtsoftplus (V4) | sigmoid (V3)
    topk_method: str = "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    swiglu_limit: float | None = None
    vocab_size: int = 0

    def __post_init__(self) -> None:
        h, i = self.hidden_size, self.moe_intermediate_size
        # 64: one int32 word of packed block scales covers 64 elements (NVFP4_SPEC section 1).
        for name, v in (("hidden_size", h), ("moe_intermediate_size", i)):
            if v <= 0 or v % 64:
                raise ValueError(f"model.{name}: expected a positive multiple of 64, got {v}")
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(f"model.num_experts_per_tok: expected 1..{self.n_routed_experts}, "
                             f"got {self.num_experts_per_tok}")
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid"):
            raise ValueError(f"model.scoring_func: expected 'sqrtsoftplus' or 'sigmoid', got {self.scoring_func!r}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"model.n_group: expected a divisor of n_routed_experts={self.n_routed_experts}, "
                             f"got {self.n_group}")
        if self.n_group > 1 and not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"model.topk_group: expected 1..{self.n_group}, got {self.topk_group}")
        if self.num_hash_layers and self.vocab_size <= 0:
            raise ValueError("model.vocab_size: hash layers need a positive vocab_size")


@dataclass(frozen=True)
class RuntimeConfig:
    world_size: int = 1
    max_tokens: int = 256
    act_mode: str = "nvfp4"  # nvfp4 (W4A4) | bf16 (W4A16)
    act_scale: str = "static"  # static (checkpoint input_scale) | dynamic (amax)
    dtype: str = "bfloat16"  # output / all-reduce dtype: bfloat16 | float32
    backend: str = "auto"  # expert stage: reference | cuda | auto
    # cpu | torch | nvshmem | auto (torch on GPUs, else cpu); the environment's EP_SYMM_BACKEND sets the default
    symm_backend: str = field(default_factory=lambda: os.environ.get("EP_SYMM_BACKEND", "auto"))
    barrier_timeout_s: float = 60.0
    tokens: int = 64  # main job: tokens per forward
    layer: int = 0  # main job: which MoE layer of the checkpoint
    iters: int = 10  # main job: timed forwards (the same count on every rank)
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"act_mode": ("nvfp4", "bf16"), "act_scale": ("static", "dynamic"),
                   "dtype": ("bfloat16", "float32"), "backend": ("reference", "cuda", "auto"),
                   "symm_backend": ("cpu", "torch", "nvshmem", "auto")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"runtime.{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name in ("world_size", "max_tokens", "tokens", "iters"):
            if getattr(self, name) <= 0:
                raise ValueError(f"runtime.{name}: expected a positive integer, got {getattr(self, name)}")
        if self.tokens > self.max_tokens:
            raise ValueError(f"runtime.tokens: expected at most max_tokens={self.max_tokens}, got {self.tokens}")
        if self.barrier_timeout_s <= 0:
            raise ValueError(f"runtime.barrier_timeout_s: expected > 0, got {self.barrier_timeout_s}")

    @property
    def torch_dtype(self):
        import torch

        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[self.dtype]


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        e, w = self.model.n_routed_experts, self.runtime.world_size
        if e % w:
            raise ValueError(f"runtime.world_size: must divide model.n_routed_experts={e}, got {w}")

    @property
    def experts_per_rank(self) -> int:
        return self.model.n_routed_experts // self.runtime.world_size

    def replace(self, **runtime_changes: Any) -> "Config":
        return Config(self.model, dataclasses.replace(self.runtime, **runtime_changes))


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config: no file {name_or_path!r} and no built-in config of that name (known: {known})")


def load_config(name_or_path: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config and apply `section.key=value` (or bare `key=value`) overrides."""
    path = resolve_config_path(name_or_path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or "model" not in raw:
        raise ValueError(f"config {path}: expected a mapping with a 'model' section")
    model, runtime = dict(raw["model"]), dict(raw.get("runtime") or {})
    for item in overrides:
        _apply_override(item, model, runtime)
    try:
        return Config(ModelConfig(**model), RuntimeConfig(**runtime))
    except TypeError as e:  # unknown keys
        raise ValueError(f"config {path}: {e}") from None


def _apply_override(item: str, model: dict, runtime: dict) -> None:
    if "=" not in item:
        raise ValueError(f"override: expected key=value, got {item!r}")
    key, value = item.split("=", 1)
    section, _, name = key.rpartition(".")
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    runtime_keys = {f.name for f in dataclasses.fields(RuntimeConfig)}
    if section == "model" or (not section and name in model_keys):
        target, keys = model, model_keys
    elif section == "runtime" or (not section and name in runtime_keys):
        target, keys = runtime, runtime_keys
    else:
        raise ValueError(f"override: unknown key {key!r} (model keys: {sorted(model_keys)}, "
                         f"runtime keys: {sorted(runtime_keys)})")
    if name not in keys:
        raise ValueError(f"override: unknown key {key!r}")
    target[name] = yaml.safe_load(value)
