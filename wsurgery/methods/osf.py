"""OSF, orthogonal subspace fine-tuning (``peft_type: OSF``), on Linear layers.

The adapter saves the trained "low" singular part of W: ``osf_svd_params.U_low (out, m-k)``,
``.S_low (m-k)`` and ``.V_low (m-k, in)``, with ``m = min(out, in)`` and ``k`` the effective rank
(read from the shapes). The initial values of those factors, the bottom ``m-k`` singular triplets of
the base weight, are not saved; PEFT recomputes them from the fp32 SVD of W
(``torch.linalg.svd(W.float(), full_matrices=False)``) and merges

    W' = W + (U_low·diag(S_low)·V_low - U_0·diag(S_0)·V_0)

which is ``TopK_SVD(W) + U_low·diag(S_low)·V_low``. We make the same call on the same fp32 W and the
same products in the same order, so fp32 results agree with PEFT to rounding. The product U_0 S_0 V_0
does not depend on the signs LAPACK picks for the singular vectors; it is only ill-defined when a
singular value is repeated across the cut (``S[k-1] == S[k]``), which ``describe()`` reports as the
relative gap ``(S[k-1] - S[k]) / S[0]``.

Unmerge is impossible: the merge replaces the low singular part of W by the trained factors, and the
original low part (the factors' initial values) is in no file. PEFT refuses to unmerge OSF as well.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer

#: Relative singular-value gap at the cut below which the low part is numerically ambiguous.
NEAR_DEGENERATE = 1e-5


def low_part(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's ``decompose_weight_matrix``: the fp32 SVD of W split after the first k triplets.

    Returns (U_0, S_0, V_0, S): the bottom triplets and all singular values.
    """
    U, S, Vt = torch.linalg.svd(W.to(torch.float32), full_matrices=False)
    return U[:, k:].contiguous(), S[k:].contiguous(), Vt[k:, :].contiguous(), S


class OsfPatch(Patch):
    """W' = W + U_low diag(S_low) V_low - U_0 diag(S_0) V_0, with (U_0, S_0, V_0) from the SVD of W."""

    def __init__(self, module: str, U_low: torch.Tensor, S_low: torch.Tensor, V_low: torch.Tensor):
        super().__init__(module, ("weight",))
        self.U_low, self.S_low, self.V_low = U_low, S_low, V_low
        self.low = S_low.numel()
        self.gap: float | None = None  # relative singular-value gap at the cut, once merged
        #: On a bf16/fp16 base PEFT rounds the initial factors to that dtype before multiplying them (in
        #: fp32), some ulps away from the exact result; we do the same, from ``base_dtypes``. Set to
        #: torch.float32 to get the correctly rounded value of the formula instead.
        self.peft_precision: torch.dtype | None = None

    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        if len(w) != 2:
            raise InputError(f"{self.module}: OSF changes 2-D (Linear) weights, but the base weight is {list(w)}")
        out, inp = w
        m = min(out, inp)
        want = {"U_low": (out, self.low), "V_low": (self.low, inp)}
        got = {"U_low": tuple(self.U_low.shape), "V_low": tuple(self.V_low.shape)}
        if got != want or self.low >= m:
            raise InputError(
                f"{self.module}: osf_svd_params U_low {list(got['U_low'])}, S_low [{self.low}], V_low "
                f"{list(got['V_low'])} do not fit the base weight {list(w)} (expected U_low [{out}, m-k], "
                f"V_low [m-k, {inp}] with 0 < k <= m = {m}); was the adapter trained on another model?")

    def apply(self, tensors: Tensors) -> Tensors:
        W = tensors["weight"]
        k = min(W.shape) - self.low
        U0, S0, V0, S = low_part(W, k)
        if k < S.numel() and S[0] > 0:
            self.gap = float((S[k - 1] - S[k]) / S[0])
            if self.gap < NEAR_DEGENERATE:
                self.notes.append(
                    f"{self.module}: singular values {k} and {k + 1} of the base weight are nearly equal (relative "
                    f"gap {self.gap:.2g}); which singular directions count as 'low' is then numerically ambiguous, "
                    "and the result may differ from PEFT's in those directions")
        U_low = self.U_low.to(torch.float32)
        S_low = self.S_low.to(torch.float32)
        V_low = self.V_low.to(torch.float32)
        low = self.peft_precision or self.base_dtypes.get("weight")
        if low is not None and low.itemsize < 4:  # PEFT rounds the initial factors to the base dtype
            U0, S0, V0 = (t.to(low).to(torch.float32) for t in (U0, S0, V0))
        # PEFT's get_delta_weight, in its order: current - initial, then W + delta.
        current = torch.mm(U_low * S_low.unsqueeze(0), V_low)
        initial = torch.mm(U0 * S0.unsqueeze(0), V0)
        return {"weight": W.add_(current.sub_(initial))}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's factored forward: ``base_layer(x) + (x [V_low; V_0]ᵀ) [U_low S_low, −U_0 S_0]ᵀ``, the initial
        factors (U_0, S_0, V_0) the bottom triplets of the fp32 SVD of W, as PEFT computes them at init.

        The SVD runs on the CPU, as the merge's does: another implementation (cuSOLVER) moves the low
        subspace by ~1e-5 of |W|·|x|, as much as fp32 verify allows."""
        W = base["weight"]
        U, S, Vt = (t.to(x.device) for t in torch.linalg.svd(W.cpu(), full_matrices=False))
        k = S.numel() - self.low
        left = torch.cat([like(self.U_low, W) * like(self.S_low, W), -(U[:, k:] * S[k:])], dim=1)
        right = torch.cat([like(self.V_low, W), Vt[k:]], dim=0)
        return layer(x, base) + (x @ right.T) @ left.T

    def why_not_invertible(self) -> str | None:
        return ("OSF replaces the low singular part of W by the trained factors; the original low part (the factors' "
                "initial values, from the SVD of the base) is not saved, so W cannot be recovered (PEFT refuses to "
                "unmerge OSF too). Keep the base checkpoint and merge from it again instead")

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": "linear", "trainable_singular_triplets": self.low,
                                "svd": "torch.linalg.svd of fp32 W (recomputed from the base)"}
        if self.gap is not None:
            info["relative_gap_at_cut"] = self.gap
        return info


@register
class Osf(Method):
    peft_types = ("OSF",)
    param_names = frozenset({"osf_svd_params"})
    support = (
        Support("OSF (orthogonal subspace fine-tuning)", "Linear",
                "exact (PEFT's fp32 SVD of the base, recomputed; on bf16/fp16 bases the SVD factors are rounded "
                "to the base dtype as PEFT does); ill-defined only for a repeated singular value at the cut",
                "refused: the original low singular part of W is not saved (PEFT refuses too)", "0.21.2"),
    )

    def patch(self, params: ModuleParams) -> Patch:
        U, S, V = params.require("osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low")
        if U.ndim != 2 or S.ndim != 1 or V.ndim != 2 or U.shape[1] != S.numel() or V.shape[0] != S.numel():
            raise InputError(f"{params.config.path.parent}: module {params.module!r}: osf_svd_params U_low "
                             f"{list(U.shape)}, S_low {list(S.shape)}, V_low {list(V.shape)} are inconsistent "
                             "(expected [out, n], [n], [n, in])")
        return OsfPatch(params.module, U, S, V)
