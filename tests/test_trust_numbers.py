"""No silent wrong output from numbers: bad numbers in configs and options, non-finite results, and
weight encodings wsurgery does not decode are refused, through the real command line, with the
contract of ``test_bad_input.py``: exit 1, one ``wsurgery: error:`` line naming the culprit, no
traceback, no OUT and no temporary sibling, inputs byte-identical.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from oracle import edit_adapter_config, edit_adapter_tensors, make_adapter, run_cli, save_base, tiny_llama
from test_bad_input import assert_refused

Q = "model.layers.0.self_attn.q_proj"
LATE = "model.layers.1.self_attn.v_proj"  # changed after the first output shard is written


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama in float32 and in bfloat16, and a LoRA for each."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("trust")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model, model16 = tiny_llama(), tiny_llama(torch.bfloat16)
    base, base16 = save_base(model, root / "base"), save_base(model16, root / "base16")
    lora = make_adapter(model, config, root / "lora")
    lora16 = make_adapter(model16, config, root / "lora16")
    return SimpleNamespace(base=base, base16=base16, lora=lora, lora16=lora16)


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def cli_ok(capsys, args) -> None:
    status, _, stderr = run_cli(args, capsys)
    assert status == 0, stderr


# -- numbers in adapter configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_lora_alpha_is_refused(assets, tmp_path, capsys, literal):
    """JSON NaN/Infinity (which Python's json accepts) and 1e400 (which parses to inf); NaN was read as a
    scale of 1, the others wrote non-finite weights."""
    adapter = copy_of(assets.lora, tmp_path / "adapter")
    path = adapter / "adapter_config.json"
    path.write_text(path.read_text().replace('"lora_alpha": 8', f'"lora_alpha": {literal}'))
    assert literal in path.read_text()
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", assets.base, adapter, out], out, [assets.base, adapter],
                   [path, "lora_alpha", "finite"])


@pytest.mark.parametrize("field, value, named", [
    ("lora_alpha", "sixteen", "must be a number"),
    ("lora_alpha", True, "must be a number"),
    ("lora_alpha", 1e300, "float32"),
    ("r", 2.5, "whole number"),
    ("alpha_pattern", {"(": 3}, "'('"),
    ("rank_pattern", {"q_proj[": 2}, "'q_proj['"),
    ("alpha_pattern", {"q_proj": "x"}, "must be a number"),
    ("rank_pattern", {"q_proj": -1}, "whole number"),
    ("alpha_pattern", ["q_proj"], "mapping"),
    ("use_rslora", "false", "true or false"),
])
def test_mistyped_config_numbers_are_refused(assets, tmp_path, capsys, field, value, named):
    """Each of these crashed with an internal error (ValueError, overflow, re.error) or was misread."""
    adapter = copy_of(assets.lora, tmp_path / "adapter")
    edit_adapter_config(adapter, **{field: value})
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", assets.base, adapter, out], out, [assets.base, adapter],
                   [adapter / "adapter_config.json", field, named])


# -- numbers on the command line -----------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "1e39"])
def test_non_finite_scale_is_refused(assets, tmp_path, capsys, scale):
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", assets.base, assets.lora, out, "--scale", scale], out,
                   [assets.base, assets.lora], ["scale", "finite"])


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), 1e39])
def test_plan_refuses_a_non_finite_adapter_weight(assets, weight):
    """The engine's own check, for callers of ``plan`` that bypass the CLI's and the API's parsing."""
    from wsurgery.adapters import load_adapter
    from wsurgery.checkpoint import open_checkpoint
    from wsurgery.engine import plan
    from wsurgery.errors import InputError

    with pytest.raises(InputError, match=re.escape(f"scale {weight!r} is not a finite number")):
        plan(open_checkpoint(assets.base), [(load_adapter(assets.lora), weight)])


@pytest.mark.parametrize("size", ["0", "0GB", "0.4B"])
def test_shard_size_below_one_byte_is_refused(assets, tmp_path, capsys, size):
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", assets.base, assets.lora, out, "--max-shard-size", size], out,
                   [assets.base, assets.lora], [repr(size)])


def test_invalid_skip_modules_regex_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, ["quantize", assets.base, out, "--skip-modules", "("], out, [assets.base],
                   ["--skip-modules '('", "regular expression"])


@pytest.mark.parametrize("option", [["--rtol", "nan"], ["--atol", "inf"], ["--rtol", "-1"]])
def test_verify_tolerances_must_be_finite(assets, tmp_path, capsys, option):
    """A NaN tolerance fails every module and an infinite one passes every module."""
    merged = tmp_path / "merged"
    cli_ok(capsys, ["merge", assets.base, assets.lora, merged, "-q"])
    status, _, stderr = run_cli(["verify", assets.base, assets.lora, merged, *option], capsys)
    assert status == 1 and stderr.startswith("wsurgery: error:") and option[0] in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_blocksize_must_be_an_integer():
    from wsurgery.quant.encodings.bnb4bit import Bnb4bit
    from wsurgery.errors import InputError

    with pytest.raises(InputError, match="blocksize 64.0"):
        Bnb4bit(blocksize=64.0)


# -- non-finite results --------------------------------------------------------------------------------------

def _poison(which: str, value: float, module: str = Q):
    def edit(tensors):
        key = next(k for k in tensors if module in k and which in k)
        tensors[key][0, 0] = value
    return edit


@pytest.mark.parametrize("which, value", [("lora_A", float("inf")), ("lora_B", float("nan"))])
def test_non_finite_adapter_tensors_are_refused(assets, tmp_path, capsys, which, value):
    """The base has several output shards; the poisoned module comes after the first is written."""
    adapter = copy_of(assets.lora, tmp_path / "adapter")
    edit_adapter_tensors(adapter, _poison(which, value, LATE))
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", assets.base, adapter, out, "--max-shard-size", "20KB"], out,
                   [assets.base, adapter], [f"{LATE}.weight", adapter, "inf or NaN"])


def test_result_beyond_float16_is_refused(assets, tmp_path, capsys):
    """ΔW = (alpha/r)·B·A reaches ~1e5 with alpha 1e7: finite in float32, inf in float16."""
    adapter = copy_of(assets.lora, tmp_path / "adapter")
    edit_adapter_config(adapter, lora_alpha=1e7)
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", assets.base, adapter, out, "--dtype", "float16"], out, [assets.base, adapter],
                   [f"{Q}.weight", "float16's range"])


def test_result_beyond_bfloat16_is_refused(assets, tmp_path, capsys):
    """W'[0,0] = W[0,0] + (8/4)·1.6995e38 ≈ 3.399e38: a float32, but past bfloat16's largest value
    (3.3895e38) by more than half its last step (2**120), so it rounds to inf in the bf16 base's dtype."""
    adapter = copy_of(assets.lora16, tmp_path / "adapter")

    def edit(tensors):
        a = next(k for k in tensors if Q in k and "lora_A" in k)
        b = next(k for k in tensors if Q in k and "lora_B" in k)
        tensors[a] = torch.zeros_like(tensors[a])
        tensors[a][0, 0] = 1.0
        tensors[b] = torch.zeros(tensors[b].shape, dtype=torch.float32)
        tensors[b][0, 0] = 1.6995e38
    edit_adapter_tensors(adapter, edit)
    expected = 2 * 1.6995e38
    assert torch.isfinite(torch.tensor(expected, dtype=torch.float32))
    assert torch.isinf(torch.tensor(expected).to(torch.bfloat16))
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", assets.base16, adapter, out], out, [assets.base16, adapter],
                   [f"{Q}.weight", "bfloat16's range"])


def test_non_finite_result_into_gguf_is_refused(tmp_path, capsys):
    from gguf import GGMLQuantizationType as T
    from gguf_tiny import tiny_llama as gguf_llama, write_llama_gguf
    from peft import LoraConfig

    model = gguf_llama()
    base = write_llama_gguf(model, tmp_path / "base.gguf", T.Q8_0)
    adapter = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), tmp_path / "adapter")
    edit_adapter_tensors(adapter, _poison("lora_B", float("nan")))
    out = tmp_path / "out.gguf"
    assert_refused(capsys, ["merge", base, adapter, out], out, [base, adapter], [f"{Q}.weight", "inf or NaN"])


def test_result_beyond_gguf_block_scales_is_refused(tmp_path, capsys):
    """Q8_0 stores each block's scale absmax/127 as float16: an absmax of 1e7 would make it inf."""
    from gguf import GGMLQuantizationType as T
    from gguf_tiny import tiny_llama as gguf_llama, write_llama_gguf
    from peft import LoraConfig

    model = gguf_llama()
    base = write_llama_gguf(model, tmp_path / "base.gguf", T.Q8_0)
    adapter = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), tmp_path / "adapter")
    edit_adapter_tensors(adapter, _poison("lora_B", 1e7))
    out = tmp_path / "out.gguf"
    assert_refused(capsys, ["merge", base, adapter, out], out, [base, adapter], [f"{Q}.weight", "float16"])


# -- bitsandbytes 4-bit states -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nf4(assets, tmp_path_factory):
    """The base quantized by transformers + bitsandbytes, with and without double quantization."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("nf4")
    folders = {}
    for double in (True, False):
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double)
        model = AutoModelForCausalLM.from_pretrained(assets.base, quantization_config=config, device_map="cpu")
        folders[double] = root / f"dq{int(double)}"
        model.save_pretrained(folders[double])
    return folders


@pytest.mark.parametrize("part, double", [("quant_map", True), ("nested_quant_map", True),
                                          ("nested_absmax", True), ("absmax", False), ("quant_map", False)])
def test_non_finite_4bit_state_is_refused(assets, nf4, tmp_path, capsys, part, double):
    base = copy_of(nf4[double], tmp_path / "base")
    path = base / "model.safetensors"
    tensors = load_file(path)
    name = f"{Q}.weight.{part}"
    tensors[name] = tensors[name].clone()
    tensors[name][0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    for args in (["merge", base, assets.lora, tmp_path / "out"], ["dequantize", base, tmp_path / "out"]):
        assert_refused(capsys, args, tmp_path / "out", [base, assets.lora],
                       [name if part != "absmax" else f"{Q}.weight", "inf or NaN"])


def test_nf4_requantize_refuses_a_non_finite_change(assets, nf4, tmp_path, capsys):
    adapter = copy_of(assets.lora, tmp_path / "adapter")
    edit_adapter_tensors(adapter, _poison("lora_B", float("inf")))
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", nf4[True], adapter, out, "--requantize"], out, [nf4[True], adapter],
                   [f"{Q}.weight", "inf or NaN"])


# -- encodings wsurgery does not decode ----------------------------------------------------------------------
# FP8 blocks, compressed-tensors, MXFP4, GPTQ/AWQ and LLM.int8 are decoded now (tests/test_encoding_*.py);
# these are formats with no Encoding registered: fbgemm's FP8 (per-row weight_scale) and EETQ's int8.

def _undecoded(assets, folder: Path, method: str, store) -> Path:
    """A copy of the tiny base with every projection stored by ``store(w) -> {suffix: tensor}``, and a
    quantization_config naming ``method``."""
    folder = copy_of(assets.base, folder)
    tensors = {}
    for name, w in load_file(folder / "model.safetensors").items():
        if name.endswith("_proj.weight"):
            tensors.update({name + suffix: t for suffix, t in store(w).items()})
        else:
            tensors[name] = w
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def int8(assets, tmp_path_factory):
    """EETQ's layout: each Linear ``weight`` int8 with per-row ``weight_scales``, quant_method eetq."""
    def store(w):
        scale = w.float().abs().amax(dim=1) / 127
        return {"": (w.float() / scale[:, None]).round().to(torch.int8), "_scales": scale.half()}

    return _undecoded(assets, tmp_path_factory.mktemp("int8") / "base", "eetq", store)


@pytest.fixture(scope="module")
def fp8(assets, tmp_path_factory):
    """fbgemm's FP8 layout: each Linear ``weight`` float8_e4m3fn with a per-row float32 ``weight_scale``
    (W ≈ weight · scale), quant_method fbgemm_fp8."""
    def store(w):
        scale = w.float().abs().amax(dim=1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max
        return {"": (w.float() / scale).to(torch.float8_e4m3fn), "_scale": scale}

    return _undecoded(assets, tmp_path_factory.mktemp("fp8") / "base", "fbgemm_fp8", store)


def test_merge_into_int8_base_is_refused(assets, int8, tmp_path, capsys):
    """Before encodings were refused, an int8 base's codes were written unchanged (the change rounded away)
    and quantization_config dropped."""
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", int8, assets.lora, out], out, [int8, assets.lora],
                   [f"{Q}.weight", "int8", "quant_method: eetq"])


def test_merge_into_fp8_base_is_refused(assets, fp8, tmp_path, capsys):
    """Before encodings were refused, an FP8 base ended in an internal error (float8 promotion)."""
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", fp8, assets.lora, out], out, [fp8, assets.lora],
                   [f"{Q}.weight", "float8_e4m3fn", f"{Q}.weight_scale", "quant_method: fbgemm_fp8"])


@pytest.mark.parametrize("command", ["dequantize", "quantize", "verify"])
def test_rewriting_an_undecoded_encoding_is_refused(int8, fp8, tmp_path, capsys, command):
    """dequantize wrote int8 codes as the weights; the others must not read codes as numbers either."""
    for base, method in ((int8, "eetq"), (fp8, "fbgemm_fp8")):
        out = tmp_path / f"out-{method[:3]}"
        args = ["verify", "--quantized", base, base] if command == "verify" else [command, base, out]
        assert_refused(capsys, args, out, [base], ["quantization_config", method, "not decode"])


def test_unchanged_tensors_of_an_undecoded_encoding_are_not_rewritten(assets, tmp_path, capsys):
    """A plain-float base whose config says HQQ: the adapter's modules are float, but the output would
    keep tensors the config calls encoded while dropping or contradicting it: refused by quant_method."""
    base = copy_of(assets.base, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hqq", "nbits": 4, "group_size": 64}
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", base, assets.lora, out], out, [base, assets.lora], ["hqq", "not decode"])


def test_bitsandbytes_4bit_base_still_merges(assets, nf4, tmp_path, capsys):
    cli_ok(capsys, ["merge", nf4[True], assets.lora, tmp_path / "out", "-q"])
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_overflow_bound_is_where_rounding_reaches_inf(dtype):
    """The engine's bound against torch's own rounding: the bound rounds to inf, the float below it
    (in the wider type the merge computes in) to the largest finite value."""
    from wsurgery.engine import overflow_bound

    wide = torch.float64 if dtype == torch.float32 else torch.float32
    bound = torch.tensor(overflow_bound(dtype), dtype=wide)
    below = torch.nextafter(bound, torch.tensor(0.0, dtype=wide))
    assert float(bound) == overflow_bound(dtype)  # exactly representable where it is compared
    assert torch.isinf(bound.to(dtype)) and torch.isinf((-bound).to(dtype))
    assert below.to(dtype) == torch.finfo(dtype).max and (-below).to(dtype) == -torch.finfo(dtype).max


def test_verify_refuses_a_merged_checkpoint_in_an_undecoded_encoding(assets, int8, tmp_path, capsys):
    """The int8 codes of a "merged" EETQ checkpoint are not weights to run the forward check on."""
    status, stdout, stderr = run_cli(["verify", assets.base, assets.lora, int8], capsys)
    assert status == 1 and stdout == "" and "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsurgery: error:"), lines
    assert f"{Q}.weight" in lines[0] and "int8" in lines[0] and "eetq" in lines[0], lines[0]


def test_gguf_requantize_refuses_what_the_block_scales_cannot_hold(tmp_path, capsys):
    """quantize --gguf-type Q8_0 of a weight with |x| = 1e7: its block's float16 scale 1e7/127 would be inf."""
    from gguf import GGMLQuantizationType as T
    from gguf_tiny import tiny_llama as gguf_llama, write_llama_gguf

    model = gguf_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = 1e7
    base = write_llama_gguf(model, tmp_path / "base.gguf", T.F32)
    out = tmp_path / "out.gguf"
    assert_refused(capsys, ["quantize", base, out, "--gguf-type", "Q8_0"], out, [base],
                   ["model.layers.1.mlp.up_proj.weight", "float16"])


def test_dtype_cast_that_overflows_an_unchanged_tensor_is_refused(assets, tmp_path, capsys):
    """--dtype float16 of a float32 base whose (unchanged) embedding holds 1e5: inf in float16."""
    base = copy_of(assets.base, tmp_path / "base")
    tensors = load_file(base / "model.safetensors")
    tensors["model.embed_tokens.weight"][7, 3] = 1e5
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", base, assets.lora, out, "--dtype", "float16"], out, [base, assets.lora],
                   ["model.embed_tokens.weight", "float16", "--dtype"])


def test_dtype_cast_keeps_the_bases_own_inf(assets, tmp_path, capsys):
    """A base value that is already inf (e.g. a mask) is the base's, not an overflow: kept, not refused."""
    base = copy_of(assets.base, tmp_path / "base")
    tensors = load_file(base / "model.safetensors")
    tensors["model.norm.weight"][0] = float("-inf")
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    cli_ok(capsys, ["merge", base, assets.lora, tmp_path / "out", "--dtype", "bfloat16", "-q"])
    written = load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"]
    assert written.dtype == torch.bfloat16 and written[0] == float("-inf")
    assert torch.equal(written[1:], tensors["model.norm.weight"][1:].to(torch.bfloat16))


def test_verify_quantized_refuses_encodings_without_an_error_bound(assets, tmp_path, capsys):
    """verify --quantized bounds bitsandbytes 4-bit's error; an FP8-block checkpoint compared byte for byte with
    its original would "fail" every weight: refused in one line instead."""
    folder = copy_of(assets.base, tmp_path / "fp8")
    tensors = {}
    for name, w in load_file(folder / "model.safetensors").items():
        if name.endswith("_proj.weight"):
            tensors[name] = w.float().clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name + "_scale_inv"] = torch.ones((-(-w.shape[0] // 128), -(-w.shape[1] // 128)))
        else:
            tensors[name] = w
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128],
                                     "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(config))
    status, stdout, stderr = run_cli(["verify", "--quantized", assets.base, folder], capsys)
    lines = stderr.strip().splitlines()
    assert status == 1 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "fp8-block" in lines[0] and "verify --quantized" in lines[0], lines[0]
