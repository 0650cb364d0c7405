"""LyCORIS' orthogonal finetuning as kohya/LyCORIS files save it: diag-OFT (``oft_blocks`` (n, b, b)) and
butterfly OFT (``oft_blocks`` (m, n, b, b)), each with an optional ``rescale`` (out, 1, …) and ``alpha`` =
the constraint. This is LyCORIS' math, not PEFT's OFT/BOFT (wsurgery.methods.oft/boft).

R = (I + Q)(I − Q)⁻¹ per block, Q = B − Bᵀ, with Q scaled down to norm α·out when its (whole-tensor) norm
exceeds that (α > 0). Diag-OFT: block k of W's rows becomes ``Mᵀ·W_k`` with M = mult·R + (1 − mult)·I.
BOFT: m butterfly stages, stage i permutes rows in groups of 2^i·b/2, multiplies blocks by M_i, and undoes the
permutation. Then W' = rescale ⊙ (…) (rescale not scaled by the multiplier). Unmerge divides by rescale and
solves each block's system in float64: exact up to rounding (the tests recover W to float32 precision).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import Shapes, Tensors, like
from .layers import Layer
from .lycoris_common import LycorisPatch


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """LyCORIS' ``get_r``: (I + Q)(I − Q)⁻¹ with Q the skew part of ``blocks`` and the norm constraint."""
    I = torch.eye(blocks.shape[-1])
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        q_norm = torch.norm(q) + 1e-8
        if q_norm > constraint:
            q = q * constraint / q_norm
    return (I + q) @ (I - q).float().inverse()


class LycorisOftPatch(LycorisPatch):
    approximate_inverse = True

    def __init__(self, module: str, blocks: torch.Tensor, rescale: torch.Tensor | None, alpha: float):
        super().__init__(module, ("weight",))
        self.blocks, self.rescale, self.alpha = blocks, rescale, alpha
        self.butterfly = blocks.dim() == 4
        self.block_size = int(blocks.shape[-1])

    def scales_linearly(self) -> bool:
        return False  # the multiplier scales the rotation's generator, not the change

    def check(self, shapes: Shapes) -> None:
        w = tuple(shapes["weight"])
        b = self.block_size
        if self.butterfly:
            m, n = int(self.blocks.shape[0]), int(self.blocks.shape[1])
            ok = n * b == w[0] and b % 2 == 0 and all(w[0] % (2 ** i * b) == 0 for i in range(m))
        else:
            ok = int(self.blocks.shape[0]) * b == w[0]
        if not ok or self.blocks.shape[-2] != b:
            raise InputError(f"{self.module}: oft_blocks {list(self.blocks.shape)} do not tile the base weight's "
                             f"{w[0]} output rows; was the adapter trained on another model?")
        if self.rescale is not None and tuple(self.rescale.shape) != (w[0], *[1] * (len(w) - 1)):
            raise InputError(f"{self.module}: rescale is {list(self.rescale.shape)} but the base weight is {list(w)}")

    def _stages(self, scale: float, rows: int) -> torch.Tensor:
        """The blocks' matrices at this multiplier; LyCORIS' constraint is α times the output rows."""
        r = cayley(self.blocks.to(torch.float32), self.alpha * rows)
        if scale != 1:
            r = r * scale + (1 - scale) * torch.eye(self.block_size)
        return r

    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        W = tensors["weight"]
        r = self._stages(scale, W.shape[0])
        b, rest = self.block_size, W.shape[1:]
        if self.butterfly:
            x = W
            for i in range(r.shape[0]):
                k = 2 ** i * (b // 2)
                x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
                x = torch.einsum("b i j, b j ...-> b i ...", r[i], x)
                x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        else:
            x = torch.einsum("k n m, k n ... -> k m ...", r, W.view(-1, b, *rest)).reshape(W.shape)
        if self.rescale is not None:
            x = self.rescale.to(x.dtype) * x
        return {**tensors, "weight": W.copy_(x)}

    def unmerge(self, tensors: Tensors, scale: float) -> Tensors:
        W1 = tensors["weight"]
        r = self._stages(scale, W1.shape[0]).double()
        b, rest = self.block_size, W1.shape[1:]
        x = W1.double()
        if self.rescale is not None:
            x = x / self.rescale.double()
        if self.butterfly:
            for i in reversed(range(r.shape[0])):
                k = 2 ** i * (b // 2)
                x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
                x = torch.linalg.solve(r[i], x.flatten(2)).view(x.shape)
                x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        else:
            x = torch.linalg.solve(r.transpose(1, 2), x.reshape(-1, b, rest.numel())).reshape(W1.shape)
        return {**tensors, "weight": W1.copy_(x.to(W1.dtype))}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """LyCORIS' bypass path on the layer's output channels (bias outside): each block of outputs times its
        rotation (Cayley transform solved here, not inverted), the butterfly stages in turn, then ``rescale``."""
        W = base["weight"]
        q = like(self.blocks, x)
        q = q - q.transpose(-1, -2)
        limit = self.alpha * W.shape[0]
        if limit > 0 and float(torch.norm(q) + 1e-8) > limit:
            q = q * limit / (torch.norm(q) + 1e-8)
        eye = torch.eye(self.block_size, dtype=q.dtype)
        r = torch.linalg.solve((eye - q).transpose(-1, -2), (eye + q).transpose(-1, -2)).transpose(-1, -2)
        y = layer(x, {"weight": W})
        z = y.movedim(1, -1) if y.dim() > 2 else y
        b = self.block_size
        if self.butterfly:
            for i in range(r.shape[0]):
                k = 2 ** i * (b // 2)
                z = z.unflatten(-1, (-1, 2, k)).transpose(-2, -1).flatten(-3).unflatten(-1, (-1, b))
                z = torch.einsum("b i j, ... b j -> ... b i", r[i], z)
                z = z.flatten(-2).unflatten(-1, (-1, k, 2)).transpose(-2, -1).flatten(-3)
        else:
            z = torch.einsum("... k n, k n m -> ... k m", z.unflatten(-1, (-1, b)), r).flatten(-2)
        if self.rescale is not None:
            z = z * like(self.rescale, x).flatten()
        y = z.movedim(-1, 1) if y.dim() > 2 else z
        if "bias" in base:
            y = y + layer(torch.zeros_like(x), {"weight": W, "bias": base["bias"]})
        return y

    def why_not_invertible(self) -> str | None:
        return None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "boft" if self.butterfly else "diag-oft", "block_size": self.block_size,
                             "constraint": self.alpha, "rescale": self.rescale is not None}
        if self.butterfly:
            d["stages"] = int(self.blocks.shape[0])
        return d
