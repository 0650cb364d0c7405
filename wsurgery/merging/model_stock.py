"""mergekit's ``model_stock``: move from the base towards the models' average by t = n·cosθ/(1+(n-1)·cosθ),
θ the mean angle between the models' changes (per tensor, or per row with ``filter_wise``).

The pairwise angles need two changes at a time: each pair re-reads its models (memory-mapped) instead
of holding every change, so memory stays that of four tensors whatever the number of models.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Draws, Inputs, MergeMethod, Param, register


class ModelStock(MergeMethod):
    name = "model_stock"
    shared = {"filter_wise": Param(bool, False)}
    min_models = 2

    def merge(self, inputs: Inputs, shared: dict[str, Any], per_model: list[dict[str, Any]],
              draws: Draws) -> torch.Tensor:
        assert inputs.base is not None
        w0 = inputs.base()
        out_shape = w0.shape
        filter_wise = shared["filter_wise"]

        def shaped(w: torch.Tensor) -> torch.Tensor:
            if filter_wise:
                return w.unsqueeze(0) if w.dim() == 1 else w
            return w.reshape(-1)

        w0 = shaped(w0)
        cos_thetas = []
        n = len(inputs.models)
        for i in range(n):
            offset_a = shaped(inputs.models[i]()) - w0
            for j in range(i + 1, n):
                offset_b = shaped(inputs.models[j]()) - w0
                norm_product = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
                cos_thetas.append(((offset_a * offset_b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
                del offset_b
            del offset_a
        cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
        denominator = 1 + (n - 1) * cos_theta
        singular = denominator.abs() < 1e-6
        safe = torch.where(singular, torch.ones_like(denominator), denominator)
        t = torch.where(singular, torch.zeros_like(cos_theta), (n * cos_theta) / safe)
        total: Any = 0  # Python's sum(), as mergekit adds the models
        for read in inputs.models:
            total = total + shaped(read())
        return (t * (total / n) + (1 - t) * w0).reshape(out_shape)


register(ModelStock())
