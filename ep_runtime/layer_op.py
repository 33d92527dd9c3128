"""A whole EPMoE layer as one opaque torch op, so that torch.compile traces a model around its MoE layers.

While Dynamo traces, EPMoE.forward is one call of `ep_runtime::moe_layer`, whose fake only shapes the output; the
compiled graph then calls the layer's eager forward: the same kernels, the same bits. Traced into instead, the forward
compiled 2-4x slower than eager on one H200, `fullgraph=True` failed on the op wrappers' host-side checks, and nothing
in it is left for the compiler to fuse: every step is already a kernel.

The op names its layer by a handle: the schema holds ints, not modules. The registry holds weak references, so it
keeps no layer alive; a compiled graph called after its layer is gone says so.
"""
from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

import torch

from .ops import define_op

if TYPE_CHECKING:  # moe imports this module
    from .moe import EPMoE

_layers: dict[int, weakref.ref] = {}
_handles = itertools.count()


def register(layer: EPMoE) -> int:
    """A handle that names `layer` in moe_layer calls for as long as the layer lives."""
    handle = next(_handles)
    _layers[handle] = weakref.ref(layer, lambda _: _layers.pop(handle, None))
    return handle


def layer_of(handle: int) -> EPMoE:
    ref = _layers.get(handle)
    layer = ref() if ref is not None else None
    if layer is None:
        raise RuntimeError(f"layer: expected the handle of a live EPMoE, got {handle}, whose layer no longer exists "
                           f"(a compiled graph outlived the module it was traced from)")
    return layer


def _impl(hidden: torch.Tensor, input_ids: torch.Tensor | None, layer: int, check: bool) -> torch.Tensor:
    return layer_of(layer).forward(hidden, input_ids, check)


def _fake(hidden: torch.Tensor, input_ids: torch.Tensor | None, layer: int, check: bool) -> torch.Tensor:
    return layer_of(layer).output_like(hidden)


moe_layer_op = define_op("moe_layer(Tensor hidden, Tensor? input_ids, int layer, bool check) -> Tensor", _impl,
                         _fake)
