"""``--to lora``: the best rank-r LoRA of any change, by truncated SVD, exact once r reaches the change's rank.

Eckart–Young: the SVD truncated to rank r is the closest rank-r matrix in Frobenius (and spectral)
norm, and its error is the norm of the dropped singular values. Without ``--rank`` each module gets
the change's own numerical rank (the smallest r whose error is at rounding level), so a LoRA, LoHa
(rank ≤ r²), LoKr, AdaLoRA, MiSS, VeRA... change is converted exactly.

Adapter changes are usually low-rank, so no SVD of a dense (out, in) matrix is needed for them. Where
the source is a product B·A (LoRA, AdaLoRA), the SVD comes from thin QRs of B and Aᵀ and the SVD of a
small r × r matrix. Otherwise a randomized range finder (Halko, Martinsson & Tropp, 2011) with p random
columns gives ΔW = Q·(QᵀΔW) exactly, to rounding, once p ≥ rank(ΔW), and only the small p × in matrix
QᵀΔW needs an SVD. The residual is measured, never assumed; p grows until it vanishes, and a change
that is not low-rank (OFT, DoRA, IA3...) gets a full SVD, through the eigendecomposition of its Gram matrix.

The scaling is folded into the factors (lora_alpha = r, so s = 1), with √σ on each side.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import UnsupportedError
from .target import (KINDS, OUTPUT_DTYPE, Fit, ModuleDelta, Options, Target, check_rank, common_rank,
                     register_target)

#: Relative Frobenius error below which a factorisation counts as exact (float32 rounding is ~1e-7).
EXACT_RTOL = 1e-6
_FIRST_SKETCH = 16
_SKETCH_GROWTH = 4


@dataclass
class Spectrum:
    """ΔW ≈ U·diag(S)·Vh (float64, S descending), with what the factorisation leaves out."""

    U: torch.Tensor  # (out, q), orthonormal columns
    S: torch.Tensor  # (q,)
    Vh: torch.Tensor  # (q, in), orthonormal rows
    residual: float  # ‖ΔW − U·diag(S)·Vh‖_F, at rounding level
    norm: float  # ‖ΔW‖_F

    def tail(self, k: int) -> float:
        """‖ΔW − best rank-k approximation‖_F."""
        return math.sqrt(float((self.S[k:] ** 2).sum()) + self.residual ** 2)

    def exact_rank(self) -> int:
        """The smallest rank whose truncation error is at rounding level."""
        tails = torch.cat([torch.flip(torch.cumsum(torch.flip(self.S ** 2, [0]), 0), [0]), self.S.new_zeros(1)])
        within = (tails + self.residual ** 2 <= (EXACT_RTOL * self.norm) ** 2).nonzero()
        return int(within[0]) if len(within) else len(self.S)

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``B (out, k)``, ``A (k, in)`` whose product is the best rank-k approximation.

        Past the change's own rank (the components beyond it are rounding noise), A gets rows orthonormal
        to the others and B zero columns, as LoRA initialises them: the product stays exact and the extra
        rank stays trainable.
        """
        q = min(k, self.exact_rank())
        root = self.S[:q].sqrt()
        B, A = self.U[:, :q] * root, root[:, None] * self.Vh[:q]
        if k == q:
            return B, A
        kept = self.Vh[:q]
        g = torch.Generator().manual_seed(0)
        extra = torch.randn(kept.shape[1], k - q, generator=g, dtype=torch.float64)
        extra -= kept.T @ (kept @ extra)
        pad = torch.linalg.qr(extra).Q.T
        return torch.cat([B, B.new_zeros(B.shape[0], k - q)], 1), torch.cat([A, pad])


def spectrum(d: ModuleDelta) -> Spectrum:
    """The SVD of the module's change, from its factors where it has them."""
    if d.matrix is None and d.factors is not None:
        return _factored_spectrum(*d.factors)
    return _dense_spectrum(d.delta)


def _factored_spectrum(B: torch.Tensor, A: torch.Tensor) -> Spectrum:
    """B·A = Q_B·R_B·R_Aᵀ·Q_Aᵀ with B = Q_B·R_B and Aᵀ = Q_A·R_A: only the small R_B·R_Aᵀ needs an SVD."""
    QB, RB = torch.linalg.qr(B)
    QA, RA = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(RB @ RA.T)
    return Spectrum(QB @ U, S, Vh @ QA.T, 0.0, float(S.norm()))


def _dense_spectrum(D: torch.Tensor) -> Spectrum:
    """The SVD of a dense (out, in) change, through a randomized range finder where it is low-rank."""
    m, n = D.shape
    norm = float(torch.linalg.matrix_norm(D))
    if norm == 0.0:
        return Spectrum(D.new_zeros(m, 0), D.new_zeros(0), D.new_zeros(0, n), 0.0, 0.0)
    g = torch.Generator().manual_seed(0)
    p = _FIRST_SKETCH
    while p * 8 <= min(m, n):  # past that, a full SVD costs about as much as the sketches
        Q = torch.linalg.qr(D @ torch.randn(n, p, generator=g, dtype=D.dtype)).Q
        M = Q.T @ D
        # ‖D − Q·M‖² = ‖D‖² − ‖M‖² (Q has orthonormal columns); float64 resolves it to ~1e-8·‖D‖.
        residual = math.sqrt(max(norm ** 2 - float(torch.linalg.matrix_norm(M)) ** 2, 0.0))
        if residual <= EXACT_RTOL * norm:
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            return Spectrum(Q @ U, S, Vh, residual, norm)
        p *= _SKETCH_GROWTH
    return _gram_spectrum(D, norm)


def _gram_spectrum(D: torch.Tensor, norm: float) -> Spectrum:
    """The full SVD from the eigendecomposition of the smaller Gram matrix X·Xᵀ (float64), about 8x faster on
    the CPU than LAPACK's SVD of a 2048 x 5504 matrix. Singular values below ~1e-8·σ_max come out as noise;
    they are dropped into the residual, far below anything an error report resolves."""
    wide = D.shape[0] <= D.shape[1]
    X = D if wide else D.T
    eigenvalues, U = torch.linalg.eigh(X @ X.T)
    S = eigenvalues.flip(0).clamp_min(0).sqrt()
    kept = S > S[0] * 1e-7
    U, S = U.flip(1)[:, kept], S[kept]
    Vh = (U.T @ X) / S[:, None]
    residual = math.sqrt(max(norm ** 2 - float((S ** 2).sum()), 0.0))
    return Spectrum(U, S, Vh, residual, norm) if wide else Spectrum(Vh.T, S, U.T, residual, norm)


def chosen_rank(d: ModuleDelta, spec: Spectrum, options: Options, method: str) -> int:
    """``--rank``, or the change's own rank where it is low (the exact conversion)."""
    if options.rank is not None:
        return options.rank
    k = spec.exact_rank()
    if k >= min(d.out_in):
        raise UnsupportedError(
            f"{d.module}: the change has full rank ({k}) and no {method} of lower rank holds it exactly; pass "
            f"--rank R for the best rank-R approximation (the error is reported)")
    return max(k, 1)


def lora_tensors(kind: str, shape: tuple[int, ...], A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's parameter names and shapes for LoRA factors of a (out, fan_in) change."""
    k = A.shape[0]
    if kind == "embedding":  # ΔE (V, d) = (B·A)ᵀ with A (r, V), B (d, r)
        return {"lora_embedding_A": A, "lora_embedding_B": B}
    if kind == "conv":
        return {"lora_A.weight": A.reshape(k, *shape[1:]),
                "lora_B.weight": B.reshape(B.shape[0], k, *[1] * (len(shape) - 2))}
    return {"lora_A.weight": A, "lora_B.weight": B}


class LowRankTarget(Target):
    """A target that holds the best rank-r approximation of the change, exact at the change's own rank."""

    sizes = ("rank",)

    #: Whether the target's tensors can also hold a change of the bias.
    holds_bias: ClassVar[bool] = False

    def check_module(self, module: str, kind: str, shape: tuple[int, int], has_bias_change: bool,
                     options: Options) -> None:
        super().check_module(module, kind, shape, has_bias_change and not self.holds_bias, options)
        if options.rank is not None:
            check_rank(module, options.rank, shape)

    def fit(self, d: ModuleDelta, options: Options) -> Fit:
        spec = spectrum(d)
        k = chosen_rank(d, spec, options, self.method)
        B, A = (x.to(OUTPUT_DTYPE) for x in spec.factors(k))
        return Fit(self.hold(d, B, A), k, d.kind)

    @abstractmethod
    def hold(self, d: ModuleDelta, B: torch.Tensor, A: torch.Tensor) -> dict[str, torch.Tensor]:
        """The method's tensors for ``B·A``."""


@register_target
class LoraTarget(LowRankTarget):
    name = "lora"
    method = "LoRA"
    kinds = KINDS
    carries_tokens = True
    holds_bias = True  # as lora_B.bias (lora_bias)

    def hold(self, d: ModuleDelta, B: torch.Tensor, A: torch.Tensor) -> dict[str, torch.Tensor]:
        tensors = lora_tensors(d.kind, d.shape, A, B)
        if d.bias is not None:
            tensors["lora_B.bias"] = d.bias.to(OUTPUT_DTYPE)
        return tensors

    def check_kinds(self, kinds: set[str]) -> None:
        if {"linear", "conv1d_transposed"} <= kinds:
            raise UnsupportedError("the adapter changes both Linear and Conv1D layers, but LoRA's fan_in_fan_out is "
                                   "one setting for the whole adapter; convert them separately")

    def config(self, fits: dict[str, Fit], options: Options) -> dict[str, Any]:
        kinds = {f.kind for f in fits.values()}
        lora_bias = any("lora_B.bias" in f.tensors for f in fits.values())
        if lora_bias:  # PEFT gives every module a lora_B.bias then: zero where the bias does not change
            for f in fits.values():
                out = f.tensors["lora_B.weight"].shape[0]
                f.tensors.setdefault("lora_B.bias", torch.zeros(out, dtype=OUTPUT_DTYPE))
        r, pattern = common_rank(fits)
        return {"peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                "target_modules": sorted(fits), "fan_in_fan_out": "conv1d_transposed" in kinds,
                "lora_bias": lora_bias, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
                "lora_dropout": 0.0, "bias": "none"}
