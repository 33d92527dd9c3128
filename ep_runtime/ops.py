"""Validated Python entry points over the expert kernels of `ep_runtime._C`, registered as torch.library ops.

csrc/ takes raw pointers, so every tensor is checked here (dtype, shape, contiguity, 16-byte alignment,
device) before its address crosses the boundary; a bad argument raises TypeError (dtype) or ValueError
(everything else) naming the argument, what was expected and what it got, before any CUDA call. The kernels
write into caller-provided outputs (preallocated workspaces keep CUDA-graph addresses fixed), so the ops
are registered as mutating torch.library ops (the `*_op` objects, unchecked) whose fake implementations do
nothing: torch.compile and graph capture see one opaque op per kernel.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from . import nvfp4

_NS = "ep_runtime"
ALIGN_BYTES = 16
SCALE_DTYPES = (torch.float8_e4m3fn, torch.uint8)  # UE4M3 bytes (uint8 holds the same bit patterns)
EPILOGUES = {"gate_up": 0, "nvfp4": 1, "bf16": 2, "fp32": 3}
BLOCK_NS = (8, 16, 32, 64, 128)  # slots per tile
BLOCK_MS = (0, 64, 128, 256)  # weight rows per tile; 0: the kernel picks
MAX_ROUTE_TOP_K = 32  # route_v4 keeps a token's experts one per lane of a warp
MAX_ROUTE_EXPERTS = 1536  # route_v4's selection keeps 8 tokens' scores in 48 KB of shared memory (kMaxRouteExperts)
ROUTER_LOGITS_MAX_TOKENS = 4  # routing.Router's tokens up to which router_logits beats torch.mm (H200, with route_v4)
MAX_LOCAL_EXPERTS = 1024  # experts one grouped launch or moe_align takes (kMaxExperts in csrc/grouped_gemm_sm90.cu)
MIN_WIDE_BLOCK_N = 32  # slot tiles from this width on may take 256 rows (kMinWideSlots in csrc/grouped_gemm_sm90.cu)
# The K split of launches of few tiles (schedule_units in csrc/grouped_gemm_sm90.cu), per SM: the pieces' sums of its
# resident CTAs (three of 128 x 8 or two of 128 x 16 outputs) and an arrival count per tile of a launch that splits
# (at most half as many tiles as resident CTAs). A smaller workspace only splits less.
SPLIT_SUMS_PER_SM = 4096
SPLIT_TILES_PER_SM = 2


def extension_available(*symbols: str) -> bool:
    """An sm_90 GPU is visible and ep_runtime._C was built (and has these functions)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return False
    try:
        from . import _C
    except ImportError:
        return False
    return all(hasattr(_C, s) for s in symbols)


def _ext():
    from . import _C

    return _C


def set_programmatic_launch(enabled: bool) -> bool:
    """Turns programmatic dependent launch of this package's kernels on (the default) or off for the process, and
    returns the previous setting.

    With it on, each kernel may be scheduled while the kernel before it on the stream is ending: its CTAs take the
    SMs as they free up and set up, and wait for that kernel before touching memory (csrc/launch.h). The results
    are the same bits either way. A CUDA graph keeps the setting it was captured with."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    return _ext().set_programmatic_launch(enabled)


@contextlib.contextmanager
def programmatic_launch(enabled: bool) -> Iterator[None]:
    """set_programmatic_launch(enabled) for the body of a with statement, the previous setting restored after it."""
    previous = set_programmatic_launch(enabled)
    try:
        yield
    finally:
        set_programmatic_launch(previous)


def launch(kernel: str, device: torch.device, *args: object) -> None:
    """_C.<kernel>(*args, stream) on `device` and its current stream.

    The tensors' device need not be the caller's current one, and csrc/ launches on the current device (sizing
    grids by its SM count), so every kernel of this package goes through here. It runs on every eager forward: the
    raw stream handle (what Triton's launcher reads too) costs a tenth of a torch.cuda.Stream object."""
    index = device.index
    with contextlib.nullcontext() if index == torch.cuda.current_device() else torch.cuda.device(device):
        getattr(_ext(), kernel)(*args, torch._C._cuda_getCurrentRawStream(index))


def check_tensor(t: object, name: str, dtype: torch.dtype | Sequence[torch.dtype],
                 shape: Sequence[int | None] | None = None) -> torch.Tensor:
    """Validates one tensor argument's dtype, shape, layout and alignment; None in shape matches any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape))):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}")
    if t.requires_grad and torch.is_grad_enabled():  # the kernels have no backward: their outputs would carry no grad
        raise ValueError(f"{name}: expected a tensor that does not require grad (the kernels run forward only; call "
                         f"under torch.no_grad() or pass .detach()), got one that requires grad")
    misaligned = _misalignment(t) if t.numel() else 0
    if misaligned:
        raise ValueError(f"{name}: expected a {ALIGN_BYTES}-byte aligned data pointer, got address % "
                         f"{ALIGN_BYTES} = {misaligned}")
    return t


def _misalignment(t: torch.Tensor) -> int:
    """Bytes past a 16-byte boundary. A fake tensor (torch.compile, FakeTensorMode) has no address: allocations
    start aligned, so its offset into its storage decides."""
    if is_fake(t):
        return t.storage_offset() * t.element_size() % ALIGN_BYTES
    return t.data_ptr() % ALIGN_BYTES


def check_one_value(t: object, name: str) -> torch.Tensor:
    """Validates an fp32 scalar held on the device, of any shape with one element."""
    check_tensor(t, name, torch.float32)
    if t.numel() != 1:
        raise ValueError(f"{name}: expected one value, got shape {tuple(t.shape)}")
    return t


def check_block_scales(scale: object, name: str, rows: int, k: int) -> None:
    """Block scales of a (rows, k) NVFP4 tensor: UE4M3 bytes (rows, k/16) or packed int32 words (rows, k/64)."""
    if isinstance(scale, torch.Tensor) and scale.dtype == torch.int32:
        check_tensor(scale, name, torch.int32, (rows, k // 64))
    else:
        check_tensor(scale, name, SCALE_DTYPES, (rows, k // 16))


def _is_int(value: object) -> bool:
    """An int the ops' schemas take: a float 2.0 would fail in the dispatcher, and a bool pass as 0 or 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: object, name: str, lo: int, hi: int) -> int:
    """An int argument in [lo, hi]."""
    if not _is_int(value) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {value!r}")
    return value


def check_top_k(k: int, n: int, name: str = "k") -> None:
    if not _is_int(k) or not 1 <= k <= n:
        raise ValueError(f"{name}: expected 1..{n} (the scores per row), got {k!r}")


def check_swiglu_limit(limit: float | None) -> None:
    """None (no clamp) or a finite positive number: the kernels' fminf would clamp nothing to a NaN limit where
    the reference's clamp makes everything NaN."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not math.isfinite(limit) or limit <= 0):
        raise ValueError(f"swiglu_limit: expected None or a finite number > 0, got {limit!r}")


def refuse_host_checks_while_capturing(t: object) -> None:
    """Checks that read device values sync with the host, which a CUDA graph being captured cannot: refused with
    check=True while t's device is capturing on the current stream."""
    if isinstance(t, torch.Tensor) and t.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError("check: expected False while a CUDA graph is captured (torch.cuda.graph, torch.compile's "
                         "mode='reduce-overhead'): its checks sync with the host, got True")


def check_in_range(t: torch.Tensor, name: str, lo: int, hi: int, what: str = "values") -> None:
    """Host check (a sync): every value of the integer tensor t lies in [lo, hi)."""
    refuse_host_checks_while_capturing(t)
    if t.numel():
        least, most = int(t.min()), int(t.max())
        if least < lo or most >= hi:
            raise ValueError(f"{name}: expected {what} in [{lo}, {hi}), got values in [{least}, {most}]")


def check_same_device(named: dict[str, torch.Tensor | None]) -> None:
    """All tensors on one CUDA device, the first one's (wrappers check it last, so layout errors are reported first)."""
    devices = {n: t.device for n, t in named.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d.type != "cuda":
            raise ValueError(f"{n}: expected a CUDA tensor, got device {d}")
        if d != first:
            raise ValueError(f"{n}: expected device {first} (the device of {first_name}), got {d}")


def check_operands(written: dict[str, torch.Tensor | None], read: dict[str, torch.Tensor | None]) -> None:
    """Last check of a kernel's wrapper: what it writes apart from everything else (check_apart), and every tensor on
    one CUDA device (the read ones named first)."""
    check_apart(written, read)
    check_same_device({**read, **written})


def check_apart(written: dict[str, torch.Tensor | None], read: dict[str, torch.Tensor | None]) -> None:
    """No tensor a kernel writes shares a byte with another it writes or reads: the kernels take restrict pointers,
    and a store could land before a load of the same bytes. The tensors are contiguous (check_tensor); fake and meta
    tensors (torch.compile's tracing) have no addresses to compare."""
    def span(t: torch.Tensor) -> tuple[int, int]:
        return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()

    def located(named: dict[str, torch.Tensor | None]) -> list[tuple[str, torch.Tensor]]:
        return [(n, t) for n, t in named.items() if t is not None and t.numel() and not is_fake(t)
                and t.device.type != "meta"]

    outs, ins = located(written), located(read)
    for i, (a, ta) in enumerate(outs):
        a0, a1 = span(ta)
        for b, tb, use in [(n, t, "writes") for n, t in outs[i + 1:]] + [(n, t, "reads") for n, t in ins]:
            b0, b1 = span(tb)
            if ta.device == tb.device and min(a1, b1) > max(a0, b0):
                raise ValueError(f"{a}: expected memory apart from {b}, got {min(a1, b1) - max(a0, b0)} bytes in "
                                 f"common (the kernel writes {a} while it {use} {b})")


def _multiple(value: int, m: int, name: str) -> None:
    if value <= 0 or value % m:
        raise ValueError(f"{name}: expected a positive multiple of {m}, got {value}")


# ---- the registered ops (no validation here: the public wrappers below, or a caller that checked its arguments
# once, as cuda_experts.CudaExpertStage does, validate) ----

_LIB = torch.library.Library(_NS, "DEF")


def define_op(schema: str, impl: Callable[..., object], fake: Callable[..., object] | None = None
              ) -> torch._ops.OpOverload:
    """Registers ep_runtime::<schema>, a kernel launch writing into its `Tensor(a!)` arguments, with impl for every
    device and a fake that does nothing (torch.compile and CUDA-graph capture see one opaque op); returns the op.
    An op that returns tensors passes the fake that makes them (shapes only).

    Plain torch.library.Library ops rather than torch.library.custom_op, whose Python layers (alias checks,
    autograd and version-counter wrappers) cost several times the dispatch itself on every launch of every eager
    forward."""
    name = schema[: schema.index("(")]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{_NS}::{name}", fake or (lambda *args, **kwargs: None), lib=_LIB)
    return getattr(getattr(torch.ops, _NS), name).default


def _moe_align_impl(topk_idx: torch.Tensor, num_local: int, expert_begin: int, counts: torch.Tensor,
                    offsets: torch.Tensor, slot_pair: torch.Tensor, pair_slot: torch.Tensor) -> None:
    t, k = topk_idx.shape
    launch("moe_align", topk_idx.device, topk_idx.data_ptr(), t, k, num_local, expert_begin, counts.data_ptr(),
           offsets.data_ptr(), slot_pair.data_ptr(), pair_slot.data_ptr())


def _dequant_impl(data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    launch("nvfp4_dequant_rows", out.device, data.data_ptr(), scale.data_ptr(), out.shape[0], out.shape[1],
           out.data_ptr())


def _l1_impl(w13: torch.Tensor, w13_scale: torch.Tensor, w13_alpha: torch.Tensor, act: torch.Tensor,
             x_gs: torch.Tensor | None, offsets: torch.Tensor, slot_pair: torch.Tensor, topk: int, epilogue: int,
             swiglu_limit: float, h_gs: torch.Tensor | None, out_f32: torch.Tensor, hq_data: torch.Tensor,
             hq_scale: torch.Tensor, h_bf16: torch.Tensor, split_sums: torch.Tensor, split_arrivals: torch.Tensor,
             max_pieces: int, block_n: int, block_m: int) -> None:
    e, n2, kh = w13.shape
    launch("grouped_l1", w13.device, w13.data_ptr(), w13_scale.data_ptr(), w13_alpha.data_ptr(), act.data_ptr(),
           0 if x_gs is None else x_gs.data_ptr(), offsets.data_ptr(), slot_pair.data_ptr(), topk, e, 2 * kh,
           n2 // 2, slot_pair.shape[0], epilogue, swiglu_limit, 0 if h_gs is None else h_gs.data_ptr(),
           out_f32.data_ptr(), hq_data.data_ptr(), hq_scale.data_ptr(), h_bf16.data_ptr(), split_sums.data_ptr(),
           split_sums.numel(), split_arrivals.data_ptr(), split_arrivals.numel(), max_pieces, block_n, block_m)


def _l2_impl(w2: torch.Tensor, w2_scale: torch.Tensor, w2_alpha: torch.Tensor, act: torch.Tensor,
             h_gs: torch.Tensor | None, offsets: torch.Tensor, y_slot: torch.Tensor, block_n: int,
             block_m: int) -> None:
    e, h, ih = w2.shape
    launch("grouped_l2", w2.device, w2.data_ptr(), w2_scale.data_ptr(), w2_alpha.data_ptr(), act.data_ptr(),
           0 if h_gs is None else h_gs.data_ptr(), offsets.data_ptr(), e, h, 2 * ih, y_slot.shape[0],
           y_slot.data_ptr(), block_n, block_m)


def _requant_impl(h_f32: torch.Tensor, offsets: torch.Tensor, amax_ws: torch.Tensor, hq_data: torch.Tensor,
                  hq_scale: torch.Tensor, h_bf16: torch.Tensor, h_gs: torch.Tensor) -> None:
    s, i = h_f32.shape
    launch("requant_dynamic", h_f32.device, h_f32.data_ptr(), offsets.data_ptr(), offsets.shape[0] - 1, i, s,
           amax_ws.data_ptr(), hq_data.data_ptr(), hq_scale.data_ptr(), h_bf16.data_ptr(), h_gs.data_ptr())


def _combine_impl(y_slot: torch.Tensor, pair_slot: torch.Tensor, topk_weights: torch.Tensor,
                  addend: torch.Tensor | None, addend_begin: int, out: torch.Tensor) -> None:
    t, k = topk_weights.shape
    launch("moe_combine", out.device, y_slot.data_ptr(), pair_slot.data_ptr(), topk_weights.data_ptr(), t, k,
           out.shape[1], 0 if addend is None else addend.data_ptr(), addend_begin,
           0 if addend is None else addend.shape[0], out.data_ptr(), out.dtype == torch.bfloat16)


def _topk_impl(scores: torch.Tensor, out: torch.Tensor) -> None:
    rows, n = scores.shape
    launch("topk_stable", scores.device, scores.data_ptr(), rows, n, out.shape[1], out.data_ptr())


def _route_v4_impl(logits: torch.Tensor, bias: torch.Tensor | None, given_ids: torch.Tensor | None, scaling: float,
                   ids: torch.Tensor, weights: torch.Tensor) -> None:
    rows, n = logits.shape
    launch("route_v4", logits.device, logits.data_ptr(), 0 if bias is None else bias.data_ptr(),
           0 if given_ids is None else given_ids.data_ptr(), rows, n, ids.shape[1], scaling, ids.data_ptr(),
           weights.data_ptr())


def _router_logits_impl(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    t, h = hidden.shape
    launch("router_logits", hidden.device, hidden.data_ptr(), weight.data_ptr(), t, weight.shape[0], h,
           out.data_ptr())


moe_align_op = define_op("moe_align(Tensor topk_idx, int num_local, int expert_begin, Tensor(a!) counts, "
                         "Tensor(b!) offsets, Tensor(c!) slot_pair, Tensor(d!) pair_slot) -> ()", _moe_align_impl)
dequant_rows_op = define_op("nvfp4_dequant_rows(Tensor data, Tensor scale, Tensor(a!) out) -> ()", _dequant_impl)
grouped_l1_op = define_op(
    "grouped_l1(Tensor w13, Tensor w13_scale, Tensor w13_alpha, Tensor act, Tensor? x_gs, Tensor offsets, "
    "Tensor slot_pair, int topk, int epilogue, float swiglu_limit, Tensor? h_gs, Tensor(a!) out_f32, "
    "Tensor(b!) hq_data, Tensor(c!) hq_scale, Tensor(d!) h_bf16, Tensor(e!) split_sums, Tensor(f!) split_arrivals, "
    "int max_pieces, int block_n, int block_m) -> ()", _l1_impl)
grouped_l2_op = define_op("grouped_l2(Tensor w2, Tensor w2_scale, Tensor w2_alpha, Tensor act, Tensor? h_gs, "
                          "Tensor offsets, Tensor(a!) y_slot, int block_n, int block_m) -> ()", _l2_impl)
requant_dynamic_op = define_op(
    "requant_dynamic(Tensor h_f32, Tensor offsets, Tensor(a!) amax_ws, Tensor(b!) hq_data, Tensor(c!) hq_scale, "
    "Tensor(d!) h_bf16, Tensor(e!) h_gs) -> ()", _requant_impl)
combine_op = define_op("combine(Tensor y_slot, Tensor pair_slot, Tensor topk_weights, Tensor? addend, "
                       "int addend_begin, Tensor(a!) out) -> ()", _combine_impl)
topk_stable_op = define_op("topk_stable(Tensor scores, Tensor(a!) out) -> ()", _topk_impl)
route_v4_op = define_op("route_v4(Tensor logits, Tensor? bias, Tensor? given_ids, float scaling, Tensor(a!) ids, "
                        "Tensor(b!) weights) -> ()", _route_v4_impl)
router_logits_op = define_op("router_logits(Tensor hidden, Tensor weight, Tensor(a!) out) -> ()",
                             _router_logits_impl)


# ---- validated public API ----

def moe_align(topk_idx: torch.Tensor, num_local: int, expert_begin: int, counts: torch.Tensor,
              offsets: torch.Tensor, slot_pair: torch.Tensor, pair_slot: torch.Tensor,
              num_experts_total: int | None = None, check: bool = False) -> None:
    """Slot metadata of experts.map_slots on the device: counts (E,), offsets (E+1,), slot_pair (T*k,) and its
    inverse pair_slot (T*k,) (-1 for pairs of other ranks). check=True validates the ids (host sync)."""
    check_tensor(topk_idx, "topk_idx", torch.int32, (None, None))
    t, k = topk_idx.shape
    check_int(num_local, "num_local", 1, MAX_LOCAL_EXPERTS)
    check_int(expert_begin, "expert_begin", 0, 2**31 - 1 - num_local)  # the kernel's expert ids are int32
    check_tensor(counts, "counts", torch.int32, (num_local,))
    check_tensor(offsets, "offsets", torch.int32, (num_local + 1,))
    check_tensor(slot_pair, "slot_pair", torch.int32, (t * k,))
    check_tensor(pair_slot, "pair_slot", torch.int32, (t * k,))
    check_operands(dict(counts=counts, offsets=offsets, slot_pair=slot_pair, pair_slot=pair_slot),
                   dict(topk_idx=topk_idx))
    if check:
        total = num_experts_total if num_experts_total is not None else expert_begin + num_local
        check_in_range(topk_idx, "topk_idx", 0, total, "expert ids")
    moe_align_op(topk_idx, num_local, expert_begin, counts, offsets, slot_pair, pair_slot)


def nvfp4_dequant_rows(data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """out (R, K) bf16 = decode(data) * scale (no global scale). scale: UE4M3 (R, K/16) or packed int32 (R, K/64)."""
    check_tensor(data, "data", torch.uint8, (None, None))
    r, kh = data.shape
    _multiple(2 * kh, 64, "data.shape[1] * 2 (K)")
    check_block_scales(scale, "scale", r, 2 * kh)
    check_tensor(out, "out", torch.bfloat16, (r, 2 * kh))
    check_operands(dict(out=out), dict(data=data, scale=scale))
    dequant_rows_op(data, scale, out)


def check_tiles(block_n: int, block_m: int, rows: int) -> None:
    if not _is_int(block_m):  # 64.0 == 64 passes the membership test below
        raise ValueError(f"block_m: expected one of {BLOCK_MS}, got {block_m!r}")
    if not _is_int(block_n) or block_n not in BLOCK_NS:
        raise ValueError(f"block_n: expected one of {BLOCK_NS}, got {block_n}")
    wide = block_n >= MIN_WIDE_BLOCK_N
    if block_m not in BLOCK_MS or (block_m > 64 and rows % block_m) or (block_m == 256 and not wide):
        raise ValueError(f"block_m: expected one of {BLOCK_MS} (128 or 256 only where it divides the weight row "
                         f"count {rows}; 256 only with block_n >= {MIN_WIDE_BLOCK_N}), got {block_m} with block_n "
                         f"{block_n}")


def split_workspace(device: torch.device | str, enabled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A K-split workspace for grouped_l1 on device: (split_sums, split_arrivals), fp32 sums for every SM's resident
    CTAs and zeroed int32 arrival counts; empty (no split) off CUDA or where not enabled."""
    dev = torch.device(device)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if enabled and dev.type == "cuda" else 0
    return (torch.empty(sms * SPLIT_SUMS_PER_SM, dtype=torch.float32, device=dev),
            torch.zeros(sms * SPLIT_TILES_PER_SM, dtype=torch.int32, device=dev))


def check_split(split_sums: torch.Tensor | None, split_arrivals: torch.Tensor | None,
                prefix: str = "") -> None:
    """The K split's workspace: both tensors or neither (no split); fp32 sums and int32 arrival counts, which must
    be zero (as split_workspace makes them; every launch leaves them so). prefix names their owner."""
    sums, arrivals = prefix + "split_sums", prefix + "split_arrivals"
    if (split_sums is None) != (split_arrivals is None):
        raise ValueError(f"{sums}, {arrivals}: expected both or neither, got "
                         f"{sums if split_sums is not None else arrivals} alone")
    if split_sums is not None:
        check_tensor(split_sums, sums, torch.float32, (None,))
        check_tensor(split_arrivals, arrivals, torch.int32, (None,))


def _check_slots(offsets: torch.Tensor, e: int, name: str = "offsets") -> None:
    check_tensor(offsets, name, torch.int32, (e + 1,))


def check_slot_offsets(offsets: torch.Tensor, slots: int, name: str = "offsets") -> int:
    """Host check (a sync) of slot offsets made on the device, as moe_align makes them: the exclusive prefix sum of
    per-expert slot counts, so 0 first, never decreasing, and at most `slots` (the rows the outputs reserve): the
    kernels write the rows the offsets name and trust them. Returns the slots in use, offsets[-1]."""
    refuse_host_checks_while_capturing(offsets)
    o = offsets.tolist()
    bad = next((e for e in range(1, len(o)) if o[e] < o[e - 1]), None)
    if o[0] != 0 or bad is not None or o[-1] > slots:
        got = (f"{name}[0] = {o[0]}" if o[0] != 0 else
               f"{name}[{bad}] = {o[bad]} after {name}[{bad - 1}] = {o[bad - 1]}" if bad is not None else
               f"{name}[{len(o) - 1}] = {o[-1]}")
        raise ValueError(f"{name}: expected per-expert slot offsets (0 first, never decreasing, at most {slots} "
                         f"slots in all), got {got}")
    return o[-1]


def check_zeros(t: torch.Tensor, name: str, why: str) -> None:
    """Host check (a sync): a workspace the kernels expect zeroed."""
    refuse_host_checks_while_capturing(t)
    nonzero = int(torch.count_nonzero(t))
    if nonzero:
        raise ValueError(f"{name}: expected zeros ({why}), got {nonzero} nonzero entries")


def _check_scales(**scales: torch.Tensor | None) -> None:
    for name, t in scales.items():
        if t is not None:
            nvfp4.check_positive_scale(t, name, divisor=name.endswith("_gs"))  # global scales divide their values


def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=device)


def check_l1_weights(w13: torch.Tensor, w13_scale: torch.Tensor, w13_alpha: torch.Tensor,
                     prefix: str = "") -> tuple[int, int, int]:
    """L1's stacked weights (E, 2I, H/2), (E, 2I, H/16), (E, 2); returns (E, H, I). prefix names their owner."""
    check_tensor(w13, prefix + "w13", torch.uint8, (None, None, None))
    e, n2, kh = w13.shape
    check_int(e, prefix + "w13.shape[0] (experts)", 1, MAX_LOCAL_EXPERTS)
    if n2 % 2:
        raise ValueError(f"{prefix}w13: expected an even row count (I gate rows, then I up rows), got shape "
                         f"{tuple(w13.shape)}")
    hidden, inter = 2 * kh, n2 // 2
    _multiple(hidden, 64, prefix + "w13.shape[2] * 2 (hidden)")
    _multiple(inter, 64, prefix + "w13.shape[1] / 2 (intermediate)")
    check_tensor(w13_scale, prefix + "w13_scale", SCALE_DTYPES, (e, n2, hidden // 16))
    check_tensor(w13_alpha, prefix + "w13_alpha", torch.float32, (e, 2))
    return e, hidden, inter


def check_l2_weights(w2: torch.Tensor, w2_scale: torch.Tensor, w2_alpha: torch.Tensor,
                     prefix: str = "") -> tuple[int, int, int]:
    """L2's stacked weights (E, H, I/2), (E, H, I/16), (E,); returns (E, H, I). prefix names their owner."""
    check_tensor(w2, prefix + "w2", torch.uint8, (None, None, None))
    e, hidden, ih = w2.shape
    check_int(e, prefix + "w2.shape[0] (experts)", 1, MAX_LOCAL_EXPERTS)
    inter = 2 * ih
    _multiple(hidden, 64, prefix + "w2.shape[1] (hidden)")
    _multiple(inter, 64, prefix + "w2.shape[2] * 2 (intermediate)")
    check_tensor(w2_scale, prefix + "w2_scale", SCALE_DTYPES, (e, hidden, inter // 16))
    check_tensor(w2_alpha, prefix + "w2_alpha", torch.float32, (e,))
    return e, hidden, inter


def grouped_l1(w13: torch.Tensor, w13_scale: torch.Tensor, w13_alpha: torch.Tensor, act: torch.Tensor,
               x_gs: torch.Tensor | None, offsets: torch.Tensor, slot_pair: torch.Tensor, topk: int, epilogue: str,
               *, swiglu_limit: float | None = None, h_gs: torch.Tensor | None = None,
               out_f32: torch.Tensor | None = None, hq_data: torch.Tensor | None = None,
               hq_scale: torch.Tensor | None = None, h_bf16: torch.Tensor | None = None, block_n: int = 8,
               block_m: int = 0, split_sums: torch.Tensor | None = None, split_arrivals: torch.Tensor | None = None,
               max_pieces: int = 0, check: bool = False) -> None:
    """L1 of all local experts in one launch; slot s reads activation row slot_pair[s] // topk.

    w13, w13_scale: the stacked weights in the SM90 atom layout (sm90_layout.tile_), shapes unchanged.
    act: BF16 (T, H) (W4A16 input, or decode*sf of the NVFP4 input with x_gs its global scale, shape (1,)).
    epilogue 'gate_up': out_f32 (S, 2I) gate|up with alphas; 'nvfp4': h quantized with gs h_gs[e] (E,) into
    hq_data (S, I/2), hq_scale (S, I/16) and its exact BF16 copy h_bf16 (S, I); 'bf16': h_bf16; 'fp32': out_f32
    (S, I). S = slot_pair.shape[0] = T*topk rows are reserved; only offsets[E] are written.
    split_sums, split_arrivals (split_workspace; empty or None: no split): with them a launch of 8- or 16-slot
    tiles that would leave at least half of the GPU's resident CTAs idle cuts each tile's K range into up to four
    pieces on several CTAs (at most max_pieces, 0: the kernel's choice); the sums then add in another order, fixed
    by the launch's tile count. Concurrent launches need workspaces of their own.
    check=True also checks the values the kernel trusts (a host sync): offsets (check_slot_offsets), the used
    slot_pair entries, zeroed split_arrivals, and finite positive alphas and global scales.
    """
    e, hidden, inter = check_l1_weights(w13, w13_scale, w13_alpha)
    check_tensor(act, "act", torch.bfloat16, (None, hidden))
    if x_gs is not None:
        check_tensor(x_gs, "x_gs", torch.float32, (1,))
    _check_slots(offsets, e)
    check_tensor(slot_pair, "slot_pair", torch.int32, (None,))
    s = slot_pair.shape[0]
    check_int(topk, "topk", 1, 2**31 - 1)
    if s != act.shape[0] * topk:
        raise ValueError(f"slot_pair: expected {act.shape[0]} * topk={topk} entries (one per (token, k) pair), got {s}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue: expected one of {sorted(EPILOGUES)}, got {epilogue!r}")
    check_swiglu_limit(swiglu_limit)
    check_tiles(block_n, block_m, 2 * inter)
    check_split(split_sums, split_arrivals)
    if not _is_int(max_pieces) or max_pieces < 0:
        raise ValueError(f"max_pieces: expected an int >= 0 (0: any), got {max_pieces!r}")
    dev = w13.device
    if epilogue in ("gate_up", "fp32"):
        out_f32 = check_tensor(out_f32, "out_f32", torch.float32, (s, 2 * inter if epilogue == "gate_up" else inter))
    if epilogue == "nvfp4":
        check_tensor(h_gs, "h_gs", torch.float32, (e,))
        check_tensor(hq_data, "hq_data", torch.uint8, (s, inter // 2))
        check_tensor(hq_scale, "hq_scale", SCALE_DTYPES, (s, inter // 16))
    if epilogue in ("nvfp4", "bf16"):
        check_tensor(h_bf16, "h_bf16", torch.bfloat16, (s, inter))
    check_operands(dict(out_f32=out_f32, hq_data=hq_data, hq_scale=hq_scale, h_bf16=h_bf16, split_sums=split_sums,
                        split_arrivals=split_arrivals),
                   dict(w13=w13, w13_scale=w13_scale, w13_alpha=w13_alpha, act=act, x_gs=x_gs, offsets=offsets,
                        slot_pair=slot_pair, h_gs=h_gs))
    if check:
        used = check_slot_offsets(offsets, s)
        check_in_range(slot_pair[:used], "slot_pair", 0, s, "(token, k) pair indices")
        if split_arrivals is not None:
            check_zeros(split_arrivals, "split_arrivals", "as split_workspace makes them and every launch leaves them")
        _check_scales(w13_alpha=w13_alpha, x_gs=x_gs, h_gs=h_gs if epilogue == "nvfp4" else None)
    limit = float("inf") if swiglu_limit is None else float(swiglu_limit)
    grouped_l1_op(
        w13, w13_scale, w13_alpha, act, x_gs, offsets, slot_pair, topk, EPILOGUES[epilogue], limit,
        h_gs if epilogue == "nvfp4" else None,
        out_f32 if out_f32 is not None else _placeholder(dev, torch.float32),
        hq_data if hq_data is not None else _placeholder(dev, torch.uint8),
        hq_scale if hq_scale is not None else _placeholder(dev, torch.uint8),
        h_bf16 if h_bf16 is not None else _placeholder(dev, torch.bfloat16),
        split_sums if split_sums is not None else _placeholder(dev, torch.float32),
        split_arrivals if split_arrivals is not None else _placeholder(dev, torch.int32), max_pieces, block_n, block_m)


def grouped_l2(w2: torch.Tensor, w2_scale: torch.Tensor, w2_alpha: torch.Tensor, act: torch.Tensor,
               h_gs: torch.Tensor | None, offsets: torch.Tensor, y_slot: torch.Tensor, block_n: int = 8,
               block_m: int = 0, check: bool = False) -> None:
    """y_slot (S, H) fp32 = act (S, I) BF16 @ W2[e]^T * w2_alpha[e] / h_gs[e] (h_gs None: 1) for every slot.

    w2, w2_scale: in the SM90 atom layout (sm90_layout.tile_), shapes unchanged. check=True also checks the values
    the kernel trusts (a host sync): offsets (check_slot_offsets) and finite positive alphas and global scales."""
    e, hidden, inter = check_l2_weights(w2, w2_scale, w2_alpha)
    check_tensor(act, "act", torch.bfloat16, (None, inter))
    if h_gs is not None:
        check_tensor(h_gs, "h_gs", torch.float32, (e,))
    _check_slots(offsets, e)
    check_tensor(y_slot, "y_slot", torch.float32, (act.shape[0], hidden))
    check_tiles(block_n, block_m, hidden)
    check_operands(dict(y_slot=y_slot), dict(w2=w2, w2_scale=w2_scale, w2_alpha=w2_alpha, act=act, h_gs=h_gs,
                                              offsets=offsets))
    if check:
        check_slot_offsets(offsets, act.shape[0])
        _check_scales(w2_alpha=w2_alpha, h_gs=h_gs)
    grouped_l2_op(w2, w2_scale, w2_alpha, act, h_gs, offsets, y_slot, block_n, block_m)


def requant_dynamic(h_f32: torch.Tensor, offsets: torch.Tensor, amax_ws: torch.Tensor, hq_data: torch.Tensor,
                    hq_scale: torch.Tensor, h_bf16: torch.Tensor, h_gs: torch.Tensor, check: bool = False) -> None:
    """Dynamic L2 scale: h_gs[e] = 2688 / amax over expert e's slots of h (0 -> 1), then h -> NVFP4 + BF16 copy.
    check=True also checks the offsets, which the kernels trust (check_slot_offsets; a host sync)."""
    check_tensor(h_f32, "h_f32", torch.float32, (None, None))
    s, inter = h_f32.shape
    _multiple(inter, 64, "h_f32.shape[1] (intermediate)")
    check_tensor(offsets, "offsets", torch.int32, (None,))
    e = offsets.shape[0] - 1
    if e < 1:
        raise ValueError(f"offsets: expected E+1 >= 2 entries, got {offsets.shape[0]}")
    check_tensor(amax_ws, "amax_ws", torch.int32, (e,))
    check_tensor(hq_data, "hq_data", torch.uint8, (s, inter // 2))
    check_tensor(hq_scale, "hq_scale", SCALE_DTYPES, (s, inter // 16))
    check_tensor(h_bf16, "h_bf16", torch.bfloat16, (s, inter))
    check_tensor(h_gs, "h_gs", torch.float32, (e,))
    check_operands(dict(amax_ws=amax_ws, hq_data=hq_data, hq_scale=hq_scale, h_bf16=h_bf16, h_gs=h_gs),
                   dict(h_f32=h_f32, offsets=offsets))
    if check:
        check_slot_offsets(offsets, s)
    requant_dynamic_op(h_f32, offsets, amax_ws, hq_data, hq_scale, h_bf16, h_gs)


def combine(y_slot: torch.Tensor, pair_slot: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor,
            addend: torch.Tensor | None = None, addend_begin: int = 0, check: bool = False) -> None:
    """out[t] = sum over j ascending of topk_weights[t, j] * y_slot[pair_slot[t*k + j]] (fp32), pairs with slot -1
    skipped (0 without local slots), plus addend[t - addend_begin] (fp32 (rows, hidden), e.g. the shared expert's
    output) for t in [addend_begin, addend_begin + rows), then cast. y_slot has a row per pair: any slot in
    [0, T*k) may be read. check=True also checks that pair_slot's entries are -1 or such slots (a host sync)."""
    check_tensor(topk_weights, "topk_weights", torch.float32, (None, None))
    t, k = topk_weights.shape
    if k < 1:
        raise ValueError(f"topk_weights: expected at least one column (topk >= 1), got shape {(t, k)}")
    check_tensor(y_slot, "y_slot", torch.float32, (t * k, None))
    hidden = y_slot.shape[1]
    _multiple(hidden, 64, "y_slot.shape[1] (hidden)")
    check_tensor(pair_slot, "pair_slot", torch.int32, (t * k,))
    check_tensor(out, "out", (torch.float32, torch.bfloat16), (t, hidden))
    check_addend(addend, addend_begin, t, hidden)
    check_operands(dict(out=out), dict(y_slot=y_slot, pair_slot=pair_slot, topk_weights=topk_weights, addend=addend))
    if check:
        check_in_range(pair_slot, "pair_slot", -1, t * k, "slots (or -1)")
    combine_op(y_slot, pair_slot, topk_weights, addend, addend_begin, out)


def check_addend(addend: torch.Tensor | None, begin: int, num_tokens: int, hidden: int) -> None:
    """An addend of combine: fp32 rows [begin, begin + rows) of the (num_tokens, hidden) output."""
    if addend is None:
        return
    check_tensor(addend, "addend", torch.float32, (None, hidden))
    if addend.shape[0] > num_tokens:
        raise ValueError(f"addend: expected at most the {num_tokens} tokens' rows, got {addend.shape[0]}")
    if not _is_int(begin) or not 0 <= begin <= num_tokens - addend.shape[0]:
        raise ValueError(f"addend_begin: expected an int in [0, {num_tokens - addend.shape[0]}] so that the addend's "
                         f"{addend.shape[0]} rows lie within the {num_tokens} tokens, got {begin!r}")


def topk_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, k) int64 indices of each row's k largest scores, in the order of a stable descending sort (the lower
    index first among equal scores, NaN above everything): torch.sort(scores, descending=True,
    stable=True).indices[:, :k] without the full sort."""
    check_tensor(scores, "scores", torch.float32, (None, None))
    check_top_k(k, scores.shape[1])
    check_same_device(dict(scores=scores))
    out = torch.empty(scores.shape[0], k, dtype=torch.int64, device=scores.device)
    topk_stable_op(scores, out)
    return out


def route_v4(logits: torch.Tensor, bias: torch.Tensor | None, scaling: float, ids: torch.Tensor,
             weights: torch.Tensor, given_ids: torch.Tensor | None = None) -> None:
    """DeepSeek-V4 routing (NVFP4_SPEC section 6) of fp32 router logits (T, E) in one kernel, into int32 ids and
    fp32 weights (T, k): sqrt(softplus) scores as torch computes them; the k experts of the best biased scores in
    the order topk_stable gives, or given_ids (T, k) int32 (hash layers; an id outside [0, E) gets a NaN weight);
    weights = score / (sum of the k scores, added in ascending k, + 1e-20) * scaling. k <= MAX_ROUTE_TOP_K, and
    E <= MAX_ROUTE_EXPERTS where the kernel selects."""
    check_tensor(logits, "logits", torch.float32, (None, None))
    t, n = logits.shape
    if given_ids is None and n > MAX_ROUTE_EXPERTS:
        raise ValueError(f"logits.shape[1] (experts): expected at most {MAX_ROUTE_EXPERTS} where the kernel selects "
                         f"(no given_ids), got {n}")
    check_tensor(ids, "ids", torch.int32, (t, None))
    check_top_k(ids.shape[1], min(n, MAX_ROUTE_TOP_K), "ids.shape[1] (k)")
    check_tensor(weights, "weights", torch.float32, tuple(ids.shape))
    if bias is not None:
        check_tensor(bias, "bias", torch.float32, (n,))
    if given_ids is not None:
        check_tensor(given_ids, "given_ids", torch.int32, tuple(ids.shape))
    check_operands(dict(ids=ids, weights=weights), dict(logits=logits, bias=bias, given_ids=given_ids))
    route_v4_op(logits, bias, given_ids, float(scaling), ids, weights)


def router_logits(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """fp32 router logits (T, E) = bf16 hidden (T, H) times bf16 weight (E, H) transposed, into out: the exact
    products summed in fp32 in a fixed order (every run gives the same bits), streaming the weight once. For a few
    tokens (routing.Router uses it up to ROUTER_LOGITS_MAX_TOKENS), where a GEMM library's tiles idle. H: a multiple
    of 8."""
    check_tensor(hidden, "hidden", torch.bfloat16, (None, None))
    t, h = hidden.shape
    if h % 8 or not h:
        raise ValueError(f"hidden: expected a hidden size that is a positive multiple of 8 (16-byte rows), got {h}")
    check_tensor(weight, "weight", torch.bfloat16, (None, h))
    check_tensor(out, "out", torch.float32, (t, weight.shape[0]))
    check_operands(dict(out=out), dict(hidden=hidden, weight=weight))
    router_logits_op(hidden, weight, out)
