"""Key mapping between adapters and checkpoints saved from other model classes, older PEFT adapter
formats, and Hub repo ids as inputs (through an offline Hub cache)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import wsurgery
from oracle import assert_close_to, load_all, make_adapter, oracle_merge, save_base, tiny_bert, tiny_llama
from wsurgery.errors import InputError
from test_quickstart import FIXTURES


def test_adapter_from_task_model_onto_bare_checkpoint(tmp_path):
    """Trained on BertForSequenceClassification (``bert.encoder...``), merged into a BertModel checkpoint."""
    head_model = tiny_bert(head=True)
    adapter = make_adapter(head_model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]),
                           tmp_path / "adapter")
    save_base(head_model.bert, tmp_path / "bare")
    expected = oracle_merge(type(head_model).from_pretrained(save_base(head_model, tmp_path / "full")), adapter)
    wsurgery.merge(tmp_path / "bare", adapter, tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    assert "encoder.layer.0.attention.self.query.weight" in merged
    assert_close_to(merged, {k.removeprefix("bert."): v for k, v in expected.items()})


def test_adapter_from_bare_model_onto_causal_lm_checkpoint(tmp_path):
    """Trained on LlamaModel (``layers.0...``), merged into a LlamaForCausalLM checkpoint (``model.layers.0...``)."""
    lm = tiny_llama()
    adapter = make_adapter(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
                           tmp_path / "adapter")
    base_dir = save_base(lm, tmp_path / "base")
    expected = oracle_merge(type(lm.model).from_pretrained(save_base(lm.model, tmp_path / "bare")), adapter)
    wsurgery.merge(base_dir, adapter, tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    assert_close_to({k: v for k, v in merged.items() if k != "lm_head.weight"},
                    {f"model.{k}": v for k, v in expected.items()})
    assert torch.equal(merged["lm_head.weight"], load_all(base_dir)["lm_head.weight"])


def test_ambiguous_mapping_is_an_error(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"enc.x.weight": torch.ones(4, 4), "dec.x.weight": torch.ones(4, 4)}, base / "model.safetensors")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.x.lora_A.weight": torch.ones(2, 4),
               "base_model.model.x.lora_B.weight": torch.ones(4, 2)}, adapter / "adapter_model.safetensors")
    with pytest.raises(InputError, match="several ways"):
        wsurgery.merge(base, adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_old_peft_format_adapter(tmp_path):
    """An adapter as PEFT 0.3-0.17 wrote it: .bin weights, no peft_version, legacy config fields."""
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    modern = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    cfg = json.loads((modern / "adapter_config.json").read_text())
    for key in ("peft_version", "use_dora", "lora_bias", "use_rslora", "rank_pattern", "alpha_pattern",
                "target_parameters", "layer_replication", "trainable_token_indices", "use_qalora"):
        cfg.pop(key, None)
    cfg.update({"enable_lora": None, "merge_weights": False, "inference_mode": True})
    (old / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save(load_file(modern / "adapter_model.safetensors"), old / "adapter_model.bin")
    expected = oracle_merge(type(model).from_pretrained(base_dir), modern)
    wsurgery.merge(base_dir, old, tmp_path / "merged", progress=False)
    assert_close_to(load_all(tmp_path / "merged"), expected)


def _cache_repo(hf_home, repo_id, folder, revision="0" * 40):
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_hub_repo_ids_resolve_through_the_offline_cache(tmp_path, monkeypatch):
    hf_home = tmp_path / "hf"
    _cache_repo(hf_home, "tiny-org/tiny-llama", FIXTURES / "tiny-llama")
    _cache_repo(hf_home, "tiny-org/tiny-llama-lora", FIXTURES / "tiny-llama-lora")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so that the repo ids are not also local paths
    wsurgery.merge("tiny-org/tiny-llama", "tiny-org/tiny-llama-lora", tmp_path / "from-hub", progress=False)
    wsurgery.merge(FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-lora", tmp_path / "local", progress=False)
    a, b = load_all(tmp_path / "from-hub"), load_all(tmp_path / "local")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="not in the local cache|no such Hub repository"):
        wsurgery.merge("tiny-org/absent", "tiny-org/tiny-llama-lora", tmp_path / "x", progress=False)
