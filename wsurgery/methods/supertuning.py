"""SuperTuning (``peft_type: SUPERTUNING``): sparse fine-tuning of ``nn.Linear`` weights at the
largest (or smallest) magnitudes of W, optionally with a LoRA part ("Supra", ``r`` set).

* ``supertuning_values (k)`` are scatter-added into the **row-major flattened** W at
  ``supertuning_indices (k)`` (int32); repeated positions add up, as ``scatter_add`` does.
* With ``r`` set: ``+ (lora_alpha / r) · supertuning_lora_B.weight (out, r) @ supertuning_lora_A.weight
  (r, in)`` (PEFT defaults ``lora_alpha`` to ``2r``).
* ``save_precomputed_indices=False``: the indices are not saved. PEFT recomputes them when it loads
  the adapter, from the base it is loaded onto: ``topk(|W|.flatten(), int(numel·(1 - sparsity)),
  largest=select_top).indices``, and ``values[j]`` goes to the j-th index of that list. We do the
  same with the same call; the change then depends on W. Ties among the selected ``|W|`` make the
  order, and so which value lands where, depend on topk's tie order (which torch leaves unspecified;
  on CPU it is the same for float32 and bfloat16 inputs): such ties are reported in a note.
  This merge cannot be undone: the merged W no longer tells which entries were the top-k of the base.

With saved indices the change is additive (exact unmerge). Nothing dense is built for the sparse
part: the values are added in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, NotInvertibleError, UnsupportedError
from .base import AdditivePatch, Method, ModuleParams, Patch, Shapes, Support, Tensors, like, register
from .layers import Layer

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig


def _linear(module: str, shapes: Shapes) -> tuple[int, int]:
    w = shapes["weight"]
    if len(w) != 2:
        raise InputError(f"{module}: SuperTuning applies to nn.Linear weights (out, in), but the base weight is "
                         f"{list(w)}; it has no Conv or Embedding layers")
    return w[0], w[1]


class _Lora:
    """The Supra part: ``(alpha / r) · B @ A``."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, alpha: float):
        self.A, self.B, self.alpha = A, B, alpha
        self.r = A.shape[0]
        self.scaling = alpha / self.r

    def check(self, module: str, out: int, inp: int) -> None:
        if self.A.shape[1] != inp or self.B.shape[0] != out:
            raise InputError(f"{module}: supertuning_lora_B.weight {list(self.B.shape)} @ supertuning_lora_A.weight "
                             f"{list(self.A.shape)} does not fit the base weight [{out}, {inp}]")

    def delta(self) -> torch.Tensor:
        return (self.B.to(torch.float32) @ self.A.to(torch.float32)).mul_(self.scaling)


def _forward(x: torch.Tensor, base: Tensors, layer: Layer, indices: torch.Tensor, values: torch.Tensor,
             lora: _Lora | None) -> torch.Tensor:
    """PEFT's ``SupertuningLinear.forward``: ``F.linear(x, W + scatter_add(indices, values), b)`` plus, in Supra
    mode, ``(alpha / r)·lora_B(lora_A(x))``. Here the sparse part on activations: flat position ``p`` of the
    row-major W is (p // in, p % in) and carries ``value · x[:, col]`` to output ``row`` (repeats add up)."""
    inp = base["weight"].shape[1]
    indices = indices.to(x.device)
    y = layer(x, base).index_add(1, indices // inp, x[:, indices % inp] * like(values, x))
    if lora is not None:
        y = y + (x @ like(lora.A, x).T) @ like(lora.B, x).T * lora.scaling
    return y


class SupertuningPatch(AdditivePatch):
    """Saved indices: ``W.flatten()[indices] += values`` (+ the LoRA part). Additive."""

    def __init__(self, module: str, values: torch.Tensor, indices: torch.Tensor, lora: _Lora | None):
        super().__init__(module, ("weight",))
        self.values, self.indices, self.lora = values, indices, lora
        self._shape: tuple[int, int] | None = None

    def check(self, shapes: Shapes) -> None:
        out, inp = _linear(self.module, shapes)
        if self.indices.numel() and int(self.indices.max()) >= out * inp:
            raise InputError(f"{self.module}: supertuning_indices reach flat position {int(self.indices.max())}, "
                             f"outside the base weight {list(shapes['weight'])} ({out * inp} entries); was the "
                             "adapter trained on another model?")
        if self.lora is not None:
            self.lora.check(self.module, out, inp)
        self._shape = (out, inp)

    def _add(self, tensors: Tensors, alpha: float) -> Tensors:
        W = tensors["weight"]
        if self._shape is None:
            self.check({"weight": tuple(W.shape)})
        if not W.is_contiguous():
            W = tensors["weight"] = W.contiguous()
        W.view(-1).index_add_(0, self.indices, self.values.to(W.dtype), alpha=alpha)
        if self.lora is not None:
            W.add_(self.lora.delta().to(W.dtype), alpha=alpha)
        return tensors

    def delta(self) -> Tensors:
        assert self._shape is not None  # derived from the shapes by bind()
        return self._add({"weight": torch.zeros(self._shape, dtype=torch.float32)}, 1.0)

    def add_scaled(self, tensors: Tensors, alpha: float) -> Tensors:
        return self._add(tensors, alpha)  # in place, without a dense ΔW

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        return _forward(x, base, layer, self.indices, self.values, self.lora)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "linear", "entries": self.values.numel(), "indices": "saved"}
        if self.lora is not None:
            d.update(lora_rank=self.lora.r, lora_alpha=self.lora.alpha, lora_scaling=self.lora.scaling)
        return d


class SupertuningTopkPatch(Patch):
    """Indices not saved: recomputed from |W| of the base, as PEFT does when it loads the adapter."""

    def __init__(self, module: str, values: torch.Tensor, sparsity: float, select_top: bool, lora: _Lora | None):
        super().__init__(module, ("weight",))
        self.values, self.sparsity, self.select_top, self.lora = values, sparsity, select_top, lora

    def check(self, shapes: Shapes) -> None:
        out, inp = _linear(self.module, shapes)
        k = int(out * inp * (1 - self.sparsity))  # PEFT's _num_trainable
        if k != self.values.numel():
            raise InputError(f"{self.module}: supertuning_values has {self.values.numel()} entries but sparsity="
                             f"{self.sparsity} of the base weight {list(shapes['weight'])} selects {k}; was the "
                             "adapter trained on another model, or is sparsity in adapter_config.json wrong?")
        if self.lora is not None:
            self.lora.check(self.module, out, inp)

    def indices(self, W: torch.Tensor) -> torch.Tensor:
        scores = W.abs().flatten()
        top = torch.topk(scores, k=self.values.numel(), largest=self.select_top)
        v = top.values
        inside = int((v[1:] == v[:-1]).sum()) if v.numel() > 1 else 0
        edge = v.numel() > 0 and int((scores == v[-1]).sum()) > int((v == v[-1]).sum())
        if inside or edge:
            what = [f"{inside} tie(s) among the selected |W|"] if inside else []
            if edge:
                what.append("a tie at the selection boundary")
            self.notes.append(f"SuperTuning indices recomputed from |W| (not saved): {' and '.join(what)}; which value "
                              "lands on which tied entry follows torch.topk's tie order (PEFT's on CPU)")
        return top.indices

    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        W = tensors["weight"]
        if not W.is_contiguous():
            W = tensors["weight"] = W.contiguous()
        idx = self.indices(W)
        W.view(-1).index_add_(0, idx, self.values.to(W.dtype), alpha=scale)
        if self.lora is not None:
            W.add_(self.lora.delta().to(W.dtype), alpha=scale)
        return tensors

    def apply(self, tensors: Tensors) -> Tensors:
        return self.merge(tensors, 1.0)

    def unmerge(self, tensors: Tensors, scale: float) -> Tensors:
        raise NotInvertibleError(f"{self.module}: {self.why_not_invertible()}")

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """As with saved indices, the indices being PEFT's ``topk(|W|.flatten(), k, largest=select_top)`` of the
        base, taken again here (on the CPU, where the merge takes them: tie order is the device's)."""
        scores = base["weight"].abs().flatten().cpu()
        indices = torch.topk(scores, k=self.values.numel(), largest=self.select_top).indices
        return _forward(x, base, layer, indices, self.values, self.lora)

    def why_not_invertible(self) -> str | None:
        return ("SuperTuning indices were not saved (save_precomputed_indices=false) and were chosen as the top-k of "
                "|W| of the base, which the merged weights no longer show; re-save the adapter with "
                "save_precomputed_indices=True, or merge again from the base checkpoint")

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "linear", "entries": self.values.numel(),
                             "indices": f"recomputed: topk(|W|, largest={self.select_top})", "sparsity": self.sparsity}
        if self.lora is not None:
            d.update(lora_rank=self.lora.r, lora_alpha=self.lora.alpha, lora_scaling=self.lora.scaling)
        return d


@register
class Supertuning(Method):
    peft_types = ("SUPERTUNING",)
    param_names = frozenset({"supertuning_values", "supertuning_indices", "supertuning_lora_A",
                             "supertuning_lora_B"})
    support = (
        Support("SuperTuning, saved indices (incl. Supra LoRA part)", "Linear", "exact", "exact", "0.21.2"),
        Support("SuperTuning, save_precomputed_indices=false", "Linear",
                "exact (indices recomputed as PEFT: topk of |W|)",
                "refused: the indices came from the base W, which the merged W no longer shows", "0.21.2"),
    )

    def check_config(self, config: AdapterConfig) -> None:
        sparsity = config.get("sparsity", 0.99)
        if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise InputError(f"{config.path}: sparsity={sparsity!r}; PEFT requires 0 <= sparsity < 1")
        r = config.get("r")
        if r is not None and (not isinstance(r, int) or r <= 0):
            raise InputError(f"{config.path}: r={r!r}; PEFT requires a positive integer or null")

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        r = config.get("r")
        return {"sparsity": config.get("sparsity", 0.99), "select_top": config.get("select_top", True),
                "indices_saved": bool(config.get("save_precomputed_indices", True)), "r": r,
                "lora_alpha": self._alpha(config) if r is not None else None}

    @staticmethod
    def _alpha(config: AdapterConfig) -> float:
        alpha = config.get("lora_alpha")
        return float(2 * config.get("r") if alpha is None else alpha)

    def patch(self, params: ModuleParams) -> Patch:
        config, t = params.config, params.tensors
        where = f"{config.path.parent}: module {params.module!r}"
        (values,) = params.require("supertuning_values")
        if values.ndim != 1 or not values.is_floating_point():
            raise InputError(f"{where}: supertuning_values is {list(values.shape)} {values.dtype}; expected a 1-d "
                             "float tensor")
        lora = None
        r = config.get("r")
        has_lora = "supertuning_lora_A.weight" in t or "supertuning_lora_B.weight" in t
        if r is not None or has_lora:
            if r is None:
                raise InputError(f"{where}: the file holds supertuning_lora_A/B but r is null in adapter_config.json; "
                                 "the adapter file and its config disagree")
            A, B = params.require("supertuning_lora_A.weight", "supertuning_lora_B.weight")
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
                raise InputError(f"{where}: supertuning_lora_A.weight is {list(A.shape)} and supertuning_lora_B.weight "
                                 f"{list(B.shape)}; expected (r={r}, in) and (out, r={r})")
            lora = _Lora(A, B, self._alpha(config))
        saved = bool(config.get("save_precomputed_indices", True))
        if not saved:
            if "supertuning_indices" in t:
                raise UnsupportedError(
                    f"{where}: the file holds supertuning_indices but adapter_config.json says "
                    "save_precomputed_indices=false, so PEFT would ignore them and recompute the indices from |W|; "
                    "fix save_precomputed_indices in the config to say which is meant")
            return SupertuningTopkPatch(params.module, values, float(config.get("sparsity", 0.99)),
                                        bool(config.get("select_top", True)), lora)
        (indices,) = params.require("supertuning_indices")
        if indices.shape != values.shape:
            raise InputError(f"{where}: supertuning_indices is {list(indices.shape)} but supertuning_values is "
                             f"{list(values.shape)}; the adapter file is inconsistent")
        if indices.is_floating_point():
            raise InputError(f"{where}: supertuning_indices is {indices.dtype}, expected integers")
        idx = indices.to(torch.int64)
        if idx.numel() and int(idx.min()) < 0:
            raise InputError(f"{where}: supertuning_indices hold negative positions; the file is damaged")
        return SupertuningPatch(params.module, values, idx, lora)
