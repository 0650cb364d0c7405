"""DEFT (``peft_type: DEFT``): a residual-projection update that depends on W, on nn.Linear and
transformers' Conv1D (stored transposed; the layout rule is HiRA's, :class:`~.hira.Layout`).

With ``P = deft_P (out, r)``, ``R = deft_R (r, in)`` and W in its logical (out, in) layout:

* ``decomposition_method="relu"``: ``Q = P``, ``G = relu(P)``; ``"qr"``: ``Q = G = qr(P).Q`` (float32);
* ``M = Gᵀ W`` (r, in), computed in float32;
* ``W' = W + Q (s·R − M)`` with ``s = alpha / r`` when ``alpha`` is set (r = deft_P's column count,
  PEFT's rank capped at out), else 1;
* PaRa (``para=True``, no ``deft_R``): ``W' = W − Q M = (I − Q Gᵀ) W``.

Unmerge: M is not in the files (PEFT caches it in memory). With relu, ``Gᵀ W' = (I − GᵀP) M + GᵀP s R``,
an r×r system, gives M back whenever ``I − GᵀP`` is invertible, and then ``W = W' − P (s R − M)``
(PaRa the same with R = 0). With qr, ``GᵀQ = I`` makes the projection destroy ``Gᵀ W``: W cannot be
recovered without the base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, NotInvertibleError, UnsupportedError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .hira import Layout
from .layers import Layer, Linear

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

_METHODS = ("relu", "qr")
# I − GᵀP whose smallest singular value is below this fraction of its largest counts as singular.
_SINGULAR_RTOL = 1e-12
# Unmerges whose rounding-error growth bound exceeds this are reported.
_NOTE_GROWTH = 100.0


class DeftPatch(Patch):
    def __init__(self, module: str, P: torch.Tensor, R: torch.Tensor | None, method: str, scaling: float,
                 layout: Layout):
        super().__init__(module, ("weight",))
        self.P, self.R, self.method, self.scaling, self.layout = P, R, method, scaling, layout
        self.out, self.rank = P.shape
        self._by_shape: bool | None = None
        self._checked = False
        self._sys: torch.Tensor | None = None
        self._cond: float | None = None

    @property
    def para(self) -> bool:
        return self.R is None

    def check(self, shapes: Shapes) -> None:
        w = tuple(shapes["weight"])
        inp = None if self.R is None else self.R.shape[1]
        if len(w) == 2 and inp is not None:
            ok = w in ((self.out, inp), (inp, self.out))
        else:
            ok = len(w) == 2 and self.out in w
        if not ok:
            want = f"[{self.out}, {inp}] (or [{inp}, {self.out}] for Conv1D)" if inp is not None else \
                f"one axis of {self.out} (out_features)"
            raise InputError(f"{self.module}: deft_P is {list(self.P.shape)}"
                             f"{'' if self.R is None else f' and deft_R {list(self.R.shape)}'}, so the base weight "
                             f"should be {want}, but it is {list(w)}; was the adapter trained on another model?")
        self._by_shape = Layout.by_shape(w, self.out, inp)
        self.layout.observe(self.module, self._by_shape)
        self._checked = True

    def transposed(self) -> bool:
        return self.layout.transposed(self.module, self._by_shape)

    def _project(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, G) as PEFT's ``_project``: float32 (QR included), then in the working dtype."""
        P = self.P.to(torch.float32)
        if self.method == "relu":
            Q, G = P, torch.relu(P)
        else:
            Q, _ = torch.linalg.qr(P)
            G = Q
        return Q.to(dtype), G.to(dtype)

    def _injection(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.R is None else self.R.to(torch.float32).mul(self.scaling).to(dtype)

    def _logical(self, W: torch.Tensor) -> torch.Tensor:
        return W.T if self.transposed() else W  # a view: in-place changes reach W

    def apply(self, tensors: Tensors) -> Tensors:
        W = tensors["weight"]
        Wl = self._logical(W)
        Q, G = self._project(W.dtype)
        M = G.T @ Wl  # (r, in)
        sR = self._injection(W.dtype)
        delta = -(Q @ M) if sR is None else Q @ (sR - M)
        Wl.add_(delta)
        return tensors

    def layer(self, shapes: Shapes) -> Layer:
        return Linear(self.transposed())

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's DEFT forward on activations: ``base_layer(x) − ((x Wᵀ) G) Qᵀ + (x (s R)ᵀ) Qᵀ`` with
        (Q, G) = (P, relu(P)) or (qr(P), qr(P)) in float32, ``x Wᵀ`` the bias-free base product."""
        W = base["weight"]
        P = like(self.P, W)
        Q = torch.linalg.qr(P)[0] if self.method == "qr" else P
        G = Q if self.method == "qr" else torch.relu(P)
        y = layer(x, base) - (layer(x, {"weight": W}) @ G) @ Q.T
        if self.R is not None:
            y = y + (x @ (like(self.R, W) * self.scaling).T) @ Q.T
        return y

    # -- unmerge ----------------------------------------------------------------------------------
    def _system(self) -> torch.Tensor:
        """I − relu(P)ᵀP in float64."""
        if self._sys is None:
            P = self.P.to(torch.float64)
            self._sys = torch.eye(self.rank, dtype=torch.float64) - torch.relu(P).T @ P
        return self._sys

    def condition(self) -> float:
        if self._cond is None:
            s = torch.linalg.svdvals(self._system())
            self._cond = float(s[0] / s[-1]) if s[-1] > 0 else float("inf")
        return self._cond

    def why_not_invertible(self) -> str | None:
        if self.method == "qr":
            what = "PaRa removes" if self.para else "DEFT replaces"
            return (f"{what} the subspace spanned by qr(deft_P) (an orthogonal projection), so the part of W inside "
                    "it is not in the merged weight or the adapter; only the base checkpoint can restore it")
        cond = self.condition()
        if not cond < 1 / _SINGULAR_RTOL:
            return (f"I − relu(deft_P)ᵀ·deft_P is singular (condition number {cond:.3g}), so relu(deft_P)ᵀ·W cannot "
                    "be solved from the merged weight; only the base checkpoint can restore W")
        return None

    def revert(self, tensors: Tensors) -> Tensors:
        reason = self.why_not_invertible()
        if reason is not None:
            raise NotInvertibleError(f"{self.module}: {reason}")
        W = tensors["weight"]
        Wl = self._logical(W)
        P = self.P.to(torch.float64)
        G = torch.relu(P)
        K = G.T @ P
        rhs = G.T @ Wl.to(torch.float64)
        sR = self._injection(torch.float64)
        if sR is not None:
            rhs -= K @ sR
        inv = torch.linalg.inv(self._system())
        M = inv @ rhs  # (I − K) M = Gᵀ W' − K s R; r×r, so the explicit inverse costs nothing
        delta = -(P @ M) if sR is None else P @ (sR - M)
        Wl.sub_(delta.to(W.dtype))
        # The merged file's rounding E comes back as (I − P Gᵀ)⁻¹ E = (I + P (I − K)⁻¹ Gᵀ) E.
        norm = torch.linalg.matrix_norm
        growth = 1 + float(norm(P, 2) * norm(inv, 2) * norm(G, 2))
        if growth > _NOTE_GROWTH:
            self.notes.append(f"DEFT (relu) unmerge solved the {self.rank}x{self.rank} system I − relu(P)ᵀP (condition "
                              f"number {self.condition():.3g}) in float64; the merged file's rounding can grow by up "
                              f"to {growth:.3g}x in the unmerged weight")
        return tensors

    def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"kind": "linear", "rank": self.rank, "decomposition": self.method,
                                 "para": self.para, "scaling": self.scaling}
        if self.method == "relu":
            facts["cond_I_minus_relu_Pt_P"] = self.condition()
        if self._checked:
            facts["layout"] = "(in, out) Conv1D" if self.transposed() else "(out, in) Linear"
        return facts


@register
class Deft(Method):
    peft_types = ("DEFT",)
    param_names = frozenset({"deft_P", "deft_R"})
    support = (
        Support("DEFT relu (incl. PaRa, alpha scaling)", "Linear, Conv1D", "exact",
                "exact (r×r float64 solve for relu(P)ᵀW; error growth reported)", "0.21.2"),
        Support("DEFT qr (incl. PaRa)", "Linear, Conv1D", "exact",
                "refused: the orthogonal projection removes part of W, which is not in the files", "0.21.2"),
    )

    def check_config(self, config: AdapterConfig) -> None:
        method = config.get("decomposition_method", "relu")
        if method not in _METHODS:
            raise UnsupportedError(f"{config.path}: DEFT decomposition_method={method!r} is unknown (PEFT accepts "
                                   f"{', '.join(_METHODS)})")

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"decomposition": config.get("decomposition_method", "relu"), "para": bool(config.get("para", False)),
                "alpha": config.get("alpha")}

    def patch(self, params: ModuleParams) -> Patch:
        config, t = params.config, params.tensors
        (P,) = params.require("deft_P")
        para = bool(config.get("para", False))
        where = f"{config.path.parent}: module {params.module!r}"
        if para:
            if "deft_R" in t:
                raise InputError(f"{where} saves deft_R, but the config says para=true (PaRa has no injection "
                                 "matrix); the adapter file and its config disagree")
            R = None
        else:
            (R,) = params.require("deft_R")
        if P.ndim != 2 or P.shape[1] == 0 or (R is not None and (R.ndim != 2 or R.shape[0] != P.shape[1])):
            raise InputError(f"{where}: deft_P is {list(P.shape)}"
                             f"{'' if R is None else f' and deft_R is {list(R.shape)}'}; they should be (out, r) and "
                             "(r, in); the adapter file is inconsistent")
        alpha = config.get("alpha")
        # PEFT: alpha / r with r capped at out_features (deft_P's column count), 1 when alpha is unset or 0.
        scaling = alpha / P.shape[1] if alpha else 1.0
        method = config.get("decomposition_method", "relu")
        layout = Layout.of(params.context, "DEFT", bool(config.get("fan_in_fan_out", False)))
        return DeftPatch(params.module, P, R, method, scaling, layout)
