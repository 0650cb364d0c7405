"""mergekit's generalized task arithmetic family: task_arithmetic, ties, dare_linear, dare_ties, della,
della_linear, breadcrumbs, breadcrumbs_ties (``mergekit/merge_methods/generalized_task_arithmetic.py``).

Each model's change from the base is sparsified (TIES' magnitude trim, DARE's random drop, DELLA's
ranked drop, breadcrumbs' outlier-and-small drop), weighted, optionally sign-elected (TIES' ``sum``
consensus), summed, normalized by the weights that survived, scaled by ``lambda`` and added to the base.
Models are read one at a time: the sums are running sums with torch's own order (``accumulate``), and
the sign election keeps each model's mask (one bit per element) to replay its change in the second pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import InputError
from . import sparsify
from .accumulate import StackedSum
from .base import Draws, Inputs, MergeMethod, Param, register


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

    def merge(self, inputs: Inputs, shared: dict[str, Any], per_model: list[dict[str, Any]],
              draws: Draws) -> torch.Tensor:
        assert inputs.base is not None
        base = inputs.base()
        n = len(inputs.models)
        if not n:
            return base
        rescale = shared["rescale"]
        # mergekit's weights: a [n, 1, ...] tensor in the base's dtype, multiplied into the stacked changes.
        weights = torch.tensor([p["weight"] for p in per_model], dtype=base.dtype)
        while weights.dim() < base.dim() + 1:
            weights.unsqueeze_(-1)
        kept: list[sparsify.Kept | None] = [None] * n
        if self.sparsification == "random":  # DARE's masks do not depend on the values: drawn first
            with draws as generator:
                kept = sparsify.bernoulli(base.shape, base.dtype, [p["density"] for p in per_model], rescale, generator)

        def change(i: int, first: bool, generator: torch.Generator | None = None) -> torch.Tensor:
            """Model i's sparsified, weighted change; its mask is chosen the first time, replayed after."""
            delta = inputs.models[i]() - base
            if first and self.sparsification == "magnitude":
                kept[i] = sparsify.magnitude(delta, per_model[i]["density"], rescale)
            elif first and self.sparsification == "magnitude_outliers":
                kept[i] = sparsify.magnitude_outliers(delta, per_model[i]["density"], per_model[i]["gamma"], rescale)
            elif first and self.sparsification == "della_magprune":
                assert generator is not None
                kept[i] = sparsify.della_magprune(delta, per_model[i]["density"], per_model[i]["epsilon"], rescale,
                                                  generator)
            k = kept[i]
            return (k.apply(delta) if k is not None else delta) * weights[i]

        def first_pass(into: StackedSum) -> None:
            if self.sparsification == "della_magprune":  # DELLA draws from the values' ranks
                with draws as generator:
                    for i in range(n):
                        into.add(change(i, True, generator))
            else:
                for i in range(n):
                    into.add(change(i, True))

        if self.consensus:
            # Elect each element's sign by the sum of the changes, then sum the changes that agree.
            # (mergekit's int8_mask only changes the dtype the signs are compared in, never the mask.)
            votes = StackedSum(n, base.dtype)
            first_pass(votes)
            majority = (votes.result() >= 0).to(base.dtype) * 2 - 1
            del votes
            mixed, divisor = StackedSum(n, base.dtype), StackedSum(n, base.dtype)
            for i in range(n):
                d = change(i, False)
                agree = d.sign() == majority
                mixed.add(d * agree)
                divisor.add(weights[i] * agree)
                del d, agree
            mixed_delta, total = mixed.result(), divisor.result()
            total[total == 0] = 1
        else:
            summed = StackedSum(n, base.dtype)
            first_pass(summed)
            mixed_delta = summed.result()
            total = weights.sum(dim=0)
            total[total.abs() < 1e-8] = 1
        if shared["normalize"]:
            mixed_delta /= total
        if shared["lambda"] != 1:
            mixed_delta *= shared["lambda"]
        return (base + mixed_delta).to(base.dtype)

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
