"""mergekit's ``linear`` (model soup): Σ wᵢ·Wᵢ, divided by Σ wᵢ when ``normalize`` (the default).

Every model is an input, the base only if listed with a weight (mergekit ignores the base otherwise).
Accumulated in float32 (float64 for float64 inputs) one model at a time with ``addcmul_``, as mergekit's
kernel does, so memory does not grow with the number of models.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Draws, Inputs, MergeMethod, Param, register


class Linear(MergeMethod):
    name = "linear"
    shared = {"normalize": Param(bool, True)}
    per_model = {"weight": Param(float)}
    uses_base = False

    def merge(self, inputs: Inputs, shared: dict[str, Any], per_model: list[dict[str, Any]],
              draws: Draws) -> torch.Tensor:
        work = torch.float64 if inputs.dtype == torch.float64 else torch.float32
        weight = torch.tensor([[p["weight"] for p in per_model]], dtype=work)  # mergekit's [group, input] batch
        coefficient_shape = (1,) + (1,) * len(inputs.shape)
        result = torch.zeros((1, *inputs.shape), dtype=work)
        for read, coefficient in zip(inputs.models, weight.unbind(1)):
            result.addcmul_(read().unsqueeze(0), coefficient.reshape(coefficient_shape))
        if shared["normalize"]:
            result.div_(weight.sum(dim=1).reshape(coefficient_shape))
        return result.to(inputs.dtype)[0]


register(Linear())
