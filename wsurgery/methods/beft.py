"""BEFT (``peft_type: BEFT``): a trained bias added to the bias of ``nn.Linear`` layers.

``bias' = bias + beft_bias.flatten()`` with ``beft_bias (1, out)``. The weight is not touched.
PEFT refuses to merge into a layer without a bias (it would have to create one, which the
architecture may not accept), and so do we. Additive: exact unmerge.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import AdditivePatch, Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Direct, Layer


class BeftPatch(AdditivePatch):
    def __init__(self, module: str, bias: torch.Tensor):
        # Only the bias changes. It is a required role: where the base layer has none, the engine refuses before
        # anything is read ("changes <module>.bias, but the base has no such tensor"), as PEFT refuses the merge.
        super().__init__(module, ("bias",))
        self.bias = bias

    def check(self, shapes: Shapes) -> None:
        if tuple(shapes["bias"]) != (self.bias.numel(),):
            raise InputError(f"{self.module}: beft_bias is {list(self.bias.shape)} but the base bias is "
                             f"{list(shapes['bias'])}; was the adapter trained on another model?")

    def delta(self) -> Tensors:
        return {"bias": self.bias.to(torch.float32).flatten()}

    def layer(self, shapes: Shapes) -> Layer:
        """Only the bias is read: the layer's output is ``x·Wᵀ + b`` with W untouched, so the bias term itself
        is compared, element by element."""
        return Direct(("bias",))

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``BeftLayer.forward``: ``base_layer(x) + beft_bias.flatten()``, of which the bias term."""
        b = base["bias"]
        return layer(x, {"bias": b + like(self.bias, b).flatten()})

    def describe(self) -> dict[str, Any]:
        return {"kind": "linear", "features": self.bias.numel(), "changes": "bias only"}


@register
class Beft(Method):
    peft_types = ("BEFT",)
    param_names = frozenset({"beft_bias"})
    support = (Support("BEFT (bias only)", "Linear with a bias",
                       "exact (refused, like PEFT, where the base layer has no bias)", "exact", "0.21.2"),)

    def summary(self, config) -> dict[str, Any]:
        return {"rule": "bias += beft_bias"}

    def patch(self, params: ModuleParams) -> Patch:
        (bias,) = params.require("beft_bias")
        shape_ok = bias.ndim == 1 or (bias.ndim == 2 and bias.shape[0] == 1)
        if not shape_ok or bias.numel() == 0 or not bias.is_floating_point():
            raise InputError(f"{params.config.path.parent}: module {params.module!r}: beft_bias is {list(bias.shape)} "
                             f"{bias.dtype}; expected a float (1, out_features) tensor")
        return BeftPatch(params.module, bias)
