"""mergekit 0.1.5's sparsifiers (``mergekit/sparsify.py``), op for op: the same torch calls on the same
whole tensor, so that ties in magnitude sort the same way and the same random draws make the same mask.

Random masks are drawn from ``generator``, a ``torch.Generator`` seeded once per merge: mergekit seeds
torch's global generator once (``transformers.set_seed``) and draws every mask from it in the order it
merges the tensors, which a generator seeded with the same number reproduces draw for draw.
"""

from __future__ import annotations

import torch


def rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """``tensor * mask``, scaled back to the L1 norm of ``tensor`` when ``rescale`` (DARE's rescaling)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the ``density`` share of largest magnitudes (at least one element): TIES' trim."""
    if density >= 1:
        return tensor
    if tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    top = torch.argsort(tensor.abs().reshape(-1).float(), descending=True)[:k]
    mask[top] = 1
    return rescaled(tensor, mask.reshape_as(tensor), rescale)


def magnitude_outliers(tensor: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` share of largest magnitudes, then the smallest, keeping ``density``."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = torch.sort(tensor.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=tensor.dtype)
    mask[order[bottom:bottom + target]] = 1
    return rescaled(tensor, mask.reshape_as(tensor), rescale)


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """bfloat16 stays; anything else is drawn in float32 (torch has no CPU bernoulli for float16)."""
    return torch.bfloat16 if tensor.dtype == torch.bfloat16 else torch.float32


def bernoulli(tensor: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each element with probability ``density``."""
    if density >= 1:
        return tensor
    work = _work_dtype(tensor)
    mask = torch.bernoulli(torch.full_like(tensor, density, dtype=work), generator=generator)
    return rescaled(tensor.to(work), mask, rescale).to(tensor.dtype)


def della_magprune(tensor: torch.Tensor, density: float, epsilon: float, rescale: bool,
                   generator: torch.Generator) -> torch.Tensor:
    """DELLA's MagPrune: keep probabilities from density-epsilon to density+epsilon by magnitude rank in each row."""
    if density >= 1:
        return tensor
    shape, work = tensor.shape, _work_dtype(tensor)
    if tensor.dim() < 2:
        tensor = tensor.unsqueeze(0)
    ranks = torch.argsort(tensor.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(work)
    return rescaled(tensor.to(work), mask, rescale).to(tensor.dtype).reshape(shape)
