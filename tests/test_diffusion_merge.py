"""Merging image-model adapter files into single-file diffusion checkpoints, through the CLI, against diffusers.

The base is a tiny SD 1.x / Flux single file (the original LDM/BFL names, fused tensors as the real files have
them); the oracle is diffusers itself: the same weights in its own model, the adapter loaded by diffusers
(kohya conversion, PEFT injection) and fused (``fuse_lora``), and our merged single file read back through
diffusers' own single-file converters — the two must agree tensor for tensor.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oracle import run_cli

diffusers = pytest.importorskip("diffusers", reason="needs diffusers==0.42.1 (a test dependency)")
pytest.importorskip("lycoris", reason="needs lycoris-lora==4.1.3 (a test dependency)")
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from test_families import _flux_converter, build
from test_kohya_lycoris import _kohya_network

from wsurgery.families import detect_folder


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    err = float((got.double() - want.double()).abs().max())
    assert err <= rel * float(want.double().abs().max()) + 1e-7, err


def _single_file(name: str, tmp_path: Path, comps: dict[str, dict[str, torch.Tensor]]) -> Path:
    folder = detect_folder({c: {k: tuple(v.shape) for k, v in d.items()} for c, d in comps.items()}, where=name)
    assert folder is not None
    sf = folder.to_single_file({f"{c}.{k}": v for c, d in comps.items() for k, v in d.items()})
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sf.items()}, str(path))
    return path


def test_kohya_lora_into_sd1_single_file_equals_diffusers_fuse(tmp_path, capsys):
    comps, _, conv = build("sd1")
    _, ucfg = _unet_config()
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(comps["unet"])
    net_unet = copy.deepcopy(unet)
    _, lora = _kohya_network(net_unet, tmp_path, {"ss_network_module": "networks.lora", "ss_network_dim": "4",
                                                  "ss_network_alpha": "2.0", "ss_base_model_version": "sd_v1"},
                             algo="lora", conv_dim="2", conv_alpha="1")
    base = _single_file("sd1", tmp_path, comps)
    out = tmp_path / "merged.safetensors"
    status, _, err = run_cli(["merge", base, f"{lora}:0.7", out, "-q"], capsys)
    assert status == 0, err
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(lora))
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="kohya")
    unet.fuse_lora(lora_scale=0.7)
    unet.unload_lora()
    fused = unet.state_dict()
    merged = load_file(out)
    ours = conv["unet"](merged)
    before = conv["unet"](load_file(base))
    changed = [k for k in fused if not torch.equal(fused[k], comps["unet"][k])]
    assert len(changed) > 10
    for k, want in fused.items():
        _close(ours[k], want)
    assert all(torch.equal(ours[k], before[k]) for k in fused if k not in changed)
    # nothing else in the file changed, byte for byte
    original = load_file(base)
    untouched = [k for k in original if not k.startswith("model.diffusion_model.")]
    assert untouched and all(torch.equal(merged[k], original[k]) for k in untouched)
    status, stdout, err = run_cli(["verify", base, lora, out, "--scale", "0.7"], capsys)
    assert status == 0, stdout + err
    # verify must see a wrong merge: one changed tensor put back to the base's
    name = next(k for k in merged if k.startswith("model.diffusion_model.") and not torch.equal(merged[k], original[k]))
    save_file({**merged, name: original[name]}, str(tmp_path / "wrong.safetensors"))
    status, stdout, _ = run_cli(["verify", base, lora, tmp_path / "wrong.safetensors", "--scale", "0.7"], capsys)
    assert status != 0 and "FAIL" in stdout


def _unet_config():
    from test_families import _unet

    return _unet("sd1")


def _flux() -> tuple[FluxTransformer2DModel, dict[str, dict[str, torch.Tensor]]]:
    comps, _, _ = build("flux")
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    model.load_state_dict(comps["transformer"])
    return model, comps


def test_diffusers_lora_on_split_qkv_into_flux_fused_tensors(tmp_path, capsys):
    """A diffusers-format Flux LoRA (to_q, to_k, to_v, proj_mlp separately) lands in row slices of BFL's fused
    ``img_attn.qkv`` and ``linear1`` = [q; k; v; mlp]; diffusers' fuse_lora on its own model is the judge."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model, comps = _flux()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_mlp", "add_q_proj"])
    model.add_adapter(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=config.to_dict())
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    base = _single_file("flux", tmp_path, comps)
    out = tmp_path / "merged.safetensors"
    status, _, err = run_cli(["merge", base, f"{lora}:0.6", out, "-q"], capsys)
    assert status == 0, err
    model.fuse_lora(lora_scale=0.6)
    fused = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    convert = _flux_converter()
    ours = convert({k: v for k, v in load_file(out).items() if k.startswith("model.diffusion_model.")})
    assert set(ours) == set(fused)
    changed = [k for k in fused if not torch.equal(fused[k], comps["transformer"][k])]
    assert any("single_transformer_blocks.0.proj_mlp" in k for k in changed)
    assert any("transformer_blocks.0.attn.to_k" in k for k in changed)
    for k, want in fused.items():
        _close(ours[k], want)


def test_adapter_for_another_family_is_refused(tmp_path, capsys):
    """An SD 1.x kohya LoRA on a Flux single file: its modules map to nothing; nothing is written."""
    comps, _, _ = build("sd1")
    _, ucfg = _unet_config()
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(comps["unet"])
    _, lora = _kohya_network(unet, tmp_path, {"ss_network_module": "networks.lora"}, algo="lora")
    _, flux = _flux()
    base = _single_file("flux", tmp_path, flux)
    out = tmp_path / "merged.safetensors"
    status, _, err = run_cli(["merge", base, lora, out, "-q"], capsys)
    assert status == 1 and "map to nothing in this Flux checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir()))  # no temporary left beside the inputs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_verify_refuses_a_scale_the_change_does_not_follow_linearly(tmp_path, capsys):
    """LyCORIS OFT puts the multiplier inside the rotation: verify's reference (y₀ + s·(y₁ − y₀)) does not hold at
    --scale 0.5, so verify refuses it; at --scale 1 the same merge verifies."""
    comps, _, _ = build("sd1")
    base = _single_file("sd1", tmp_path, comps)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    rows = comps["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].shape[0]
    g = torch.Generator().manual_seed(0)
    lora = tmp_path / "oft.safetensors"
    save_file({f"{name}.oft_blocks": torch.randn(rows // 4, 4, 4, generator=g) * 0.1,
               f"{name}.alpha": torch.tensor(1e-3)}, str(lora))
    for scale in ("1", "0.5"):
        out = tmp_path / f"merged-{scale}.safetensors"
        status, _, err = run_cli(["merge", base, lora, out, "--scale", scale, "-q"], capsys)
        assert status == 0, err
        status, stdout, err = run_cli(["verify", base, lora, out, "--scale", scale], capsys)
        if scale == "1":
            assert status == 0, stdout + err
        else:
            assert status == 1 and "does not scale linearly" in err and len(err.strip().splitlines()) == 1
