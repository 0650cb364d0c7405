"""AdaLoRA (``peft_type: ADALORA``): ΔW = B·(A ⊙ E) · α / (init_r + 1e-5).

The divisor is the *initial* rank from the config even after rank pruning: PEFT never saves
``ranknum`` and restores it as ``init_r`` on load, while the saved A/E/B may be truncated per layer.

Linear or Conv1D: from the base shape, as PEFT takes it from the layer type (the saved
``fan_in_fan_out`` is the last wrapped layer's); see :class:`~wsurgery.methods.hira.Layout`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import InputError
from .base import (
    AdditivePatch,
    Method,
    ModuleParams,
    Patch,
    Shapes,
    Support,
    Tensors,
    like,
    register,
)
from .hira import Layout
from .layers import Conv, Layer, Linear

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig


class AdaLoraPatch(AdditivePatch):
    def __init__(self, module: str, A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, alpha: float,
                 factor: float, layout: Layout):
        super().__init__(module, ("weight",))
        self.A, self.E, self.B, self.alpha, self.factor, self.layout = A, E, B, alpha, factor, layout
        self.numel = B.shape[0] * A.shape[1]
        self._by_shape: bool | None = None  # stored (in, out) like Conv1D, as the base shape says (None: square)

    @property
    def transposed(self) -> bool:
        return self.layout.transposed(self.module, self._by_shape)

    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        if len(w) > 2:  # SVDConv2d: A is (r, in·kh·kw)
            ok = w[0] == self.B.shape[0] and self.numel == torch.Size(w).numel()
        else:
            want = (self.B.shape[0], self.A.shape[1])
            ok = tuple(w) in (want, want[::-1])
            if ok:
                self._by_shape = Layout.by_shape(w, *want)
                self.layout.observe(self.module, self._by_shape)
        if not ok:
            raise InputError(f"{self.module}: AdaLoRA change is {self.B.shape[0]}x{self.A.shape[1]} but the base "
                             f"weight is {list(w)}; was the adapter trained on another model?")
        self._shape = w

    def delta(self) -> Tensors:
        A, E, B = (x.to(torch.float32) for x in (self.A, self.E, self.B))
        d = (B @ (A * E)).mul_(self.factor)
        if self.transposed:
            d = d.T
        return {"weight": d.reshape(self._shape)}

    def layer(self, shapes: Shapes) -> Layer:
        return Conv() if len(shapes["weight"]) > 2 else Linear(self.transposed)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's SVDLinear: ``x·(A⊙E)ᵀ·Bᵀ·α/(ranknum + 1e-5)``; SVDConv2d, on activations: a convolution with
        A⊙E as r kernels (in, kh, kw), then B as a 1x1 convolution."""
        A, E, B = like(self.A, x), like(self.E, x), like(self.B, x)
        AE = A * E
        if x.dim() == 2:
            adapter = x @ AE.T @ B.T
        else:
            W = base["weight"]
            adapter = F.conv2d(F.conv2d(x, AE.reshape(AE.shape[0], *W.shape[1:])), B[:, :, None, None])
        return layer(x, base) + adapter * self.factor

    def describe(self) -> dict[str, Any]:
        return {"kind": "adalora", "rank": self.A.shape[0], "alpha": self.alpha, "scaling": self.factor}


@register
class AdaLora(Method):
    peft_types = ("ADALORA",)
    param_names = frozenset({"lora_A", "lora_B", "lora_E"})
    support = (Support("AdaLoRA (incl. rank-pruned)", "Linear, Conv1D, Conv2d", "exact (÷ init_r + 1e-5)", "exact",
                       "0.21.2"),)

    def init_r(self, config: AdapterConfig) -> int:
        return int(config.get("init_r", 12))

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"init_r": self.init_r(config), "scaling_rule": "lora_alpha/(init_r+1e-5)"}

    def patch(self, params: ModuleParams) -> Patch:
        config = params.config
        A, E, B = params.require("lora_A", "lora_E", "lora_B")
        if not (A.shape[0] == E.shape[0] == B.shape[1]):
            raise InputError(f"{config.path.parent}: module {params.module!r}: lora_A {list(A.shape)}, lora_E "
                             f"{list(E.shape)} and lora_B {list(B.shape)} disagree on the rank")
        init_r = self.init_r(config)
        alpha = float(config.get("lora_alpha", 8))
        scaling = alpha if alpha > 0 else float(init_r)
        # PEFT keeps ranknum as a float32 parameter: divide by float32(init_r) + 1e-5 as it does.
        ranknum = float(torch.tensor(float(init_r), dtype=torch.float32) + 1e-5)
        layout = Layout.of(params.context, "AdaLoRA", bool(config.get("fan_in_fan_out", False)))
        return AdaLoraPatch(params.module, A, E, B, scaling, scaling / ranknum, layout)
