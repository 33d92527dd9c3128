"""The issue's bar kernel, timed beside ours in the same run: OpenAI triton_kernels' `matmul_ogs` with MXFP4 weights
(E2M1 codes, one power-of-two scale per 32 along K) and BF16 activations, all experts in one ragged launch.

It is a benchmark baseline, not a dependency: `triton_kernels` is not on PyPI under that name (the PyPI project of
that name is another package). The bench takes it when importable, e.g. built from triton-lang/triton's
`python/triton_kernels` at a tag matching the Triton in use, or from the copy vLLM's wheels carry
(`vllm/third_party/triton_kernels`); without it the column records the ImportError.

The weights are the baselines' BF16 weights re-quantized to MXFP4 by triton_kernels' own `downcast_to_mxfp`
(a different quantization from our NVFP4, with 6 % fewer bytes) and swizzled into its Hopper layouts as vLLM does
for its MXFP4 MoE on sm_90. The call is a plain grouped GEMM: rows already sorted by expert (our bench's slots),
no gather, scatter or fused activation, the library's default tile choices. `rel_l2` checks each call against
torch._grouped_mm on the MXFP4 weights upcast to BF16, so a timing of a broken call cannot pass unnoticed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class MxfpExperts:
    """One layer's experts as MXFP4 in triton_kernels' Hopper layouts, from BF16 weights (E, N, K)."""

    def __init__(self, w_bf16: torch.Tensor):
        from triton_kernels.numerics_details.mxfp import downcast_to_mxfp
        from triton_kernels.tensor import FP4, convert_layout, wrap_torch_tensor
        from triton_kernels.tensor_details.layout import (
            HopperMXScaleLayout,
            HopperMXValueLayout,
        )

        # Quantized along K (the last axis), then viewed as the (E, K, N) right-hand side of x @ w.
        self.codes, self.scales = downcast_to_mxfp(w_bf16, torch.uint8, axis=-1)
        self.w = convert_layout(wrap_torch_tensor(self.codes.transpose(-2, -1), dtype=FP4), HopperMXValueLayout,
                                mx_axis=1)
        self.w_scale = convert_layout(wrap_torch_tensor(self.scales.transpose(-2, -1)), HopperMXScaleLayout,
                                      mx_axis=1, num_warps=8)
        self.n = w_bf16.shape[1]

    def call(self, x: torch.Tensor, counts: list[int]) -> Callable[[], torch.Tensor]:
        """matmul_ogs over x's rows (expert e owns counts[e] consecutive rows), into one output made here."""
        from triton_kernels.matmul_ogs import PrecisionConfig, matmul_ogs
        from triton_kernels.routing import RoutingData, compute_expt_data

        hist = torch.tensor(counts, dtype=torch.int32, device=x.device)
        routing = RoutingData(None, hist, len(counts), 1, compute_expt_data(hist, len(counts), sum(counts)))
        precision = PrecisionConfig(weight_scale=self.w_scale)
        y = torch.empty(1, x.shape[0], self.n, dtype=torch.bfloat16, device=x.device)
        return lambda: matmul_ogs(x, self.w, None, routing_data=routing, precision_config=precision, y=y)

    def rel_l2(self, x: torch.Tensor, counts: list[int]) -> float:
        """Relative L2 error of one call against torch._grouped_mm on these MXFP4 weights upcast to BF16 (exact);
        the output is poisoned with NaN first."""
        from triton_kernels.numerics_details.mxfp import upcast_from_mxfp

        run = self.call(x, counts)
        out = run()
        out.fill_(float("nan"))
        got = run().float()
        w = upcast_from_mxfp(self.codes, self.scales, torch.bfloat16, axis=-1)
        ends = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        want = torch._grouped_mm(x, w.transpose(-2, -1), offs=ends).float()
        del w
        return ((got - want).norm() / want.norm()).item()
