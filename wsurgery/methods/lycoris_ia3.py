"""LyCORIS IA3 (``weight`` + ``on_input``): W' = W ⊙ (1 + mult·w), w scaling W's input channels (``on_input``
1) or output channels (0). LyCORIS saves the change w (initialised at 0), not PEFT's multiplier (initialised at
1): this is not wsurgery.methods.ia3. Unmerge divides, refused where some 1 + mult·w is 0.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError, NotInvertibleError
from .base import Shapes, Tensors, like
from .layers import Layer
from .lycoris_common import LycorisPatch, on_channels


class LycorisIa3Patch(LycorisPatch):
    def __init__(self, module: str, weight: torch.Tensor, on_input: bool):
        super().__init__(module, ("weight",))
        self.w, self.on_input = weight, on_input
        self.axis = 1 if on_input else 0

    def check(self, shapes: Shapes) -> None:
        w = tuple(shapes["weight"])
        if len(w) < 2 or self.w.numel() != w[self.axis]:
            raise InputError(f"{self.module}: IA3 weight has {self.w.numel()} entries but the base weight {list(w)} "
                             f"has {w[self.axis] if len(w) >= 2 else '?'} {'input' if self.on_input else 'output'} "
                             "channels")

    def _factor(self, W: torch.Tensor, scale: float) -> torch.Tensor:
        f = self.w.to(W.dtype).flatten() * scale + 1
        shape = [1] * W.dim()
        shape[self.axis] = -1
        return f.view(shape)

    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        W = tensors["weight"]
        return {**tensors, "weight": W.mul_(self._factor(W, scale))}

    def unmerge(self, tensors: Tensors, scale: float) -> Tensors:
        W = tensors["weight"]
        f = self._factor(W, scale)
        if bool((f == 0).any()):
            raise NotInvertibleError(f"{self.module}: some 1 + multiplier·w is 0: those channels were zeroed")
        return {**tensors, "weight": W.div_(f)}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """LyCORIS' bypass path: the input channels scaled before the layer, or its output channels after it
        (the bias left out of the scaling)."""
        f = like(self.w, x).flatten() + 1
        if self.on_input:
            return layer(on_channels(x, f), base)
        y = on_channels(layer(x, {"weight": base["weight"]}), f)
        return y if "bias" not in base else y + layer(torch.zeros_like(x), {"weight": base["weight"],
                                                                            "bias": base["bias"]})

    def why_not_invertible(self) -> str | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": "ia3", "on_input": self.on_input}
