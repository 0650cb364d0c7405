"""Oracle tests: wsurgery's merge/unmerge against PEFT's ``merge_and_unload()`` on tiny real models.

Every case builds a tiny transformers (or plain torch) model, saves it, gives every adapter
parameter non-zero random values, saves the adapter with PEFT, and compares every tensor we write
with the state dict of PEFT's merged model, built from the very files we read.
Tolerances: float32 max abs error <= 1e-5 x the tensor's max; bf16/fp16 at most one ulp (PEFT rounds
ΔW to the adapter dtype and adds in the base dtype; we add in float32 and round once).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig
from safetensors.torch import load_file

import wsurgery
from oracle import (
    LLAMA_LINEAR,
    assert_close_to,
    conv_net,
    load_all,
    make_adapter,
    oracle_merge,
    reload,
    run_case,
    save_base,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from wsurgery.checkpoint import open_checkpoint



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_llama_lora_all_linear_and_embeddings(tmp_path, dtype, sharded):
    shard = ("24KB" if dtype == torch.float32 else "12KB") if sharded else None
    model = tiny_llama(dtype)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR + ["embed_tokens", "lm_head"])
    base_dir, _, _ = run_case(tmp_path, model, cfg, dtype=dtype, shard=shard)
    if shard:
        assert len(open_checkpoint(base_dir).shards) >= 3
        index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]


def test_rslora_with_rank_and_alpha_patterns(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_LINEAR,
                     rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                     alpha_pattern={"v_proj": 3, r"model\.layers\.0\.self_attn\.o_proj": 16})
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(), cfg)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 2
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape[0] == 6


def test_gpt2_conv1d_fan_in_fan_out_with_lora_bias(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                     lora_bias=True)
    run_case(tmp_path, tiny_gpt2(), cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dora_linear_and_embedding(tmp_path, dtype):
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj", "embed_tokens"])
    run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype, check_unmerge=False)


def test_dora_gpt2_conv1d_with_rslora(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, use_rslora=True, target_modules=["c_attn", "c_fc"],
                     fan_in_fan_out=True)
    run_case(tmp_path, tiny_gpt2(), cfg, check_unmerge=False)


def test_conv_layers_and_embedding(tmp_path):
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["emb", "c1", "c2", "pw", "c3", "fc"])
    run_case(tmp_path, conv_net(), cfg)


def test_dora_on_conv(tmp_path):
    cfg = LoraConfig(r=3, lora_alpha=5, use_dora=True, target_modules=["c1", "c2", "pw", "c3"])
    run_case(tmp_path, conv_net(), cfg, check_unmerge=False)


def test_bert_encoder_with_head_modules_to_save_and_all_biases(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], bias="all",
                     modules_to_save=["classifier"])
    run_case(tmp_path, tiny_bert(head=True), cfg, check_unmerge=False)


def test_bert_lora_only_bias(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key"], bias="lora_only")
    run_case(tmp_path, tiny_bert(), cfg, check_unmerge=False)


def test_adalora_with_pruned_ranks(tmp_path):
    model = tiny_llama()
    cfg = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=12, target_modules=["q_proj", "v_proj", "up_proj"],
                        total_step=10)
    base_dir = save_base(model, tmp_path / "base")

    from peft import get_peft_model

    from oracle import randomize_adapter
    peft_model = get_peft_model(tiny_llama(), cfg)
    randomize_adapter(peft_model)
    # Prune ranks as AdaLoRA's allocator does: a boolean mask per lora_E, saved as rank_pattern.
    pattern = {}
    for i, name in enumerate(n for n, _ in peft_model.named_parameters() if n.endswith("lora_E.default")):
        keep = [2, 4, 6][i % 3]
        pattern[name.removeprefix("base_model.model.").removesuffix(".default")] = [True] * keep + [False] * (6 - keep)
    peft_model.peft_config["default"].rank_pattern = pattern
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in saved.items() if k.endswith("lora_E")} == {2, 4, 6}

    expected = oracle_merge(reload(model, base_dir, torch.float32), tmp_path / "adapter")
    wsurgery.merge(base_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert_close_to(load_all(tmp_path / "merged"), expected)
    wsurgery.unmerge(tmp_path / "merged", tmp_path / "adapter", tmp_path / "unmerged", progress=False)
    assert_close_to(load_all(tmp_path / "unmerged"), load_all(base_dir))


def test_resized_vocabulary_modules_to_save(tmp_path):
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    grown = tiny_llama()
    grown.resize_token_embeddings(104)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    adapter_dir = make_adapter(grown, cfg, tmp_path / "adapter")
    fresh = reload(model, base_dir, torch.float32)
    fresh.resize_token_embeddings(104)
    expected = oracle_merge(fresh, adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    assert merged["model.embed_tokens.weight"].shape[0] == 104
    assert_close_to(merged, expected)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 104


def test_tied_embeddings_lora_on_embedding(tmp_path):
    model = tiny_llama(tie=True)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    base_dir, _, merged = run_case(tmp_path, model, cfg)
    assert "lm_head.weight" not in merged  # still tied, as in the base
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("base_dtype,adapter_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_dtype_combinations(tmp_path, base_dtype, adapter_dtype):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    run_case(tmp_path, tiny_llama(base_dtype), cfg, dtype=base_dtype, adapter_dtype=adapter_dtype)


def test_legacy_bin_base_and_adapter(tmp_path):
    model = tiny_llama()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, safe_serialization=False) if _bin_supported() else pytest.fail("no .bin")
    from peft import get_peft_model

    from oracle import randomize_adapter
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    randomize_adapter(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    expected = oracle_merge(reload(model, base_dir, torch.float32), tmp_path / "adapter")
    wsurgery.merge(base_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert_close_to(load_all(tmp_path / "merged"), expected)


def _bin_supported() -> bool:
    return True


def test_scale_dtype_and_reshard(tmp_path):
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR), tmp_path / "ad")
    expected = oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)
    base = load_all(base_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "half", scale=0.5, progress=False)
    half = {n: base[n] + 0.5 * (expected[n] - base[n]) for n in base}
    assert_close_to(load_all(tmp_path / "half"), half)
    r = wsurgery.merge(base_dir, adapter_dir, tmp_path / "bf16", dtype="bf16", max_shard_size="16KB", progress=False)
    assert len(r.shards) >= 3
    assert_close_to(load_all(tmp_path / "bf16"), {n: t.to(torch.bfloat16) for n, t in expected.items()})
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    wsurgery.unmerge(tmp_path / "half", adapter_dir, tmp_path / "back", scale=0.5, progress=False)
    assert_close_to(load_all(tmp_path / "back"), base)
