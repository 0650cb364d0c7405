"""HRA (``peft_type: HRA``): Householder reflections on the input side, ``W' = W·H``.

``hra_u`` is ``(in, r)`` for Linear and ``(in·k·k, r)`` for Conv2d, whose weight is then viewed as
``(out, in·k·k)``. PEFT's ``get_delta_weight``:

* default: normalise every column, ``û_i = u_i/‖u_i‖`` (in the adapter dtype), and
  ``H = (I − 2û_0û_0ᵀ)(I − 2û_1û_1ᵀ)⋯(I − 2û_{r−1}û_{r−1}ᵀ)``;
* ``apply_GS``: modified Gram–Schmidt of the columns into ``Q``, and ``H = I − 2QQᵀ``.

Both are written here in compact form ``H = I − V·T·Vᵀ`` with ``V`` the (in, r) directions and ``T`` a
small (r, r) core (upper triangular for the product of reflections, ``2I`` for the GS form), so the
merge is ``W' = W − ((W V) T) Vᵀ``: two thin matmuls, never a dense (in, in) matrix. The inverse is
``H⁻¹ = I − V·T⁻·Vᵀ`` with ``T⁻ = −(I − T G)⁻¹ T``, ``G = VᵀV`` (Woodbury), solved in float64: the
exact inverse of the operator PEFT applies, which for reflections is the reversed product (each
reflection is its own inverse) and stays exact where float32 normalisation leaves ``û`` slightly off
unit length.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError, UnsupportedError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer, input_side


class HraPatch(Patch):
    """W' = W·H with H = I − V T Vᵀ, W viewed as (out, prod(rest))."""

    def __init__(self, module: str, u: torch.Tensor, apply_gs: bool):
        super().__init__(module, ("weight",))
        self.u, self.apply_gs = u, apply_gs
        self.rank = u.shape[1]
        self._core: tuple[torch.Tensor, torch.Tensor] | None = None
        self._inverse: torch.Tensor | None = None
        self._kind: str | None = None  # known once check() has seen the base weight

    # -- the operator ----------------------------------------------------------------------------
    def _directions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V float32 (in, r), T float64 (r, r)) reproducing PEFT's get_delta_weight."""
        if self._core is not None:
            return self._core
        u = self.u.to(torch.float32)
        norms = u.norm(dim=0)
        zero = (norms == 0) | ~torch.isfinite(norms)
        if bool(zero.any()):
            i = int(zero.nonzero()[0, 0])
            raise InputError(f"{self.module}: hra_u column {i} is zero or not finite, so its reflection is "
                             "undefined (PEFT's merge would produce NaN); the adapter is damaged")
        if self.apply_gs:
            cols = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
            for i in range(1, self.rank):
                ui = u[:, i].view(-1, 1)
                for j in range(i):
                    ui = ui - (cols[j].t() @ ui) * cols[j]
                n = ui.norm()
                if not bool(n > 0) or not bool(torch.isfinite(n)):
                    raise InputError(f"{self.module}: hra_u column {i} is linearly dependent on the columns before "
                                     "it, so apply_GS's Gram-Schmidt divides by zero (PEFT's merge would produce NaN)")
                cols.append(ui / n)
            V = torch.cat(cols, dim=1)
            T = 2.0 * torch.eye(self.rank, dtype=torch.float64)
        else:
            V = u / norms
            Vd = V.double()
            # Compact WY form of the product H_0 H_1 … H_{r-1}, H_i = I − 2 v_i v_iᵀ:
            # T_{:i,i} = −2·T_{:i,:i}·V_{:,:i}ᵀ v_i, T_{ii} = 2.
            T = torch.zeros(self.rank, self.rank, dtype=torch.float64)
            for i in range(self.rank):
                T[i, i] = 2.0
                if i:
                    T[:i, i] = -2.0 * (T[:i, :i] @ (Vd[:, :i].T @ Vd[:, i]))
        self._core = (V, T)
        return self._core

    def _inverse_core(self) -> torch.Tensor:
        if self._inverse is None:
            V, T = self._directions()
            Vd = V.double()
            G = Vd.T @ Vd
            A = torch.eye(self.rank, dtype=torch.float64) - T @ G
            if torch.linalg.matrix_rank(A) < self.rank:
                raise UnsupportedError(f"{self.module}: the HRA transform is singular, so it cannot be undone")
            self._inverse = -torch.linalg.solve(A, T)
        return self._inverse

    def orthogonality_deviation(self) -> float:
        """‖HᵀH − I‖₂ in float64 (0 for exact reflections), without forming H."""
        V, T = self._directions()
        Vd = V.double()
        C = T.T @ (Vd.T @ Vd) @ T - T - T.T  # HᵀH − I = V C Vᵀ
        R = torch.linalg.qr(Vd, mode="r")[1]
        return float(torch.linalg.matrix_norm(R @ C @ R.T, ord=2))

    def _transform(self, W: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        V, _ = self._directions()
        W = W.contiguous()
        flat = W.view(W.shape[0], -1)
        V = V.to(W.dtype)
        WV = (flat @ V).to(torch.float64) @ core
        flat.addmm_(WV.to(W.dtype), V.T, alpha=-1.0)
        return W

    # -- Patch interface -----------------------------------------------------------------------
    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        n = self.u.shape[0]
        fan_in = int(torch.Size(w[1:]).numel()) if len(w) > 1 else 0
        if len(w) < 2 or fan_in != n:
            hint = ""
            if len(w) == 2 and w[0] == n:
                hint = " (the weight looks transposed: HRA supports nn.Linear and Conv2d, not Conv1D)"
            elif len(w) == 4 and w[1] * w[2] * w[2] == n and w[2] != w[3]:
                hint = " (PEFT sizes hra_u by kernel_size[0]² and so cannot merge non-square kernels)"
            raise InputError(f"{self.module}: hra_u is {list(self.u.shape)}, so HRA needs a weight with "
                             f"{n} inputs per output, but the base weight is {list(w)}{hint}")
        self._kind = "conv2d" if len(w) > 2 else "linear"
        self._directions()  # refuse a damaged hra_u before any data is read

    def apply(self, tensors: Tensors) -> Tensors:
        _, T = self._directions()
        return {"weight": self._transform(tensors["weight"], T)}

    def revert(self, tensors: Tensors) -> Tensors:
        deviation = self.orthogonality_deviation()
        if deviation > 1e-5:
            self.notes.append(f"HRA: H is {deviation:.2g} from orthogonal (|HᵀH − I|₂); unmerge applied its exact "
                              "inverse, not the reversed reflections")
        return {"weight": self._transform(tensors["weight"], self._inverse_core())}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's HRA forward, ``F.linear(x, W·H)`` (Conv2d: ``conv2d`` with the flattened W·H), computed
        on activations: ``x·Hᵀ`` goes through the base layer, the reflections applied one at a time,
        last first (``Hᵀ = H_{r−1}⋯H_0``), or apply_GS's ``I − 2QQᵀ`` at once. The directions V are the
        parameterization shared with the merge (``_directions``); its compact core T is not used."""
        V = like(self._directions()[0], x)

        def reflect(v: torch.Tensor) -> torch.Tensor:
            if self.apply_gs:
                return v - 2.0 * (v @ V) @ V.T
            for i in reversed(range(self.rank)):
                u = V[:, i]
                v = v - 2.0 * (v @ u)[..., None] * u
            return v

        return input_side(layer, x, base, reflect)

    def why_not_invertible(self) -> str | None:
        try:
            self._inverse_core()
        except UnsupportedError as e:
            return str(e)
        return None

    def describe(self) -> dict[str, Any]:
        kind = {"kind": self._kind} if self._kind else {}
        return {**kind, "rank": self.rank, "inputs": self.u.shape[0], "apply_GS": self.apply_gs,
                "orthogonality_deviation": self.orthogonality_deviation()}


@register
class Hra(Method):
    peft_types = ("HRA",)
    param_names = frozenset({"hra_u"})
    support = (Support("HRA (incl. apply_GS)", "Linear, Conv2d", "exact", "exact", "0.21.2"),)

    def summary(self, config) -> dict[str, Any]:
        return {"apply_GS": bool(config.get("apply_GS", False)), "rule": "W' = W·H (input-side reflections)"}

    def patch(self, params: ModuleParams) -> Patch:
        (u,) = params.require("hra_u")
        if u.ndim != 2 or u.shape[1] == 0:
            raise InputError(f"{params.config.path.parent}: module {params.module!r}: hra_u has shape "
                             f"{list(u.shape)}, expected (in_features, r) with r > 0")
        return HraPatch(params.module, u, bool(params.config.get("apply_GS", False)))
