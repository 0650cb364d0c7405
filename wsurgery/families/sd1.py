"""Stable Diffusion 1.x: LDM UNet (``model.diffusion_model.``), CLIP ViT-L (``cond_stage_model.transformer.``)."""

from __future__ import annotations

from collections.abc import Mapping

from .base import Component, Family, Layout, Shape
from .parts import IDENTITY, ldm_unet_rules, ldm_vae_rules, unet_kind, unet_structure, vae_structure
from .registry import register

VAE_PREFIXES = ("first_stage_model.", "vae.")


def unet(keys: Mapping[str, Mapping[str, Shape]], layout: Layout, kohya_from: tuple[str, ...]) -> Component:
    rules = ldm_unet_rules(*unet_structure(keys.get("unet", {}), layout is Layout.DIFFUSERS))
    return Component("unet", ("model.diffusion_model.",), rules, "lora_unet", kohya_from)


def vae(keys: Mapping[str, Mapping[str, Shape]], layout: Layout, prefixes: tuple[str, ...] = VAE_PREFIXES,
        ) -> Component:
    rules = ldm_vae_rules(*vae_structure(keys.get("vae", {}), layout is Layout.DIFFUSERS))
    return Component("vae", prefixes, rules, required=False)


def unet_evidence(sf: Mapping[str, Shape], folder: Mapping[str, Mapping[str, Shape]] | None, kind: str,
                  ) -> list[str]:
    found = (unet_kind(folder.get("unet", {}), "", True) if folder is not None
             else unet_kind(sf, "model.diffusion_model.", False))
    why = {"sd1": "a UNet with 1x1-conv proj_in and no add embedding",
           "sd2": "a UNet with linear proj_in and no add embedding",
           "sdxl": "a UNet with a text-time add embedding (label_emb / add_embedding)"}
    return [why[kind]] if found == kind else []


@register
class SD1(Family):
    name = "sd1"
    title = "SD 1.x"

    @classmethod
    def build_components(cls, keys: Mapping[str, Mapping[str, Shape]], layout: Layout) -> tuple[Component, ...]:
        return (unet(keys, layout, ("diffusers",)),
                Component("text_encoder", ("cond_stage_model.transformer.",), IDENTITY, "lora_te", required=False),
                vae(keys, layout))

    @classmethod
    def evidence(cls, sf: Mapping[str, Shape]) -> list[str]:
        te = ["a CLIP text encoder under cond_stage_model.transformer."] if any(
            k.startswith("cond_stage_model.transformer.") for k in sf) else []
        return unet_evidence(sf, None, "sd1") + te

    @classmethod
    def evidence_folder(cls, folder: Mapping[str, Mapping[str, Shape]]) -> list[str]:
        return unet_evidence({}, folder, "sd1")
