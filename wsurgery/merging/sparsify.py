"""mergekit 0.1.5's sparsifiers (``mergekit/sparsify.py``), op for op: the same torch calls on the same
whole tensor, so that ties in magnitude sort the same way and the same random draws make the same mask.

Each returns a ``Kept``: the mask it chose (bit-packed) and the rescaling factor, which ``apply`` turns
into exactly the tensor mergekit's sparsifier returns. TIES-style merges apply it twice (once to elect
signs, once to sum), so they keep one bit per element per model instead of every model's change.

Random masks are drawn from ``generator``, a ``torch.Generator`` seeded once per merge: mergekit seeds
torch's global generator once (``transformers.set_seed``) and draws every mask from it in the order it
merges the tensors, which a generator seeded with the same number reproduces draw for draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Kept:
    """Which elements a sparsifier kept, and how it rescaled them."""

    bits: np.ndarray  # the 0/1 mask, packed 8 to a byte
    numel: int
    mask_dtype: torch.dtype  # the dtype mergekit's mask (and masked product) is in
    rescale: bool
    as_rows: bool  # DELLA views a 1-D tensor as one row
    factor: torch.Tensor | None = None  # the L1 rescaling, once computed (the same values give the same factor)

    @classmethod
    def of(cls, mask: torch.Tensor, rescale: bool, as_rows: bool = False) -> Kept:
        bits = np.packbits(mask.reshape(-1).to(torch.bool).numpy())
        return cls(bits, mask.numel(), mask.dtype, rescale, as_rows)

    def mask(self, shape: torch.Size) -> torch.Tensor:
        """The mask as bools: multiplying by it gives the same numbers as by mergekit's 0/1 floats."""
        return torch.from_numpy(np.unpackbits(self.bits, count=self.numel).view(np.bool_)).reshape(shape)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """mergekit's ``rescaled_masked_tensor(tensor, mask, l1 if rescale)`` and the casts around it."""
        dtype, shape = tensor.dtype, tensor.shape
        if self.as_rows and tensor.dim() < 2:
            tensor = tensor.unsqueeze(0)
        work = tensor.to(self.mask_dtype) if self.mask_dtype != dtype else tensor
        mask = self.mask(work.shape)
        masked = work * mask
        if self.rescale and self.factor is None:
            before, after = work.abs().sum(), masked.abs().sum()
            self.factor = torch.ones(()) if before < 1e-7 or after < 1e-7 else before / after
        if self.factor is not None and not bool(self.factor == 1):
            masked = masked * self.factor
        return masked.to(dtype).reshape(shape)


def magnitude(tensor: torch.Tensor, density: float, rescale: bool) -> Kept | None:
    """Keep the ``density`` share of largest magnitudes (at least one element): TIES' trim."""
    if density >= 1:
        return None
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    top = torch.argsort(tensor.abs().reshape(-1).float(), descending=True)[:k]
    mask[top] = 1
    return Kept.of(mask, rescale)


def magnitude_outliers(tensor: torch.Tensor, density: float, gamma: float, rescale: bool) -> Kept | None:
    """Model Breadcrumbs: drop the ``gamma`` share of largest magnitudes, then the smallest, keeping ``density``."""
    if density >= 1:
        return None
    n = tensor.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = torch.sort(tensor.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=tensor.dtype)
    mask[order[bottom:bottom + target]] = 1
    return Kept.of(mask, rescale)


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """bfloat16 stays; anything else is drawn in float32 (torch has no CPU bernoulli for float16)."""
    return torch.bfloat16 if tensor.dtype == torch.bfloat16 else torch.float32


def bernoulli(shape: torch.Size, dtype: torch.dtype, densities: list[float], rescale: bool,
              generator: torch.Generator) -> list[Kept | None]:
    """DARE: keep each element of a ``dtype`` tensor of ``shape`` with probability ``density``, one mask per
    density, drawn in order (the draws do not depend on the values, so they are made before any is read)."""
    work = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    probabilities: dict[float, torch.Tensor] = {}
    kept: list[Kept | None] = []
    for density in densities:
        if density >= 1:
            kept.append(None)
            continue
        p = probabilities.setdefault(density, torch.full(shape, density, dtype=work))
        kept.append(Kept.of(torch.bernoulli(p, generator=generator), rescale))
    return kept


def della_magprune(tensor: torch.Tensor, density: float, epsilon: float, rescale: bool,
                   generator: torch.Generator) -> Kept | None:
    """DELLA's MagPrune: keep probabilities from density-epsilon to density+epsilon by magnitude rank in each row."""
    if density >= 1:
        return None
    work = _work_dtype(tensor)
    if tensor.dim() < 2:
        tensor = tensor.unsqueeze(0)
    ranks = torch.argsort(tensor.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    del ranks
    return Kept.of(torch.bernoulli(probs, generator=generator).to(work), rescale, as_rows=True)
