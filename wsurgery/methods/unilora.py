"""UniLoRA (``peft_type: UNILORA``): every LoRA entry is one entry of a single shared vector.

``θ = base_model.unilora_theta_d`` (``theta_d_length``). Per layer PEFT 0.21.2 keeps index buffers
``unilora_indices_A (r, in)`` / ``unilora_indices_B (out, r)`` into θ and scale buffers
``unilora_scales_A/B`` (1/√(how often that θ entry is used), in the base's dtype):

* ``A = θ[indices_A] ⊙ scales_A``, ``B = θ[indices_B] ⊙ scales_B``, ``ΔW = Tf(B @ A)``; no scaling.

Additive: unmerge subtracts the same ΔW.

The indices and scales are in the file only with ``save_indices=True`` (PEFT's default is False).
Without them PEFT regenerates them at load time: one numpy shuffle over *all* targeted layers, handed
out layer by layer (A, then B) in the model's ``modules()`` order, i.e. the order the model class
registers its submodules (``q_proj`` before ``k_proj``, ``mlp`` after ``self_attn``...). Neither the
adapter (which then holds only θ, not even the list of layers) nor the checkpoint (safetensors keys are
sorted by name) records that order or the targeted layers, so such adapters are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, UnsupportedError
from .base import (
    AdditivePatch,
    Method,
    ModuleParams,
    Patch,
    Shapes,
    Support,
    Tensors,
    expect_shape,
    like,
    register,
)
from .hira import Layout, ShapeLayout
from .layers import Layer, Linear

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

THETA = "unilora_theta_d"
_NAMES = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")

NO_INDICES = ("it was saved with save_indices=False, so the file holds only the shared vector theta_d: PEFT "
              "regenerates which theta_d entry feeds each LoRA entry from proj_seed over all targeted layers in "
              "the model's module registration order, and neither the targeted layers nor that order are recorded "
              "in the adapter or the checkpoint. To fix: set \"save_indices\": true in adapter_config.json, load the "
              "adapter with PEFT (PeftModel.from_pretrained on the base model, which regenerates the indices) and "
              "save_pretrained it again; the saved indices then make it mergeable")


class UniLoraPatch(ShapeLayout, AdditivePatch):
    """ΔW = Tf((θ[idx_B]·s_B) @ (θ[idx_A]·s_A)); Linear or Conv1D (Tf) as the base shape says."""

    def __init__(self, module: str, theta: torch.Tensor, idx_A: torch.Tensor, idx_B: torch.Tensor,
                 scales_A: torch.Tensor, scales_B: torch.Tensor, layout: Layout):
        super().__init__(module, ("weight",))
        self.theta, self.idx_A, self.idx_B, self.scales_A, self.scales_B = theta, idx_A, idx_B, scales_A, scales_B
        self.layout = layout
        self.rank = idx_A.shape[0]
        self.out_in = (idx_B.shape[0], idx_A.shape[1])

    def check(self, shapes: Shapes) -> None:
        self.observe_shape(shapes["weight"], *self.out_in)
        expect_shape(self.module, "UniLoRA's change", self.out_in[::-1] if self.transposed else self.out_in,
                     shapes["weight"], f" (unilora_indices_B {list(self.idx_B.shape)}, unilora_indices_A "
                                       f"{list(self.idx_A.shape)})")

    def delta(self) -> Tensors:
        theta = self.theta.to(torch.float32)
        A = theta[self.idx_A.long()] * self.scales_A.to(torch.float32)
        B = theta[self.idx_B.long()] * self.scales_B.to(torch.float32)
        d = B @ A
        return {"weight": d.T if self.transposed else d}

    def layer(self, shapes: Shapes) -> Layer:
        return Linear(self.transposed)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``base(x) + F.linear(F.linear(x, A), B)`` with ``A = θ[idx_A]·s_A``, ``B = θ[idx_B]·s_B``."""
        theta = like(self.theta, x)
        A = theta[self.idx_A.to(x.device).long()] * like(self.scales_A, x)
        B = theta[self.idx_B.to(x.device).long()] * like(self.scales_B, x)
        return layer(x, base) + (x @ A.T) @ B.T

    def describe(self) -> dict[str, Any]:
        return {"kind": "conv1d_transposed" if self.transposed else "linear", "rank": self.rank,
                "theta_d_length": self.theta.numel(), "indices": "saved (save_indices=True)"}


@register
class UniLora(Method):
    peft_types = ("UNILORA",)
    param_names = frozenset(_NAMES)
    shared_names = frozenset({THETA})
    support = (Support("UniLoRA (save_indices=True)", "Linear, Conv1D (fan_in_fan_out)", "exact", "exact", "0.21.2"),
               Support("UniLoRA (save_indices=False, PEFT's default)", "Linear, Conv1D", "refused: the per-layer "
                       "indices are drawn over the model's module registration order, which no file records; "
                       "re-save with save_indices=True", "-", "0.21.2"))

    def check_config(self, config: AdapterConfig) -> None:
        if not config.get("save_indices", False):
            raise UnsupportedError(f"{config.path}: cannot merge this UniLoRA adapter: {NO_INDICES}")

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"theta_d_length": config.get("theta_d_length"), "save_indices": bool(config.get("save_indices", False)),
                "fan_in_fan_out": bool(config.get("fan_in_fan_out", False))}

    def patch(self, params: ModuleParams) -> Patch:
        config, where = params.config, f"{params.config.path.parent}: module {params.module!r}"
        shared = params.context.shared
        if THETA not in shared:
            raise InputError(f"{config.path.parent}: the adapter file has no base_model.{THETA}, the vector every "
                             "UniLoRA layer takes its entries from; the file is incomplete")
        theta = shared[THETA]
        if theta.ndim != 1 or theta.numel() == 0 or not theta.is_floating_point():
            raise InputError(f"{config.path.parent}: base_model.{THETA} must be a non-empty 1-D float tensor, got "
                             f"{list(theta.shape)} {theta.dtype}")
        idx_A, idx_B, s_A, s_B = params.require(*_NAMES)
        for name, idx, scales in (("A", idx_A, s_A), ("B", idx_B, s_B)):
            if idx.ndim != 2 or idx.is_floating_point() or scales.shape != idx.shape or not scales.is_floating_point():
                raise InputError(f"{where}: unilora_indices_{name} {list(idx.shape)} {idx.dtype} and unilora_scales_"
                                 f"{name} {list(scales.shape)} {scales.dtype} must be an integer and a float matrix "
                                 "of the same shape")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= theta.numel()):
                raise InputError(f"{where}: unilora_indices_{name} point outside theta_d ({theta.numel()} entries)")
        if idx_A.shape[0] == 0 or idx_B.shape[1] != idx_A.shape[0]:
            raise InputError(f"{where}: unilora_indices_A {list(idx_A.shape)} and unilora_indices_B "
                             f"{list(idx_B.shape)} disagree on the rank; the adapter file is inconsistent")
        layout = Layout.of(params.context, "UniLoRA", bool(config.get("fan_in_fan_out", False)))
        return UniLoraPatch(params.module, theta, idx_A, idx_B, s_A, s_B, layout)
