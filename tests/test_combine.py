"""``combine`` (one LoRA whose change is the weighted sum of several adapters' changes) and ``merge`` with
several adapters.

The judge is PEFT: each input adapter merged on its own by ``merge_and_unload`` gives its change ΔWᵢ,
and the combined adapter, loaded and merged by PEFT, must give Σ wᵢ·ΔWᵢ. Weights other than 1 are
given to PEFT by scaling the adapter's ``lora_alpha`` in a copy of its config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from oracle import assert_close_to, edit_adapter_config, load_all, make_adapter, oracle_merge, save_base, tiny_gpt2, \
    tiny_llama, with_random_biases
from oracle import run_cli

import wsurgery
from wsurgery.convert.combine import adapter_with_weight
from wsurgery.errors import InputError, UnsupportedError


def fresh(base_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def peft_change(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW of one adapter as PEFT merges it (float64), on every tensor it changes."""
    merged = oracle_merge(fresh(base_dir), adapter)
    base = load_all(base_dir)
    return {k: merged[k].double() - base[k].double() for k in base if not torch.equal(merged[k], base[k])}


def expected_sum(base_dir: Path, weighted: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """W + Σ wᵢ·ΔWᵢ on the base's tensors, float32."""
    total = {k: v.double() for k, v in load_all(base_dir).items()}
    for adapter, w in weighted:
        for k, d in peft_change(base_dir, adapter).items():
            total[k] += w * d
    return {k: v.float() for k, v in total.items()}


def peft_merge_of(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    base = load_all(base_dir)
    merged = oracle_merge(fresh(base_dir), adapter)
    return {k: merged[k] for k in base}


def scaled_copy(adapter: Path, weight: float, dst: Path) -> Path:
    """The same LoRA with its change times ``weight`` (lora_alpha and alpha_pattern scaled), for PEFT."""
    shutil.copytree(adapter, dst)
    config = json.loads((adapter / "adapter_config.json").read_text())
    edit_adapter_config(dst, lora_alpha=config["lora_alpha"] * weight,
                        alpha_pattern={k: v * weight for k, v in (config.get("alpha_pattern") or {}).items()})
    return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft import LoHaConfig, LoraConfig

    root = tmp_path_factory.mktemp("combine")
    model = tiny_llama(seed=11)
    base = save_base(model, root / "base")
    make = lambda config, name, seed: make_adapter(model, config, root / name, seed=seed)  # noqa: E731
    return SimpleNamespace(
        root=root, model=model, base=base,
        a1=make(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), "a1", 1),
        a2=make(LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj"],
                           rank_pattern={"k_proj": 3}, alpha_pattern={"k_proj": 5}), "a2", 2),
        emb=make(LoraConfig(r=2, lora_alpha=3, target_modules=["embed_tokens", "o_proj"]), "emb", 3),
        loha=make(LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj"]), "loha", 4),
        dora=make(LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["v_proj"]), "dora", 5),
        saver=make(LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["model.norm"]), "saver", 6),
    )


# -- combine: LoRAs, exact ------------------------------------------------------------------------------

def test_combined_loras_merge_to_the_weighted_sum_of_their_changes(env, tmp_path):
    """rsLoRA, rank and alpha patterns, an embedding LoRA, a weight: PEFT's merge of the result is
    W + ΔW₁ + 0.5·ΔW₂ + ΔW₃ (1e-5), with the rank the sum of the ranks."""
    result = wsurgery.combine(tmp_path / "out", [env.a1, (env.a2, 0.5), env.emb], progress=False)
    expected = expected_sum(env.base, [(env.a1, 1.0), (env.a2, 0.5), (env.emb, 1.0)])
    assert_close_to(peft_merge_of(env.base, tmp_path / "out"), expected, rel=1e-5)
    ranks = {m.module: m.rank for m in result.modules}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 + 2 and ranks["model.layers.0.self_attn.k_proj"] == 3
    assert {m.how for m in result.modules} == {"concatenated"}
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["rank_pattern"] == config["alpha_pattern"]


def test_peft_linear_combination_is_not_a_sum_of_changes_but_ours_is(env, tmp_path):
    """PEFT's add_weighted_adapter 'linear' mixes A and B separately (cross terms Bᵢ·Aⱼ); 'cat' and ours sum."""
    from peft import LoraConfig, PeftModel

    b1 = make_adapter(env.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "b1", 7)
    b2 = make_adapter(env.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "b2", 8)
    expected = expected_sum(env.base, [(b1, 1.0), (b2, 1.0)])
    base = load_all(env.base)

    def peft_combined(kind: str) -> dict[str, torch.Tensor]:
        model = PeftModel.from_pretrained(fresh(env.base), b1, adapter_name="b1")
        model.load_adapter(b2, adapter_name="b2")
        model.add_weighted_adapter(["b1", "b2"], [1.0, 1.0], "mix", combination_type=kind)
        model.set_adapter("mix")
        merged = model.merge_and_unload(adapter_names=["mix"]).state_dict()
        return {k: merged[k] for k in base}

    name = "model.layers.0.self_attn.q_proj.weight"
    want = expected[name].double() - base[name].double()
    linear = peft_combined("linear")[name].double() - base[name].double()
    assert torch.linalg.norm(linear - want) > 0.1 * torch.linalg.norm(want)
    wsurgery.combine(tmp_path / "ours", [b1, b2], progress=False)
    ours = peft_merge_of(env.base, tmp_path / "ours")
    assert_close_to(ours, expected, rel=1e-5)
    assert_close_to(ours, peft_combined("cat"), rel=1e-5)


def test_gpt2_conv1d_loras_combine_exactly(tmp_path):
    from peft import LoraConfig
    from transformers import GPT2LMHeadModel

    model = with_random_biases(tiny_gpt2(seed=3))
    base = save_base(model, tmp_path / "base")
    c1 = make_adapter(model, LoraConfig(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), tmp_path / "c1",
                      1)
    c2 = make_adapter(model, LoraConfig(r=3, target_modules=["c_attn", "wte"], fan_in_fan_out=True), tmp_path / "c2", 2)
    wsurgery.combine(tmp_path / "out", [(c1, -1.0), c2], progress=False)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"]

    def merged_with(adapter: Path) -> dict[str, torch.Tensor]:
        return oracle_merge(GPT2LMHeadModel.from_pretrained(base, dtype=torch.float32), adapter)

    state = load_all(base)
    want = {k: state[k].double() for k in state}
    for adapter, w in ((c1, -1.0), (c2, 1.0)):
        merged = merged_with(adapter)
        for k in state:
            want[k] += w * (merged[k].double() - state[k].double())
    got = merged_with(tmp_path / "out")
    assert_close_to({k: got[k] for k in state}, {k: v.float() for k, v in want.items()}, rel=1e-5)


# -- combine: re-compression and other methods -------------------------------------------------------

def test_rank_recompresses_to_the_eckart_young_optimum_of_the_sum(env, tmp_path):
    result = wsurgery.combine(tmp_path / "out", [env.a1, env.a2], rank=3, progress=False)
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    exact = {k: v for k, v in expected_sum(env.base, [(env.a1, 1.0), (env.a2, 1.0)]).items()}
    base = load_all(env.base)
    for m in result.modules:
        want = exact[m.module + ".weight"].double().numpy() - base[m.module + ".weight"].double().numpy()
        ours = (tensors[f"base_model.model.{m.module}.lora_B.weight"].double().numpy()
                @ tensors[f"base_model.model.{m.module}.lora_A.weight"].double().numpy())
        sigma = np.linalg.svd(want, compute_uv=False)
        assert m.rank == min(3, int((sigma > 1e-5 * sigma[0]).sum()))
        assert float(((want - ours) ** 2).sum()) == pytest.approx(float((sigma[m.rank:] ** 2).sum()), rel=1e-4,
                                                                  abs=1e-10)
        assert m.how == ("recompressed" if "q_proj" in m.module or "v_proj" in m.module or "down" in m.module
                         else "concatenated")
    peft = peft_merge_of(env.base, tmp_path / "out")  # PEFT loads the per-module ranks
    assert set(peft) == set(base)


def test_non_lora_changes_need_rank_and_are_exact_at_their_rank(env, tmp_path):
    """LoHa (rank <= r² = 4) plus a rank-4 LoRA: --rank 8 holds the sum exactly (the base gives LoHa its shapes)."""
    with pytest.raises(InputError, match=r"LOHA\) at .*q_proj: not a plain LoRA.*give --rank"):
        wsurgery.combine(tmp_path / "out", [env.a1, env.loha], progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match=r"LOHA\) at .*q_proj: not a plain LoRA; .* computed from the base.*--base"):
        wsurgery.combine(tmp_path / "out", [env.a1, env.loha], rank=8, progress=False)
    result = wsurgery.combine(tmp_path / "out", [env.a1, (env.loha, 2.0)], rank=8, base=env.base, progress=False)
    assert {m.how for m in result.modules if "q_proj" in m.module or "up_proj" in m.module} == \
        {"svd of the summed change"}
    assert max(m.rel_error for m in result.modules) < 1e-5
    expected = expected_sum(env.base, [(env.a1, 1.0), (env.loha, 2.0)])
    assert_close_to(peft_merge_of(env.base, tmp_path / "out"), expected, rel=1e-5)


def test_a_change_that_depends_on_w_needs_the_base(env, tmp_path):
    with pytest.raises(InputError, match=r"LORA\) at .*v_proj: not a plain LoRA.*pass --base"):
        wsurgery.combine(tmp_path / "out", [env.a1, env.dora], rank=32, progress=False)
    wsurgery.combine(tmp_path / "out", [env.a1, env.dora], rank=32, base=env.base, progress=False)
    expected = expected_sum(env.base, [(env.a1, 1.0), (env.dora, 1.0)])
    assert_close_to(peft_merge_of(env.base, tmp_path / "out"), expected, rel=1e-5)


def test_modules_to_save_pass_through_alone_and_are_refused_when_mixed(env, tmp_path):
    wsurgery.combine(tmp_path / "out", [env.a1, env.saver], progress=False)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["modules_to_save"] == ["model.norm"]
    expected = expected_sum(env.base, [(env.a1, 1.0), (env.saver, 1.0)])
    assert_close_to(peft_merge_of(env.base, tmp_path / "out"), expected, rel=1e-5)
    with pytest.raises(UnsupportedError, match="replaces tensors outright"):
        wsurgery.combine(tmp_path / "out2", [env.a1, (env.saver, 0.5)], progress=False)


def test_lora_bias_mixed_with_plain_lora_is_refused(env, tmp_path):
    from peft import LoraConfig

    biased = make_adapter(with_random_biases(tiny_gpt2()), LoraConfig(r=2, target_modules=["c_attn"],
                                                                      fan_in_fan_out=True, lora_bias=True),
                          tmp_path / "biased")
    with pytest.raises(UnsupportedError, match="some adapters have lora_bias and some do not"):
        wsurgery.combine(tmp_path / "out", [env.a1, biased], progress=False)


# -- merge with several adapters ---------------------------------------------------------------------

def test_merge_applies_several_adapters_in_order_like_peft_one_by_one(env, tmp_path):
    """LoRA, a LoRA at weight 0.5, then OFT (multiplicative: order matters); PEFT merges them one by one."""
    from peft import OFTConfig, PeftModel

    oft = make_adapter(env.model, OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj", "o_proj"]),
                       tmp_path / "oft", seed=9)
    half = scaled_copy(env.a2, 0.5, tmp_path / "a2-half")
    model = fresh(env.base)
    for adapter in (env.a1, half, oft):
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    state = model.state_dict()
    base = load_all(env.base)
    expected = {k: state[k] for k in base}
    wsurgery.merge(env.base, [env.a1, (env.a2, 0.5), oft], tmp_path / "merged", progress=False)
    assert_close_to(load_all(tmp_path / "merged"), expected, rel=1e-5)


def test_merge_single_adapter_and_weighted_pair_calls_still_work(env, tmp_path):
    wsurgery.merge(env.base, (env.a1, 0.5), tmp_path / "pair", progress=False)
    assert_close_to(load_all(tmp_path / "pair"), expected_sum(env.base, [(env.a1, 0.5)]), rel=1e-5)
    wsurgery.merge(env.base, env.a1, tmp_path / "single", progress=False)
    assert_close_to(load_all(tmp_path / "single"), peft_merge_of(env.base, env.a1), rel=1e-5)


# -- the command line ----------------------------------------------------------------------------------

def test_cli_merge_and_combine_take_weighted_adapters(env, tmp_path, capsys):
    expected = expected_sum(env.base, [(env.a1, 1.0), (env.a2, 0.5)])
    code, _, err = run_cli(["merge", env.base, env.a1, f"{env.a2}:0.5", tmp_path / "merged", "-q"], capsys)
    assert code == 0, err
    assert_close_to(load_all(tmp_path / "merged"), expected, rel=1e-5)
    code, out, err = run_cli(["combine", tmp_path / "combined", env.a1, f"{env.a2}:0.5"], capsys)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["module", "kind", "rank", "how", "rel_error"]
    assert err.strip().endswith(f"wrote {tmp_path / 'combined'}")
    assert_close_to(peft_merge_of(env.base, tmp_path / "combined"), expected, rel=1e-5)
    code, out, err = run_cli(["combine", tmp_path / "bad", env.a1, env.loha], capsys)
    assert code == 1 and err.count("\n") == 1 and "give --rank" in err


def test_weight_suffix_is_parsed_only_after_an_existing_path_or_a_repo_id(tmp_path):
    odd = tmp_path / "run:2"
    odd.mkdir()
    plain = tmp_path / "lora"
    plain.mkdir()
    assert adapter_with_weight(f"{plain}:0.5") == (str(plain), 0.5)
    assert adapter_with_weight(f"{plain}:-2e-1") == (str(plain), -0.2)
    assert adapter_with_weight(str(odd)) == (str(odd), 1.0)  # an existing path with a ':' in its name
    assert adapter_with_weight(f"{odd}:3") == (str(odd), 3.0)
    assert adapter_with_weight(f"{tmp_path}/missing:0.5") == (f"{tmp_path}/missing:0.5", 1.0)
    assert adapter_with_weight("org/some-lora:0.25") == ("org/some-lora", 0.25)
    for weight in ("abc", "nan", "inf", "1e999"):  # after an existing adapter, a weight that is not a number
        with pytest.raises(InputError, match=f"weight '{weight}' is not a finite number; give ADAPTER:WEIGHT"):
            adapter_with_weight(f"{plain}:{weight}")
