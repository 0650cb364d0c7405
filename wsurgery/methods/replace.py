"""Whole-tensor replacement: ``modules_to_save`` copies, saved biases (``bias="all"``/``"lora_only"``)
and resized embeddings saved with ``save_embedding_layers``. Common to every method, so it lives here
once rather than in each method."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import InputError, UnsupportedError
from .base import Patch, Shapes, Tensors


class ReplacePatch(Patch):
    """The adapter carries a full tensor that takes the base tensor's place."""

    priority: ClassVar[int] = 0
    replaces: ClassVar[bool] = True

    def __init__(self, module: str, role: str, tensor: torch.Tensor, key: str,
                 original: torch.Tensor | None = None):
        super().__init__(module, (role,))
        self.role = role
        self.tensor = tensor
        self.key = key  # the adapter key it came from, for messages
        # The base tensor as the adapter saw it, when the adapter saved a copy (``original_module``,
        # or a ``base_layer.weight`` of a targeted or resized embedding): then unmerging is exact.
        self.original = original

    def check(self, shapes: Shapes) -> None:
        base = shapes[self.role]
        new = tuple(self.tensor.shape)
        if new == base:
            return
        # A grown (or shrunk) vocabulary: embeddings and output heads keep their width.
        if len(new) == len(base) == 2 and new[1] == base[1]:
            return
        raise InputError(
            f"adapter tensor {self.key!r} has shape {list(new)} but the base tensor "
            f"{self.module}.{self.role} has {list(base)}; was the adapter trained on another model?"
        )

    def output_shapes(self, shapes: Shapes) -> Shapes:
        return {**shapes, self.role: tuple(self.tensor.shape)}

    def apply(self, tensors: Tensors) -> Tensors:
        base = tensors[self.role]  # float32 work copy, or an integer buffer kept exact in its own dtype
        return {**tensors, self.role: self.tensor.to(torch.float32 if base.is_floating_point() else base.dtype)}

    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        if scale != 1.0 and not tensors[self.role].is_floating_point():
            raise UnsupportedError(f"{self.module}.{self.role}: --scale cannot interpolate the integer tensor that "
                                   f"{self.key!r} replaces")
        if scale != 1.0 and tuple(self.tensor.shape) != tuple(tensors[self.role].shape):
            raise UnsupportedError(
                f"{self.module}.{self.role}: --scale cannot interpolate a resized tensor "
                f"({list(tensors[self.role].shape)} -> {list(self.tensor.shape)})"
            )
        return super().merge(tensors, scale)

    def revert(self, tensors: Tensors) -> Tensors:
        if self.original is not None:
            return {**tensors, self.role: self.original.to(torch.float32)}
        return super().revert(tensors)

    def why_not_invertible(self) -> str | None:
        if self.original is not None:
            return None
        return (
            f"the adapter replaces {self.module}.{self.role} outright (modules_to_save or a saved bias) and does "
            "not store the original; take that tensor from the base checkpoint instead of unmerging"
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": "replace", "shape": list(self.tensor.shape)}
