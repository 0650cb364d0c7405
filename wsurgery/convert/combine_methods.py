"""PEFT 0.21.2's ``add_weighted_adapter`` combinations, reproduced op for op, one module at a time.

PEFT combines a whole model at once (``peft/tuners/lora/model.py``); the primitives below are those of
``peft/utils/merge_utils.py`` with the same torch calls in the same order, so that float32 results are
PEFT's bit for bit. DARE's masks come from ``torch.bernoulli`` on an explicit generator instead of the
global one: seeded as ``torch.manual_seed(seed)`` seeds the global one, and drawn in PEFT's order (module
by module, then per module the adapters' A factors, then their B factors, or their dense changes for
the SVD variants), the masks are the ones PEFT draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError, UnsupportedError


@dataclass(frozen=True)
class CombineMethod:
    """One ``combination_type``: which merge it applies, to what, and which options it reads."""

    name: str
    merge: str  # task_arithmetic | ties | dare_linear | dare_ties | magnitude_prune | cat
    svd: bool  # merges the dense changes, then truncates by SVD to --rank (else merges A and B separately)
    summary: str

    @property
    def density(self) -> bool:
        return self.merge in ("ties", "dare_linear", "dare_ties", "magnitude_prune")

    @property
    def sign(self) -> bool:
        return self.merge in ("ties", "dare_ties")

    @property
    def random(self) -> bool:
        return self.merge.startswith("dare")

    @property
    def factors(self) -> bool:
        """PEFT's non-SVD variants merge A and B separately: not a sum of changes (cross terms Bᵢ·Aⱼ)."""
        return not self.svd and self.merge != "cat"


METHODS: dict[str, CombineMethod] = {m.name: m for m in (
    CombineMethod("cat", "cat", False, "the exact weighted sum of the changes, ranks concatenated"),
    CombineMethod("linear", "task_arithmetic", False, "weighted sums of the A's and of the B's"),
    CombineMethod("svd", "task_arithmetic", True, "the weighted sum of the changes"),
    CombineMethod("ties", "ties", False, "TIES"),
    CombineMethod("ties_svd", "ties", True, "TIES"),
    CombineMethod("dare_linear", "dare_linear", False, "DARE (random pruning, rescaled)"),
    CombineMethod("dare_ties", "dare_ties", False, "DARE, then TIES' sign election"),
    CombineMethod("dare_linear_svd", "dare_linear", True, "DARE"),
    CombineMethod("dare_ties_svd", "dare_ties", True, "DARE, then TIES' sign election"),
    CombineMethod("magnitude_prune", "magnitude_prune", False, "top-|x| pruning, summed"),
    CombineMethod("magnitude_prune_svd", "magnitude_prune", True, "top-|x| pruning, summed"),
)}


def methods_help() -> str:
    """The method list for ``--help`` and the README, from :data:`METHODS`."""
    factors = [m for m in METHODS.values() if m.factors]
    svd = [m for m in METHODS.values() if m.svd]
    return (f"{METHODS['cat'].name}: {METHODS['cat'].summary}. "
            + "; ".join(f"{m.name}: {m.summary}" for m in factors)
            + ": on the A and the B factors separately (√|w·s| on each), which is NOT a sum of changes; the "
              "adapters' ranks must be equal. "
            + "; ".join(f"{m.name}: {m.summary}" for m in svd)
            + ": on the dense changes, then truncated by SVD to --rank")


@dataclass(frozen=True)
class MergeOptions:
    """The options of one combination, checked once against the method (:func:`check_options`)."""

    method: CombineMethod
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True


def check_options(method: str, *, density: float | None, majority_sign_method: str, seed: int | None,
                  svd_clamp: float | None, svd_full_matrices: bool, svd_driver: str | None,
                  rank: int | None) -> MergeOptions:
    """Every option against the method, refused in one line where PEFT would fail or ignore it."""
    if method not in METHODS:
        raise InputError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    m = METHODS[method]
    if m.density:
        if density is None:
            raise InputError(f"--method {method} needs --density (the fraction of values kept, in (0, 1])")
        if not 0 < density <= 1:
            raise InputError(f"--density must be in (0, 1], not {density}")
    elif density is not None:
        raise InputError(f"--density applies to {', '.join(n for n, x in METHODS.items() if x.density)}, "
                         f"not {method}")
    if majority_sign_method not in ("total", "frequency"):
        raise InputError(f"--majority-sign-method must be total or frequency, not {majority_sign_method!r}")
    if majority_sign_method != "total" and not m.sign:
        raise InputError(f"--majority-sign-method applies to {', '.join(n for n, x in METHODS.items() if x.sign)}, "
                         f"not {method}")
    if seed is not None and not m.random:
        raise InputError(f"--seed applies to the DARE methods ({', '.join(n for n, x in METHODS.items() if x.random)}),"
                         f" not {method}, which draws nothing at random")
    if not m.svd and (svd_clamp is not None or not svd_full_matrices):
        option = "--svd-clamp" if svd_clamp is not None else "--no-svd-full-matrices"
        raise InputError(f"{option} applies to the SVD methods ({', '.join(n for n, x in METHODS.items() if x.svd)}), "
                         f"not {method}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise InputError(f"--svd-clamp is a quantile in [0, 1], not {svd_clamp}")
    if svd_driver is not None:
        raise UnsupportedError(f"--svd-driver {svd_driver}: torch.linalg.svd takes a driver only for CUDA inputs "
                               "(cuSOLVER), and wsurgery computes on the CPU, as PEFT does for adapters on the CPU")
    if m.factors and rank is not None:
        raise InputError(f"--rank is PEFT's svd_rank for the SVD methods; {method} keeps the adapters' common rank")
    return MergeOptions(m, density, majority_sign_method, seed, svd_clamp, svd_full_matrices)


# -- PEFT's merge_utils, op for op ------------------------------------------------------------------------

def _prune(t: torch.Tensor, density: float, random: bool, generator: torch.Generator | None) -> torch.Tensor:
    """``merge_utils.prune``: nothing is pruned (and nothing drawn) at density 1; DARE rescales by 1/density."""
    if density >= 1:
        return t
    if random:
        mask = torch.bernoulli(torch.full_like(input=t, fill_value=density), generator=generator)
        return t * mask / density
    mask = torch.zeros_like(t).reshape(-1)
    top_k = torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)
    mask[top_k[1]] = 1
    return t * mask.reshape(t.shape)


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def merge_tensors(merge: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float | None,
                  majority_sign_method: str, generator: torch.Generator | None) -> torch.Tensor:
    """``task_arithmetic`` / ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune`` of
    ``merge_utils``: prune each tensor (in order: the masks are drawn in this order), stack, weight,
    then sum, or for TIES keep the majority sign's entries and average them."""
    if merge != "task_arithmetic":
        assert density is not None, "check_options requires a density"
        tensors = [_prune(t, density, merge.startswith("dare"), generator) for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)
    if merge not in ("ties", "dare_ties"):
        return _weighted(stacked, weights).sum(dim=0)
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if majority_sign_method == "total" else sign.sum(dim=0)
    majority = sign == torch.where(magnitude >= 0, 1, -1)
    mixed = (_weighted(stacked, weights) * majority).sum(dim=0)
    return mixed / torch.clamp(majority.sum(dim=0), min=1.0)


def factor_weights(weights: Sequence[float], scalings: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's weights for A and B: √|w·s| on both, the sign of w·s on A's only."""
    a, b = [], []
    for w, s in zip(weights, scalings):
        ws = w * s
        sign = 1 if ws >= 0 else -1
        a.append(math.sqrt(abs(ws)) * sign)
        b.append(math.sqrt(abs(ws)))
    return torch.tensor(a), torch.tensor(b)


def svd_factors(delta: torch.Tensor, rank: int, clamp: float | None, full_matrices: bool, where: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (Vh[:r], U[:, :r]·diag(S[:r])) of the merged change in (out, in) layout, clamped to the
    ``clamp`` quantile of their entries as PEFT does (after kohya-ss's svd_merge_lora)."""
    if rank > min(delta.shape):
        raise InputError(f"{where}: --rank {rank} exceeds the layer's smaller dimension {min(delta.shape)} (PEFT "
                         "fails there); give a smaller --rank")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    U = U[:, :rank] @ torch.diag(S[:rank])
    Vh = Vh[:rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    return Vh.contiguous(), U.contiguous()


# The combined adapter's own initialisation, as PEFT's update_layer draws it: add_weighted_adapter injects
# the new adapter (every targeted layer, in module order) before any mask is drawn, from the same generator.
REPLAYED_INITS = (True, False, "gaussian")


def replay_peft_init(generator: torch.Generator, kind: str, in_features: int, out_features: int, r: int,
                     init_lora_weights: bool | str) -> None:
    """Draw what PEFT draws when it adds a LoRA of rank ``r`` to one layer, so that ``generator`` is where
    the global one is after ``inject_adapter``: for Linear and Conv1D layers ``nn.Linear(in, r)`` and
    ``nn.Linear(r, out)`` (each initialised on creation), then A re-initialised; for embeddings ``randn`` A
    and B, then B re-drawn."""
    if kind == "embedding":
        torch.randn((r, in_features), generator=generator)
        B = torch.randn((out_features, r), generator=generator)
        if init_lora_weights:
            torch.nn.init.normal_(B, generator=generator)
        return
    A = torch.empty(r, in_features)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    torch.nn.init.kaiming_uniform_(torch.empty(out_features, r), a=math.sqrt(5), generator=generator)
    if init_lora_weights is True:
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    elif init_lora_weights == "gaussian":
        torch.nn.init.normal_(A, std=1 / r, generator=generator)
