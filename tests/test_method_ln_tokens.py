"""LN tuning and trainable tokens against PEFT's ``merge_and_unload()``; both refuse to unmerge.

Both methods replace base values outright: LN tuning swaps in the trained copy of each targeted module
(weight, and bias for LayerNorm), trainable tokens overwrite a few embedding rows. ``randomize_adapter``
moves every saved value away from the base, so a merge that forgot a tensor or a row fails.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LNTuningConfig, LoraConfig, TrainableTokensConfig
from safetensors.torch import load_file, save_file

import wsurgery
from oracle import (
    assert_close_to,
    dtypes_fp32_bf16,
    load_all,
    make_adapter,
    oracle_merge,
    reload,
    run_case,
    save_base,
    tiny_bert,
    tiny_llama,
)
from wsurgery.errors import InputError, NotInvertibleError, UnsupportedError
from wsurgery.methods.trainable_tokens import token_indices_for

DTYPES = dtypes_fp32_bf16()
TOKENS = [0, 5, 7, 90]  # first and near-last rows included


def _adapter_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    return load_file(adapter_dir / "adapter_model.safetensors")


def _assert_unmerge_refused(tmp_path, adapter_dir, match: str) -> None:
    out = tmp_path / "unmerged"
    with pytest.raises(NotInvertibleError, match=match):
        wsurgery.unmerge(tmp_path / "merged", adapter_dir, out, progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or "unmerged" in p.name]


# -- LN tuning -----------------------------------------------------------------------------------------------

@DTYPES
def test_ln_tuning_llama_rmsnorm(tmp_path, dtype):
    cfg = LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm", "norm"])
    base_dir, adapter_dir, merged = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype, check_unmerge=False)
    saved = _adapter_tensors(adapter_dir)
    norms = [n for n in merged if n.endswith("norm.weight")]
    assert len(norms) == 5
    for n in norms:  # the saved copy itself, not a blend
        key = "base_model.model." + n.replace(".weight", ".ln_tuning_layers.weight")
        assert torch.equal(merged[n], saved[key].to(dtype))
    _assert_unmerge_refused(tmp_path, adapter_dir, "LN tuning replaces .*does not save the original")


@DTYPES
def test_ln_tuning_bert_layernorm_with_bias(tmp_path, dtype):
    cfg = LNTuningConfig(target_modules=["LayerNorm"])
    _, adapter_dir, merged = run_case(tmp_path, tiny_bert(dtype), cfg, dtype=dtype, check_unmerge=False)
    saved = _adapter_tensors(adapter_dir)
    assert sum(k.endswith("ln_tuning_layers.bias") for k in saved) == 5
    assert torch.equal(merged["embeddings.LayerNorm.bias"],
                       saved["base_model.model.embeddings.LayerNorm.ln_tuning_layers.bias"].to(dtype))
    _assert_unmerge_refused(tmp_path, adapter_dir, "LN tuning replaces")


def test_ln_tuning_shape_mismatch_is_refused_before_writing(tmp_path):
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, LNTuningConfig(target_modules=["norm"]), tmp_path / "adapter")
    tensors = _adapter_tensors(adapter_dir)
    key = "base_model.model.model.norm.ln_tuning_layers.weight"
    tensors[key] = torch.ones(31)
    save_file(tensors, adapter_dir / "adapter_model.safetensors")
    with pytest.raises(InputError, match=r"ln_tuning_layers.weight.*\[31\].*model.norm.weight has \[32\]"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


# -- trainable tokens ----------------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_trainable_tokens_llama(tmp_path, dtype, tie):
    cfg = TrainableTokensConfig(token_indices=TOKENS)
    base_dir, adapter_dir, merged = run_case(tmp_path, tiny_llama(dtype, tie=tie), cfg, dtype=dtype,
                                             check_unmerge=False)
    base = load_all(base_dir)
    emb = "model.embed_tokens.weight"
    changed_rows = (merged[emb] != base[emb]).any(dim=1).nonzero().flatten().tolist()
    assert changed_rows == TOKENS
    if tie:
        # PEFT saves the tied head's copy too; the tied base stores no head, and none is added.
        assert "base_model.model.lm_head.trainable_tokens_delta" in _adapter_tensors(adapter_dir)
        assert "lm_head.weight" not in merged
        assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    else:
        assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])
    _assert_unmerge_refused(tmp_path, adapter_dir, r"overwrite rows \[0, 5, 7, 90\] of model.embed_tokens.weight")


def test_trainable_tokens_on_embedding_and_untied_head(tmp_path):
    cfg = TrainableTokensConfig(token_indices=[1, 2, 95], target_modules=["embed_tokens", "lm_head"])
    _, _, merged = run_case(tmp_path, tiny_llama(), cfg, check_unmerge=False)
    base = load_all(tmp_path / "base")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert (merged[name] != base[name]).any(dim=1).nonzero().flatten().tolist() == [1, 2, 95]


def test_trainable_tokens_scale_moves_only_the_rows(tmp_path):
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, TrainableTokensConfig(token_indices=TOKENS), tmp_path / "adapter")
    expected = oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)
    base = load_all(base_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "half", scale=0.5, progress=False)
    half = {n: base[n] + 0.5 * (expected[n] - base[n]) for n in base}
    assert_close_to(load_all(tmp_path / "half"), half)


def test_tied_model_whose_checkpoint_stores_the_head(tmp_path):
    """A tied model whose checkpoint stores ``lm_head.weight`` too: PEFT changes the head's rows as well,
    through the tied copy it saves under ``lm_head``; here that copy applies to the stored head."""
    model = tiny_llama(tie=True)
    base_dir = save_base(model, tmp_path / "base")
    weights = load_file(base_dir / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, base_dir / "model.safetensors", metadata={"format": "pt"})
    adapter_dir = make_adapter(model, TrainableTokensConfig(token_indices=TOKENS), tmp_path / "adapter")
    expected = oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)
    assert not torch.equal(expected["lm_head.weight"], weights["lm_head.weight"])
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert_close_to(load_all(tmp_path / "merged"), expected)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_lora_with_trainable_token_indices(tmp_path, tie):
    """LoRA's ``trainable_token_indices`` (a dict of layer -> rows) saves ``token_adapter`` tensors inside
    the LoRA adapter; they merge with the LoRA, as PEFT does."""
    option = {"embed_tokens": [1, 4, 9]} if tie else {"embed_tokens": [1, 4, 9], "lm_head": [2, 3]}
    cfg = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=option)
    _, _, merged = run_case(tmp_path, tiny_llama(tie=tie), cfg, check_unmerge=False)
    base = load_all(tmp_path / "base")
    emb = "model.embed_tokens.weight"
    assert (merged[emb] != base[emb]).any(dim=1).nonzero().flatten().tolist() == [1, 4, 9]
    assert token_indices_for([7, 8], "model.embed_tokens") == [7, 8]
    with pytest.raises(InputError, match="names no layer"):
        token_indices_for(option, "model.layers.0.mlp.up_proj")
    with pytest.raises(InputError, match="several"):
        token_indices_for({"tokens": [1], "embed_tokens": [2]}, "model.embed_tokens")


def test_lora_on_a_tied_head_that_the_checkpoint_does_not_store_is_refused(tmp_path):
    """PEFT would fold the head's LoRA into the shared embedding (changing the input side too)."""
    model = tiny_llama(tie=True)
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]), tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match="ties to model.embed_tokens"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def _tokens_adapter(tmp_path, indices=TOKENS):
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, TrainableTokensConfig(token_indices=indices), tmp_path / "adapter")
    return base_dir, adapter_dir


def _edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("indices,match", [
    ([0, 5, 7], "holds 4 rows but the config lists 3"),
    ([0, 5, 7, 96], "sets token 96 but model.embed_tokens.weight has only 96 rows"),
    ([0, -5, 7, 9], "negative token index -5"),
    ([0, 5, 5, 9], "token 5 is listed twice with different values"),
])
def test_trainable_tokens_bad_indices_refused_before_writing(tmp_path, indices, match):
    base_dir, adapter_dir = _tokens_adapter(tmp_path)
    _edit_config(adapter_dir, token_indices=indices)
    with pytest.raises(InputError, match=match):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_trainable_tokens_width_mismatch(tmp_path):
    base_dir, adapter_dir = _tokens_adapter(tmp_path)
    tensors = _adapter_tensors(adapter_dir)
    tensors["base_model.model.model.embed_tokens.trainable_tokens_delta"] = torch.zeros(4, 16)
    save_file(tensors, adapter_dir / "adapter_model.safetensors")
    with pytest.raises(InputError, match=r"rows of width 16 .*shape \[96, 32\]"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


class _ConvBatchNorm(torch.nn.Module):
    """A conv layer and a BatchNorm2d, whose num_batches_tracked is an int64 buffer."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("kind", ["ln-tuning", "modules-to-save"])
def test_a_batchnorms_integer_buffer_is_replaced_as_peft_does(tmp_path, kind):
    """A whole-tensor replacement of an integer buffer (num_batches_tracked) is a copy, not an encoding."""
    torch.manual_seed(0)
    model = _ConvBatchNorm()
    model.bn.num_batches_tracked.fill_(3)
    cfg = (LNTuningConfig(target_modules=["bn"]) if kind == "ln-tuning"
           else LoraConfig(r=2, target_modules=["fc"], modules_to_save=["bn"]))
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    expected = oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    assert_close_to(merged, expected, base=load_all(base_dir))
    assert merged["bn.num_batches_tracked"].dtype == torch.int64
    if kind == "modules-to-save":  # a count cannot be interpolated: refused, not rounded
        with pytest.raises(UnsupportedError, match="integer tensor"):
            wsurgery.merge(base_dir, adapter_dir, tmp_path / "half", scale=0.5, progress=False)
