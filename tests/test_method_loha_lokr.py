"""LoHa and LoKr against PEFT's ``merge_and_unload()``: Linear (fp32 and bf16 bases, rank/alpha
patterns), Conv1d/Conv2d 3x3/Conv2d 1x1 in the flat and the CP (use_effective_conv2d) forms, LoKr's
full/decomposed factor layouts (decompose_both, decompose_factor, both factors full so that r comes
only from the config), the unmerge round trip, and refusals of adapters that do not fit their
config or base.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import wsurgery
from oracle import (
    LLAMA_LINEAR,
    assert_close_to,
    conv_net,
    load_all,
    make_adapter,
    randomize_adapter,
    run_case,
    save_base,
    tiny_llama,
)
from wsurgery.errors import InputError

CONV = ["c1", "c2", "pw", "fc"]  # Conv1d k=3, Conv2d 3x3, Conv2d 1x1, Linear
PREFIX = "base_model.model."


def shapes(adapter_dir) -> dict[str, list[int]]:
    return {k[len(PREFIX):]: list(v.shape) for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}


def layout(adapter_dir, module: str) -> dict[str, list[int]]:
    return {k[len(module) + 1:]: s for k, s in shapes(adapter_dir).items() if k.startswith(module + ".")}


# -- LoHa ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loha_linear_with_rank_and_alpha_patterns(tmp_path, dtype):
    cfg = LoHaConfig(r=4, alpha=8, target_modules=LLAMA_LINEAR,
                     rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                     alpha_pattern={"v_proj": 3, r"model\.layers\.0\.self_attn\.o_proj": 16})
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    s = shapes(adapter_dir)
    assert s["model.layers.0.self_attn.q_proj.hada_w1_a"] == [32, 2]
    assert s["model.layers.1.mlp.down_proj.hada_w2_b"] == [6, 48]
    assert s["model.layers.0.mlp.down_proj.hada_w2_b"] == [4, 48]


def test_loha_bf16_adapter_on_fp32_base(tmp_path):
    cfg = LoHaConfig(r=3, alpha=5, target_modules=["q_proj", "down_proj"])
    run_case(tmp_path, tiny_llama(), cfg, adapter_dtype=torch.bfloat16)


@pytest.mark.parametrize("effective", [False, True], ids=["flat", "cp"])
def test_loha_conv(tmp_path, effective):
    cfg = LoHaConfig(r=3, alpha=5, target_modules=CONV, use_effective_conv2d=effective,
                     rank_pattern={"fc": 2}, alpha_pattern={"c2": 7})
    _, adapter_dir, _ = run_case(tmp_path, conv_net(), cfg)
    if effective:  # CP form on the k>1 kernels only (PEFT keeps 1x1 and Linear flat)
        assert layout(adapter_dir, "c2")["hada_t1"] == [3, 3, 3, 3]
        assert layout(adapter_dir, "c1")["hada_t2"] == [3, 3, 3, 1]  # Conv1d: (r, r, k, 1)
        assert layout(adapter_dir, "c1")["hada_w1_a"] == [3, 8]
    else:
        assert layout(adapter_dir, "c2")["hada_w1_b"] == [3, 36]  # in·kh·kw
    assert "hada_t1" not in layout(adapter_dir, "pw")
    assert layout(adapter_dir, "fc")["hada_w1_a"] == [7, 2]


def test_loha_legacy_cp_form_on_1x1_conv(tmp_path):
    """Older PEFT saved the CP form on 1x1 kernels too; PEFT 0.21.2 still merges it with the CP formula
    when the layer holds hada_t1/t2 (it only refuses to *load* such a file), so it is the oracle here."""
    torch.manual_seed(3)
    base = conv_net()
    base_dir = save_base(base, tmp_path / "base")
    model = get_peft_model(copy.deepcopy(base), LoHaConfig(r=2, alpha=3, target_modules=["pw"],
                                                           use_effective_conv2d=True))
    layer = model.base_model.model.pw
    for name, shape in [("hada_t1", (2, 2, 1, 1)), ("hada_t2", (2, 2, 1, 1)), ("hada_w1_a", (2, 6)),
                        ("hada_w1_b", (2, 10)), ("hada_w2_a", (2, 6)), ("hada_w2_b", (2, 10))]:
        getattr(layer, name)["default"] = nn.Parameter(torch.zeros(shape))
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "adapter")
    assert layout(tmp_path / "adapter", "pw")["hada_t1"] == [2, 2, 1, 1]
    expected = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    result = wsurgery.merge(base_dir, tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    assert not torch.equal(merged["pw.weight"], base.pw.weight)
    assert_close_to(merged, expected)
    assert any("older PEFT" in n for n in result.notes), result.notes
    wsurgery.unmerge(tmp_path / "merged", tmp_path / "adapter", tmp_path / "unmerged", progress=False)
    assert_close_to(load_all(tmp_path / "unmerged"), load_all(base_dir), base=merged, ulps=2)


# -- LoKr ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lokr_linear_default(tmp_path, dtype):
    # r=4 keeps both factors full everywhere (r >= max(b, d)/2), so the scaling alpha/r has r from the
    # config only; q_proj with r=2 from rank_pattern decomposes w2.
    cfg = LoKrConfig(r=4, alpha=8, target_modules=LLAMA_LINEAR, rank_pattern={"q_proj": 2},
                     alpha_pattern={"k_proj": 3, r"layers\.1\.self_attn\.o_proj": 20})
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    assert layout(adapter_dir, "model.layers.0.self_attn.k_proj") == {"lokr_w1": [4, 4], "lokr_w2": [4, 8]}
    assert layout(adapter_dir, "model.layers.1.self_attn.o_proj") == {"lokr_w1": [4, 4], "lokr_w2": [8, 8]}
    assert layout(adapter_dir, "model.layers.0.self_attn.q_proj") == {
        "lokr_w1": [4, 4], "lokr_w2_a": [8, 2], "lokr_w2_b": [2, 8]}
    assert layout(adapter_dir, "model.layers.0.mlp.up_proj") == {"lokr_w1": [6, 4], "lokr_w2": [8, 8]}


def test_lokr_decompose_both_with_factor(tmp_path):
    # decompose_factor=8: 32 -> (8, 4), 16 -> (8, 2), 48 -> (8, 6); r=2 < 8/2 decomposes w1 everywhere,
    # w2 stays full where max(b, d) <= 4; q_proj gets r=16 from rank_pattern: both factors full, so the
    # scaling alpha/16 can only come from the pattern.
    cfg = LoKrConfig(r=2, alpha=6, target_modules=LLAMA_LINEAR, decompose_both=True, decompose_factor=8,
                     rank_pattern={"q_proj": 16}, alpha_pattern={"q_proj": 5, "up_proj": 9})
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(), cfg)
    assert layout(adapter_dir, "model.layers.0.self_attn.k_proj") == {
        "lokr_w1_a": [8, 2], "lokr_w1_b": [2, 8], "lokr_w2": [2, 4]}
    assert layout(adapter_dir, "model.layers.0.mlp.up_proj") == {
        "lokr_w1_a": [8, 2], "lokr_w1_b": [2, 8], "lokr_w2_a": [6, 2], "lokr_w2_b": [2, 4]}
    assert layout(adapter_dir, "model.layers.0.self_attn.q_proj") == {"lokr_w1": [8, 8], "lokr_w2": [4, 4]}


@pytest.mark.parametrize("effective", [False, True], ids=["flat", "cp"])
def test_lokr_conv(tmp_path, effective):
    # c1 Conv1d(3, 8, 3): out (2, 4), in (1, 3); c2 Conv2d(4, 10, 3x3): out (2, 5), in (2, 2);
    # pw Conv2d(10, 6, 1x1): out (2, 3), in (2, 5).
    patterns = {} if effective else {"c1": 2, "c2": 3}  # full w2: (4, 3, 3) for Conv1d, (5, 2, 3, 3)
    cfg = LoKrConfig(r=1, alpha=5, target_modules=CONV, use_effective_conv2d=effective, decompose_both=True,
                     rank_pattern=patterns, alpha_pattern={"pw": 2})
    _, adapter_dir, _ = run_case(tmp_path, conv_net(), cfg)
    if effective:
        assert layout(adapter_dir, "c2") == {"lokr_w1": [2, 2], "lokr_t2": [1, 1, 3, 3], "lokr_w2_a": [1, 5],
                                             "lokr_w2_b": [1, 2]}
        assert layout(adapter_dir, "c1")["lokr_t2"] == [1, 1, 3, 1]
    else:
        assert layout(adapter_dir, "c1") == {"lokr_w1": [2, 1], "lokr_w2": [4, 3, 3]}
        assert layout(adapter_dir, "c2") == {"lokr_w1": [2, 2], "lokr_w2": [5, 2, 3, 3]}
    assert layout(adapter_dir, "pw") == {"lokr_w1": [2, 2], "lokr_w2_a": [3, 1], "lokr_w2_b": [1, 5]}


# -- refusals -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A conv_net base with a LoHa (CP) and a LoKr adapter, saved once for the refusal tests."""
    root = tmp_path_factory.mktemp("loha_lokr")
    model = conv_net()
    base_dir = save_base(model, root / "base")
    loha = make_adapter(model, LoHaConfig(r=2, alpha=4, target_modules=["c2", "fc"], use_effective_conv2d=True),
                        root / "loha")
    lokr = make_adapter(model, LoKrConfig(r=2, alpha=4, target_modules=["c2", "fc"], rank_pattern={"c2": 3}),
                        root / "lokr")
    return base_dir, loha, lokr


def edited(src, dst, config=None, drop=None, tensors=None):
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if drop or tensors:
        t = load_file(dst / "adapter_model.safetensors")
        for k in drop or ():
            del t[PREFIX + k]
        t.update({PREFIX + k: v for k, v in (tensors or {}).items()})
        save_file(t, dst / "adapter_model.safetensors")
    return dst


def refuse(base_dir, adapter_dir, out, *words):
    with pytest.raises(InputError) as e:
        wsurgery.merge(base_dir, adapter_dir, out, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not out.exists()


def test_refuses_rank_that_disagrees_with_config(saved, tmp_path):
    base_dir, loha, lokr = saved
    refuse(base_dir, edited(loha, tmp_path / "a", config={"rank_pattern": {"fc": 3}}), tmp_path / "o1",
           "'fc'", "rank 2", "r=3")
    # LoKr fc (7x12) with r=2 keeps w1 full and decomposes w2 (b=7): r=5 contradicts w2_a's rank 2.
    assert layout(lokr, "fc") == {"lokr_w1": [1, 3], "lokr_w2_a": [7, 2], "lokr_w2_b": [2, 4]}
    refuse(base_dir, edited(lokr, tmp_path / "b", config={"r": 5}), tmp_path / "o2", "'fc'", "rank 2", "r=5")


def test_lokr_refuses_full_factors_that_config_would_decompose(saved, tmp_path):
    # c2 (10x4x3x3) with r=3 has both factors full, so r only shows in the config; with r=1 PEFT would
    # build lokr_w2_a/_b instead (and scale by alpha/1), so the file does not match its config.
    base_dir, _, lokr = saved
    assert layout(lokr, "c2") == {"lokr_w1": [2, 2], "lokr_w2": [5, 2, 3, 3]}
    refuse(base_dir, edited(lokr, tmp_path / "a", config={"rank_pattern": {"c2": 1}}), tmp_path / "o",
           "'c2'", "lokr_w2 [5, 2, 3, 3]", "lokr_w2_a [5, 1]")


def test_refuses_flipped_use_effective_conv2d(saved, tmp_path):
    base_dir, loha, _ = saved
    refuse(base_dir, edited(loha, tmp_path / "a", config={"use_effective_conv2d": False}), tmp_path / "o",
           "'c2'", "CP", "use_effective_conv2d=False")


def test_refuses_missing_and_mixed_tensors(saved, tmp_path):
    base_dir, loha, lokr = saved
    refuse(base_dir, edited(loha, tmp_path / "a", drop=["c2.hada_w2_b"]), tmp_path / "o1", "'c2'", "hada_w2_b")
    refuse(base_dir, edited(loha, tmp_path / "b", drop=["c2.hada_t2"]), tmp_path / "o2", "'c2'", "hada_t2")
    refuse(base_dir, edited(lokr, tmp_path / "c", tensors={"fc.lokr_w2": torch.ones(7, 4)}), tmp_path / "o3",
           "'fc'", "lokr_w2", "lokr_w2_a")


def test_refuses_adapter_for_another_base(saved, tmp_path):
    _, loha, lokr = saved
    other = conv_net()
    other.fc = nn.Linear(12, 9)
    other_dir = save_base(other, tmp_path / "other")
    refuse(other_dir, loha, tmp_path / "o1", "'fc'", "[9, 12]", "hada_w1_a [7, 2]")
    refuse(other_dir, lokr, tmp_path / "o2", "'fc'", "[9, 12]")


def test_inspect_reports_layout_rank_and_scaling(saved):
    from wsurgery.describe import inspect

    _, loha, lokr = saved
    mods = {m["module"]: m for m in inspect(lokr)["modules"]}
    assert (mods["c2"]["kind"], mods["c2"]["rank"], mods["c2"]["scaling"]) == ("lokr/w1:full,w2:full", 3, 4 / 3)
    assert (mods["fc"]["kind"], mods["fc"]["rank"]) == ("lokr/w1:full,w2:decomposed", 2)
    info = inspect(loha)
    assert info["unmerge"] == "exact"
    assert {m["module"]: m["kind"] for m in info["modules"]} == {"c2": "loha/cp", "fc": "loha/flat"}
