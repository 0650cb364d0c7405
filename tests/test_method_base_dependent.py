"""HiRA, GLoRA, DEFT and PEANuT (changes that depend on the base weight) against PEFT 0.21.2's
``merge_and_unload()`` on tiny real models.

Every adapter parameter is random and non-trivial (PEFT's inits make HiRA's B, GLoRA's paths and
PEANuT's B zero, and DEFT's R cancel the projection; ``make_adapter`` adds noise to all of them),
and BERT's biases are made non-zero so a wrong bias merge shows.

Tolerances: float32 1e-5 of the tensor's max; bf16 one ulp at |W| + |W'| as everywhere, except GLoRA:
PEFT rounds the path values to bf16, then W⊙A, then + B, then + W (the bias likewise), several
roundings where we round once, so its bf16 merges are checked against the sum of PEFT's own half-ulp
roundings. Unmerges that solve (DEFT relu) are checked against the merged file's rounding and the
merge's float32 arithmetic propagated through the exact inverse, not against a fixed tolerance.
"""

from __future__ import annotations


import pytest
import torch
from oracle import (
    LLAMA_LINEAR,
    assert_close_to,
    conv_net,
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
from peft import DeftConfig, GloraConfig, HiraConfig, PeanutConfig
from safetensors.torch import load_file, save_file
from torch import nn

import wsurgery
from wsurgery.describe import inspect
from wsurgery.errors import InputError, NotInvertibleError, UnsupportedError

DTYPES = dtypes_fp32_bf16()




def _oracle_case(tmp_path, model, config, *, dtype=torch.float32, edit=None, ulps=1):
    """run_case's merge half, with an optional edit of the saved adapter before anyone reads it."""
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, config, tmp_path / "adapter")
    if edit is not None:
        edit_adapter_tensors(adapter_dir, edit)
    expected = oracle_merge(reload(model, base_dir, dtype), adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    base = load_all(base_dir)
    assert_close_to(merged, expected, base=base, ulps=ulps)
    assert any(not torch.equal(merged[n], base[n]) for n in base), "the merge changed nothing"
    return base_dir, adapter_dir, base, merged


def _unmerge(tmp_path, adapter_dir):
    return wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)


# -- HiRA ------------------------------------------------------------------------------------------

@DTYPES
def test_hira_llama_linear_embedding_and_head(tmp_path, dtype):
    cfg = HiraConfig(r=4, target_modules=LLAMA_LINEAR + ["embed_tokens", "lm_head"])
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.hira_embedding_A"].shape == (4, 96)


@DTYPES
def test_hira_conv1d_2d_1x1_3d_linear_and_embedding(tmp_path, dtype):
    cfg = HiraConfig(r=3, target_modules=["emb", "c1", "c2", "pw", "c3", "fc"])
    _, adapter_dir, _ = run_case(tmp_path, conv_net(dtype), cfg, dtype=dtype)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert saved["base_model.model.c2.hira_A"].shape == (3, 4, 3, 3)
    assert saved["base_model.model.c3.hira_B"].shape == (5, 3, 1, 1, 1)


def test_hira_gpt2_conv1d_with_square_weight_and_config_flag_left_false(tmp_path):
    # PEFT transposes for Conv1D whatever fan_in_fan_out says; attn.c_proj is square (32x32), so only
    # the other (non-square, transposed) modules of the adapter tell its layout.
    cfg = HiraConfig(r=3, target_modules=["c_attn", "c_proj", "c_fc"])
    assert cfg.fan_in_fan_out is False
    run_case(tmp_path, tiny_gpt2(), cfg)


class _MixedLayers(nn.Module):
    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.lin = nn.Linear(8, 12)
        self.conv1d = Conv1D(12, 8)  # stored (in=8, out=12)
        self.square = nn.Linear(8, 8)


def test_hira_square_weight_in_a_model_mixing_linear_and_conv1d_is_refused(tmp_path):
    model = _MixedLayers()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, HiraConfig(r=2, target_modules=["lin", "conv1d", "square"]), tmp_path / "ad")
    with pytest.raises(InputError, match=r"square.*nn\.Linear.*Conv1D"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
    # Without the square module the shapes decide, and the merge is PEFT's.
    expected = None
    adapter_dir = make_adapter(model, HiraConfig(r=2, target_modules=["lin", "conv1d"]), tmp_path / "ad2")
    fresh = _MixedLayers()
    fresh.load_state_dict(load_file(base_dir / "model.safetensors"))
    expected = oracle_merge(fresh, adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged2", progress=False)
    assert_close_to(load_all(tmp_path / "merged2"), expected)


class _Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(3, 10, 3)
        self.lin0 = nn.Linear(10, 2)


def test_hira_conv3d_unmerge_where_one_plus_ba_nearly_cancels(tmp_path):
    """Unmerge divides by 1 + B·A; where B·A ≈ -1 a float32 sum 1 + ΔW keeps only a few significant bits (this
    case: 1 + ΔW = 2e-4 at the largest weight gave the base back 3e-4 off, relative); the contract is 1e-5."""
    torch.manual_seed(0)
    model = _Conv3dNet()
    o, i, *k = torch.nonzero(model.conv3d.weight.abs() == model.conv3d.weight.abs().max())[0].tolist()
    key = "base_model.model.conv3d"

    def nearly_minus_one(t):  # (B·A)[o, i, k] = 0.3 · (-(1 - 2e-4) / 0.3), rounded in float32 on PEFT's side
        A, B = t[f"{key}.hira_A"], t[f"{key}.hira_B"]
        A[:, i, k[0], k[1], k[2]] = torch.tensor([0.3, 0.0, 0.0])
        B[o, 0] = -(1 - 2e-4) / 0.3

    base_dir, adapter_dir, base, merged = _oracle_case(tmp_path, model, HiraConfig(r=3, target_modules=[
        "conv3d", "lin0"]), edit=nearly_minus_one)
    _unmerge(tmp_path, adapter_dir)
    assert_close_to(load_all(tmp_path / "unmerged"), base, rel=1e-5, base=merged, ulps=2)


def test_hira_unmerge_refused_where_one_plus_ba_is_zero(tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj"

    def make_minus_one(t):  # (B A)[0, 0] = -1 exactly
        A, B = t[f"{key}.hira_A"], t[f"{key}.hira_B"]
        A[:, 0] = 0
        A[0, 0] = 1
        B[0, :] = 0
        B[0, 0] = -1

    _, adapter_dir, _, merged = _oracle_case(tmp_path, tiny_llama(), HiraConfig(r=4, target_modules=["q_proj"]),
                                             edit=make_minus_one)
    assert merged["model.layers.0.self_attn.q_proj.weight"][0, 0] == 0
    with pytest.raises(NotInvertibleError, match=r"q_proj.*1 \+ hira_B·hira_A is 0 for 1 weight element"):
        _unmerge(tmp_path, adapter_dir)
    status = {m["module"]: m["unmerge"] for m in inspect(adapter_dir)["modules"]}
    assert status["model.layers.0.self_attn.q_proj"].startswith("impossible")
    assert status["model.layers.1.self_attn.q_proj"] == "exact"


# -- GLoRA -----------------------------------------------------------------------------------------

def _glora_value(saved, prefix, letter):
    """A path's value in float64 as PEFT broadcasts it (a constant is a scalar)."""
    key = f"{prefix}.glora_{letter}"
    if f"{key}.Xd" in saved:
        return saved[f"{key}.Xd"].double() @ saved[f"{key}.Xu"].double()
    X = saved.get(f"{key}.X", saved.get(f"{key}.zeros")).double()
    return X[0] if X.shape == (1,) and letter != "C" else X


def _assert_glora_bf16_like_peft(adapter_dir, base, ours, peft):
    """PEFT merges GLoRA in the base dtype: it rounds each path value to bf16, then W⊙A, then + B, then
    W + (…) (bias: D, E, C, b⊙D, + E, W·C, + …, b + (…)). Each step is off by at most half an ulp of its
    result; ours rounds once. So |ours − PEFT| is bounded by the sum of those half ulps (taken at
    1.01x the exact magnitudes, as a rounded intermediate may sit one binade higher)."""
    saved = load_file(adapter_dir / "adapter_model.safetensors")

    def h(x):
        return 0.5 * _ulp(x.abs() * 1.01, torch.bfloat16)

    checked = 0
    for name in base:
        module, _, role = name.rpartition(".")
        prefix = "base_model.model." + module
        if f"{prefix}.glora_A.Xd" not in saved and f"{prefix}.glora_A.X" not in saved or role not in ("weight", "bias"):
            assert torch.equal(ours[name], peft[name]), name
            continue
        W = base[f"{module}.weight"].double()
        A, B, C, D, E = (_glora_value(saved, prefix, x) for x in "ABCDE")
        if role == "weight":
            WA = W * A
            S = WA + B
            bound = W.abs() * h(A) + h(B) + h(WA) + h(S) + 2 * h(W + S)
        else:
            b = base[name].double()
            WC = (W @ C).squeeze(-1)
            T1 = b * D + E
            T2 = T1 + WC
            bound = b.abs() * h(D) + h(b * D) + h(E) + h(T1) + (W.abs() @ h(C)).squeeze(-1) + h(WC) + h(T2) \
                + 2 * h(b + T2)
        err = (ours[name].double() - peft[name].double()).abs()
        worst = (err / bound).max().item()
        assert worst <= 1.0, f"{name}: {worst:.2f} x PEFT's own bf16 rounding bound"
        checked += 1
    assert checked


def _glora_bf16_case(tmp_path, model, cfg):
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    peft = oracle_merge(reload(model, base_dir, torch.bfloat16), adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    base, merged = load_all(base_dir), load_all(tmp_path / "merged")
    _assert_glora_bf16_like_peft(adapter_dir, base, merged, peft)
    _unmerge(tmp_path, adapter_dir)
    # W = (W' − B)/(1 + A): the rounding of W' divided by |1 + A|, plus our own rounding.
    assert_close_to(load_all(tmp_path / "unmerged"), base, base=merged, ulps=2)
    return adapter_dir


@DTYPES
def test_glora_llama_without_biases(tmp_path, dtype):
    # The default paths (A/B lora, C lora, D/E constant); Llama has no biases, so PEFT saves C/D/E
    # as zero buffers and the biases do not exist.
    cfg = GloraConfig(r=3, target_modules=LLAMA_LINEAR)
    if dtype == torch.float32:
        _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    else:
        adapter_dir = _glora_bf16_case(tmp_path, tiny_llama(dtype), cfg)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.mlp.down_proj.glora_C.zeros"].shape == (48, 1)


GLORA_VARIANTS = [  # (config_A_B, config_C, config_D_E): every storage kind of every path, with a bias
    ("lora", "lora", "constant"),
    ("vector", "vector", "vector"),
    ("constant", "none", "constant"),
    ("none", "lora", "none"),
]


@pytest.mark.parametrize("paths", GLORA_VARIANTS, ids=["-".join(v) for v in GLORA_VARIANTS])
def test_glora_bert_with_biases(tmp_path, paths):
    ab, c, de = paths
    cfg = GloraConfig(r=3, config_A_B=ab, config_C=c, config_D_E=de, target_modules=["query", "value", "dense"])
    model = with_random_biases(tiny_bert())
    if ab != "none":
        run_case(tmp_path, model, cfg)
    else:
        # W is read for the bias term W·C but not changed; the engine has no read-only role, so it
        # rewrites W unchanged and counts it as changed, which run_case's count check would flag.
        _, adapter_dir, base, merged = _oracle_case(tmp_path, model, cfg)
        weight = "encoder.layer.0.attention.self.query.weight"
        assert torch.equal(merged[weight], base[weight])
        _unmerge(tmp_path, adapter_dir)
        assert_close_to(load_all(tmp_path / "unmerged"), base, base=merged, ulps=2)
    merged, base = load_all(tmp_path / "merged"), load_all(tmp_path / "base")
    bias = "encoder.layer.0.attention.self.query.bias"
    assert torch.equal(merged[bias], base[bias]) == (c == "none" and de == "none")


def test_glora_bert_bf16(tmp_path):
    cfg = GloraConfig(r=3, config_A_B="lora", config_C="lora", config_D_E="vector",
                      target_modules=["query", "value", "dense"])
    _glora_bf16_case(tmp_path, with_random_biases(tiny_bert(torch.bfloat16)), cfg)


def test_glora_unmerge_refused_where_one_plus_a_is_zero(tmp_path):
    def constant_minus_one(t):
        t["base_model.model.encoder.layer.1.attention.self.value.glora_A.X"].fill_(-1)

    cfg = GloraConfig(config_A_B="constant", config_C="vector", config_D_E="vector", target_modules=["value"])
    _, adapter_dir, _, _ = _oracle_case(tmp_path, with_random_biases(tiny_bert()), cfg, edit=constant_minus_one)
    with pytest.raises(NotInvertibleError, match=r"layer\.1\.attention\.self\.value.*1 \+ glora_A \(a constant\) is 0"):
        _unmerge(tmp_path, adapter_dir)


def test_glora_trained_bias_paths_need_a_base_bias(tmp_path):
    model = with_random_biases(tiny_bert())
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, GloraConfig(target_modules=["query"]), tmp_path / "adapter")
    files = load_all(base_dir)
    del files["encoder.layer.0.attention.self.query.bias"]
    save_file(files, base_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"query\.bias"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


def test_glora_saved_path_must_match_config(tmp_path):
    model = tiny_llama()
    adapter_dir = make_adapter(model, GloraConfig(target_modules=["q_proj"]), tmp_path / "adapter")
    edit_adapter_config(adapter_dir, config_A_B="vector")
    with pytest.raises(InputError, match=r"glora_A\.Xd.*config_A_B is 'vector'"):
        wsurgery.merge(save_base(model, tmp_path / "base"), adapter_dir, tmp_path / "merged", progress=False)


# -- DEFT ------------------------------------------------------------------------------------------

_BITS = {torch.float32: (23, -126), torch.bfloat16: (7, -126), torch.float16: (10, -14)}


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits, min_exp = _BITS[dtype]
    e = torch.floor(torch.log2(x.double().abs().clamp_min(2.0 ** min_exp))).clamp_min(min_exp)
    return torch.pow(2.0, e - bits)


def _assert_deft_roundtrip(adapter_dir, base, merged, unmerged, scaling=1.0, transposed=False):
    """W = T W' with T = (I − P Gᵀ)⁻¹ exactly (G = relu(P)). The merged file is off from the exact
    W + P(sR − GᵀW) by its rounding (½ulp(W')) and by float32 arithmetic in the merge (dot products of
    length n: at most n·2⁻²⁴ of |P|(|sR| + |G|ᵀ|W|)); both come back multiplied by T. Our unmerge adds
    one rounding of ΔW and one of W."""
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    checked = 0
    for name, want in base.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        if prefix + ".deft_P" not in saved:
            assert torch.equal(unmerged[name], want), f"{name}: an untouched tensor changed"
            continue
        P = saved[prefix + ".deft_P"].double()
        G = torch.relu(P)
        R = saved.get(prefix + ".deft_R")
        sR = torch.zeros(P.shape[1], 1, dtype=torch.float64) if R is None else R.double().abs() * scaling
        T = torch.linalg.inv(torch.eye(P.shape[0], dtype=torch.float64) - P @ G.T).abs()
        W, Wm, got = (x.double().T if transposed else x.double() for x in (want, merged[name], unmerged[name]))
        arithmetic = (P.shape[0] + P.shape[1] + 2) * 2.0 ** -24 * (P.abs() @ (sR + G.T @ W.abs()))
        e = 0.5 * _ulp(Wm, want.dtype) + arithmetic
        bound = (T @ e + e) * 1.001 + _ulp(W, want.dtype)
        worst = ((got - W).abs() / bound).max().item()
        assert worst <= 1.0, f"{name}: unmerge error {worst:.2f} x the propagated rounding bound"
        checked += 1
    assert checked


DEFT_VARIANTS = {
    "relu": {},
    "relu-alpha-rank-capped": {"r": 20, "alpha": 10},  # k/v_proj have out=16: r is capped, alpha/16
    "relu-para": {"para": True},
    "qr-alpha": {"decomposition_method": "qr", "alpha": 6},
    "qr-para": {"decomposition_method": "qr", "para": True},
}


# The largest injection scaling alpha/r of each variant (a bound for every module; 1 without alpha).
_ALPHA_MAX = {"relu": 1.0, "relu-alpha-rank-capped": 10 / 16, "relu-para": 1.0}


DEFT_CASES = [("relu", torch.float32), ("relu", torch.bfloat16), ("relu-alpha-rank-capped", torch.float32),
              ("relu-para", torch.float32), ("qr-alpha", torch.float32), ("qr-alpha", torch.bfloat16),
              ("qr-para", torch.float32)]


@pytest.mark.parametrize(("variant", "dtype"), DEFT_CASES, ids=[f"{v}-{str(d)[6:]}" for v, d in DEFT_CASES])
def test_deft_llama(tmp_path, variant, dtype):
    cfg = DeftConfig(**{"r": 3, **DEFT_VARIANTS[variant]}, target_modules=LLAMA_LINEAR)
    _, adapter_dir, base, merged = _oracle_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    if variant.startswith("qr"):
        with pytest.raises(NotInvertibleError, match=r"qr\(deft_P\).*only the base checkpoint"):
            _unmerge(tmp_path, adapter_dir)
        return
    _unmerge(tmp_path, adapter_dir)
    _assert_deft_roundtrip(adapter_dir, base, merged, load_all(tmp_path / "unmerged"), scaling=_ALPHA_MAX[variant])
    if variant == "relu-alpha-rank-capped":
        saved = load_file(adapter_dir / "adapter_model.safetensors")
        assert saved["base_model.model.model.layers.0.self_attn.k_proj.deft_P"].shape == (16, 16)


@pytest.mark.parametrize("method", ["relu", "qr"])
def test_deft_gpt2_conv1d(tmp_path, method):
    cfg = DeftConfig(r=3, alpha=4, decomposition_method=method, fan_in_fan_out=True,
                     target_modules=["c_attn", "c_proj", "c_fc"])
    _, adapter_dir, base, merged = _oracle_case(tmp_path, tiny_gpt2(), cfg)
    if method == "qr":
        with pytest.raises(NotInvertibleError):
            _unmerge(tmp_path, adapter_dir)
        return
    _unmerge(tmp_path, adapter_dir)
    _assert_deft_roundtrip(adapter_dir, base, merged, load_all(tmp_path / "unmerged"), scaling=4 / 3,
                           transposed=True)


def test_deft_para_with_saved_injection_is_refused(tmp_path):
    model = tiny_llama()
    adapter_dir = make_adapter(model, DeftConfig(r=2, target_modules=["q_proj"]), tmp_path / "adapter")
    edit_adapter_config(adapter_dir, para=True)
    with pytest.raises(InputError, match=r"deft_R.*para=true"):
        wsurgery.merge(save_base(model, tmp_path / "base"), adapter_dir, tmp_path / "merged", progress=False)


# -- PEANuT ----------------------------------------------------------------------------------------

PEANUT_VARIANTS = {
    "relu-depth2": {"depth": 2},
    "gelu_new-depth1-scaled": {"depth": 1, "act_fn": "gelu_new", "scaling": 0.5},
    "silu-depth0": {"depth": 0, "act_fn": "silu", "scaling": 2.0},
}


PEANUT_CASES = [("relu-depth2", torch.float32), ("relu-depth2", torch.bfloat16),
                ("gelu_new-depth1-scaled", torch.float32), ("silu-depth0", torch.bfloat16)]


@pytest.mark.parametrize(("variant", "dtype"), PEANUT_CASES, ids=[f"{v}-{str(d)[6:]}" for v, d in PEANUT_CASES])
def test_peanut_llama(tmp_path, variant, dtype):
    cfg = PeanutConfig(r=4, **PEANUT_VARIANTS[variant], target_modules=LLAMA_LINEAR)
    _, adapter_dir, _, _ = _oracle_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    with pytest.raises(NotInvertibleError, match=r"non-linear function of the base weight"):
        _unmerge(tmp_path, adapter_dir)


def test_peanut_unknown_activation_and_depth_mismatch_are_refused(tmp_path):
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, PeanutConfig(r=2, depth=1, target_modules=["q_proj"]), tmp_path / "adapter")
    edit_adapter_config(adapter_dir, act_fn="xielu")
    with pytest.raises(UnsupportedError, match="xielu"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    edit_adapter_config(adapter_dir, act_fn="relu", depth=0)
    with pytest.raises(InputError, match=r"peanut_encoders\.0\.weight.*depth is 0"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


def test_peanut_activations_are_transformers_own():
    from transformers.activations import ACT2FN

    from wsurgery.methods.peanut import ACTIVATIONS

    x = torch.linspace(-12, 12, 2001)
    assert set(ACTIVATIONS) == set(ACT2FN) - {"xielu"}
    for name, fn in ACTIVATIONS.items():
        assert torch.equal(fn(x), ACT2FN[name](x)), name
