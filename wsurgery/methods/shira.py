"""SHiRA (``peft_type: SHIRA``): sparse high-rank adaptation of ``nn.Linear`` weights.

``shira_weight (n)`` holds the trained values and ``shira_indices (2, n)`` their positions
(``[0]`` = row/output, ``[1]`` = column/input; int32, or float32 when saved on Windows). PEFT adds
``sparse_coo(indices, weight · scaling, (out, in))`` to W; ``scaling`` is 1.0 (it can only be changed
at run time, it is not saved). Repeated positions add up, as in a sparse COO tensor. Additive, so
unmerge subtracts the same values exactly; nothing dense is built: the values are added in place.
The indices are saved, so the random mask (``random_seed``) never needs reproducing.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import AdditivePatch, Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer


class ShiraPatch(AdditivePatch):
    def __init__(self, module: str, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        super().__init__(module, ("weight",))
        self.values, self.rows, self.cols = values, rows, cols
        self._shape: tuple[int, int] | None = None

    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        if len(w) != 2:
            raise InputError(f"{self.module}: shira_weight applies to nn.Linear weights (out, in), but the base "
                             f"weight is {list(w)}; SHiRA has no Conv or Embedding layers")
        out, inp = w
        if self.rows.numel():
            rmax, cmax = int(self.rows.max()), int(self.cols.max())
            if rmax >= out or cmax >= inp:
                raise InputError(f"{self.module}: shira_indices reach row {rmax}, column {cmax}, outside the base "
                                 f"weight {list(w)}; was the adapter trained on another model?")
        self._shape = (out, inp)

    def _add(self, tensors: Tensors, alpha: float) -> Tensors:
        W = tensors["weight"]
        if self._shape is None:
            self.check({"weight": tuple(W.shape)})
        v = self.values.to(W.dtype)
        if alpha != 1.0:
            v = v * alpha
        W.index_put_((self.rows, self.cols), v, accumulate=True)
        return tensors

    def delta(self) -> Tensors:
        assert self._shape is not None  # derived from the shapes by bind()
        return self._add({"weight": torch.zeros(self._shape, dtype=torch.float32)}, 1.0)

    def add_scaled(self, tensors: Tensors, alpha: float) -> Tensors:
        return self._add(tensors, alpha)  # in place, without a dense ΔW

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``ShiraLayer.forward`` runs ``F.linear(x, W + sparse_coo(indices, values))``; here the sparse
        part on activations: entry (row, col) carries ``value · x[:, col]`` to output ``row`` (repeats add up)."""
        rows, cols = self.rows.to(x.device), self.cols.to(x.device)
        return layer(x, base).index_add(1, rows, x[:, cols] * like(self.values, x))

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "linear", "entries": self.values.numel()}
        if self._shape is not None:
            d["density"] = self.values.numel() / max(1, self._shape[0] * self._shape[1])
        return d


@register
class Shira(Method):
    peft_types = ("SHIRA",)
    param_names = frozenset({"shira_weight", "shira_indices"})
    support = (Support("SHiRA (saved sparse indices)", "Linear", "exact", "exact", "0.21.2"),)

    def summary(self, config) -> dict[str, Any]:
        return {"r": config.get("r"), "mask_type": config.get("mask_type"),
                "rule": "W[indices] += shira_weight (scaling 1.0)"}

    def patch(self, params: ModuleParams) -> Patch:
        values, indices = params.require("shira_weight", "shira_indices")
        where = f"{params.config.path.parent}: module {params.module!r}"
        if values.ndim != 1 or indices.ndim != 2 or indices.shape[0] != 2 or indices.shape[1] != values.shape[0]:
            raise InputError(f"{where}: shira_weight is {list(values.shape)} and shira_indices {list(indices.shape)}; "
                             "expected (n,) and (2, n)")
        if not values.is_floating_point():
            raise InputError(f"{where}: shira_weight is {values.dtype}, expected a float tensor")
        # PEFT saves them as float32 on Windows and casts back with .to(int).
        if indices.is_floating_point() and not (bool(torch.isfinite(indices).all())
                                                and torch.equal(indices, indices.trunc())):
            raise InputError(f"{where}: shira_indices (float) hold non-integer values; the file is damaged")
        idx = indices.to(torch.int64)
        if idx.numel() and int(idx.min()) < 0:
            raise InputError(f"{where}: shira_indices hold negative positions; the file is damaged")
        return ShiraPatch(params.module, values, idx[0].contiguous(), idx[1].contiguous())
