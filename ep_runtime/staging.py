"""Staging: BF16 hidden states (T, H) -> NVFP4 written straight into the symmetric buffer's x / x_sf / x_global.

Bit for bit what ep_runtime.nvfp4.quantize computes (NVFP4_SPEC section 2), with the scales packed as the
buffer's int32 words. Dynamic scaling runs two kernels on the current stream of hidden's device (amax, then
quantize), so it needs no host sync and captures into a CUDA graph. Only `check=True` syncs (to reject non-finite
input).
"""
from __future__ import annotations

import torch

from .nvfp4 import NVFP4Tensor, check_finite, check_positive_scale
from .ops import check_one_value, check_operands, check_tensor, define_op, launch


def validate_stage_args(hidden: torch.Tensor, x: torch.Tensor, x_sf: torch.Tensor, x_global: torch.Tensor,
                        global_scale: torch.Tensor | None, amax_scratch: torch.Tensor) -> None:
    """Every check that needs no GPU: dtypes, shapes, contiguity, alignment, capacity, then devices."""
    check_tensor(hidden, "hidden", torch.bfloat16, (None, None))
    t, h = hidden.shape
    if h % 64:
        raise ValueError(f"hidden: hidden size must be a multiple of 64, got {h}")
    check_tensor(x, "x", torch.uint8, (None, h // 2))
    cap = x.shape[0]
    check_tensor(x_sf, "x_sf", torch.int32, (cap, h // 64))
    check_tensor(x_global, "x_global", torch.float32, (1,))
    if t > cap:
        raise ValueError(f"hidden: {t} tokens exceed the staging buffer capacity max_tokens={cap}")
    if global_scale is not None:
        check_one_value(global_scale, "global_scale")
    check_tensor(amax_scratch, "amax_scratch", torch.int32, (1,))
    check_operands(dict(x=x, x_sf=x_sf, x_global=x_global, amax_scratch=amax_scratch),
                   dict(hidden=hidden, global_scale=global_scale))


def _stage_impl(hidden: torch.Tensor, x: torch.Tensor, x_sf: torch.Tensor, x_global: torch.Tensor,
                global_scale: torch.Tensor | None, amax_scratch: torch.Tensor) -> None:
    launch("stage_nvfp4", hidden.device, hidden.data_ptr(), hidden.numel(),
           0 if global_scale is None else global_scale.data_ptr(), amax_scratch.data_ptr(), x.data_ptr(),
           x_sf.data_ptr(), x_global.data_ptr())


stage_op = define_op("stage_nvfp4(Tensor hidden, Tensor(a!) x, Tensor(b!) x_sf, Tensor(c!) x_global, "
                     "Tensor? global_scale, Tensor(d!) amax_scratch) -> ()", _stage_impl)


def stage_nvfp4(hidden: torch.Tensor, x: torch.Tensor, x_sf: torch.Tensor, x_global: torch.Tensor,
                amax_scratch: torch.Tensor, global_scale: torch.Tensor | None = None,
                check: bool = False) -> NVFP4Tensor:
    """Quantize hidden (T, H) bf16 into rows [0, T) of x (uint8 (cap, H/2)), x_sf (int32 (cap, H/64)) and
    x_global (fp32 (1,)); return NVFP4Tensor views of the staged rows.

    global_scale None -> dynamic gs = 448*6/amax (0 -> 1); else the fp32 gs itself (static: 1/input_scale),
    as in nvfp4.quantize. amax_scratch: an int32 (1,) word on the device, owned by the caller and allocated
    once (a CUDA graph captures its address). check=True rejects non-finite input or a non-positive scale
    (syncs the host).
    """
    validate_stage_args(hidden, x, x_sf, x_global, global_scale, amax_scratch)
    if check:
        check_finite(hidden, "hidden")
        if global_scale is not None:
            check_positive_scale(global_scale, "global_scale", divisor=True)
    stage_op(hidden, x, x_sf, x_global, global_scale, amax_scratch)
    t = hidden.shape[0]
    # Little-endian words hold scale 4w in their low byte, so viewing the words as bytes unpacks them.
    return NVFP4Tensor(x[:t], x_sf[:t].view(torch.uint8).view(torch.float8_e4m3fn), x_global[0])
