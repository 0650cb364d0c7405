"""SDXL: SGM UNet (LDM names plus ``label_emb``), CLIP ViT-L (``conditioner.embedders.0.transformer.``) and
OpenCLIP bigG with projection (``conditioner.embedders.1.model.``; ``.0.model.`` in the refiner, which has no
CLIP ViT-L)."""

from __future__ import annotations

from collections.abc import Mapping

from .base import Component, Family, Layout, Shape
from .parts import IDENTITY, open_clip_rules
from .registry import register
from .sd1 import unet, unet_evidence, vae


@register
class SDXL(Family):
    name = "sdxl"
    title = "SDXL"

    @classmethod
    def build_components(cls, keys: Mapping[str, Mapping[str, Shape]], layout: Layout) -> tuple[Component, ...]:
        return (unet(keys, layout, ("original", "diffusers")),
                Component("text_encoder", ("conditioner.embedders.0.transformer.",), IDENTITY, "lora_te1",
                          required=False),
                # the refiner has only the OpenCLIP bigG, as embedder 0 (diffusers: text_encoder_2 alone)
                Component("text_encoder_2", ("conditioner.embedders.1.model.", "conditioner.embedders.0.model."),
                          open_clip_rules(projection=True), "lora_te2", required=False),
                vae(keys, layout))

    @classmethod
    def evidence(cls, sf: Mapping[str, Shape]) -> list[str]:
        te = ["text encoders under conditioner.embedders."] if any(
            k.startswith("conditioner.embedders.") for k in sf) else []
        return unet_evidence(sf, None, "sdxl") + te

    @classmethod
    def evidence_folder(cls, folder: Mapping[str, Mapping[str, Shape]]) -> list[str]:
        return unet_evidence({}, folder, "sdxl")
