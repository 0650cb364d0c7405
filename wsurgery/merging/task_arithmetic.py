"""mergekit's generalized task arithmetic family: task_arithmetic, ties, dare_linear, dare_ties, della,
della_linear, breadcrumbs, breadcrumbs_ties (``mergekit/merge_methods/generalized_task_arithmetic.py``).

Each model's change from the base is sparsified (TIES' magnitude trim, DARE's random drop, DELLA's
ranked drop, breadcrumbs' outlier-and-small drop), weighted, optionally sign-elected (TIES' ``sum``
consensus), summed, normalized by the weights that survived, scaled by ``lambda`` and added to the base.
The changes are stacked and summed with one ``torch.sum`` as mergekit does: torch's summation order of a
stacked dimension is what makes the result bit-identical, so a tensor holds one change per model at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import InputError
from . import sparsify
from .base import Inputs, MergeMethod, Param, register


@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    name: str  # type: ignore[misc]
    sparsification: str | None  # magnitude | random | magnitude_outliers | della_magprune
    consensus: bool
    default_normalize: bool
    default_rescale: bool

    per_model: ClassVar[dict[str, Param]] = {}

    def __post_init__(self) -> None:
        shared = {"int8_mask": Param(bool, False), "normalize": Param(bool, self.default_normalize),
                  "rescale": Param(bool, self.default_rescale), "lambda": Param(float, 1.0)}
        per_model = {"weight": Param(float), "density": Param(float, 1.0)}
        if self.sparsification == "magnitude_outliers":
            per_model["gamma"] = Param(float, 0.01)
        if self.sparsification == "della_magprune":
            per_model["epsilon"] = Param(float, 0.15)
        object.__setattr__(self, "shared", shared)
        object.__setattr__(self, "per_model", per_model)
        object.__setattr__(self, "random", self.sparsification in ("random", "della_magprune"))

    def check(self, shared: dict[str, Any], per_model: list[dict[str, Any]], where: str) -> None:
        for p in per_model:
            d = p["density"]
            if not 0 < d <= 1:
                raise InputError(f"{where}: density {d} is outside (0, 1]; it is the share of each change kept")
            if "epsilon" in p and d < 1 and not (0 < d - p["epsilon"] and d + p["epsilon"] < 1):
                raise InputError(f"{where}: density {d} ± epsilon {p['epsilon']} must stay inside (0, 1) for "
                                 f"{self.name}; choose a smaller epsilon")
            if "gamma" in p and not 0 <= p["gamma"] <= 1:
                raise InputError(f"{where}: gamma {p['gamma']} is outside [0, 1]")

    def _sparsified(self, delta: torch.Tensor, p: dict[str, Any], rescale: bool,
                    generator: torch.Generator) -> torch.Tensor:
        if self.sparsification == "magnitude":
            return sparsify.magnitude(delta, p["density"], rescale)
        if self.sparsification == "random":
            return sparsify.bernoulli(delta, p["density"], rescale, generator)
        if self.sparsification == "magnitude_outliers":
            return sparsify.magnitude_outliers(delta, p["density"], p["gamma"], rescale)
        assert self.sparsification == "della_magprune", self.sparsification
        return sparsify.della_magprune(delta, p["density"], p["epsilon"], rescale, generator)

    def merge(self, inputs: Inputs, shared: dict[str, Any], per_model: list[dict[str, Any]],
              generator: torch.Generator) -> torch.Tensor:
        assert inputs.base is not None
        base = inputs.base()
        if not inputs.models:
            return base
        deltas = base.new_empty((len(inputs.models), *base.shape))
        for i, (read, p) in enumerate(zip(inputs.models, per_model)):
            delta = read() - base
            if self.sparsification is not None:
                delta = self._sparsified(delta, p, shared["rescale"], generator)
            deltas[i] = delta
            del delta
        weights = torch.tensor([p["weight"] for p in per_model], dtype=deltas.dtype)
        while deltas.dim() > weights.dim():
            weights.unsqueeze_(-1)
        deltas.mul_(weights)
        if self.consensus:
            # mergekit's int8_mask only changes the dtype the signs are compared in, never the mask.
            sign = deltas.sign()
            majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
            mask = sign == majority
            del sign, majority
            mixed = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        del deltas
        if shared["normalize"]:
            mixed /= divisor
        if shared["lambda"] != 1:
            mixed *= shared["lambda"]
        return (base + mixed).to(base.dtype)


for _method in (
    TaskArithmetic("task_arithmetic", None, False, False, False),
    TaskArithmetic("ties", "magnitude", True, True, False),
    TaskArithmetic("dare_ties", "random", True, False, True),
    TaskArithmetic("dare_linear", "random", False, False, True),
    TaskArithmetic("breadcrumbs", "magnitude_outliers", False, False, False),
    TaskArithmetic("breadcrumbs_ties", "magnitude_outliers", True, False, False),
    TaskArithmetic("della", "della_magprune", True, True, True),
    TaskArithmetic("della_linear", "della_magprune", False, False, True),
):
    register(_method)
