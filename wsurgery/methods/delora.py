"""DeLoRA (``peft_type: DELORA``): decoupled low-rank adaptation of ``nn.Linear`` weights.

    ΔW = B · diag(λ / r / (‖A_i‖ · ‖B_i‖)) · A · diag(w_norm)

with ``delora_A (r, in)``, ``delora_B (out, r)``, ``delora_lambda (1)`` (trained), ``‖A_i‖`` the norm
of row i of A and ``‖B_i‖`` of column i of B (each clamped to at least 1e-4), and ``delora_w_norm
(in)`` the column norms of the *original* base weight, captured when the adapter was created and
saved as a persistent buffer. Because w_norm is saved, ΔW does not depend on the W it is merged
into: additive, exact unmerge. r is read from the shapes (it must agree with ``r``/``rank_pattern``,
which PEFT uses to size the tensors).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import AdditivePatch, Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer


class DeloraPatch(AdditivePatch):
    def __init__(self, module: str, A: torch.Tensor, B: torch.Tensor, lam: torch.Tensor, w_norm: torch.Tensor):
        super().__init__(module, ("weight",))
        self.A, self.B, self.lam, self.w_norm = A, B, lam, w_norm
        self.r = A.shape[0]

    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        want = (self.B.shape[0], self.A.shape[1])
        if len(w) != 2 or tuple(w) != want:
            raise InputError(f"{self.module}: delora_B {list(self.B.shape)} @ delora_A {list(self.A.shape)} makes a "
                             f"change of {list(want)} but the base weight is {list(w)}; was the adapter trained on "
                             "another model? (DeLoRA has only nn.Linear layers)")

    def delta(self) -> Tensors:
        A = self.A.to(torch.float32)
        B = self.B.to(torch.float32)
        An = torch.clamp(A.norm(dim=1), min=1e-4)
        Bn = torch.clamp(B.norm(dim=0), min=1e-4)
        d = self.lam.to(torch.float32) / self.r / (An * Bn)  # PEFT's diag, in its operation order
        delta = (B * d[None, :]) @ A  # = B @ diag(d) @ A
        return {"weight": delta.mul_(self.w_norm.to(torch.float32)[None, :])}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's decomposed DeLoRA forward: ``y + ((x⊙w_norm) Aᵀ ⊙ λ/r/(‖A_i‖‖B_i‖)) Bᵀ``."""
        A, B = like(self.A, x), like(self.B, x)
        h = (x * like(self.w_norm, x)) @ A.T
        norms = torch.clamp(A.norm(dim=1), min=1e-4) * torch.clamp(B.norm(dim=0), min=1e-4)
        h = h * (like(self.lam, x) / self.r / norms)
        return layer(x, base) + h @ B.T

    def describe(self) -> dict[str, Any]:
        return {"kind": "linear", "rank": self.r, "lambda": float(self.lam.float().flatten()[0])}


@register
class Delora(Method):
    peft_types = ("DELORA",)
    param_names = frozenset({"delora_A", "delora_B", "delora_lambda", "delora_w_norm"})
    support = (Support("DeLoRA (incl. rank/lambda patterns)", "Linear", "exact", "exact (w_norm is saved)",
                       "0.21.2"),)

    def summary(self, config) -> dict[str, Any]:
        return {"r": config.get("r", 8), "rank_pattern": config.get("rank_pattern") or None,
                "rule": "ΔW = B diag(λ/r/(|A_i||B_i|)) A diag(w_norm)"}

    def patch(self, params: ModuleParams) -> Patch:
        config = params.config
        where = f"{config.path.parent}: module {params.module!r}"
        A, B, lam, w_norm = params.require("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] == 0:
            raise InputError(f"{where}: delora_A is {list(A.shape)} and delora_B {list(B.shape)}; expected (r, in) and "
                             "(out, r)")
        if lam.numel() != 1:
            raise InputError(f"{where}: delora_lambda has shape {list(lam.shape)}; expected (1,)")
        if w_norm.ndim != 1 or w_norm.shape[0] != A.shape[1]:
            raise InputError(f"{where}: delora_w_norm has shape {list(w_norm.shape)}; expected ({A.shape[1]},), one "
                             "norm per input feature")
        r = A.shape[0]
        pattern = config.pattern("rank_pattern", params.module)
        cfg_r = int(pattern if pattern is not None else config.get("r", 8))
        if cfg_r != r:
            raise InputError(f"{where}: delora_A has rank {r} but the config (r / rank_pattern) says {cfg_r}; PEFT "
                             "divides by the config's r and could not load this file")
        return DeloraPatch(params.module, A, B, lam, w_norm)
