"""A diffusers pipeline folder opened as ONE checkpoint and written back alike.

Oracles: diffusers' own ``save_pretrained`` (plain, ``variant="fp16"``, ``max_shard_size``) writes the
folders; safetensors' reader says what each component file holds; ``DiffusionPipeline.from_pretrained``
(and each component's ``from_pretrained``) loads what we write; ``wsurgery.families.detect_folder``
(H18a, on ``read_folder``'s view of the files) gives the canonical parameter names.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import cast

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from oracle import run_cli
from wsurgery import engine
from wsurgery.checkpoint import CheckpointWriter, TensorSpec, open_checkpoint, plan_shards
from wsurgery.checkpoint.formats.diffusers import DIFFUSERS, open_diffusers
from wsurgery.checkpoint.formats.safetensors import SAFETENSORS
from wsurgery.errors import InputError, UnsupportedError
from wsurgery.families import detect_folder, read_folder

WEIGHTED = {"sd1": ("text_encoder", "unet", "vae"), "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae")}


def _tokenizer(folder: Path) -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _clip(cls=CLIPTextModel):
    return cls(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              vocab_size=50, max_position_embeddings=8, projection_dim=12))


def _pipeline(kind: str, scratch: Path):
    """A tiny SD 1.x or SDXL pipeline (the UNet configs of tests/test_families.py), random weights."""
    torch.manual_seed(0)
    cfg: dict = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16),
                     cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    if kind == "sdxl":
        cfg.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 1, 2), use_linear_projection=True, cross_attention_dim=32,
                   addition_embed_type="text_time", addition_time_embed_dim=4,
                   projection_class_embeddings_input_dim=12 + 6 * 4)
    else:
        cfg.update(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    unet = UNet2DConditionModel(**cfg)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1)
    for model in (unet, vae):  # random values everywhere: a zero-initialised tensor hides a swapped one
        for p in cast(torch.nn.Module, model).parameters():
            p.data.normal_()
    tok = _tokenizer(scratch)
    if kind == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=_clip(), tokenizer=tok, unet=unet,
                                         text_encoder_2=_clip(CLIPTextModelWithProjection), tokenizer_2=tok,
                                         scheduler=EulerDiscreteScheduler())
    return StableDiffusionPipeline(vae=vae, text_encoder=_clip(), tokenizer=tok, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _hub_text_model_keys(component: Path) -> None:
    """Rewrite a CLIPTextModel's file as the Hub's folders hold it (``text_model.`` keys, as transformers 4
    saved them; transformers 5 saves without and loads both)."""
    f = component / "model.safetensors"
    save_file({f"text_model.{k}": v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})


LAYOUTS = {  # name -> save_pretrained options, and the variant a loader asks for
    "plain": ({}, None),
    "fp16": ({"variant": "fp16"}, "fp16"),
    "sharded": ({"max_shard_size": "20KB"}, None),
    "sharded_fp16": ({"max_shard_size": "20KB", "variant": "fp16"}, "fp16"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(kind, layout) -> the folder save_pretrained wrote."""
    root = tmp_path_factory.mktemp("pipes")
    out = {}
    for kind in ("sd1", "sdxl"):
        pipe = _pipeline(kind, root)
        for layout, (options, _) in LAYOUTS.items():
            if kind == "sdxl" and layout not in ("plain", "sharded_fp16"):
                continue
            folder = root / f"{kind}_{layout}"
            if layout.endswith("fp16"):
                pipe.to(torch.float16)
            pipe.save_pretrained(folder, **options)
            pipe.to(torch.float32)
            if kind == "sdxl" and layout == "plain":
                _hub_text_model_keys(folder / "text_encoder")
            out[kind, layout] = folder
    return out


def _files(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every component weight file, read by safetensors: relative path -> its tensors."""
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out[str(f.relative_to(folder))] = {k: h.get_tensor(k) for k in h.keys()}
    return out


def _all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind,layout", [("sd1", "plain"), ("sd1", "fp16"), ("sd1", "sharded"),
                                         ("sd1", "sharded_fp16"), ("sdxl", "plain"), ("sdxl", "sharded_fp16")])
def test_open_lists_every_component_tensor_under_its_canonical_name(folders, kind, layout):
    folder = folders[kind, layout]
    ckpt = open_checkpoint(folder)
    assert ckpt.format.name == "diffusers" and ckpt.side_files
    want = {f"{path.split('/')[0]}.{k}": v for path, tensors in _files(folder).items() for k, v in tensors.items()}
    assert list(ckpt.tensors) == [n for n in ckpt.tensors if n in want] and set(ckpt.tensors) == set(want)
    for name, tensor in want.items():
        info = ckpt.tensors[name]
        assert (info.dtype, tuple(info.shape)) == (tensor.dtype, tuple(tensor.shape)), name
        assert torch.equal(ckpt.read(name), tensor), name
    components, pipeline = read_folder(folder)
    family = detect_folder(components, pipeline_class=pipeline)
    assert family is not None and family.name == kind
    assert set(family.parameters()) == set(ckpt.tensors)
    assert sorted(ckpt.components) == sorted(WEIGHTED[kind])
    assert ckpt.side_folders == (["scheduler", "tokenizer", "tokenizer_2"] if kind == "sdxl"
                                 else ["scheduler", "tokenizer"])
    if kind == "sdxl" and layout == "plain":
        assert "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.weight" in ckpt.tensors
        assert "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight" in ckpt.tensors  # the Hub's keys
        assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight" in ckpt.tensors


def _copy_by_writer(ckpt, out: Path, max_shard_size: int | None = None) -> None:
    """What the engine does with a format's output layout, parts and side files, with nothing changed."""
    fmt = ckpt.format
    assignment, single, _ = fmt.output_layout(ckpt)
    parts = fmt.output_parts(ckpt)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in ckpt.tensors.items()]
    out.mkdir()
    writer = CheckpointWriter(out, plan_shards(specs, assignment, max_shard_size, single, parts), None, parts)
    for name in ckpt.tensors:
        if not fmt.copy_raw(ckpt, writer, name, None):
            writer.write(name, ckpt.read(name))
    writer.close()
    fmt.copy_side_files(ckpt, out)


def _copy_by_engine(ckpt, out: Path, max_shard_size: int | None = None) -> None:
    engine.execute(engine.plan(ckpt, []), out, progress=False, max_shard_size=max_shard_size)


def _assert_loads_equal(src: Path, out: Path, kind: str, variant: str | None) -> None:
    a = DiffusionPipeline.from_pretrained(src, variant=variant)
    b = DiffusionPipeline.from_pretrained(out, variant=variant)
    assert type(a) is type(b)
    for comp in WEIGHTED[kind]:
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        assert sa.keys() == sb.keys(), comp
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{comp}.{k}"
    assert b.tokenizer("a b").input_ids == a.tokenizer("a b").input_ids
    assert type(b.scheduler) is type(a.scheduler)


# the writer path (what the engine does, driven here) on one layout; the engine on the others
@pytest.mark.parametrize("kind,layout,how", [
    ("sd1", "sharded_fp16", "writer"),
    *((kind, layout, "engine") for kind, layout in [("sd1", "plain"), ("sd1", "fp16"), ("sd1", "sharded_fp16"),
                                                    ("sdxl", "sharded_fp16")])])
def test_rewrite_keeps_the_layout_and_loads_in_diffusers(folders, tmp_path, kind, layout, how):
    src = folders[kind, layout]
    out = tmp_path / "out"
    (_copy_by_writer if how == "writer" else _copy_by_engine)(open_checkpoint(src), out)
    assert _all_files(out) == _all_files(src)  # same files: weights, indexes, configs, scheduler, tokenizers
    written = _files(out)
    for path, tensors in _files(src).items():  # same keys (component-relative), same values, same files
        got = written[path]
        assert list(got) == list(tensors) and all(torch.equal(got[k], v) for k, v in tensors.items()), path
    for index in src.rglob("*.index*.json"):
        assert json.loads((out / index.relative_to(src)).read_text())["weight_map"] == \
            json.loads(index.read_text())["weight_map"]
    _assert_loads_equal(src, out, kind, LAYOUTS[layout][1])
    assert open_checkpoint(out).tensors.keys() == open_checkpoint(src).tensors.keys()


@pytest.mark.parametrize("how", ["writer", "engine"])
def test_max_shard_size_shards_each_component_on_its_own(folders, tmp_path, how):
    src = folders["sd1", "plain"]
    out = tmp_path / "out"
    (_copy_by_writer if how == "writer" else _copy_by_engine)(open_checkpoint(src), out, 30_000)
    unet = sorted(p.name for p in (out / "unet").glob("*.safetensors"))
    assert len(unet) > 1 and unet[0] == f"diffusion_pytorch_model-00001-of-{len(unet):05d}.safetensors"
    index = json.loads((out / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(unet) and "conv_in.weight" in index["weight_map"]
    text = sorted(p.name for p in (out / "text_encoder").glob("*.safetensors"))
    assert text == (["model.safetensors"] if len(text) == 1 else text)
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.index.json"))
    _assert_loads_equal(src, out, "sd1", None)
    UNet2DConditionModel.from_pretrained(out / "unet")  # each component on its own, too


def test_a_chosen_variant_opens_a_folder_holding_both(folders, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(folders["sd1", "plain"], both)
    for comp in WEIGHTED["sd1"]:
        shutil.copy(next((folders["sd1", "fp16"] / comp).glob("*.safetensors")), both / comp)
    ckpt = open_diffusers(both, DIFFUSERS, variant="fp16")
    assert {t.dtype for t in ckpt.tensors.values()} == {torch.float16}
    assert all(".fp16." in t.file.name for t in ckpt.tensors.values())
    plain = DIFFUSERS.open_variant(both / "model_index.json", "")  # what a --variant option calls
    assert plain.tensors["unet.conv_in.weight"].dtype == torch.float32
    with pytest.raises(InputError, match="a variant applies to diffusers pipeline folders"):
        SAFETENSORS.open_variant(both / "unet" / "diffusion_pytorch_model.safetensors", "fp16")


def test_inspect_shows_the_components(folders, capsys):
    code, out, err = run_cli(["inspect", folders["sdxl", "sharded_fp16"]], capsys)
    assert code == 0, err
    assert "StableDiffusionXLPipeline: 4 model component(s)" in out
    assert "(variant fp16)" in out and "text_encoder_2/" in out and "copied along: scheduler/, tokenizer/" in out
    assert "unet/diffusion_pytorch_model.fp16-00001-of-" in out
    code, out, _ = run_cli(["inspect", folders["sd1", "plain"], "--json"], capsys)
    info = json.loads(out)
    assert info["format"] == "diffusers"
    assert info["components"]["unet"]["files"] == ["diffusion_pytorch_model.safetensors"]


def _broken(folders, tmp_path, edit) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(folders["sd1", "sharded"], folder)
    edit(folder)
    return folder


def _both_variants(folder: Path) -> None:
    save_file({"conv_in.weight": torch.zeros(1)}, folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")


def _no_weights(folder: Path) -> None:
    for f in (folder / "vae").glob("diffusion_pytorch_model*"):
        f.unlink()


def _no_folder(folder: Path) -> None:
    shutil.rmtree(folder / "vae")


def _index_elsewhere(folder: Path) -> None:
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    wm = data["weight_map"]
    wm["conv_in.weight"] = next(f for f in wm.values() if f != wm["conv_in.weight"])  # another shard of the set
    index.write_text(json.dumps(data))


def _index_missing_one(folder: Path) -> None:
    index = folder / "text_encoder" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][next(iter(data["weight_map"]))]
    index.write_text(json.dumps(data))


def _stray_shard(folder: Path) -> None:
    save_file({"x": torch.zeros(1)}, folder / "vae" / "diffusion_pytorch_model-00011-of-00011.safetensors")


def _quantized(folder: Path) -> None:
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "unet" / "config.json").write_text(json.dumps(config))


BROKEN = {
    "both_variants": (_both_variants, InputError, r"unet: holds several variants of the weights \(non-variant, fp16\)"),
    "no_weights": (_no_weights, InputError, r"vae: model_index.json lists a model here, but the folder has no"),
    "no_folder": (_no_folder, InputError, r"lists component 'vae', but there is no vae/ folder"),
    "index_elsewhere": (_index_elsewhere, InputError, r"tensor 'conv_in.weight' is listed in "
                        r"diffusion_pytorch_model-\d+-of-\d+.safetensors but found in"),
    "index_missing_one": (_index_missing_one, InputError, r"model.safetensors.index.json: does not list tensor"),
    "stray_shard": (_stray_shard, InputError, r"a shard that no index of vae/ lists"),
    "quantized": (_quantized, UnsupportedError, r"the unet component is quantized"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bad_folders_are_refused_in_one_line_before_any_output(folders, tmp_path, capsys, case):
    edit, error, message = BROKEN[case]
    folder = _broken(folders, tmp_path, edit)
    with pytest.raises(error, match=message):
        open_checkpoint(folder)
    out = tmp_path / "out"
    code, _, err = run_cli(["dequantize", folder, out], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and str(folder) in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "wsurgery-tmp" in p.name]


def test_overwrite_replaces_a_pipeline_output_but_not_foreign_folders(folders, tmp_path):
    src = folders["sd1", "plain"]
    out = tmp_path / "out"
    for _ in range(2):
        engine.execute(engine.plan(open_checkpoint(src), []), out, progress=False, overwrite=True)
    assert _all_files(out) == _all_files(src)
    (out / "unet" / "notes").mkdir()
    with pytest.raises(InputError, match=r"holds files wsurgery does not write \(unet/notes/\)"):
        engine.execute(engine.plan(open_checkpoint(src), []), out, progress=False, overwrite=True)
    assert os.path.isdir(out / "unet" / "notes")
    with pytest.raises(InputError, match="is inside the input .* and would change it"):  # a pipeline is a model
        engine.execute(engine.plan(open_checkpoint(src), []), src / "merged", progress=False)


def test_merge_a_diffusers_lora_into_a_pipeline_folder_equals_fuse_lora(folders, tmp_path, capsys):
    """``wsurgery merge FOLDER lora.safetensors OUT``: a UNet + text-encoder LoRA saved by diffusers'
    ``save_lora_weights``; the judge is diffusers' ``load_lora_weights`` + ``fuse_lora`` on the same pipeline."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    src = folders["sd1", "plain"]
    pipe = StableDiffusionPipeline.from_pretrained(src)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "to_out.0", "proj_in",
                                                                        "conv1"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc1"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", src, f"{lora}:0.6", out, "-q"], capsys)
    assert code == 0, err
    assert _all_files(out) == _all_files(src)
    oracle = StableDiffusionPipeline.from_pretrained(src)
    oracle.load_lora_weights(tmp_path / "lora")
    oracle.fuse_lora(lora_scale=0.6)
    oracle.unload_lora_weights()
    ours, before = StableDiffusionPipeline.from_pretrained(out), StableDiffusionPipeline.from_pretrained(src)
    for comp, least in (("unet", 50), ("text_encoder", 4), ("vae", 0)):
        fused, got, base = (getattr(p, comp).state_dict() for p in (oracle, ours, before))
        assert fused.keys() == got.keys(), comp
        changed = [k for k in fused if not torch.equal(fused[k], base[k])]
        assert len(changed) >= least, comp
        for k, want in fused.items():
            if k in changed:
                err_k = float((got[k].double() - want.double()).abs().max())
                assert err_k <= 1e-5 * float(want.abs().max()), f"{comp}.{k}: {err_k}"
            else:  # untouched tensors come out as they were
                assert torch.equal(got[k], base[k]), f"{comp}.{k}"
    code, stdout, err = run_cli(["verify", src, lora, out, "--scale", "0.6"], capsys)
    assert code == 0 and "PASS" in stdout, stdout + err


def test_merge_a_kohya_lora_into_an_sdxl_folder_equals_fuse_lora(folders, tmp_path, capsys):
    """The issue's ``wsurgery merge ./stable-diffusion-xl-base-1.0 my_lora.safetensors OUT/``: a kohya LoRA/LoCon
    (LyCORIS' kohya network, as sd-scripts saves it) on the SDXL UNet; diffusers' kohya loader + ``fuse_lora``
    judges."""
    pytest.importorskip("lycoris", reason="needs lycoris-lora==4.1.3 (a test dependency)")
    from test_kohya_lycoris import _kohya_network
    src = folders["sdxl", "plain"]
    _, lora = _kohya_network(UNet2DConditionModel.from_pretrained(src / "unet"), tmp_path,
                             {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                              "ss_base_model_version": "sdxl_base_v1-0"}, algo="lora", conv_dim="2", conv_alpha="1")
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", src, f"{lora}:0.7", out, "-q"], capsys)
    assert code == 0, err
    assert _all_files(out) == _all_files(src)
    oracle = StableDiffusionXLPipeline.from_pretrained(src)
    oracle.load_lora_weights(str(lora))
    oracle.fuse_lora(lora_scale=0.7)
    oracle.unload_lora_weights()
    fused = oracle.unet.state_dict()
    got = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(src / "unet").state_dict()
    changed = [k for k in fused if not torch.equal(fused[k], base[k])]
    assert len(changed) > 100 and any("conv1" in k for k in changed) and any("attn2.to_k" in k for k in changed)
    for k, want in fused.items():
        if k in changed:
            assert float((got[k].double() - want.double()).abs().max()) <= 1e-5 * float(want.abs().max()), k
        else:
            assert torch.equal(got[k], base[k]), k
    for comp in ("text_encoder", "text_encoder_2", "vae"):  # untouched components: the same tensors
        ours, theirs = _files(out / comp), _files(src / comp)
        assert ours.keys() == theirs.keys(), comp
        for f, tensors in theirs.items():
            assert ours[f].keys() == tensors.keys() and all(torch.equal(ours[f][k], v) for k, v in tensors.items())


def test_a_pipeline_is_not_written_as_one_file(folders, tmp_path, capsys):
    """One .safetensors file cannot hold a pipeline as diffusers reads it (each model has its own keys and
    config): refused in one line, nothing written."""
    with pytest.raises(InputError, match="is a pipeline of several models, written back as a folder"):
        engine.execute(engine.plan(open_checkpoint(folders["sd1", "plain"]), []), tmp_path / "one.safetensors",
                       progress=False)
    assert not list(tmp_path.iterdir())


def test_a_hub_cache_snapshot_opens_and_a_link_out_is_refused(folders, tmp_path):
    """In the Hugging Face cache every file of a snapshot links to its repo's blobs/: that is read; a component
    file linking anywhere else is refused."""
    src = folders["sd1", "plain"]
    repo = tmp_path / "models--org--tiny-sd"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    for i, f in enumerate(p for p in sorted(src.rglob("*")) if p.is_file()):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    ckpt = open_checkpoint(snap)
    assert ckpt.tensors.keys() == open_checkpoint(src).tensors.keys()
    assert torch.equal(ckpt.read("unet.conv_in.weight"), open_checkpoint(src).read("unet.conv_in.weight"))
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(src / "vae" / "diffusion_pytorch_model.safetensors", outside)
    (snap / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (snap / "vae" / "diffusion_pytorch_model.safetensors").symlink_to(outside)
    with pytest.raises(InputError, match="is a link to a file outside"):
        open_checkpoint(snap)
