"""``verify`` for IA3, LN tuning, trainable tokens, Poly, FourierFT, WaveFT, SHiRA, C3A, SuperTuning and BEFT.

Each case builds the adapter as the method's own tests do (same configs), merges it (checked against
PEFT by ``run_case`` where PEFT can merge), then ``check_verify``: the merge agrees with the method's
unmerged forward path (also with every merge code path disabled), and a perturbed element, a merge at
scale 1.5 and (on a square weight) a transposed change fail and name the module. The forward paths
are also run against PEFT's own layer forward on the same inputs, which for Poly (no PEFT merge) is
the only reference there is.
"""

from __future__ import annotations

import pytest
import torch
from oracle import (LLAMA_LINEAR, check_verify, conv_net, dtypes_fp32_bf16, make_adapter, reload, run_case,
                    save_base, tiny_bert, tiny_gpt2, tiny_llama, with_random_biases)
from peft import (BeftConfig, C3AConfig, FourierFTConfig, IA3Config, LNTuningConfig, PeftModel, PolyConfig,
                  ShiraConfig, SupertuningConfig, TrainableTokensConfig, WaveFTConfig)
from test_method_hra_road_ia3 import GroupedConvNet

import wsurgery
from wsurgery.adapters import load_adapter
from wsurgery.methods.layers import Embedding

DTYPES = dtypes_fp32_bf16()


def _case(tmp_path, model, cfg, dtype=torch.float32, *, transposable=True, adapter_dtype=None):
    base, adapter, _ = run_case(tmp_path, model, cfg, dtype=dtype, check_unmerge=False, adapter_dtype=adapter_dtype)
    check_verify(tmp_path, base, adapter, tmp_path / "merged", transposable=transposable)


def _unchecked_case(tmp_path, model, cfg, *, options=None, transposable=True):
    """Save, merge and verify where PEFT has no merge to compare with (Poly) or its bf16 merge rounds more
    often than ours (SuperTuning: compared in test_method_structured with its own bound)."""
    base = save_base(model, tmp_path / "base")
    adapter = make_adapter(model, cfg, tmp_path / "adapter")
    wsurgery.merge(base, adapter, tmp_path / "merged", progress=False, options=options)
    check_verify(tmp_path, base, adapter, tmp_path / "merged", options=options, transposable=transposable)
    return base, adapter


# -- IA3 ----------------------------------------------------------------------------------------------------------
@DTYPES
def test_ia3_llama_feedforward_and_attention(tmp_path, dtype):
    cfg = IA3Config(target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    feedforward_modules=["down_proj", "gate_proj"])
    _case(tmp_path, tiny_llama(dtype), cfg, dtype)


def test_ia3_gpt2_conv1d_with_biases(tmp_path):
    cfg = IA3Config(target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
                    feedforward_modules=["mlp.c_proj", "c_fc"], fan_in_fan_out=True)
    _case(tmp_path, with_random_biases(tiny_gpt2()), cfg)


@DTYPES
def test_ia3_conv_layers(tmp_path, dtype):
    cfg = IA3Config(target_modules=["c2", "pw", "c3", "fc"], feedforward_modules=["pw", "fc"])
    _case(tmp_path, conv_net(dtype), cfg, dtype, transposable=False)


def test_ia3_gpt2_conv1d_next_to_lm_head(tmp_path):
    """The saved fan_in_fan_out is the lm_head's False; the Conv1D layers' layout comes from their shapes."""
    from test_method_hra_road_ia3 import _untied_gpt2

    cfg = IA3Config(target_modules=["c_attn", "c_fc", "mlp.c_proj", "lm_head"],
                    feedforward_modules=["c_fc", "mlp.c_proj"])
    _case(tmp_path, _untied_gpt2(), cfg, transposable=False)


def test_ia3_grouped_conv(tmp_path):
    torch.manual_seed(0)
    cfg = IA3Config(target_modules=["g", "h"], feedforward_modules=["g", "h"])
    _case(tmp_path, GroupedConvNet(), cfg, transposable=False)


# -- LN tuning and trainable tokens -------------------------------------------------------------------------------
@DTYPES
def test_ln_tuning_llama_rmsnorm(tmp_path, dtype):
    cfg = LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm", "norm"])
    _case(tmp_path, tiny_llama(dtype), cfg, dtype, transposable=False)


def test_ln_tuning_bert_layernorm_with_bias(tmp_path):
    _case(tmp_path, tiny_bert(), LNTuningConfig(target_modules=["LayerNorm"]), transposable=False)


@DTYPES
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_trainable_tokens_llama(tmp_path, dtype, tie):
    cfg = TrainableTokensConfig(token_indices=[0, 5, 7, 90])
    _case(tmp_path, tiny_llama(dtype, tie=tie), cfg, dtype, transposable=False)


def test_trainable_tokens_on_embedding_and_untied_head(tmp_path):
    cfg = TrainableTokensConfig(token_indices=[1, 2, 95], target_modules=["embed_tokens", "lm_head"])
    _case(tmp_path, tiny_llama(), cfg, transposable=False)


def test_trained_rows_are_inputs_of_a_large_vocabulary():
    """Past 4096 rows the ids are a sample; the rows an adapter changes alone must be in it."""
    ids = Embedding(rows=(5, 9000)).inputs({"weight": (10000, 8)}, 16, torch.Generator().manual_seed(0))
    assert {5, 9000} <= set(ids.tolist()) and len(ids) == 18


# -- Poly (no PEFT merge: our merge for one task) ------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("splits", [1, 2], ids=["poly", "mhr_2_splits"])
def test_poly_task(tmp_path, dtype, splits):
    cfg = PolyConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], r=3,
                     n_tasks=3, n_skills=4, n_splits=splits)
    _unchecked_case(tmp_path, tiny_llama(dtype), cfg, options={"task_id": 1})


# -- FourierFT and WaveFT -----------------------------------------------------------------------------------------
@DTYPES
def test_fourierft_llama_with_pattern(tmp_path, dtype):
    cfg = FourierFTConfig(n_frequency=40, scaling=60.0, random_loc_seed=123, target_modules=LLAMA_LINEAR,
                          init_weights=False, n_frequency_pattern={"q_proj": 70})
    _case(tmp_path, tiny_llama(dtype), cfg, dtype)


def test_fourierft_gpt2_conv1d_and_bf16_adapter(tmp_path):
    cfg = FourierFTConfig(n_frequency=60, scaling=40.0, target_modules=["c_attn", "c_fc", "c_proj"],
                          fan_in_fan_out=True, init_weights=False)
    _case(tmp_path / "gpt2", tiny_gpt2(), cfg)
    cfg = FourierFTConfig(n_frequency=50, scaling=30.0, target_modules=["q_proj", "up_proj"], init_weights=False)
    _case(tmp_path / "bf16", tiny_llama(torch.bfloat16), cfg, torch.bfloat16, adapter_dtype=torch.bfloat16)


@DTYPES
def test_waveft_llama_db1(tmp_path, dtype):
    cfg = WaveFTConfig(n_frequency=48, scaling=4.0, random_loc_seed=11, target_modules=LLAMA_LINEAR,
                       init_weights=False, n_frequency_pattern={"v_proj": 20})
    _case(tmp_path, tiny_llama(dtype), cfg, dtype)


@pytest.mark.parametrize("family", ["db2", "sym3", "coif1", "db10"])
def test_waveft_other_families_odd_and_conv1d_shapes(tmp_path, family):
    cfg = WaveFTConfig(n_frequency=30, scaling=3.0, wavelet_family=family, target_modules=["fc"], init_weights=False)
    _case(tmp_path / "fc", conv_net(), cfg, transposable=False)
    cfg = WaveFTConfig(n_frequency=60, scaling=3.0, wavelet_family=family, target_modules=["c_attn", "c_proj"],
                       fan_in_fan_out=True, init_weights=False)
    _case(tmp_path / "gpt2", tiny_gpt2(), cfg)


def test_waveft_without_idwt(tmp_path):
    cfg = WaveFTConfig(n_frequency=40, scaling=2.0, use_idwt=False, proportional_parameters=True,
                       target_modules=["q_proj", "k_proj", "up_proj"], init_weights=False)
    _case(tmp_path, tiny_llama(), cfg)


# -- SHiRA, C3A, SuperTuning, BEFT --------------------------------------------------------------------------------
@DTYPES
def test_shira_llama(tmp_path, dtype):
    _case(tmp_path, tiny_llama(dtype), ShiraConfig(r=2, target_modules=LLAMA_LINEAR), dtype)


@DTYPES
def test_c3a_llama_with_block_size_pattern(tmp_path, dtype):
    cfg = C3AConfig(block_size=8, target_modules=LLAMA_LINEAR, block_size_pattern={"down_proj": 16, "k_proj": 4})
    _case(tmp_path, tiny_llama(dtype), cfg, dtype)


@DTYPES
@pytest.mark.parametrize("saved, r", [(True, 2), (False, None), (False, 2)], ids=["saved-supra", "topk", "topk-supra"])
def test_supertuning(tmp_path, dtype, saved, r):
    cfg = SupertuningConfig(sparsity=0.9, r=r, lora_alpha=3 if r else None, select_top=r is None,
                            save_precomputed_indices=saved, target_modules=LLAMA_LINEAR)
    _unchecked_case(tmp_path, tiny_llama(dtype), cfg)


@DTYPES
def test_beft_bert_biases(tmp_path, dtype):
    cfg = BeftConfig(target_modules=["query", "value", "dense"])
    _case(tmp_path, with_random_biases(tiny_bert(dtype)), cfg, dtype, transposable=False)


# -- the forward paths against PEFT's own layer forward -------------------------------------------------------------
PEFT_FORWARD = {
    "ia3": (tiny_llama, IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "poly": (tiny_llama, PolyConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"], r=3, n_tasks=3,
                                    n_skills=4, n_splits=2)),
    "fourierft": (tiny_gpt2, FourierFTConfig(n_frequency=60, scaling=40.0, target_modules=["c_attn", "c_fc"],
                                             fan_in_fan_out=True, init_weights=False)),
    "waveft": (tiny_gpt2, WaveFTConfig(n_frequency=60, scaling=3.0, wavelet_family="db2",
                                       target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_weights=False)),
    "waveft-no-idwt": (tiny_llama, WaveFTConfig(n_frequency=40, scaling=2.0, use_idwt=False,
                                                target_modules=["q_proj", "down_proj"], init_weights=False)),
    "shira": (tiny_llama, ShiraConfig(r=2, target_modules=["q_proj", "down_proj"])),
    "c3a": (tiny_llama, C3AConfig(block_size=8, target_modules=["q_proj", "down_proj"])),
    "supertuning": (tiny_llama, SupertuningConfig(sparsity=0.9, r=2, lora_alpha=3, target_modules=["q_proj"])),
    "supertuning-topk": (tiny_llama, SupertuningConfig(sparsity=0.9, save_precomputed_indices=False,
                                                       target_modules=["q_proj", "down_proj"])),
}


@pytest.mark.parametrize("method", PEFT_FORWARD)
def test_forward_path_is_peft_forward(tmp_path, method):
    build, cfg = PEFT_FORWARD[method]
    model = build()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    peft = PeftModel.from_pretrained(reload(model, base_dir, torch.float32), adapter_dir).eval()
    modules = dict(peft.base_model.model.named_modules())
    options = {"task_id": 2} if method == "poly" else {}
    patches = load_adapter(adapter_dir, options).method_patches
    assert patches
    for patch in patches:
        module = modules[patch.module]
        base = {role: getattr(module.get_base_layer(), role).detach() for role in ("weight", "bias")
                if getattr(module.get_base_layer(), role, None) is not None}
        shapes = {role: tuple(t.shape) for role, t in base.items()}
        patch.check(shapes)
        layer = patch.layer(shapes)
        x = layer.inputs(shapes, 16, torch.Generator().manual_seed(0))
        kwargs = {"task_ids": torch.full((len(x),), 2)} if method == "poly" else {}
        with torch.no_grad():
            want = module(x[:, None], **kwargs)[:, 0] if method == "poly" else module(x)
            plain = module.get_base_layer()(x)
        got = patch.forward(x, base, layer)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), patch.module
        assert (want - plain).abs().max() > 1e-3 * want.abs().max(), patch.module  # the adapter matters


CUDA_CASES = {
    **PEFT_FORWARD,
    "ln_tuning": (tiny_bert, LNTuningConfig(target_modules=["LayerNorm"])),
    "tokens": (tiny_llama, TrainableTokensConfig(token_indices=[0, 5, 7, 90])),
    "beft": (lambda dtype: with_random_biases(tiny_bert(dtype)),
             BeftConfig(target_modules=["query", "value", "dense"])),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", CUDA_CASES)
def test_cuda_matches_cpu(tmp_path, method):
    build, cfg = CUDA_CASES[method]
    model = build(torch.bfloat16)
    options = {"task_id": 2} if method == "poly" else None
    base = save_base(model, tmp_path / "base")
    adapter = make_adapter(model, cfg, tmp_path / "adapter")
    wsurgery.merge(base, adapter, tmp_path / "merged", progress=False, options=options)
    cpu, gpu = (wsurgery.api.verify(base, adapter, tmp_path / "merged", progress=False, device=device, options=options)
                for device in ("cpu", "cuda"))
    assert cpu.passed and gpu.passed and gpu.device.startswith("cuda")
    for a, b in zip(cpu.checks, gpu.checks):
        assert a.module == b.module and abs(a.max_rel - b.max_rel) < 1e-3
