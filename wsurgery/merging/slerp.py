"""mergekit's ``slerp``: spherical interpolation from the base (t=0) to the one other model (t=1), each
tensor treated as one vector; near-collinear pairs interpolate linearly. Computed in float32 (float64
for float64 inputs), written into a tensor of the inputs' dtype, as mergekit does."""

from __future__ import annotations

from typing import Any

import torch

from .base import Draws, Inputs, MergeMethod, Param, register

_CHUNK_ELEMENTS = 1024 * 1024  # mergekit's column chunk: the norms are norms of chunk norms


def slerp(t: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """mergekit's batched slerp over ``[outputs, ...]`` tensors, op for op."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(v0.shape[0], -1), v1.reshape(v1.shape[0], -1)
    t = t.reshape(-1, 1).to(dtype)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    step = max(1, _CHUNK_ELEMENTS // a.shape[0])
    starts = range(0, a.shape[1], step)
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a[:, s:s + step].to(dtype), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(b[:, s:s + step].to(dtype), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([((a[:, s:s + step].to(dtype) / norm_a) * (b[:, s:s + step].to(dtype) / norm_b))
                       .sum(dim=1, keepdim=True) for s in starts]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in starts:
        result[:, s:s + step] = coef_a * a[:, s:s + step].to(dtype) + coef_b * b[:, s:s + step].to(dtype)
    return result.reshape(v0.shape)


class Slerp(MergeMethod):
    name = "slerp"
    shared = {"t": Param(float)}
    max_models = 1

    def merge(self, inputs: Inputs, shared: dict[str, Any], per_model: list[dict[str, Any]],
              draws: Draws) -> torch.Tensor:
        assert inputs.base is not None
        t = torch.tensor([shared["t"]], dtype=torch.float64 if inputs.dtype == torch.float64 else torch.float32)
        return slerp(t, inputs.base().unsqueeze(0), inputs.models[0]().unsqueeze(0))[0]


register(Slerp())
