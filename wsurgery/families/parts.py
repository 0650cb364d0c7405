"""Rule tables shared by several families: the LDM/SGM UNet, the LDM VAE, CLIP, OpenCLIP and T5 text encoders.

The tables follow diffusers' single-file converters (``diffusers/loaders/single_file_utils.py``), which
the tests run as the judge; the structural numbers they need (levels, layers per level) are read off the
keys of either layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .base import Rule, Shape, Split, rule

#: LDM ResBlock -> diffusers ResnetBlock2D (``update_unet_resnet_ldm_to_diffusers``).
_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


def _indices(keys: Mapping[str, Shape], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


def unet_structure(keys: Mapping[str, Shape], diffusers: bool) -> tuple[int, int, frozenset[int]]:
    """(levels, resnets per down level, up levels with attention) of a UNet, from either layout's keys."""
    if diffusers:
        levels = len(_indices(keys, r"down_blocks\.(\d+)\."))
        per_level = len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
        up_attn = _indices(keys, r"up_blocks\.(\d+)\.attentions\.")
        return levels, per_level, frozenset(up_attn)
    inputs = _indices(keys, r"input_blocks\.(\d+)\.")
    ops = sorted(_indices(keys, r"input_blocks\.(\d+)\.0\.op\."))
    if not inputs:
        return 0, 0, frozenset()
    per_level = ops[0] - 1 if ops else max(inputs)
    levels = len(ops) + 1
    return levels, per_level, frozenset(
        b for b in range(levels) if any(re.match(rf"output_blocks\.{b * (per_level + 1)}\.1\.(?!conv\.)", k)
                                        for k in keys))


def ldm_unet_rules(levels: int, per_level: int, up_attn: frozenset[int]) -> tuple[Rule, ...]:
    """LDM/SGM UNet (``model.diffusion_model.``) <-> diffusers UNet2DConditionModel."""
    rules = [rule("time_embed.0.{p}", "time_embedding.linear_1.{p}"),
             rule("time_embed.2.{p}", "time_embedding.linear_2.{p}"),
             rule("label_emb.0.0.{p}", "add_embedding.linear_1.{p}"),
             rule("label_emb.0.2.{p}", "add_embedding.linear_2.{p}"),
             rule("input_blocks.0.0.{p}", "conv_in.{p}"),
             rule("out.0.{p}", "conv_norm_out.{p}"),
             rule("out.2.{p}", "conv_out.{p}")]

    def resnet(orig: str, diff: str) -> None:
        rules.extend(rule(f"{orig}.{a}.{{p}}", f"{diff}.{b}.{{p}}") for a, b in _RESNET)

    step = per_level + 1
    for b in range(levels):
        for j in range(per_level):
            i = b * step + j + 1
            resnet(f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}")
            rules.append(rule(f"input_blocks.{i}.1.{{r}}", f"down_blocks.{b}.attentions.{j}.{{r}}"))
        if b < levels - 1:
            rules.append(rule(f"input_blocks.{(b + 1) * step}.0.op.{{p}}",
                              f"down_blocks.{b}.downsamplers.0.conv.{{p}}"))
    resnet("middle_block.0", "mid_block.resnets.0")
    rules.append(rule("middle_block.1.{r}", "mid_block.attentions.0.{r}"))
    resnet("middle_block.2", "mid_block.resnets.1")
    for b in range(levels):
        if b < levels - 1:
            at = 2 if b in up_attn else 1
            rules.append(rule(f"output_blocks.{b * step + per_level}.{at}.conv.{{p}}",
                              f"up_blocks.{b}.upsamplers.0.conv.{{p}}"))
        for j in range(step):
            i = b * step + j
            resnet(f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}")
            if b in up_attn:
                rules.append(rule(f"output_blocks.{i}.1.{{r}}", f"up_blocks.{b}.attentions.{j}.{{r}}"))
    return tuple(rules)


def vae_structure(keys: Mapping[str, Shape], diffusers: bool) -> tuple[int, int]:
    """(levels, resnets per encoder level) of an autoencoder, from either layout's keys."""
    if diffusers:
        return (len(_indices(keys, r"encoder\.down_blocks\.(\d+)\.")),
                len(_indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")))
    return len(_indices(keys, r"encoder\.down\.(\d+)\.")), len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))


def ldm_vae_rules(levels: int, per_level: int) -> tuple[Rule, ...]:
    """LDM AutoencoderKL (``first_stage_model.``/``vae.``) <-> diffusers AutoencoderKL
    (``convert_ldm_vae_checkpoint``: decoder levels reversed, mid attention 1x1 convs as linears)."""
    rules = [rule(f"{side}.{a}.{{p}}", f"{side}.{b}.{{p}}") for side in ("encoder", "decoder")
             for a, b in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("norm_out", "conv_norm_out"))]
    rules += [rule("quant_conv.{p}", "quant_conv.{p}"), rule("post_quant_conv.{p}", "post_quant_conv.{p}")]

    def resnet(orig: str, diff: str) -> None:
        rules.append(rule(f"{orig}.nin_shortcut.{{p}}", f"{diff}.conv_shortcut.{{p}}"))
        rules.extend(rule(f"{orig}.{n}.{{p}}", f"{diff}.{n}.{{p}}") for n in ("norm1", "conv1", "norm2", "conv2"))

    for i in range(levels):
        for j in range(per_level):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        rules.append(rule(f"encoder.down.{i}.downsample.conv.{{p}}",
                          f"encoder.down_blocks.{i}.downsamplers.0.conv.{{p}}"))
    for k in range(levels):
        u = levels - 1 - k
        for j in range(per_level + 1):
            resnet(f"decoder.up.{k}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}")
        rules.append(rule(f"decoder.up.{k}.upsample.conv.{{p}}", f"decoder.up_blocks.{u}.upsamplers.0.conv.{{p}}"))
    for side in ("encoder", "decoder"):
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        a = f"{side}.mid.attn_1"
        d = f"{side}.mid_block.attentions.0"
        rules.append(rule(f"{a}.norm.{{p}}", f"{d}.group_norm.{{p}}"))
        rules.extend(rule(f"{a}.{o}.{{p}}", f"{d}.{n}.{{p}}", squeeze=True)
                     for o, n in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")))
    return tuple(rules)


#: transformers' own names (CLIP stored as CLIPTextModel in SD 1.x/SDXL/SD3 files, T5 as T5EncoderModel).
IDENTITY = (rule("{r}", "{r}"),)


def open_clip_rules(projection: bool) -> tuple[Rule, ...]:
    """OpenCLIP text tower (``cond_stage_model.model.``) <-> transformers CLIPTextModel[WithProjection]
    (``convert_open_clip_checkpoint``: ``in_proj_weight`` is [q; k; v], ``text_projection`` is [in, out])."""
    layer = "transformer.resblocks.{i}"
    hf = "text_model.encoder.layers.{i}"
    rules = [rule("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
             rule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
             rule("ln_final.{p}", "text_model.final_layer_norm.{p}"),
             rule(f"{layer}.attn.in_proj_weight", *(f"{hf}.self_attn.{x}_proj.weight" for x in "qkv"),
                  split=Split.SQUARE),
             rule(f"{layer}.attn.in_proj_bias", *(f"{hf}.self_attn.{x}_proj.bias" for x in "qkv"),
                  split=Split.SQUARE),
             rule(f"{layer}.attn.out_proj.{{p}}", f"{hf}.self_attn.out_proj.{{p}}"),
             rule(f"{layer}.ln_1.{{p}}", f"{hf}.layer_norm1.{{p}}"),
             rule(f"{layer}.ln_2.{{p}}", f"{hf}.layer_norm2.{{p}}"),
             rule(f"{layer}.mlp.c_fc.{{p}}", f"{hf}.mlp.fc1.{{p}}"),
             rule(f"{layer}.mlp.c_proj.{{p}}", f"{hf}.mlp.fc2.{{p}}")]
    if projection:
        rules.append(rule("text_projection", "text_projection.weight", transpose=True))
    return tuple(rules)


def open_clip_last_layer(keys: Mapping[str, Shape]) -> tuple[str, ...]:
    """SD 2.x conditions on the penultimate layer of OpenCLIP ViT-H: its 24th resblock (index 23) and the
    projection are stored but are not part of the diffusers text encoder (23 layers). As diffusers'
    ``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``: by index, so a text tower stored without it keeps all its layers."""
    return tuple(k for k in keys if k.startswith("transformer.resblocks.23.")) + ("text_projection",)


def unet_kind(keys: Mapping[str, Shape], prefix: str, diffusers: bool) -> str | None:
    """"sdxl" (a text-time add embedding), "sd2" (linear proj_in) or "sd1" (1x1-conv proj_in) for a UNet's
    keys, None when there is no UNet. Read from structure, not widths, so tiny test models tell too."""
    conv_in = prefix + ("conv_in.weight" if diffusers else "input_blocks.0.0.weight")
    if conv_in not in keys:
        return None
    if prefix + ("add_embedding.linear_1.weight" if diffusers else "label_emb.0.0.weight") in keys:
        return "sdxl"
    dims = {len(s) for k, s in keys.items() if k.startswith(prefix) and k.endswith(".proj_in.weight")}
    if dims == {2}:
        return "sd2"
    if dims == {4}:
        return "sd1"
    return None
