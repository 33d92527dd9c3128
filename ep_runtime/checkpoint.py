"""ModelOpt NVFP4 safetensors checkpoints: a lazy per-rank reader and a synthetic writer.

The reader validates every tensor a rank needs from the safetensors headers alone (presence, dtype,
shape) before it reads any data, then reads only the rank's local experts (plus the router and shared
expert) one tensor at a time straight into the final stacks. Any failure raises before anything is
returned, so a failed load leaves no partial state behind.
"""
from __future__ import annotations

import json
import math
import reprlib
import struct
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Generator, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from . import nvfp4
from .config import ModelConfig, local_expert_count
from .experts import swiglu
from .routing import check_tid2eid
from .weights import PROJECTIONS, ExpertWeights

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or does not match the model config."""


@dataclass(frozen=True)
class Naming:
    """Where tensors live in the checkpoint. `key_map` is the hook for other exports: it maps each
    canonical (HF/ModelOpt) name to the name used by the file."""

    expert: str = "model.layers.{layer}.mlp.experts.{expert}.{proj}.{tensor}"
    shared: str = "model.layers.{layer}.mlp.shared_experts.{proj}.{tensor}"
    router: str = "model.layers.{layer}.mlp.gate.{tensor}"
    key_map: Callable[[str], str] | None = None

    def _map(self, key: str) -> str:
        return self.key_map(key) if self.key_map else key

    def expert_key(self, layer: int, expert: int, proj: str, tensor: str) -> str:
        return self._map(self.expert.format(layer=layer, expert=expert, proj=proj, tensor=tensor))

    def shared_key(self, layer: int, proj: str, tensor: str) -> str:
        return self._map(self.shared.format(layer=layer, proj=proj, tensor=tensor))

    def router_key(self, layer: int, tensor: str) -> str:
        return self._map(self.router.format(layer=layer, tensor=tensor))


@dataclass
class LayerWeights:
    """Everything one rank holds for one MoE layer."""

    router_weight: torch.Tensor  # (E, H)
    router_bias: torch.Tensor | None  # (E,) fp32, selection only
    tid2eid: torch.Tensor | None  # (vocab, topk) int32 for hash layers
    experts: ExpertWeights  # the rank's local experts
    shared: ExpertWeights | None  # the shared expert as a one-expert stack


class CheckpointReader:
    """Resolves tensor names to files from the safetensors headers; reads tensors only on request."""

    def __init__(self, path: str | Path, naming: Naming = Naming()):
        self.path = Path(path)
        self.naming = naming
        self.key_file: dict[str, Path] = {}
        self.tensors_read: list[str] = []  # names read by this reader, in order
        if not self.path.exists():
            raise CheckpointError(f"checkpoint: {self.path} does not exist")
        if self.path.name == INDEX_FILE:
            self.path = self.path.parent
        elif not self.path.is_dir() and self.path.suffix != ".safetensors":
            raise CheckpointError(f"checkpoint: expected a directory, its {INDEX_FILE} or a .safetensors file, got "
                                  f"{self.path}")
        root = self.path if self.path.is_dir() else self.path.parent
        self._check_quant_config(root)
        if self.path.is_dir() and (self.path / INDEX_FILE).exists():
            self._read_index(self.path / INDEX_FILE)
        else:
            files = sorted(self.path.glob("*.safetensors")) if self.path.is_dir() else [self.path]
            if not files:
                raise CheckpointError(f"checkpoint: no {INDEX_FILE} and no *.safetensors in {self.path}")
            for f in files:
                for key in _header(f):
                    if key in self.key_file:  # without an index nothing says which copy is meant
                        raise CheckpointError(f"checkpoint {self.path}: tensor {key!r} is in both "
                                              f"{self.key_file[key].name} and {f.name}")
                    self.key_file[key] = f

    def _read_index(self, index: Path) -> None:
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"checkpoint {index}: weight_map expected an object, got {reprlib.repr(weight_map)}")
        for key, fname in weight_map.items():
            if not isinstance(fname, str):
                raise CheckpointError(f"checkpoint {index}: weight_map[{key!r}] expected a file name, "
                                      f"got {reprlib.repr(fname)}")
            self.key_file[key] = index.parent / fname

    @staticmethod
    def _check_quant_config(root: Path) -> None:
        for name, field in (("hf_quant_config.json", "quantization"), ("config.json", "quantization_config")):
            f = root / name
            if not f.exists():
                continue
            q = _read_json(f).get(field)
            if not q:
                continue
            if not isinstance(q, dict):
                raise CheckpointError(f"checkpoint {f}: {field} expected an object, got {reprlib.repr(q)}")
            algo, group = q.get("quant_algo"), q.get("group_size", nvfp4.BLOCK)
            if algo is not None and str(algo).upper() != "NVFP4":
                raise CheckpointError(f"checkpoint {f}: quant_algo expected NVFP4, got {algo!r}")
            if group != nvfp4.BLOCK:
                raise CheckpointError(f"checkpoint {f}: group_size expected {nvfp4.BLOCK}, got {group!r}")

    def file_of(self, key: str) -> Path:
        if key not in self.key_file:
            raise CheckpointError(f"checkpoint {self.path}: missing tensor {key!r}")
        f = self.key_file[key]
        if not f.exists():
            raise CheckpointError(f"checkpoint {self.path}: file {f.name} holding {key!r} does not exist")
        return f

    def check(self, expected: dict[str, tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]]) -> None:
        """Validate name -> (allowed shapes, allowed dtypes) from the headers, reading no tensor data."""
        headers: dict[Path, dict] = {}
        for key, (shapes, dtypes) in expected.items():
            f = self.file_of(key)
            if f not in headers:
                headers[f] = _header(f)
            if key not in headers[f]:
                raise CheckpointError(f"checkpoint {f}: missing tensor {key!r}")
            meta = headers[f][key]
            if meta["dtype"] not in dtypes:
                raise CheckpointError(f"checkpoint {f}: tensor {key!r} expected dtype {' or '.join(dtypes)}, "
                                      f"got {meta['dtype']}")
            if tuple(meta["shape"]) not in shapes:
                raise CheckpointError(f"checkpoint {f}: tensor {key!r} expected shape "
                                      f"{' or '.join(map(str, shapes))}, got {tuple(meta['shape'])}")
            begin, end = meta["data_offsets"]
            size = math.prod(meta["shape"]) * _ITEMSIZE.get(meta["dtype"], 0)
            if size and end - begin != size:
                raise CheckpointError(f"checkpoint {f}: tensor {key!r} expected {size} bytes of data for its shape "
                                      f"and dtype, got data_offsets {[begin, end]} ({end - begin} bytes)")
        for f in headers:  # the rest of each header (spans that overlap, leave gaps or bytes over): before any read
            with _open(f):
                pass

    def read(self, keys: Iterable[str], desc: str = "loading",
             progress: bool = False) -> Generator[tuple[str, torch.Tensor], None, None]:
        """Yield (key, tensor) for the given names, one file handle per shard, in the given order."""
        keys = list(keys)
        with ExitStack() as stack:
            handles: dict[Path, object] = {}
            for key in tqdm(keys, desc=desc, unit="tensor", disable=not progress, leave=False):
                f = self.file_of(key)
                if f not in handles:
                    handles[f] = stack.enter_context(_open(f))
                try:
                    t = handles[f].get_tensor(key)
                except SafetensorError as e:
                    raise CheckpointError(f"checkpoint {f}: cannot read tensor {key!r}: {e}") from None
                self.tensors_read.append(key)
                yield key, t


# The bytes per element of the dtypes a layer's tensors may have (CheckpointReader.check's spans).
_ITEMSIZE = {"U8": 1, "F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint file {f}: cannot open ({e})") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook: a key given twice is an error (json.loads would keep the last one silently)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} appears twice in one object")
    return d


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(f.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError or a repeated key
        raise CheckpointError(f"checkpoint {f}: malformed JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"checkpoint {f}: expected a JSON object, got {type(d).__name__}")
    return d


def _is_index(v: object) -> bool:
    return type(v) is int and v >= 0  # type(), not isinstance: JSON true/false are not sizes


# The header fields the reader relies on: (field, what it must be, test).
_ENTRY_FIELDS = (
    ("dtype", "a string", lambda v: isinstance(v, str)),
    ("shape", "a list of non-negative integers", lambda v: isinstance(v, list) and all(map(_is_index, v))),
    ("data_offsets", "[begin, end] with 0 <= begin <= end",
     lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_index, v)) and v[0] <= v[1]),
)


def _check_entry(f: Path, key: str, meta: object) -> None:
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint file {f}: tensor {key!r} expected a header entry object, "
                              f"got {reprlib.repr(meta)}")
    for name, expected, ok in _ENTRY_FIELDS:
        if not ok(meta.get(name)):
            raise CheckpointError(f"checkpoint file {f}: tensor {key!r} header field {name!r} expected {expected}, "
                                  f"got {reprlib.repr(meta.get(name))}")


def _header(f: Path) -> dict:
    """Parse a safetensors header and check that the data it describes is all there (truncation)."""
    try:
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"checkpoint file {f}: truncated (no header)")
            (n,) = struct.unpack("<Q", raw)
            size = f.stat().st_size
            if n > size - 8:
                raise CheckpointError(f"checkpoint file {f}: truncated or corrupt header ({n} bytes declared, "
                                      f"{size - 8} present)")
            header = json.loads(fh.read(n), object_pairs_hook=_unique_keys)
    except CheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {f}: corrupt header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint file {f}: corrupt header (expected a JSON object, "
                              f"got {type(header).__name__})")
    header.pop("__metadata__", None)
    for key, meta in header.items():
        _check_entry(f, key, meta)
    end = max((m["data_offsets"][1] for m in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"checkpoint file {f}: truncated: header describes {8 + n + end} bytes, "
                              f"file has {size}")
    return header


def _scalar_shapes() -> tuple[tuple[int, ...], ...]:
    return ((), (1,))


def _projection_spec(n: int, k: int) -> dict[str, tuple]:
    return {"weight": (((n, k // 2),), ("U8",)),
            "weight_scale": (((n, k // 16),), ("F8_E4M3", "U8")),
            "weight_scale_2": (_scalar_shapes(), ("F32",)),
            "input_scale": (_scalar_shapes(), ("F32",))}


def _mlp_keys(key_of: Callable[[str, str], str], h: int, i: int) -> dict[str, tuple]:
    out = {}
    for proj in PROJECTIONS:
        n, k = (h, i) if proj == "down_proj" else (i, h)
        for tensor, spec in _projection_spec(n, k).items():
            out[key_of(proj, tensor)] = spec
    return out


def load_layer(reader: CheckpointReader, cfg: ModelConfig, layer: int, rank: int, world_size: int,
               progress: bool = False) -> LayerWeights:
    """Read one MoE layer's router, shared expert and this rank's experts [rank*E/W, (rank+1)*E/W)."""
    e_total, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    try:
        n_local = local_expert_count(e_total, rank, world_size)
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:  # the keys' index: any layer of the file
        raise CheckpointError(f"layer: expected a layer index >= 0, got {layer!r}")
    begin = rank * n_local
    nm = reader.naming
    is_hash = layer < cfg.num_hash_layers

    router = {nm.router_key(layer, "weight"): (((e_total, h),), ("BF16", "F32", "F16"))}
    if cfg.topk_method == "noaux_tc" and not is_hash:  # a hash layer's gate has no bias (its table selects)
        router[nm.router_key(layer, "e_score_correction_bias")] = (((e_total,),), ("F32", "BF16"))
    if is_hash:
        router[nm.router_key(layer, "tid2eid")] = (((cfg.vocab_size, cfg.num_experts_per_tok),), ("I32", "I64"))
    experts = {}
    for e in range(begin, begin + n_local):
        experts.update(_mlp_keys(lambda p, t, e=e: nm.expert_key(layer, e, p, t), h, i))
    shared = _mlp_keys(lambda p, t: nm.shared_key(layer, p, t), h, cfg.shared_intermediate_size) \
        if cfg.n_shared_experts else {}
    reader.check({**router, **experts, **shared})

    stack = ExpertWeights.empty(n_local, h, i)
    shared_stack = ExpertWeights.empty(1, h, cfg.shared_intermediate_size) if shared else None
    tensor_names = ("weight", "weight_scale", "weight_scale_2", "input_scale")
    groups = [(stack, e - begin, [nm.expert_key(layer, e, p, t) for t in tensor_names], p)
              for e in range(begin, begin + n_local) for p in PROJECTIONS]
    if shared_stack is not None:
        groups += [(shared_stack, 0, [nm.shared_key(layer, p, t) for t in tensor_names], p) for p in PROJECTIONS]
    # closing: on an error the shards close now, not when the exception is gone
    with closing(reader.read([*router, *(k for g in groups for k in g[2])], desc=f"layer {layer} rank {rank}",
                             progress=progress)) as tensors:
        router_t = {key: next(tensors)[1] for key in router}
        for key in (nm.router_key(layer, "weight"), nm.router_key(layer, "e_score_correction_bias")):
            if key in router_t:
                _check_tensor(nvfp4.check_finite, router_t[key], key)
        l1_scales: list[torch.Tensor] = []
        for target, e, keys, proj in groups:
            weight, scale, scale_2, input_scale = (next(tensors)[1] for _ in keys)
            # The CUDA layout rejects NaN and negative block scales anyway; rejecting them here makes every backend
            # agree.
            _check_tensor(nvfp4.check_scale_bytes, scale, keys[1])
            _check_tensor(nvfp4.check_positive_scale, scale_2, keys[2])
            _check_tensor(partial(nvfp4.check_positive_scale, divisor=True), input_scale, keys[3])
            if scale.dtype == torch.uint8:
                scale = scale.view(torch.float8_e4m3fn)  # some exports store the scale bytes as U8
            target.set_expert(e, proj, weight, scale, scale_2)
            if proj == "down_proj":
                target.l2_input_scale[e] = input_scale.reshape(())
            else:
                l1_scales.append(input_scale.reshape(()).float())
    l1 = torch.stack(l1_scales).max()
    stack.l1_input_scale.copy_(l1)
    if shared_stack is not None:
        shared_stack.l1_input_scale.copy_(l1)
    bias_key = nm.router_key(layer, "e_score_correction_bias")
    tid_key = nm.router_key(layer, "tid2eid")
    tid2eid = router_t.get(tid_key)
    if tid2eid is not None:
        _check_tensor(lambda t, name: check_tid2eid(t, e_total, cfg.num_experts_per_tok, name), tid2eid, tid_key)
    return LayerWeights(router_t[nm.router_key(layer, "weight")],
                        router_t[bias_key].float() if bias_key in router_t else None,
                        None if tid2eid is None else tid2eid.to(torch.int32), stack, shared_stack)


def _check_tensor(check: Callable[[torch.Tensor, str], None], t: torch.Tensor, key: str) -> None:
    """A numerics rule on the checkpoint tensor `key`, its ValueError raised as a CheckpointError naming the key."""
    try:
        check(t, f"checkpoint: tensor {key!r}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None


# ---------------------------------------------------------------------------------------------- writer
def _quantized_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, calib: torch.Tensor,
                   limit: float | None) -> dict[str, dict[str, torch.Tensor]]:
    """ModelOpt tensors of one MLP, with input scales calibrated on `calib` activations."""
    h = swiglu(torch.cat([calib @ gate.t(), calib @ up.t()], dim=-1), limit)
    amax_in = calib.abs().amax() / (nvfp4.E2M1_MAX * nvfp4.E4M3_MAX)
    amax_h = h.abs().amax().clamp(min=1e-12) / (nvfp4.E2M1_MAX * nvfp4.E4M3_MAX)
    out = {}
    for proj, w, s in (("gate_proj", gate, amax_in), ("up_proj", up, amax_in), ("down_proj", down, amax_h)):
        q, sf, ws2 = nvfp4.quantize_weight(w)
        out[proj] = {"weight": q, "weight_scale": sf, "weight_scale_2": ws2.reshape(1),
                     "input_scale": s.float().reshape(1).clone()}
    return out


def write_synthetic_checkpoint(path: str | Path, cfg: ModelConfig, num_layers: int | None = None, seed: int = 0,
                               shards: int = 1, calib_tokens: int = 32) -> Path:
    """Write a random ModelOpt-NVFP4 checkpoint for `cfg` (index + `shards` files of contiguous experts).

    Weights are N(0, 1/fan_in); input scales are calibrated amaxes of random N(0, 1) hidden states.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    e_total, h, i, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    if shards <= 0 or e_total % shards:
        raise ValueError(f"shards: must divide n_routed_experts={e_total}, got {shards}")
    layers = cfg.num_moe_layers if num_layers is None else num_layers
    g = torch.Generator().manual_seed(seed)
    nm = Naming()
    files: list[dict[str, torch.Tensor]] = [{} for _ in range(shards + 1)]  # last: router + shared

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    def emit(bucket: dict, key_of: Callable[[str, str], str], mlp: dict) -> None:
        for proj, tensors in mlp.items():
            for name, t in tensors.items():
                bucket[key_of(proj, name)] = t

    for layer in range(layers):
        common = files[-1]
        common[nm.router_key(layer, "weight")] = rnd(e_total, h).to(torch.bfloat16)
        if layer < cfg.num_hash_layers:  # as DeepSeek-V4 exports: a table and no bias
            common[nm.router_key(layer, "tid2eid")] = torch.rand(cfg.vocab_size, e_total, generator=g) \
                .argsort(dim=1)[:, :k].to(torch.int32)
        elif cfg.topk_method == "noaux_tc":
            common[nm.router_key(layer, "e_score_correction_bias")] = 0.01 * torch.randn(e_total, generator=g)
        for e in range(e_total):
            mlp = _quantized_mlp(rnd(i, h), rnd(i, h), rnd(h, i), torch.randn(calib_tokens, h, generator=g),
                                 cfg.swiglu_limit)
            emit(files[e * shards // e_total], lambda p, t, e=e: nm.expert_key(layer, e, p, t), mlp)
        if cfg.n_shared_experts:
            si = cfg.shared_intermediate_size
            mlp = _quantized_mlp(rnd(si, h), rnd(si, h), rnd(h, si), torch.randn(calib_tokens, h, generator=g),
                                 cfg.swiglu_limit)
            emit(common, lambda p, t: nm.shared_key(layer, p, t), mlp)

    names = [f"model-{j + 1:05d}-of-{shards + 1:05d}.safetensors" for j in range(shards + 1)]
    weight_map = {}
    for name, tensors in zip(names, files):
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    quant = {"quant_algo": "NVFP4", "group_size": nvfp4.BLOCK}
    (path / "hf_quant_config.json").write_text(json.dumps({"quantization": quant}, indent=1))
    (path / "config.json").write_text(json.dumps({**asdict(cfg), "quantization_config": quant}, indent=1))
    return path


def synthetic_layer(cfg: ModelConfig, layer: int, rank: int, world_size: int, seed: int,
                    device: torch.device | str) -> LayerWeights:
    """An in-memory synthetic layer for model-sized runs: this rank's experts generated on `device`, each from
    its own seed, so every rank and the single-process reference agree without writing files."""
    e_total, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    n_local = local_expert_count(e_total, rank, world_size)
    if not 0 <= layer < cfg.num_moe_layers:
        raise ValueError(f"layer: expected 0..{cfg.num_moe_layers - 1} (model.num_moe_layers={cfg.num_moe_layers}), "
                         f"got {layer}")
    g = torch.Generator(device=device).manual_seed(seed * 7919 + layer)
    router = (torch.randn(e_total, h, generator=g, device=device) / math.sqrt(h)).to(torch.bfloat16)
    bias = tid2eid = None
    if layer < cfg.num_hash_layers:
        tid2eid = torch.rand(cfg.vocab_size, e_total, generator=g, device=device).argsort(dim=1)[
            :, :cfg.num_experts_per_tok].to(torch.int32)
    elif cfg.topk_method == "noaux_tc":
        bias = 0.01 * torch.randn(e_total, generator=g, device=device)
    experts = ExpertWeights.synthetic(range(rank * n_local, (rank + 1) * n_local), h, i, seed + layer, device)
    shared = ExpertWeights.synthetic(range(e_total, e_total + 1), h, cfg.shared_intermediate_size, seed + layer,
                                     device) if cfg.n_shared_experts else None
    return LayerWeights(router, bias, tid2eid, experts, shared)
