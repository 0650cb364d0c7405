"""Targets with a structure of their own: MiSS/Bone, OFT and BOFT are fitted to the change (exact where it
has their structure, the best approximation otherwise); LoHa and LoKr hold the best rank-r LoRA exactly.

* **MiSS / Bone** (default mode), ``block (r, out)``: ``ΔW'[o, i] = block[i mod r, o]``. Each block entry
  owns its own set of ΔW entries (the columns i ≡ j mod r of row o), so the least-squares problem
  ``min Σ (ΔW[o, i] − block[i mod r, o])²`` splits into one scalar problem per entry, whose solution is
  the mean: ``block[j, o] = mean_{i ≡ j (mod r)} ΔW[o, i]``. No other block comes closer.
* **OFT**, ``W' = W·Rᵀ`` with R block-diagonal, blocks of b columns: the columns of W split into the
  blocks, so ``min ‖W·Rᵀ − (W + ΔW)‖`` splits into one orthogonal Procrustes problem per block,
  ``min ‖W_k·R_kᵀ − T_k‖``, solved by the SVD ``W_kᵀT_k = UΣVᵀ``: ``R_kᵀ = U·diag(1, …, 1, det(UVᵀ))·Vᵀ``
  (Kabsch; OFT's Cayley map only reaches rotations, det +1). The written parameter is the Cayley
  preimage ``Q = (I + R)⁻¹(I − R)`` (PEFT's exact map ``R = (I − Q)(I + Q)⁻¹`` is its own inverse), with
  ``use_cayley_neumann`` off. A rotation that turns some plane by π has no Cayley preimage: that plane
  is turned back to a small margin short of π, and the note says where.
* **BOFT**, ``W' = (W·Mᵀ) ⊙ s`` with ``M = M_{N−1}⋯M_0``, ``M_i = P_i·blockdiag(blocks_i)·P_iᵀ`` and a scale
  per output row: block-coordinate descent that starts from the OFT solution (level 0's permutation is
  the identity, the other levels are identity rotations, s = 1) and solves each level exactly in turn
  (a Procrustes problem per block after moving the other levels to the target's side; they are
  orthogonal, so norms do not change), then s exactly (a least-squares scale per row). No step
  increases the error, so the result is at least as good as the block-diagonal OFT of the same block
  size.
* **LoHa** ``(w1a·w1b) ⊙ (w2a·w2b)``: w1 holds the rank-r LoRA and w2 is the all-ones matrix
  (``w2a = w2b = 1/√r``). **LoKr** ``kron(w1, w2)`` with ``decompose_factor = 1``: w1 is the 1×1 [1]
  and w2 the rank-r LoRA (``lokr_w2_a``, ``lokr_w2_b``; the full matrix where PEFT wants it full).
  Their fuller structures (a Hadamard product of rank up to r², true Kronecker factors) are not
  searched.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..errors import InputError
from ..methods.boft import _factors, butterfly_perms
from .target import OUTPUT_DTYPE, Fit, ModuleDelta, Options, Target, common_rank, register_target
from .to_lora import LowRankTarget

#: σ_min(I + R) below which a rotation counts as a half turn: PEFT's float32 Cayley solve loses about
#: 1e-7/σ of accuracy, so rotations are kept at least 2·margin away from it.
HALF_TURN_MARGIN = 1e-3
_SWEEPS = 25  # BOFT block-coordinate descent: at most this many sweeps over the levels and the scale
_SWEEP_RTOL = 1e-5  # stop when a sweep improves the error by less than this fraction


# -- MiSS / Bone --------------------------------------------------------------------------------------------

def periodic_means(D: torch.Tensor, r: int) -> torch.Tensor:
    """The least-squares MiSS block ``(r, out)`` for a change ``D (out, in)``: means over i ≡ j (mod r)."""
    m, n = D.shape
    cycles = -(-n // r)
    padded = D.new_zeros(m, cycles * r)
    padded[:, :n] = D
    counts = torch.tensor([len(range(j, n, r)) for j in range(r)], dtype=D.dtype)
    return (padded.view(m, cycles, r).sum(1) / counts).T


class _SharedBlockTarget(Target):
    size_name = "r"
    peft_type: ClassVar[str]
    key: ClassVar[str]

    sizes: ClassVar[tuple[str, ...]] = ("rank",)

    @staticmethod
    def r(options: Options) -> int:
        """``--rank``, which ``check_options`` requires."""
        assert options.rank is not None, "check_options requires --rank"
        return options.rank

    def check_options(self, options: Options) -> None:
        super().check_options(options)
        if options.rank is None:
            raise InputError(f"--to {self.name} needs --rank R: the number of input columns one {self.method} block "
                             "spans (its r)")

    def check_module(self, module: str, kind: str, shape: tuple[int, int], has_bias_change: bool,
                     options: Options) -> None:
        super().check_module(module, kind, shape, has_bias_change, options)
        if self.r(options) > shape[1]:
            raise InputError(f"{module}: --rank {options.rank} is larger than its in_features {shape[1]}; "
                             f"{self.method} (like PEFT) needs r <= in_features")

    def fit(self, d: ModuleDelta, options: Options) -> Fit:
        block = periodic_means(d.delta, self.r(options)).to(OUTPUT_DTYPE)
        return Fit({self.key: block}, self.r(options), d.kind)

    def config(self, fits: dict[str, Fit], options: Options) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "r": options.rank, "init_weights": True, "target_modules": sorted(fits),
                "bias": "none"}


@register_target
class MissTarget(_SharedBlockTarget):
    name = "miss"
    method = "MiSS"
    peft_type = "MISS"
    key = "miss_block"


@register_target
class BoneTarget(_SharedBlockTarget):
    name = "bone"
    method = "Bone"
    peft_type = "BONE"
    key = "bone_block"
    remark = ("Bone adapters load in PEFT 0.14-0.18 (0.19 removed Bone); --to miss writes the same change in the "
              "format current PEFT loads")


# -- rotations ----------------------------------------------------------------------------------------------

def procrustes_blocks(X: torch.Tensor, T: torch.Tensor, b: int) -> torch.Tensor:
    """``(n/b, b, b)`` rotations (det +1): per column block k, the R_k minimising ‖X_k·R_kᵀ − T_k‖_F."""
    m, n = X.shape
    p = n // b
    M = torch.einsum("okj,oki->kji", X.reshape(m, p, b), T.reshape(m, p, b))  # X_kᵀ·T_k
    U, _, Vh = torch.linalg.svd(M)
    U[..., -1] *= torch.linalg.det(U @ Vh).sign()[:, None]  # det −1: flip the least significant direction
    return (U @ Vh).transpose(-1, -2)


def _back_off_half_turn(R: torch.Tensor) -> torch.Tensor:
    """R with every plane it turns by (nearly) π turned by π − 2·acos(margin) instead, re-orthogonalised."""
    b = R.shape[-1]
    eye = torch.eye(b, dtype=R.dtype)
    _, S, Vh = torch.linalg.svd(eye + R)
    e = int((S < HALF_TURN_MARGIN).sum())
    e += e % 2  # half turns come in planes
    E = Vh[b - e:].T  # (b, e): orthonormal basis of the near −1 eigenspace
    J = torch.zeros(e, e, dtype=R.dtype)
    J[0::2, 1::2] = -torch.eye(e // 2, dtype=R.dtype)
    J[1::2, 0::2] = torch.eye(e // 2, dtype=R.dtype)
    angle = 2 * math.acos(2 * HALF_TURN_MARGIN)  # |1 + e^{i·angle}| = 4·margin
    turn = math.cos(angle) * torch.eye(e, dtype=R.dtype) + math.sin(angle) * J
    R = R @ (eye - E @ E.T) + E @ turn @ E.T
    P, _, Qh = torch.linalg.svd(R)
    return P @ Qh


def cayley_preimage(R: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Skew Q with ``R = (I − Q)(I + Q)⁻¹`` for rotations R (p, b, b), and the blocks whose half turns
    had to be backed off first."""
    R = R.clone()
    eye = torch.eye(R.shape[-1], dtype=R.dtype)
    near = (torch.linalg.svdvals(eye + R)[..., -1] < HALF_TURN_MARGIN).nonzero().flatten().tolist()
    for k in near:
        R[k] = _back_off_half_turn(R[k])
    Q = torch.linalg.solve(eye + R, eye - R)
    return (Q - Q.transpose(-1, -2)) / 2, near


def _half_turn_note(blocks: list[int], b: int) -> list[str]:
    if not blocks:
        return []
    short = math.degrees(2 * math.asin(2 * HALF_TURN_MARGIN))
    note = (f"the best rotation of {len(blocks)} block(s) of {b} columns (e.g. block {blocks[0]}) turns a plane by π, "
            f"which the Cayley map cannot express; those planes turn {short:.2f}° short of it (included in the error)")
    return [note]


class _RotationTarget(Target):
    needs_weight = True
    size_name = "block"
    default_block: ClassVar[int]

    sizes: ClassVar[tuple[str, ...]] = ("block_size",)

    @staticmethod
    def weight(d: ModuleDelta) -> torch.Tensor:
        """W, which convert reads for every target that ``needs_weight``."""
        assert d.weight is not None, f"{d.module}: convert reads W for a target that needs it"
        return d.weight

    def block_size(self, options: Options) -> int:
        return self.default_block if options.block_size is None else options.block_size

    def check_options(self, options: Options) -> None:
        super().check_options(options)
        if self.block_size(options) < 2:
            raise InputError(f"--block-size must be at least 2, got {options.block_size}")

    def check_module(self, module: str, kind: str, shape: tuple[int, int], has_bias_change: bool,
                     options: Options) -> None:
        super().check_module(module, kind, shape, has_bias_change, options)
        b = self.block_size(options)
        if shape[1] % b:
            raise InputError(f"{module}: in_features {shape[1]} is not a multiple of --block-size {b} (PEFT would "
                             f"silently pick another block size for this layer); choose a block size dividing it")


@register_target
class OftTarget(_RotationTarget):
    name = "oft"
    method = "OFT"
    default_block = 32  # PEFT's default oft_block_size

    def fit(self, d: ModuleDelta, options: Options) -> Fit:
        b = self.block_size(options)
        W = self.weight(d)
        R = procrustes_blocks(W, W + d.delta, b)
        Q, backed_off = cayley_preimage(R)
        rows, cols = torch.triu_indices(b, b, 1)
        vector = Q[:, rows, cols].to(OUTPUT_DTYPE)
        return Fit({"oft_R.weight": vector}, b, d.kind, _half_turn_note(backed_off, b))

    def config(self, fits: dict[str, Fit], options: Options) -> dict[str, Any]:
        return {"peft_type": "OFT", "r": 0, "oft_block_size": self.block_size(options), "target_modules": sorted(fits),
                "use_cayley_neumann": False, "num_cayley_neumann_terms": 5, "coft": False, "eps": 6e-5,
                "block_share": False, "module_dropout": 0.0, "init_weights": True, "fan_in_fan_out": False,
                "bias": "none"}


def _row_scales(Z: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Per row o, the s_o minimising ‖s_o·Z_o − T_o‖ (1 where Z_o is zero)."""
    zz = (Z * Z).sum(1)
    return torch.where(zz > 0, (Z * T).sum(1) / zz.clamp_min(1e-300), torch.ones_like(zz))


def fit_butterfly(W: torch.Tensor, T: torch.Tensor, b: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation blocks ``(N, n/b, b, b)`` and row scales ``(out,)`` with ``(W·Mᵀ) ⊙ s ≈ T``, by block-coordinate
    descent from the OFT solution (see the module docstring)."""
    m, n = W.shape
    D = n // b
    perms = butterfly_perms(n, N, D, b)
    blocks = torch.eye(b, dtype=W.dtype).repeat(N, D, 1, 1)
    blocks[0] = procrustes_blocks(W, T, b)
    s = torch.ones(m, dtype=W.dtype)
    error = float(torch.linalg.matrix_norm(_factors(W, blocks, perms, range(N)) - T))
    for _ in range(_SWEEPS):
        for i in range(N):  # ‖diag(s)·X_i·M_iᵀ·Y_i − T‖ = ‖(diag(s)·X_i·P_i)·B_iᵀ − T·Y_iᵀ·P_i‖
            X = _factors(W, blocks, perms, range(i)) * s[:, None]
            Y = _factors(T, blocks.transpose(-1, -2), perms, reversed(range(i + 1, N)))
            perm = perms[i]
            if perm is not None:
                inverse = torch.argsort(perm)
                X, Y = X[:, inverse], Y[:, inverse]
            blocks[i] = procrustes_blocks(X, Y, b)
        Z = _factors(W, blocks, perms, range(N))
        s = _row_scales(Z, T)
        new = float(torch.linalg.matrix_norm(Z * s[:, None] - T))
        improved = error - new > _SWEEP_RTOL * error
        error = new
        if not improved:
            break
    return blocks, s


@register_target
class BoftTarget(_RotationTarget):
    name = "boft"
    method = "BOFT"
    default_block = 4  # PEFT's default boft_block_size
    sizes = ("block_size", "butterfly_factors")

    @staticmethod
    def factors(options: Options) -> int:
        return 1 if options.butterfly_factors is None else options.butterfly_factors

    def check_options(self, options: Options) -> None:
        super().check_options(options)
        N, b = self.factors(options), self.block_size(options)
        if N > 1 and b % 2:
            raise InputError(f"--block-size {b} must be even with --butterfly-factors {N} (PEFT refuses odd ones)")

    def check_module(self, module: str, kind: str, shape: tuple[int, int], has_bias_change: bool,
                     options: Options) -> None:
        super().check_module(module, kind, shape, has_bias_change, options)
        N, b, n = self.factors(options), self.block_size(options), shape[1]
        span = b * 2 ** (N - 1)
        if N > 1 and (n % span or (n // b) % 2):
            raise InputError(f"{module}: in_features {n} is not a multiple of block size × 2^(factors−1) = {span} "
                             f"with an even block count, as {N} butterfly factors need (PEFT refuses this layer); "
                             "choose a smaller --block-size or fewer --butterfly-factors")

    def fit(self, d: ModuleDelta, options: Options) -> Fit:
        N, b = self.factors(options), self.block_size(options)
        m, n = d.out_in
        W = self.weight(d)
        blocks, s = fit_butterfly(W, W + d.delta, b, N)
        Q, backed_off = cayley_preimage(blocks.reshape(-1, b, b))
        R = Q.reshape(N, n // b, b, b).to(OUTPUT_DTYPE)
        scale = s.reshape(m, 1).to(OUTPUT_DTYPE)
        return Fit({"boft_R": R, "boft_s": scale}, b, d.kind, _half_turn_note(backed_off, b))

    def config(self, fits: dict[str, Fit], options: Options) -> dict[str, Any]:
        return {"peft_type": "BOFT", "boft_block_size": self.block_size(options), "boft_block_num": 0,
                "boft_n_butterfly_factor": self.factors(options), "target_modules": sorted(fits),
                "boft_dropout": 0.0, "init_weights": True, "fan_in_fan_out": False, "bias": "none"}


# -- LoHa / LoKr: a LoRA in their form ----------------------------------------------------------------------

@register_target
class LohaTarget(LowRankTarget):
    name = "loha"
    method = "LoHa"

    def hold(self, d: ModuleDelta, B: torch.Tensor, A: torch.Tensor) -> dict[str, torch.Tensor]:
        k = A.shape[0]
        w2a = torch.full((B.shape[0], k), k ** -0.5, dtype=B.dtype)
        w2b = torch.full((k, A.shape[1]), k ** -0.5, dtype=A.dtype)
        return {"hada_w1_a": B, "hada_w1_b": A, "hada_w2_a": w2a, "hada_w2_b": w2b}

    def config(self, fits: dict[str, Fit], options: Options) -> dict[str, Any]:
        r, pattern = common_rank(fits)
        return {"peft_type": "LOHA", "r": r, "alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                "target_modules": sorted(fits), "use_effective_conv2d": False, "rank_dropout": 0.0,
                "module_dropout": 0.0, "init_weights": True}


@register_target
class LokrTarget(LowRankTarget):
    name = "lokr"
    method = "LoKr"

    def hold(self, d: ModuleDelta, B: torch.Tensor, A: torch.Tensor) -> dict[str, torch.Tensor]:
        k, (m, n) = A.shape[0], (B.shape[0], A.shape[1])
        one = torch.ones(1, 1, dtype=A.dtype)
        if k >= max(m, n) / 2:  # PEFT's rule: a full w2 from this rank on
            return {"lokr_w1": one, "lokr_w2": (B.double() @ A.double()).to(A.dtype)}
        return {"lokr_w1": one, "lokr_w2_a": B, "lokr_w2_b": A}

    def config(self, fits: dict[str, Fit], options: Options) -> dict[str, Any]:
        r, pattern = common_rank(fits)
        return {"peft_type": "LOKR", "r": r, "alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                "target_modules": sorted(fits), "decompose_factor": 1, "decompose_both": False,
                "use_effective_conv2d": False, "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True}
