"""GraLoRA (``peft_type: GRALORA``): granular low-rank adaptation with block exchange, on ``nn.Linear``
and transformers' ``Conv1D``.

``gralora_A (k, in/k, r)`` and ``gralora_B (k, r, out/k)`` with ``k = gralora_k`` and sub-rank
``σ = r/k``. The block of ΔW at (output block j, input block n) is

    ΔW_jn = B[j, nσ:(n+1)σ, :]^T · A[n, :, jσ:(j+1)σ]^T

(PEFT scatters A into an ``(in, k, r)`` tensor and permutes its rank axis; this is the same sum
without the zeros). With ``hybrid_r > 0`` a plain LoRA part ``gralora_B_general.weight (out, h) ·
gralora_A_general.weight (h, in)`` is added, and the whole is scaled by ``s = alpha / (r + hybrid_r)``:

    ΔW = Tf((blocks + B_g A_g) · s)      (transposed for Conv1D, ``fan_in_fan_out``)

r, k and h come from the tensor shapes (they must agree with ``r``, ``gralora_k`` and ``hybrid_r`` in
the config, which PEFT uses); ``alpha`` from the config (default 64). Additive: exact unmerge.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import AdditivePatch, Method, ModuleParams, Patch, Shapes, Support, Tensors, expect_shape, like, register
from .hira import Layout, ShapeLayout
from .layers import Layer, Linear


class GraloraPatch(ShapeLayout, AdditivePatch):
    """Linear or Conv1D as the base shape says (PEFT saves the last wrapped layer's fan_in_fan_out)."""

    def __init__(self, module: str, A: torch.Tensor, B: torch.Tensor, Ag: torch.Tensor | None,
                 Bg: torch.Tensor | None, scaling: float, alpha: float, layout: Layout):
        super().__init__(module, ("weight",))
        self.A, self.B, self.Ag, self.Bg = A, B, Ag, Bg
        self.scaling, self.alpha, self.layout = scaling, alpha, layout
        self.k, self.sub_in, self.r = A.shape
        self.sub_out = B.shape[2]
        self.hybrid_r = 0 if Ag is None else Ag.shape[0]

    @property
    def out_in(self) -> tuple[int, int]:
        return self.k * self.sub_out, self.k * self.sub_in

    def check(self, shapes: Shapes) -> None:
        out, inp = self.out_in
        self.observe_shape(shapes["weight"], out, inp)
        want = (inp, out) if self.transposed else (out, inp)
        expect_shape(self.module, "GraLoRA's change", want, shapes["weight"],
                     f" (gralora_A {list(self.A.shape)}, gralora_B {list(self.B.shape)})")

    def delta(self) -> Tensors:
        k, sigma = self.k, self.r // self.k
        A = self.A.to(torch.float32).reshape(k, self.sub_in, k, sigma)  # [n, i, j, s]
        B = self.B.to(torch.float32).reshape(k, k, sigma, self.sub_out)  # [j, n, s, o]
        d = torch.einsum("jnso,nijs->joni", B, A).reshape(self.out_in)
        if self.Ag is not None and self.Bg is not None:  # saved together
            d += self.Bg.to(torch.float32) @ self.Ag.to(torch.float32)
        if self.transposed:
            d = d.T
        return {"weight": d.mul_(self.scaling)}

    def layer(self, shapes: Shapes) -> Layer:
        return Linear(self.transposed)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's GraLoRA forward: per input block n, ``x_n A_n`` (k·σ ranks), the rank axis regrouped
        so output block j gets sub-rank j of every input block, times ``B_j``; plus the hybrid LoRA
        ``x A_gᵀ B_gᵀ``; all scaled by s."""
        k, sigma = self.k, self.r // self.k
        t = x.shape[0]
        h = torch.einsum("tni,nir->tnr", x.reshape(t, k, self.sub_in), like(self.A, x))
        h = h.reshape(t, k, k, sigma).permute(0, 2, 1, 3).reshape(t, k, k * sigma)
        out = torch.einsum("tjr,jro->tjo", h, like(self.B, x)).reshape(t, -1)
        if self.Ag is not None and self.Bg is not None:  # saved together
            out = out + (x @ like(self.Ag, x).T) @ like(self.Bg, x).T
        return layer(x, base) + out * self.scaling

    def describe(self) -> dict[str, Any]:
        return {"kind": "conv1d_transposed" if self.transposed else "linear", "rank": self.r,
                "gralora_k": self.k, "hybrid_r": self.hybrid_r, "alpha": self.alpha, "scaling": self.scaling}


@register
class Gralora(Method):
    peft_types = ("GRALORA",)
    param_names = frozenset({"gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general"})
    support = (Support("GraLoRA (incl. hybrid_r)", "Linear, Conv1D (fan_in_fan_out)", "exact", "exact", "0.21.2"),)

    def summary(self, config) -> dict[str, Any]:
        return {"r": config.get("r", 32), "gralora_k": config.get("gralora_k", 2),
                "hybrid_r": config.get("hybrid_r", 0), "alpha": config.get("alpha", 64),
                "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
                "scaling_rule": "alpha/(r + hybrid_r)"}

    def patch(self, params: ModuleParams) -> Patch:
        config, t = params.config, params.tensors
        where = f"{config.path.parent}: module {params.module!r}"
        A, B = params.require("gralora_A", "gralora_B")
        if A.ndim != 3 or B.ndim != 3 or 0 in A.shape or 0 in B.shape or B.shape[:2] != (A.shape[0], A.shape[2]):
            raise InputError(f"{where}: gralora_A is {list(A.shape)} and gralora_B {list(B.shape)}; expected "
                             "(k, in/k, r) and (k, r, out/k)")
        k, _, r = A.shape
        cfg_r, cfg_k = int(config.get("r", 32)), int(config.get("gralora_k", 2))
        cfg_h = int(config.get("hybrid_r", 0))
        if (r, k) != (cfg_r, cfg_k):
            raise InputError(f"{where}: gralora_A {list(A.shape)} has k={k}, r={r}, but the config says "
                             f"gralora_k={cfg_k}, r={cfg_r}; the adapter file and its config disagree")
        if r % k:
            raise InputError(f"{where}: r={r} is not a multiple of gralora_k={k} (PEFT refuses this too)")
        Ag, Bg = t.get("gralora_A_general.weight"), t.get("gralora_B_general.weight")
        if cfg_h > 0 or Ag is not None or Bg is not None:
            Ag, Bg = params.require("gralora_A_general.weight", "gralora_B_general.weight")
            if Ag.ndim != 2 or Bg.ndim != 2 or Ag.shape[0] != cfg_h or Bg.shape[1] != cfg_h:
                raise InputError(f"{where}: gralora_A_general.weight is {list(Ag.shape)} and gralora_B_general.weight "
                                 f"{list(Bg.shape)}, expected (hybrid_r={cfg_h}, in) and (out, {cfg_h})")
            if Ag.shape[1] != k * A.shape[1] or Bg.shape[0] != k * B.shape[2]:
                raise InputError(f"{where}: the hybrid part gralora_B_general {list(Bg.shape)} @ gralora_A_general "
                                 f"{list(Ag.shape)} does not match the block part ({k * B.shape[2]} x "
                                 f"{k * A.shape[1]})")
        alpha = float(config.get("alpha", 64))
        layout = Layout.of(params.context, "GraLoRA", bool(config.get("fan_in_fan_out", False)))
        return GraloraPatch(params.module, A, B, Ag, Bg, alpha / (r + cfg_h), alpha, layout)
