"""Stable Diffusion 2.x: LDM UNet with linear projections, OpenCLIP ViT-H (``cond_stage_model.model.``, fused
``in_proj_weight``; its last resblock is stored but unused: SD 2 conditions on the penultimate layer)."""

from __future__ import annotations

from collections.abc import Mapping

from .base import Component, Family, Layout, Shape
from .parts import open_clip_last_layer, open_clip_rules
from .registry import register
from .sd1 import unet, unet_evidence, vae

PREFIX = "cond_stage_model.model."


@register
class SD2(Family):
    name = "sd2"
    title = "SD 2.x"

    @classmethod
    def build_components(cls, keys: Mapping[str, Mapping[str, Shape]], layout: Layout) -> tuple[Component, ...]:
        te = keys.get("text_encoder", {})
        ignored = open_clip_last_layer(te) if layout is Layout.SINGLE_FILE else ()
        return (unet(keys, layout, ("diffusers",)),
                Component("text_encoder", (PREFIX,), open_clip_rules(projection=False), "lora_te", required=False,
                          ignored=ignored),
                vae(keys, layout))

    @classmethod
    def evidence(cls, sf: Mapping[str, Shape]) -> list[str]:
        te = [f"an OpenCLIP text encoder under {PREFIX}"] if any(k.startswith(PREFIX) for k in sf) else []
        return unet_evidence(sf, None, "sd2") + te

    @classmethod
    def evidence_folder(cls, folder: Mapping[str, Mapping[str, Shape]]) -> list[str]:
        return unet_evidence({}, folder, "sd2")
