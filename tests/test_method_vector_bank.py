"""VB-LoRA, UniLoRA and TinyLoRA against PEFT 0.21.2's ``merge_and_unload()`` on tiny real models.

All three share model-wide tensors (a vector bank, theta_d, the tinylora_v groups). Every trainable
adapter parameter is random and non-zero (make_adapter adds noise to PEFT's init: TinyLoRA's v starts
at 0, VB-LoRA's bank at ±0.02); PEFT's buffers (UniLoRA indices/scales, TinyLoRA's SVD factors and
projections) are left exactly as PEFT made them, since they are what the files must reproduce.

TinyLoRA's groups and projection seeds depend on each layer's position in the model's module
registration order; the 11-layer model makes ``layers.10`` sort before ``layers.2`` by name, and
``self_attn.q_proj`` sorts after ``mlp.up_proj`` within a layer, so a name-order guess would fail.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from oracle import (
    LLAMA_LINEAR,
    assert_close_to,
    dtypes_fp32_bf16,
    edit_adapter_config,
    edit_adapter_tensors,
    load_all,
    make_adapter,
    oracle_merge,
    reload,
    run_case,
    save_base,
    tiny_gpt2,
    tiny_llama,
)
from peft import TinyLoraConfig, UniLoraConfig, VBLoRAConfig
from safetensors.torch import load_file

import wsurgery
from wsurgery.adapters import load_adapter
from wsurgery.errors import InputError, UnsupportedError

GPT2_CONV1D = ["c_attn", "c_proj", "c_fc"]
DTYPES = dtypes_fp32_bf16()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """PEFT's TinyLoRA init runs an SVD per layer; on a busy 2-core machine multi-threaded LAPACK makes
    each tiny SVD take ~0.25 s instead of ~0.5 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama11(dtype=torch.float32, seed=0):
    """11 decoder layers (hidden 16), so that name order and registration order differ across layers too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=11,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).to(dtype)


def _tensors(adapter_dir):
    return load_file(adapter_dir / "adapter_model.safetensors")


def _registration_order(model, targets):
    """Module paths PEFT numbers, in named_modules() order (what TinyLoRA's layer index counts)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets]


# -- VB-LoRA ---------------------------------------------------------------------------------------

@DTYPES
def test_vblora_llama_all_linear(tmp_path, dtype):
    cfg = VBLoRAConfig(r=4, num_vectors=30, vector_length=8, topk=2, target_modules=LLAMA_LINEAR)
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    saved = _tensors(adapter_dir)
    assert saved["base_model.vblora_vector_bank"].shape == (30, 8)
    assert sum(k.endswith("vblora_logits_A") for k in saved) == 14


@DTYPES
def test_vblora_save_only_topk_weights(tmp_path, dtype):
    # topk=3: two saved weights per piece, the third implied as 1 - Σ; int8 indices (N < 256).
    cfg = VBLoRAConfig(r=3, num_vectors=20, vector_length=8, topk=3, save_only_topk_weights=True,
                       target_modules=["q_proj", "v_proj", "down_proj"])
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    saved = _tensors(adapter_dir)
    key = "base_model.model.model.layers.1.mlp.down_proj.vblora_logits_A"
    assert not any(k.endswith(("vblora_logits_A", "vblora_logits_B")) for k in saved)
    assert saved[key + "_topk_indices"].shape == (3, 6, 3) and saved[key + "_topk_indices"].dtype == torch.uint8
    assert saved[key + "_topk_weights"].shape == (3, 6, 2)


def test_vblora_gpt2_conv1d_topk1(tmp_path):
    # topk=1 in the top-k format saves zero weights per piece (the only weight is 1 - 0).
    cfg = VBLoRAConfig(r=2, num_vectors=12, vector_length=16, topk=1, save_only_topk_weights=True,
                       target_modules=GPT2_CONV1D)
    _, adapter_dir, _ = run_case(tmp_path, tiny_gpt2(), cfg)
    saved = _tensors(adapter_dir)
    assert saved["base_model.model.transformer.h.0.attn.c_attn.vblora_logits_A_topk_weights"].shape == (2, 2, 0)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_vblora_gpt2_conv1d_logits(tmp_path):
    cfg = VBLoRAConfig(r=2, num_vectors=12, vector_length=16, topk=2, target_modules=GPT2_CONV1D)
    run_case(tmp_path, tiny_gpt2(), cfg)


def test_vblora_topk_weights_summing_past_one_are_refused(tmp_path):
    """1 - Σw < 0 makes PEFT's log() NaN and its merged weight NaN; we refuse instead."""
    model = tiny_llama()
    cfg = VBLoRAConfig(r=2, num_vectors=10, vector_length=8, topk=2, save_only_topk_weights=True,
                       target_modules=["q_proj"])
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    key = "base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_B_topk_weights"
    edit_adapter_tensors(adapter_dir, lambda t: t[key].__setitem__((0, 0), 1.25))
    expected = oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)
    assert torch.isnan(expected["model.layers.0.self_attn.q_proj.weight"]).any()
    with pytest.raises(InputError, match=r"q_proj.*vblora_logits_B_topk_weights sum to more than 1"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


def test_vblora_bad_input(tmp_path):
    model = tiny_llama()
    cfg = VBLoRAConfig(r=2, num_vectors=10, vector_length=8, target_modules=["q_proj"])
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    # a bank with a different vector length gives a change of another shape: refused before any data is read
    edit_adapter_tensors(adapter_dir, lambda t: t.__setitem__("base_model.vblora_vector_bank", torch.randn(10, 16)))
    with pytest.raises(InputError, match=r"q_proj: VB-LoRA's change has shape \[64, 64\].*base weight is \[32, 32\]"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    edit_adapter_tensors(adapter_dir, lambda t: t.pop("base_model.vblora_vector_bank"))
    with pytest.raises(InputError, match="no base_model.vblora_vector_bank"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


# -- UniLoRA ---------------------------------------------------------------------------------------

@DTYPES
def test_unilora_saved_indices_llama(tmp_path, dtype):
    cfg = UniLoraConfig(r=4, theta_d_length=300, save_indices=True, target_modules=LLAMA_LINEAR)
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    saved = _tensors(adapter_dir)
    # the scales are 1/sqrt(count), rounded to the base's dtype; several entries share each theta_d value
    scales = saved["base_model.model.model.layers.0.self_attn.q_proj.unilora_scales_A"]
    assert (scales < 1).all() and torch.equal(scales.to(dtype).to(scales.dtype), scales)


def test_unilora_saved_indices_gpt2_conv1d(tmp_path):
    cfg = UniLoraConfig(r=3, theta_d_length=200, save_indices=True, target_modules=GPT2_CONV1D)
    run_case(tmp_path, tiny_gpt2(), cfg)


def test_unilora_saved_indices_eleven_layers(tmp_path):
    cfg = UniLoraConfig(r=2, theta_d_length=500, save_indices=True, target_modules=["q_proj", "up_proj", "down_proj"])
    run_case(tmp_path, llama11(), cfg)


def _resave_with(model, base_dir, adapter_dir, out_dir, **config_changes):
    """The fix our refusals suggest: flip the flag in adapter_config.json, load with PEFT, save again."""
    from peft import PeftModel

    shutil.copytree(adapter_dir, out_dir)
    edit_adapter_config(out_dir, **config_changes)
    PeftModel.from_pretrained(reload(model, base_dir, torch.float32), out_dir).save_pretrained(out_dir)
    return out_dir


def test_unilora_without_saved_indices_is_refused_and_the_fix_works(tmp_path):
    """Without save_indices PEFT re-shuffles the indices over all targeted layers in module order; the file
    then holds theta_d alone, so the layers and their order are unknown: refused, saying how to fix it. The
    fix (re-save through PEFT with save_indices) then merges like PEFT merges the original."""
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, UniLoraConfig(r=2, theta_d_length=64, target_modules=["q_proj", "up_proj"]),
                               tmp_path / "adapter")
    assert list(_tensors(adapter_dir)) == ["base_model.unilora_theta_d"]
    with pytest.raises(UnsupportedError, match="save_indices=False.*module registration order.*save_indices"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
    fixed = _resave_with(model, base_dir, adapter_dir, tmp_path / "fixed", save_indices=True)
    wsurgery.merge(base_dir, fixed, tmp_path / "merged", progress=False)
    assert_close_to(load_all(tmp_path / "merged"), oracle_merge(reload(model, base_dir, torch.float32), adapter_dir))


def test_unilora_index_out_of_range(tmp_path):
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    cfg = UniLoraConfig(r=2, theta_d_length=64, save_indices=True, target_modules=["q_proj"])
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    key = "base_model.model.model.layers.1.self_attn.q_proj.unilora_indices_B"
    edit_adapter_tensors(adapter_dir, lambda t: t[key].__setitem__((3, 1), 64))
    with pytest.raises(InputError, match=r"layers.1.self_attn.q_proj.*unilora_indices_B point outside theta_d \(64"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


# -- TinyLoRA --------------------------------------------------------------------------------------

def _positions(adapter_dir):
    adapter = load_adapter(adapter_dir)
    return {p.module: p.describe() for p in adapter.method_patches}


@DTYPES
def test_tinylora_default_one_vector_per_layer(tmp_path, dtype):
    # weight_tying=0: every layer has its own v, picked by its position in registration order.
    model = tiny_llama(dtype)
    cfg = TinyLoraConfig(r=2, u=5, target_modules=LLAMA_LINEAR)
    _, adapter_dir, _ = run_case(tmp_path, model, cfg, dtype=dtype)
    order = _registration_order(model, LLAMA_LINEAR)
    facts = _positions(adapter_dir)
    assert {m: int(f["position"]) for m, f in facts.items()} == {m: i for i, m in enumerate(order)}
    assert all(f["group"] == f["position"] for f in facts.values())
    assert list(facts) != order  # the file's (name) order is not the registration order


def test_tinylora_weight_tying_eleven_layers(tmp_path):
    # 77 layers, weight_tying=0.5: round(38.5) = 38 groups of 2 consecutive layers in registration order
    # (the last group takes 3); layers.10 comes after layers.9, q_proj before up_proj.
    model = llama11()
    cfg = TinyLoraConfig(r=3, u=4, weight_tying=0.5, target_modules=LLAMA_LINEAR)
    _, adapter_dir, _ = run_case(tmp_path, model, cfg)
    assert sum(k.startswith("base_model.tinylora_v.") for k in _tensors(adapter_dir)) == 38
    order = _registration_order(model, LLAMA_LINEAR)
    facts = _positions(adapter_dir)
    assert {m: f["group"] for m, f in facts.items()} == {m: str(min(i // 2, 37)) for i, m in enumerate(order)}
    name_order = sorted(order)
    assert any(name_order.index(m) // 2 != i // 2 for i, m in enumerate(order))  # a name-order guess would differ


def test_tinylora_full_tying_bf16(tmp_path):
    cfg = TinyLoraConfig(r=2, u=6, weight_tying=1.0, target_modules=["q_proj", "v_proj", "down_proj"])
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(torch.bfloat16), cfg, dtype=torch.bfloat16)
    assert [k for k in _tensors(adapter_dir) if "tinylora_v" in k] == ["base_model.tinylora_v.0"]


def test_tinylora_embedding_and_gpt2_conv1d(tmp_path):
    # fan_in_fan_out is set for the Conv1D layers; the (V, d) embedding is not transposed by PEFT.
    cfg = TinyLoraConfig(r=2, u=3, weight_tying=0.4, target_modules=["wte", "c_attn", "c_fc"])
    _, adapter_dir, merged = run_case(tmp_path, tiny_gpt2(), cfg)
    facts = _positions(adapter_dir)
    assert facts["transformer.wte"]["position"] == "0"
    assert not torch.equal(merged["transformer.wte.weight"], load_all(tmp_path / "base")["transformer.wte.weight"])


def test_tinylora_embedding_llama(tmp_path):
    cfg = TinyLoraConfig(r=4, u=3, target_modules=["embed_tokens", "o_proj"])
    run_case(tmp_path, tiny_llama(), cfg)


def test_tinylora_regenerated_projection_single_layer(tmp_path):
    # save_projection=False with one targeted layer: its position is 0, P = normal(seed + 0).
    cfg = TinyLoraConfig(r=3, u=4, save_projection=False, projection_seed=7, target_modules=["q_proj"],
                         layers_to_transform=[1])
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(), cfg)
    assert not any("tinylora_P" in k for k in _tensors(adapter_dir))


def test_tinylora_regenerated_projection_single_layer_bf16(tmp_path):
    # On a bf16 base PEFT rounds the regenerated P to bf16 (and back to float32); the saved SVD factors are
    # bf16 values, which is how we know. The merge then equals PEFT's bit for bit.
    model = tiny_llama(torch.bfloat16)
    cfg = TinyLoraConfig(r=3, u=4, save_projection=False, target_modules=["v_proj"], layers_to_transform=[0])
    _, adapter_dir, merged = run_case(tmp_path, model, cfg, dtype=torch.bfloat16)
    expected = oracle_merge(reload(model, tmp_path / "base", torch.bfloat16), adapter_dir)
    name = "model.layers.0.self_attn.v_proj.weight"
    assert torch.equal(merged[name], expected[name])
    (patch,) = load_adapter(adapter_dir).method_patches
    assert "rounded to bfloat16" in patch.describe()["projection"] and "bfloat16" in patch.notes[0]


@pytest.mark.parametrize("tying", [0.0, 1.0])
def test_tinylora_regenerated_projection_several_layers_is_refused(tmp_path, tying):
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    cfg = TinyLoraConfig(r=2, u=3, weight_tying=tying, save_projection=False, target_modules=["q_proj", "up_proj"])
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match=r"no saved tinylora_P \(save_projection=False\) and 4 layers.*"
                                               r"registration order.*save_projection"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    if tying == 0.0:  # the suggested fix merges like PEFT merges the original
        fixed = _resave_with(model, base_dir, adapter_dir, tmp_path / "fixed", save_projection=True)
        assert any("tinylora_P" in k for k in _tensors(fixed))
        wsurgery.merge(base_dir, fixed, tmp_path / "merged", progress=False)
        expected = oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)
        assert_close_to(load_all(tmp_path / "merged"), expected)


def test_tinylora_unrecoverable_positions_are_refused(tmp_path):
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    cfg = TinyLoraConfig(r=2, u=3, target_modules=["q_proj", "up_proj"])
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    edit_adapter_config(adapter_dir, projection_seed=1000)  # P no longer is the draw of any position
    with pytest.raises(UnsupportedError, match=r"saved tinylora_P is not torch.normal.*cannot be recovered"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    edit_adapter_config(adapter_dir, projection_seed=42)
    # a targeted layer missing from the file: 3 layers cannot make the 4 groups PEFT saved
    edit_adapter_tensors(adapter_dir, lambda t: [t.pop(k) for k in list(t) if "layers.1.mlp.up_proj" in k])
    with pytest.raises(UnsupportedError,
                       match=r"has 3 TinyLoRA layers.*makes 3 group\(s\), but it holds 4 shared vectors"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
