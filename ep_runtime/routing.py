"""Routing, NVFP4_SPEC.md section 6: DeepSeek-V4 (sqrtsoftplus, bias, hash layers) and V3 (sigmoid, groups).

Ties are broken deterministically on every device: among equal scores the lower expert (or group) index
wins, because selection is a stable descending sort rather than torch.topk (whose tie order is unspecified).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ModelConfig
from .nvfp4 import check_finite


_TOKEN_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)  # what a hash layer takes as token ids


def check_tid2eid(tid2eid: torch.Tensor, n_experts: int, top_k: int, name: str) -> None:
    """A hash layer's table: per token id, top_k expert ids in [0, n_experts), as integers (float ids would be
    truncated). An id may repeat in a row: the token then has that expert twice, as the model's own gather does."""
    if tid2eid.dtype not in _TOKEN_ID_DTYPES:
        raise TypeError(f"{name}: expected an integer dtype ({', '.join(map(str, _TOKEN_ID_DTYPES))}), got "
                        f"{tid2eid.dtype}")
    if tid2eid.dim() != 2 or tid2eid.shape[1] != top_k:
        raise ValueError(f"{name}: expected shape (vocab, {top_k}), got {tuple(tid2eid.shape)}")
    ops.check_in_range(tid2eid, name, 0, n_experts, "expert ids")


@functools.cache
def _gpu_kernels() -> bool:
    """ops.topk_stable, ops.route_v4 and ops.router_logits can run (an sm_90 GPU and the built extension): asked
    once, not in every forward."""
    return ops.extension_available("topk_stable", "route_v4", "router_logits")


def _logits_kernel_reads(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """ops.router_logits can read hidden's rows as they are: contiguous, 16-byte aligned, a multiple of 8 wide, on
    the weight's device (its checks, without their cost in every forward)."""
    return (hidden.is_contiguous() and hidden.data_ptr() % ops.ALIGN_BYTES == 0 and hidden.shape[1] % 8 == 0
            and hidden.device == weight.device)


def _top_k_stable(scores: torch.Tensor, k: int, name: str = "k") -> torch.Tensor:
    """The first k of a stable descending sort; on an sm_90 GPU with the extension, ops.topk_stable (the same
    indices without the full sort). Both paths reject k outside 1..scores.shape[-1] (named `name`)."""
    ops.check_top_k(k, scores.shape[-1], name)
    if scores.is_cuda and _gpu_kernels():
        n = scores.shape[-1]
        return ops.topk_stable(scores.reshape(-1, n).contiguous(), k).view(*scores.shape[:-1], k)
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def _normalize(w: torch.Tensor, scaling: float) -> torch.Tensor:
    return w / (w.sum(-1, keepdim=True) + 1e-20) * scaling


def route_v4(logits: torch.Tensor, bias: torch.Tensor | None, k: int, scaling: float,
             hash_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(softplus) scores; the correction bias only selects; hash layers pass hash_ids (T, k) instead."""
    s = torch.sqrt(F.softplus(logits.float()))
    if hash_ids is not None:
        ids = hash_ids.long()
    else:
        ids = _top_k_stable(s + bias.float() if bias is not None else s, k)
    return ids.to(torch.int32), _normalize(s.gather(-1, ids), scaling)


def route_v3(logits: torch.Tensor, bias: torch.Tensor | None, k: int, scaling: float, n_group: int,
             topk_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores, group-limited: keep the topk_group groups with the best sum of their top-2 biased scores."""
    s = torch.sigmoid(logits.float())
    b = s + bias.float() if bias is not None else s
    t, e = b.shape
    if n_group > 1:
        grouped = b.view(t, n_group, e // n_group)
        group_score = torch.sort(grouped, dim=-1, descending=True).values[..., :2].sum(-1)
        keep = torch.zeros(t, n_group, dtype=torch.bool, device=b.device)
        keep.scatter_(1, _top_k_stable(group_score, topk_group, "topk_group"), True)
        b = b.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = _top_k_stable(b, k)
    return ids.to(torch.int32), _normalize(s.gather(-1, ids), scaling)


class Router(nn.Module):
    """One layer's router: (T, H) hidden states (+ input ids for hash layers) -> topk ids and weights."""

    def __init__(self, cfg: ModelConfig, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 tid2eid: torch.Tensor | None = None, device: torch.device | str | None = None):
        super().__init__()
        e, h = cfg.n_routed_experts, cfg.hidden_size
        if tuple(weight.shape) != (e, h):
            raise ValueError(f"router weight: expected shape {(e, h)}, got {tuple(weight.shape)}")
        check_finite(weight, "router weight")  # one NaN makes every token's weights NaN
        if bias is not None:
            if tuple(bias.shape) != (e,):
                raise ValueError(f"router bias: expected shape {(e,)}, got {tuple(bias.shape)}")
            check_finite(bias, "router bias")  # an infinite bias would pick its expert for every token
        if tid2eid is not None:
            check_tid2eid(tid2eid, e, cfg.num_experts_per_tok, "router tid2eid")
        device = weight.device if device is None else torch.device(device)
        self.cfg = cfg

        # Copies on the device, detached: the router must neither share bytes with the caller's tensors nor
        # backpropagate into them. Plain attributes, not buffers: the layer's weights are fixed at load (its experts
        # are NVFP4 stacks outside any state dict), so load_state_dict must not rewrite them one by one (which left
        # weight_bf16 stale) and Module.to(dtype) must not convert them (_apply keeps their dtypes).
        def owned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # row-major: the routing kernels read it so
            return t.detach().to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)

        self.weight = owned(weight, torch.float32)
        # Checkpoints store the router in bf16. Where the weight is exactly that, a GPU runs the router GEMM on bf16
        # inputs with fp32 output: the products are exact in fp32 and summed in fp32, as in the fp32 GEMM, on tensor
        # cores instead of the fp32 pipes, which at prefill sizes took a third of a 4-GPU layer.
        w16 = self.weight.to(torch.bfloat16)
        self.weight_bf16 = w16 if torch.equal(w16.float(), self.weight) else None
        self.bias = None if bias is None else owned(bias, torch.float32)
        self.tid2eid = None if tid2eid is None else owned(tid2eid, torch.int32)

    _TENSORS = ("weight", "weight_bf16", "bias", "tid2eid")

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the router holds (for memory accounting)."""
        return [t for t in (getattr(self, n) for n in self._TENSORS) if t is not None]

    @property
    def by_token_id(self) -> bool:
        """Hash routing (V4's first layers): ids from tid2eid by token id. Sigmoid (V3) scoring has no hash layers, and
        ignores a table."""
        return self.tid2eid is not None and self.cfg.scoring_func != "sigmoid"

    def extra_repr(self) -> str:
        by = "token id (hash)" if self.by_token_id else self.cfg.scoring_func
        return f"experts={self.cfg.n_routed_experts}, topk={self.cfg.num_experts_per_tok}, by={by}"

    def _apply(self, fn, recurse: bool = True) -> "Router":
        """Module.to / cuda / cpu / to_empty / share_memory apply to the router's tensors as to any module's, but their
        dtypes stay (fp32 weight and bias, the bf16 copy of an exactly-bf16 weight, int32 table): a conversion that
        changes a dtype only moves the tensor to the conversion's device."""
        for n in self._TENSORS:
            t = getattr(self, n)
            if t is not None:
                u = fn(t)
                setattr(self, n, u if u.dtype == t.dtype else t.to(u.device))
        return self

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 router logits (T, E) of hidden states (T, H). On a GPU with bf16 hidden states and a weight exact in
        bf16: the bf16 GEMM with fp32 output, or up to ops.ROUTER_LOGITS_MAX_TOKENS tokens ops.router_logits (the same
        exact products, summed in fp32 in its own fixed order); else the fp32 GEMM."""
        w16 = self.weight_bf16
        if not (hidden.is_cuda and hidden.dtype == torch.bfloat16 and w16 is not None):
            return hidden.float() @ self.weight.t()
        t = hidden.shape[0]
        if t <= ops.ROUTER_LOGITS_MAX_TOKENS and _logits_kernel_reads(hidden, w16) and _gpu_kernels():
            out = torch.empty(t, w16.shape[0], dtype=torch.float32, device=hidden.device)
            ops.router_logits_op(hidden, w16, out)  # unchecked: hidden checked just above, the weight is our own
            return out
        return torch.mm(hidden, w16.t(), out_dtype=torch.float32)

    def check_token_ids(self, hidden: torch.Tensor, input_ids: torch.Tensor | None, check: bool = True) -> None:
        """A hash-routed layer's token ids: one integer per row of hidden, in the vocabulary (check=True, which syncs
        the host). Other layers take any input_ids."""
        if not self.by_token_id:
            return
        if input_ids is None:
            raise ValueError("input_ids: a hash-routed layer needs the token ids, got None")
        if input_ids.dtype not in _TOKEN_ID_DTYPES:  # a float id would be truncated to some token's experts
            raise TypeError(f"input_ids: expected an integer dtype ({', '.join(map(str, _TOKEN_ID_DTYPES))}), got "
                            f"{input_ids.dtype}")
        if input_ids.shape != hidden.shape[:1]:
            raise ValueError(f"input_ids: expected shape {tuple(hidden.shape[:1])}, got {tuple(input_ids.shape)}")
        vocab = self.tid2eid.shape[0]
        if check:
            ops.check_in_range(input_ids, "input_ids", 0, vocab, "token ids")

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None, check: bool = True,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """check=False skips the token-id range check (a host sync; CUDA-graph capture needs it off). out: int32 ids
        and fp32 weights (T, topk) to write into (the symmetric buffer's rows), returned; else new tensors.

        On an sm_90 GPU with the extension, V4 routing after the router GEMM is one kernel (ops.route_v4), whose
        weights may differ from the torch path's in the last bit (it fixes the order of the k-term sum). The logits:
        Router.logits."""
        cfg = self.cfg
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"hidden: expected a (T, {cfg.hidden_size}) tensor, got {type(hidden).__name__}")
        if hidden.dim() != 2 or hidden.shape[1] != cfg.hidden_size:
            raise ValueError(f"hidden: expected shape (T, {cfg.hidden_size}), got {tuple(hidden.shape)}")
        if hidden.device != self.weight.device:
            raise ValueError(f"hidden: expected device {self.weight.device} (the router's), got {hidden.device}")
        t, k = hidden.shape[0], cfg.num_experts_per_tok
        if out is not None:
            for i, (what, dtype) in enumerate((("ids", torch.int32), ("weights", torch.float32))):
                ops.check_tensor(out[i], f"out[{i}] ({what})", dtype, (t, k))
                if out[i].device != hidden.device:  # the routing kernel writes through its pointer
                    raise ValueError(f"out[{i}] ({what}): expected device {hidden.device}, got {out[i].device}")
        logits = self.logits(hidden)
        if cfg.scoring_func == "sigmoid":
            return _into(out, *route_v3(logits, self.bias, k, cfg.routed_scaling_factor, cfg.n_group,
                                        cfg.topk_group))
        hash_ids = None
        if self.by_token_id:
            self.check_token_ids(hidden, input_ids, check)
            hash_ids = self.tid2eid[input_ids.long()]
        fits = k <= ops.MAX_ROUTE_TOP_K and (hash_ids is not None or logits.shape[1] <= ops.MAX_ROUTE_EXPERTS)
        if logits.is_cuda and fits and _gpu_kernels():
            ids, w = out if out is not None else (torch.empty(t, k, dtype=torch.int32, device=logits.device),
                                                  torch.empty(t, k, dtype=torch.float32, device=logits.device))
            # The op unchecked: the logits and bias are this module's own, and out was checked above.
            ops.route_v4_op(logits, self.bias, hash_ids, float(cfg.routed_scaling_factor), ids, w)
            return ids, w
        return _into(out, *route_v4(logits, self.bias, k, cfg.routed_scaling_factor, hash_ids))


def _into(out: tuple[torch.Tensor, torch.Tensor] | None, ids: torch.Tensor,
          w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:
        return ids, w
    out[0].copy_(ids)
    out[1].copy_(w)
    return out
