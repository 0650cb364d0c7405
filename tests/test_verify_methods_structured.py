"""``verify`` for the structured methods: OFT (every storage format), BOFT, HRA, RoAd, MiSS/Bone, GLoRA,
DeLoRA and GraLoRA. Each case builds its adapter as the method's own tests do (same configs, same
randomisation), checks our merge against PEFT's (``run_case``), then holds the forward paths to the
``check_verify`` contract: the correct merge passes, also with every merge code path disabled; a
perturbed element, a merge at the wrong scale and a transposed change fail and name the module.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from peft import (BOFTConfig, DeloraConfig, GloraConfig, GraloraConfig, HRAConfig, MissConfig, OFTConfig,
                  RoadConfig)

import oracle
import wsurgery
from oracle import (LLAMA_LINEAR, check_verify, conv_net, dtypes_fp32_bf16, make_adapter, run_case, save_base,
                    tiny_bert, tiny_gpt2, tiny_llama, with_random_biases)
from test_method_boft import boft_conv_net, peft_boft  # noqa: F401 (peft_boft is a fixture)

DTYPES = dtypes_fp32_bf16()
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These layers are a few hundred elements: on a busy 2-core box, waking torch's intra-op threads for
    each tiny matmul costs several times the work (measured: 1.5 s against 0.2 s per check_verify)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _merged(tmp_path, model, cfg) -> tuple[Path, Path, Path]:
    """Base, adapter and our merge, where the method's own test compares with PEFT by a custom bound
    (bf16 RoAd and GLoRA: PEFT rounds intermediate products) or run_case's change count does not apply."""
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    return base_dir, adapter_dir, tmp_path / "merged"


def _verify_case(tmp_path, model, cfg, dtype=torch.float32, transposable=True, **kwargs) -> None:
    base_dir, adapter_dir, _ = run_case(tmp_path, model, cfg, dtype=dtype, check_unmerge=False, **kwargs)
    check_verify(tmp_path, base_dir, adapter_dir, tmp_path / "merged", transposable=transposable)


def _verify_fixture(tmp_path, folder: Path) -> None:
    """An adapter written by an old PEFT release: our merge of it, verified."""
    wsurgery.merge(folder / "base", folder / "adapter", tmp_path / "merged", progress=False)
    check_verify(tmp_path, folder / "base", folder / "adapter", tmp_path / "merged", transposable=False)


# -- OFT ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def oft_values(monkeypatch):
    # As test_method_oft: N(0, 0.08) keeps every Cayley-Neumann block near a rotation.
    monkeypatch.setattr(oracle, "randomize_adapter", functools.partial(oracle.randomize_adapter, std=0.08))


@DTYPES
def test_oft_llama_linear(tmp_path, oft_values, dtype):
    cfg = OFTConfig(oft_block_size=8, r=0, target_modules=LLAMA_LINEAR)
    _verify_case(tmp_path, tiny_llama(dtype), cfg, dtype)


@DTYPES
def test_oft_conv2d_linear_embedding(tmp_path, oft_values, dtype):
    # c2: 3x3 Conv2d (unfolded patches rotated), pw: 1x1 Conv2d, fc: Linear, emb: Embedding (output rotated).
    cfg = OFTConfig(oft_block_size=4, r=0, target_modules=["c2", "pw", "fc", "emb"])
    _verify_case(tmp_path, conv_net(dtype), cfg, dtype, transposable=False)


def test_oft_exact_cayley_block_share_embedding(tmp_path, oft_values):
    cfg = OFTConfig(oft_block_size=16, r=0, use_cayley_neumann=False, block_share=True,
                    target_modules=["embed_tokens", "lm_head", "o_proj"])
    _verify_case(tmp_path, tiny_llama(), cfg)


@pytest.mark.parametrize("case", sorted(str(p.relative_to(FIXTURES / "old-oft"))
                                        for p in (FIXTURES / "old-oft").glob("peft-*/*/") if (p / "adapter").is_dir()))
def test_oft_old_formats(tmp_path, case):
    # peft <= 0.13 (output side, cut last block), 0.14-0.15 (oft_r + oft_s), 0.16-0.17 (legacy series).
    _verify_fixture(tmp_path, FIXTURES / "old-oft" / case)


# -- BOFT --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factors,dtype", [(2, torch.float32), (1, torch.bfloat16)], ids=["N2-fp32", "N1-bf16"])
def test_boft_llama_linear(tmp_path, peft_boft, factors, dtype):  # noqa: F811
    peft_boft(factors)
    cfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=factors, target_modules=["q_proj", "v_proj", "up_proj",
                                                                                          "down_proj"])
    _verify_case(tmp_path, tiny_llama(dtype), cfg, dtype)


@DTYPES
def test_boft_conv2d_two_factors(tmp_path, peft_boft, dtype):  # noqa: F811
    peft_boft(2)
    cfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["conv", "pw", "fc"])
    _verify_case(tmp_path, boft_conv_net(dtype), cfg, dtype, transposable=False)


def test_boft_trained_biases_replace_the_base(tmp_path, peft_boft):  # noqa: F811
    # bias="boft_only": the saved biases replace the base's; boft_s scales the outputs, not the bias.
    peft_boft(2)
    cfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["conv", "fc"], bias="boft_only")
    _verify_case(tmp_path, boft_conv_net(), cfg, transposable=False, adapter_dtype=torch.bfloat16)


# -- HRA ---------------------------------------------------------------------------------------------------------

@DTYPES
def test_hra_llama(tmp_path, dtype):
    _verify_case(tmp_path, tiny_llama(dtype), HRAConfig(r=4, init_weights=False, target_modules=LLAMA_LINEAR), dtype)


@pytest.mark.parametrize("gs", [False, True], ids=["reflections", "gram_schmidt"])
def test_hra_conv2d_and_linear(tmp_path, gs):
    cfg = HRAConfig(r=5, apply_GS=gs, init_weights=False, target_modules=["c2", "pw", "fc"])
    _verify_case(tmp_path, conv_net(), cfg, transposable=False)


# -- RoAd --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_road_bert_with_biases(tmp_path, variant):
    cfg = RoadConfig(variant=variant, group_size=8, target_modules=["query", "value", "intermediate.dense"])
    _verify_case(tmp_path, with_random_biases(tiny_bert()), cfg)


def test_road_bf16(tmp_path):
    cfg = RoadConfig(variant="road_4", group_size=16, target_modules=["query", "value"])
    base_dir, adapter_dir, merged = _merged(tmp_path, with_random_biases(tiny_bert(torch.bfloat16)), cfg)
    check_verify(tmp_path, base_dir, adapter_dir, merged)


# -- MiSS and the old Bone ---------------------------------------------------------------------------------------

@DTYPES
def test_miss_default_partial_block(tmp_path, dtype):
    # r=5 leaves 2 (in 32) and 3 (in 48) input columns over: PEFT's forward zero-pads them.
    _verify_case(tmp_path, tiny_llama(dtype), MissConfig(r=5, target_modules=LLAMA_LINEAR), dtype)


def test_miss_mini(tmp_path):
    cfg = MissConfig(r=5, mini_r=8, init_weights="mini", target_modules=LLAMA_LINEAR)
    _verify_case(tmp_path, tiny_llama(), cfg)


@DTYPES
def test_miss_bat(tmp_path, dtype):
    cfg = MissConfig(r=8, init_weights="bat", target_modules=LLAMA_LINEAR)
    _verify_case(tmp_path, tiny_llama(dtype), cfg, dtype)


@pytest.mark.parametrize("case", sorted(str(p.relative_to(FIXTURES / "old-bone"))
                                        for p in (FIXTURES / "old-bone").glob("peft-*/*/") if (p / "adapter").is_dir()))
def test_bone_old_format(tmp_path, case):
    _verify_fixture(tmp_path, FIXTURES / "old-bone" / case)


# -- GLoRA -------------------------------------------------------------------------------------------------------

def test_glora_llama_without_biases(tmp_path):
    _verify_case(tmp_path, tiny_llama(), GloraConfig(r=3, target_modules=LLAMA_LINEAR))


@pytest.mark.parametrize("paths", [("lora", "lora", "constant"), ("vector", "vector", "vector"),
                                   ("constant", "none", "constant")], ids=lambda p: "-".join(p))
def test_glora_bert_with_biases(tmp_path, paths):
    ab, c, de = paths
    cfg = GloraConfig(r=3, config_A_B=ab, config_C=c, config_D_E=de, target_modules=["query", "value", "dense"])
    _verify_case(tmp_path, with_random_biases(tiny_bert()), cfg)


@pytest.mark.parametrize("paths", [("none", "lora", "none"), ("none", "none", "vector")], ids=lambda p: "-".join(p))
def test_glora_bias_only(tmp_path, paths):
    # W unchanged: only the bias moves (by W·C, read from W; or by D/E alone, where W is not even read).
    ab, c, de = paths
    cfg = GloraConfig(r=3, config_A_B=ab, config_C=c, config_D_E=de, target_modules=["query", "value"])
    base_dir, adapter_dir, merged = _merged(tmp_path, with_random_biases(tiny_bert()), cfg)
    check_verify(tmp_path, base_dir, adapter_dir, merged, transposable=False)


def test_glora_bf16(tmp_path):
    cfg = GloraConfig(r=3, config_A_B="lora", config_C="lora", config_D_E="vector",
                      target_modules=["query", "value", "dense"])
    base_dir, adapter_dir, merged = _merged(tmp_path, with_random_biases(tiny_bert(torch.bfloat16)), cfg)
    check_verify(tmp_path, base_dir, adapter_dir, merged)


# -- DeLoRA and GraLoRA ------------------------------------------------------------------------------------------

@DTYPES
def test_delora_llama(tmp_path, dtype):
    cfg = DeloraConfig(r=4, delora_lambda=5, rank_pattern={"down_proj": 2}, lambda_pattern={"q_proj": 3},
                       target_modules=LLAMA_LINEAR)
    _verify_case(tmp_path, tiny_llama(dtype), cfg, dtype)


@DTYPES
def test_gralora_llama_hybrid(tmp_path, dtype):
    cfg = GraloraConfig(r=8, gralora_k=4, hybrid_r=3, alpha=16, target_modules=LLAMA_LINEAR)
    _verify_case(tmp_path, tiny_llama(dtype), cfg, dtype)


def test_gralora_gpt2_conv1d(tmp_path):
    cfg = GraloraConfig(r=4, gralora_k=2, hybrid_r=2, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    _verify_case(tmp_path, tiny_gpt2(), cfg, transposable=False)


def test_gralora_gpt2_with_lm_head_layout_from_the_shapes(tmp_path):
    """PEFT saves the last wrapped layer's fan_in_fan_out (the lm_head's False); c_attn/c_fc are Conv1D."""
    from test_method_hra_road_ia3 import _untied_gpt2

    cfg = GraloraConfig(r=4, gralora_k=2, target_modules=["c_attn", "c_fc", "lm_head"])
    _verify_case(tmp_path, _untied_gpt2(), cfg, transposable=False)
