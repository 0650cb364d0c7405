"""C3A, SHiRA, GraLoRA, SuperTuning, DeLoRA and BEFT against PEFT 0.21.2's ``merge_and_unload()``.

Every trainable adapter parameter is random and non-zero (``randomize_adapter`` adds noise to PEFT's
zero/identity inits); DeLoRA's ``delora_w_norm`` and SuperTuning's ``supertuning_indices`` are the
buffers PEFT computed from the base. BEFT runs on BERT with random non-zero biases (BERT initialises
them to 0, which would hide a wrong bias merge).
"""

from __future__ import annotations


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
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    with_random_biases,
)
from peft import BeftConfig, C3AConfig, DeloraConfig, GraloraConfig, ShiraConfig, SupertuningConfig
from safetensors.torch import load_file

import wsurgery
from wsurgery.errors import InputError, NotInvertibleError, UnsupportedError

DTYPES = dtypes_fp32_bf16()


def _adapter_tensors(adapter_dir, suffix):
    return {k: v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if k.endswith(suffix)}




def _oracle_case(tmp_path, model, config, *, dtype=torch.float32, edit=None):
    """run_case's merge half, with an optional edit of the saved adapter before PEFT or we read it."""
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, config, tmp_path / "adapter")
    if edit is not None:
        edit_adapter_tensors(adapter_dir, edit)
    expected = oracle_merge(reload(model, base_dir, dtype), adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged, base = load_all(tmp_path / "merged"), load_all(base_dir)
    assert_close_to(merged, expected, base=base)
    assert any(not torch.equal(merged[n], base[n]) for n in merged), "the merge changed nothing"
    return base_dir, adapter_dir, base, merged, expected


def _roundtrip(tmp_path, base_dir, adapter_dir, base, merged):
    wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    assert_close_to(load_all(tmp_path / "unmerged"), base, base=merged, ulps=2)


# -- C3A ---------------------------------------------------------------------------------------------------------
@DTYPES
def test_c3a_llama_with_block_size_pattern(tmp_path, dtype):
    cfg = C3AConfig(block_size=8, target_modules=LLAMA_LINEAR, block_size_pattern={"down_proj": 16, "k_proj": 4})
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    kernels = _adapter_tensors(adapter_dir, "c3a_kernel")
    assert {k.split(".")[-2]: v.shape[-1] for k, v in kernels.items()} == {
        "q_proj": 8, "k_proj": 4, "v_proj": 8, "o_proj": 8, "gate_proj": 8, "up_proj": 8, "down_proj": 16}


def test_c3a_refuses_a_kernel_that_does_not_fit(tmp_path):
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    adapter_dir = make_adapter(tiny_llama(), C3AConfig(block_size=8, target_modules=["q_proj"]), tmp_path / "adapter")
    edit_adapter_tensors(adapter_dir,
                         lambda t: t.update({k: v[:, :3].contiguous() for k, v in t.items() if "layers.1." in k}))
    with pytest.raises(InputError, match=r"layers\.1\.self_attn\.q_proj: c3a_kernel is \[4, 3, 8\]"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


# -- SHiRA -------------------------------------------------------------------------------------------------------
@DTYPES
def test_shira_llama(tmp_path, dtype):
    run_case(tmp_path, tiny_llama(dtype), ShiraConfig(r=2, target_modules=LLAMA_LINEAR), dtype=dtype)


def test_shira_windows_float_indices_and_repeated_positions(tmp_path):
    """Indices saved as float32 (PEFT on Windows) and a position listed twice (sparse COO adds both)."""

    def edit(t):
        for k in [k for k in t if k.endswith("shira_indices")]:
            idx = t[k].clone()
            idx[:, 1] = idx[:, 0]
            t[k] = idx.to(torch.float32)

    base_dir, adapter_dir, base, merged, _ = _oracle_case(
        tmp_path, tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj", "down_proj"]), edit=edit)
    _roundtrip(tmp_path, base_dir, adapter_dir, base, merged)


def test_shira_refuses_indices_outside_the_weight(tmp_path):
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    adapter_dir = make_adapter(tiny_llama(), ShiraConfig(r=2, target_modules=["k_proj"]), tmp_path / "adapter")

    def edit(t):
        for k in [k for k in t if k.endswith("shira_indices")]:
            t[k] = t[k].clone()
            t[k][0, 0] = 16  # k_proj has 16 output rows
    edit_adapter_tensors(adapter_dir, edit)
    with pytest.raises(InputError, match=r"shira_indices reach row 16.*outside the base weight \[16, 32\]"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


# -- GraLoRA -----------------------------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("r,k,hybrid", [(4, 2, 0), (8, 4, 3)], ids=["k2", "k4-hybrid"])
def test_gralora_llama(tmp_path, dtype, r, k, hybrid):
    cfg = GraloraConfig(r=r, gralora_k=k, hybrid_r=hybrid, alpha=16, target_modules=LLAMA_LINEAR)
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    assert bool(_adapter_tensors(adapter_dir, "gralora_A_general.weight")) == (hybrid > 0)


def test_gralora_gpt2_conv1d(tmp_path):
    cfg = GraloraConfig(r=4, gralora_k=2, hybrid_r=2, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    run_case(tmp_path, tiny_gpt2(), cfg)


def test_gralora_refuses_a_config_that_disagrees_with_the_tensors(tmp_path):
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    adapter_dir = make_adapter(tiny_llama(), GraloraConfig(r=4, gralora_k=2, target_modules=["q_proj"]),
                               tmp_path / "adapter")
    edit_adapter_config(adapter_dir, gralora_k=4)
    with pytest.raises(InputError, match="gralora_k=4"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


# -- SuperTuning -------------------------------------------------------------------------------------------------
def _supertuning_change_magnitude(base, adapter_dir, config):
    """|S| + |L| per changed weight: the sizes of the two terms PEFT adds to W one after the other."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key, values in tensors.items():
        if not key.endswith("supertuning_values"):
            continue
        prefix = key[: -len("supertuning_values")]
        W = base[prefix.removeprefix("base_model.model.") + "weight"]
        if config.save_precomputed_indices:
            idx = tensors[prefix + "supertuning_indices"].long()
        else:
            idx = torch.topk(W.abs().flatten(), values.numel(), largest=config.select_top).indices
        mag = torch.zeros(W.numel(), dtype=torch.float64).index_add_(0, idx, values.double().abs()).view(W.shape)
        if config.r is not None:
            A, B = (tensors[prefix + f"supertuning_lora_{x}.weight"].double() for x in "AB")
            L = B @ A
            mag += (L * config.lora_alpha / config.r).abs()
        out[prefix.removeprefix("base_model.model.") + "weight"] = mag
    return out


def _supertuning_case(tmp_path, config, dtype):
    """Our merge against PEFT's. In bf16 PEFT rounds three times (values to bf16, W + S, then + L in bf16), so its
    result is within one ulp at |W| + |S| + |L| of the exact one, not at |W| + |W'|; the test checks that bound
    against PEFT in bf16, and 1 ulp against PEFT's float32 merge of the same (upcast) base rounded once."""
    model = tiny_llama(dtype)
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, config, tmp_path / "adapter")
    result = wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged, base = load_all(tmp_path / "merged"), load_all(base_dir)
    expected = oracle_merge(reload(model, base_dir, dtype), adapter_dir)
    if dtype == torch.float32:
        assert_close_to(merged, expected)
    else:
        mag = _supertuning_change_magnitude(base, adapter_dir, config)
        operands = {n: base[n].double().abs() + mag.get(n, 0) for n in base}
        assert_close_to(merged, expected, base=operands)
        exact = oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)
        assert_close_to(merged, {n: v.to(dtype) for n, v in exact.items()}, base=base)
    assert any(not torch.equal(merged[n], base[n]) for n in merged), "the merge changed nothing"
    return base_dir, adapter_dir, base, merged, result.notes


@DTYPES
def test_supertuning_saved_indices_with_lora_part(tmp_path, dtype):
    cfg = SupertuningConfig(sparsity=0.9, r=2, lora_alpha=3, target_modules=LLAMA_LINEAR)
    base_dir, adapter_dir, base, merged, _ = _supertuning_case(tmp_path, cfg, dtype)
    assert _adapter_tensors(adapter_dir, "supertuning_indices")
    _roundtrip(tmp_path, base_dir, adapter_dir, base, merged)


def test_supertuning_saved_indices_smallest_magnitudes_with_scale(tmp_path):
    cfg = SupertuningConfig(sparsity=0.8, select_top=False, target_modules=["q_proj", "up_proj"])
    base_dir, adapter_dir, base, merged, expected = _oracle_case(tmp_path, tiny_llama(), cfg)
    _roundtrip(tmp_path, base_dir, adapter_dir, base, merged)
    # --scale 0.5: half of PEFT's change, and back.
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "half", scale=0.5, progress=False)
    half = load_all(tmp_path / "half")
    assert_close_to(half, {n: base[n] + 0.5 * (expected[n] - base[n]) for n in half})
    wsurgery.unmerge(tmp_path / "half", adapter_dir, tmp_path / "half_back", scale=0.5, progress=False)
    assert_close_to(load_all(tmp_path / "half_back"), base)


@DTYPES
@pytest.mark.parametrize("r", [None, 2], ids=["super", "supra"])
def test_supertuning_recomputed_indices(tmp_path, dtype, r):
    """save_precomputed_indices=False: the indices are topk(|W|) of the base, as PEFT recomputes them at load."""
    cfg = SupertuningConfig(sparsity=0.9, r=r, select_top=r is None, save_precomputed_indices=False,
                            target_modules=LLAMA_LINEAR)
    _, adapter_dir, _, _, notes = _supertuning_case(tmp_path, cfg, dtype)
    assert not _adapter_tensors(adapter_dir, "supertuning_indices")
    if dtype == torch.bfloat16:  # bf16 magnitudes tie often: the user is told that topk's tie order decided
        assert notes and all("tie" in n for n in notes)
    with pytest.raises(NotInvertibleError, match="save_precomputed_indices"):
        wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)


def test_supertuning_refuses_saved_indices_the_config_says_are_not_saved(tmp_path):
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    adapter_dir = make_adapter(tiny_llama(), SupertuningConfig(sparsity=0.9, target_modules=["q_proj"]),
                               tmp_path / "adapter")
    edit_adapter_config(adapter_dir, save_precomputed_indices=False)
    with pytest.raises(UnsupportedError, match="save_precomputed_indices=false"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


def test_supertuning_recomputed_indices_refuse_a_wrong_sparsity(tmp_path):
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    cfg = SupertuningConfig(sparsity=0.9, save_precomputed_indices=False, target_modules=["q_proj"])
    adapter_dir = make_adapter(tiny_llama(), cfg, tmp_path / "adapter")
    edit_adapter_config(adapter_dir, sparsity=0.8)
    with pytest.raises(InputError, match=r"supertuning_values has 102 entries but sparsity=0.8 .* selects 204"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


# -- DeLoRA ------------------------------------------------------------------------------------------------------
@DTYPES
def test_delora_llama_with_rank_and_lambda_patterns(tmp_path, dtype):
    cfg = DeloraConfig(r=4, delora_lambda=5, rank_pattern={"down_proj": 2}, lambda_pattern={"q_proj": 3},
                       target_modules=LLAMA_LINEAR)
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    norms = _adapter_tensors(adapter_dir, "delora_w_norm")
    assert all(bool((v > 0).all()) for v in norms.values())
    assert _adapter_tensors(adapter_dir, "mlp.down_proj.delora_A").popitem()[1].shape[0] == 2


def test_delora_requires_the_saved_weight_norm(tmp_path):
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    adapter_dir = make_adapter(tiny_llama(), DeloraConfig(r=4, target_modules=["q_proj"]), tmp_path / "adapter")
    edit_adapter_tensors(adapter_dir, lambda t: [t.pop(k) for k in [k for k in t if k.endswith("delora_w_norm")]])
    with pytest.raises(InputError, match="delora_w_norm"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


# -- BEFT --------------------------------------------------------------------------------------------------------
@DTYPES
def test_beft_bert_biases(tmp_path, dtype):
    model = with_random_biases(tiny_bert(dtype))
    cfg = BeftConfig(target_modules=["query", "value", "dense"])
    _, _, merged = run_case(tmp_path, model, cfg, dtype=dtype)
    base = load_all(tmp_path / "base")
    changed = {n for n in merged if not torch.equal(merged[n], base[n])}
    assert changed and all(n.endswith(".bias") for n in changed)


def test_beft_refuses_a_layer_without_bias_as_peft_does(tmp_path):
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, BeftConfig(target_modules=["v_proj"]), tmp_path / "adapter")
    with pytest.raises(ValueError, match="no bias"):
        oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)
    with pytest.raises(InputError, match=r"changes model\.layers\.0\.self_attn\.v_proj\.bias, but .* has no such "
                                         r"tensor \(it has weight\)"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
