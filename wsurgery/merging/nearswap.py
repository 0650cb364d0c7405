"""mergekit's ``nearswap``: take the other model's value where it is within ``t`` of the base's, blend
towards it in proportion t/|a-b| elsewhere. Elementwise, in the inputs' dtype."""

from __future__ import annotations

from typing import Any

import torch

from .base import Draws, Inputs, MergeMethod, Param, register


class NearSwap(MergeMethod):
    name = "nearswap"
    shared = {"t": Param(float)}
    max_models = 1

    def merge(self, inputs: Inputs, shared: dict[str, Any], per_model: list[dict[str, Any]],
              draws: Draws) -> torch.Tensor:
        assert inputs.base is not None
        a, b = inputs.base(), inputs.models[0]()
        weight = (shared["t"] / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
        return weight * b + (1 - weight) * a


register(NearSwap())
