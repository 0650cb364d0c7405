"""LoRA (``peft_type: LORA``) with rsLoRA, rank/alpha patterns, ``lora_bias`` and DoRA, on Linear,
transformers' Conv1D (``fan_in_fan_out``), Embedding and Conv1d/2d/3d.

ΔW = s·B·A with s = α/r (α/√r with rsLoRA); r is read from the tensor shapes, α from
``alpha_pattern`` or ``lora_alpha``. DoRA renormalises each output feature of W + ΔW to the saved
magnitude, so its change depends on W and cannot be undone from the files.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError, UnsupportedError
from .base import AdditivePatch, Method, ModuleParams, Patch, Shapes, Support, Tensors, register

if TYPE_CHECKING:  # adapters import methods; the config is only needed for type hints here
    from ..adapters.config import AdapterConfig

# Inits that modify the base weight at the start of training: the saved adapter is relative to a
# different W, unless PEFT converted it on save (then init_lora_weights is reset to True).
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Options with no weight-space merge in PEFT itself.
_NO_MERGE_OPTIONS = {
    "use_qalora": "QA-LoRA's A acts on group-pooled inputs; PEFT cannot merge it either",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens, which depends on the input",
    "arrow_config": "Arrow routes each token between several LoRAs at run time",
}
# Options this release does not cover yet; refusing beats a silently wrong merge.
_NOT_YET = ("use_bdlora", "kasa_config", "target_parameters", "layer_replication")


class LoraPatch(AdditivePatch):
    """ΔW = s·B·A in the layout the base stores (transposed for Conv1D, (V, d) for embeddings)."""

    def __init__(self, module: str, kind: str, A: torch.Tensor, B: torch.Tensor, alpha: float, scaling: float,
                 bias: torch.Tensor | None = None):
        super().__init__(module, ("weight", "bias") if bias is not None else ("weight",))
        self.kind, self.A, self.B, self.alpha, self.scaling, self.bias = kind, A, B, alpha, scaling, bias
        self.rank = A.shape[0]

    def weight_shape(self) -> tuple[int, ...]:
        A, B = self.A, self.B
        if self.kind == "embedding":  # A (r, V), B (d, r)
            return (A.shape[1], B.shape[0])
        if self.kind == "conv":  # A (r, in, k...), B (out, r, 1...)
            return (B.shape[0], *A.shape[1:])
        out_in = (B.shape[0], A.shape[1])
        return out_in[::-1] if self.kind == "conv1d_transposed" else out_in

    def check(self, shapes: Shapes) -> None:
        want = self.weight_shape()
        if shapes["weight"] != want:
            hint = ""
            if shapes["weight"] == want[::-1]:
                hint = " (transposed: is fan_in_fan_out set right in adapter_config.json?)"
            raise InputError(
                f"{self.module}: the adapter's change has shape {list(want)} but the base weight is "
                f"{list(shapes['weight'])}{hint}; was the adapter trained on another model?"
            )
        if self.bias is not None and shapes.get("bias") != tuple(self.bias.shape):
            raise InputError(f"{self.module}: lora_B.bias is {list(self.bias.shape)} but the base bias is "
                             f"{list(shapes['bias']) if 'bias' in shapes else 'missing'}")

    def weight_delta(self) -> torch.Tensor:
        A = self.A.to(torch.float32)
        B = self.B.to(torch.float32)
        if self.kind == "conv":
            d = torch.einsum("or,ri...->oi...", B.flatten(1), A)
        else:
            d = B @ A
        d.mul_(self.scaling)
        return d.T if self.kind in ("embedding", "conv1d_transposed") else d

    def delta(self) -> Tensors:
        d = {"weight": self.weight_delta()}
        if self.bias is not None:
            d["bias"] = self.bias.to(torch.float32) * self.scaling
        return d

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "scaling": self.scaling}


class DoraPatch(Patch):
    """W' = m / ‖W + ΔW‖ · (W + ΔW), the norm taken per output feature."""

    def __init__(self, lora: LoraPatch, magnitude: torch.Tensor):
        super().__init__(lora.module, ("weight",))
        self.lora = lora
        self.magnitude = magnitude

    def check(self, shapes: Shapes) -> None:
        self.lora.check(shapes)
        w = self.lora.weight_shape()
        features = w[1] if self.lora.kind in ("embedding", "conv1d_transposed") else w[0]
        if self.magnitude.numel() != features:
            raise InputError(f"{self.module}: lora_magnitude_vector has {self.magnitude.numel()} entries, "
                             f"expected {features} (one per output feature)")

    def apply(self, tensors: Tensors) -> Tensors:
        V = tensors["weight"].add_(self.lora.weight_delta())
        m = self.magnitude.to(V.dtype).flatten()
        if self.lora.kind in ("embedding", "conv1d_transposed"):  # features are columns
            return {"weight": V.mul_((m / torch.linalg.norm(V, dim=0))[None, :])}
        factor = m / torch.linalg.norm(V.flatten(1), dim=1)
        return {"weight": V.mul_(factor.view(-1, *([1] * (V.ndim - 1))))}

    def why_not_invertible(self) -> str | None:
        return ("DoRA rescales every output feature of W+ΔW to the saved magnitude; the files keep the "
                "magnitude but not the norm of W+ΔW, so W cannot be recovered. Keep the base checkpoint "
                "and merge from it again instead")

    def describe(self) -> dict[str, Any]:
        return {**self.lora.describe(), "dora": True}


@register
class Lora(Method):
    peft_types = ("LORA",)
    param_names = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})
    support = (
        Support("LoRA (incl. rsLoRA, rank/alpha patterns, lora_bias, trainable_token_indices)",
                "Linear, Conv1D (fan_in_fan_out), Embedding, Conv1d/2d/3d", "exact", "exact", "0.21.2"),
        Support("DoRA (LoRA with use_dora)", "Linear, Conv1D, Embedding, Conv1d/2d/3d", "exact",
                "refused: the norm of W+ΔW is not in the files", "0.21.2"),
    )

    def check_config(self, config: AdapterConfig) -> None:
        for option, reason in _NO_MERGE_OPTIONS.items():
            if config.get(option):
                raise UnsupportedError(f"{config.path}: LoRA with {option} cannot be merged into weights: {reason}")
        for option in _NOT_YET:
            if config.get(option):
                raise UnsupportedError(f"{config.path}: LoRA with {option} is not supported yet")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith(_BASE_MUTATING_INITS):
            raise UnsupportedError(
                f"{config.path}: init_lora_weights={init!r} changed the base weights before training, so this "
                "adapter does not apply to the original base; re-save it with PEFT's "
                "save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA"
            )

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {
            "scaling_rule": "lora_alpha/sqrt(r)" if config.get("use_rslora", False) else "lora_alpha/r",
            "dora": bool(config.get("use_dora", False)),
            "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
            "lora_bias": bool(config.get("lora_bias", False)),
        }

    def alpha(self, config: AdapterConfig, module: str) -> float:
        a = config.pattern("alpha_pattern", module)
        return float(a if a is not None else config.get("lora_alpha", 8))

    def patch(self, params: ModuleParams) -> Patch:
        config, t = params.config, params.tensors
        if "lora_embedding_A" in t or "lora_embedding_B" in t:
            A, B = params.require("lora_embedding_A", "lora_embedding_B")
            kind = "embedding"
        else:
            A, B = params.require("lora_A.weight", "lora_B.weight")
            if A.ndim > 2:
                kind = "conv"
            elif config.get("fan_in_fan_out", False):
                kind = "conv1d_transposed"
            else:
                kind = "linear"
        rank = A.shape[0]
        if rank == 0 or B.shape[-1 if kind == "embedding" else 1] != rank:
            raise InputError(f"{config.path.parent}: module {params.module!r}: lora_A has rank {rank} but lora_B "
                             f"has shape {list(B.shape)}; the adapter file is inconsistent")
        alpha = self.alpha(config, params.module)
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank
        lora = LoraPatch(params.module, kind, A, B, alpha, scaling, t.get("lora_B.bias"))
        magnitude = t.get("lora_magnitude_vector", t.get("lora_magnitude_vector.weight"))
        if magnitude is not None or config.get("use_dora", False):
            if magnitude is None:
                params.require("lora_magnitude_vector")
            if lora.bias is not None:
                raise UnsupportedError(f"{params.module}: DoRA with lora_bias is not a valid PEFT configuration")
            return DoraPatch(lora, magnitude)
        return lora
