"""Stable Diffusion 3 / 3.5: MMDiT (``joint_blocks``, fused ``qkv``), CLIP-L, CLIP-G and optional T5-XXL
(``text_encoders.{clip_l,clip_g,t5xxl}.transformer.``), as ``convert_sd3_transformer_checkpoint_to_diffusers``."""

from __future__ import annotations

import re
from collections.abc import Mapping

from .base import Component, Family, Layout, Rule, Shape, Split, rule
from .parts import IDENTITY
from .registry import register
from .sd1 import vae

DENOISER_PREFIXES = ("model.diffusion_model.", "")


def _last_block(keys: Mapping[str, Shape], pattern: str) -> int | None:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) if found else None


def transformer_rules(last: int | None) -> tuple[Rule, ...]:
    """MMDiT <-> SD3Transformer2DModel. The last block is context-pre-only: its context modulation is
    [shift; scale] (diffusers swaps it), it has no context output projection nor context MLP."""
    j, t = "joint_blocks.{i}", "transformer_blocks.{i}"
    rules = [rule("pos_embed", "pos_embed.pos_embed"),
             rule("x_embedder.proj.{p}", "pos_embed.proj.{p}"),
             rule("t_embedder.mlp.0.{p}", "time_text_embed.timestep_embedder.linear_1.{p}"),
             rule("t_embedder.mlp.2.{p}", "time_text_embed.timestep_embedder.linear_2.{p}"),
             rule("y_embedder.mlp.0.{p}", "time_text_embed.text_embedder.linear_1.{p}"),
             rule("y_embedder.mlp.2.{p}", "time_text_embed.text_embedder.linear_2.{p}"),
             rule("context_embedder.{p}", "context_embedder.{p}"),
             rule("final_layer.linear.{p}", "proj_out.{p}"),
             rule("final_layer.adaLN_modulation.1.{p}", "norm_out.linear.{p}", swap_halves=True)]
    if last is not None:
        rules.append(rule(f"joint_blocks.{last}.context_block.adaLN_modulation.1.{{p}}",
                          f"transformer_blocks.{last}.norm1_context.linear.{{p}}", swap_halves=True))
    for attn, block, q, k, v, nq, nk, out in (
            ("attn", "x_block", "to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out.0"),
            ("attn", "context_block", "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k",
             "to_add_out"),
            ("attn2", "x_block", "to_q", "to_k", "to_v", "norm_q", "norm_k", "to_out.0")):
        a = f"{j}.{block}.{attn}"
        rules += [rule(f"{a}.qkv.{{p}}", *(f"{t}.{attn}.{x}.{{p}}" for x in (q, k, v)), split=Split.SQUARE),
                  rule(f"{a}.ln_q.weight", f"{t}.{attn}.{nq}.weight"),
                  rule(f"{a}.ln_k.weight", f"{t}.{attn}.{nk}.weight"),
                  rule(f"{a}.proj.{{p}}", f"{t}.{attn}.{out}.{{p}}")]
    for block, norm, ff in (("x_block", "norm1", "ff"), ("context_block", "norm1_context", "ff_context")):
        rules += [rule(f"{j}.{block}.adaLN_modulation.1.{{p}}", f"{t}.{norm}.linear.{{p}}"),
                  rule(f"{j}.{block}.mlp.fc1.{{p}}", f"{t}.{ff}.net.0.proj.{{p}}"),
                  rule(f"{j}.{block}.mlp.fc2.{{p}}", f"{t}.{ff}.net.2.{{p}}")]
    return tuple(rules)


@register
class SD3(Family):
    name = "sd3"
    title = "SD3/3.5"

    @classmethod
    def build_components(cls, keys: Mapping[str, Mapping[str, Shape]], layout: Layout) -> tuple[Component, ...]:
        tk = keys.get("transformer", {})
        last = (_last_block(tk, r"transformer_blocks\.(\d+)\.") if layout is Layout.DIFFUSERS
                else _last_block(tk, r"joint_blocks\.(\d+)\."))
        return (Component("transformer", DENOISER_PREFIXES, transformer_rules(last), "lora_unet", ("original",)),
                Component("text_encoder", ("text_encoders.clip_l.transformer.",), IDENTITY, "lora_te1",
                          required=False),
                Component("text_encoder_2", ("text_encoders.clip_g.transformer.",), IDENTITY, "lora_te2",
                          required=False),
                Component("text_encoder_3", ("text_encoders.t5xxl.transformer.",), IDENTITY, "lora_te3",
                          required=False),
                vae(keys, layout))

    @classmethod
    def evidence(cls, sf: Mapping[str, Shape]) -> list[str]:
        why = []
        if any(re.match(r"(model\.diffusion_model\.)?joint_blocks\.\d+\.", k) for k in sf):
            why.append("an MMDiT (joint_blocks)")
        if any(k.startswith("text_encoders.clip_g.") for k in sf):
            why.append("a CLIP-G text encoder under text_encoders.clip_g.")
        return why

    @classmethod
    def evidence_folder(cls, folder: Mapping[str, Mapping[str, Shape]]) -> list[str]:
        t = folder.get("transformer", {})
        why = ["an SD3Transformer2DModel (pos_embed.proj, no single blocks)"] if (
            "pos_embed.proj.weight" in t and not any(k.startswith("single_transformer_blocks.") for k in t)) else []
        if "text_encoder_3" in folder:
            why.append("a text_encoder_3")
        return why
