"""GGUF checkpoints: reading, merging into them, writing, requantizing, exporting llama.cpp LoRA adapters.

Judges: transformers' own GGUF loader (names, Q/K permutation, dequantization), PEFT's
``merge_and_unload`` (the merged weights), gguf's reader and quantizers (metadata, bytes). The GGUF
bases are built by ``gguf_tiny.write_llama_gguf`` as llama.cpp's converter would; llama.cpp itself
judges in test_gguf_llamacpp.py where llama-cpp-python is installed.
"""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_tiny import VOCAB, _permute, tiny_llama, tiny_model, write_llama_gguf
from oracle import make_adapter, oracle_merge, save_base
from peft import LoraConfig
from oracle import run_cli

import wsurgery
import wsurgery.api
from wsurgery.checkpoint import open_checkpoint
from wsurgery.errors import InputError, UnsupportedError

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEADS, KV_HEADS = 4, 2


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A tiny Llama (HF folder and GGUF in F32, F16, Q8_0) and PEFT LoRAs for it."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama()
    save_base(model, root / "hf")
    files = {t: write_llama_gguf(model, root / f"base-{t.name}.gguf", t) for t in (T.F32, T.F16, T.Q8_0)}
    lora = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=[*LINEAR, "lm_head", "embed_tokens"],
                                          rank_pattern={"q_proj": 8}, alpha_pattern={"down_proj": 3}),
                        root / "lora")
    return root, model, files, lora


def _gguf_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as gguf's reader dequantizes it (GGUF layout)."""
    reader = gguf.GGUFReader(path)
    return {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}


def _fields(path) -> dict[str, tuple]:
    reader = gguf.GGUFReader(path)
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _peft_model(model, lora):
    """PEFT's merge of ``lora`` into ``model``, as a model (for the test converter)."""
    merged = copy.deepcopy(model)
    merged.load_state_dict(oracle_merge(copy.deepcopy(model), lora))
    return merged


# -- reading -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [T.F32, T.F16, T.Q8_0], ids=lambda t: t.name)
def test_reader_matches_transformers_gguf_loader(w, kind):
    from transformers import AutoModelForCausalLM

    root, model, files, _ = w
    ckpt = open_checkpoint(files[kind])
    loaded = AutoModelForCausalLM.from_pretrained(root, gguf_file=files[kind].name).state_dict()
    assert set(ckpt.tensors) == set(loaded) == set(model.state_dict())
    for name, t in loaded.items():
        assert torch.equal(ckpt.read(name).float(), t.float()), name
    if kind == T.F32:  # the permutation is undone exactly: the original weights come back
        for name, t in model.state_dict().items():
            assert torch.equal(ckpt.read(name), t), name


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma2", "gemma3"])
def test_reader_other_architectures(tmp_path, arch):
    """Renamed only (Qwen) or with norms stored + 1 (Gemma): transformers' GGUF loader agrees exactly, and
    the original weights come back (Gemma's norms to float32 rounding of the + 1)."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    path = write_llama_gguf(model, tmp_path / f"{arch}.gguf")
    ckpt = open_checkpoint(path)
    original = {n: t for n, t in model.state_dict().items()
                if n != "lm_head.weight" or not model.config.tie_word_embeddings}
    assert set(ckpt.tensors) == set(original)
    for name, t in original.items():
        step = np.spacing(np.float32(1 + t.abs().max().item())) if "norm" in name and arch.startswith("gemma") else 0
        assert (ckpt.read(name) - t).abs().max().item() <= step, name
    if arch != "qwen3":  # transformers' qwen3 GGUF config leaves head_dim at its default (128)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
        for name in original:
            assert torch.equal(ckpt.read(name), loaded[name].float()), name


def test_reader_dequantizes_every_type_gguf_can(tmp_path):
    """One tensor per type: our read equals gguf's dequantization of the stored bytes."""
    rng = np.random.default_rng(0)
    kinds = [t for t in T if t not in (T.F32, T.F16) and _dequantizable(t)]
    writer = gguf.GGUFWriter(tmp_path / "types.gguf", "llama")
    writer.add_block_count(len(kinds))
    for i, t in enumerate(kinds):
        block, size = gguf.GGML_QUANT_SIZES[t]
        writer.add_tensor(f"blk.{i}.ffn_up.weight", _random_blocks(rng, t, 2 * (512 // block), size).reshape(2, -1),
                          raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ckpt = open_checkpoint(tmp_path / "types.gguf")
    reader = gguf.GGUFReader(tmp_path / "types.gguf")
    for i, (t, stored) in enumerate(zip(kinds, reader.tensors)):
        ours = ckpt.read(f"model.layers.{i}.mlp.up_proj.weight")
        plain = t in (*_INTS, T.F64)  # gguf's reader returns these as they are; it dequantizes the rest
        want = torch.from_numpy(np.array(stored.data if plain else gguf.quants.dequantize(stored.data, t)))
        assert ours.shape == (2, 512), t.name
        torch.testing.assert_close(ours.double(), want.double(), rtol=0, atol=0, equal_nan=True, msg=t.name)


_INTS = (T.I8, T.I16, T.I32, T.I64)


def _dequantizable(t) -> bool:
    if t in (*_INTS, T.F64):
        return True
    try:
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[t][1]), np.uint8), t)
    except NotImplementedError:
        return False
    return True


def _random_blocks(rng, t, n_blocks: int, size: int) -> np.ndarray:
    """Random stored data: values for plain types, else random block bytes (NaNs compare equal)."""
    if t == T.F64:
        return rng.standard_normal(n_blocks)
    if t == T.BF16:
        return (rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    if t in _INTS:
        return raw.view(np.dtype(f"i{size}")).reshape(-1)
    raw[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # most formats start with an fp16 scale
    return raw


# -- merging into GGUF --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [T.F32, T.F16], ids=lambda t: t.name)
def test_merge_into_gguf_matches_peft(w, kind):
    """Our merged GGUF equals PEFT's merge converted to GGUF; untouched tensors are byte-identical."""
    root, model, files, lora = w
    out = root / f"merged-{kind.name}.gguf"
    result = wsurgery.merge(files[kind], lora, out, progress=False, overwrite=True)
    expected = _gguf_tensors(write_llama_gguf(_peft_model(model, lora), root / f"peft-{kind.name}.gguf", kind))
    ours, base = _gguf_tensors(out), _gguf_tensors(files[kind])
    changed = {n for n in ours if not np.array_equal(ours[n], base[n])}
    assert len(changed) == result.changed_tensors == 2 * len(LINEAR) + 2
    for name, got in ours.items():
        want = expected[name]
        if kind == T.F32:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=name)
        else:  # PEFT rounds ΔW to f16 before adding, we round once: one f16 step at |W| + |W'| apart at most
            step = np.spacing((np.abs(base[name]) + np.abs(want)).astype(np.float16)).astype(np.float32)
            assert (np.abs(got - want) <= step).all(), name
    _assert_same_file_but_changed(files[kind], out, changed)


def _assert_same_file_but_changed(base_path, out_path, changed: set[str]) -> None:
    """Identical metadata (types and values), tensor names, order, types and shapes; unchanged bytes."""
    assert _fields(out_path) == _fields(base_path)
    a, b = gguf.GGUFReader(base_path), gguf.GGUFReader(out_path)
    assert [(t.name, t.tensor_type, list(t.shape)) for t in a.tensors] == \
           [(t.name, t.tensor_type, list(t.shape)) for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert (ta.name in changed) != np.array_equal(ta.data, tb.data), ta.name


def test_merge_into_quantized_gguf_requantizes_with_ggufs_quantizer(w):
    """Q8_0 base: the changed tensors are gguf's Q8_0 of (our float merge of the dequantized base), byte for
    byte, and within one Q8_0 step of PEFT's merge into the same dequantized weights."""
    from transformers import AutoModelForCausalLM

    root, _, files, lora = w
    out = root / "merged-q8.gguf"
    wsurgery.merge(files[T.Q8_0], lora, out, progress=False, overwrite=True)
    wsurgery.merge(files[T.Q8_0], lora, root / "merged-q8-st", progress=False, overwrite=True)
    floats = open_checkpoint(root / "merged-q8-st")
    names = open_checkpoint(files[T.Q8_0]).tensors
    reader = gguf.GGUFReader(out)
    dequantized = AutoModelForCausalLM.from_pretrained(root, gguf_file=files[T.Q8_0].name)
    peft = oracle_merge(dequantized, lora)
    for stored in reader.tensors:
        hf = next(n for n, i in names.items() if i.gguf_name == stored.name)
        value = floats.read(hf).numpy()
        heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(stored.name.split(".")[-2])
        if heads:
            value, want = _permute(value, heads), _permute(peft[hf].numpy(), heads)
        else:
            want = peft[hf].numpy()
        if stored.tensor_type == T.Q8_0:
            assert np.array_equal(stored.data, gguf.quants.quantize(value, T.Q8_0)), stored.name
            got = gguf.quants.dequantize(stored.data, T.Q8_0)
            step = np.abs(want).reshape(want.shape[0], -1, 32).max(-1, keepdims=True) / 127
            assert (np.abs(got - want).reshape(step.shape[0], -1, 32) <= step + 1e-6).all(), stored.name


def test_merge_type_option_retypes_changed_tensors_only(w):
    root, _, files, lora = w
    out = root / "merged-as-f16.gguf"
    wsurgery.merge(files[T.Q8_0], lora, out, progress=False, gguf_type="f16", overwrite=True)
    base = {t.name: t.tensor_type for t in gguf.GGUFReader(files[T.Q8_0]).tensors}
    ours = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    changed = {n for n in ours if ours[n] != base[n]}
    assert changed == {f"blk.{i}.{m}.weight" for i in range(2) for m in
                       ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")} | \
        {"output.weight", "token_embd.weight"}
    assert all(ours[n] == T.F16 for n in changed)


def test_rewriting_without_changes_reproduces_the_file_byte_for_byte(w, tmp_path):
    from wsurgery.engine import execute, plan

    _, _, files, _ = w
    for kind, path in files.items():
        execute(plan(open_checkpoint(path), []), tmp_path / f"{kind.name}.gguf", progress=False)
        assert (tmp_path / f"{kind.name}.gguf").read_bytes() == path.read_bytes(), kind.name


# -- quantize / dequantize ------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["q8_0", "q4_0", "f16"])
def test_quantize_gguf(w, target):
    """Weight matrices become gguf's quantization of the same values; norms stay F32; file_type follows;
    transformers loads the result."""
    from transformers import AutoModelForCausalLM

    root, _, files, _ = w
    out = root / f"requant-{target}.gguf"
    _, kept = wsurgery.api.quantize_gguf(files[T.F32], out, target, progress=False, overwrite=True)
    assert kept == []
    kind = T[target.upper()]
    src = {t.name: t for t in gguf.GGUFReader(files[T.F32]).tensors}
    for t in gguf.GGUFReader(out).tensors:
        if t.name.endswith("norm.weight"):
            assert t.tensor_type == T.F32 and np.array_equal(t.data, src[t.name].data)
        else:
            assert t.tensor_type == kind, t.name
            assert np.array_equal(np.asarray(t.data).view(np.uint8),
                                  np.asarray(gguf.quants.quantize(np.asarray(src[t.name].data), kind)).view(np.uint8))
    fields = _fields(out)
    assert fields.pop("general.file_type")[1] == int(gguf.LlamaFileType[f"MOSTLY_{kind.name}"])
    if kind != T.F16:
        assert fields.pop("general.quantization_version")[1] == gguf.GGML_QUANT_VERSION
    base_fields = _fields(files[T.F32])
    base_fields.pop("general.file_type")
    assert fields == base_fields
    loaded = AutoModelForCausalLM.from_pretrained(root, gguf_file=out.name).state_dict()
    ckpt = open_checkpoint(out)
    for name, t in loaded.items():
        assert torch.equal(ckpt.read(name).float(), t.float()), name


def test_dequantize_gguf_matches_transformers(w):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, _, files, _ = w
    wsurgery.api.dequantize(files[T.Q8_0], root / "deq", progress=False, overwrite=True)
    ours = load_file(root / "deq" / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(root, gguf_file=files[T.Q8_0].name).state_dict()
    assert set(ours) == set(loaded)
    for name, t in loaded.items():
        assert torch.equal(ours[name], t.float()), name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_dequantized_gguf_is_a_model_folder_transformers_loads(tmp_path, arch):
    """HF model -> GGUF (as llama.cpp converts) -> dequantize: config.json made from the key/values, and
    transformers runs the folder with the original model's logits, exactly (F32 GGUF)."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama() if arch == "llama" else tiny_model(arch)
    wsurgery.api.dequantize(write_llama_gguf(model, tmp_path / "m.gguf"), tmp_path / "deq", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "deq").eval()
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings"):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    tokens = torch.tensor([[1, 5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_merge_from_gguf_into_a_folder_runs_in_transformers_like_peft(w, tmp_path):
    root, model, files, lora = w
    wsurgery.merge(files[T.F32], lora, tmp_path / "merged", progress=False)
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokens = torch.tensor([[1, 5, 17, 42, 99, 3]])
    with torch.no_grad():
        want = _peft_model(model, lora)(tokens).logits
        torch.testing.assert_close(ours(tokens).logits, want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_no_config_where_the_key_values_do_not_carry_it(tmp_path, arch):
    """Gemma's soft-capping and attention scalars are llama.cpp constants, not key/values: no guessed config."""
    out = wsurgery.api.dequantize(write_llama_gguf(tiny_model(arch), tmp_path / "m.gguf"), tmp_path / "deq",
                                  progress=False).out
    assert (out / "model.safetensors").is_file() and not (out / "config.json").exists()


# -- GGUF LoRA export ---------------------------------------------------------------------------------------

def _apply_gguf_lora(base: dict[str, np.ndarray], lora_path) -> dict[str, np.ndarray]:
    """llama.cpp's rule (llama-adapter.cpp / export-lora): W + alpha/rank · B·A, rank = B's columns, alpha 0
    meaning 1; for token_embd the rows of lora_a are gathered by token id."""
    reader = gguf.GGUFReader(lora_path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    alpha = fields["adapter.lora.alpha"]
    pairs = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64) for t in reader.tensors}
    out = {n: v.astype(np.float64) for n, v in base.items()}
    for name in {n.rsplit(".", 1)[0] for n in pairs}:
        a, b = pairs[name + ".lora_a"], pairs[name + ".lora_b"]
        scale = alpha / b.shape[1] if alpha else 1.0
        out[name] += scale * (a @ b.T if name == "token_embd.weight" else b @ a)
    return out


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_gguf_lora_applied_as_llama_cpp_does_equals_peft_merge(w, kind):
    """Rank and alpha patterns (differing scales, baked into B), Q/K rows, lm_head, the embedding."""
    root, model, files, lora = w
    out = root / f"lora-{kind}.gguf"
    result = wsurgery.api.export_gguf_lora(lora, out, files[T.F32], gguf_type=kind, overwrite=True)
    assert len(result.modules) == 2 * len(LINEAR) + 2
    assert {m.baked != 1.0 for m in result.modules} == {True, False}
    got = _apply_gguf_lora(_gguf_tensors(files[T.F32]), out)
    want = _gguf_tensors(write_llama_gguf(_peft_model(model, lora), root / "peft-f32.gguf"))
    tol = 1e-5 if kind == "f32" else 2e-3
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=tol * np.abs(want[name]).max(), err_msg=name)
    fields = _fields(out)
    assert fields["general.architecture"][1] == "llama"
    assert fields["adapter.lora.alpha"][0] == [gguf.GGUFValueType.FLOAT32]


def test_gguf_lora_same_scale_keeps_alpha_and_b(w, tmp_path):
    _, model, files, _ = w
    lora = make_adapter(model, LoraConfig(r=4, lora_alpha=16, target_modules=["v_proj"]), tmp_path / "plain")
    result = wsurgery.api.export_gguf_lora(lora, tmp_path / "plain.gguf", files[T.F16])
    assert result.alpha == 16 and all(m.baked == 1.0 for m in result.modules)
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "plain.gguf").tensors}
    from safetensors.torch import load_file

    saved = load_file(lora / "adapter_model.safetensors")
    assert np.array_equal(stored["blk.1.attn_v.weight.lora_b"],
                          saved["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].numpy())


def test_gguf_lora_for_the_hf_checkpoint_equals_for_its_gguf(w, tmp_path):
    """--base the Hugging Face folder: names and Q/K layout from config.json, as llama.cpp's converter."""
    root, _, files, lora = w
    wsurgery.api.export_gguf_lora(lora, tmp_path / "from-gguf.gguf", files[T.F32])
    wsurgery.api.export_gguf_lora(lora, tmp_path / "from-hf.gguf", root / "hf")
    a, b = (gguf.GGUFReader(tmp_path / f) for f in ("from-gguf.gguf", "from-hf.gguf"))
    assert {t.name: t.data.tobytes() for t in a.tensors} == {t.name: t.data.tobytes() for t in b.tensors}
    assert _fields(tmp_path / "from-gguf.gguf") == _fields(tmp_path / "from-hf.gguf")


@pytest.mark.parametrize("config, reason", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"lora_bias": True}, "lora_bias"),
], ids=["dora", "modules_to_save", "lora_bias"])
def test_gguf_lora_refuses_what_llama_cpp_cannot_express(w, tmp_path, config, reason):
    _, model, files, _ = w
    lora = make_adapter(model, LoraConfig(r=4, target_modules=["v_proj"], **config), tmp_path / "ad")
    with pytest.raises(UnsupportedError, match=f"{reason}.*wsurgery merge"):
        wsurgery.api.export_gguf_lora(lora, tmp_path / "x.gguf", files[T.F32])
    assert not (tmp_path / "x.gguf").exists()


def test_convert_merge_into_merges_what_a_gguf_lora_cannot_carry(w, tmp_path, capsys):
    """--merge-into: a DoRA adapter is merged into the GGUF base instead (the same bytes as `merge`, PEFT's
    merge within float tolerance), the note says why, and no adapter file appears; an adapter llama.cpp
    can carry is still written as a GGUF LoRA and nothing is merged."""
    _, model, files, lora = w
    dora = make_adapter(model, LoraConfig(r=4, target_modules=["v_proj", "o_proj"], use_dora=True), tmp_path / "dora")
    code, _, err = run_cli(["convert", dora, tmp_path / "a.gguf", "--to", "gguf-lora", "--base", files[T.F32],
                            "--merge-into", tmp_path / "m.gguf", "-q"], capsys)
    assert code == 0, err
    assert "DoRA" in err and "merging it into" in err and not (tmp_path / "a.gguf").exists()
    wsurgery.merge(files[T.F32], dora, tmp_path / "direct.gguf", progress=False)
    assert (tmp_path / "m.gguf").read_bytes() == (tmp_path / "direct.gguf").read_bytes()
    expected = _gguf_tensors(write_llama_gguf(_peft_model(model, dora), tmp_path / "peft.gguf", T.F32))
    for name, got in _gguf_tensors(tmp_path / "m.gguf").items():
        np.testing.assert_allclose(got, expected[name], rtol=0, atol=1e-5 * np.abs(expected[name]).max(), err_msg=name)

    code, _, err = run_cli(["convert", lora, tmp_path / "b.gguf", "--to", "gguf-lora", "--base", files[T.F32],
                            "--merge-into", tmp_path / "m2.gguf", "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "b.gguf").exists() and not (tmp_path / "m2.gguf").exists()

    code, _, err = run_cli(["convert", dora, tmp_path / "c.gguf", "--to", "gguf-lora", "--base", files[T.F32]], capsys)
    assert code == 1 and "--merge-into" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.gguf").exists()


# -- bad input ----------------------------------------------------------------------------------------------

def _write(path, arch="llama", tensors=(), block_count=None):
    writer = gguf.GGUFWriter(path, arch)
    if block_count is not None:
        writer.add_block_count(block_count)
    for name, data, raw in tensors:
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unknown_architecture_is_refused(tmp_path):
    path = _write(tmp_path / "gpt2.gguf", "gpt2", [("token_embd.weight", np.zeros((4, 8), np.float32), None)])
    with pytest.raises(UnsupportedError, match="architecture 'gpt2' is not supported"):
        open_checkpoint(path)


def test_split_files_are_refused(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "llama", split_max_tensors=1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.add_tensor("output.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedError, match="one of 2 split GGUF files"):
        open_checkpoint(tmp_path / "m-00001-of-00002.gguf")


def test_truncated_file_is_one_error_and_nothing_is_written(w, tmp_path, capsys):
    _, _, files, lora = w
    data = files[T.F32].read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(InputError, match="truncated"):
            open_checkpoint(tmp_path / "cut.gguf")
    code, _, err = run_cli(["merge", tmp_path / "cut.gguf", lora, tmp_path / "out.gguf"], capsys)
    assert code == 1 and err.count("\n") == 1 and "truncated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_adapter_for_tensors_missing_from_the_gguf(w, tmp_path):
    root, _, _, _ = w
    bigger = tiny_llama(seed=1)
    bigger.model.layers.append(copy.deepcopy(bigger.model.layers[0]))
    bigger.config.num_hidden_layers = 3
    lora = make_adapter(bigger, LoraConfig(r=2, target_modules=["v_proj"]), tmp_path / "ad3")
    with pytest.raises(InputError, match="model.layers.2.self_attn.v_proj"):
        wsurgery.merge(root / "base-F32.gguf", lora, tmp_path / "out.gguf", progress=False)
    tied = write_llama_gguf(tiny_llama(tie=True), tmp_path / "tied.gguf")
    head = make_adapter(tiny_llama(), LoraConfig(r=2, target_modules=["lm_head"]), tmp_path / "head")
    with pytest.raises(UnsupportedError, match="ties to"):
        wsurgery.api.export_gguf_lora(head, tmp_path / "out.gguf", tied)
    embedding = make_adapter(tiny_llama(tie=True), LoraConfig(r=2, target_modules=["embed_tokens"]), tmp_path / "emb")
    with pytest.raises(UnsupportedError, match="also uses as its output head"):
        wsurgery.api.export_gguf_lora(embedding, tmp_path / "out.gguf", tied)
    assert not (tmp_path / "out.gguf").exists()


def test_tensor_types_gguf_cannot_write_or_read(w, tmp_path):
    """IQ4_NL (dequantize only): merging into it needs --type; Q1_0 (neither): reading it is refused."""
    _, model, _, lora = w
    rng = np.random.default_rng(1)
    iq4 = _random_blocks(rng, T.IQ4_NL, 32 * 64 // 32, 18).reshape(32, -1)
    path = write_llama_gguf(model, tmp_path / "f32.gguf")
    _retype(path, tmp_path / "iq4nl.gguf", "blk.0.attn_v.weight", iq4, T.IQ4_NL)
    with pytest.raises(UnsupportedError, match="IQ4_NL, which wsurgery cannot quantize; pass --gguf-type"):
        wsurgery.merge(tmp_path / "iq4nl.gguf", lora, tmp_path / "out.gguf", progress=False)
    assert not (tmp_path / "out.gguf").exists()
    wsurgery.merge(tmp_path / "iq4nl.gguf", lora, tmp_path / "out.gguf", progress=False, gguf_type="q8_0")
    assert {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "out.gguf").tensors}[
        "blk.0.attn_v.weight"] == T.Q8_0
    q1 = rng.integers(0, 256, (64, 18), dtype=np.uint8)  # ffn_down: 64 rows of 128 values, one Q1_0 block each
    _retype(path, tmp_path / "q1.gguf", "blk.0.ffn_down.weight", q1, T.Q1_0)
    with pytest.raises(UnsupportedError, match="Q1_0, which the gguf package cannot dequantize"):
        wsurgery.api.dequantize(tmp_path / "q1.gguf", tmp_path / "deq", progress=False)
    assert not (tmp_path / "deq").exists()


def _retype(src, dst, name: str, raw: np.ndarray, kind) -> None:
    """A copy of the GGUF ``src`` whose tensor ``name`` is stored as ``raw`` bytes of type ``kind``."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, "llama")
    writer.kv_data = [{}]
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        sub = f.types[1] if len(f.types) > 1 else None
        value = f.contents()
        writer.add_key_value(key, value, f.types[0], sub)
    for t in reader.tensors:
        if t.name == name:
            writer.add_tensor(name, raw, raw_dtype=kind)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_cli_gguf_commands(w, tmp_path, capsys):
    root, _, files, lora = w
    code, out, err = run_cli(["inspect", files[T.Q8_0]], capsys)
    assert code == 0 and "blk.0.attn_q.weight" in out and "q8_0" in out and "llama" in out
    code, _, err = run_cli(["merge", files[T.F32], lora, tmp_path / "m.gguf", "--type", "q4_k"], capsys)
    assert code == 1 and "q4_k" in err and err.count("\n") == 1
    code, _, err = run_cli(["merge", files[T.F32], lora, tmp_path / "m.gguf", "--type", "q8_0", "--quiet"], capsys)
    assert code == 0 and (tmp_path / "m.gguf").is_file()
    code, _, err = run_cli(["quantize", files[T.F32], tmp_path / "q.gguf", "--gguf-type", "q4_0", "-q"], capsys)
    assert code == 0
    code, _, err = run_cli(["convert", lora, tmp_path / "l.gguf", "--to", "gguf-lora", "--base", files[T.F32]], capsys)
    assert code == 0 and "adapter.lora.alpha" in err
    code, _, err = run_cli(["dequantize", tmp_path / "q.gguf", tmp_path / "deq", "-q"], capsys)
    assert code == 0 and (tmp_path / "deq" / "model.safetensors").is_file()
    # a Hugging Face base is converted as convert_hf_to_gguf.py does, which needs the tokenizer files
    code, _, err = run_cli(["merge", root / "hf", lora, tmp_path / "x.gguf"], capsys)
    assert code == 1 and "no tokenizer.json or tokenizer.model" in err and err.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists()
    assert VOCAB == open_checkpoint(files[T.F32]).tensors["model.embed_tokens.weight"].shape[0]
