"""LayerNorm tuning (``peft_type: LN_TUNING``): the targeted module is trained as a whole copy.

PEFT deep-copies every targeted module (by default the norm layers: LayerNorm, RMSNorm, ...) and trains
the copy; it saves ``<module>.ln_tuning_layers.<tensor>`` for every tensor of that copy (``weight``,
and ``bias`` where the module has one). ``merge`` swaps the copy in for the original, so merging is a
replacement of each saved tensor; the original is not saved, so unmerging cannot work from the files.
Any module type may be targeted, so the roles are whatever tensors the copy saved (``weight``,
``bias``, or deeper names such as ``q_proj.weight`` when a whole block was targeted).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import InputError, UnsupportedError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer
from .replace import ReplacePatch

PARAM = "ln_tuning_layers"


class LnTuningPatch(Patch):
    """Every saved tensor of the trained copy takes the place of the base module's tensor."""

    replaces: ClassVar[bool] = True

    def __init__(self, module: str, tensors: dict[str, torch.Tensor], keys: dict[str, str]):
        super().__init__(module, tuple(tensors))
        # One ReplacePatch per role does the swap itself; this class adds the strict shape rule (a norm's
        # copy never changes size) and LN tuning's own refusal to unmerge.
        self.parts = {role: ReplacePatch(module, role, t, keys[role]) for role, t in tensors.items()}

    def check(self, shapes: Shapes) -> None:
        for role, part in self.parts.items():
            if tuple(part.tensor.shape) != shapes[role]:
                raise InputError(
                    f"adapter tensor {part.key!r} has shape {list(part.tensor.shape)} but the base tensor "
                    f"{self.module}.{role} has {list(shapes[role])}; was the adapter trained on another model?"
                )

    def apply(self, tensors: Tensors) -> Tensors:
        out = dict(tensors)
        for role, part in self.parts.items():
            if part.tensor.is_floating_point():
                out[role] = part.apply({role: tensors[role]})[role]
            else:  # an integer buffer (e.g. a BatchNorm's num_batches_tracked): copied as it is
                out[role] = part.tensor.to(tensors[role].dtype).clone()
        return out

    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        if scale != 1.0:
            ints = [r for r, p in self.parts.items() if not p.tensor.is_floating_point()]
            if ints:
                raise UnsupportedError(f"{self.module}: --scale cannot interpolate the integer tensor(s) {ints} "
                                       "that LN tuning replaces")
        return super().merge(tensors, scale)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``LNTuningLayer.forward`` runs the trained copy instead of the base module: the same layer
        over the saved tensors (norm weights are compared element by element: ``Direct``)."""
        return layer(x, {**base, **{role: like(part.tensor, x) for role, part in self.parts.items()}})

    def why_not_invertible(self) -> str | None:
        return (f"LN tuning replaces {self.module} ({', '.join(self.roles)}) with a trained copy and does not "
                "save the original tensors; take them from the base checkpoint instead of unmerging")

    def describe(self) -> dict[str, Any]:
        shapes = {r: list(p.tensor.shape) for r, p in self.parts.items()}
        return {"kind": f"replace module ({', '.join(shapes)})", "shape": next(iter(shapes.values())),
                "tensors": shapes}


@register
class LnTuning(Method):
    peft_types = ("LN_TUNING",)
    param_names = frozenset({PARAM})
    support = (Support("LN tuning", "norm layers (weight, bias)", "replaces the tensors",
                       "refused: the originals are not saved", "0.21.2"),)

    def patch(self, params: ModuleParams) -> Patch:
        prefix = PARAM + "."
        tensors, keys = {}, {}
        for name in list(params.tensors):
            if not name.startswith(prefix) or name == prefix:
                raise InputError(f"{params.config.path.parent}: module {params.module!r}: tensor {name!r} is not "
                                 f"of the form '{prefix}<tensor>'; the adapter file is damaged")
            role = name[len(prefix):]
            tensors[role] = params.tensors[name]
            keys[role] = f"{params.module}.{name}"
        return LnTuningPatch(params.module, tensors, keys)

    def summary(self, config) -> dict[str, Any]:
        return {"merge": "replace each targeted module's tensors with the trained copy"}
