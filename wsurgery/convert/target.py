"""What every ``wsurgery convert`` target shares: one module's change as a matrix, a target's fit of
it, and the registry behind ``--to``.

A target sees each module's change ΔW in LoRA's orientation, ``(out, fan_in)``: a Conv1D weight
(stored ``(in, out)``) and an embedding (``(V, d)``, whose "output" is d) are transposed, a
convolution is flattened to ``(out, in·k…)``. It returns its own method's tensors for the module;
``config`` then builds ``adapter_config.json`` once for all modules. The dispatcher measures every
module's relative error on the adapter as written, read back like any other adapter.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import InputError, UnsupportedError

#: Layer kinds, as wsurgery's LoRA patches name them.
KINDS = ("linear", "conv1d_transposed", "embedding", "conv")
_KIND_NAMES = {"linear": "Linear", "conv1d_transposed": "Conv1D (fan_in_fan_out)", "embedding": "Embedding",
               "conv": "convolution"}


#: The dtype of every tensor written: PEFT holds adapter weights in float32 anyway (``autocast_adapter_dtype``),
#: and bf16 factors would add ~4e-3 relative error to a conversion that is otherwise exact.
OUTPUT_DTYPE = torch.float32

#: A product ``B·A`` (float64 ``(out, r)`` and ``(r, fan_in)``), kept unformed.
Factors = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModuleDelta:
    """The change one source module makes to its base weight, as an (out, fan_in) matrix: dense, or the
    product ``B·A`` where the source is one (LoRA, AdaLoRA), so that low-rank work never forms it."""

    module: str  # the module path as the source adapter names it (the output keys use it too)
    kind: str  # one of KINDS
    shape: tuple[int, ...]  # the base weight's shape as stored
    matrix: torch.Tensor | None = None  # float64 (out, fan_in)
    factors: Factors | None = None
    weight: torch.Tensor | None = None  # float64 base weight, (out, fan_in); only for targets that need W
    bias: torch.Tensor | None = None  # float64 change of the bias, where the source changes it

    @property
    def delta(self) -> torch.Tensor:
        """The dense float64 change, formed from the factors on first use."""
        if self.matrix is None:
            assert self.factors is not None, f"{self.module}: a ModuleDelta holds a matrix or factors"
            B, A = self.factors
            self.matrix = B @ A
        return self.matrix

    @property
    def out_in(self) -> tuple[int, int]:
        return matrix_shape(self.kind, self.shape)


@dataclass
class Fit:
    """A target's tensors for one module."""

    tensors: dict[str, torch.Tensor]  # by parameter name as PEFT saves it (``lora_A.weight``)
    rank: int  # the size the target spends on the module (rank, MiSS r, block size), for configs and reports
    kind: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    """The user's choices for a conversion; a target reads those that concern it."""

    rank: int | None = None
    block_size: int | None = None
    butterfly_factors: int | None = None


class Target(ABC):
    """One ``--to`` choice."""

    name: ClassVar[str]  # the --to value
    method: ClassVar[str]  # the method's name for messages ("MiSS")
    #: Targets that rewrite W itself (OFT, BOFT) need the base weight of every module.
    needs_weight: ClassVar[bool] = False
    #: Layer kinds the target method has in PEFT.
    kinds: ClassVar[tuple[str, ...]] = ("linear",)
    #: Whether the target's config can hold LoRA's ``trainable_token_indices``.
    carries_tokens: ClassVar[bool] = False
    #: What ``Fit.rank`` counts, as the report's column header.
    size_name: ClassVar[str] = "rank"
    #: A fact about the output format worth telling every user of this target.
    remark: ClassVar[str | None] = None
    #: The ``Options`` fields that size this target's method (--rank, --block-size, --butterfly-factors).
    sizes: ClassVar[tuple[str, ...]] = ()

    def check_options(self, options: Options) -> None:
        """Refuse, before any work, options this target cannot use, and sizes below 1."""
        for name in ("rank", "block_size", "butterfly_factors"):
            value, flag = getattr(options, name), "--" + name.replace("_", "-")
            if value is None:
                continue
            if name not in self.sizes:
                given = " and ".join("--" + n.replace("_", "-") for n in self.sizes)
                raise InputError(f"{flag} does not apply to --to {self.name}; {self.method}'s size is {given}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{flag} must be a whole number of at least 1, not {value!r}")

    def check_module(self, module: str, kind: str, shape: tuple[int, int], has_bias_change: bool,
                     options: Options) -> None:
        """Refuse, before any work, a module the target cannot hold; ``shape`` is the change's (out, fan_in)."""
        if kind not in self.kinds:
            raise UnsupportedError(f"{module}: a {_KIND_NAMES[kind]} layer; PEFT's {self.method} only has "
                                   f"{', '.join(_KIND_NAMES[k] for k in self.kinds)} layers")
        if has_bias_change:
            raise UnsupportedError(f"{module}: the source also changes the bias, which {self.method} cannot hold; "
                                   "convert to lora (lora_bias) instead")

    def check_kinds(self, kinds: set[str]) -> None:
        """Refuse, before any work, a mix of layer kinds one adapter of this method cannot hold."""

    @abstractmethod
    def fit(self, delta: ModuleDelta, options: Options) -> Fit:
        """The target's tensors for one module: exact where the method can express the change, else the best
        approximation in Frobenius norm."""

    @abstractmethod
    def config(self, fits: dict[str, Fit], options: Options) -> dict[str, Any]:
        """The method's fields of ``adapter_config.json`` (``peft_type``, ``target_modules``...)."""


def common_rank(fits: dict[str, Fit]) -> tuple[int, dict[str, int]]:
    """The most frequent rank, and ``{escaped module path: rank}`` for the modules that differ, as
    ``rank_pattern``/``alpha_pattern`` hold them (PEFT matches the keys as regexes at the path's end)."""
    ranks = Counter(f.rank for f in fits.values())
    r = max(ranks, key=lambda k: (ranks[k], k)) if ranks else 1
    return r, {re.escape(m): f.rank for m, f in fits.items() if f.rank != r}


def check_rank(module: str, rank: int, shape: tuple[int, int]) -> None:
    """A rank (at least 1, from ``check_options``) must fit the matrix: at most min(out, in)."""
    if rank > min(shape):
        raise InputError(f"{module}: --rank {rank} is larger than min(out, in) = {min(shape)} of its "
                         f"{shape[0]}x{shape[1]} weight; choose a rank of at most {min(shape)}")


def matrix_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The (out, fan_in) shape of a change to a weight stored as ``shape``."""
    if kind in ("conv1d_transposed", "embedding"):
        return shape[1], shape[0]
    return shape[0], math.prod(shape[1:])


def as_matrix(kind: str, stored: torch.Tensor) -> torch.Tensor:
    """A weight (or its change) as stored -> (out, fan_in)."""
    if kind in ("conv1d_transposed", "embedding"):
        return stored.T
    return stored.reshape(stored.shape[0], -1)


TARGETS: dict[str, Target] = {}


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator: offer ``cls`` as ``--to <cls.name>``."""
    if cls.name in TARGETS:
        raise RuntimeError(f"two conversion targets are named {cls.name}")
    TARGETS[cls.name] = cls()
    return cls


def get_target(name: str) -> Target:
    target = TARGETS.get(name)
    if target is None:
        raise UnsupportedError(f"cannot convert to {name!r}; the targets are {', '.join(sorted(TARGETS))}")
    return target
