"""``wsurgery inspect`` on kohya / LyCORIS / diffusers adapter files, through the CLI.

Without a base: what LyCORIS' own network says it saved (algorithm, rank, alpha per module) and the metadata.
With ``--base`` (a single file): where each module lands is judged by diffusers — its kohya converters name the
diffusers module a kohya name stands for, and the stored region we print (tensor, rows) must hold exactly that
module's diffusers weight; modules that land nowhere are listed with the reason, and a merge refuses the file.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from oracle import run_cli

pytest.importorskip("diffusers", reason="needs diffusers==0.42.1 (a test dependency)")
pytest.importorskip("lycoris", reason="needs lycoris-lora==4.1.3 (a test dependency)")
from diffusers.loaders import lora_conversion_utils as lcu
from test_diffusion_merge import _single_file
from test_families import _peft_modules, build
from test_kohya_lycoris import _kohya_network, tiny_unet  # noqa: F401  (fixture)


def kohya_file(path: Path, shapes: dict[str, tuple[int, ...]], rank: int = 2, alpha: float | None = 1.0,
               metadata: dict[str, str] | None = None, seed: int = 0) -> Path:
    """A kohya LoRA file (lora_down/lora_up/alpha) for modules whose weight shapes are given; random factors."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        conv = len(shape) == 4
        state[f"{name}.lora_down.weight"] = torch.randn((rank, *shape[1:]) if conv else (rank, shape[1]),
                                                        generator=g) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn((shape[0], rank, 1, 1) if conv else (shape[0], rank),
                                                      generator=g) * 0.3
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path), metadata=metadata)
    return path


def diffusers_targets(kohya: str) -> set[str]:
    """The diffusers modules (``unet.…``, ``text_encoder_2.…``) diffusers' SD/SDXL loader puts a kohya name on."""
    sd = {kohya + ".lora_down.weight": torch.zeros(1, 2), kohya + ".lora_up.weight": torch.zeros(2, 1)}
    if kohya.startswith("lora_unet_"):
        sd = lcu._maybe_map_sgm_blocks_to_diffusers(sd, SimpleNamespace(layers_per_block=2))
    out, _ = lcu._convert_non_diffusers_lora_to_diffusers(sd)
    return _peft_modules(out)


# SDXL names as sd-scripts writes them (SGM UNet names, transformers' CLIP names) and as other trainers do
# (diffusers UNet names); te2 is OpenCLIP in the single file: q/k/v are row slices of in_proj_weight.
SDXL_NAMES = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
              "lora_unet_input_blocks_4_1_proj_in",
              "lora_unet_output_blocks_0_0_in_layers_2",
              "lora_unet_down_blocks_2_attentions_0_transformer_blocks_1_ff_net_2",
              "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
              "lora_te1_text_model_encoder_layers_1_mlp_fc2",
              "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
              "lora_te2_text_model_encoder_layers_1_self_attn_v_proj",
              "lora_te2_text_model_encoder_layers_1_mlp_fc1"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    comps, _, _ = build("sdxl")
    tmp = tmp_path_factory.mktemp("sdxl")
    shapes = {}
    for k in SDXL_NAMES:
        (target,) = diffusers_targets(k)
        comp, _, module = target.partition(".")
        shapes[k] = tuple(comps[comp][module + ".weight"].shape)
    lora = kohya_file(tmp / "sdxl_lora.safetensors", shapes, rank=2, alpha=1.0,
                      metadata={"ss_network_module": "networks.lora", "ss_network_dim": "2",
                                "ss_base_model_version": "sdxl_base_v1-0"})
    return comps, _single_file("sdxl", tmp, comps), lora


def _inspect(args, capsys) -> dict:
    status, out, err = run_cli(["inspect", *args, "--json"], capsys)
    assert status == 0, err
    return json.loads(out)


def test_lycoris_network_file_without_base(tiny_unet, tmp_path, capsys):  # noqa: F811
    """A LyCORIS LoHa network with conv layers: per-algo counts, ranks and alphas are what LyCORIS' network made
    (conv_dim/conv_alpha on convs, dim/alpha elsewhere); the family comes from ss_base_model_version."""
    args = {"algo": "loha", "conv_dim": "2", "conv_alpha": "1"}
    net, path = _kohya_network(copy.deepcopy(tiny_unet), tmp_path,
                               {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args),
                                "ss_base_model_version": "sd_v1", "modelspec.title": "tiny"}, **args)
    info = _inspect([path], capsys)
    assert info["type"] == "adapter_file" and info["format"] == "kohya"
    assert info["num_modules"] == len(net.unet_loras)
    assert info["algos"] == {"loha": len(net.unet_loras)}
    assert info["ranks"] == {str(r): n for r, n in Counter(m.lora_dim for m in net.unet_loras).most_common()}
    assert info["alphas"] == {f"{a:g}": n for a, n in Counter(float(m.alpha) for m in net.unet_loras).most_common()}
    assert info["prefixes"] == {"lora_unet": len(net.unet_loras)}
    assert info["base_family"]["family"] == "sd1" and "ss_base_model_version=sd_v1" in info["base_family"]["from"]
    assert info["metadata"]["ss_network_module"] == "lycoris.kohya" and info["metadata"]["modelspec.title"] == "tiny"
    assert {r["module"]: (r["rank"], r["alpha"]) for r in info["modules"]} == {
        m.lora_name: (m.lora_dim, float(m.alpha)) for m in net.unet_loras}
    status, text, _ = run_cli(["inspect", path], capsys)
    assert status == 0
    assert f"modules     {len(net.unet_loras)} in" in text and "loha" in text and "SD 1.x" in text
    assert "lycoris.kohya" in text


def test_sdxl_kohya_file_lands_where_diffusers_puts_it(sdxl, capsys):
    """Every module of an SDXL kohya file (SGM and diffusers UNet names, both text encoders) lands on a stored
    region that holds exactly the weight of the diffusers module diffusers' loader targets."""
    comps, base, lora = sdxl
    info = _inspect([lora], capsys)
    assert info["base_family"]["family"] == "sdxl"
    assert info["prefixes"] == {"lora_unet": 5, "lora_te1": 2, "lora_te2": 3}
    info = _inspect([lora, "--base", base], capsys)
    assert info["base"]["family"] == "sdxl" and info["base"]["layout"] == "single-file"
    assert info["base"]["same_family"] is True and info["base_family"]["conflict"] is None
    assert info["placed"] == len(SDXL_NAMES) and info["unplaced"] == []
    stored = load_file(base)
    sliced = 0
    for row in info["modules"]:
        (target,) = diffusers_targets(row["module"])
        comp, _, module = target.partition(".")
        want = comps[comp][module + ".weight"]
        (spot,) = row["lands"]
        t = stored[spot["tensor"]]
        if spot["rows"] is not None:
            t = t[spot["rows"][0]:spot["rows"][1]]
            sliced += 1
        assert torch.equal(t.reshape(spot["as"]), want), row["module"]
    assert sliced == 2  # te2's k and v: rows of OpenCLIP's in_proj_weight
    status, text, _ = run_cli(["inspect", lora, "--base", base], capsys)
    assert status == 0 and "placed      10 of 10 modules" in text
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight[16:32]" in text


def test_flux_kohya_qkv_lands_in_row_order(tmp_path, capsys):
    """A kohya Flux LoRA on BFL's fused ``img_attn.qkv``: one module, three row slices, in the order diffusers'
    ``_convert_kohya_flux_lora_to_diffusers`` splits it (lora_up rows numbered to tell)."""
    comps, _, _ = build("flux")
    base = _single_file("flux", tmp_path, comps)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    lora = kohya_file(tmp_path / "flux_lora.safetensors", {name: (48, 16)})
    info = _inspect([lora, "--base", base], capsys)
    assert info["base"]["family"] == "flux" and info["base_family"]["family"] == "flux"
    (row,) = info["modules"]
    sd = {name + ".lora_down.weight": torch.zeros(1, 2), name + ".alpha": torch.tensor(1.0),
          name + ".lora_up.weight": torch.arange(48.0).reshape(48, 1)}
    first_row = {k.rsplit(".lora_B", 1)[0]: v[0, 0].item()
                 for k, v in lcu._convert_kohya_flux_lora_to_diffusers(sd).items() if ".lora_B" in k}
    order = sorted(first_row, key=first_row.__getitem__)
    assert [s["rows"] for s in row["lands"]] == [[int(first_row[m]), int(first_row[m]) + 16] for m in order]
    stored = load_file(base)
    for spot, module in zip(row["lands"], order):
        assert spot["tensor"] == "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
        want = comps["transformer"][module.removeprefix("transformer.") + ".weight"]
        assert torch.equal(stored[spot["tensor"]][spot["rows"][0]:spot["rows"][1]], want), module


def test_modules_that_land_nowhere_are_listed_with_the_reason(tmp_path, capsys):
    """An SD 1.x-style file on SDXL: a first-level attention SDXL has not, a ``lora_te_`` prefix SDXL has not;
    on a UNet-only SDXL file, ``lora_te2_`` names a text encoder the file leaves out. The same file is refused
    by merge, with nothing written."""
    comps, _, _ = build("sdxl")
    unet_only = {"unet": comps["unet"]}
    base = _single_file("sdxl", tmp_path, unet_only)
    ok = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    shapes = {ok: (16, 16), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (8, 8),
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (16, 16),
              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (16, 16)}
    lora = kohya_file(tmp_path / "mixed.safetensors", shapes, metadata={"ss_base_model_version": "sd_v1"})
    info = _inspect([lora, "--base", base], capsys)
    assert info["base"]["same_family"] is False and info["base_family"]["family"] == "sd1"
    assert "the metadata says SD 1.x but the module names (lora_te2_" in info["base_family"]["conflict"]
    assert info["placed"] == 1 and [r["module"] for r in info["modules"] if r["lands"]] == [ok]
    reasons = {u["module"]: u["reason"] for u in info["unplaced"]}
    assert "no unet module of a SDXL model is named so" in reasons[
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert "names no part of a SDXL model" in reasons["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert "text_encoder_2, which this checkpoint does not hold" in reasons[
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]
    status, text, _ = run_cli(["inspect", lora, "--base", base], capsys)
    assert status == 0 and "3 map to nothing" in text and text.count("-> NOTHING:") == 3
    assert "NOT the family the adapter is for" in text and "WARNING     the metadata says SD 1.x" in text
    out = tmp_path / "merged.safetensors"
    status, _, err = run_cli(["merge", base, lora, out, "-q"], capsys)
    assert status == 1 and "3 of its modules map to nothing" in err and not out.exists()


def test_diffusers_format_file(tmp_path, capsys):
    """A diffusers-format file (``unet.….lora_A/B``, alpha from lora_adapter_metadata as diffusers saves it):
    format, rank and alpha as PEFT's config says; names alone say SD 1.x/2.x."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from test_families import _unet

    _, cfg = _unet("sd1")
    unet = UNet2DConditionModel(**cfg)
    config = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"to_k": 2}, target_modules=["to_q", "to_k"])
    unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    info = _inspect([tmp_path / "pytorch_lora_weights.safetensors"], capsys)
    n_q = sum(1 for r in info["modules"] if r["module"].endswith("to_q"))
    assert info["format"] == "diffusers" and info["prefixes"] == {"unet": 2 * n_q}
    assert info["ranks"] == {"4": 2 * n_q} and info["alphas"] == {"8": n_q, "2": n_q}
    assert info["base_family"]["family"] == "sd1|sd2|sdxl" and info["base_family"]["conflict"] is None


def test_single_file_checkpoint_is_no_adapter(tmp_path, capsys):
    """A single-file checkpoint is inspected as one (its names are no adapter format's), even a bare Flux file
    whose few top-level names (``img_in.weight``) look like kohya modules; --base with it is refused; a broken
    adapter file is read as an adapter, to say what is wrong with it."""
    comps, _, _ = build("sd1")
    base = _single_file("sd1", tmp_path, comps)
    assert _inspect([base], capsys)["type"] == "checkpoint"
    flux, _, _ = build("flux")
    bare = tmp_path / "bare_flux.safetensors"
    save_file({k.removeprefix("model.diffusion_model."): v for k, v in load_file(
        _single_file("flux", tmp_path, flux)).items() if k.startswith("model.diffusion_model.")}, str(bare))
    assert _inspect([bare], capsys)["type"] == "checkpoint"
    broken = kohya_file(tmp_path / "broken.safetensors", {"lora_unet_a": (4, 4), "lora_unet_b": (4, 4)})
    save_file({**load_file(broken), "lora_unet_a.hada_w9": torch.zeros(1)}, str(broken))
    status, _, err = run_cli(["inspect", broken], capsys)
    assert status == 1 and "lora_unet_a.hada_w9" in err and len(err.strip().splitlines()) == 1
    status, _, err = run_cli(["inspect", base, "--base", base], capsys)
    assert status == 1 and "--base is for adapters" in err and len(err.strip().splitlines()) == 1
