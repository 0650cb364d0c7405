"""diffusers / PEFT-style adapter files: one ``.safetensors`` with dotted module paths under a component prefix
(``unet.…``, ``transformer.…``, ``text_encoder.…``, ``text_encoder_2.…``; ai-toolkit and ComfyUI exports use
``diffusion_model.…``) and LoRA tensors named the PEFT way (``lora_A.weight``/``lora_B.weight``, optional
``lora_B.bias`` and DoRA's ``lora_magnitude_vector``), the older diffusers way (``lora.down/up.weight``,
``lora_linear_layer.down/up.weight``) or kohya's way on a dotted path (``lora_down/lora_up.weight``, OneTrainer and
ai-toolkit).

The scale is α/r where α is the module's ``.alpha`` tensor if saved; else the ``lora_adapter_metadata`` that
diffusers' ``save_lora_weights`` writes (``<component>.lora_alpha``, ``alpha_pattern``, ``use_rslora``); else
α = r (scale 1), which is what diffusers loads such a file with. DoRA (``lora_magnitude_vector``) is PEFT's, with
the multiplier inside the norm as diffusers' ``fuse_lora(lora_scale)`` applies it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
import math
from pathlib import Path
from typing import Any

import torch

from ...errors import InputError, NotInvertibleError, UnsupportedError
from ...methods.base import Tensors
from ...methods.lora import DoraPatch, LoraPatch
from ..config import match_pattern
from .base import AdapterFile, AdapterFormat, AdapterModule, describe_keys, register_format, scalar

# suffix -> role; the down/up pairs are PEFT's A/B.
_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora.down.weight": "A", ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A", ".lora_linear_layer.up.weight": "B",
    ".lora_down.weight": "A", ".lora_up.weight": "B", ".lora_B.bias": "bias", ".alpha": "alpha",
    ".lora_magnitude_vector": "magnitude",
}
_LORA_VARIANT_FLAGS = ("use_bdlora", "kasa_config", "alora_invocation_tokens", "arrow_config")


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def _adapter_metadata(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: its lora_adapter_metadata is not JSON ({e})") from e
    if not isinstance(meta, dict):
        raise InputError(f"{path}: its lora_adapter_metadata is not a JSON object")
    return meta


def _alpha(path: Path, name: str, rank: int, saved: torch.Tensor | None,
           meta: dict[str, Any]) -> tuple[float | None, float]:
    """(α as the file states it, or None; scale) for one module: its ``.alpha``, else the component's PEFT config in
    the metadata, else α = r (scale 1)."""
    if saved is not None:
        alpha = scalar(path, f"{name}.alpha", saved)
        return alpha, (alpha if alpha else float(rank)) / rank
    component, _, inner = name.partition(".")
    if not meta or f"{component}.lora_alpha" not in meta:
        return None, 1.0
    for flag in _LORA_VARIANT_FLAGS:
        if meta.get(f"{component}.{flag}"):
            raise UnsupportedError(f"{path}: lora_adapter_metadata turns on {flag} for {component}; only plain LoRA "
                                   "and DoRA diffusers-style files are supported")
    pattern = match_pattern(meta.get(f"{component}.alpha_pattern"), inner)
    alpha = float(pattern if pattern is not None else meta[f"{component}.lora_alpha"])
    rs = bool(meta.get(f"{component}.use_rslora"))
    return alpha, alpha / math.sqrt(rank) if rs else alpha / rank


class FusedDoraPatch(DoraPatch):
    """PEFT's DoRA with the multiplier as diffusers applies it: ``fuse_lora(lora_scale=s)`` scales the layer
    (``scale_layer``) before merging, so ΔW is scaled inside the norm, W' = m/‖W + s·ΔW‖·(W + s·ΔW), where
    ``DoraPatch.merge`` interpolates between W and the merge at 1."""

    def scales_linearly(self) -> bool:
        return False  # the multiplier scales ΔW inside the norm

    def merge(self, tensors: Tensors, scale: float) -> Tensors:
        V = tensors["weight"].add_(self.lora.weight_delta(), alpha=scale)
        factor = self.magnitude.to(V.dtype).flatten() / torch.linalg.norm(V.flatten(1), dim=1)
        return {**tensors, "weight": V.mul_(factor.view(-1, *[1] * (V.dim() - 1)))}

    def unmerge(self, tensors: Tensors, scale: float) -> Tensors:
        raise NotInvertibleError(f"{self.module}: {self.why_not_invertible()}")


@register_format
class Diffusers(AdapterFormat):
    name = "diffusers"

    def foreign_keys(self, keys: list[str]) -> list[str]:
        def fits(key: str) -> bool:
            split = _split(key)
            return split is not None and "." in split[0]  # a dotted module path: kohya names have no dots

        return [k for k in keys if not fits(k)]

    def read(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> AdapterFile:
        grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        for key, t in tensors.items():
            split = _split(key)
            assert split is not None  # detect() saw every key
            name, role = split
            if role in grouped.setdefault(name, {}):
                raise InputError(f"{path}: module {name!r} has both {grouped[name][role][0]} and {key}")
            grouped[name][role] = (key, t)
        meta = _adapter_metadata(path, metadata)
        modules = {}
        for name, parts in grouped.items():
            keys = tuple(k for k, _ in parts.values())
            if "A" not in parts or "B" not in parts:
                raise InputError(f"{path}: module {name!r} has {describe_keys(list(keys))} but not both LoRA "
                                 "factors (lora_A/lora_B, lora.down/up or lora_down/up)")
            A, B = parts["A"][1], parts["B"][1]
            rank = int(A.shape[0])
            if B.dim() != A.dim() or B.shape[1] != rank:
                raise InputError(f"{path}: module {name!r}: {parts['A'][0]} {list(A.shape)} and {parts['B'][0]} "
                                 f"{list(B.shape)} do not form a rank-{rank} LoRA")
            alpha, scale = _alpha(path, name, rank, parts["alpha"][1] if "alpha" in parts else None, meta)
            bias = parts["bias"][1] if "bias" in parts else None
            lora = LoraPatch(name, "conv" if A.dim() > 2 else "linear", A, B, float(rank) if alpha is None else alpha,
                             scale, bias)
            patch = FusedDoraPatch(lora, parts["magnitude"][1]) if "magnitude" in parts else lora
            modules[name] = AdapterModule(name, "lora", patch, rank, alpha, keys, dora="magnitude" in parts)
        return AdapterFile(path, self.name, modules, metadata)
