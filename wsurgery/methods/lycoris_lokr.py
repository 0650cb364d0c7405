"""LyCORIS LoKr as kohya/LyCORIS files save it: ΔW = γ·kron(w1, w2) reshaped to W's shape, where
w1 = ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; w2 = ``lokr_w2``, or ``lokr_w2_a @ lokr_w2_b`` (a conv's
``w2_b`` spans ``d·k…``), or with the Tucker core ``einsum("i j ..., i p, j r -> p r ...", lokr_t2, w2_a, w2_b)``.

γ is α/r (r: the rank of the factored side, ``w_b.shape[0]``; missing or zero α = r), except that LyCORIS
trains with γ = 1 when both w1 and w2 are full matrices (its "full-rank factors" rule: α is ignored). r is the
rank LyCORIS trained with (and ComfyUI reads); LyCORIS 4.1.3's own loader takes ``w2_a.shape[1]`` for a Tucker
``lokr_t2`` file, which is not the rank there.
Unlike PEFT's LoKr the layout is read from the tensors, not re-derived from a config. Additive: exact unmerge.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import InputError
from .base import AdditivePatch, Shapes, Tensors, like
from .layers import Layer
from .lycoris_common import conv_op


class LycorisLokrPatch(AdditivePatch):
    def __init__(self, module: str, tensors: dict[str, torch.Tensor], alpha: float | None):
        super().__init__(module, ("weight",))
        self.t = tensors
        factored = [n for n in ("lokr_w1_b", "lokr_w2_b") if n in tensors]
        self.rank: int | None = int(tensors[factored[0]].shape[0]) if factored else None
        self.alpha = alpha
        if self.rank is None:  # both factors full: LyCORIS forces α = r
            self.scaling = 1.0
        else:
            self.scaling = (alpha if alpha else self.rank) / self.rank
        self._shape: tuple[int, ...] | None = None

    def _w2(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        if "lokr_w2" in t:
            return t["lokr_w2"]
        if "lokr_t2" in t:
            return torch.einsum("i j ..., i p, j r -> p r ...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        r, o, *k = t["lokr_w2_b"].shape
        return (t["lokr_w2_a"] @ t["lokr_w2_b"].view(r, -1)).view(-1, o, *k)

    def _factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        t = self.t
        w1 = tuple(t["lokr_w1"].shape) if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = tuple(t["lokr_w2"].shape)
        elif "lokr_t2" in t:
            w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
        else:
            w2 = (t["lokr_w2_a"].shape[0], *t["lokr_w2_b"].shape[1:])
        return tuple(map(int, w1)), tuple(map(int, w2))

    def check(self, shapes: Shapes) -> None:
        w = tuple(shapes["weight"])
        (a, c), w2 = self._factor_shapes()
        out, inner = a * w2[0], c * math.prod(w2[1:])
        if len(w) < 2 or out != w[0] or inner != math.prod(w[1:]) or (len(w2) > 2 and tuple(w2[2:]) != w[2:]):
            saved = ", ".join(f"{n} {list(v.shape)}" for n, v in self.t.items())
            raise InputError(f"{self.module}: LoKr factors ({saved}) give a {out}x{inner} change but the base weight "
                             f"is {list(w)}; was the adapter trained on another model?")
        self._shape = w

    def delta(self) -> Tensors:
        assert self._shape is not None  # set by check()
        t = {n: v.to(torch.float32) for n, v in self.t.items()}
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = self._w2(t)
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
        d = torch.kron(w1, w2.contiguous())
        if self.scaling != 1:
            d = d * self.scaling
        return {"weight": d.reshape(self._shape)}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """kron(w1, w2) on activations: the input channels split as (c, d), w1 (a, c) mixes the c axis, then w2
        (b, d[, k…]) runs as the layer over the d axis; output channel i·b + j."""
        t = {n: like(v, x) for n, v in self.t.items()}
        W = base["weight"]
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("ijkl,ip,jq->pqkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        (a, c), b = w1.shape, w2.shape[0]
        w2 = w2.reshape(b, W.shape[1] // c, *W.shape[2:])
        n, d, space = x.shape[0], w2.shape[1], x.shape[2:]
        z = torch.einsum("ac,ncd...->nad...", w1, x.reshape(n, c, d, *space)).reshape(n * a, d, *space)
        y = z @ w2.T if x.dim() == 2 else conv_op(w2)(z, w2)
        return layer(x, base) + y.reshape(n, a * b, *y.shape[2:]) * self.scaling

    def describe(self) -> dict[str, Any]:
        w1 = "full" if "lokr_w1" in self.t else "decomposed"
        w2 = "full" if "lokr_w2" in self.t else ("tucker" if "lokr_t2" in self.t else "decomposed")
        return {"kind": f"lokr/w1:{w1},w2:{w2}", "rank": self.rank, "alpha": self.alpha, "scaling": self.scaling}
