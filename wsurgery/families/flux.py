"""Flux.1: BFL names (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1`` = [q; k; v; mlp]), bare or
under ``model.diffusion_model.``, CLIP-L and T5-XXL (``text_encoders.*``), following
``convert_flux_transformer_checkpoint_to_diffusers``."""

from __future__ import annotations

import re
from collections.abc import Mapping

from .base import Component, Family, Layout, Rule, Shape, Split, rule
from .parts import IDENTITY
from .registry import register
from .sd1 import vae
from .sd3 import DENOISER_PREFIXES


def transformer_rules() -> tuple[Rule, ...]:
    """BFL Flux <-> FluxTransformer2DModel (diffusers' converter hard-codes the widths; here they are read
    off ``linear1``/``linear2``, so any width tiles exactly or is refused)."""
    rules = [rule("img_in.{p}", "x_embedder.{p}"),
             rule("txt_in.{p}", "context_embedder.{p}"),
             rule("final_layer.linear.{p}", "proj_out.{p}"),
             rule("final_layer.adaLN_modulation.1.{p}", "norm_out.linear.{p}", swap_halves=True)]
    for orig, emb in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                      ("guidance_in", "guidance_embedder")):
        rules += [rule(f"{orig}.in_layer.{{p}}", f"time_text_embed.{emb}.linear_1.{{p}}"),
                  rule(f"{orig}.out_layer.{{p}}", f"time_text_embed.{emb}.linear_2.{{p}}")]
    d, t = "double_blocks.{i}", "transformer_blocks.{i}"
    for side, q, k, v, nq, nk, out, norm, ff in (
            ("img", "to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out.0", "norm1", "ff"),
            ("txt", "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k", "to_add_out",
             "norm1_context", "ff_context")):
        rules += [rule(f"{d}.{side}_mod.lin.{{p}}", f"{t}.{norm}.linear.{{p}}"),
                  rule(f"{d}.{side}_attn.qkv.{{p}}", *(f"{t}.attn.{x}.{{p}}" for x in (q, k, v)),
                       split=Split.SQUARE),
                  rule(f"{d}.{side}_attn.norm.query_norm.scale", f"{t}.attn.{nq}.weight"),
                  rule(f"{d}.{side}_attn.norm.key_norm.scale", f"{t}.attn.{nk}.weight"),
                  rule(f"{d}.{side}_attn.proj.{{p}}", f"{t}.attn.{out}.{{p}}"),
                  rule(f"{d}.{side}_mlp.0.{{p}}", f"{t}.{ff}.net.0.proj.{{p}}"),
                  rule(f"{d}.{side}_mlp.2.{{p}}", f"{t}.{ff}.net.2.{{p}}")]
    s, u = "single_blocks.{i}", "single_transformer_blocks.{i}"
    rules += [rule(f"{s}.modulation.lin.{{p}}", f"{u}.norm.linear.{{p}}"),
              rule(f"{s}.linear1.{{p}}", *(f"{u}.attn.to_{x}.{{p}}" for x in "qkv"), f"{u}.proj_mlp.{{p}}",
                   split=Split.SQUARE_REST, rest_from=f"{s}.linear2.weight"),
              rule(f"{s}.norm.query_norm.scale", f"{u}.attn.norm_q.weight"),
              rule(f"{s}.norm.key_norm.scale", f"{u}.attn.norm_k.weight"),
              rule(f"{s}.linear2.{{p}}", f"{u}.proj_out.{{p}}")]
    return tuple(rules)


@register
class Flux(Family):
    name = "flux"
    title = "Flux"

    @classmethod
    def build_components(cls, keys: Mapping[str, Mapping[str, Shape]], layout: Layout) -> tuple[Component, ...]:
        # sd-scripts names the BFL modules (lora_unet_double_blocks_0_img_attn_qkv); some trainers flatten the
        # diffusers ones under lora_transformer_ (diffusers' "mixture" kohya format)
        return (Component("transformer", DENOISER_PREFIXES, transformer_rules(), "lora_unet", ("original", "diffusers"),
                          kohya_diffusers_prefix="lora_transformer"),
                Component("text_encoder", ("text_encoders.clip_l.transformer.",), IDENTITY, "lora_te1",
                          required=False),
                Component("text_encoder_2", ("text_encoders.t5xxl.transformer.",), IDENTITY, "lora_te3",
                          required=False),
                vae(keys, layout, ("vae.", "first_stage_model.")))

    @classmethod
    def evidence(cls, sf: Mapping[str, Shape]) -> list[str]:
        if any(re.match(r"(model\.diffusion_model\.)?double_blocks\.\d+\.", k) for k in sf):
            return ["a Flux transformer (double_blocks)"]
        return []

    @classmethod
    def evidence_folder(cls, folder: Mapping[str, Mapping[str, Shape]]) -> list[str]:
        t = folder.get("transformer", {})
        if any(k.startswith("single_transformer_blocks.") for k in t):
            return ["a FluxTransformer2DModel (single_transformer_blocks)"]
        return []
