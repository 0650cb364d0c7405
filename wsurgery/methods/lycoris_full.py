"""LyCORIS ``full`` (``diff``/``diff_b``) and ``norm`` (``w_norm``/``b_norm``): the saved tensors are the change
itself, W' = W + multiplier·diff (and the bias likewise). Additive: exact unmerge.

A bias change on a base without a bias is refused: LyCORIS' merge drops it there, which would lose part of the
adapter without a word.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import AdditivePatch, Shapes, Tensors, like
from .layers import Layer


class LycorisDiffPatch(AdditivePatch):
    def __init__(self, module: str, algo: str, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(module, ("weight", "bias") if bias is not None else ("weight",))
        self.algo, self.weight, self.bias = algo, weight, bias

    def check(self, shapes: Shapes) -> None:
        names = ("diff", "diff_b") if self.algo == "full" else ("w_norm", "b_norm")
        for role, t, name in (("weight", self.weight, names[0]), ("bias", self.bias, names[1])):
            if t is None:
                continue
            have = shapes.get(role)
            if have is None:
                raise InputError(f"{self.module}: the adapter saves {name} but the base module has no {role}")
            if tuple(have) != tuple(t.shape):
                raise InputError(f"{self.module}: {name} is {list(t.shape)} but the base {role} is {list(have)}; "
                                 "was the adapter trained on another model?")

    def delta(self) -> Tensors:
        d = {"weight": self.weight.to(torch.float32)}
        if self.bias is not None:
            d["bias"] = self.bias.to(torch.float32)
        return d

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """The layer on the base tensors plus the same layer on the saved change (the layer is linear in them)."""
        own = {"weight": like(self.weight, x)}
        for role in base:
            if role != "weight":
                own[role] = like(self.bias, x) if role == "bias" and self.bias is not None else torch.zeros_like(
                    base[role])
        return layer(x, base) + layer(x, own)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.algo, "bias": self.bias is not None}
