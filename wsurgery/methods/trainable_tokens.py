"""Trainable tokens (``peft_type: TRAINABLE_TOKENS``): new values for a few rows of an embedding.

PEFT saves ``<embedding>.trainable_tokens_delta`` of shape ``(len(token_indices), d)``. Despite its
name it holds the **new rows**, not a difference: merging is ``E[token_indices] = delta``
(``index_copy`` along dim 0), for an ``nn.Embedding`` ``(V, d)`` or a Linear output head ``(V, d)``.
``token_indices`` is a list in ``adapter_config.json``. The original rows are kept by PEFT in memory
only (``trainable_tokens_original`` is never saved), so unmerging is impossible from the files.

Tied embeddings (``tie_word_embeddings``): PEFT puts a second layer, tied to the embedding's, on the
output head and merges both; the head then holds the same new rows. PEFT 0.21 also saves the tied
layer's tensor under the head's name (``lm_head.trainable_tokens_delta``, the same tensor). Each saved
tensor becomes a patch of its own module; where a tied checkpoint stores no head, the engine sees that
the head's patch makes the same change as the embedding's (``same_change``) and applies it once.

Reuse: LoRA's ``trainable_token_indices`` option saves the same tensor as
``<embedding>.token_adapter.trainable_tokens_delta`` inside a LoRA adapter. ``token_patch`` builds the
patch for such a tensor, and ``token_indices_for`` resolves LoRA's option (a list, or a dict
``layer name -> list``) for one module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Embedding, Layer

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

PARAM = "trainable_tokens_delta"


class TokenPatch(Patch):
    """``W[indices] = rows`` on a ``(V, d)`` embedding or output-head weight."""

    def __init__(self, module: str, rows: torch.Tensor, indices: list[int], key: str | None = None):
        super().__init__(module, ("weight",))
        self.rows = rows
        self.indices = list(indices)
        self.key = key or f"{module}.{PARAM}"  # the adapter key, for messages
        _check_indices(self.indices, rows, self.key)

    def same_change(self, other: Patch) -> bool:
        return (isinstance(other, TokenPatch) and other.indices == self.indices
                and torch.equal(other.rows, self.rows))

    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        if len(w) != 2 or w[1] != self.rows.shape[1]:
            raise InputError(f"adapter tensor {self.key!r} has rows of width {self.rows.shape[1]} but the base tensor "
                             f"{self.module}.weight has shape {list(w)}; was the adapter trained on another model?")
        top = max(self.indices)
        if top >= w[0]:
            raise InputError(f"adapter tensor {self.key!r} sets token {top} but {self.module}.weight has only "
                             f"{w[0]} rows; was the vocabulary resized after the base was saved?")

    def _index(self, w: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.indices, dtype=torch.long, device=w.device)

    def apply(self, tensors: Tensors) -> Tensors:
        w = tensors["weight"]
        return {"weight": w.index_copy_(0, self._index(w), self.rows.to(w.dtype))}

    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        if scale == 1.0:
            return self.apply(tensors)
        w = tensors["weight"]  # only the listed rows move: W[i] + scale·(new_i - W[i])
        idx = self._index(w)
        old = w.index_select(0, idx)
        return {"weight": w.index_copy_(0, idx, torch.lerp(old, self.rows.to(w.dtype), scale))}

    def layer(self, shapes: Shapes) -> Layer:
        """A row lookup for an embedding and an output head alike: the head's output ``x·Wᵀ`` is linear in the
        same rows, and looking them up compares each one; the trained rows are always among the inputs."""
        return Embedding(rows=tuple(self.indices))

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``TrainableTokensLayer.forward`` looks ids up in W with the trained rows in place of theirs;
        here on the looked-up rows: every id that is a trained token gets its saved row."""
        y = layer(x, base).clone()
        index = torch.tensor(self.indices, dtype=torch.long, device=x.device)
        hits = x[:, None] == index[None, :]  # (ids, trained tokens); duplicates hold equal rows (checked at load)
        found = hits.any(dim=1)
        y[found] = like(self.rows, y)[hits[found].int().argmax(dim=1)]
        return y

    def why_not_invertible(self) -> str | None:
        shown = ", ".join(map(str, self.indices[:8])) + (", ..." if len(self.indices) > 8 else "")
        return (f"trainable tokens overwrite rows [{shown}] of {self.module}.weight with new values and do not save "
                "the original rows; take those rows from the base checkpoint instead of unmerging")

    def describe(self) -> dict[str, Any]:
        return {"kind": f"replace {len(self.indices)} token row(s)", "indices": self.indices[:16],
                "shape": list(self.rows.shape)}


def _check_indices(indices: list[int], rows: torch.Tensor, key: str) -> None:
    if rows.ndim != 2:
        raise InputError(f"adapter tensor {key!r} has shape {list(rows.shape)}; expected (tokens, width)")
    if not indices:
        raise InputError(f"adapter tensor {key!r}: the config lists no token indices")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise InputError(f"adapter tensor {key!r}: token indices must be integers, got {indices[:8]}")
    if len(indices) != rows.shape[0]:
        raise InputError(f"adapter tensor {key!r} holds {rows.shape[0]} rows but the config lists {len(indices)} "
                         "token indices; the adapter file and its config disagree")
    if min(indices) < 0:
        raise InputError(f"adapter tensor {key!r}: negative token index {min(indices)} in the config")
    seen: dict[int, int] = {}
    for pos, i in enumerate(indices):
        if i in seen and not torch.equal(rows[seen[i]], rows[pos]):
            raise InputError(f"adapter tensor {key!r}: token {i} is listed twice with different values; "
                             "which one wins is undefined (in PEFT too)")
        seen.setdefault(i, pos)


def token_patch(module: str, delta: torch.Tensor, indices: list[int], key: str | None = None) -> TokenPatch:
    """The patch that writes ``delta`` (the new rows, shape ``(len(indices), d)``) into rows ``indices`` of
    ``<module>.weight``. For LoRA's ``trainable_token_indices``: ``module`` is the path before
    ``.token_adapter.trainable_tokens_delta``, ``indices`` comes from ``token_indices_for``. Raises
    ``InputError`` on a count mismatch, negative indices or conflicting duplicates."""
    return TokenPatch(module, delta, indices, key)


def token_indices_for(option: list[int] | dict[str, list[int]] | None, module: str,
                      where: str = "adapter") -> list[int]:
    """Resolve LoRA's ``trainable_token_indices`` for the module (adapter-side path) that saved a token tensor.

    A list applies to the input embedding (the only module PEFT then wraps). A dict maps layer names to
    lists; PEFT wraps every module whose path ends with the name (plain suffix match), so the same rule
    is used here, and two names that match with different lists are an error.
    """
    if isinstance(option, list):
        return option
    if isinstance(option, dict):
        found = {tuple(v) for k, v in option.items() if module.endswith(k)}
        if len(found) == 1:
            return list(found.pop())
        if not found:
            raise InputError(f"{where}: saved token rows for {module!r} but trainable_token_indices names no layer "
                             f"matching it ({sorted(option)}); the adapter file and its config disagree")
        raise InputError(f"{where}: several trainable_token_indices entries match {module!r} with different "
                         "indices; cannot tell which rows were trained")
    raise InputError(f"{where}: saved token rows for {module!r} but has no trainable_token_indices in its config")


@register
class TrainableTokens(Method):
    peft_types = ("TRAINABLE_TOKENS",)
    param_names = frozenset({PARAM})
    support = (Support("trainable tokens", "Embedding, output head (tied too)", "replaces the rows",
                       "refused: the original rows are not saved", "0.21.2"),)

    def check_config(self, config: AdapterConfig) -> None:
        indices = config.get("token_indices")
        if not isinstance(indices, list) or not indices:
            raise InputError(f"{config.path}: TRAINABLE_TOKENS needs a non-empty list 'token_indices', "
                             f"got {indices!r}")

    def patch(self, params: ModuleParams) -> Patch:
        (rows,) = params.require(PARAM)
        extra = sorted(set(params.tensors) - {PARAM})
        if extra:
            raise InputError(f"{params.config.path.parent}: module {params.module!r} has unexpected tensor(s) "
                             f"{extra} next to {PARAM}; the adapter file is damaged")
        return TokenPatch(params.module, rows, params.config.get("token_indices"), f"{params.module}.{PARAM}")

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        indices = config.get("token_indices") or []
        return {"merge": "E[token_indices] = saved rows", "tokens": len(indices)}
