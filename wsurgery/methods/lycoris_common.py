"""Shared pieces of the LyCORIS patches (kohya / LyCORIS adapter files): how a module's change is scaled by the
user's multiplier, and DoRA's renormalisation as LyCORIS does it.

LyCORIS (4.1.3) computes the weight its modules train and infer with as ``W + multiplier·ΔW`` (ΔW already
carries α/r), or, with ``weight_decompose`` (DoRA), ``V·(multiplier·(m/‖V‖ − 1) + 1)`` with ``V = W + ΔW`` taken
at multiplier 1 and ``‖V‖`` per output row (``wd_on_out``) or per input column, plus float32 eps.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F


from ..errors import InputError, NotInvertibleError, UnsupportedError
from .base import AdditivePatch, Patch, Shapes, Tensors
from .layers import Layer, Linear


class LycorisPatch(Patch):
    """A LyCORIS change ``W -> f(W, multiplier)``; subclasses implement ``merge`` with LyCORIS' multiplier rule
    (which is not ``lerp``) and ``apply`` as merge at 1."""

    @abstractmethod
    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        """W' at this multiplier, by LyCORIS' rule."""

    def apply(self, tensors: Tensors) -> Tensors:
        return self.merge(tensors, 1.0)

    def revert(self, tensors: Tensors) -> Tensors:
        return self.unmerge(tensors, 1.0)


def conv_op(w: torch.Tensor) -> Any:
    """The convolution that applies a kernel of this rank (verify's plain Conv layer: stride 1, no padding)."""
    return {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]


def on_channels(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``y`` scaled per output channel: the last axis of a Linear's output, axis 1 of a convolution's."""
    return y * (f.view(1, -1, *[1] * (y.dim() - 2)) if y.dim() > 2 else f)


def _norm(V: torch.Tensor, on_out: bool) -> torch.Tensor:
    """LyCORIS' ``weight_decompose`` norm: per output row or per input column, shaped to broadcast, plus eps."""
    eps = torch.finfo(V.dtype).eps
    if on_out:
        return V.reshape(V.shape[0], -1).norm(dim=1).reshape(V.shape[0], *[1] * (V.dim() - 1)) + eps
    return (V.transpose(0, 1).reshape(V.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(V.shape[1], *[1] * (V.dim() - 1)).transpose(0, 1)) + eps


class LycorisDoraPatch(LycorisPatch):
    """LyCORIS DoRA (``dora_scale``) over an additive LoRA/LoHa/LoKr change: ``V = W + ΔW`` (ΔW at multiplier 1),
    then ``W' = V·(mult·(m/‖V‖ − 1) + 1)``. ``dora_scale`` is ``(out, 1, …)`` (``wd_on_out``, the default) or
    ``(1, in, …)``; its shape says which."""

    def __init__(self, inner: AdditivePatch, dora_scale: torch.Tensor):
        super().__init__(inner.module, ("weight",))
        self.inner, self.m = inner, dora_scale
        # (out, 1, …) or (1, in, …); check() confirms against the base (only a 1-row or 1-column weight is ambiguous)
        self.on_out = dora_scale.dim() < 2 or dora_scale.shape[0] != 1 or dora_scale.shape[1] == 1

    def scales_linearly(self) -> bool:
        return False  # the multiplier interpolates the magnitude's factor, not W' − W

    def check(self, shapes: Shapes) -> None:
        self.inner.check(shapes)
        w = tuple(shapes["weight"])
        m = tuple(self.m.shape)
        rest = (1,) * (len(w) - 1)
        if m == (w[0], *rest):
            self.on_out = True
        elif len(w) >= 2 and m == (1, w[1], *rest[1:]):
            self.on_out = False
        else:
            raise InputError(f"{self.module}: dora_scale is {list(m)} but the base weight is {list(w)}: expected "
                             f"{[w[0], *rest]} (wd_on_out) or {[1, *w[1:2], *rest[1:]]}")

    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        V = self.inner.add_scaled(tensors, 1.0)["weight"]
        factor = self.m.to(V.dtype) / _norm(V, self.on_out)
        if scale != 1:
            factor = scale * (factor - 1) + 1
        return {**tensors, "weight": V.mul_(factor)}

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """LyCORIS' DoRA forward on a Linear layer: ΔW read off the inner change's own forward path (its output on
        the identity with a zero base), V = W + ΔW, then the output (``wd_on_out``) or the input (``wd_on_in``)
        scaled by m/‖V‖."""
        W = base["weight"]
        if W.dim() != 2:
            raise UnsupportedError(f"{self.module}: verify covers LyCORIS DoRA on Linear layers only")
        eye = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
        V = W + self.inner.forward(eye, {"weight": torch.zeros_like(W)}, Linear()).T
        f = (self.m.to(device=W.device, dtype=W.dtype) / _norm(V, self.on_out)).flatten()
        bias = {"bias": base["bias"]} if "bias" in base else {}
        if self.on_out:
            return on_channels(layer(x, {"weight": V}), f) + (layer(torch.zeros_like(x), {"weight": V, **bias})
                                                              if bias else 0)
        return layer(x * f, {"weight": V, **bias})

    def unmerge(self, tensors: Tensors, scale: float) -> Tensors:
        raise NotInvertibleError(f"{self.module}: {self.why_not_invertible()}")

    def why_not_invertible(self) -> str | None:
        return ("DoRA (dora_scale) rescales W+ΔW to the saved magnitude; the norm of W+ΔW is not in the files, "
                "so W cannot be recovered. Keep the base checkpoint and merge from it again instead")

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "dora": "wd_on_out" if self.on_out else "wd_on_in"}
