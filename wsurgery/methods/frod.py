"""FRoD (``peft_type: FROD``): a full re-parametrisation of Linear and Conv1D weights.

``W' = U (S + diag(λ_l)) V^T`` (transposed back for Conv1D), where

* ``V = base_model.frod_V.<category> (in, in)`` is shared by every targeted module of one category
  (``self_attn_q_proj``, ``mlp_down_proj``, ...: the last two components of the module path, the last
  one alone after a layer number, ``attention_output`` for BERT's ``attention.output.dense``);
* ``S`` is sparse: the values ``frod_lambda_s_values (nnz)`` at ``base_model.frod_s_indices.<cat>
  (2, nnz)`` in a ``base_model.frod_s_size.<cat>`` = (in, in) matrix;
* ``λ_l = frod_lambda_l (in)``;
* ``U`` is not saved: PEFT rebuilds it from the base, ``bi = (V^-1 W^T)^T`` in float64 (a pseudo-inverse
  with ``rtol=1e-6`` where V is singular), ``U = bi / ‖bi‖_col`` (columns of norm <= 1e-12 become 0),
  cast to fp32. We do the same, and then PEFT's ``W + (U (S + L) V^T - W)`` in fp32. V's LU
  factorisation is computed once per category.

PEFT itself rebuilds U at load time from a V it recomputes from the base (the saved V only replaces it
afterwards, for the ``V^T`` factor); on the machine that trained the adapter the two are identical. We
rebuild U from the saved V, so both factors come from the same V wherever the merge runs.

Projections saved with ``save_projection=false`` cannot be rebuilt here: PEFT recomputes V from a joint
QR/eigen-decomposition of *all* targeted base weights of a category, and a patch only sees its own
module's weight. Such adapters are refused at load time.

Unmerge is impossible: PEFT keeps a copy of the base in memory to unmerge; from the files, ``U`` is
recoverable (``W' V^-T (S + L)^-1``) but W also needs the initial ``λ_l`` (the column norms of ``bi``),
which training overwrote.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, UnsupportedError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .hira import Layout, ShapeLayout
from .layers import Layer, Linear

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig


def category(module: str) -> str:
    """PEFT's ``_category_from_key``: which shared projection a module uses."""
    parts = module.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    cat = f"{parts[-2]}_{parts[-1]}"
    if cat == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return cat


def solve_u(V: torch.Tensor, W: torch.Tensor, lu: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """PEFT's ``_calculate_frod_u_and_lambda`` (U only): W and V in float64, U in fp32.

    ``lu`` is V's float64 LU factorisation (None where V is singular: then PEFT's pinv fallback).
    """
    w = W.to(torch.float64)
    if lu is not None:
        bi = torch.linalg.lu_solve(lu[0], lu[1], w.T).T
    else:
        bi = w @ torch.linalg.pinv(V.to(torch.float64), rtol=1e-6).T
    norms = torch.linalg.norm(bi, dim=0)
    u = torch.zeros_like(bi)
    nonzero = norms > 1e-12
    u[:, nonzero] = bi[:, nonzero] / norms[nonzero]
    return u.float()


class FrodPatch(ShapeLayout, Patch):
    """W' = U (S + diag λ_l) V^T with U rebuilt from W and the category's V; Linear or Conv1D as the axis
    of length ``len(V)`` (the inputs) says, not the saved ``fan_in_fan_out`` (the last wrapped layer's)."""

    def __init__(self, module: str, cat: str, V: torch.Tensor, indices: torch.Tensor, size: tuple[int, int],
                 values: torch.Tensor, lambda_l: torch.Tensor, layout: Layout, cache: dict[Hashable, Any]):
        super().__init__(module, ("weight",))
        self.cat, self.V, self.indices, self.size = cat, V, indices, size
        self.values, self.lambda_l, self.layout = values, lambda_l, layout
        self.cache = cache
        #: On a bf16/fp16 base PEFT builds the whole new weight in that dtype, often many ulps from the
        #: exact result; we do the same, from ``base_dtypes``. Set to torch.float32 to get the correctly
        #: rounded value of PEFT's formula instead.
        self.peft_precision: torch.dtype | None = None

    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        n = self.V.shape[0]
        if len(w) != 2:
            raise InputError(f"{self.module}: FRoD changes Linear/Conv1D weights, but the base weight is {list(w)}")
        if n not in w:
            raise InputError(f"{self.module}: FRoD's frod_V.{self.cat} is {list(self.V.shape)} but the base weight "
                             f"{list(w)} has no axis of {n} inputs; was the adapter trained on another model?")
        self._by_shape = None if w[0] == w[1] else w[0] == n
        self.layout.observe(self.module, self._by_shape)

    def _lu(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = ("frod_lu", self.cat)
        if key not in self.cache:
            LU, pivots, info = torch.linalg.lu_factor_ex(self.V.to(torch.float64))
            self.cache[key] = (LU, pivots) if int(info) == 0 else None
        return self.cache[key]

    def apply(self, tensors: Tensors) -> Tensors:
        W = tensors["weight"]
        Wt = W.T if self.transposed else W  # (out, in)
        low = self.peft_precision or self.base_dtypes.get("weight")
        if low is not None and low.itemsize < 4:
            return {"weight": self._apply_low_precision(W, Wt, low)}
        U = solve_u(self.V, Wt, self._lu())
        V = self.V.to(torch.float32)
        S = torch.sparse_coo_tensor(self.indices, self.values.to(torch.float32), self.size).coalesce()
        # U @ (S + diag λ) in PEFT's order of terms, without a dense (in, in) S: U·λ + U·S.
        US = U * self.lambda_l.to(torch.float32)[None, :]
        if S._nnz():
            US.add_(torch.sparse.mm(S.t(), U.t()).t())
        F = US @ V.T
        delta = F.sub_(Wt)
        return {"weight": W.add_(delta.T if self.transposed else delta)}

    def _apply_low_precision(self, W: torch.Tensor, Wt: torch.Tensor, low: torch.dtype) -> torch.Tensor:
        """PEFT's merge on a bf16/fp16 base: V rounded to it before U is solved, then U, S, λ and V in it,
        ``U @ (S + L) @ V^T`` and ``F - W`` rounded in it, and ``W + delta`` rounded once more."""
        V = self.V.to(low)
        lu = self._lu() if self.V.dtype == low else None
        if lu is None:
            LU, pivots, info = torch.linalg.lu_factor_ex(V.to(torch.float64))
            lu = (LU, pivots) if int(info) == 0 else None
        U = solve_u(V, Wt, lu).to(low)
        S = torch.sparse_coo_tensor(self.indices, self.values.to(low), self.size).coalesce().to_dense()
        F = U @ (S + torch.diag_embed(self.lambda_l.to(low))) @ V.T
        Wl = Wt.to(low)
        out = Wl + (F - Wl)
        return (out.T if self.transposed else out).to(W.dtype).contiguous()

    def layer(self, shapes: Shapes) -> Layer:
        return Linear(self.transposed)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's forward with one active adapter: the base product is skipped and the rebuilt weight runs on
        activations, ``z = x V``, ``(z Sᵀ + z ⊙ λ) Uᵀ + b``; U is PEFT's ``_calculate_frod_u_and_lambda``
        (float64 ``solve(V, Wᵀ)ᵀ``, pinv fallback, unit columns) computed here again, on the CPU as PEFT does."""
        W = base["weight"]
        Wl = (W.T if self.transposed else W).cpu().to(torch.float64)
        V64 = self.V.to(torch.float64)
        try:
            bi = torch.linalg.solve(V64, Wl.T).T
        except RuntimeError:  # singular V
            bi = Wl @ torch.linalg.pinv(V64, rtol=1e-6).T
        norms = torch.linalg.norm(bi, dim=0)
        U = torch.where(norms > 1e-12, bi / norms.clamp_min(1e-12), torch.zeros_like(bi)).float()
        V = like(self.V, x)
        S = torch.zeros(self.size, device=x.device).index_put_(tuple(self.indices.to(x.device)),
                                                               like(self.values, x), accumulate=True)
        z = x @ V
        y = (z @ S.T + z * like(self.lambda_l, x)) @ like(U, x).T
        return y + base["bias"] if "bias" in base else y

    def why_not_invertible(self) -> str | None:
        return ("FRoD rebuilds W from U (S + diag λ) V^T; recovering W from the merged weight needs the initial λ "
                "(the column norms of W V^-T), which training overwrote and no file keeps (PEFT keeps a copy of the "
                "base in memory for this). Keep the base checkpoint and merge from it again instead")

    def describe(self) -> dict[str, Any]:
        return {"kind": "conv1d_transposed" if self.transposed else "linear", "category": self.cat,
                "in_features": self.V.shape[0], "sparse_entries": int(self.values.numel()),
                "V_singular": self._lu() is None}


@register
class Frod(Method):
    peft_types = ("FROD",)
    param_names = frozenset({"frod_lambda_l", "frod_lambda_s_values"})
    shared_names = frozenset({"frod_V", "frod_s_indices", "frod_s_size"})
    support = (
        Support("FRoD (saved projections)", "Linear, Conv1D",
                "exact (U rebuilt from the base and the saved V in float64 as PEFT does; on bf16/fp16 bases W' is "
                "rebuilt in the base dtype, as PEFT does)",
                "refused: the initial λ (column norms of W V^-T) is not saved", "0.21.2"),
        Support("FRoD with save_projection=false", "-",
                "refused: V is a joint decomposition of all targeted base weights of a category", "-", "0.21.2"),
    )

    def check_config(self, config: AdapterConfig) -> None:
        if not config.get("save_projection", True):
            raise UnsupportedError(
                f"{config.path}: FRoD adapter saved with save_projection=false: its shared V is a joint QR/eigen "
                "decomposition of all targeted base weights of each module category, which a per-module merge "
                "cannot rebuild; re-save the adapter with save_projection=True")

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
                "sparse_rate": config.get("sparse_rate", 0.01), "save_projection": config.get("save_projection", True)}

    def patch(self, params: ModuleParams) -> Patch:
        config, shared = params.config, params.context.shared
        where = f"{config.path.parent}: module {params.module!r}"
        lambda_l, values = params.require("frod_lambda_l", "frod_lambda_s_values")
        cat = category(params.module)
        names = [f"frod_V.{cat}", f"frod_s_indices.{cat}", f"frod_s_size.{cat}"]
        missing = [n for n in names if n not in shared]
        if missing:
            raise InputError(f"{where}: FRoD category {cat!r} needs the model-wide tensor(s) "
                             f"{', '.join('base_model.' + n for n in missing)}, which the adapter file lacks")
        V, indices, size_t = (shared[n] for n in names)
        n = V.shape[0] if V.ndim == 2 else -1
        if V.ndim != 2 or V.shape[1] != n:
            raise InputError(f"{where}: base_model.frod_V.{cat} is {list(V.shape)}, expected a square matrix")
        size = tuple(int(s) for s in size_t.tolist())
        if size != (n, n):
            raise InputError(f"{where}: base_model.frod_s_size.{cat} is {list(size)}, expected [{n}, {n}]")
        if (indices.ndim != 2 or indices.shape[0] != 2 or indices.is_floating_point()
                or values.shape != (indices.shape[1],)):
            raise InputError(f"{where}: base_model.frod_s_indices.{cat} {list(indices.shape)} and "
                             f"frod_lambda_s_values {list(values.shape)} do not fit (expected [2, nnz] and [nnz])")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise InputError(f"{where}: base_model.frod_s_indices.{cat} points outside the {n}x{n} matrix")
        if lambda_l.shape != (n,):
            raise InputError(f"{where}: frod_lambda_l is {list(lambda_l.shape)}, expected [{n}]")
        layout = Layout.of(params.context, "FRoD", bool(config.get("fan_in_fan_out", False)))
        return FrodPatch(params.module, cat, V, indices.long(), (n, n), values, lambda_l, layout, params.context.cache)
