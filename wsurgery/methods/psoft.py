"""PSOFT, orthogonal fine-tuning in the principal subspace (``peft_type: PSOFT``), on Linear layers.

``ΔW = s · B (R - I) A`` with ``s = psoft_alpha / r``. Only R is saved (``psoft_R.weight``, plus the
magnitude vectors ``psoft_R.vector_b``/``.vector_a`` when ``psoft_mag_b``/``psoft_mag_a``); A and B are
rebuilt from the SVD of the fp32 base weight, exactly as PEFT does:

* ``psoft_svd="full"``: ``U, S, Vh = torch.linalg.svd(W, full_matrices=False)``;
  ``"lowrank"``: ``torch.svd_lowrank(W, q=r, niter)`` right after ``torch.manual_seed(random_seed)``
  inside a forked CPU RNG (the global RNG is left untouched);
* ``psoft_init``: ``A = Vh_r``, ``B = U_r diag(S_r / s)``; ``pissa_init``: ``A = diag(sqrt(S_r/s)) Vh_r``,
  ``B = U_r diag(sqrt(S_r/s))``.

The product is not invariant to the signs of the singular vectors, so we make the same LAPACK call on
the same fp32 W: the signs then agree. They would not agree across different LAPACK builds only where
PEFT's own result is ill-defined (a repeated singular value among the first r+1).

R: with ``psoft_orth`` the saved vector is the strict upper triangle (``triu_indices(r, r, 1)``) of a
skew Q, and R is the Cayley map ``(I + Q)(I - Q)^-1`` (PEFT's sign convention, the opposite of OFT's),
or with ``use_cayley_neumann`` PEFT's truncated series ``I + 2Q + 2Q^2 + ... + Q^(t-1)`` after scaling
Q to Frobenius norm ``cayley_neumann_eps`` if set; without ``psoft_orth`` the saved (r, r) matrix is R.
Then ``R <- diag(vector_b) R diag(vector_a)``.

Unmerge is refused: A and B come from the SVD of the *original* W. The merged weight
``W' = W + U_r diag(S_r)(R - I) V_r^T`` has a different SVD (R and the magnitudes rotate and rescale
the principal subspace, and its singular values may interleave with the rest of W's), and even where
the subspace survives, each singular vector's sign, which the change depends on, is not recoverable
from W'. So the files alone do not determine W.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, UnsupportedError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

ORTHOGONALITY_NOTE = 1e-6  # report max|R R^T - I| of the rotation above this


def triangle_size(n: int) -> int | None:
    """r with r(r-1)/2 == n, or None."""
    r = (1 + math.isqrt(1 + 8 * n)) // 2
    return r if r * (r - 1) // 2 == n else None


def skew(vec: torch.Tensor, r: int) -> torch.Tensor:
    """PEFT's ``OrthLayer._skew_symmetric``: Q with the vector in its strict upper triangle, Q^T = -Q."""
    rows, cols = torch.triu_indices(r, r, 1)
    Q = torch.zeros((r, r), dtype=vec.dtype).index_put((rows, cols), vec)
    return Q - Q.transpose(0, 1)


def rotation(vec_or_matrix: torch.Tensor, r: int, *, orth: bool, neumann: bool, terms: int,
             eps: float | None) -> torch.Tensor:
    """PEFT's ``OrthLayer.get_matrix`` before the magnitude vectors, in float32."""
    if not orth:
        return vec_or_matrix.to(torch.float32)
    Q = skew(vec_or_matrix.to(torch.float32), r)
    eye = torch.eye(r, dtype=Q.dtype)
    if not neumann:
        return torch.linalg.solve(eye - Q, eye + Q, left=False)
    if eps is not None:
        norm = torch.linalg.norm(Q, ord="fro")
        if torch.isfinite(norm) and norm > eps:
            Q = Q * (eps / (norm + 1e-12))
    R = eye.clone()
    if terms > 1:
        R.add_(Q, alpha=2.0)
        if terms > 2:
            Q_squared = Q @ Q
            R.add_(Q_squared, alpha=2.0)
            Q_power = Q_squared
            for _ in range(3, terms - 1):
                Q_power = Q_power @ Q
                R.add_(Q_power, alpha=2.0)
            Q_power = Q_power @ Q
            R.add_(Q_power)
    return R


def svd_factors(W: torch.Tensor, r: int, mode: str, niter: int, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's ``_compute_svd_factors`` on the fp32 (out, in) weight: (U_r, S_r, Vh_r)."""
    if mode == "full":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r, :]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
    return U[:, :r], S[:r], V[:, :r].t()


class PsoftPatch(Patch):
    """W' = W + s · B (R - I) A, with A and B from the SVD of W."""

    def __init__(self, module: str, R: torch.Tensor, r: int, scaling: float, init: str, svd: str, niter: int,
                 seed: int, rotation_info: dict[str, Any]):
        super().__init__(module, ("weight",))
        self.R, self.r, self.scaling, self.init = R, r, scaling, init
        self.svd, self.niter, self.seed = svd, niter, seed
        self.rotation_info = rotation_info

    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        if len(w) != 2:
            raise InputError(f"{self.module}: PSOFT changes Linear weights, but the base weight is {list(w)}")
        if self.r > min(w):
            raise InputError(f"{self.module}: PSOFT rank r={self.r} exceeds min(out, in) of the base weight {list(w)}; "
                             "was the adapter trained on another model?")

    def factors(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's ``_build_psoft_ab_cache_buffers``: (A, B) from the SVD of the fp32 W."""
        U_r, S_r, Vh_r = svd_factors(W.to(torch.float32), self.r, self.svd, self.niter, self.seed)
        S_scaled = S_r / self.scaling
        if self.init == "psoft_init":
            return Vh_r.contiguous(), (U_r @ torch.diag(S_scaled)).contiguous()
        s_sqrt = torch.sqrt(S_scaled)
        return (torch.diag(s_sqrt) @ Vh_r).contiguous(), (U_r @ torch.diag(s_sqrt)).contiguous()

    def apply(self, tensors: Tensors) -> Tensors:
        W = tensors["weight"]
        A, B = self.factors(W)
        eye = torch.eye(self.r, dtype=torch.float32)
        delta = B @ (self.R - eye) @ A  # PEFT's order; then the scaling
        delta = delta * self.scaling
        return {"weight": W.add_(delta)}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's forward on activations: ``xa = x Aᵀ``, ``base_layer(x) + s·(xa Rᵀ − xa) Bᵀ``, with A = Vh_r,
        B = U_r diag(S_r/s) (``psoft_init``) or both halves ``sqrt(S_r/s)`` (``pissa_init``) applied as
        per-component scales. The SVD call (``svd_factors``, which must match PEFT's LAPACK/RNG call exactly)
        and R (``rotation``, from the saved vector) are the parameterisation, shared with the merge."""
        W = base["weight"]
        U_r, S_r, Vh_r = (like(t, W) for t in svd_factors(W.cpu(), self.r, self.svd, self.niter, self.seed))
        scaled = S_r / self.scaling
        a, b = (torch.ones_like(scaled), scaled) if self.init == "psoft_init" else (scaled.sqrt(), scaled.sqrt())
        xa = (x @ Vh_r.T) * a
        return layer(x, base) + self.scaling * (((xa @ like(self.R, W).T - xa) * b) @ U_r.T)

    def why_not_invertible(self) -> str | None:
        return ("PSOFT's A and B come from the SVD of the original W, which is not saved: the merged weight has a "
                "different SVD (R and the magnitude vectors rotate and rescale the principal subspace), and the "
                "signs of the original singular vectors, which the change depends on, cannot be recovered from it. "
                "Keep the base checkpoint and merge from it again instead")

    def describe(self) -> dict[str, Any]:
        return {"kind": "linear", "rank": self.r, "scaling": self.scaling, "ab_svd_init": self.init,
                "svd": self.svd if self.svd == "full" else f"lowrank (niter={self.niter}, seed={self.seed})",
                **self.rotation_info}


@register
class Psoft(Method):
    peft_types = ("PSOFT",)
    param_names = frozenset({"psoft_R"})
    support = (
        Support("PSOFT (exact Cayley and Cayley-Neumann, free R, magnitude vectors; psoft/pissa init; full and "
                "lowrank SVD)", "Linear",
                "exact (A, B rebuilt by the same SVD call on the fp32 base; ill-defined only for repeated singular "
                "values among the first r+1); lowrank SVD ~1e-5 (torch.svd_lowrank's rounding depends on memory "
                "alignment, so PEFT's own result varies that much between loads)",
                "refused: A and B need the SVD of the original W, which the merged W does not determine", "0.21.2"),
    )

    def check_config(self, config: AdapterConfig) -> None:
        init = config.get("ab_svd_init", "psoft_init")
        if init not in ("psoft_init", "pissa_init"):
            raise UnsupportedError(f"{config.path}: PSOFT ab_svd_init={init!r} is unknown (PEFT knows psoft_init and "
                                   "pissa_init)")
        svd = config.get("psoft_svd", "full")
        if svd not in ("full", "lowrank"):
            raise UnsupportedError(f"{config.path}: PSOFT psoft_svd={svd!r} is unknown (PEFT knows full and lowrank)")
        if config.get("fan_in_fan_out", False):
            raise UnsupportedError(f"{config.path}: PSOFT with fan_in_fan_out: PEFT's PSOFT only wraps nn.Linear "
                                   "(and resets the flag there), so this config cannot come from PEFT")
        r = config.get("r", 32)
        if not isinstance(r, int) or r <= 0:
            raise InputError(f"{config.path}: PSOFT r={r!r} must be a positive integer")

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"r": config.get("r", 32), "psoft_alpha": config.get("psoft_alpha", 32),
                "ab_svd_init": config.get("ab_svd_init", "psoft_init"), "psoft_svd": config.get("psoft_svd", "full"),
                "psoft_orth": config.get("psoft_orth", True),
                "use_cayley_neumann": config.get("use_cayley_neumann", False)}

    def patch(self, params: ModuleParams) -> Patch:
        config, t = params.config, params.tensors
        where = f"{config.path.parent}: module {params.module!r}"
        r = int(config.get("r", 32))
        orth = bool(config.get("psoft_orth", True))
        (weight,) = params.require("psoft_R.weight")
        if orth:
            if weight.ndim != 1 or triangle_size(weight.numel()) != r:
                raise InputError(f"{where}: psoft_R.weight is {list(weight.shape)}, but psoft_orth with r={r} saves "
                                 f"the strict upper triangle, [{r * (r - 1) // 2}]")
        elif tuple(weight.shape) != (r, r):
            raise InputError(f"{where}: psoft_R.weight is {list(weight.shape)}, but psoft_orth=false with r={r} "
                             f"saves R itself, [{r}, {r}]")
        neumann = bool(config.get("use_cayley_neumann", False))
        terms = int(config.get("num_cayley_neumann_terms", 5))
        eps = config.get("cayley_neumann_eps")
        R = rotation(weight, r, orth=orth, neumann=neumann, terms=terms, eps=eps)
        deviation = (R.double() @ R.double().T - torch.eye(r, dtype=torch.float64)).abs().max().item() if r else 0.0
        info: dict[str, Any] = {
            "R": ("free matrix (psoft_orth=false)" if not orth else
                  f"Cayley-Neumann series, {terms} terms" + (f", eps={eps}" if eps is not None else "")
                  if neumann else "exact Cayley (I+Q)(I-Q)^-1"),
            "max_abs_RRt_minus_I": deviation,
        }
        mags = []
        for name, flag in (("vector_b", "psoft_mag_b"), ("vector_a", "psoft_mag_a")):
            key = f"psoft_R.{name}"
            if config.get(flag, True) or key in t:
                (v,) = params.require(key)
                if v.ndim != 1 or v.numel() != r:
                    raise InputError(f"{where}: {key} is {list(v.shape)}, expected [{r}]")
                mags.append(name)
                if name == "vector_b":
                    R = v.to(torch.float32)[:, None] * R
                else:
                    R = R * v.to(torch.float32)[None, :]
        info["magnitude_vectors"] = mags or "none"
        if orth and neumann and deviation > ORTHOGONALITY_NOTE:
            info["note"] = "the series is not exactly orthogonal; PEFT merges it as it is, and so do we"
        alpha = config.get("psoft_alpha", 32)
        return PsoftPatch(params.module, R, r, alpha / r, config.get("ab_svd_init", "psoft_init"),
                          config.get("psoft_svd", "full"), int(config.get("psoft_svd_lowrank_niter", 10)),
                          int(config.get("random_seed", 0)), info)
