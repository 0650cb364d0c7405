"""``verify``: a correct merge passes; a perturbed, wrongly scaled or transposed merge fails and is named.

The LoRA family is checked here (Linear, Conv1D, Embedding, Conv, DoRA, biases, modules_to_save);
every other method is checked in ``test_verify_methods_*.py`` with the same ``check_verify`` contract.
A structural test makes sure no patch class lacks a forward path.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig

import wsurgery
from oracle import (LLAMA_LINEAR, _rewrite_merged, _subclasses, check_verify, conv_net, run_case, tiny_bert,
                    tiny_gpt2, tiny_llama)
from wsurgery.methods import Patch, ReplacePatch

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])


@DTYPES
def test_llama_lora(tmp_path, dtype):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=[*LLAMA_LINEAR, "embed_tokens", "lm_head"])
    base, adapter, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype, check_unmerge=False)
    check_verify(tmp_path, base, adapter, tmp_path / "merged")


def test_rslora_wrong_scaling_is_caught(tmp_path):
    # A merge done with alpha/r where the adapter says alpha/sqrt(r): what a hand-written script gets wrong.
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_LINEAR)
    base, adapter, _ = run_case(tmp_path, tiny_llama(), cfg, check_unmerge=False)
    check_verify(tmp_path, base, adapter, tmp_path / "merged")
    wsurgery.merge(base, adapter, tmp_path / "plain-scaling", scale=2 / 2**0.5 / 2, progress=False)
    report = wsurgery.api.verify(base, adapter, tmp_path / "plain-scaling", progress=False, device="cpu")
    assert not report.passed and len(report.failures) == 2 * len(LLAMA_LINEAR)


def test_gpt2_conv1d_with_lora_bias(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, lora_bias=True)
    base, adapter, _ = run_case(tmp_path, tiny_gpt2(), cfg, check_unmerge=False)
    check_verify(tmp_path, base, adapter, tmp_path / "merged", transposable=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dora(tmp_path, dtype):
    cfg = LoraConfig(r=4, use_dora=True, target_modules=[*LLAMA_LINEAR])
    base, adapter, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype, check_unmerge=False)
    check_verify(tmp_path, base, adapter, tmp_path / "merged")


def test_dora_gpt2_and_conv(tmp_path):
    cfg = LoraConfig(r=4, use_dora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    base, adapter, _ = run_case(tmp_path / "g", tiny_gpt2(), cfg, check_unmerge=False)
    check_verify(tmp_path / "g", base, adapter, tmp_path / "g" / "merged", transposable=False)
    cfg = LoraConfig(r=2, use_dora=True, target_modules=["c1", "c2", "pw", "c3", "fc"])
    base, adapter, _ = run_case(tmp_path / "c", conv_net(), cfg, check_unmerge=False)
    check_verify(tmp_path / "c", base, adapter, tmp_path / "c" / "merged", transposable=False)


def test_conv_and_embedding(tmp_path):
    cfg = LoraConfig(r=2, target_modules=["emb", "c1", "c2", "pw", "c3", "fc"])
    base, adapter, _ = run_case(tmp_path, conv_net(), cfg, check_unmerge=False)
    check_verify(tmp_path, base, adapter, tmp_path / "merged", transposable=False)


def test_bert_with_modules_to_save_and_biases(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["query", "value", "dense"], modules_to_save=["classifier"], bias="all")
    base, adapter, _ = run_case(tmp_path, tiny_bert(head=True), cfg, check_unmerge=False)
    check_verify(tmp_path, base, adapter, tmp_path / "merged")


def test_damaged_untouched_tensor_fails(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    base, adapter, _ = run_case(tmp_path, tiny_llama(), cfg, check_unmerge=False)

    def damage(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"].clone()
        tensors["model.norm.weight"][3] += 1e-3
    bad = _rewrite_merged(tmp_path / "merged", tmp_path / "damaged", damage)
    report = wsurgery.api.verify(base, adapter, bad, progress=False, device="cpu")
    assert [c.module for c in report.failures] == ["model.norm.weight"]


def test_cli_exit_codes_table_and_json(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    base, adapter, merged = run_case(tmp_path, tiny_llama(), cfg, check_unmerge=False)
    cmd = [sys.executable, "-m", "wsurgery.cli", "verify", str(base), str(adapter)]
    ok = subprocess.run([*cmd, str(tmp_path / "merged"), "--json", str(tmp_path / "r.json"), "-q", "--all"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "model.layers.1.self_attn.v_proj" in ok.stdout and ok.stdout.strip().splitlines()[-1].startswith("PASS")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] and data["modules"] == 4 and data["device"] == "cpu"

    wsurgery.merge(base, adapter, tmp_path / "wrong", scale=0.5, progress=False)
    bad = subprocess.run([*cmd, str(tmp_path / "wrong"), "-q"], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("wsurgery: verify failed: model.layers.0.self_attn.q_proj")
    assert len(bad.stderr.strip().splitlines()) == 1
    # The same merge checked at the scale it was made with passes.
    again = subprocess.run([*cmd, str(tmp_path / "wrong"), "-q", "--scale", "0.5"], capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr


def test_not_a_merge_of_this_base(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    base, adapter, _ = run_case(tmp_path, tiny_llama(), cfg, check_unmerge=False)
    with pytest.raises(wsurgery.InputError, match="lacks"):
        wsurgery.api.verify(base, adapter, _rewrite_merged(tmp_path / "merged", tmp_path / "short",
                                                            lambda t: t.pop("model.norm.weight")), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path):
    cfg = LoraConfig(r=4, use_dora=True, target_modules=LLAMA_LINEAR)
    base, adapter, _ = run_case(tmp_path, tiny_llama(torch.bfloat16), cfg, dtype=torch.bfloat16, check_unmerge=False)
    cpu = wsurgery.api.verify(base, adapter, tmp_path / "merged", progress=False, device="cpu")
    gpu = wsurgery.api.verify(base, adapter, tmp_path / "merged", progress=False, device="cuda")
    assert cpu.passed and gpu.passed and gpu.device == "cuda"
    for a, b in zip(cpu.checks, gpu.checks):
        assert a.module == b.module and abs(a.max_rel - b.max_rel) < 1e-3


def test_every_patch_class_has_a_forward_path():
    missing = [cls.__qualname__ for cls in _subclasses(Patch)
               if not getattr(cls, "__abstractmethods__", None) and cls is not ReplacePatch
               and cls.forward is Patch.forward]
    assert not missing, f"patch classes without a forward path for verify: {missing}"


def test_what_the_headers_and_configs_tell_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
    """Pre-validation: stacked non-additive changes (merge), and a 'quantized' checkpoint with another
    tensor or shape than its original (--quantized), are refused before verify reads one tensor."""
    from wsurgery.checkpoint import Checkpoint
    from wsurgery.errors import InputError, UnsupportedError

    model = tiny_llama()
    base, dora, _ = run_case(tmp_path / "d", model, LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]),
                             check_unmerge=False)
    _, lora, _ = run_case(tmp_path / "l", model, LoraConfig(r=4, target_modules=["q_proj"]), check_unmerge=False)
    wsurgery.merge(base, [dora, lora], tmp_path / "both", progress=False)
    other = tmp_path / "other"
    wsurgery.merge(base, lora, other, progress=False)
    from safetensors.torch import load_file, save_file
    shard = next(other.glob("*.safetensors"))
    tensors = load_file(str(shard))
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})

    def no_reads(*args, **kwargs):
        raise AssertionError("a tensor was read before the refusal")

    monkeypatch.setattr(Checkpoint, "read", no_reads)
    monkeypatch.setattr(Checkpoint, "read_stored", no_reads)
    with pytest.raises(UnsupportedError, match="not all are additive"):
        wsurgery.api.verify(base, [dora, lora], tmp_path / "both", progress=False, device="cpu")
    with pytest.raises(InputError, match="shape"):
        wsurgery.api.verify_quantized(base, other, progress=False, device="cpu")
