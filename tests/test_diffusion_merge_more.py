"""More end-to-end merges of image-model adapter files into single-file checkpoints, through the CLI.

Same pattern as test_diffusion_merge.py: the base is a tiny single file (original LDM/SGM/MMDiT/BFL names, fused
tensors as the real files have them) written from tiny diffusers/transformers models; the oracle is diffusers
loading the same adapter file into its own models and fusing it (``fuse_lora``), or LyCORIS' own modules for
LoHa/LoKr; our merged single file, read back through diffusers' single-file converters, must equal the oracle's
fused weights tensor for tensor, and every tensor the adapter does not touch must be the base's, byte for byte.
"""

from __future__ import annotations

import copy
import inspect
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from oracle import run_cli

pytest.importorskip("diffusers", reason="needs diffusers==0.42.1 (a test dependency)")
pytest.importorskip("lycoris", reason="needs lycoris-lora==4.1.3 (a test dependency)")
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.loaders import lora_conversion_utils as lcu
from peft.tuners.tuners_utils import BaseTunerLayer
from test_diffusion_inspect import kohya_file
from test_diffusion_merge import _close, _single_file
from test_families import _unet, build
from test_kohya_lycoris import _kohya_network, lycoris_forward_weights
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


def _fused(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's state after PEFT's merge, under the plain parameter names."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def _merge_peft_layers(model: torch.nn.Module) -> None:
    """Fuse every LoRA layer diffusers injected into a transformers text encoder (what fuse_lora does to it)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    for m in layers:
        m.merge()


def _check(ours: dict[str, torch.Tensor], fused: dict[str, torch.Tensor], before: dict[str, torch.Tensor],
           min_changed: int) -> None:
    """Every fused tensor equals ours; those the adapter left alone are the base's exactly."""
    assert set(ours) == set(fused), set(ours) ^ set(fused)
    changed = [k for k in fused if not torch.equal(fused[k], before[k])]
    assert len(changed) >= min_changed, changed
    for k, want in fused.items():
        if k in changed:
            _close(ours[k], want)
        else:
            assert torch.equal(ours[k], before[k]), k


# --- SDXL: kohya LoRA on the UNet (sd-scripts' SGM names) and both text encoders -------------------------------

def _sgm(name: str) -> str | None:
    """sd-scripts' SGM name of a diffusers UNet module of the tiny SDXL UNet (2 layers per block, 3 levels), as
    its SDXL LoRA network names modules; None for modules it has no name for here (embeddings)."""
    m = re.match(r"(down|up)_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", name)
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    if m:
        side, i, kind, j, rest = m.groups()
        block = 1 + 3 * int(i) + int(j) if side == "down" else 3 * int(i) + int(j)
        if kind == "resnets":
            return f"{'input' if side == 'down' else 'output'}_blocks.{block}.0.{resnet[rest]}"
        return f"{'input' if side == 'down' else 'output'}_blocks.{block}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", name)
    if m:
        kind, j, rest = m.groups()
        return f"middle_block.{2 * int(j) if kind == 'resnets' else 1}.{resnet.get(rest, rest)}"
    m = re.match(r"down_blocks\.(\d)\.downsamplers\.0\.conv", name)
    return f"input_blocks.{3 * (int(m.group(1)) + 1)}.0.op" if m else None


def _clip_cfg() -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          vocab_size=50, max_position_embeddings=8, projection_dim=12)


def _trained(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """Linear and Conv2d modules of a model -> weight shape (what LoRA/LoCon networks train)."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not any(s in n for s in skip)}


def test_sdxl_kohya_lora_on_unet_and_both_text_encoders(tmp_path, capsys):
    """An sd-scripts-style SDXL LoRA (``lora_unet_input_blocks_…`` SGM names, conv LoCon layers, ``lora_te1_`` on
    CLIP-L, ``lora_te2_`` on OpenCLIP bigG whose q/k/v are rows of ``in_proj_weight`` in the single file), merged at
    0.8, equals diffusers' SDXL loader (SGM remap, kohya conversion, PEFT injection) fused on the UNet and both
    text encoders."""
    comps, _, conv = build("sdxl")
    _, cfg = _unet("sdxl")
    unet = UNet2DConditionModel(**cfg)
    unet.load_state_dict(comps["unet"])
    te1 = CLIPTextModel(_clip_cfg())
    te1.load_state_dict({k.removeprefix("text_model."): v for k, v in comps["text_encoder"].items()})
    te2 = CLIPTextModelWithProjection(_clip_cfg())
    te2.load_state_dict(comps["text_encoder_2"])
    shapes = {"lora_unet_" + _sgm(n).replace(".", "_"): s  # type: ignore[union-attr]
              for n, s in _trained(unet, ("time_embedding", "add_embedding", "conv_in", "conv_out")).items()
              if _sgm(n) is not None}
    # real files name CLIP-L with transformers 4's ``text_model.`` (transformers 5 dropped it from CLIPTextModel)
    shapes.update({"lora_te1_text_model_" + n.replace(".", "_"): s for n, s in _trained(te1).items()})
    shapes.update({"lora_te2_" + n.replace(".", "_"): s for n, s in _trained(te2, ("projection",)).items()})
    lora = kohya_file(tmp_path / "sdxl_lora.safetensors", shapes, rank=4, alpha=2.0,
                      metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    base = _single_file("sdxl", tmp_path, comps)
    out = tmp_path / "merged.safetensors"
    status, _, err = run_cli(["merge", base, f"{lora}:0.8", out, "-q"], capsys)
    assert status == 0, err

    state, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(lora), unet_config=unet.config)
    StableDiffusionXLLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="k")
    unet.fuse_lora(lora_scale=0.8)
    unet.unload_lora()
    for prefix, te in (("text_encoder", te1), ("text_encoder_2", te2)):
        StableDiffusionXLLoraLoaderMixin.load_lora_into_text_encoder(state, alphas, te, prefix=prefix,
                                                                      lora_scale=0.8, adapter_name="k")
        _merge_peft_layers(te)
    merged = load_file(out)
    _check(conv["unet"](merged), unet.state_dict(), comps["unet"], len(shapes) // 2)
    _check(conv["text_encoder"](merged), {f"text_model.{k}": v for k, v in _fused(te1).items()},
           comps["text_encoder"], 12)
    _check(conv["text_encoder_2"](merged), _fused(te2), comps["text_encoder_2"], 12)
    original = load_file(base)
    vae = [k for k in original if k.startswith("first_stage_model.")]
    assert vae and all(torch.equal(merged[k], original[k]) for k in vae)


# --- SD3: diffusers-format LoRA on the MMDiT's split q/k/v -> fused qkv rows --------------------------------------

def test_sd3_diffusers_lora_into_fused_qkv(tmp_path, capsys):
    """A diffusers-format SD3 LoRA (save_lora_weights; lora_alpha ≠ r) on to_q/k/v, add_q/k/v_proj, to_out and the
    MLPs lands in row slices of MMDiT's fused ``qkv`` (x_block, context_block, attn2); equals fuse_lora."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    comps, _, conv = build("sd3")
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                                  dual_attention_layers=(0,), qk_norm="rms_norm")
    model.load_state_dict(comps["transformer"])
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                           "add_v_proj", "to_out.0", "ff.net.2"])
    model.add_adapter(config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                               transformer_lora_adapter_metadata=config.to_dict())
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    base = _single_file("sd3", tmp_path, comps)
    out = tmp_path / "merged.safetensors"
    status, _, err = run_cli(["merge", base, f"{lora}:0.6", out, "-q"], capsys)
    assert status == 0, err
    model.fuse_lora(lora_scale=0.6)
    merged = load_file(out)
    ours = conv["transformer"](merged)
    fused = _fused(model)
    _check(ours, fused, comps["transformer"], 20)
    assert any("attn2.to_k" in k for k in fused if not torch.equal(fused[k], comps["transformer"][k]))
    original = load_file(base)
    assert all(torch.equal(merged[k], original[k]) for k in original if k.startswith("text_encoders."))


# --- Flux: kohya LoRA on BFL names ------------------------------------------------------------------------------

def _kohya_flux_converter():
    """diffusers' kohya Flux converter splits ``linear1`` LoRAs at Flux.1-dev's widths (3 x 3072 + 12288) whatever
    the model; run its own code with the tiny model's widths instead (the only change)."""
    src = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    assert src.count("dims=[3072, 3072, 3072, 12288]") == 1
    ns = dict(vars(lcu))
    exec(src.replace("dims=[3072, 3072, 3072, 12288]", "dims=[16, 16, 16, 64]"), ns)
    return ns["_convert_kohya_flux_lora_to_diffusers"]


def test_flux_kohya_lora_on_bfl_names(tmp_path, capsys):
    """A kohya Flux LoRA (sd-scripts' ``lora_unet_double_blocks_0_img_attn_qkv``, ``…single_blocks_0_linear1`` =
    [q; k; v; mlp], projections, MLPs, modulations; alpha ≠ rank) merged at 0.9 equals diffusers' kohya Flux
    conversion loaded into its FluxTransformer2DModel and fused."""
    comps, _, conv = build("flux")
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    model.load_state_dict(comps["transformer"])
    shapes = {"lora_unet_double_blocks_0_img_attn_qkv": (48, 16), "lora_unet_double_blocks_0_txt_attn_qkv": (48, 16),
              "lora_unet_double_blocks_0_img_attn_proj": (16, 16), "lora_unet_double_blocks_0_txt_mlp_2": (16, 64),
              "lora_unet_double_blocks_0_img_mlp_0": (64, 16), "lora_unet_double_blocks_0_img_mod_lin": (96, 16),
              "lora_unet_single_blocks_0_linear1": (112, 16), "lora_unet_single_blocks_1_linear1": (112, 16),
              "lora_unet_single_blocks_1_linear2": (16, 80), "lora_unet_single_blocks_0_modulation_lin": (48, 16)}
    lora = kohya_file(tmp_path / "flux_lora.safetensors", shapes, rank=4, alpha=3.0,
                      metadata={"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"})
    base = _single_file("flux", tmp_path, comps)
    out = tmp_path / "merged.safetensors"
    status, _, err = run_cli(["merge", base, f"{lora}:0.9", out, "-q"], capsys)
    assert status == 0, err
    converted = _kohya_flux_converter()(load_file(lora))
    assert len(converted) == 2 * 20  # every module converted (qkv: 3 parts, linear1: 4), none dropped
    model.load_lora_adapter(converted, prefix="transformer", adapter_name="k")
    model.fuse_lora(lora_scale=0.9)
    ours = conv["transformer"](load_file(out))
    _check(ours, _fused(model), comps["transformer"], 20)
    status, stdout, err = run_cli(["verify", base, lora, out, "--scale", "0.9"], capsys)
    assert status == 0, stdout + err
    status, stdout, _ = run_cli(["verify", base, lora, out, "--scale", "0.8"], capsys)  # not what was merged
    assert status != 0 and "FAIL" in stdout


# --- two weighted adapters; unmerge ------------------------------------------------------------------------------

def _sd1_unet() -> tuple[UNet2DConditionModel, dict[str, dict[str, torch.Tensor]], dict]:
    comps, _, conv = build("sd1")
    _, cfg = _unet("sd1")
    unet = UNet2DConditionModel(**cfg)
    unet.load_state_dict(comps["unet"])
    return unet, comps, conv


def test_two_weighted_kohya_adapters(tmp_path, capsys):
    """``merge BASE a.safetensors:0.7 b.safetensors:0.5``: two kohya LoRAs (overlapping modules, different ranks
    and alphas) equal diffusers with both adapters active at those weights (set_adapters), fused."""
    unet, comps, conv = _sd1_unet()
    mods = _trained(unet, ("time_embedding", "conv_in", "conv_out"))
    names = {"lora_unet_" + n.replace(".", "_"): s for n, s in mods.items()}
    keys = sorted(names)
    a = kohya_file(tmp_path / "a.safetensors", {k: names[k] for k in keys[: 2 * len(keys) // 3]}, rank=4, alpha=2.0)
    b = kohya_file(tmp_path / "b.safetensors", {k: names[k] for k in keys[len(keys) // 3:]}, rank=2, alpha=4.0,
                   seed=1)
    base = _single_file("sd1", tmp_path, comps)
    out = tmp_path / "merged.safetensors"
    status, _, err = run_cli(["merge", base, f"{a}:0.7", f"{b}:0.5", out, "-q"], capsys)
    assert status == 0, err
    for name, path in (("a", a), ("b", b)):
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name=name)
    unet.set_adapters(["a", "b"], weights=[0.7, 0.5])
    unet.fuse_lora(adapter_names=["a", "b"])
    unet.unload_lora()
    _check(conv["unet"](load_file(out)), unet.state_dict(), comps["unet"], len(keys))


def test_unmerge_a_merged_single_file(tmp_path, capsys):
    """``wsurgery unmerge MERGED LORA OUT`` of a kohya LoRA (linear and conv modules) merged into an SD 1.x single
    file gives the base back within float tolerance; the tensors the LoRA never touched byte for byte."""
    unet, comps, _ = _sd1_unet()
    net, lora = _kohya_network(copy.deepcopy(unet), tmp_path, {"ss_network_module": "networks.lora"},
                               algo="lora", conv_dim="2", conv_alpha="1")
    base = _single_file("sd1", tmp_path, comps)
    merged, back = tmp_path / "merged.safetensors", tmp_path / "back.safetensors"
    status, _, err = run_cli(["merge", base, lora, merged, "-q"], capsys)
    assert status == 0, err
    status, _, err = run_cli(["unmerge", merged, lora, back, "-q"], capsys)
    assert status == 0, err
    original, m, b = load_file(base), load_file(merged), load_file(back)
    changed = [k for k in original if not torch.equal(m[k], original[k])]
    assert len(changed) >= len(net.unet_loras)
    for k, t in original.items():
        if k in changed:
            _close(b[k], t, rel=1e-6)
        else:
            assert torch.equal(b[k], t), k


# --- LyCORIS LoHa / LoKr on SD 1.x ----------------------------------------------------------------------------

@pytest.mark.parametrize("algo,kwargs", [("loha", {"conv_dim": "2", "conv_alpha": "1"}),
                                         ("lokr", {"factor": "4", "conv_dim": "2", "conv_alpha": "1"})])
def test_lycoris_network_into_sd1_single_file(algo, kwargs, tmp_path, capsys):
    """A LyCORIS LoHa / LoKr network (its kohya network on the diffusers UNet, saved with save_weights) merged into
    the SD 1.x single file at 0.8: each changed weight equals that LyCORIS module's own weight at multiplier 0.8
    (its forward's weight, as test_kohya_lycoris.py explains), read back through diffusers' converter."""
    unet, comps, conv = _sd1_unet()
    args = {"algo": algo, **kwargs}
    net, lora = _kohya_network(unet, tmp_path, {"ss_network_module": "lycoris.kohya",
                                                "ss_network_args": json.dumps(args)}, **args)
    base = _single_file("sd1", tmp_path, comps)
    out = tmp_path / "merged.safetensors"
    status, _, err = run_cli(["merge", base, f"{lora}:0.8", out, "-q"], capsys)
    assert status == 0, err
    ours = conv["unet"](load_file(out))
    layers = dict(unet.named_modules())
    by_name = {"lora_unet_" + n.replace(".", "_"): n for n in layers}
    want = dict(comps["unet"])
    for m in net.unet_loras:
        name = by_name[m.lora_name]
        for role, w in lycoris_forward_weights(m, layers[name], 0.8).items():
            want[f"{name}.{role}"] = w
    _check(ours, want, comps["unet"], len(net.unet_loras))
    assert {type(m).__name__ for m in net.unet_loras} == {"LohaModule" if algo == "loha" else "LokrModule"}


# --- memory: a merge into a single file holds one job's tensors at a time ------------------------------------------

def test_placed_merge_reuses_its_buffers(tmp_path, capsys, monkeypatch):
    """The engine's reusable buffers are per use, so their number does not grow with the number of changed
    tensors; with one per changed tensor a real SDXL merge holds every changed weight in fp16 and fp32."""
    import wsurgery.engine as engine

    unet, comps, _ = _sd1_unet()
    names = {"lora_unet_" + n.replace(".", "_"): s for n, s in _trained(unet, ("time_embedding",)).items()}
    lora = kohya_file(tmp_path / "lora.safetensors", names)
    base = _single_file("sd1", tmp_path, comps)
    uses: set[str] = set()
    take = engine._Scratch.take

    def counting(self, use, shape, dtype):
        uses.add(use)
        return take(self, use, shape, dtype)

    monkeypatch.setattr(engine._Scratch, "take", counting)
    status, _, err = run_cli(["merge", base, lora, tmp_path / "merged.safetensors", "-q", "--workers", "1"], capsys)
    assert status == 0, err
    assert len(names) > 40
    assert len(uses) <= 8, sorted(uses)[:10]
