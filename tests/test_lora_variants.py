"""LoRA on special layers and LoRA variants, against PEFT's ``merge_and_unload()``.

* ``nn.MultiheadAttention``: in_proj and out_proj, PEFT's doubled out_proj change (default) and the
  single one (option ``mha_single_out_proj``), compared with a hand-built expectation;
* ``target_parameters``: raw 2-D parameters and fused 3-D expert stacks in both layouts, nested
  wrappers, a tiny GPT-OSS (transformers, ``is_transposed``) and fixtures written by PEFT 0.17.1,
  0.18.1 and 0.19.0 (the fused-expert layout flipped twice in those releases);
* BD-LoRA (``use_bdlora``) and KaSA (``kasa_config``, base truncated by SVD);
* refusals: ambiguous expert layouts, impossible variant combinations, ``layer_replication``.

Every adapter parameter is non-zero random (``oracle.make_adapter``); float32 within 1e-5 x the
tensor's max, bf16 within one ulp of the operands.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

import wsurgery
from oracle import (assert_close_to, load_all, make_adapter, oracle_merge, reload, run_case, save_base, tiny_llama)
from wsurgery.adapters import load_adapter
from wsurgery.describe import inspect
from wsurgery.errors import InputError, NotInvertibleError, UnsupportedError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "lora-variants"


def _lora_delta(adapter: dict[str, torch.Tensor], module: str, scaling: float) -> torch.Tensor:
    A = adapter[f"base_model.model.{module}.lora_A.weight"].double()
    B = adapter[f"base_model.model.{module}.lora_B.weight"].double()
    return scaling * (B @ A)


# -- nn.MultiheadAttention -----------------------------------------------------------------------

class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4)
        self.fc = nn.Linear(16, 8)


def mha_net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return MHANet().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mha_merge_equals_peft_doubled_out_proj(tmp_path, dtype):
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["attn", "fc"])
    run_case(tmp_path, mha_net(dtype), cfg, dtype=dtype)


def test_mha_alpha_pattern_and_lora_bias(tmp_path):
    """out_proj's LoRA takes the MultiheadAttention's α (PEFT builds it with the MHA's r and α); its lora_bias
    is added once; in_proj's lora_B.bias is never used by PEFT and is ignored, with a note."""
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["attn", "fc"], alpha_pattern={"attn": 7}, lora_bias=True)
    base_dir, adapter_dir, merged = run_case(tmp_path, mha_net(), cfg)
    result = wsurgery.merge(base_dir, adapter_dir, tmp_path / "again", progress=False)
    assert any("in_proj" in n and "ignored" in n for n in result.notes)
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    base = load_all(base_dir)
    want = base["attn.out_proj.weight"].double() + 2 * _lora_delta(adapter, "attn.base_layer.out_proj", 7 / 2)
    assert (merged["attn.out_proj.weight"].double() - want).abs().max() < 1e-5
    want_bias = base["attn.out_proj.bias"].double() + 3.5 * adapter[
        "base_model.model.attn.base_layer.out_proj.lora_B.bias"].double()
    assert (merged["attn.out_proj.bias"].double() - want_bias).abs().max() < 1e-5
    assert torch.equal(merged["attn.in_proj_bias"], base["attn.in_proj_bias"])


def test_mha_single_out_proj_option(tmp_path):
    model = mha_net()
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["attn"])
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    peft_merged = oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)
    opts = {"mha_single_out_proj": True}
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "single", progress=False, options=opts)
    ours = load_all(tmp_path / "single")
    base = load_all(base_dir)
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    d_in = _lora_delta(adapter, "attn", 2.0)
    d_out = _lora_delta(adapter, "attn.base_layer.out_proj", 2.0)
    expected = dict(base)
    expected["attn.in_proj_weight"] = (base["attn.in_proj_weight"].double() + d_in).float()
    expected["attn.out_proj.weight"] = (base["attn.out_proj.weight"].double() + d_out).float()
    assert_close_to(ours, expected)
    # PEFT adds the out_proj change twice, the option once; in_proj is the same either way.
    assert_close_to({"w": ours["attn.in_proj_weight"]}, {"w": peft_merged["attn.in_proj_weight"]})
    gap = peft_merged["attn.out_proj.weight"].double() - ours["attn.out_proj.weight"].double()
    assert (gap - d_out).abs().max() < 1e-5 * d_out.abs().max()
    wsurgery.unmerge(tmp_path / "single", adapter_dir, tmp_path / "back", progress=False, options=opts)
    assert_close_to(load_all(tmp_path / "back"), base, base=ours, ulps=2)
    # inspect says which factor is used
    info = inspect(adapter_dir)
    out_proj = next(m for m in info["modules"] if m["module"] == "attn.out_proj")
    assert out_proj["out_proj_factor"] == 2 and "mha-single-out-proj" in out_proj["out_proj_rule"]
    single = load_adapter(adapter_dir, opts)
    assert next(p for p in single.patches() if p.module == "attn.out_proj").describe()["out_proj_factor"] == 1


def test_mha_option_refused_for_other_methods(tmp_path):
    from peft import IA3Config

    model = mha_net()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, IA3Config(target_modules=["fc"], feedforward_modules=[]), tmp_path / "ia3")
    with pytest.raises(UnsupportedError, match="mha_single_out_proj"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "out", progress=False, options={"mha_single_out_proj": True})


# -- target_parameters ---------------------------------------------------------------------------

class Experts(nn.Module):  # (E, out, in)
    def __init__(self, E=3, out=10, inp=6, out2=6, inp2=5):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, out, inp) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(E, out2, inp2) * 0.3)


class TransposedExperts(Experts):  # GPT-OSS style (E, in, out)
    is_transposed = True

    def __init__(self):
        super().__init__(out=6, inp=10, out2=5, inp2=6)


class Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6) * 0.3)


class MoENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = nn.Module()
        self.moe.experts = Experts()
        self.tmoe = nn.Module()
        self.tmoe.experts = TransposedExperts()
        self.router = Router()
        self.fc = nn.Linear(6, 4)


def moe_net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return MoENet().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_target_parameters_both_layouts_nested_and_2d(tmp_path, dtype):
    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=["fc"],
                     target_parameters=["experts.gate_up_proj", "experts.down_proj", "router.weight"],
                     alpha_pattern={"tmoe.experts.gate_up_proj": 3})
    _, adapter_dir, _ = run_case(tmp_path, moe_net(dtype), cfg, dtype=dtype)
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    assert "base_model.model.moe.experts.base_layer.lora_A.weight" in keys  # really nested
    # PEFT matches alpha_pattern against "<module>.<parameter>": our describe() shows the same α
    ad = load_adapter(adapter_dir)
    patches = [p for p in ad.patches() if p.module == "tmoe.experts"]
    for p in patches:
        p.check({"gate_up_proj": (3, 6, 10), "down_proj": (3, 5, 6)})
    assert sorted((p.describe()["parameter"].split(".")[-1], p.describe()["alpha"]) for p in patches) == [
        ("down_proj", 5.0), ("gate_up_proj", 3.0)]


def test_target_parameters_rslora_rank_pattern(tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_parameters=["experts.down_proj"],
                     rank_pattern={"moe.experts.down_proj": 4})
    _, adapter_dir, _ = run_case(tmp_path, moe_net(), cfg)
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    assert keys["base_model.model.moe.experts.lora_A.weight"].shape == (3 * 4, 5)  # the pattern took effect
    assert keys["base_model.model.tmoe.experts.lora_A.weight"].shape == (3 * 2, 5)


def _tiny_gpt_oss(hidden=16, inter=16):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2,
                       max_position_embeddings=32, head_dim=8, layer_types=["full_attention"])
    return GptOssForCausalLM(cfg)


def test_gpt_oss_fused_experts(tmp_path):
    """GPT-OSS stores its experts transposed (E, in, out); hidden = intermediate makes down_proj square, so only
    its sibling gate_up_proj tells the layout."""
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                     target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    run_case(tmp_path, _tiny_gpt_oss(), cfg)


class SquareExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.down_proj = nn.Parameter(torch.randn(3, 8, 8) * 0.3)


class SquareTransposedExperts(SquareExperts):
    is_transposed = True


class SquareNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = nn.Module()
        self.moe.experts = SquareExperts()


class SquareTransposedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = nn.Module()
        self.moe.experts = SquareTransposedExperts()


@pytest.mark.parametrize("net, transposed", [(SquareNet, False), (SquareTransposedNet, True)], ids=["oi", "io"])
def test_square_experts_need_the_layout_option(tmp_path, net, transposed):
    torch.manual_seed(0)
    model = net()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, LoraConfig(r=2, lora_alpha=4, target_parameters=["experts.down_proj"]),
                               tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match="experts_transposed"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    expected = oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)
    opts = {"experts_transposed": transposed}
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False, options=opts)
    merged = load_all(tmp_path / "merged")
    assert_close_to(merged, expected)
    wrong = {"experts_transposed": not transposed}
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "wrong", progress=False, options=wrong)
    w = load_all(tmp_path / "wrong")["moe.experts.down_proj"]
    assert (w - expected["moe.experts.down_proj"]).abs().max() > 1e-3  # the option really decides
    wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "back", progress=False, options=opts)
    assert_close_to(load_all(tmp_path / "back"), load_all(base_dir), base=merged, ulps=2)


class OneExpert(nn.Module):
    is_transposed = True

    def __init__(self):
        super().__init__()
        self.down_proj = nn.Parameter(torch.randn(1, 6, 6) * 0.3)


class OneExpertNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = nn.Module()
        self.moe.experts = OneExpert()


def test_single_expert_stack_adds_b_a_as_it_is(tmp_path):
    """With E = 1 PEFT adds B·A broadcast over the expert axis, whatever is_transposed says: no ambiguity."""
    torch.manual_seed(0)
    run_case(tmp_path, OneExpertNet(), LoraConfig(r=2, lora_alpha=4, target_parameters=["experts.down_proj"]))


class TwinExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(3, 6, 4))
        self.up_proj = nn.Parameter(torch.randn(3, 6, 4))


class TwinNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = nn.Module()
        self.moe.experts = TwinExperts()


def test_nested_wrappers_of_equal_shape_are_refused(tmp_path):
    """Which nested wrapper is which follows the module's parameter registration order; with equal shapes the
    files cannot tell."""
    torch.manual_seed(0)
    model = TwinNet()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, LoraConfig(r=2, target_parameters=["experts.gate_proj", "experts.up_proj"]),
                               tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match="registration order"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "out", progress=False)


def test_target_parameters_shape_mismatch_is_an_input_error(tmp_path):
    model = moe_net()
    adapter_dir = make_adapter(model, LoraConfig(r=2, target_parameters=["experts.down_proj"]), tmp_path / "adapter")
    torch.manual_seed(1)
    other = MoENet()
    other.moe.experts.down_proj = nn.Parameter(torch.randn(3, 7, 5))
    base_dir = save_base(other, tmp_path / "base")
    with pytest.raises(InputError, match="moe.experts"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "out", progress=False)


@pytest.mark.parametrize("version", ["0.17.1", "0.18.1", "0.19.0"])
@pytest.mark.parametrize("case", ["experts", "single-rslora", "square", "square-transposed"])
def test_old_peft_fused_expert_layouts(tmp_path, version, case):
    folder = FIXTURES / f"peft-{version}" / case
    assert (folder / "expected.safetensors").is_file(), "run scripts/make_lora_variant_fixtures.py"
    options = None
    if case.startswith("square") and version == "0.19.0":
        # from 0.19 a square stack's layout depends on is_transposed, which the files do not hold
        with pytest.raises(UnsupportedError, match="experts_transposed"):
            wsurgery.merge(folder / "base", folder / "adapter", tmp_path / "refused", progress=False)
        options = {"experts_transposed": case == "square-transposed"}
    wsurgery.merge(folder / "base", folder / "adapter", tmp_path / "merged", progress=False, options=options)
    merged = load_all(tmp_path / "merged")
    expected = load_file(folder / "expected.safetensors")
    assert_close_to(merged, expected)
    base = load_all(folder / "base")
    changed = {n for n in merged if not torch.equal(merged[n], base[n])}
    assert changed == {n for n in expected if not torch.equal(expected[n], base[n])} and changed
    wsurgery.unmerge(tmp_path / "merged", folder / "adapter", tmp_path / "back", progress=False, options=options)
    assert_close_to(load_all(tmp_path / "back"), base, base=merged, ulps=2)
    if options is not None:  # 0.19.0 read is_transposed backwards: the option must follow that release's rule
        wrong = {"experts_transposed": not options["experts_transposed"]}
        wsurgery.merge(folder / "base", folder / "adapter", tmp_path / "wrong", progress=False, options=wrong)
        w = load_all(tmp_path / "wrong")["moe.experts.down_proj"]
        assert (w - expected["moe.experts.down_proj"]).abs().max() > 1e-3


def test_old_fixtures_really_differ_in_layout():
    """The three releases wrote different factor shapes for the same model: the fixtures test three readings."""
    shapes = {v: json.loads((FIXTURES / f"peft-{v}" / "cases.json").read_text())["cases"]["experts"]["adapter_shapes"]
              for v in ("0.17.1", "0.18.1", "0.19.0")}
    key = "base_model.model.tmoe.experts.base_layer.lora_A.weight"
    assert shapes["0.17.1"][key] == shapes["0.18.1"][key] != shapes["0.19.0"][key]


# -- BD-LoRA -------------------------------------------------------------------------------------

BD = {"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "v_proj", "up_proj"],
      "nblocks": 2, "match_strict": False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bdlora(tmp_path, dtype):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "k_proj"],
                     use_bdlora=BD)
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape[1] == 2  # blocks stacked
    assert keys["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape[1] == 48 // 2


class ProjNet(nn.Module):
    """Linear layers with biases (for lora_bias) and sizes divisible by 4 blocks."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 24)
        self.down_proj = nn.Linear(24, 16)
        self.fc = nn.Linear(16, 8)


def proj_net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return ProjNet().to(dtype)


def test_bdlora_with_lora_bias_and_four_blocks(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["down_proj", "fc"], lora_bias=True,
                     use_bdlora={**BD, "nblocks": 4})
    run_case(tmp_path, proj_net(), cfg)


def test_bdlora_block_diagonal_b_with_lora_bias(tmp_path):
    """A block-diagonal B has no bias in PEFT (BlockDiagonalLinear), so nothing is saved or used for it in the
    forward; PEFT's merge crashes on it (AttributeError), we merge the weight change alone."""
    model = proj_net()
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj"], lora_bias=True, use_bdlora={**BD, "nblocks": 4})
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    assert "base_model.model.q_proj.lora_B.bias" not in adapter
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    A = adapter["base_model.model.q_proj.lora_A.weight"].double()
    B = adapter["base_model.model.q_proj.lora_B.weight"].double()  # (24, 1): four (6, 1) blocks stacked
    B_full = torch.zeros(24, 4, dtype=torch.float64)
    for i in range(4):
        B_full[6 * i:6 * (i + 1), i] = B[6 * i:6 * (i + 1), 0]
    base = load_all(base_dir)
    expected = dict(base)
    expected["q_proj.weight"] = (base["q_proj.weight"].double() + 1.5 * B_full @ A).float()
    assert_close_to(load_all(tmp_path / "merged"), expected)


def test_bdlora_refusals(tmp_path):
    model = tiny_llama()
    strict = {**BD, "match_strict": True}
    adapter_dir = make_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], use_bdlora=strict),
                               tmp_path / "adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_dir = save_base(model, tmp_path / "base")
    for change, match in [({"use_bdlora": {**strict, "target_modules_bd_a": ["q_proj"]}}, "both"),
                          ({"use_bdlora": {**strict, "target_modules_bd_b": []}}, "neither"),
                          ({"use_dora": True}, "use_dora and use_bdlora|both use_dora")]:
        (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UnsupportedError, match=match):
            wsurgery.merge(base_dir, adapter_dir, tmp_path / "out", progress=False)


# -- KaSA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kasa(tmp_path, dtype):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], kasa_config={})
    base_dir, adapter_dir, merged = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype, check_unmerge=False)
    # the truncation matters: plain W + ΔW is far from PEFT's result
    base = load_all(base_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[name].float() - base[name].float()).abs().max() > 0.01
    with pytest.raises(NotInvertibleError, match="truncated"):
        wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists()
    modules = inspect(adapter_dir)["modules"]
    assert all(m["unmerge"].startswith("impossible") and m["variant"] == "kasa" for m in modules)


def test_kasa_with_lora_bias(tmp_path):
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "down_proj"], lora_bias=True, kasa_config={})
    run_case(tmp_path, proj_net(), cfg, check_unmerge=False)


def test_kasa_refusals(tmp_path):
    model = proj_net()
    adapter_dir = make_adapter(model, LoraConfig(r=3, target_modules=["fc"], kasa_config={}), tmp_path / "adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_dir = save_base(model, tmp_path / "base")
    # lora_diag without kasa_config: the file and its config disagree
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "kasa_config": None}))
    with pytest.raises(InputError, match="kasa_config"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "out", progress=False)
    # rank not below min(out, in): PEFT refuses the layer
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    big = {k: torch.randn(8, 16) if k.endswith("lora_A.weight") else
           torch.randn(8, 8) if k.endswith("lora_B.weight") else torch.randn(8) for k in tensors}
    save_file(big, adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(InputError, match="below min"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "out", progress=False)


# -- layer_replication ---------------------------------------------------------------------------

def test_layer_replication_is_refused_with_the_reason(tmp_path):
    model = tiny_llama()
    adapter_dir = make_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]),
                               tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match="layer_replication.*more layers"):
        wsurgery.merge(save_base(model, tmp_path / "base"), adapter_dir, tmp_path / "out", progress=False)


# -- Linear or Conv1D: the layout from the shapes, not from the saved fan_in_fan_out ---------------------

@pytest.mark.parametrize("case", ["gpt2-lm_head", "gpt2-lm_head-dora", "emb-conv1d"])
def test_conv1d_next_to_linear_whatever_the_saved_flag(tmp_path, case):
    """PEFT sets fan_in_fan_out per layer by its type and saves the last wrapped layer's value: False for
    GPT-2 with its (nn.Linear) lm_head targeted, although c_attn/c_fc are Conv1D and merged transposed."""
    from test_method_hra_road_ia3 import _EmbConv1D, _untied_gpt2

    if case == "emb-conv1d":
        torch.manual_seed(0)
        model, cfg = _EmbConv1D(), LoraConfig(r=2, lora_alpha=3, target_modules=["conv1d", "lin0"])
    else:
        model = _untied_gpt2()
        cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc", "lm_head"],
                         use_dora=case.endswith("dora"))
    _, adapter_dir, _ = run_case(tmp_path, model, cfg, check_unmerge=not case.endswith("dora"))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["fan_in_fan_out"] is False


def test_square_conv1d_next_to_linear_is_refused(tmp_path):
    from test_method_hra_road_ia3 import _untied_gpt2

    model = _untied_gpt2()
    adapter_dir = make_adapter(model, LoraConfig(r=2, target_modules=["c_attn", "attn.c_proj", "lm_head"]),
                               tmp_path / "adapter")
    with pytest.raises(InputError, match=r"attn\.c_proj: its LoRA weight is square.*nn\.Linear.*Conv1D"):
        wsurgery.merge(save_base(model, tmp_path / "base"), adapter_dir, tmp_path / "out", progress=False)


# -- VeLoRA, MonteCLoRA, MiCA: training-only variants, merged as plain LoRA ------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("init_type", ["random", "batch_average", "batch_average_once"])
def test_velora(tmp_path, dtype, init_type):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     velora_config={"num_groups": 4, "init_type": init_type})
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_velora_embed" in keys


def test_velora_on_gpt2_conv1d(tmp_path):
    from oracle import tiny_gpt2

    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], velora_config={"num_groups": 2},
                     fan_in_fan_out=True)
    run_case(tmp_path, tiny_gpt2(), cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_monteclora(tmp_path, dtype):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                     monteclora_config={"num_samples": 3})
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_monteclora_sampler.std_prior" in keys


def test_mica_linear_and_embedding(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"],
                     init_lora_weights="mica")
    run_case(tmp_path, tiny_llama(), cfg)


def test_training_only_variant_refusals(tmp_path):
    """A variant on a layer PEFT does not build it on, a variant's tensor under a config without the variant,
    and a ``lora_`` tensor no variant saves: each refused naming the module or key, never read as a module."""
    from oracle import conv_net

    model = conv_net()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, LoraConfig(r=2, target_modules=["c2", "fc"]), tmp_path / "conv")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    for change, match in [({"velora_config": {"num_groups": 2}}, r"c2.*VeLoRA \(velora_config\) on nn\.Conv1d/2d/3d"),
                          ({"init_lora_weights": "mica"}, r"c2.*MiCA \(mica\) on nn\.Conv1d/2d/3d")]:
        (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UnsupportedError, match=match):
            wsurgery.merge(base_dir, adapter_dir, tmp_path / "out", progress=False)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    for extra, error, match in [("base_model.model.fc.lora_velora_embed", InputError,
                                 r"fc.*lora_velora_embed \(VeLoRA\).*no velora_config"),
                                ("base_model.model.fc.lora_future_variant", UnsupportedError,
                                 r"'base_model\.model\.fc\.lora_future_variant'.*prefix 'lora_'")]:
        save_file({**tensors, extra: torch.ones(3)}, adapter_dir / "adapter_model.safetensors")
        with pytest.raises(error, match=match):
            wsurgery.merge(base_dir, adapter_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_qalora_flag_on_plain_linear_is_plain_lora_and_pooled_a_is_refused(tmp_path):
    """PEFT applies use_qalora on GPTQ layers only; on nn.Linear it ignores the flag. A pooled lora_A
    (in_features / qalora_group_size columns) is QA-LoRA proper, which PEFT cannot merge either."""
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_qalora=True, qalora_group_size=16)
    run_case(tmp_path, tiny_llama(), cfg)
    adapter_dir = tmp_path / "adapter"
    edit = {k: v[:, :2].contiguous() if k.endswith("lora_A.weight") else v
            for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    save_file(edit, adapter_dir / "adapter_model.safetensors")
    with pytest.raises(UnsupportedError, match=r"q_proj: lora_A reads 2 = in_features/16 .*QA-LoRA"):
        wsurgery.merge(tmp_path / "base", adapter_dir, tmp_path / "out", progress=False)


@pytest.mark.parametrize("change, match", [({"alora_invocation_tokens": [1, 2]}, "invocation tokens"),
                                           ({"arrow_config": {"top_k": 2}}, "routes each token")])
def test_variants_peft_cannot_merge_are_refused_with_its_reason(tmp_path, change, match):
    model = tiny_llama()
    adapter_dir = make_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UnsupportedError, match=f"{next(iter(change))} cannot be merged into weights: .*{match}"):
        wsurgery.merge(save_base(model, tmp_path / "base"), adapter_dir, tmp_path / "out", progress=False)


# -- the audit: wsurgery's variant table against PEFT's own registry -------------------------------------

def _peft_lora_layer_classes() -> list[type]:
    import inspect
    import sys

    from peft.tuners.lora.layer import LoraLayer

    modules = [m for name, m in list(sys.modules.items()) if name.startswith("peft.tuners.lora") and m is not None]
    return sorted({c for m in modules for _, c in inspect.getmembers(m, inspect.isclass) if issubclass(c, LoraLayer)},
                  key=lambda c: f"{c.__module__}.{c.__name__}")


def _peft_variants_of(cls: type) -> set[str]:
    import inspect

    return {name for key in inspect.getattr_static(cls, "lora_variants").fget(None) for name in key}


def test_every_peft_lora_variant_is_in_the_table():
    """Every variant PEFT can build (LoraConfig fields tagged is_lora_variant, init_lora_weights values that
    are variants, and every key of every LoRA layer class's lora_variants) is in wsurgery's table, and the
    table has no variant PEFT does not know."""
    import dataclasses

    from wsurgery.methods.lora import VARIANTS

    fields = set()
    for f in dataclasses.fields(LoraConfig):
        if f.metadata.get("is_lora_variant"):
            fields.add(f.name)
        fields.update(f.metadata.get("lora_variants", ()))
    for cls in _peft_lora_layer_classes():
        fields |= _peft_variants_of(cls)
    assert fields == set(VARIANTS), f"PEFT's variants differ from wsurgery's table: {fields ^ set(VARIANTS)}"


def test_variant_layers_are_the_ones_peft_builds_them_on():
    """PEFT's lora.Linear wraps nn.Linear and Conv1D alike, unless the variant's init refuses
    fan_in_fan_out (KaSA does)."""
    import inspect

    from peft.tuners.lora import layer as peft_layer

    from wsurgery.methods.lora import VARIANTS

    kinds = {peft_layer.Linear: {"linear", "conv1d_transposed"}, peft_layer.Embedding: {"embedding"},
             peft_layer.Conv1d: {"conv"}, peft_layer.Conv2d: {"conv"}, peft_layer.Conv3d: {"conv"},
             peft_layer.MultiheadAttention: set(), peft_layer.ParamWrapper: set()}
    linear_variants = inspect.getattr_static(peft_layer.Linear, "lora_variants").fget(None)
    for option, variant in VARIANTS.items():
        built_on = set().union(*(k for cls, k in kinds.items() if option in _peft_variants_of(cls)))
        init = inspect.getsource(linear_variants[(option,)].init) if (option,) in linear_variants else ""
        if re.search(r"if getattr\(module, \"fan_in_fan_out\", False\):\s*(#.*\s*)*raise", init):
            built_on.discard("conv1d_transposed")
        assert set(variant.layers) == built_on, option


def test_every_tensor_peft_lora_layers_save_is_known():
    """Every container PEFT's LoRA layers and variants register (``adapter_layer_names``, and every
    ``module.lora_* = ModuleDict/ParameterDict/BufferDict`` in peft/tuners/lora) is a name wsurgery's LoRA
    reads, so none of them is ever taken for a module path. ``lora_dropout`` holds dropout modules, which
    have no state."""
    from pathlib import Path as P

    import peft.tuners.lora as peft_lora

    from wsurgery.methods.lora import Lora

    names = {n for cls in _peft_lora_layer_classes() for n in cls.adapter_layer_names}
    for source in P(peft_lora.__file__).parent.glob("*.py"):
        text = source.read_text()
        names |= set(re.findall(r"(?:module|self)\.(lora_\w+)\s*=\s*(?:torch\.)?(?:nn\.)?(?:ModuleDict|ParameterDict"
                                r"|BufferDict)\(", text))
        names |= set(re.findall(r"adapter_layer_names\[:\] \+ \(\"(\w+)\",\)", text))
    names.discard("lora_dropout")
    assert {"lora_velora_embed", "lora_monteclora_sampler", "lora_diag", "lora_arrow"} <= names  # the scan works
    assert names - Lora.param_names == set()
