"""LyCORIS LoCon with a Tucker core (``lora_mid``, kohya/LyCORIS ``use_tucker`` on k×k convolutions).

ΔW = α/r · einsum("i j k l, i p, j q -> p q k l", lora_mid, lora_up (out, r)ᵀ, lora_down (r, in)): the 1×1 down
and up convolutions around the r×r k×k core, folded into one (out, in, k, k) kernel, as LyCORIS'
``rebuild_tucker`` does. Additive: exact unmerge.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import AdditivePatch, Shapes, Tensors, expect_shape, like
from .layers import Layer
from .lycoris_common import conv_op


class LycorisTuckerPatch(AdditivePatch):
    def __init__(self, module: str, down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, alpha: float):
        super().__init__(module, ("weight",))
        self.down, self.mid, self.up = down, mid, up
        self.rank, self.alpha = int(down.shape[0]), alpha
        self.scaling = alpha / self.rank

    def check(self, shapes: Shapes) -> None:
        want = (int(self.up.shape[0]), int(self.down.shape[1]), *self.mid.shape[2:])
        r, ones = self.rank, (1,) * (self.mid.dim() - 2)
        if (tuple(self.mid.shape[:2]) != (r, r) or tuple(self.up.shape[1:]) != (r, *ones)
                or tuple(self.down.shape[2:]) != ones):
            raise InputError(f"{self.module}: lora_down {list(self.down.shape)}, lora_mid {list(self.mid.shape)} and "
                             f"lora_up {list(self.up.shape)} do not form a rank-{r} Tucker LoCon")
        expect_shape(self.module, "the LoCon (Tucker) change", want, shapes["weight"])

    def delta(self) -> Tensors:
        u = self.up.to(torch.float32).reshape(self.up.shape[0], -1).T  # (r, out)
        d = self.down.to(torch.float32).reshape(self.rank, -1)  # (r, in)
        w = torch.einsum("i j ..., i p, j r -> p r ...", self.mid.to(torch.float32), u, d)
        return {"weight": w * self.scaling}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """LyCORIS' bypass path: the 1×1 down, the k×k core and the 1×1 up convolutions on the input."""
        conv = conv_op(self.mid)
        z = conv(conv(conv(x, like(self.down, x)), like(self.mid, x)), like(self.up, x))
        return layer(x, base) + z * self.scaling

    def describe(self) -> dict[str, Any]:
        return {"kind": "locon/tucker", "rank": self.rank, "alpha": self.alpha, "scaling": self.scaling}
