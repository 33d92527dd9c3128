"""NVFP4 numerics, exactly as ../shared/NVFP4_SPEC.md sections 1-2 define them.

Every other path (CUDA kernels, checkpoint writer, reference MoE) is checked against these functions, so
they favour obviousness over speed: thresholds instead of bit tricks, fp32 throughout, and conversions
between bytes and float8 only ever by bit reinterpretation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK = 16  # elements per UE4M3 block scale

# Magnitudes of E2M1 codes 0..7; code | 8 is the negative (code 8 is -0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Round-to-nearest-even boundaries between consecutive magnitudes. At a tie the even code wins, so the
# comparison is `>` where the lower code is even (ties stay down) and `>=` where it is odd (ties go up).
_E2M1_BOUNDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


@dataclass
class NVFP4Tensor:
    """A quantized (..., K) tensor: packed codes, block scales and its fp32 global scale."""

    data: torch.Tensor  # uint8 (..., K/2), element 2i in the low nibble
    scale: torch.Tensor  # float8_e4m3fn (..., K/16)
    global_scale: torch.Tensor  # fp32, 0-d (a per-row-group tensor where a caller documents so)


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """fp32 values -> E2M1 codes (uint8 0..15), round-to-nearest-even, saturating at 6, sign kept."""
    a = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for bound, ties_up in _E2M1_BOUNDS:
        code += (a >= bound if ties_up else a > bound).to(torch.uint8)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) -> fp32 values."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) codes -> (..., K/2) bytes, element 2i in the low nibble."""
    _require_multiple(codes, 2, "codes")
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_nibbles(data: torch.Tensor) -> torch.Tensor:
    """(..., K/2) bytes -> (..., K) codes."""
    _require_dtype(data, torch.uint8, "data")
    return torch.stack((data & 0xF, data >> 4), dim=-1).flatten(-2)


def e4m3_from_float(v: torch.Tensor) -> torch.Tensor:
    """Non-negative fp32 -> UE4M3 (float8_e4m3fn), round-to-nearest-even, saturating at 448.

    torch's cast turns overflow into NaN, hence the clamp first.
    """
    return v.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn scales -> their uint8 bit patterns (reinterpretation, never a value cast)."""
    _require_dtype(scale, torch.float8_e4m3fn, "scale")
    return scale.view(torch.uint8)


def pack_scales_u32(scale: torch.Tensor) -> torch.Tensor:
    """(..., K/16) UE4M3 scales -> (..., K/64) int32 words, scale 4w in bits 0-7 of word w."""
    raw = scale_bytes(scale)
    if raw.shape[-1] % 4:
        raise ValueError(f"scale: last dimension must be a multiple of 4 to pack into words, got {raw.shape[-1]}")
    b = raw.to(torch.int64)
    words = b[..., 0::4] | (b[..., 1::4] << 8) | (b[..., 2::4] << 16) | (b[..., 3::4] << 24)
    return (words - ((words >= 2**31).to(torch.int64) << 32)).to(torch.int32)


def unpack_scales_u32(words: torch.Tensor) -> torch.Tensor:
    """(..., K/64) int32 words -> (..., K/16) float8_e4m3fn scales (bit reinterpretation)."""
    _require_dtype(words, torch.int32, "words")
    w = words.to(torch.int64) & 0xFFFFFFFF
    raw = torch.stack([(w >> s) & 0xFF for s in (0, 8, 16, 24)], dim=-1).flatten(-2)
    return raw.to(torch.uint8).view(torch.float8_e4m3fn)


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """t (..., K) as (..., K/16, 16): its scale blocks (the count spelled out, so that zero rows reshape too)."""
    return t.reshape(*t.shape[:-1], t.shape[-1] // BLOCK, BLOCK)


def dynamic_global_scale(x: torch.Tensor) -> torch.Tensor:
    """gs = 448*6 / amax(|x|) over the whole tensor; an all-zero tensor gets gs = 1."""
    amax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    return torch.where(amax > 0, _div(E4M3_MAX * E2M1_MAX, amax), torch.ones_like(amax))


def check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name}: expected finite values, found {x[tuple(bad)].item()} at index {bad}")


def check_positive_scale(t: torch.Tensor, name: str, divisor: bool = False) -> None:
    """A global scale (or input scale) divides or multiplies every value: it must be finite and positive. divisor: the
    runtime also divides by it (an input scale, an activation's global scale), so it must be a normal fp32 number
    (1 / a subnormal one is infinite: an expert whose outputs are all 0)."""
    v = t.float().reshape(-1)  # fp32: the kernels' scales (a float64 too small or large for it fails here)
    tiny = torch.finfo(torch.float32).tiny
    bad = ~(torch.isfinite(v) & (v >= tiny if divisor else v > 0))
    if bad.any():
        i = int(bad.nonzero()[0])
        index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), t.shape))
        where = "" if t.dim() == 0 else f" at index {index}"
        got, as_fp32 = str(t.reshape(-1)[i].item()), str(v[i].item())
        fp32 = "" if got == as_fp32 else f" (as fp32: {as_fp32})"
        if 0 < v[i] < tiny:
            fp32 += f" (below fp32's smallest normal number, {tiny}: its reciprocal is infinite)"
        raise ValueError(f"{name}: expected a finite positive scale, got {got}{fp32}{where}")


def check_scale_bytes(s: torch.Tensor, name: str) -> None:
    """Block scales (UE4M3 bytes, uint8 or float8_e4m3fn) are finite and not negative (the encoding has no sign)."""
    s = s.view(torch.uint8)
    bad = (s & 0x7F == 0x7F) | (s > 0x80)
    if bad.any():
        raise ValueError(f"{name}: block scales must be finite, non-negative UE4M3; found byte "
                         f"0x{int(s[bad][0]):02X} at {tuple(bad.nonzero()[0].tolist())}")


def positive_scale(value: float | torch.Tensor, name: str) -> torch.Tensor:
    """An input scale given as a number or tensor, as fp32, checked by check_positive_scale (a divisor)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: expected a number or a tensor, got {type(value).__name__}")
    t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
    if t.numel() != 1:
        raise ValueError(f"{name}: expected one value, got shape {tuple(t.shape)}")
    check_positive_scale(t, name, divisor=True)
    return t.float()


def quantize(x: torch.Tensor, global_scale: torch.Tensor | float | None = None, check: bool = True,
             name: str = "x") -> NVFP4Tensor:
    """Quantize (..., K) to NVFP4 along the last dimension (K a multiple of 16).

    global_scale None -> dynamic (amax) scale; otherwise the given fp32 scale (static: 1/input_scale).
    name: what errors call x (the caller's argument).
    """
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    _require_multiple(x, BLOCK, name)
    xf = x.float()
    if check:
        check_finite(xf, name)
    if global_scale is None:
        gs = dynamic_global_scale(xf)
    else:
        gs = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
        if gs.numel() != 1:
            raise ValueError(f"global_scale: expected one value, got shape {tuple(gs.shape)}")
        gs = gs.reshape(())
        if check:
            check_positive_scale(gs, "global_scale", divisor=True)
    blocks = _blocks(xf)
    sf = e4m3_from_float(_div(gs * blocks.abs().amax(-1), E2M1_MAX))
    sf_f = sf.float().unsqueeze(-1)
    # gs / sf first, in fp32, then one multiply per element: the kernels reproduce this exact order.
    ratio = torch.where(sf_f > 0, gs / sf_f, torch.zeros_like(sf_f))
    codes = e2m1_encode(blocks * ratio)
    codes = torch.where(sf_f > 0, codes, torch.zeros_like(codes)).reshape(xf.shape)
    return NVFP4Tensor(pack_nibbles(codes), sf, gs)


def block_dequantize(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """decode(q) * sf in fp32, without the global scale (each product is exact in BF16)."""
    vals = e2m1_decode(unpack_nibbles(data))
    _require_dtype(scale, torch.float8_e4m3fn, "scale")
    # one scale per 16 elements of each row: a broadcastable shape would silently reuse scales across rows
    want = (*data.shape[:-1], vals.shape[-1] // BLOCK)
    if vals.shape[-1] % BLOCK or tuple(scale.shape) != want:
        raise ValueError(f"scale: expected shape {want} (one per {BLOCK} elements of data of shape "
                         f"{tuple(data.shape)}), got {tuple(scale.shape)}")
    return (_blocks(vals) * scale.float().unsqueeze(-1)).reshape(vals.shape)


def dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat = decode(q) * sf / gs."""
    return (block_dequantize(q.data, q.scale) / q.global_scale.float()).to(dtype)


def _div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """a / b as one correctly rounded fp32 division on every device.

    Python-scalar operands are made tensors first: torch evaluates `float / tensor` as reciprocal-then-multiply,
    and CUDA evaluates `tensor / float` the same way; both round twice.
    """
    ref = a if isinstance(a, torch.Tensor) else b
    a = a if isinstance(a, torch.Tensor) else torch.full_like(ref, a)
    b = b if isinstance(b, torch.Tensor) else torch.full_like(ref, b)
    return a / b


def _require_dtype(t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")


def _require_multiple(t: torch.Tensor, m: int, name: str) -> None:
    if t.dim() == 0 or t.shape[-1] % m:
        raise ValueError(f"{name}: last dimension must be a multiple of {m}, got shape {tuple(t.shape)}")


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ModelOpt NVFP4 writer rule (NVFP4_SPEC section 3) for a dense (N, K) weight.

    Returns (weight uint8 (N, K/2), weight_scale float8_e4m3fn (N, K/16), weight_scale_2 fp32 0-d) with
    weight_scale_2 = amax/(6*448), weight_scale = e4m3(block_amax/(6*weight_scale_2)) (0 stored as 1.0) and
    q = e2m1_rne(W / (weight_scale * weight_scale_2)). An all-zero weight gets weight_scale_2 = 1.
    """
    _require_multiple(w, BLOCK, "w")
    wf = w.float()
    check_finite(wf, "w")
    amax = wf.abs().amax()
    ws2 = torch.where(amax > 0, _div(amax, E2M1_MAX * E4M3_MAX), torch.ones_like(amax))
    blocks = _blocks(wf)
    sf = e4m3_from_float(blocks.abs().amax(-1) / (E2M1_MAX * ws2))
    sf = torch.where(sf.float() > 0, sf.float(), torch.ones_like(sf.float())).to(torch.float8_e4m3fn)
    codes = e2m1_encode(blocks / (sf.float().unsqueeze(-1) * ws2)).reshape(wf.shape)
    return pack_nibbles(codes), sf, ws2.float()
