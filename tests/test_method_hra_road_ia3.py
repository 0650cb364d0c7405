"""HRA, RoAd and (IA)³ against PEFT 0.21.2's ``merge_and_unload()`` on tiny real models.

Every adapter parameter is random and non-trivial: HRA's reflections are not PEFT's identity init
(``init_weights=False`` plus noise), RoAd's angles are not 0 and its scales not 1, IA3's scales are
1 + noise (never 0, except in the refusal tests, which set a 0 on purpose).
"""

from __future__ import annotations

import json

import pytest
import torch
from oracle import (
    LLAMA_LINEAR,
    assert_close_to,
    conv_net,
    dtypes_fp32_bf16,
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
    ulp,
    with_random_biases,
)
from peft import HRAConfig, IA3Config, RoadConfig
from safetensors.torch import load_file
from torch import nn

import wsurgery
from wsurgery.errors import InputError, NotInvertibleError

DTYPES = dtypes_fp32_bf16()


def _oracle_case(tmp_path, model, config, *, dtype=torch.float32, edit=None):
    """Like run_case's merge half, with an optional edit of the saved adapter before anyone reads it."""
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, config, tmp_path / "adapter")
    if edit is not None:
        edit_adapter_tensors(adapter_dir, edit)
    expected = oracle_merge(reload(model, base_dir, dtype), adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    base = load_all(base_dir)
    assert_close_to(merged, expected, base=base)
    return base_dir, adapter_dir, base, merged


def _adapter_tensors(adapter_dir, suffix):
    return {k: v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if k.endswith(suffix)}




def bert_with_biases(dtype=torch.float32):
    return with_random_biases(tiny_bert(dtype))


def _peft_layers(model, base_dir, adapter_dir, dtype):
    """PEFT's own adapter layers for the saved adapter, by base module path."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(reload(model, base_dir, dtype), adapter_dir)
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in peft_model.named_modules()
            if n.startswith(prefix) and hasattr(m, "merged_adapters")}


def _assert_roundtrip_bf16(base, merged, unmerged, inverse):
    """Unmerging a multiplicative change: unmerged = round(M⁻¹(W' + e)) with |e| <= ½ulp(W') the
    rounding of the merged tensor, so |unmerged − W| <= ulp(W) + |M⁻¹|·½ulp(W') elementwise, where
    ``inverse[name](X)`` applies |M⁻¹| on the side M acts on. Untouched tensors must be bit-exact."""
    for name, want in base.items():
        got = unmerged[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if name not in inverse:
            assert torch.equal(got, want), f"{name}: an untouched tensor changed"
            continue
        err = (got.double() - want.double()).abs()
        spread = inverse[name](0.5 * ulp(merged[name].double().abs(), want.dtype))
        bound = ulp(want.double().abs(), want.dtype) + spread * 1.001
        worst = (err / bound).max().item()
        assert worst <= 1.0, f"{name}: unmerge error {worst:.2f} x the propagated rounding bound"


# -- HRA -------------------------------------------------------------------------------------------

def test_hra_llama_all_linear_fp32(tmp_path):
    cfg = HRAConfig(r=4, init_weights=False, target_modules=LLAMA_LINEAR)
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(), cfg)
    us = _adapter_tensors(adapter_dir, "hra_u")
    assert len(us) == 14 and all(u.shape[1] == 4 for u in us.values())


def _hra_bf16_case(tmp_path, model, cfg):
    """Merge == PEFT within 1 ulp; the round trip within the rounding of W' spread by |H⁻¹| (a rotation
    mixes a whole row, so the merged tensor's rounding reaches small neighbours of large entries)."""
    base_dir, adapter_dir, merged = run_case(tmp_path, model, cfg, dtype=torch.bfloat16, check_unmerge=False)
    layers = _peft_layers(model, base_dir, adapter_dir, torch.bfloat16)
    inverse = {}
    for name, layer in layers.items():
        h_inv = layer.get_delta_weight("default", reverse=True).double().abs()
        inverse[f"{name}.weight"] = lambda x, h=h_inv: (x.reshape(x.shape[0], -1) @ h).reshape(x.shape)
    wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    _assert_roundtrip_bf16(load_all(base_dir), merged, load_all(tmp_path / "unmerged"), inverse)


def test_hra_llama_all_linear_bf16(tmp_path):
    _hra_bf16_case(tmp_path, tiny_llama(torch.bfloat16),
                   HRAConfig(r=4, init_weights=False, target_modules=LLAMA_LINEAR))


def test_hra_gram_schmidt_llama(tmp_path):
    cfg = HRAConfig(r=6, apply_GS=True, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    run_case(tmp_path, tiny_llama(), cfg)


@pytest.mark.parametrize("gs", [False, True], ids=["reflections", "gram_schmidt"])
def test_hra_conv2d_and_linear(tmp_path, gs):
    # c2 is a 3x3 Conv2d (hra_u is (4·3·3, r)), pw a 1x1 Conv2d, fc a Linear.
    cfg = HRAConfig(r=5, apply_GS=gs, init_weights=False, target_modules=["c2", "pw", "fc"])
    _, adapter_dir, _ = run_case(tmp_path, conv_net(), cfg)
    assert _adapter_tensors(adapter_dir, "c2.hra_u")["base_model.model.c2.hra_u"].shape == (36, 5)


def test_hra_symmetric_init_plus_noise_bf16_conv(tmp_path):
    # PEFT's default init repeats every column (H = I); the noise make_adapter adds breaks the pairs.
    _hra_bf16_case(tmp_path, conv_net(torch.bfloat16), HRAConfig(r=4, apply_GS=True, target_modules=["c2", "fc"]))


def test_hra_refuses_weight_of_wrong_size(tmp_path):
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    adapter_dir = make_adapter(tiny_llama(), HRAConfig(r=2, init_weights=False, target_modules=["q_proj"]),
                               tmp_path / "adapter")
    key = "base_model.model.model.layers.0.self_attn.q_proj.hra_u"
    edit_adapter_tensors(adapter_dir, lambda t: t.__setitem__(key, torch.randn(48, 2)))
    with pytest.raises(InputError, match=r"q_proj: hra_u is \[48, 2\].*\[32, 32\]"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


# -- RoAd ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
@pytest.mark.parametrize("model", ["bert", "llama"], ids=["bert_with_bias", "llama_no_bias"])
def test_road_variants(tmp_path, variant, model):
    if model == "bert":
        base, targets = bert_with_biases(), ["query", "value", "intermediate.dense"]  # out 32, 32, 40
    else:
        base, targets = tiny_llama(), ["q_proj", "v_proj", "up_proj"]  # out 32, 16, 48
    cfg = RoadConfig(variant=variant, group_size=8, target_modules=targets)
    _, adapter_dir, merged = run_case(tmp_path, base, cfg)
    thetas = _adapter_tensors(adapter_dir, "road_theta")
    per_out = {"road_1": 0.5, "road_2": 1, "road_4": 2}[variant]
    some = next(k for k in thetas if "query" in k or "q_proj" in k)
    assert thetas[some].numel() == 32 * per_out
    assert all((t != 0).all() for t in thetas.values())
    if model == "bert":  # the biases rotate too
        base_tensors = load_all(tmp_path / "base")
        assert not torch.equal(merged["encoder.layer.0.attention.self.query.bias"],
                               base_tensors["encoder.layer.0.attention.self.query.bias"])


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_road_bf16(tmp_path, variant):
    """PEFT casts R to bf16 before R·W (ours keeps R in float32 and rounds once), so the two differ by
    up to ½ulp of each product term on top of the two roundings: 1.5 ulp at |W'| + |R|·|W|."""
    from peft.tuners.road.layer import _get_delta_weight

    model = bert_with_biases(torch.bfloat16)
    cfg = RoadConfig(variant=variant, group_size=16, target_modules=["query", "value"])
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    layers = _peft_layers(model, base_dir, adapter_dir, torch.bfloat16)
    expected = oracle_merge(reload(model, base_dir, torch.bfloat16), adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    base, merged = load_all(base_dir), load_all(tmp_path / "merged")
    operands, inverse = {}, {}
    for name, layer in layers.items():
        R = _get_delta_weight(layer.variant["default"], layer.group_size["default"],
                              layer.road_theta["default"].detach(), layer.road_alpha["default"].detach()).double()
        R_inv = torch.linalg.inv(R).abs()
        for role in ("weight", "bias"):
            operands[f"{name}.{role}"] = R.abs() @ base[f"{name}.{role}"].double().abs()
            inverse[f"{name}.{role}"] = lambda x, r=R_inv: r @ x
    assert len(inverse) == 8
    assert_close_to(merged, expected, ulps=1.5, base=operands)
    wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    _assert_roundtrip_bf16(base, merged, load_all(tmp_path / "unmerged"), inverse)


def test_road_singular_block_refuses_unmerge(tmp_path):
    cfg = RoadConfig(variant="road_1", group_size=8, target_modules=["query"])
    key = "base_model.model.encoder.layer.1.attention.self.query.road_alpha"

    def zero(t):
        t[key][5] = 0.0  # road_1: output pair (9, 13) collapses to 0

    _, adapter_dir, _, _ = _oracle_case(tmp_path, bert_with_biases(), cfg, edit=zero)
    with pytest.raises(NotInvertibleError, match=r"layer\.1\.attention\.self\.query.*singular.*outputs 9 and 13"):
        wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    assert not (tmp_path / "unmerged").exists()


def test_road_refuses_variant_that_does_not_fit(tmp_path):
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    adapter_dir = make_adapter(tiny_llama(), RoadConfig(variant="road_2", group_size=16, target_modules=["q_proj"]),
                               tmp_path / "adapter")
    # The same vector read with another variant in the config no longer fits the layer.
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["variant"] = "road_4"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"q_proj: road_4 .* 32 entries, which fits 16 output features"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


# -- IA3 -------------------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("ff_rule", ["list", "regex"])
def test_ia3_llama_feedforward_and_attention(tmp_path, dtype, ff_rule):
    ff = ["down_proj", "gate_proj"] if ff_rule == "list" else r".*\.mlp\.(down|gate)_proj"
    cfg = IA3Config(target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    feedforward_modules=ff)
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    ls = _adapter_tensors(adapter_dir, "ia3_l")
    assert ls["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 48)  # input side
    assert ls["base_model.model.model.layers.0.mlp.up_proj.ia3_l"].shape == (48, 1)  # output side
    assert all(((t - 1).abs() > 0).all() and (t != 0).all() for t in ls.values())


def test_ia3_bert_linear_biases(tmp_path):
    # query/value scale their outputs and biases; output.dense is feed-forward: bias untouched.
    cfg = IA3Config(target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"])
    _, _, merged = run_case(tmp_path, bert_with_biases(), cfg)
    base = load_all(tmp_path / "base")
    layer = "encoder.layer.0."
    assert not torch.equal(merged[layer + "attention.self.query.bias"], base[layer + "attention.self.query.bias"])
    assert torch.equal(merged[layer + "output.dense.bias"], base[layer + "output.dense.bias"])
    assert not torch.equal(merged[layer + "output.dense.weight"], base[layer + "output.dense.weight"])


def test_ia3_gpt2_conv1d_fan_in_fan_out(tmp_path):
    cfg = IA3Config(target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
                    feedforward_modules=["mlp.c_proj", "c_fc"], fan_in_fan_out=True)
    _, adapter_dir, _ = run_case(tmp_path, with_random_biases(tiny_gpt2()), cfg)
    ls = _adapter_tensors(adapter_dir, "ia3_l")
    assert ls["base_model.model.transformer.h.0.attn.c_attn.ia3_l"].shape == (96, 1)
    assert ls["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"].shape == (1, 128)


def _untied_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=80, n_positions=32, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False)
    return with_random_biases(GPT2LMHeadModel(cfg))


class _EmbConv1D(nn.Module):
    """PEFT's own test model "EmbConv1D": a transformers Conv1D (stored (in=5, out=1)) next to an nn.Linear."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)


@pytest.mark.parametrize("case", ["gpt2-with-lm_head", "emb-conv1d-ff", "emb-conv1d-out"])
def test_ia3_conv1d_next_to_linear_whatever_the_saved_flag(tmp_path, case):
    """PEFT sets fan_in_fan_out per layer by its type and saves the last layer's value (here nn.Linear's
    False) although the Conv1D layers were merged transposed: the shapes decide, as in PEFT."""
    if case == "gpt2-with-lm_head":
        model = _untied_gpt2()
        cfg = IA3Config(target_modules=["c_attn", "c_fc", "mlp.c_proj", "lm_head"],
                        feedforward_modules=["c_fc", "mlp.c_proj"])
    else:
        torch.manual_seed(0)
        model = with_random_biases(_EmbConv1D())
        ff = ["conv1d", "lin0"] if case == "emb-conv1d-ff" else []
        cfg = IA3Config(target_modules=["conv1d", "lin0"], feedforward_modules=ff)
    _, adapter_dir, _ = run_case(tmp_path, model, cfg)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["fan_in_fan_out"] is False


def test_ia3_square_conv1d_next_to_linear_is_refused(tmp_path):
    """A square weight in an adapter whose other modules are both nn.Linear and Conv1D: the files do not say
    which layout it has (the flag is the last layer's), so it is refused rather than guessed."""
    model = _untied_gpt2()
    cfg = IA3Config(target_modules=["c_attn", "attn.c_proj", "lm_head"], feedforward_modules=[])
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    with pytest.raises(InputError, match=r"attn\.c_proj: its IA3 weight is square.*nn\.Linear.*Conv1D"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


@DTYPES
def test_ia3_conv_layers(tmp_path, dtype):
    # c2 (Conv2d 3x3) and c3 (Conv3d) scale output channels and biases, pw (1x1) and fc input features.
    cfg = IA3Config(target_modules=["c2", "pw", "c3", "fc"], feedforward_modules=["pw", "fc"])
    _, adapter_dir, _ = run_case(tmp_path, conv_net(dtype), cfg, dtype=dtype)
    ls = _adapter_tensors(adapter_dir, "ia3_l")
    assert ls["base_model.model.c2.ia3_l"].shape == (1, 10, 1, 1)
    assert ls["base_model.model.pw.ia3_l"].shape == (1, 10, 1, 1)
    assert ls["base_model.model.c3.ia3_l"].shape == (1, 5, 1, 1, 1)


class GroupedConvNet(nn.Module):
    """Grouped convolutions: IA3's feed-forward scale of the input channels is expanded per group."""

    def __init__(self):
        super().__init__()
        self.g = nn.Conv2d(6, 9, 3, groups=3)
        self.h = nn.Conv2d(6, 4, 1, groups=2)


def test_ia3_grouped_conv(tmp_path):
    torch.manual_seed(0)
    cfg = IA3Config(target_modules=["g", "h"], feedforward_modules=["g", "h"])
    run_case(tmp_path, GroupedConvNet(), cfg)


def test_ia3_zero_scale_merges_but_refuses_unmerge(tmp_path):
    cfg = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    key = "base_model.model.model.layers.1.mlp.down_proj.ia3_l"
    _, adapter_dir, _, merged = _oracle_case(tmp_path, tiny_llama(), cfg,
                                             edit=lambda t: t[key].__setitem__((0, 7), 0.0))
    assert (merged["model.layers.1.mlp.down_proj.weight"][:, 7] == 0).all()
    with pytest.raises(NotInvertibleError,
                       match=r"layers\.1\.mlp\.down_proj: ia3_l is 0 .* 1 input feature\(s\) \(e\.g\. index 7\)"):
        wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    assert not (tmp_path / "unmerged").exists()


def test_ia3_feedforward_rule_that_contradicts_shapes(tmp_path):
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    cfg = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    adapter_dir = make_adapter(tiny_llama(), cfg, tmp_path / "adapter")
    path = adapter_dir / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw["feedforward_modules"] = ["q_proj"]
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"down_proj.*ia3_l is \[1, 48\].*says the module is not feed-forward"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


def test_ia3_small_scale_unmerge_is_exact(tmp_path):
    # PEFT's unmerge divides by l + 1e-8 (not exact for small l); ours divides by l.
    cfg = IA3Config(target_modules=["fc"], feedforward_modules=[])
    key = "base_model.model.fc.ia3_l"

    def small(t):
        t[key][:3, 0] = torch.tensor([1e-6, -3e-7, 2e-5])

    _, adapter_dir, base, _ = _oracle_case(tmp_path, conv_net(), cfg, edit=small)
    result = wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    unmerged = load_all(tmp_path / "unmerged")
    err = (unmerged["fc.weight"][:3].double() - base["fc.weight"][:3].double()).abs() / base["fc.weight"][:3].abs()
    assert err.max() < 3e-7
    assert any("ia3_l + 1e-8" in n for n in result.notes)
