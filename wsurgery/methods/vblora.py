"""VB-LoRA (``peft_type: VBLORA``): LoRA factors assembled from a shared bank of short vectors.

``base_model.vblora_vector_bank`` is ``(N, L)`` (``num_vectors`` x ``vector_length``), shared by all
layers. Each layer saves logits over the bank for every length-``L`` piece of its factors:
``vblora_logits_A (r, in/L, N)`` and ``vblora_logits_B (out/L, r, N)``. Exactly as PEFT 0.21.2:

* ``mix(logits) = Σ softmax(top-k logits) · bank[top-k indices]`` (``topk`` from the config), over N;
* ``A = mix(logits_A).reshape(r, in)``, ``B = mix(logits_B).transpose(1, 2).reshape(out, r)``;
* ``ΔW = Tf(B @ A)`` (transposed for transformers' Conv1D, ``fan_in_fan_out``); no scaling.

With ``save_only_topk_weights=True`` PEFT saves ``vblora_logits_X_topk_indices (…, k)`` and
``vblora_logits_X_topk_weights (…, k−1)`` (already softmax probabilities, the smallest one left out).
On load PEFT rebuilds the logits as ``log([w, 1 − Σw])`` scattered into a row of ``−inf`` and merges
from those; we do the same, so the top-k order and the renormalising softmax match bit for bit.

Additive: unmerge subtracts the same ΔW.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, UnsupportedError
from .base import (
    AdditivePatch,
    Method,
    ModuleParams,
    Patch,
    Shapes,
    Support,
    Tensors,
    expect_shape,
    like,
    register,
)
from .hira import Layout, ShapeLayout
from .layers import Layer, Linear

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

BANK = "vblora_vector_bank"
_FACTORS = ("vblora_logits_A", "vblora_logits_B")


def logits_from_topk(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """PEFT's ``_remap_adapter_state_dict_for_load``: dense logits from the saved top-k format."""
    w = weights.to(torch.float32)
    w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)
    dense = torch.full([*w.shape[:-1], num_vectors], float("-inf"), dtype=torch.float32)
    return dense.scatter(-1, indices.to(torch.long), torch.log(w))


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """``Σ softmax(top-k logits)·bank[idx]`` over the last axis: (…, N) -> (…, L)."""
    values, idx = logits.topk(topk, dim=-1)
    weights = torch.softmax(values, dim=-1)
    return (weights.unsqueeze(-1) * bank[idx]).sum(-2)


class VBLoraPatch(ShapeLayout, AdditivePatch):
    """ΔW = Tf(B @ A) with A, B mixed from the shared vector bank; Linear or Conv1D as the base shape says."""

    def __init__(self, module: str, logits_A: torch.Tensor, logits_B: torch.Tensor, bank: torch.Tensor, topk: int,
                 layout: Layout, stored: str):
        super().__init__(module, ("weight",))
        self.logits_A, self.logits_B, self.bank = logits_A, logits_B, bank
        self.topk, self.layout, self.stored = topk, layout, stored
        self.rank = logits_A.shape[0]
        L = bank.shape[1]
        self.out_in = (logits_B.shape[0] * L, logits_A.shape[1] * L)

    def check(self, shapes: Shapes) -> None:
        self.observe_shape(shapes["weight"], *self.out_in)
        expect_shape(self.module, "VB-LoRA's change", self.out_in[::-1] if self.transposed else self.out_in,
                     shapes["weight"], f" (logits {list(self.logits_B.shape)} / {list(self.logits_A.shape)}, "
                                       f"vector_length {self.bank.shape[1]})")

    def delta(self) -> Tensors:
        bank = self.bank.to(torch.float32)
        A = mix(self.logits_A.to(torch.float32), bank, self.topk).reshape(self.rank, -1)
        B = mix(self.logits_B.to(torch.float32), bank, self.topk).transpose(1, 2).reshape(-1, self.rank)
        d = B @ A
        return {"weight": d.T if self.transposed else d}

    def layer(self, shapes: Shapes) -> Layer:
        return Linear(self.transposed)

    def forward(self, x: torch.Tensor, base: Tensors, layer: Layer) -> torch.Tensor:
        """PEFT's ``base(x) + F.linear(F.linear(x, A), B)`` with A, B mixed from the bank (``_get_lora_matrices``;
        ``mix`` is that parameterisation, shared with the merge)."""
        bank = like(self.bank, x)
        A = mix(like(self.logits_A, x), bank, self.topk).reshape(self.rank, -1)
        B = mix(like(self.logits_B, x), bank, self.topk).transpose(1, 2).reshape(-1, self.rank)
        return layer(x, base) + (x @ A.T) @ B.T

    def describe(self) -> dict[str, Any]:
        return {"kind": "conv1d_transposed" if self.transposed else "linear", "rank": self.rank, "topk": self.topk,
                "num_vectors": self.bank.shape[0], "vector_length": self.bank.shape[1], "stored": self.stored}


def _int_config(config: AdapterConfig, name: str, default: int) -> int:
    value = config.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UnsupportedError(f"{config.path}: {name} must be a positive integer, got {value!r}")
    return value


@register
class VBLora(Method):
    peft_types = ("VBLORA",)
    param_names = frozenset({*_FACTORS, *(f"{f}_topk_{s}" for f in _FACTORS for s in ("indices", "weights"))})
    shared_names = frozenset({BANK})
    support = (Support("VB-LoRA (full logits or save_only_topk_weights)", "Linear, Conv1D (fan_in_fan_out)",
                       "exact", "exact", "0.21.2"),)

    def check_config(self, config: AdapterConfig) -> None:
        _int_config(config, "topk", 2)

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"topk": config.get("topk", 2), "num_vectors": config.get("num_vectors"),
                "vector_length": config.get("vector_length"),
                "save_only_topk_weights": bool(config.get("save_only_topk_weights", False)),
                "fan_in_fan_out": bool(config.get("fan_in_fan_out", False))}

    def patch(self, params: ModuleParams) -> Patch:
        config, where = params.config, f"{params.config.path.parent}: module {params.module!r}"
        shared = params.context.shared
        if BANK not in shared:
            raise InputError(f"{config.path.parent}: the adapter file has no base_model.{BANK}, which every VB-LoRA "
                             "layer mixes its factors from; the file is incomplete")
        bank = shared[BANK]
        if bank.ndim != 2 or not bank.is_floating_point():
            raise InputError(f"{config.path.parent}: base_model.{BANK} must be a 2-D float tensor (num_vectors, "
                             f"vector_length), got {list(bank.shape)} {bank.dtype}")
        N = bank.shape[0]
        topk = _int_config(config, "topk", 2)
        if topk > N:
            raise InputError(f"{where}: topk={topk} but the vector bank has only {N} vectors")
        logits, stored = [], "logits"
        for name in _FACTORS:
            if f"{name}_topk_indices" in params.tensors or f"{name}_topk_weights" in params.tensors:
                idx, w = params.require(f"{name}_topk_indices", f"{name}_topk_weights")
                stored = "top-k indices and weights"
                if idx.ndim != 3 or w.shape != (*idx.shape[:-1], idx.shape[-1] - 1) or idx.is_floating_point():
                    raise InputError(f"{where}: {name}_topk_indices {list(idx.shape)} and {name}_topk_weights "
                                     f"{list(w.shape)} do not fit (the weights have one entry fewer per row)")
                if idx.shape[-1] != topk:
                    raise InputError(f"{where}: {name}_topk_indices keeps {idx.shape[-1]} vectors per piece but "
                                     f"adapter_config.json says topk={topk}; the adapter file and its config disagree")
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= N):
                    raise InputError(f"{where}: {name}_topk_indices point outside the vector bank of {N} vectors")
                dense = logits_from_topk(idx, w, N)
                if torch.isnan(dense).any():
                    raise InputError(f"{where}: the saved {name}_topk_weights sum to more than 1, so the implied last "
                                     "weight 1 - Σw is negative; PEFT would merge NaN weights from this file")
                logits.append(dense)
            else:
                (t,) = params.require(name)
                if t.ndim != 3 or t.shape[-1] != N or not t.is_floating_point():
                    raise InputError(f"{where}: {name} is {list(t.shape)} {t.dtype}, expected a float tensor with "
                                     f"{N} logits (one per bank vector) in its last axis")
                logits.append(t)
        logits_A, logits_B = logits
        if logits_B.shape[1] != logits_A.shape[0] or logits_A.shape[0] == 0:
            raise InputError(f"{where}: vblora_logits_A {list(logits_A.shape)} and vblora_logits_B "
                             f"{list(logits_B.shape)} disagree on the rank; the adapter file is inconsistent")
        layout = Layout.of(params.context, "VB-LoRA", bool(config.get("fan_in_fan_out", False)))
        return VBLoraPatch(params.module, logits_A, logits_B, bank, topk, layout, stored)
