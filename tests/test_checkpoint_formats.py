"""Checkpoint formats behind one interface (``wsurgery/checkpoint/formats``) and GGUF tensors as ggml encodings.

Every registered format has a fixture here and round-trips: opened, rewritten by the engine with no
change, reopened, every tensor equal to what transformers/torch/gguf wrote. The ggml encoding decodes
as the ``gguf`` package's reader and dequantizer do (the same reference transformers' GGUF loader
uses), by rows exactly as whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_tiny import _permute, tiny_llama, write_llama_gguf
from oracle import run_cli
from safetensors.torch import load_file, save_file

from wsurgery.checkpoint.formats import file_format, open_checkpoint, registered_formats
from wsurgery.describe import describe_checkpoint
from wsurgery.engine import execute, plan
from wsurgery.errors import InputError, UnsupportedError
from wsurgery.quant.encodings import EncodedTensorInfo, registered
from wsurgery.quant.encodings.ggml import Ggml

HEADS, KV_HEADS = 4, 2


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(16, 8, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g).to(torch.bfloat16),
            "model.layers.0.mlp.down_proj.weight": torch.randn(8, 12, generator=g).to(torch.float16),
            "model.norm.weight": torch.randn(8, generator=g)}


def _config(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))


def _safetensors(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = root / "st"
    folder.mkdir()
    state = _state()
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    _config(folder)
    return folder, state


def _bin(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = root / "bin"
    folder.mkdir()
    state = _state(1)
    torch.save(state, folder / "pytorch_model.bin")
    _config(folder)
    return folder, state


def _gguf(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    model = tiny_llama()
    return write_llama_gguf(model, root / "tiny.gguf", T.F16), {k: v.detach() for k, v in model.state_dict().items()}


def _diffusers(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A pipeline folder: one model component (keys stored component-relative) and a side folder."""
    folder = root / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    state = _state(2)
    save_file(state, folder / "unet" / "diffusion_pytorch_model.safetensors")
    _config(folder / "unet")
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"],
                                                         "scheduler": ["diffusers", "DDIMScheduler"]}))
    return folder, {f"unet.{k}": v for k, v in state.items()}


FIXTURES = {"safetensors": _safetensors, "bin": _bin, "gguf": _gguf, "diffusers": _diffusers}


def test_every_registered_format_has_a_round_trip_fixture():
    assert {f.name for f in registered_formats()} == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_each_format_round_trips_through_the_engine(name, tmp_path):
    path, state = FIXTURES[name](tmp_path)
    ckpt = open_checkpoint(path)
    assert ckpt.format.name == name and describe_checkpoint(ckpt)["format"] == name
    for key, want in state.items():
        if key in ckpt.tensors:
            got = ckpt.read(key)
            if name == "gguf":  # written in F16 from float32 (1-D tensors F32): gguf's own rounding
                want = want.to(torch.float16).to(got.dtype) if want.ndim > 1 else want
            assert torch.equal(got, want), key
    out = tmp_path / "out"
    result = execute(plan(ckpt, []), out, progress=False)
    again = open_checkpoint(out)
    assert again.format.name == ("diffusers" if name == "diffusers" else "safetensors")  # a pipeline stays one
    assert result.changed_tensors == 0
    assert set(again.tensors) == set(ckpt.tensors)
    for key in ckpt.tensors:
        assert torch.equal(again.read(key), ckpt.read(key)), key
    if file_format(path) is not None:  # a format that writes its own files writes the same file back
        execute(plan(ckpt, []), tmp_path / ("copy" + path.suffix), progress=False)
        assert (tmp_path / ("copy" + path.suffix)).read_bytes() == path.read_bytes()


def test_bin_output_is_named_as_save_pretrained_names_safetensors(tmp_path):
    folder, state = _bin(tmp_path)
    save_file(state, folder / "model.safetensors")  # both: transformers prefers safetensors, and so do we
    assert open_checkpoint(folder).format.name == "safetensors"
    (folder / "model.safetensors").unlink()
    execute(plan(open_checkpoint(folder), []), tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    for key, value in load_file(tmp_path / "out" / "model.safetensors").items():
        assert torch.equal(value, state[key])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("ggml")
    model = tiny_llama(seed=3)
    types = {"blk.0.ffn_up.weight": T.Q4_0, "blk.0.ffn_down.weight": T.Q5_1, "blk.1.ffn_up.weight": T.Q4_1}
    return write_llama_gguf(model, root / "q.gguf", T.Q8_0, types)


def test_gguf_tensors_are_encoded_tensors_of_ggml_types(quantized):
    ckpt = open_checkpoint(quantized)
    assert Ggml in registered()
    infos = list(ckpt.tensors.values())
    assert all(isinstance(i, EncodedTensorInfo) and isinstance(i.encoding, Ggml) for i in infos)
    kinds = {i.gguf_name: i.encoding.describe() for i in infos}
    assert kinds["blk.0.ffn_up.weight"] == "q4_0" and kinds["blk.0.attn_q.weight"] == "q8_0"
    assert kinds["output_norm.weight"] == "f32"
    listed = {t["name"]: t["stored_as"] for t in describe_checkpoint(ckpt)["tensors"]}
    assert listed["model.layers.0.mlp.up_proj.weight"] == "blk.0.ffn_up.weight q4_0"


def test_ggml_decode_is_the_gguf_packages_dequantize(quantized):
    """Each tensor as gguf's reader + ``gguf.quants.dequantize`` give it, in Hugging Face layout
    (Q/K rows de-interleaved as transformers' GGUF loader does)."""
    ckpt = open_checkpoint(quantized)
    by_gguf = {i.gguf_name: name for name, i in ckpt.tensors.items()}
    for t in gguf.GGUFReader(quantized).tensors:
        want = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        kind = t.name.split(".")[-2]
        if kind in ("attn_q", "attn_k"):  # stored permuted: undo llama.cpp's permute
            heads = HEADS if kind == "attn_q" else KV_HEADS
            want = _unpermute(want, heads)
        got = ckpt.read(by_gguf[t.name]).numpy()
        assert got.dtype == np.float32 and np.array_equal(got, want), t.name


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    out = w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(_permute(out, n_head), w)
    return out


def test_ggml_decodes_rows_exactly_as_whole(quantized):
    ckpt = open_checkpoint(quantized)
    chunked = 0
    for name, info in ckpt.tensors.items():
        step = info.encoding.row_chunk(info)
        if step is None:
            assert info.layout.heads is not None or len(info.shape) < 2, name
            continue
        whole = ckpt.read(name)
        rows = info.shape[0]
        parts = [info.encoding.decode(info, ckpt.read_part, (a, min(a + 5, rows))) for a in range(0, rows, 5)]
        assert torch.equal(torch.cat(parts), whole), name
        chunked += 1
    assert chunked >= 10


def test_ggml_tensors_are_not_re_encoded_into_safetensors(quantized, tmp_path, capsys):
    code, _, err = run_cli(["dequantize", quantized, tmp_path / "x.gguf"], capsys)
    assert code == 1 and "dequantize writes a safetensors folder" in err
    code, _, err = run_cli(["dequantize", quantized, tmp_path / "plain", "-q"], capsys)
    assert code == 0
    plain = open_checkpoint(tmp_path / "plain")
    base = open_checkpoint(quantized)
    assert not any(isinstance(i, EncodedTensorInfo) for i in plain.tensors.values())
    for name in base.tensors:
        assert torch.equal(plain.read(name), base.read(name)), name
    with pytest.raises(UnsupportedError, match="ggml types are written into a GGUF file"):
        from wsurgery.quant.checkpoints import requantize_targets

        requantize_targets(base, True)


def test_unknown_and_missing_files_keep_their_messages(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        open_checkpoint(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"not a checkpoint file \(expected .safetensors, .bin, .gguf"):
        open_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match="this is an adapter folder"):
        open_checkpoint(tmp_path)


def test_ggml_tensors_stream_in_row_chunks_as_whole(quantized, tmp_path, monkeypatch):
    """With chunks of a few rows (the engine's path for large tensors), a merge into a GGUF base written
    as a folder gives the same bytes as whole-tensor reads; Q/K (interleaved rows) stay whole."""
    import wsurgery.engine as engine
    from oracle import make_adapter
    from peft import LoraConfig

    from wsurgery.adapters import load_adapter

    lora = make_adapter(tiny_llama(seed=3), LoraConfig(r=2, target_modules=["up_proj", "q_proj"]), tmp_path / "ad")
    base = open_checkpoint(quantized)
    adapters = [(load_adapter(lora), 1.0)]
    execute(plan(base, adapters), tmp_path / "whole", progress=False)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1000)
    chunks = engine._RowChunks(base, plan(base, adapters), {}, {})
    assert len(chunks.spans("model.layers.0.mlp.up_proj.weight")) > 1
    assert len(chunks.spans("model.layers.1.mlp.down_proj.weight")) > 1  # unchanged, decoded in chunks too
    assert not chunks.spans("model.layers.0.self_attn.q_proj.weight")
    execute(plan(base, adapters), tmp_path / "chunked", progress=False)
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    parts = load_file(tmp_path / "chunked" / "model.safetensors")
    assert whole.keys() == parts.keys()
    for key in whole:
        assert torch.equal(whole[key], parts[key]), key
