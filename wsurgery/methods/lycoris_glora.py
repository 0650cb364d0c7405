"""LyCORIS GLoRA (``a1/a2/b1/b2``): ΔW = γ·(W·a1·a2 + b1·b2), γ = α/r, so the change
depends on W: W' = W + mult·ΔW(W). a1 (in, r), a2 (r, in) act on W's input axis (for a convolution, at every
kernel position); b1·b2 is a LoCon. LyCORIS 4.1.3 never builds GLoRA's Tucker ``bm`` (its condition
contradicts itself), so a file with one is refused as unknown keys. This is LyCORIS' GLoRA, not PEFT's
(wsurgery.methods.glora): different tensors and formula.

Unmerge solves W·(I + mult·γ·a1a2) = W' − mult·γ·b1b2 (float64), so it is approximate where that matrix is
ill-conditioned; the residual is reported.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError, NotInvertibleError
from .base import Shapes, Tensors, expect_shape, like
from .layers import Layer
from .lycoris_common import LycorisPatch, conv_op


class LycorisGloraPatch(LycorisPatch):
    approximate_inverse = True

    def __init__(self, module: str, a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor,
                 alpha: float | None):
        super().__init__(module, ("weight",))
        self.a1, self.a2, self.b1, self.b2 = a1, a2, b1, b2
        self.rank = int(a2.shape[0])
        self.alpha = alpha
        self.scaling = (alpha if alpha else self.rank) / self.rank
        self._shape: tuple[int, ...] | None = None

    def check(self, shapes: Shapes) -> None:
        w = tuple(shapes["weight"])
        if len(w) < 2:
            raise InputError(f"{self.module}: GLoRA changes Linear and Conv weights; the base weight is {list(w)}")
        ins = w[1]
        if self.a1.reshape(self.a1.shape[0], -1).shape != (ins, self.rank) or \
                self.a2.reshape(self.rank, -1).shape != (self.rank, ins):
            raise InputError(f"{self.module}: GLoRA a1 {list(self.a1.shape)} / a2 {list(self.a2.shape)} do not fit "
                             f"the base weight {list(w)} (expected a1 ({ins}, {self.rank}), a2 ({self.rank}, {ins}))")
        expect_shape(self.module, "GLoRA's b1·b2", (int(self.b1.shape[0]), *map(int, self.b2.shape[1:])), w)
        self._shape = w

    def _b(self) -> torch.Tensor:
        assert self._shape is not None
        b1, b2 = self.b1.to(torch.float32), self.b2.to(torch.float32)
        return (b1.view(b1.size(0), -1) @ b2.view(b2.size(0), -1)).view(self._shape)

    def _a(self) -> tuple[torch.Tensor, torch.Tensor]:
        a1, a2 = self.a1.to(torch.float32), self.a2.to(torch.float32)
        return a1.view(a1.size(0), -1), a2.view(a2.size(0), -1)

    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        W = tensors["weight"]
        wa1, wa2 = self._a()
        if W.dim() > 2:
            wa = torch.einsum("o i ..., i j -> o j ...", torch.einsum("o i ..., i j -> o j ...", W, wa1), wa2)
        else:
            wa = (W @ wa1) @ wa2
        d = (self._b().to(W.dtype) + wa) * self.scaling
        return {**tensors, "weight": W.add_(d * scale if scale != 1 else d)}

    def unmerge(self, tensors: Tensors, scale: float) -> Tensors:
        W1 = tensors["weight"]
        wa1, wa2 = self._a()
        g = scale * self.scaling
        M = torch.eye(wa1.shape[0], dtype=torch.float64) + g * (wa1.double() @ wa2.double())  # (in, in)
        X = (W1.double() - g * self._b().double()).movedim(1, -1)
        flat = X.reshape(-1, M.shape[0])
        try:
            solved = torch.linalg.solve(M.T, flat.T).T
        except RuntimeError as e:  # singular
            raise NotInvertibleError(f"{self.module}: I + γ·a1·a2 is singular; this GLoRA merge cannot be undone") \
                from e
        residual = float((solved @ M - flat).abs().max())
        self.notes.append(f"GLoRA unmerge residual {residual:.3g}")
        W = solved.reshape(X.shape).movedim(-1, 1).to(W1.dtype)
        return {**tensors, "weight": W1.copy_(W)}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """LyCORIS' bypass path: ``W(x + γ·a1(a2(x))) + γ·b1(b2(x))``."""
        a1, a2, b1, b2 = (like(t, x) for t in (self.a1, self.a2, self.b1, self.b2))
        if x.dim() == 2:
            ax, bx = x @ a2.T @ a1.T, x @ b2.T @ b1.T
        else:
            conv = conv_op(base["weight"])
            ax = conv(conv(x, a2), a1)
            bx = conv(conv(x, b2), b1)
        return layer(x + self.scaling * ax, base) + self.scaling * bx

    def why_not_invertible(self) -> str | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": "glora", "rank": self.rank, "alpha": self.alpha,
                "scaling": self.scaling}
