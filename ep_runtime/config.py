"""Model and runtime configuration: YAML files under configs/, overridable with `key=value` strings."""
from __future__ import annotations

import dataclasses
import math
import operator
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's numbers: PyYAML follows YAML 1.1, which reads 1e3 and 25e-1 (no dot, or no exponent sign) as
    strings."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def _is_kind(v: Any, kind: type) -> bool:
    if isinstance(v, bool) or kind is bool:  # YAML's true/false are neither counts nor numbers, nor 0/1 flags
        return isinstance(v, bool) and kind is bool
    return isinstance(v, (int, float) if kind is float else kind)


def _check_fields(obj: Any, section: str, choices: dict[str, tuple[str, ...]], positive: tuple[str, ...],
                  non_negative: tuple[str, ...]) -> None:
    """YAML files and `key=value` overrides can put any value in any field: check each against its annotation,
    its allowed values and its range before anything computes with it."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v, kinds = getattr(obj, f.name), typing.get_args(hints[f.name]) or (hints[f.name],)
        if not any(_is_kind(v, k) for k in kinds):
            raise TypeError(f"{section}.{f.name}: expected {' or '.join(_KINDS[k] for k in kinds)}, "
                            f"got {v!r} ({type(v).__name__})")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{section}.{f.name}: expected a finite number, got {v!r}")
        if f.name in choices and v not in choices[f.name]:
            raise ValueError(f"{section}.{f.name}: expected one of {choices[f.name]}, got {v!r}")
        if v is not None and (f.name in positive and v <= 0 or f.name in non_negative and v < 0):
            raise ValueError(f"{section}.{f.name}: expected {'> 0' if f.name in positive else '>= 0'}, got {v!r}")


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

    @property
    def shared_intermediate_size(self) -> int:
        """The shared experts as one expert: their intermediate columns side by side (0 without any)."""
        return self.moe_intermediate_size * self.n_shared_experts

    def __post_init__(self) -> None:
        # topk_method: noaux_tc routers carry an e_score_correction_bias, greedy ones none
        choices = {"scoring_func": ("sqrtsoftplus", "sigmoid"), "topk_method": ("noaux_tc", "greedy")}
        _check_fields(self, "model", choices,
                      positive=("n_routed_experts", "num_moe_layers", "n_group", "topk_group", "routed_scaling_factor",
                                "swiglu_limit"),
                      non_negative=("n_shared_experts", "num_hash_layers", "vocab_size"))
        h, i, e, k = self.hidden_size, self.moe_intermediate_size, self.n_routed_experts, self.num_experts_per_tok
        # 64: one int32 word of packed block scales covers 64 elements (NVFP4_SPEC section 1).
        for name, v in (("hidden_size", h), ("moe_intermediate_size", i)):
            if v <= 0 or v % 64:
                raise ValueError(f"model.{name}: expected a positive multiple of 64, got {v}")
        if not 0 < k <= e:
            raise ValueError(f"model.num_experts_per_tok: expected 1..{e}, got {k}")
        if e % self.n_group:
            raise ValueError(f"model.n_group: expected a divisor of n_routed_experts={e}, got {self.n_group}")
        if self.n_group > 1:
            if self.topk_group > self.n_group:
                raise ValueError(f"model.topk_group: expected 1..{self.n_group}, got {self.topk_group}")
            # group-limited routing picks the k experts from the topk_group kept groups only
            if k > self.topk_group * (e // self.n_group):
                raise ValueError(f"model.num_experts_per_tok: expected at most topk_group * n_routed_experts / n_group"
                                 f" = {self.topk_group * (e // self.n_group)}, got {k}")
        if self.num_hash_layers > self.num_moe_layers:
            raise ValueError(f"model.num_hash_layers: expected 0..num_moe_layers={self.num_moe_layers}, "
                             f"got {self.num_hash_layers}")
        if self.num_hash_layers and self.vocab_size <= 0:
            raise ValueError("model.vocab_size: hash layers need a positive vocab_size")
        if self.num_hash_layers and self.scoring_func != "sqrtsoftplus":
            # Hash routing is DeepSeek-V4's (sqrt(softplus) weights of the table's experts); V3's sigmoid routing
            # would pick experts by score and ignore the table.
            raise ValueError(f"model.num_hash_layers: hash layers route with scoring_func 'sqrtsoftplus', got "
                             f"{self.num_hash_layers} hash layers with {self.scoring_func!r}")


# A barrier's longest timeout: the P2P kernels count it in 64-bit nanoseconds (csrc/allreduce.cu kMaxTimeoutS).
MAX_TIMEOUT_S = 1e9


@dataclass(frozen=True)
class RuntimeConfig:
    world_size: int = 1
    max_tokens: int = 256
    act_mode: str = "nvfp4"  # nvfp4 (W4A4) | bf16 (W4A16)
    act_scale: str = "static"  # static (checkpoint input_scale) | dynamic (amax)
    dtype: str = "bfloat16"  # output / all-reduce dtype: bfloat16 | float32
    backend: str = "auto"  # expert stage: reference | cuda | auto
    # cpu | torch | ipc | nvshmem | auto (torch on GPUs, else cpu); the environment's EP_SYMM_BACKEND sets the default
    symm_backend: str = field(default_factory=lambda: os.environ.get("EP_SYMM_BACKEND", "auto"))
    barrier_timeout_s: float = 60.0
    # replicated: every rank holds all T tokens (tensor-parallel attention) and the partial outputs are all-reduced;
    # dp: each rank holds its own tokens (data-parallel attention; as many on every rank where forward's checks are
    # off), which the ranks all-gather as NVFP4 (or bf16) after staging and routing, and each gets its tokens' rows
    # back by a reduce-scatter
    token_mode: str = "replicated"
    # CUDA backend, several ranks, static scales: a forward of at most this many tokens runs the shared expert on every
    # rank over all tokens, each rank a 1/world_size slice of its intermediate dim (1/W of its weights streamed per
    # rank), instead of a 1/W slice of the tokens through the whole expert; 0 never (bench/NOTES_experts.md)
    shared_split_tokens: int = 4
    # count each routed expert's (token, k) assignments in EPMoE.expert_load, added by every forward (a captured
    # graph's replays too): for monitoring routing balance, e.g. to re-place experts
    expert_load: bool = False
    tokens: int = 64  # main job: tokens per forward (at most max_tokens, checked by the job: layers never read it)
    layer: int = 0  # main job: which MoE layer of the checkpoint
    iters: int = 10  # main job: timed forwards (the same count on every rank)
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"act_mode": ("nvfp4", "bf16"), "act_scale": ("static", "dynamic"),
                   "dtype": ("bfloat16", "float32"), "backend": ("reference", "cuda", "auto"),
                   "symm_backend": ("cpu", "torch", "ipc", "nvshmem", "auto"), "token_mode": ("replicated", "dp")}
        _check_fields(self, "runtime", choices,
                      positive=("world_size", "max_tokens", "tokens", "iters", "barrier_timeout_s"),
                      non_negative=("layer", "seed", "shared_split_tokens"))
        if self.seed >= 2**32:  # the seeds made from it (seed * 7919 + layer, seed + rank) stay within torch's 64 bits
            raise ValueError(f"runtime.seed: expected at most {2**32 - 1}, got {self.seed}")
        if self.barrier_timeout_s > MAX_TIMEOUT_S:
            raise ValueError(f"runtime.barrier_timeout_s: expected at most {MAX_TIMEOUT_S:g} s, got "
                             f"{self.barrier_timeout_s!r}")
        if self.token_mode == "dp" and self.act_mode == "nvfp4" and self.act_scale == "dynamic":
            # The gathered tokens share one global scale, and the shared expert's h another, each an amax over the
            # whole batch, which no rank holds.
            raise ValueError("runtime.act_scale: token_mode 'dp' quantizes each rank's tokens on that rank, so it "
                             "needs 'static' scales (or act_mode 'bf16'), got 'dynamic'")

    @property
    def torch_dtype(self) -> "torch.dtype":
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
        if self.runtime.layer >= self.model.num_moe_layers:
            raise ValueError(f"runtime.layer: expected 0..{self.model.num_moe_layers - 1} (model.num_moe_layers="
                             f"{self.model.num_moe_layers}), got {self.runtime.layer}")

    @property
    def experts_per_rank(self) -> int:
        return self.model.n_routed_experts // self.runtime.world_size

    def replace(self, **runtime_changes: Any) -> "Config":
        return Config(self.model, dataclasses.replace(self.runtime, **runtime_changes))


def local_expert_count(n_experts: int, rank: int, world_size: int) -> int:
    """The experts each of world_size ranks holds; refuses a world size that does not divide n_experts and a rank
    outside it (ints only: 2.0 ranks would fail later, deep in a slice)."""
    for name, v in (("world_size", world_size), ("rank", rank)):
        try:
            if isinstance(v, bool):
                raise TypeError
            operator.index(v)  # ints and integer scalars such as numpy's
        except TypeError:
            raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}") from None
    if world_size < 1 or n_experts % world_size:
        raise ValueError(f"world_size: must divide n_routed_experts={n_experts}, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0..{world_size - 1}, got {rank}")
    return n_experts // world_size


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
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config {path}: malformed YAML ({e})") from None
    if not isinstance(raw, dict) or "model" not in raw:
        raise ValueError(f"config {path}: expected a mapping with a 'model' section")
    sections = {"model": raw["model"], "runtime": raw.get("runtime") or {}}
    for name, value in sections.items():
        if not isinstance(value, dict):
            raise ValueError(f"config {path}: section {name!r} expected a mapping of keys to values, got "
                             f"{type(value).__name__} {value!r}")
    model, runtime = dict(sections["model"]), dict(sections["runtime"])
    for item in overrides:
        _apply_override(item, model, runtime)
    try:
        return Config(ModelConfig(**model), RuntimeConfig(**runtime))
    except (TypeError, ValueError) as e:  # name the file; TypeError: unknown or missing keys, or a wrong type
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
    try:
        target[name] = yaml.load(value, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: malformed value ({e})") from None
