"""Whole-checkpoint NF4/FP4: ``quantize``, ``dequantize`` and the QLoRA merges, against transformers +
bitsandbytes (CPU backend) and PEFT.

The oracle for ``quantize`` is transformers itself: ``from_pretrained(..., BitsAndBytesConfig(...))``
then ``save_pretrained``; our files must hold the same tensors byte for byte, load with
transformers, and give the same logits. ``dequantize`` must equal bitsandbytes' ``dequantize_4bit``.
The QLoRA merge's oracle is PEFT merging into transformers' dequantized 4-bit model.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

import wsurgery
import wsurgery.api  # a submodule: "import wsurgery" no longer imports it eagerly
from oracle import LLAMA_LINEAR, assert_close_to, load_all, make_adapter, save_base, tiny_gpt2

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

MODELS = {
    "llama": (lambda dtype: _llama64(dtype), AutoModelForCausalLM),
    "gpt2": (lambda dtype: _gpt2_64(dtype), AutoModelForCausalLM),
    "bert": (lambda dtype: _bert64(dtype), AutoModelForSequenceClassification),
}


def _llama64(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def _gpt2_64(dtype):
    """GPT-2 (Conv1D projections, tied head) 64 wide, for the same reason as ``_bert64``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=80, n_positions=32, n_embd=64, n_layer=2, n_head=4)).to(dtype)


def _bert64(dtype):
    """A BERT classifier 64 wide: bitsandbytes' CPU kernels cannot run 4-bit layers whose rows are
    shorter than a block (32 wide tiny models quantize fine but fail in bitsandbytes' forward)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=70, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=40, num_labels=3)
    return BertForSequenceClassification(cfg).to(dtype)


def _bnb_config(quant_type="nf4", double_quant=True, compute=torch.bfloat16):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute)


def _transformers_quantized(base, auto, folder, **kw):
    model = auto.from_pretrained(base, quantization_config=_bnb_config(**kw), device_map="cpu")
    model.save_pretrained(folder)
    return model


def stored(folder) -> dict[str, torch.Tensor]:
    """Every tensor as the files store it (``load_all`` reads 4-bit weights as what they stand for)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def _logits(model, name):
    ids = torch.arange(12)[None] % 60
    with torch.no_grad():
        if name == "bert":
            # The encoder (pooler included): bitsandbytes' CPU kernel cannot run the 3x64 classifier
            # in 4-bit, ours or transformers' alike.
            return model.bert(input_ids=ids).pooler_output
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)], ids=["nf4-dq", "fp4"])
def test_quantize_equals_transformers_bytes_and_logits(tmp_path, arch, quant_type, double_quant):
    build, auto = MODELS[arch]
    base = save_base(build(torch.bfloat16), tmp_path / "base")
    theirs_model = _transformers_quantized(base, auto, tmp_path / "theirs", quant_type=quant_type,
                                           double_quant=double_quant)
    wsurgery.api.quantize(base, tmp_path / "ours", quant_type=quant_type, double_quant=double_quant,
                          progress=False)
    ours, theirs = stored(tmp_path / "ours"), stored(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if not _same_bytes(ours[k], theirs[k])] == []
    config = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    expected = json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in config.items() if k != "llm_int8_skip_modules"} == \
        {k: v for k, v in expected.items() if k != "llm_int8_skip_modules"}
    # transformers loads our files (with our skip list) as the same model.
    mine = auto.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert torch.equal(_logits(mine, arch), _logits(theirs_model, arch))


def test_quantize_sharded_keeps_index_and_report(tmp_path):
    base = save_base(_llama64(torch.float16), tmp_path / "base", max_shard_size="20KB")
    result, report = wsurgery.api.quantize(base, tmp_path / "ours", report=True, progress=False)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(result.shards) > 1
    names = set(stored(tmp_path / "ours"))
    assert set(index["weight_map"]) == names
    q = "model.layers.0.self_attn.q_proj.weight"
    assert {f"{q}.absmax", f"{q}.quant_state.bitsandbytes__nf4"} <= names
    assert index["weight_map"][q] == index["weight_map"][f"{q}.quant_state.bitsandbytes__nf4"]
    assert len(report.tensors) == 2 * len(LLAMA_LINEAR)
    for row in report.tensors:  # NF4 at blocksize 64: SNR around 20 dB on Gaussian weights
        assert 15 < row.snr_db < 30 and row.rmse > 0
    assert report.bytes_out < report.bytes_in
    text = report.format()
    assert "overall" in text and "saved" in text


def test_dequantize_transformers_checkpoint_equals_bitsandbytes(tmp_path):
    # Rows a whole number of blocks long: bitsandbytes' CPU dequantize kernel assumes blocks do not span
    # rows, and on other shapes disagrees with its own quantize (tests/test_bnb4bit.py covers those).
    base = save_base(_llama64(torch.bfloat16), tmp_path / "base")
    _transformers_quantized(base, AutoModelForCausalLM, tmp_path / "q")
    wsurgery.api.dequantize(tmp_path / "q", tmp_path / "plain", progress=False)
    plain = stored(tmp_path / "plain")
    raw = stored(tmp_path / "q")
    from bitsandbytes.functional import QuantState, dequantize_4bit

    assert len(plain) < len(raw)
    for name, t in plain.items():
        if f"{name}.quant_state.bitsandbytes__nf4" in raw:
            qs = {k[len(name) + 1:]: v for k, v in raw.items() if k.startswith(name + ".")}
            state = QuantState.from_dict(qs, device=torch.device("cpu"))
            assert torch.equal(t, dequantize_4bit(raw[name], state)), name
        else:
            assert torch.equal(t, raw[name])
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in config and config["wsurgery"]["operation"] == "dequantize"


def test_dequantize_gpt2_restores_conv1d_layout(tmp_path):
    model = tiny_gpt2(torch.float32)
    base = save_base(model, tmp_path / "base")
    wsurgery.api.quantize(base, tmp_path / "q", progress=False)
    wsurgery.api.dequantize(tmp_path / "q", tmp_path / "plain", progress=False)
    plain, orig = load_all(tmp_path / "plain"), load_all(base)
    w = "transformer.h.0.attn.c_attn.weight"
    assert plain[w].shape == orig[w].shape  # (in, out), as Conv1D stores it
    assert (plain[w] - orig[w]).abs().max() < 0.2 * orig[w].abs().max()
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(tmp_path / "plain")  # loads as a plain model


def test_quant_storage_bf16_dequantizes(tmp_path):
    base = save_base(_llama64(torch.bfloat16), tmp_path / "base")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    quantized = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, device_map="cpu")
    quantized.save_pretrained(tmp_path / "q")
    _transformers_quantized(base, AutoModelForCausalLM, tmp_path / "q8")
    wsurgery.api.dequantize(tmp_path / "q", tmp_path / "a", progress=False)
    wsurgery.api.dequantize(tmp_path / "q8", tmp_path / "b", progress=False)
    a, b = stored(tmp_path / "a"), stored(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _peft_merge_into_dequantized(q_folder, adapter_dir):
    model = AutoModelForCausalLM.from_pretrained(q_folder, device_map="cpu")
    model = model.dequantize()
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()


def test_qlora_merge_into_nf4_base(tmp_path):
    base = save_base(_llama64(torch.bfloat16), tmp_path / "base")
    q = tmp_path / "q"
    _transformers_quantized(base, AutoModelForCausalLM, q)
    adapter = make_adapter(_llama64(torch.bfloat16), LoraConfig(r=4, target_modules=LLAMA_LINEAR), tmp_path / "lora")
    wsurgery.merge(q, adapter, tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    expected = _peft_merge_into_dequantized(q, adapter)
    wsurgery.api.dequantize(q, tmp_path / "deq", progress=False)
    assert_close_to(merged, {k: v for k, v in expected.items() if k in merged}, base=load_all(tmp_path / "deq"))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["wsurgery"]["quantization"]["merged_into"] == "the decoded bitsandbytes-4bit base"
    info = wsurgery.inspect(tmp_path / "merged")
    assert "decoded bitsandbytes-4bit base" in json.dumps(info)


def test_qlora_merge_requantize(tmp_path):
    base = save_base(_llama64(torch.bfloat16), tmp_path / "base")
    q = tmp_path / "q"
    _transformers_quantized(base, AutoModelForCausalLM, q)
    adapter = make_adapter(_llama64(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                           tmp_path / "lora")
    wsurgery.merge(q, adapter, tmp_path / "plain", progress=False)
    wsurgery.merge(q, adapter, tmp_path / "re", progress=False, requantize=True)
    plain, re_, orig = stored(tmp_path / "plain"), stored(tmp_path / "re"), stored(q)
    assert sorted(re_) == sorted(orig)
    from bitsandbytes.functional import quantize_4bit

    for name in orig:
        if ".self_attn.q_proj." in name or ".self_attn.v_proj." in name:
            continue
        assert _same_bytes(re_[name], orig[name]), name  # unchanged 4-bit weights copied byte for byte
    w = "model.layers.1.self_attn.v_proj.weight"
    packed, state = quantize_4bit(plain[w], blocksize=64, compress_statistics=True, quant_type="nf4")
    assert _same_bytes(re_[w], packed.view(-1, 1) if packed.dim() == 2 else packed)
    assert _same_bytes(re_[w + ".absmax"], state.absmax)
    assert "quantization_config" in json.loads((tmp_path / "re" / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(tmp_path / "re", device_map="cpu")  # loads


def test_through_nf4_equals_merge_into_quantized(tmp_path):
    base = save_base(_llama64(torch.bfloat16), tmp_path / "base")
    adapter = make_adapter(_llama64(torch.bfloat16), LoraConfig(r=4, target_modules=LLAMA_LINEAR), tmp_path / "lora")
    wsurgery.merge(base, adapter, tmp_path / "through", through_nf4=True, progress=False)
    wsurgery.api.quantize(base, tmp_path / "q", progress=False)
    wsurgery.merge(tmp_path / "q", adapter, tmp_path / "via-q", progress=False)
    a, b = stored(tmp_path / "through"), stored(tmp_path / "via-q")
    assert sorted(a) == sorted(b) and all(_same_bytes(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "through" / "config.json").read_text())["wsurgery"]
    assert record["quantization"]["merged_into"].startswith("dequant(quant(W))")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "wsurgery.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_quantize_report_and_dequantize(tmp_path):
    base = save_base(_llama64(torch.bfloat16), tmp_path / "base")
    r = _cli("quantize", base, tmp_path / "q", "--nf4", "--report", "-q", "--skip-modules", r"layers\.1\.mlp")
    assert r.returncode == 0, r.stderr
    assert "overall" in r.stdout and "model.layers.0.mlp.up_proj.weight" in r.stdout
    assert "model.layers.1.mlp.up_proj.weight " not in r.stdout
    skip = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert "model.layers.1.mlp.up_proj" in skip and "lm_head" in skip
    r = _cli("dequantize", tmp_path / "q", tmp_path / "plain", "--dtype", "float32", "-q")
    assert r.returncode == 0, r.stderr
    assert all(t.dtype == torch.float32 for t in stored(tmp_path / "plain").values())


@pytest.mark.parametrize("case", ["already-quantized", "not-quantized", "missing-part", "shape-mismatch",
                                  "unknown-type", "bad-blocksize"])
def test_bad_input(tmp_path, case):
    base = save_base(_llama64(torch.bfloat16), tmp_path / "base")
    wsurgery.api.quantize(base, tmp_path / "q", progress=False)
    q = tmp_path / "q"
    w = "model.layers.0.self_attn.q_proj.weight"
    f = q / "model.safetensors"
    tensors = load_file(f)
    if case == "missing-part":
        del tensors[w + ".absmax"]
    elif case == "shape-mismatch":
        state = json.loads(bytes(tensors[w + ".quant_state.bitsandbytes__nf4"].tolist()))
        state["shape"] = [state["shape"][0] * 2, state["shape"][1]]
        tensors[w + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(state).encode()),
                                                                     dtype=torch.uint8)
    elif case == "unknown-type":
        state = json.loads(bytes(tensors[w + ".quant_state.bitsandbytes__nf4"].tolist()))
        state["quant_type"] = "nf5"
        tensors[w + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(state).encode()),
                                                                     dtype=torch.uint8)
    save_file(tensors, f, metadata={"format": "pt"})
    before = f.read_bytes()
    args = {"already-quantized": ("quantize", q, tmp_path / "out"),
            "not-quantized": ("dequantize", base, tmp_path / "out"),
            "bad-blocksize": ("quantize", base, tmp_path / "out", "--blocksize", "100")}.get(
        case, ("dequantize", q, tmp_path / "out"))
    r = _cli(*args)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()
    assert f.read_bytes() == before
    if case in ("missing-part", "shape-mismatch", "unknown-type"):
        assert w in r.stderr


@pytest.mark.parametrize("damage", ["codes", "absmax"])
def test_verify_quantized_passes_and_catches_a_damaged_block(tmp_path, damage):
    base = save_base(_llama64(torch.bfloat16), tmp_path / "base")
    wsurgery.api.quantize(base, tmp_path / "q", progress=False)
    good = wsurgery.api.verify_quantized(base, tmp_path / "q", progress=False, device="cpu")
    assert good.passed, [(c.module, c.max_abs) for c in good.failures]
    forward = [c for c in good.checks if c.kind == "forward"]
    assert len(forward) == 2 * len(LLAMA_LINEAR) and all(0.02 < c.max_rel < 0.2 for c in forward)

    w = "model.layers.1.mlp.down_proj.weight"
    f = tmp_path / "q" / "model.safetensors"
    tensors = load_file(f)
    if damage == "codes":  # one 64-element block: every code moved by 8 steps
        packed = tensors[w].clone().view(-1)
        packed[320:352] ^= 0x88
        tensors[w] = packed.view(tensors[w].shape)
    else:  # one bit flipped in one block's 8-bit absmax code
        absmax = tensors[w + ".absmax"].clone()
        absmax[7] ^= 0x80
        tensors[w + ".absmax"] = absmax
    save_file(tensors, f, metadata={"format": "pt"})
    bad = wsurgery.api.verify_quantized(base, tmp_path / "q", progress=False, device="cpu")
    assert [c.module for c in bad.failures] == [w]
    r = _cli("verify", base, tmp_path / "q", "--quantized", "-q")
    assert r.returncode == 1 and w in r.stderr
