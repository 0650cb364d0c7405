"""compressed-tensors checkpoints (llm-compressor's FP8-dynamic, W4A16, W8A8...) through the real CLI.

The bases are built by compressed-tensors itself: a tiny Llama gets a quantization config applied
(``apply_quantization_config``), each weight's scale/zero point from ``calculate_qparams`` on the
weight's min/max per strategy (what llm-compressor's min-max observer feeds it; GPTQ would feed
calibrated ones, which decode the same way), then ``ModelCompressor.compress_model`` and
``update_config`` write the files. Oracles: compressed-tensors' per-format ``decompress`` (and
transformers loading the checkpoint with ``CompressedTensorsConfig(dequantize=True)``, which runs it)
for decoding; ``calculate_qparams`` + the float-quantized compressor on PEFT's merged weights for
``merge --requantize``; PEFT merging into transformers' dequantized model for merges.
"""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams
from oracle import LLAMA_LINEAR, assert_close_to, load_all, make_adapter, run_cli
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from wsurgery.checkpoint import open_checkpoint

_TOKEN_FP8 = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}
# name -> (weight args, forced format, input activation args): llm-compressor's presets and variants.
_INT = {"num_bits": 8, "type": "int", "strategy": "channel"}
_INT4_G32 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}
CASES = {
    "fp8-tensor": ({"num_bits": 8, "type": "float", "strategy": "tensor"}, None, _TOKEN_FP8),
    "fp8-channel": ({"num_bits": 8, "type": "float", "strategy": "channel"}, None, _TOKEN_FP8),  # FP8_DYNAMIC
    "fp8-block": ({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [32, 32]}, None,
                  {**_TOKEN_FP8, "strategy": "group", "group_size": 32}),  # FP8_BLOCK
    "fp8-group": ({"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32}, None, None),  # naive
    "int8-w8a8": (_INT, None, {**_INT, "strategy": "token", "dynamic": True}),  # W8A8 (int-quantized)
    "w4a16-sym-g32": (_INT4_G32, None, None),
    "w4a16-asym-g32": ({**_INT4_G32, "symmetric": False}, None, None),
    "w8a16-packed": (_INT, "pack-quantized", None),
    "int8-naive-asym": ({**_INT, "symmetric": False}, "naive-quantized", None),
    "w3-asym-channel": ({**_INT, "num_bits": 3, "symmetric": False}, None, None),
    "fp8-static": ({"num_bits": 8, "type": "float", "strategy": "tensor"}, None,  # FP8 (static input_scale)
                   {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}),
}
FP8_CASES = ["fp8-tensor", "fp8-channel", "fp8-block", "fp8-group"]


def _llama(dtype=torch.bfloat16):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def _minmax(w: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-compressor's min-max weight observer: min and max per scale of the strategy."""
    if args.strategy == "tensor":
        return torch.aminmax(w)
    if args.strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if args.strategy == "group":
        g = w.unflatten(-1, (w.shape[1] // args.group_size, args.group_size))
        return g.amin(-1), g.amax(-1)
    bh, bw = args.block_structure
    p = torch.nn.functional.pad(w, (0, -w.shape[1] % bw, 0, -w.shape[0] % bh))
    b = p.reshape(p.shape[0] // bh, bh, p.shape[1] // bw, bw)
    return b.amin((1, 3)), b.amax((1, 3))


def _qparams(w: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    return calculate_qparams(*_minmax(w, args), args)


def _compressed_base(tmp_path, case: str, ignore=("lm_head",), targets=("Linear",), dtype=torch.bfloat16):
    """A tiny Llama (bf16 unless told) quantized and saved by compressed-tensors in ``case``'s scheme."""
    weights, fmt, inp = CASES[case]
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=list(targets), weights=QuantizationArgs(**weights), format=fmt,
        input_activations=QuantizationArgs(**inp) if inp else None)}, ignore=list(ignore))
    return _save_compressed(_llama(dtype), qc, tmp_path / case)


def _save_compressed(model, qc: QuantizationConfig, folder):
    """``model`` quantized by ``qc`` (min-max qparams) and written as llm-compressor saves it."""
    apply_quantization_config(model, qc)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                scale, zp = _qparams(module.weight, module.quantization_scheme.weights)
                module.weight_scale.data = scale.reshape(module.weight_scale.shape)
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.data = zp.reshape(module.weight_zero_point.shape)
                if hasattr(module, "input_scale"):  # what calibration would set
                    module.input_scale.data.fill_(0.02)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    compressor.update_config(folder)
    return folder


def _stored(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _qconfig(folder) -> dict:
    return json.loads((folder / "config.json").read_text()).get("quantization_config")


def _reference_decode(folder) -> dict[str, torch.Tensor]:
    """compressed-tensors' own decompressor, module by module (the format its config group names)."""
    qc = QuantizationConfig.model_validate(_qconfig(folder))
    scheme = next(iter(qc.config_groups.values()))
    compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
    stored = _stored(folder)
    out = {}
    for name in stored:
        if name.endswith(".weight_scale"):
            module = name.removesuffix(".weight_scale")
            local = {k[len(module) + 1:]: v for k, v in stored.items() if k.startswith(module + ".")}
            out[f"{module}.weight"] = compressor.decompress(local, scheme)["weight"]
    return out


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _transformers_dequantized(folder):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                device_map="cpu")


@pytest.mark.parametrize("case", list(CASES))
def test_decode_equals_compressed_tensors_decompress(tmp_path, case):
    q = _compressed_base(tmp_path, case)
    expected = _reference_decode(q)
    assert len(expected) == 14
    ckpt = open_checkpoint(q)
    ours = {n: ckpt.read(n) for n in expected}
    assert [n for n in expected if not _identical(ours[n], expected[n])] == []
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert ckpt.read("lm_head.weight").dtype == torch.bfloat16  # ignored: plain
    # Row chunks decode to the same rows as the whole tensor.
    info = ckpt.tensors["model.layers.1.mlp.down_proj.weight"]
    step = max(info.encoding.row_chunk(info), 32)
    rows = [info.encoding.decode(info, ckpt.read_part, (a, min(a + step, info.shape[0])))
            for a in range(0, info.shape[0], step)]
    assert _identical(torch.cat(rows), expected["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("dtype,case", [(torch.float16, "fp8-block"), (torch.float32, "fp8-channel"),
                                        (torch.float16, "w4a16-asym-g32"), (torch.float32, "int8-w8a8")])
def test_float16_and_float32_bases_decode_and_encode_as_compressed_tensors(tmp_path, dtype, case):
    """The scale's dtype is the arithmetic's: float16 and float32 models round differently from bf16."""
    q = _compressed_base(tmp_path, case, dtype=dtype)
    expected = _reference_decode(q)
    ckpt = open_checkpoint(q)
    assert all(expected[n].dtype == dtype and _identical(ckpt.read(n), expected[n]) for n in expected)
    info = ckpt.tensors[f"{_Q}.weight"]
    if info.encoding.cannot_encode is not None:
        return
    torch.manual_seed(2)
    w = (expected[f"{_Q}.weight"].float() + torch.randn(info.shape) * 0.01).to(dtype)
    qc = QuantizationConfig.model_validate(_qconfig(q))
    scheme = next(iter(qc.config_groups.values()))
    scale, zp = _qparams(w, scheme.weights)
    want = BaseCompressor.get_value_from_registry(qc.format).compress(
        {"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    got = info.encoding.encode(info.name, w)
    assert _identical(got[info.name], want["weight"]) and _identical(got[f"{_Q}.weight_scale"], want["weight_scale"])


@pytest.mark.parametrize("case", ["fp8-channel", "w4a16-asym-g32", "fp8-static"])
def test_inspect_dequantize_and_logits_equal_transformers(tmp_path, capsys, case):
    q = _compressed_base(tmp_path, case)
    code, out, err = run_cli(["inspect", q], capsys)
    assert code == 0, err
    assert {"fp8-channel": "fp8 e4m3fn, per channel, symmetric, bfloat16 scale",
            "w4a16-asym-g32": "int4 packed, group 32, asymmetric, bfloat16 scale",
            "fp8-static": "fp8 e4m3fn, per tensor, symmetric, bfloat16 scale, static activation scales"}[case] in out
    code, _, err = run_cli(["dequantize", q, tmp_path / "deq", "-q"], capsys)
    assert code == 0, err
    assert "quantization_config" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    # A plain model has exactly the plain Llama's tensors (no input_scale left over).
    assert sorted(_stored(tmp_path / "deq")) == sorted(_llama().state_dict())
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "deq")
    theirs = _transformers_dequantized(q)
    assert plain.dtype == torch.bfloat16
    sd = plain.state_dict()
    assert [n for n, t in theirs.state_dict().items() if not _identical(sd[n], t)] == []
    ids = torch.arange(12)[None] % 90
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, theirs(input_ids=ids).logits)


def _peft_merged(q, adapter) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(_transformers_dequantized(q), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", ["fp8-block", "w4a16-sym-g32", "int8-w8a8"])
def test_merge_equals_peft_on_the_decompressed_model(tmp_path, capsys, case):
    q = _compressed_base(tmp_path, case)
    adapter = make_adapter(_llama(), LoraConfig(r=4, target_modules=LLAMA_LINEAR), tmp_path / "lora")
    code, _, err = run_cli(["merge", q, adapter, tmp_path / "merged", "-q"], capsys)
    assert code == 0, err
    merged, expected = load_all(tmp_path / "merged"), _peft_merged(q, adapter)
    assert sorted(merged) == sorted(expected)
    assert all(t.dtype == torch.bfloat16 for t in _stored(tmp_path / "merged").values())
    assert_close_to(merged, expected, base=load_all(q))
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    if case == "w4a16-sym-g32":  # verify decodes the base the same way (once is enough: it is slow)
        code, out, err = run_cli(["verify", q, adapter, tmp_path / "merged", "--device", "cpu", "-q"], capsys)
        assert code == 0, out + err


@pytest.mark.parametrize("case", FP8_CASES)
def test_merge_requantize_bytes_equal_compressed_tensors(tmp_path, capsys, case):
    q = _compressed_base(tmp_path, case)
    adapter = make_adapter(_llama(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]), tmp_path / "lora")
    code, _, err = run_cli(["merge", q, adapter, tmp_path / "re", "--requantize", "-q"], capsys)
    assert code == 0, err
    ours, orig = _stored(tmp_path / "re"), _stored(q)
    assert sorted(ours) == sorted(orig)
    changed = [n for n in orig if ".q_proj." in n or ".down_proj." in n]
    assert len(changed) == 8
    assert [n for n in orig if n not in changed and not _identical(ours[n], orig[n])] == []
    qc = QuantizationConfig.model_validate(_qconfig(q))
    scheme = next(iter(qc.config_groups.values()))
    merged = _peft_merged(q, adapter)
    for name in (n for n in changed if n.endswith(".weight")):
        scale, zp = _qparams(merged[name], scheme.weights)
        want = BaseCompressor.get_value_from_registry(qc.format).compress(
            {"weight": merged[name], "weight_scale": scale, "weight_zero_point": zp}, scheme)
        assert sorted(want) == ["weight", "weight_scale"]
        assert _identical(ours[name], want["weight"]), name
        assert _identical(ours[name + "_scale"], want["weight_scale"]), name
        assert not _identical(ours[name], orig[name]), name  # the merge did change the codes
    assert _qconfig(tmp_path / "re") == _qconfig(q)
    loaded = _transformers_dequantized(tmp_path / "re").state_dict()
    decoded = load_all(tmp_path / "re")
    assert [n for n in decoded if not _identical(decoded[n], loaded[n])] == []


@pytest.mark.parametrize("case", ["fp8-channel", "fp8-block", "fp8-tensor"])
def test_chunked_encode_gives_the_whole_tensors_bytes(tmp_path, case):
    q = _compressed_base(tmp_path, case)
    info = open_checkpoint(q).tensors["model.layers.0.mlp.gate_proj.weight"]
    enc = info.encoding
    torch.manual_seed(5)
    w = torch.randn(info.shape).to(torch.bfloat16)
    whole = enc.encode(info.name, w)
    chunk = enc.encode_row_chunk(info.shape)
    if case == "fp8-tensor":
        assert chunk is None  # one scale for the whole tensor: whole only
        return
    assert chunk == (32 if case == "fp8-block" else 1)
    got = {n: t.clone() for n, t in whole.items()}
    for t in got.values():
        t.view(torch.uint8).zero_() if t.dtype == torch.float8_e4m3fn else t.zero_()
    for a in range(0, info.shape[0], 64):
        for n, (t, row) in enc.encode_rows(info.name, w[a:a + 64], (a, a + 64), info.shape).items():
            got[n][row:row + t.shape[0]] = t
    assert all(_identical(got[n], whole[n]) for n in whole)


@pytest.mark.parametrize("case", ["w4a16-sym-g32", "int8-w8a8"])
def test_requantize_integer_schemes_refused(tmp_path, capsys, case):
    q = _compressed_base(tmp_path, case)
    adapter = make_adapter(_llama(), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "lora")
    code, _out, err = run_cli(["merge", q, adapter, tmp_path / "re", "--requantize", "-q"], capsys)
    assert code != 0
    assert "scales came from calibration" in err and "leave out --requantize" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "re").exists()


def _edit(folder, tensors=None, qconfig=None):
    """Rewrite a saved base with ``tensors(dict)`` / ``qconfig(dict)`` applied in place."""
    if tensors is not None:
        t = _stored(folder)
        tensors(t)
        save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    if qconfig is not None:
        config = json.loads((folder / "config.json").read_text())
        qconfig(config["quantization_config"])
        (folder / "config.json").write_text(json.dumps(config))
    return folder


_Q = "model.layers.0.self_attn.q_proj"


def _set(d, k, v):
    d[k] = v


BROKEN = {
    "missing-scale": ("fp8-channel", lambda t: t.pop(f"{_Q}.weight_scale"), None, "codes"),
    "missing-weight": ("fp8-channel", lambda t: t.pop(f"{_Q}.weight"), None, "missing"),
    "scale-shape": ("fp8-channel", lambda t: _set(t, f"{_Q}.weight_scale", t[f"{_Q}.weight_scale"][:10]), None,
                    "needs [64, 1]"),
    "weight-shape-disagrees": ("w4a16-sym-g32", lambda t: _set(t, f"{_Q}.weight_shape", torch.tensor([64, 96])),
                               None, "weight_shape [64, 96]"),
    "missing-weight-shape": ("w4a16-sym-g32", lambda t: t.pop(f"{_Q}.weight_shape"), None, "without weight_shape"),
    "zero-point-missing": ("w4a16-asym-g32", lambda t: t.pop(f"{_Q}.weight_zero_point"), None,
                           "without weight_zero_point"),
    "zero-point-on-symmetric": ("w4a16-sym-g32", lambda t: _set(t, f"{_Q}.weight_zero_point",
                                                                 torch.zeros(8, 2, dtype=torch.int32)), None,
                                "symmetric"),
    "int8-codes-for-fp8-scheme": ("fp8-channel", lambda t: _set(t, f"{_Q}.weight", torch.zeros(64, 64,
                                                                                              dtype=torch.int8)),
                                  None, "stores 2-D float8_e4m3fn"),
    "ignored-but-quantized": ("fp8-channel", None, lambda q: q["ignore"].append(_Q), "ignore list"),
    "unsupported-format": ("fp8-channel", None, lambda q: _set(q["config_groups"]["group_0"], "format",
                                                               "nvfp4-pack-quantized"), "nvfp4-pack-quantized"),
    "stray-g_idx": ("w4a16-sym-g32", lambda t: _set(t, f"{_Q}.weight_g_idx", torch.arange(64, dtype=torch.int32).flip(0)
                                                    // 32), None, "activation ordering"),
    "not-compressed": ("fp8-channel", None, lambda q: _set(q, "quantization_status", "frozen"), "frozen"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_broken_files_refused_in_one_line(tmp_path, capsys, broken):
    case, tensors, qconfig, words = BROKEN[broken]
    q = _edit(_compressed_base(tmp_path, case), tensors, qconfig)
    code, _out, err = run_cli(["dequantize", q, tmp_path / "out", "-q"], capsys)
    assert code != 0
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_zero_point_of_a_symmetric_unpacked_weight_is_decoded_as_compressed_tensors_does(tmp_path):
    """Older compressed-tensors saved zero points for symmetric int8/FP8 weights too; its decompressor
    subtracts whatever is stored, so a (here deliberately non-zero) one must be honoured, not dropped."""
    q = _compressed_base(tmp_path, "int8-w8a8")
    before = _reference_decode(q)[f"{_Q}.weight"]
    _edit(q, lambda t: _set(t, f"{_Q}.weight_zero_point", torch.full((64, 1), 3, dtype=torch.int8)))
    expected = _reference_decode(q)[f"{_Q}.weight"]
    assert not _identical(expected, before)  # the stored zero point matters to the reference
    assert _identical(open_checkpoint(q).read(f"{_Q}.weight"), expected)


def test_regex_targets_and_mixed_formats_per_group(tmp_path):
    """Two config groups with their own formats (attention FP8, MLP int4 packed): each module decodes by
    the group whose ``re:`` target names it, exactly as compressed-tensors does."""
    model = _llama()
    qc = QuantizationConfig(config_groups={
        "attn": QuantizationScheme(targets=["re:.*self_attn\\..*_proj$"],
                                   weights=QuantizationArgs(**CASES["fp8-channel"][0]),
                                   input_activations=QuantizationArgs(**_TOKEN_FP8)),
        "mlp": QuantizationScheme(targets=["re:.*mlp\\..*_proj$"],
                                  weights=QuantizationArgs(**CASES["w4a16-asym-g32"][0]))}, ignore=["lm_head"])
    folder = _save_compressed(model, qc, tmp_path / "mixed")
    assert _qconfig(folder)["format"] == "mixed-precision"
    # The oracle: each module's own scheme as compressed-tensors' matcher attached it, decompressed by the
    # compressor of that scheme's format (transformers' dequantize=True load uses one scheme for all).
    stored = _stored(folder)
    expected = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None:
            local = {k[len(name) + 1:]: v for k, v in stored.items() if k.startswith(name + ".")}
            expected[f"{name}.weight"] = BaseCompressor.get_value_from_registry(scheme.format.value).decompress(
                local, scheme)["weight"]
    ckpt = open_checkpoint(folder)
    encoded = {n: i for n, i in ckpt.tensors.items() if hasattr(i, "encoding")}
    assert sorted(encoded) == sorted(expected) and len(encoded) == 14
    assert {i.encoding.format for i in encoded.values()} == {"float-quantized", "pack-quantized"}
    assert [n for n in encoded if not _identical(ckpt.read(n), expected[n])] == []
