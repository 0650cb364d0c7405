"""FP8 block-wise checkpoints (DeepSeek-V3 / transformers' FineGrainedFP8) through the real CLI.

Oracles: transformers' ``Fp8Dequantize`` (what ``FineGrainedFP8Config(dequantize=True)`` runs when it
loads the checkpoint on CPU) for decoding; its ``Fp8Quantize`` (what it quantizes a bf16 model with,
and what it saves with) for encoding; PEFT merging into transformers' dequantized model for merges.
transformers refuses to quantize on the fly without a GPU, so the FP8 base is built by applying its
``Fp8Quantize`` to each Linear weight of a tiny Llama and saving the layout transformers reads.
Ragged shapes (out/in not multiples of the block), which transformers' load-time dequantize cannot
handle, are checked against transformers' own ragged-aware ``_dequantize_fp8_weight`` (float32) and
against ``Fp8Quantize`` applied block by block.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

from oracle import LLAMA_LINEAR, assert_close_to, load_all, make_adapter, run_cli
from wsurgery.checkpoint import open_checkpoint

from transformers import AutoModelForCausalLM, FineGrainedFP8Config, LlamaConfig, LlamaForCausalLM
from transformers.integrations.finegrained_fp8 import (
    Fp8Dequantize, Fp8Quantize, _dequantize_fp8_weight)

FP8 = torch.float8_e4m3fn


def _llama(dtype, width=64):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def _quantizer(block) -> Fp8Quantize:
    config = FineGrainedFP8Config(weight_block_size=None if block is None else list(block))
    return Fp8Quantize(types.SimpleNamespace(quantization_config=config))


def _fp8_base(tmp_path, dtype=torch.bfloat16, block=(32, 32), width=64, zero_block=True):
    """A tiny Llama saved plain, then in FP8 blocks as transformers stores them (lm_head not converted)."""
    model = _llama(dtype, width)
    if zero_block:  # an all-zero block: the quantizer's scale-1 case
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight[: block[0], : block[1]] = 0
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    quant = _quantizer(block)
    tensors = {}
    for name, t in load_file(plain / "model.safetensors").items():
        tensors.update(quant._quantize_one(name, t) if name.endswith("proj.weight") else {name: t})
    q = tmp_path / "fp8"
    q.mkdir()
    save_file(tensors, q / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block), "modules_to_not_convert": ["lm_head"]}
    (q / "config.json").write_text(json.dumps(config))
    return q


def _transformers_dequantized(folder):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=FineGrainedFP8Config(dequantize=True),
                                                device_map="cpu")


def _stored(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN-safe, -0 distinct from +0)."""
    return _same_bytes(a.contiguous(), b.contiguous())


@pytest.mark.parametrize("dtype,block,width", [(torch.bfloat16, (32, 32), 64), (torch.float16, (64, 32), 64),
                                               (torch.float32, (128, 128), 128)], ids=["bf16-32", "fp16-64x32",
                                                                                       "fp32-128"])
def test_decode_equals_transformers_dequantize(tmp_path, dtype, block, width):
    q = _fp8_base(tmp_path, dtype, block, width)
    theirs = _transformers_dequantized(q).state_dict()
    ours = load_all(q)
    assert sorted(ours) == sorted(theirs)
    assert [n for n in ours if not _identical(ours[n], theirs[n])] == []
    assert ours["model.layers.0.mlp.up_proj.weight"].dtype == dtype
    # Row chunks (one block row each) decode to the same rows as the whole tensor.
    ckpt = open_checkpoint(q)
    info = ckpt.tensors["model.layers.1.mlp.gate_proj.weight"]
    chunk = info.encoding.row_chunk(info)
    assert chunk == block[0]
    rows = [info.encoding.decode(info, ckpt.read_part, (a, min(a + chunk, info.shape[0])))
            for a in range(0, info.shape[0], chunk)]
    assert _identical(torch.cat(rows), ours["model.layers.1.mlp.gate_proj.weight"])


def test_inspect_and_dequantize_load_plainly_with_the_same_logits(tmp_path, capsys):
    q = _fp8_base(tmp_path)
    code, out, err = run_cli(["inspect", q], capsys)
    assert code == 0, err
    assert "fp8 e4m3fn, 32x32 blocks, float32 scale_inv" in out
    code, _, err = run_cli(["dequantize", q, tmp_path / "deq", "-q"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "deq" / "config.json").read_text())
    assert "quantization_config" not in config
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "deq")
    theirs = _transformers_dequantized(q)
    assert plain.dtype == torch.bfloat16
    sd = plain.state_dict()
    assert all(_identical(sd[n], t) for n, t in theirs.state_dict().items())
    ids = torch.arange(12)[None] % 90
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, theirs(input_ids=ids).logits)


def _peft_merged(q, adapter):
    model = _transformers_dequantized(q)
    return {k: v.detach().clone() for k, v in PeftModel.from_pretrained(model, adapter).merge_and_unload()
            .state_dict().items()}


def test_merge_equals_peft_on_transformers_dequantized(tmp_path, capsys):
    q = _fp8_base(tmp_path)
    adapter = make_adapter(_llama(torch.bfloat16), LoraConfig(r=4, target_modules=LLAMA_LINEAR), tmp_path / "lora")
    code, _, err = run_cli(["merge", q, adapter, tmp_path / "merged", "-q"], capsys)
    assert code == 0, err
    merged = load_all(tmp_path / "merged")
    assert all(t.dtype == torch.bfloat16 for t in _stored(tmp_path / "merged").values())
    expected = _peft_merged(q, adapter)
    assert_close_to(merged, {k: v for k, v in expected.items() if k in merged}, base=load_all(q))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    code, out, err = run_cli(["verify", q, adapter, tmp_path / "merged", "--device", "cpu", "-q"], capsys)
    assert code == 0, out + err


def test_merge_requantize_bytes_equal_transformers_quantizer(tmp_path, capsys):
    q = _fp8_base(tmp_path)
    adapter = make_adapter(_llama(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]),
                           tmp_path / "lora")
    code, _, err = run_cli(["merge", q, adapter, tmp_path / "re", "--requantize", "-q"], capsys)
    assert code == 0, err
    re_, orig = _stored(tmp_path / "re"), _stored(q)
    assert sorted(re_) == sorted(orig)
    changed = [n for n in orig if ".q_proj." in n or ".down_proj." in n]
    assert len(changed) == 8
    assert [n for n in orig if n not in changed and not _same_bytes(re_[n], orig[n])] == []
    expected = _peft_merged(q, adapter)
    quant = _quantizer((32, 32))
    for name in (n for n in changed if n.endswith(".weight")):
        want = quant._quantize_one(name, expected[name])
        assert _same_bytes(re_[name], want[name]), name
        assert _same_bytes(re_[name + "_scale_inv"], want[name + "_scale_inv"]), name
        assert not _same_bytes(re_[name], orig[name]), name  # the merge did change the codes
    config = json.loads((tmp_path / "re" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((q / "config.json").read_text())["quantization_config"]
    loaded = _transformers_dequantized(tmp_path / "re").state_dict()
    ours = load_all(tmp_path / "re")
    assert all(_identical(ours[n], loaded[n]) for n in ours)


def test_sharded_scales_apart_and_no_dtype_in_config(tmp_path, capsys):
    """Each scale in another shard than its weight, and no dtype in config.json (transformers then takes the
    first floating tensor's that is not float8): decode, and a re-encoded merge, as transformers loads them."""
    q = _fp8_base(tmp_path)
    tensors = load_file(q / "model.safetensors")
    (q / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    names = list(shards)
    for n, t in tensors.items():  # layer 0 in the first shard, its scales in the second; layer 1 the other way
        shards[names[(".layers.0." not in n) != n.endswith("_scale_inv")]][n] = t
    for f, part in shards.items():
        save_file(part, q / f, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (q / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((q / "config.json").read_text())
    del config["dtype"]
    (q / "config.json").write_text(json.dumps(config))
    theirs = _transformers_dequantized(q).state_dict()
    ours = load_all(q)
    assert [n for n in ours if not _identical(ours[n], theirs[n])] == []
    adapter = make_adapter(_llama(torch.bfloat16), LoraConfig(r=4, target_modules=["o_proj"]), tmp_path / "lora")
    code, _, err = run_cli(["merge", q, adapter, tmp_path / "re", "--requantize", "-q"], capsys)
    assert code == 0, err
    loaded = _transformers_dequantized(tmp_path / "re").state_dict()
    ours = load_all(tmp_path / "re")
    assert [n for n in ours if not _identical(ours[n], loaded[n])] == []
    expected = _peft_merged(q, adapter)
    o = "model.layers.1.self_attn.o_proj.weight"
    want = _quantizer((32, 32))._quantize_one(o, expected[o])
    got = _stored(tmp_path / "re")
    assert _same_bytes(got[o], want[o]) and _same_bytes(got[o + "_scale_inv"], want[o + "_scale_inv"])


def _write(folder, tensors, block, **qconfig):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    q = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": block, **qconfig}
    (folder / "config.json").write_text(json.dumps({"dtype": "bfloat16", "quantization_config": q}))
    return folder


def _ragged_reference(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' quantizer on each (possibly ragged) block alone (a whole-tensor block per call)."""
    bm, bn = block
    quant = _quantizer(None)
    rows, cols = w.shape
    codes = torch.empty(w.shape, dtype=FP8)
    grid = torch.empty((-(-rows // bm), -(-cols // bn)))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            tile = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].contiguous()
            out = quant._quantize_one("t.weight", tile)
            codes[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = out["t.weight"]
            grid[i, j] = out["t.weight_scale_inv"].reshape(())
    return codes, grid


def test_ragged_and_fused_experts_decode_and_encode_as_the_reference(tmp_path):
    torch.manual_seed(1)
    block = [32, 16]
    ragged = (torch.randn(72, 40) * 0.05).to(torch.bfloat16)  # 2.25 x 2.5 blocks
    ragged[64:, 32:] = 0  # the corner block all zero
    r_codes, r_scales = _ragged_reference(ragged, block)
    experts = (torch.randn(3, 64, 48) * 0.05).to(torch.bfloat16)
    e_ref = _quantizer(block)._quantize_one("m.experts.gate_up_proj", experts)
    q = _write(tmp_path / "q", {"a.weight": r_codes, "a.weight_scale_inv": r_scales, **e_ref}, block)
    ckpt = open_checkpoint(q)
    a, e = ckpt.tensors["a.weight"], ckpt.tensors["m.experts.gate_up_proj"]
    assert a.shape == (72, 40) and e.shape == (3, 64, 48) and a.dtype == e.dtype == torch.bfloat16
    # Decode: transformers' ragged-aware dequantization in float32, cast once (its load-time dequantize
    # derives the block from the grid, 72 % 3 == 0 here but 72 / 3 = 24 is not the stated block).
    want = _dequantize_fp8_weight(r_codes, r_scales, block, torch.float32).to(torch.bfloat16)
    assert _identical(ckpt.read("a.weight"), want)
    want_e = Fp8Dequantize(None)._dequantize_one(e_ref["m.experts.gate_up_proj"],
                                                 e_ref["m.experts.gate_up_proj_scale_inv"], torch.bfloat16)
    assert _identical(ckpt.read("m.experts.gate_up_proj"), want_e)
    assert _identical(a.encoding.decode(a, ckpt.read_part, (64, 72)), want[64:])
    assert _identical(e.encoding.decode(e, ckpt.read_part, (1, 3)), want_e[1:])
    # Encode: the whole tensor and block-row chunks give the reference's bytes.
    enc = a.encoding.encode("a.weight", ragged)
    assert _same_bytes(enc["a.weight"], r_codes) and _same_bytes(enc["a.weight_scale_inv"], r_scales)
    assert a.encoding.encode_row_chunk((72, 40)) == 32
    codes, scales = torch.empty_like(r_codes), torch.empty_like(r_scales)
    for start in (0, 32, 64):
        parts = a.encoding.encode_rows("a.weight", ragged[start:start + 32], (start, min(start + 32, 72)), (72, 40))
        c, at = parts["a.weight"]
        codes[at:at + c.shape[0]] = c
        s, at = parts["a.weight_scale_inv"]
        scales[at:at + s.shape[0]] = s
    assert _same_bytes(codes, r_codes) and _same_bytes(scales, r_scales)
    enc = e.encoding.encode("m.experts.gate_up_proj", experts)
    assert all(_same_bytes(enc[k], e_ref[k]) for k in e_ref)
    spec = {s.name: (s.dtype, s.shape) for s in e.encoding.stored_specs("m.experts.gate_up_proj", (3, 64, 48),
                                                                       torch.bfloat16)}
    assert spec == {k: (v.dtype, tuple(v.shape)) for k, v in e_ref.items()}


def test_fused_experts_with_ragged_rows(tmp_path):
    """Experts whose rows are not whole blocks: each expert's grid on its own, as transformers' ragged-aware
    dequantization reads a (E, N, K) stack."""
    torch.manual_seed(3)
    block = [32, 16]
    experts = (torch.randn(2, 40, 24) * 0.05).to(torch.bfloat16)
    pairs = [_ragged_reference(experts[e], block) for e in range(2)]
    codes, scales = torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs])
    ckpt = open_checkpoint(_write(tmp_path / "q", {"m.experts.down_proj": codes,
                                                   "m.experts.down_proj_scale_inv": scales}, block))
    info = ckpt.tensors["m.experts.down_proj"]
    want = _dequantize_fp8_weight(codes, scales, block, torch.float32).to(torch.bfloat16)
    assert _identical(ckpt.read("m.experts.down_proj"), want)
    enc = info.encoding.encode("m.experts.down_proj", experts)
    assert _same_bytes(enc["m.experts.down_proj"], codes)
    assert _same_bytes(enc["m.experts.down_proj_scale_inv"], scales)


def _broken(tmp_path, case):
    torch.manual_seed(2)
    block = [32, 32]
    w = (torch.randn(64, 64) * 0.05).to(torch.bfloat16)
    t = _quantizer(block)._quantize_one("l.weight", w)
    t["other.weight"] = torch.ones(4, dtype=torch.bfloat16)
    qconfig = {}
    if case == "no-scale":
        del t["l.weight_scale_inv"]
    elif case == "scale-shape":
        t["l.weight_scale_inv"] = torch.ones(4, 2)
    elif case in ("nan-scale", "inf-scale"):
        t["l.weight_scale_inv"][1, 0] = float("nan") if case == "nan-scale" else float("inf")
    elif case == "block-unstated":
        qconfig = {"weight_block_size": "drop"}
    elif case == "block-differs":  # the grid of 64x64 in 32-blocks read with a stated 16-block
        block = [16, 16]
    elif case == "e5m2":
        t["l.weight"] = t["l.weight"].to(torch.float32).to(torch.float8_e5m2)
    elif case == "fmt-e5m2":
        qconfig = {"fmt": "e5m2"}
    elif case == "ue8m0":
        qconfig = {"scale_fmt": "ue8m0"}
    elif case == "per-tensor":
        block = None
    elif case == "orphan-scale":
        t["other.weight_scale_inv"] = torch.ones(1, 1)
    elif case == "static":
        qconfig = {"activation_scheme": "static"}
    folder = _write(tmp_path / "q", t, block, **qconfig)
    if qconfig.get("weight_block_size") == "drop":
        config = json.loads((folder / "config.json").read_text())
        del config["quantization_config"]["weight_block_size"]
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case", ["no-scale", "scale-shape", "nan-scale", "inf-scale", "block-unstated",
                                  "block-differs", "e5m2", "fmt-e5m2", "ue8m0", "per-tensor", "orphan-scale",
                                  "static"])
def test_broken_or_unsupported_fp8_refused_in_one_line(tmp_path, capsys, case):
    q = _broken(tmp_path, case)
    for args in (["dequantize", q, tmp_path / "out", "-q"], ["inspect", q]):
        code, out, err = run_cli(args, capsys)
        assert code == 1, (case, out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()
    if case in ("no-scale", "scale-shape", "nan-scale", "inf-scale", "block-differs", "e5m2"):
        assert "l.weight" in err
    if case == "orphan-scale":
        assert "other.weight_scale_inv" in err
