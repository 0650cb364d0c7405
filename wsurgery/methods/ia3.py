"""(IA)³ (``peft_type: IA3``): a learned per-feature scale ``ia3_l`` folded into the weight.

* Feed-forward modules (``feedforward_modules``) scale their *inputs*: ``ia3_l`` is ``(1, in)`` and
  multiplies the columns of a Linear weight (the rows of a transposed Conv1D weight, the input
  channels of a convolution, expanded per group for grouped convolutions). The bias is unchanged.
* Other ("attention") modules scale their *outputs*: ``ia3_l`` is ``(out, 1)`` and multiplies the
  rows of W (columns of a Conv1D weight, output channels of a convolution) **and the bias**.
* Convolutions store ``(1, C, 1, 1[, 1])`` either way, so the feed-forward rule of the config decides:
  a regex string must fully match the module path, a list entry must be a suffix of it (plain
  ``endswith``, as PEFT does).

Linear or Conv1D: PEFT picks the layout from the layer's type and overwrites ``fan_in_fan_out`` in the
config with each layer it wraps, so the saved flag is the last layer's (wrong for the Conv1D layers of a
model that also has targeted nn.Linear layers). The shapes decide instead, and a square weight follows
the adapter's other modules, as for HiRA (:class:`~wsurgery.methods.hira.Layout`).

Unmerge divides by ``l`` exactly. PEFT divides by ``l + 1e-8``, which in float32 equals ``l`` wherever
``|l| ≳ 0.17``; elsewhere our result is the true inverse and PEFT's is not. A scale of exactly 0 wiped
its row/column, which cannot be undone: such an unmerge is refused.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import InputError, NotInvertibleError
from .base import Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .hira import Layout
from .layers import Conv, Layer, Linear


def is_feedforward(config, module: str) -> bool:
    """PEFT's ``IA3Model._check_target_module_feedforward``."""
    ff = config.raw.get("feedforward_modules")
    if ff is None:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module.endswith(key) for key in ff)


class Ia3Patch(Patch):
    def __init__(self, module: str, l: torch.Tensor, feedforward: bool, layout: Layout):
        super().__init__(module, ("weight",), optional_roles=() if feedforward else ("bias",))
        self.l, self.feedforward, self.layout = l, feedforward, layout
        self._by_shape: bool | None = None  # 2-D: stored (in, out) like Conv1D, as the shape says (None: square)
        self._weight_shape: tuple[int, ...] | None = None

    @property
    def kind(self) -> str:
        if self.l.ndim > 2:
            return "conv"
        return "conv1d_transposed" if self.layout.transposed(self.module, self._by_shape) else "linear"

    @property
    def scales(self) -> torch.Tensor:
        return self.l.flatten()

    # -- validation ------------------------------------------------------------------------------
    def check(self, shapes: Shapes) -> None:
        w = shapes["weight"]
        n = self.scales.numel()
        where = f"{self.module}: ia3_l is {list(self.l.shape)}"
        side = "input" if self.feedforward else "output"
        if self.kind == "conv":
            if len(w) != self.l.ndim:
                raise InputError(f"{where} (a {self.l.ndim - 2}-d convolution's) but the base weight is {list(w)}")
            if self.feedforward:
                ok = w[1] > 0 and n % w[1] == 0 and w[0] % (n // w[1]) == 0  # in = groups · in/groups
            else:
                ok = w[0] == n
        else:
            if len(w) != 2:
                raise InputError(f"{where} (a linear layer's) but the base weight is {list(w)}")
            linear_axis = 1 if self.feedforward else 0  # nn.Linear stores (out, in), Conv1D (in, out)
            as_linear, as_conv1d = w[linear_axis] == n, w[1 - linear_axis] == n
            ok = as_linear or as_conv1d
            if ok:
                self._by_shape = None if as_linear and as_conv1d else as_conv1d
                self.layout.observe(self.module, self._by_shape)
        if not ok:
            raise InputError(f"{where}, one scale per {side} feature ({'feed-forward' if self.feedforward else 'not'} "
                             f"in feedforward_modules), but the base weight is {list(w)}; was the adapter trained on "
                             "another model, or does feedforward_modules not match the one used for training?")
        if "bias" in shapes and shapes["bias"] != (n,):
            raise InputError(f"{where} but the base bias is {list(shapes['bias'])}")
        self._weight_shape = tuple(w)

    # -- the scale, shaped to broadcast against each role ------------------------------------------
    def _factor(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        s = self.scales.to(dtype)
        if role == "bias":
            return s
        if self.kind == "conv":
            rest = (1,) * (len(shape) - 2)
            if not self.feedforward:
                return s.view(-1, 1, *rest)
            groups = s.numel() // shape[1]
            # input channel j of group k scales column j of the output channels of group k
            per_group = s.view(groups, 1, shape[1])
            full = per_group.expand(groups, shape[0] // groups, shape[1]).reshape(shape[0], shape[1])
            return full.view(shape[0], shape[1], *rest)
        rows = self.feedforward == (self.kind == "conv1d_transposed")  # the scaled features are rows of W
        return s.view(-1, 1) if rows else s.view(1, -1)

    def apply(self, tensors: Tensors) -> Tensors:
        return {role: t.mul_(self._factor(role, tuple(t.shape), t.dtype)) for role, t in tensors.items()}

    def revert(self, tensors: Tensors) -> Tensors:
        reason = self.why_not_invertible()
        if reason is not None:
            raise NotInvertibleError(f"{self.module}: {reason}")
        s = self.scales.to(torch.float32)
        peft = s + 1e-8
        differ = int((peft != s).sum())
        if differ:
            rel = float(((1 / s.double() - 1 / peft.double()) * s.double()).abs().max())
            self.notes.append(f"IA3 unmerge divided by ia3_l exactly; PEFT's unmerge divides by ia3_l + 1e-8, which "
                              f"differs for {differ} small scale(s) (up to {rel:.2g} relative)")
        return {role: t.div_(self._factor(role, tuple(t.shape), t.dtype)) for role, t in tensors.items()}

    def why_not_invertible(self) -> str | None:
        s = self.scales
        zero = (s == 0) | ~torch.isfinite(s)
        if bool(zero.any()):
            i = int(zero.nonzero()[0, 0])
            side = "input" if self.feedforward else "output"
            return (f"ia3_l is 0 (or not finite) for {int(zero.sum())} {side} feature(s) (e.g. index {i}); the merge "
                    "zeroed their weights, so only the base checkpoint can restore them")
        return None

    # -- the unmerged forward path, for verify ---------------------------------------------------------
    def layer(self, shapes: Shapes) -> Layer:
        if self.kind == "conv":
            # A feed-forward scale covers every input channel of a grouped convolution: in = groups · w[1].
            w = shapes["weight"]
            return Conv(groups=self.scales.numel() // w[1] if self.feedforward else 1)
        return Linear(self.kind == "conv1d_transposed")

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``IA3Layer.forward``: feed-forward ``base_layer(x · l)``, else ``base_layer(x) · l`` (the bias
        included); ``l`` is ``(1, C, 1, ...)`` for a convolution, which broadcasts over channels as it is."""
        scale = like(self.l, x)
        if self.kind != "conv":
            scale = scale.flatten()
        return layer(x * scale, base) if self.feedforward else layer(x, base) * scale

    def describe(self) -> dict[str, Any]:
        s = self.scales.float()
        return {"kind": self.kind, "feedforward": self.feedforward, "features": s.numel(),
                "scale_min": float(s.min()), "scale_max": float(s.max()), "scales_bias": not self.feedforward}


@register
class Ia3(Method):
    peft_types = ("IA3",)
    param_names = frozenset({"ia3_l"})
    support = (Support("IA3 (feed-forward and attention side)", "Linear, Conv1D, Conv2d/3d", "exact",
                       "exact division (refused where a scale is 0)", "0.21.2"),)

    def summary(self, config) -> dict[str, Any]:
        return {"feedforward_modules": config.raw.get("feedforward_modules"),
                "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
                "rule": "feed-forward: W·diag(l) (inputs); others: diag(l)·W and b·l (outputs)"}

    def patch(self, params: ModuleParams) -> Patch:
        config = params.config
        (l,) = params.require("ia3_l")
        where = f"{config.path.parent}: module {params.module!r}"
        ff = is_feedforward(config, params.module)
        if l.ndim < 2 or l.numel() == 0:
            raise InputError(f"{where}: ia3_l has shape {list(l.shape)}; expected (out, 1), (1, in) or (1, C, 1, ...)")
        if l.ndim == 2:
            # PEFT sized the vector by the same feed-forward rule: (1, in) if feed-forward, else (out, 1).
            if (ff and l.shape[0] != 1) or (not ff and l.shape[1] != 1):
                raise InputError(f"{where}: ia3_l is {list(l.shape)}, the shape of a "
                                 f"{'non-' if ff else ''}feed-forward layer, but feedforward_modules in "
                                 f"adapter_config.json says the module is {'' if ff else 'not '}feed-forward")
        elif l.shape[0] != 1 or any(d != 1 for d in l.shape[2:]):
            raise InputError(f"{where}: ia3_l is {list(l.shape)}; a convolution's must be (1, C, 1, ...)")
        layout = Layout.of(params.context, "IA3", bool(config.get("fan_in_fan_out", False)))
        return Ia3Patch(params.module, l, ff, layout)
