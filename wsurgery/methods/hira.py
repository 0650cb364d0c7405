"""HiRA (``peft_type: HIRA``): a Hadamard high-rank update ``W' = W + W ⊙ ΔW`` with ``ΔW = B·A``.

* Linear: ``hira_A (r, in)``, ``hira_B (out, r)``, ``ΔW = B A`` (out, in); transformers' Conv1D stores
  W as (in, out), so ``ΔW`` is transposed there. No scaling factor.
* Embedding: ``hira_embedding_A (r, V)``, ``hira_embedding_B (d, r)``, ``ΔE = (B A)ᵀ`` (V, d).
* Conv1d/2d/3d (groups = 1): A and B shaped like LoRA's, ``hira_A (r, in, k…)``, ``hira_B (out, r, 1…)``;
  ``ΔW[o, i, k…] = Σ_r B[o, r] A[r, i, k…]`` (PEFT gets the same by a convolution).

The change depends on W but is an elementwise scale ``W' = W ⊙ (1 + ΔW)``: unmerge divides by
``1 + ΔW`` exactly, and is refused where ``1 + ΔW = 0`` (the merge zeroed those weights). PEFT itself
unmerges from a cached copy of the base. The factor ``1 + ΔW`` is formed in float64 and rounded once:
in float32, where ``ΔW ≈ -1`` the sum cancels to a few significant bits, and dividing by it would
amplify that error (3e-5 relative on a Conv3d before).

Linear or Conv1D: PEFT picks the layout from the layer's type, not from ``fan_in_fan_out`` in the
saved config (it warns and overrides the flag). A tensor tool sees only shapes: a non-square weight
tells by its shape; a square one follows the other 2-D modules of the same adapter when they all
agree, else the config's ``fan_in_fan_out``; when they disagree (a model mixing nn.Linear and
Conv1D) a square weight is refused rather than guessed. DEFT, IA3, LoRA, AdaLoRA, VeRA, PVeRA, VB-LoRA,
UniLoRA, GraLoRA and FRoD share this rule (:class:`Layout`, :class:`ShapeLayout`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import InputError, NotInvertibleError
from .base import (
    AdapterContext,
    Method,
    ModuleParams,
    Patch,
    Shapes,
    Support,
    Tensors,
    register,
)
from .layers import Conv, Embedding, Layer, Linear

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

# 1 + ΔW smaller than this makes an unmerge amplify the merged file's rounding by more than 1/this.
_AMPLIFICATION_NOTE = 1e-2


class Layout:
    """Whether each 2-D weight of one adapter is stored (out, in) like nn.Linear or (in, out) like Conv1D.

    ``check`` calls ``observe`` for every module before any ``apply``: non-square weights are evidence,
    square ones are decided once all evidence is in (``transposed``), and refused during the checks
    when the evidence is mixed (``observe`` raises for any square module already seen, or seen later).
    """

    def __init__(self, method: str, fan_in_fan_out: bool):
        self.method, self.fan_in_fan_out = method, fan_in_fan_out
        self.evidence: dict[bool, list[str]] = {False: [], True: []}  # transposed? -> modules
        self.square: list[str] = []

    @staticmethod
    def of(context: AdapterContext, method: str, fan_in_fan_out: bool) -> Layout:
        key = f"{method.lower()}_layout"
        if key not in context.cache:
            context.cache[key] = Layout(method, fan_in_fan_out)
        return context.cache[key]

    def observe(self, module: str, transposed: bool | None) -> None:
        """``transposed`` as the shapes say, or None for a square weight (decided later)."""
        if transposed is None:
            if module not in self.square:
                self.square.append(module)
        elif module not in self.evidence[transposed]:
            self.evidence[transposed].append(module)
        if self.square and self.evidence[False] and self.evidence[True]:
            raise InputError(
                f"{self.square[0]}: its {self.method} weight is square, and this adapter's other modules are stored "
                f"both (out, in) like nn.Linear (e.g. {self.evidence[False][0]}) and (in, out) like Conv1D (e.g. "
                f"{self.evidence[True][0]}); PEFT picks the layout by layer type, which the files do not record, so "
                "wsurgery cannot tell how to apply the change to this module")

    def transposed(self, module: str, by_shape: bool | None) -> bool:
        if by_shape is not None:
            return by_shape
        if self.evidence[True] and not self.evidence[False]:
            return True
        if self.evidence[False] and not self.evidence[True]:
            return False
        return self.fan_in_fan_out

    @staticmethod
    def by_shape(weight: tuple[int, ...], out: int, inp: int | None) -> bool | None:
        """True/False where the shape decides, None where it cannot (square), raise nothing (callers check)."""
        if inp is None:  # only out is known (DEFT's PaRa): the axis of length out
            if weight[0] == out and weight[1] != out:
                return False
            if weight[1] == out and weight[0] != out:
                return True
            return None
        if out == inp:
            return None
        return tuple(weight) == (inp, out)


class ShapeLayout:
    """For patches whose change is (out, in) on a Linear or Conv1D weight: ``transposed`` as the base shape
    says, a square weight as the adapter's ``Layout`` decides. Call ``observe_shape`` in ``check``."""

    module: str
    layout: Layout
    _by_shape: bool | None = None

    @property
    def transposed(self) -> bool:
        return self.layout.transposed(self.module, self._by_shape)

    def observe_shape(self, weight: tuple[int, ...], out: int, inp: int) -> None:
        """Record the layout the shape shows; a shape that fits neither is left to the caller's check."""
        if tuple(weight) in ((out, inp), (inp, out)):
            self._by_shape = Layout.by_shape(weight, out, inp)
            self.layout.observe(self.module, self._by_shape)


class HiraPatch(Patch):
    """W' = W + W ⊙ ΔW, ΔW = B·A in the layout the base stores."""

    def __init__(self, module: str, kind: str, A: torch.Tensor, B: torch.Tensor, layout: Layout):
        super().__init__(module, ("weight",))
        self.kind, self.A, self.B, self.layout = kind, A, B, layout
        self.rank = A.shape[0]
        self._by_shape: bool | None = None  # Linear/Conv1D: transposed as the base shape says (None: square)
        self._checked = False
        self._zeros: int | None = None

    def logical_shape(self) -> tuple[int, ...]:
        """The weight shape PEFT's layer has (out, in[, k…]); (V, d) for embeddings."""
        if self.kind == "embedding":  # A (r, V), B (d, r)
            return (self.A.shape[1], self.B.shape[0])
        if self.kind == "conv":  # A (r, in, k...), B (out, r, 1...)
            return (self.B.shape[0], *self.A.shape[1:])
        return (self.B.shape[0], self.A.shape[1])

    def check(self, shapes: Shapes) -> None:
        w = tuple(shapes["weight"])
        want = self.logical_shape()
        if self.kind == "linear":
            out, inp = want
            ok = len(w) == 2 and w in ((out, inp), (inp, out))
        else:
            ok = w == want
        if not ok:
            what = {"embedding": "an embedding (V, d)", "conv": "a convolution (out, in, k...)",
                    "linear": "a linear layer (out, in), or (in, out) for Conv1D"}[self.kind]
            grouped = (self.kind == "conv" and len(w) == len(want) and w[0] == want[0] and w[2:] == want[2:])
            hint = " (HiRA does not support grouped convolutions)" if grouped else ""
            raise InputError(f"{self.module}: hira_B·hira_A gives {list(want)} for {what}, but the base weight is "
                             f"{list(w)}{hint}; was the adapter trained on another model?")
        if self.kind == "linear":
            self._by_shape = Layout.by_shape(w, *want)
            self.layout.observe(self.module, self._by_shape)
        if self.kind == "conv" and len(w) == 5 and w[2:4] == (1, 1) and not self._checked:
            self.notes.append(f"a Conv3d kernel {list(w[2:])}: PEFT 0.21.2's HiRA fails on it (its 1x1 shortcut "
                              "squeezes the wrong axes), so no PEFT result exists to compare with; merged with the "
                              "formula PEFT uses for every other kernel, ΔW[o,i,k] = Σ_r B[o,r]·A[r,i,k]")
        self._checked = True

    def transposed(self) -> bool:
        return self.kind == "linear" and self.layout.transposed(self.module, self._by_shape)

    def product(self) -> torch.Tensor:
        """B·A in float64, in PEFT's logical layout ((out, in[, k…]), or (d, V) for embeddings)."""
        A = self.A.to(torch.float64)
        B = self.B.to(torch.float64)
        if self.kind == "conv":
            return torch.einsum("or,ri...->oi...", B.flatten(1), A)
        return B @ A

    def factor(self, dtype: torch.dtype) -> torch.Tensor:
        """1 + ΔW laid out like W, summed in float64 and rounded once to ``dtype`` (see the module docstring)."""
        f = self.product().add_(1.0)
        if self.kind == "embedding" or self.transposed():
            f = f.T
        return f.to(dtype)

    def apply(self, tensors: Tensors) -> Tensors:
        W = tensors["weight"]
        return {"weight": W.mul_(self.factor(W.dtype))}  # W + W ⊙ ΔW, as PEFT adds it

    def zero_factors(self) -> int:
        """How many elements of 1 + ΔW are 0 (those weights were wiped by the merge); layout-free."""
        if self._zeros is None:
            self._zeros = int((self.product() == -1).sum())
        return self._zeros

    def why_not_invertible(self) -> str | None:
        zeros = self.zero_factors()
        if zeros:
            return (f"1 + hira_B·hira_A is 0 for {zeros} weight element(s), so the merge set them to 0 and they "
                    "cannot be divided back; only the base checkpoint can restore them")
        return None

    def revert(self, tensors: Tensors) -> Tensors:
        reason = self.why_not_invertible()
        if reason is not None:
            raise NotInvertibleError(f"{self.module}: {reason}")
        W = tensors["weight"]
        factor = self.factor(W.dtype)
        smallest = float(factor.abs().min()) if factor.numel() else 1.0
        if smallest < _AMPLIFICATION_NOTE:
            self.notes.append(f"HiRA unmerge divides by 1 + hira_B·hira_A, whose smallest magnitude is "
                              f"{smallest:.3g}: the merged file's rounding grows by up to {1 / smallest:.3g}x there")
        return {"weight": W.div_(factor)}

    def layer(self, shapes: Shapes) -> Layer:
        if self.kind == "embedding":
            return Embedding()
        if self.kind == "conv":
            return Conv()
        return Linear(self.transposed())

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's HiRA forward: ``base_layer(x)`` plus the same layer run without bias on ``W ⊙ (B A)``, the
        modulation laid out like W (Linear/Conv1D ``transpose(B A)``, embedding ``(B A)ᵀ``, conv PEFT's
        ``conv(Aᵀ, B)ᵀ``, a 1x1 convolution of A by B). Run in float64: where B A ≈ -1 the two terms cancel, and
        a float32 sum would be less exact than the merge it checks (an embedding row has no sum to dilute it)."""
        base = {r: t.double() for r, t in base.items()}
        x = x.double() if x.is_floating_point() else x
        W = base["weight"]
        A, B = self.A.to(W), self.B.to(W)
        if self.kind == "conv":
            conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[A.dim()]
            modulation = conv(A.transpose(0, 1), B).transpose(0, 1)
        else:
            modulation = B @ A
            if self.kind == "embedding" or self.transposed():
                modulation = modulation.T
        return (layer(x, base) + layer(x, {"weight": W * modulation})).float()

    def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"kind": self.kind, "rank": self.rank}
        if self.kind == "linear" and self._checked:
            facts["layout"] = "(in, out) Conv1D" if self.transposed() else "(out, in) Linear"
        return facts


@register
class Hira(Method):
    peft_types = ("HIRA",)
    param_names = frozenset({"hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"})
    support = (
        Support("HiRA (Hadamard high-rank: W + W⊙BA)", "Linear, Conv1D, Embedding, Conv1d/2d/3d", "exact",
                "exact division by 1 + BA (refused where 1 + BA = 0)", "0.21.2"),
    )

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"update": "W + W⊙(B·A)", "fan_in_fan_out": bool(config.get("fan_in_fan_out", False))}

    def patch(self, params: ModuleParams) -> Patch:
        t = params.tensors
        if "hira_embedding_A" in t or "hira_embedding_B" in t:
            A, B = params.require("hira_embedding_A", "hira_embedding_B")
            kind = "embedding"
            ok = A.ndim == 2 and B.ndim == 2 and B.shape[1] == A.shape[0]
        else:
            A, B = params.require("hira_A", "hira_B")
            kind = "conv" if A.ndim > 2 else "linear"
            ok = B.ndim == A.ndim and B.shape[1] == A.shape[0] and all(s == 1 for s in B.shape[2:])
        if not ok or A.shape[0] == 0:
            raise InputError(f"{params.config.path.parent}: module {params.module!r}: hira A is {list(A.shape)} and "
                             f"hira B is {list(B.shape)}, which do not multiply; the adapter file is inconsistent")
        layout = Layout.of(params.context, "HiRA", bool(params.config.get("fan_in_fan_out", False)))
        return HiraPatch(params.module, kind, A, B, layout)
