"""``verify`` for the low-rank family beyond plain LoRA/DoRA: AdaLoRA, LoHa, LoKr, VeRA, PVeRA, RandLoRA,
VB-LoRA, TinyLoRA, UniLoRA, and LoRA's KaSA and ``target_parameters`` (raw parameters, fused experts).

Their forward paths run PEFT's inference computation on activations (LoHa through the face-splitting
form of its Hadamard product, LoKr's Kronecker product through channel reshapes, KaSA's truncation as
PEFT's deferred-truncation correction), sharing no code with the merge. Each case builds the adapter as
the ``test_method_*.py`` / ``test_lora_variants.py`` tests do, checks our merge against PEFT's
(``run_case``), then the ``check_verify`` contract: the correct merge passes, also with all merge code
disabled; a perturbed element, a merge at scale 1.5 and (where a changed weight is square) a transposed
change fail and name the module.
"""

from __future__ import annotations

import pytest
import torch
from oracle import (
    LLAMA_LINEAR,
    check_verify,
    conv_net,
    dtypes_fp32_bf16,
    run_case,
    tiny_gpt2,
    tiny_llama,
)
from peft import (
    AdaLoraConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PveraConfig,
    RandLoraConfig,
    TinyLoraConfig,
    UniLoraConfig,
    VBLoRAConfig,
    VeraConfig,
)
from test_lora_variants import _tiny_gpt_oss, moe_net, proj_net
from test_method_loha_lokr import CONV
from test_method_vector_bank import GPT2_CONV1D, _one_thread  # noqa: F401  (autouse: tiny tensors, busy cores)
from test_method_vera_randlora import GPT2, MIXED, WIDE_OUT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

DTYPES = dtypes_fp32_bf16()
CONV_EFFECTIVE = pytest.mark.parametrize("effective", [False, True], ids=["flat", "cp"])


def _case(tmp_path, model, cfg, dtype=torch.float32, **verify):
    base, adapter, _ = run_case(tmp_path, model, cfg, dtype=dtype, check_unmerge=False)
    check_verify(tmp_path, base, adapter, tmp_path / "merged", **verify)


# -- AdaLoRA ---------------------------------------------------------------------------------------

@DTYPES
def test_adalora_llama(tmp_path, dtype):
    cfg = AdaLoraConfig(init_r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "up_proj"], total_step=10)
    _case(tmp_path, tiny_llama(dtype), cfg, dtype)


def test_adalora_gpt2_conv1d_and_conv2d(tmp_path):
    cfg = AdaLoraConfig(init_r=3, lora_alpha=5, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                        total_step=10)
    _case(tmp_path / "g", tiny_gpt2(), cfg)
    cfg = AdaLoraConfig(init_r=2, lora_alpha=3, target_modules=["c2", "pw"], total_step=10)
    _case(tmp_path / "c", conv_net(), cfg, transposable=False)


def test_adalora_gpt2_with_lm_head_layout_from_the_shapes(tmp_path):
    """PEFT saves the last wrapped layer's fan_in_fan_out (the lm_head's False); c_attn/c_fc are Conv1D."""
    from test_method_hra_road_ia3 import _untied_gpt2

    cfg = AdaLoraConfig(init_r=3, lora_alpha=5, target_modules=["c_attn", "c_fc", "lm_head"], total_step=10)
    _case(tmp_path, _untied_gpt2(), cfg, transposable=False)


# -- LoHa / LoKr -----------------------------------------------------------------------------------

@DTYPES
def test_loha_llama(tmp_path, dtype):
    cfg = LoHaConfig(r=4, alpha=8, target_modules=LLAMA_LINEAR, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    _case(tmp_path, tiny_llama(dtype), cfg, dtype)


@CONV_EFFECTIVE
def test_loha_conv(tmp_path, effective):
    cfg = LoHaConfig(r=3, alpha=5, target_modules=CONV, use_effective_conv2d=effective, rank_pattern={"fc": 2})
    _case(tmp_path, conv_net(), cfg, transposable=False)


@DTYPES
def test_lokr_llama(tmp_path, dtype):
    # r=4: both factors full; q_proj with r=2 decomposes w2
    cfg = LoKrConfig(r=4, alpha=8, target_modules=LLAMA_LINEAR, rank_pattern={"q_proj": 2}, alpha_pattern={"k_proj": 3})
    _case(tmp_path, tiny_llama(dtype), cfg, dtype)


def test_lokr_decompose_both_with_factor(tmp_path):
    cfg = LoKrConfig(r=2, alpha=6, target_modules=LLAMA_LINEAR, decompose_both=True, decompose_factor=8,
                     rank_pattern={"q_proj": 16})
    _case(tmp_path, tiny_llama(), cfg)


@CONV_EFFECTIVE
def test_lokr_conv(tmp_path, effective):
    # flat: c1's full w2 (4, 3, 3) is the Conv1d case where torch.kron pads w1 to (1, a, c)
    patterns = {} if effective else {"c1": 2, "c2": 3}
    cfg = LoKrConfig(r=1, alpha=5, target_modules=CONV, use_effective_conv2d=effective, decompose_both=True,
                     rank_pattern=patterns)
    _case(tmp_path, conv_net(), cfg, transposable=False)


# -- VeRA / PVeRA / RandLoRA -----------------------------------------------------------------------

VERA_FAMILY = pytest.mark.parametrize("cls", [VeraConfig, PveraConfig], ids=["vera", "pvera"])


@VERA_FAMILY
@DTYPES
def test_vera_family_llama_regenerated(tmp_path, cls, dtype):
    # bf16: the regenerated projections are rounded to bf16, as PEFT holds them
    _case(tmp_path, tiny_llama(dtype), cls(r=4, target_modules=MIXED, save_projection=False), dtype)


@VERA_FAMILY
def test_vera_family_saved_wide_out_and_gpt2(tmp_path, cls):
    _case(tmp_path / "l", tiny_llama(torch.bfloat16), cls(r=4, target_modules=WIDE_OUT), torch.bfloat16)
    _case(tmp_path / "g", tiny_gpt2(), cls(r=4, target_modules=GPT2), transposable=False)


@DTYPES
@pytest.mark.parametrize("save", [True, False], ids=["saved", "regenerated"])
def test_randlora_llama(tmp_path, dtype, save):
    # MIXED: down_proj has in > out, so the bases act the other way round there
    _case(tmp_path, tiny_llama(dtype), RandLoraConfig(r=8, randlora_alpha=4, target_modules=MIXED,
                                                       save_projection=save), dtype)


def test_randlora_sparse_and_gpt2(tmp_path):
    cfg = RandLoraConfig(r=5, randlora_alpha=10, target_modules=WIDE_OUT, save_projection=False, sparse=True)
    _case(tmp_path / "s", tiny_llama(), cfg)
    _case(tmp_path / "g", tiny_gpt2(), RandLoraConfig(r=8, randlora_alpha=8, target_modules=GPT2),
          transposable=False)


# -- VB-LoRA / TinyLoRA / UniLoRA ------------------------------------------------------------------

@DTYPES
def test_vblora_llama(tmp_path, dtype):
    cfg = VBLoRAConfig(r=4, num_vectors=30, vector_length=8, topk=2, target_modules=LLAMA_LINEAR)
    _case(tmp_path, tiny_llama(dtype), cfg, dtype)


def test_vblora_gpt2_topk_weights(tmp_path):
    cfg = VBLoRAConfig(r=2, num_vectors=12, vector_length=16, topk=3, save_only_topk_weights=True,
                       target_modules=GPT2_CONV1D)
    _case(tmp_path, tiny_gpt2(), cfg)


@pytest.mark.parametrize("config", [VeraConfig, PveraConfig], ids=["vera", "pvera"])
def test_vera_family_gpt2_with_lm_head_layout_from_the_shapes(tmp_path, config):
    """PEFT saves the last wrapped layer's fan_in_fan_out (the lm_head's False); c_attn/c_fc are Conv1D."""
    from test_method_hra_road_ia3 import _untied_gpt2

    _case(tmp_path, _untied_gpt2(), config(r=4, target_modules=["c_attn", "c_fc", "lm_head"]), transposable=False)


def test_vblora_gpt2_with_lm_head_layout_from_the_shapes(tmp_path):
    """PEFT saves the last wrapped layer's fan_in_fan_out (the lm_head's False); c_attn/c_fc are Conv1D."""
    from test_method_hra_road_ia3 import _untied_gpt2

    cfg = VBLoRAConfig(r=2, num_vectors=8, vector_length=8, target_modules=["c_attn", "c_fc", "lm_head"])
    _case(tmp_path, _untied_gpt2(), cfg, transposable=False)


@DTYPES
def test_tinylora_llama(tmp_path, dtype):
    _case(tmp_path, tiny_llama(dtype), TinyLoraConfig(r=2, u=5, target_modules=LLAMA_LINEAR), dtype)


def test_tinylora_embedding_and_gpt2_conv1d(tmp_path):
    cfg = TinyLoraConfig(r=2, u=3, weight_tying=0.4, target_modules=["wte", "c_attn", "c_proj", "c_fc"])
    _case(tmp_path, tiny_gpt2(), cfg)


@DTYPES
def test_unilora_llama(tmp_path, dtype):
    cfg = UniLoraConfig(r=4, theta_d_length=300, save_indices=True, target_modules=LLAMA_LINEAR)
    _case(tmp_path, tiny_llama(dtype), cfg, dtype)


def test_unilora_gpt2_conv1d(tmp_path):
    cfg = UniLoraConfig(r=3, theta_d_length=200, save_indices=True, target_modules=GPT2_CONV1D)
    _case(tmp_path, tiny_gpt2(), cfg)


def test_unilora_gpt2_with_lm_head_layout_from_the_shapes(tmp_path):
    """PEFT saves the last wrapped layer's fan_in_fan_out (the lm_head's False); c_attn/c_fc are Conv1D."""
    from test_method_hra_road_ia3 import _untied_gpt2

    cfg = UniLoraConfig(r=3, theta_d_length=200, save_indices=True, target_modules=["c_attn", "c_fc", "lm_head"])
    _case(tmp_path, _untied_gpt2(), cfg, transposable=False)


# -- LoRA variants: KaSA, target_parameters ---------------------------------------------------------

@DTYPES
def test_kasa(tmp_path, dtype):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], kasa_config={})
    _case(tmp_path, tiny_llama(dtype), cfg, dtype)


def test_kasa_with_lora_bias(tmp_path):
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "down_proj"], lora_bias=True, kasa_config={})
    _case(tmp_path, proj_net(), cfg, transposable=False)


@DTYPES
def test_target_parameters_both_layouts_nested_and_2d(tmp_path, dtype):
    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=["fc"],
                     target_parameters=["experts.gate_up_proj", "experts.down_proj", "router.weight"],
                     alpha_pattern={"tmoe.experts.gate_up_proj": 3})
    _case(tmp_path, moe_net(dtype), cfg, dtype, transposable=False)


def test_target_parameters_gpt_oss(tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                     target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    _case(tmp_path, _tiny_gpt_oss(), cfg)


# -- LoRA's training-only variants, and Conv1D next to nn.Linear -----------------------------------

@pytest.mark.parametrize("variant", [{"velora_config": {"num_groups": 4, "init_type": "random"}},
                                     {"monteclora_config": {"num_samples": 3}}, {"init_lora_weights": "mica"}],
                         ids=["velora", "monteclora", "mica"])
def test_lora_training_only_variants(tmp_path, variant):
    """At inference PEFT runs these as plain LoRA, and so does the forward path."""
    _case(tmp_path, tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], **variant))


def test_lora_gpt2_with_lm_head_layout_from_the_shapes(tmp_path):
    from test_method_hra_road_ia3 import _untied_gpt2

    _case(tmp_path, _untied_gpt2(), LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc", "lm_head"]),
          transposable=False)
