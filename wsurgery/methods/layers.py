"""How a base module computes from its tensors: just enough to run one on test inputs.

``verify`` checks a merged file by running each changed module twice on the same inputs: once as the
adapter's own unmerged forward path (``Patch.forward``) and once as a plain layer over the merged
tensors. These classes are the plain layers. Every one is linear in its tensors, which is what lets
``verify`` compare a merge at ``--scale s`` with ``y_base + s·(y_adapter - y_base)`` and bound rounding
error by running the same layer on magnitudes (``magnitude``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Shapes = dict[str, tuple[int, ...]]
Tensors = dict[str, torch.Tensor]


class Layer(ABC):
    """A module's computation from its tensors (by role), and the inputs it takes."""

    @abstractmethod
    def inputs(self, shapes: Shapes, tokens: int, generator: torch.Generator) -> torch.Tensor:
        """Seeded inputs shaped like what the module sees in a model (``tokens`` rows)."""

    @abstractmethod
    def __call__(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        """The module's output for ``x``."""

    def magnitude(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        """The same layer on |x| and |tensors|: each output's scale for rounding error bounds."""
        return self(x.abs() if x.is_floating_point() else x, {r: t.abs() for r, t in tensors.items()})


def _hidden(tokens: int, features: int, generator: torch.Generator) -> torch.Tensor:
    # Unit-RMS rows, like the normalised hidden states that reach a projection.
    return torch.randn(tokens, features, generator=generator)


@dataclass
class Linear(Layer):
    """``x Wᵀ + b``; with ``fan_in_fan_out`` (transformers' Conv1D) W is stored (in, out)."""

    fan_in_fan_out: bool = False
    weight: str = "weight"
    bias: str = "bias"

    def inputs(self, shapes: Shapes, tokens: int, generator: torch.Generator) -> torch.Tensor:
        w = shapes[self.weight]
        return _hidden(tokens, w[0] if self.fan_in_fan_out else w[-1], generator)

    def __call__(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        w = tensors[self.weight]
        y = x @ w if self.fan_in_fan_out else x @ w.T
        b = tensors.get(self.bias)
        return y if b is None else y + b


@dataclass
class Conv(Layer):
    """Convolution with stride 1, no padding, on inputs two pixels larger than the kernel (so every
    weight meets several input positions). Stride and padding are not in the files, and the layer is
    linear in W for any of them. ``groups`` only where an adapter acts per input channel of a grouped
    convolution (and so knows the count); one group is otherwise as linear in W as the real one."""

    weight: str = "weight"
    bias: str = "bias"
    groups: int = 1

    def inputs(self, shapes: Shapes, tokens: int, generator: torch.Generator) -> torch.Tensor:
        w = shapes[self.weight]
        return torch.randn(tokens, w[1] * self.groups, *(k + 2 for k in w[2:]), generator=generator)

    def __call__(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        w = tensors[self.weight]
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
        return conv(x, w, tensors.get(self.bias), groups=self.groups)


@dataclass
class Embedding(Layer):
    """Row lookup: the inputs are token ids covering the table (and always the ``rows`` an adapter
    changes alone, e.g. trainable tokens, which a sample of a large vocabulary would miss)."""

    weight: str = "weight"
    rows: tuple[int, ...] = ()

    def inputs(self, shapes: Shapes, tokens: int, generator: torch.Generator) -> torch.Tensor:
        rows = shapes[self.weight][0]
        # Every row once if there are few, else a seeded sample: a damaged row cannot hide between draws.
        if rows <= 4096:
            return torch.arange(rows)
        sample = torch.randint(rows, (tokens,), generator=generator)
        return torch.cat([torch.tensor(self.rows, dtype=torch.long), sample])

    def __call__(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        return tensors[self.weight][x]


@dataclass
class Direct(Layer):
    """The tensors themselves, concatenated (norm weights, replaced tensors, anything whose use the
    files do not tell): compared element by element."""

    roles: tuple[str, ...] = ("weight",)

    def inputs(self, shapes: Shapes, tokens: int, generator: torch.Generator) -> torch.Tensor:
        return torch.empty(0)

    def __call__(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        return torch.cat([tensors[r].reshape(-1) for r in self.roles if r in tensors])


@dataclass
class Stacked(Layer):
    """Several layers fed the same input, outputs concatenated (MultiheadAttention's in/out projections)."""

    parts: tuple[Layer, ...]

    def inputs(self, shapes: Shapes, tokens: int, generator: torch.Generator) -> torch.Tensor:
        return self.parts[0].inputs(shapes, tokens, generator)

    def __call__(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        return torch.cat([p(x, tensors).reshape(x.shape[0], -1) for p in self.parts], dim=-1)


@dataclass
class Matrices(Layer):
    """Raw parameters used as matrices (LoRA's ``target_parameters``): each role is a 2-D (out, in)
    weight or a stack of expert matrices, (E, out, in) or, where ``in_first``, (E, in, out). How the
    model's code uses a raw parameter is not in the files; every expert meets the same tokens, cut to
    its own in features, which is linear in the parameter and reaches every element."""

    roles: tuple[str, ...]
    in_first: tuple[bool, ...]

    def in_features(self, shape: tuple[int, ...], in_first: bool) -> int:
        return shape[-2] if in_first and len(shape) == 3 else shape[-1]

    def inputs(self, shapes: Shapes, tokens: int, generator: torch.Generator) -> torch.Tensor:
        width = max(self.in_features(shapes[r], f) for r, f in zip(self.roles, self.in_first))
        return _hidden(tokens, width, generator)

    def part(self, x: torch.Tensor, W: torch.Tensor, in_first: bool) -> torch.Tensor:
        """One parameter's output, (tokens, E·out)."""
        stack = W if W.dim() == 3 else W.unsqueeze(0)
        stack = stack if in_first and W.dim() == 3 else stack.transpose(1, 2)  # (E, in, out)
        return torch.einsum("ti,eio->teo", x[:, : stack.shape[1]], stack).reshape(x.shape[0], -1)

    def __call__(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        return torch.cat([self.part(x, tensors[r], f) for r, f in zip(self.roles, self.in_first)], dim=-1)


def input_side(layer: Layer, x: torch.Tensor, tensors: Tensors,
               transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``layer`` with ``transform`` applied to what each row of W meets: the input rows of a Linear, or
    every flattened input patch of a 2-D ``Conv`` (in the weight's (c, kh, kw) order, the unfolded
    convolution). Input-side adapters (OFT, BOFT, HRA) act there."""
    if not isinstance(layer, Conv):
        return layer(transform(x), tensors)
    w = tensors[layer.weight]
    if w.dim() != 4 or layer.groups != 1:
        raise ValueError(f"input_side covers Linear and ungrouped Conv2d layers, not a {w.dim()}-D weight")
    n, _, height, width = x.shape
    patches = F.unfold(x, w.shape[2:]).transpose(1, 2)  # (n, positions, c·kh·kw)
    y = (transform(patches) @ w.flatten(1).T).transpose(1, 2)
    y = y.reshape(n, w.shape[0], height - w.shape[2] + 1, width - w.shape[3] + 1)
    b = tensors.get(layer.bias)
    return y if b is None else y + b.view(1, -1, 1, 1)


def default_layer(shapes: Shapes) -> Layer:
    """What the weight's rank says: 2-D Linear, 3- to 5-D Conv, anything else compared directly."""
    w = shapes.get("weight")
    if w is None:
        return Direct(tuple(shapes))
    if len(w) == 2:
        return Linear()
    if 3 <= len(w) <= 5:
        return Conv()
    return Direct(tuple(shapes))
