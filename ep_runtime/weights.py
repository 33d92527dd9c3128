"""The expert weights of one MoE layer on one rank, in the stacked layout the expert stage takes.

Loaded experts are copied one tensor at a time into stacks allocated once at their final size, so peak
memory during the transform stays at the final size plus one expert's tensor. The fp32 global scales stay
separate alphas: folding them into the e4m3 block scales would re-round and clip (NVFP4_SPEC section 3).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from . import nvfp4

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class ExpertWeights:
    w13: torch.Tensor  # uint8 (E, 2I, H/2): rows [gate 0..I-1; up 0..I-1]
    w13_scale: torch.Tensor  # float8_e4m3fn (E, 2I, H/16)
    w13_alpha: torch.Tensor  # fp32 (E, 2): weight_scale_2 of gate, up
    w2: torch.Tensor  # uint8 (E, H, I/2)
    w2_scale: torch.Tensor  # float8_e4m3fn (E, H, I/16)
    w2_alpha: torch.Tensor  # fp32 (E,)
    l1_input_scale: torch.Tensor  # fp32 0-d: static scale of the layer input (x gs = 1 / this)
    l2_input_scale: torch.Tensor  # fp32 (E,): static scale of each expert's h (h gs = 1 / this)
    layout: str = "rows"  # byte order of the four weight tensors: "rows", or "sm90" (sm90_layout.tile_)

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w13.shape[2] * 2

    @property
    def intermediate_size(self) -> int:
        return self.w13.shape[1] // 2

    @classmethod
    def empty(cls, num_experts: int, hidden: int, inter: int, device: torch.device | str = "cpu") -> "ExpertWeights":
        e, h, i = num_experts, hidden, inter
        u8, f8, f32 = torch.uint8, torch.float8_e4m3fn, torch.float32
        return cls(
            w13=torch.empty(e, 2 * i, h // 2, dtype=u8, device=device),
            w13_scale=torch.empty(e, 2 * i, h // 16, dtype=f8, device=device),
            w13_alpha=torch.empty(e, 2, dtype=f32, device=device),
            w2=torch.empty(e, h, i // 2, dtype=u8, device=device),
            w2_scale=torch.empty(e, h, i // 16, dtype=f8, device=device),
            w2_alpha=torch.empty(e, dtype=f32, device=device),
            l1_input_scale=torch.empty((), dtype=f32, device=device),
            l2_input_scale=torch.empty(e, dtype=f32, device=device),
        )

    def set_expert(self, e: int, proj: str, weight: torch.Tensor, weight_scale: torch.Tensor,
                   weight_scale_2: torch.Tensor) -> None:
        """Copy one projection of local expert e into the stacks (shapes were validated by the caller)."""
        if proj not in PROJECTIONS:  # else any other name would land in up_proj's rows
            raise ValueError(f"proj: expected one of {PROJECTIONS}, got {proj!r}")
        i = self.intermediate_size
        if proj == "down_proj":
            self.w2[e].copy_(weight)
            self.w2_scale[e].copy_(weight_scale)
            self.w2_alpha[e] = weight_scale_2.reshape(())
            return
        rows = slice(0, i) if proj == "gate_proj" else slice(i, 2 * i)
        self.w13[e, rows].copy_(weight)
        self.w13_scale[e, rows].copy_(weight_scale)
        self.w13_alpha[e, 0 if proj == "gate_proj" else 1] = weight_scale_2.reshape(())

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layout"}

    def to(self, device: torch.device | str) -> "ExpertWeights":
        """Self when every tensor is already on `device` (like Tensor.to), else new tensors throughout: two
        objects never share bytes that tile_ could re-tile under one of them while the other still says 'rows'."""
        old = self._tensors()
        new = {k: v.to(device) for k, v in old.items()}
        if all(new[k] is v for k, v in old.items()):
            return self
        return replace(self, **{k: v.clone() if v is old[k] else v for k, v in new.items()})

    def clone(self) -> "ExpertWeights":
        return replace(self, **{k: v.clone() for k, v in self._tensors().items()})

    def nbytes(self) -> int:
        return sum(v.nbytes for v in self._tensors().values())

    def check_sizes(self, name: str, num_experts: int, hidden: int, inter: int) -> None:
        """Every tensor has the shape and dtype `empty` gives these sizes."""
        want = ExpertWeights.empty(num_experts, hidden, inter, "meta")._tensors()
        for k, v in self._tensors().items():
            if v.shape != want[k].shape or v.dtype != want[k].dtype:
                raise ValueError(f"{name}.{k}: expected {want[k].dtype} of shape {tuple(want[k].shape)} for "
                                 f"{num_experts} experts of hidden {hidden}, intermediate {inter}; "
                                 f"got {v.dtype} of shape {tuple(v.shape)}")

    def check_values(self, name: str = "weights") -> None:
        """What every backend needs of the values (the loader checks them by checkpoint key as it reads): block scales
        finite and not negative, global and input scales finite and positive. A NaN scale makes outputs NaN, and an
        input scale of 0 silently drops an expert's contribution."""
        self.require_layout("rows", "check_values()", name)
        for stack in ("w13_scale", "w2_scale"):  # one pass (and one host sync) per stack: (expert, row, block)
            nvfp4.check_scale_bytes(getattr(self, stack), f"{name}.{stack}")
        for k in ("w13_alpha", "w2_alpha", "l1_input_scale", "l2_input_scale"):
            nvfp4.check_positive_scale(getattr(self, k), f"{name}.{k}", divisor=k.endswith("input_scale"))

    def require_layout(self, layout: str, user: str, name: str = "weights") -> None:
        if self.layout != layout:
            raise ValueError(f"{name}: {user} takes layout {layout!r}, got {self.layout!r}")

    def intermediate_slice(self, lo: int, hi: int) -> "ExpertWeights":
        """The experts restricted to intermediate columns [lo, hi) (new tensors): gate and up rows lo..hi-1 and the
        down projection's K range, with the same scales; summed over a partition of [0, I), the slices' outputs are
        the experts' with a static h scale (an activation is elementwise in the intermediate dim; a dynamic h scale is
        an amax over all of it, which no slice holds). Bounds on 16-element scale blocks."""
        self.require_layout("rows", "intermediate_slice()")
        i = self.intermediate_size
        if not (0 <= lo < hi <= i and lo % 16 == 0 and hi % 16 == 0):
            raise ValueError(f"intermediate_slice: expected 0 <= lo < hi <= {i}, both multiples of 16, got [{lo}, {hi})")

        def rows(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[:, lo:hi], t[:, i + lo:i + hi]], dim=1)

        return replace(self, w13=rows(self.w13), w13_scale=rows(self.w13_scale),
                       w2=self.w2[:, :, lo // 2:hi // 2].contiguous(),
                       w2_scale=self.w2_scale[:, :, lo // 16:hi // 16].contiguous(),
                       **{k: getattr(self, k).clone() for k in ("w13_alpha", "w2_alpha", "l1_input_scale",
                                                                "l2_input_scale")})

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense fp32 (E, 2I, H) and (E, H, I) weights including their global scales (tests, baselines)."""
        self.require_layout("rows", "dequantized()")
        w13 = nvfp4.block_dequantize(self.w13, self.w13_scale)
        w13 = w13 * self.w13_alpha.repeat_interleave(self.intermediate_size, dim=1).unsqueeze(-1)
        w2 = nvfp4.block_dequantize(self.w2, self.w2_scale) * self.w2_alpha.view(-1, 1, 1)
        return w13, w2

    @classmethod
    @torch.no_grad()  # new tensors, never a graph back to the caller's parameters
    def from_dense(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   l1_input_scale: float | torch.Tensor, l2_input_scale: torch.Tensor) -> "ExpertWeights":
        """Quantize dense (E, I, H), (E, I, H), (E, H, I) weights by the ModelOpt writer rules."""
        if not isinstance(gate, torch.Tensor) or gate.dim() != 3:
            got = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
            raise ValueError(f"gate: expected a 3-d tensor (E, I, H), got {got}")
        e, i, h = gate.shape
        for name, t, shape in (("gate", gate, (e, i, h)), ("up", up, (e, i, h)), ("down", down, (e, h, i)),
                               ("l2_input_scale", l2_input_scale, (e,))):
            check_dense(name, t, shape, per_expert=True)
        l1 = nvfp4.positive_scale(l1_input_scale, "l1_input_scale")
        nvfp4.check_positive_scale(l2_input_scale, "l2_input_scale", divisor=True)
        out = cls.empty(e, h, i, gate.device)
        for x in range(e):
            for proj, w in zip(PROJECTIONS, (gate[x], up[x], down[x])):
                out.set_expert(x, proj, *nvfp4.quantize_weight(w))
        out.l1_input_scale.copy_(l1.reshape(()))
        out.l2_input_scale.copy_(l2_input_scale)
        return out

    @classmethod
    def synthetic(cls, expert_ids: range, hidden: int, inter: int, seed: int, device: torch.device | str,
                  l1_input_scale: float = 6.0 / 2688, l2_input_scale: float = 3.0 / 2688) -> "ExpertWeights":
        """Random experts (std 1/sqrt(fan-in)) with the given static activation scales, generated on `device`
        expert by expert, each from its own seed (seed, global id): any rank, and a single-process reference,
        builds the same expert without materializing the others. Used by tests, benchmarks and model-sized
        synthetic layers (a V4-Pro layer would be 14 GB of checkpoint files)."""
        out = cls.empty(len(expert_ids), hidden, inter, device)
        g = torch.Generator(device=device)
        for local, e in enumerate(expert_ids):
            g.manual_seed(seed * 1_000_003 + e)
            for proj, (n, k) in zip(PROJECTIONS, ((inter, hidden), (inter, hidden), (hidden, inter))):
                w = torch.randn(n, k, generator=g, device=device) / k ** 0.5
                out.set_expert(local, proj, *nvfp4.quantize_weight(w))
        out.l1_input_scale.fill_(l1_input_scale)
        out.l2_input_scale.fill_(l2_input_scale)
        return out


def check_dense(name: str, t: object, shape: tuple[int, ...], per_expert: bool = False) -> None:
    """A dense weight (or per-expert scale) given to be quantized: a finite floating-point tensor of this shape
    (experts in dim 0 if per_expert)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != shape:
        want = f"{shape[0]} experts of shape {shape[1:]}" if per_expert and len(shape) > 1 else f"shape {shape}"
        raise ValueError(f"{name}: expected {want}, got shape {tuple(t.shape)}")
    nvfp4.check_finite(t, name)
