"""FourierFT, WaveFT and Poly against PEFT 0.21.2 on tiny real models.

FourierFT and WaveFT: PEFT's ``merge_and_unload()`` is the oracle. Their spectral positions are never
saved, so every merge here regenerates them from ``random_loc_seed``; a wrong seed must give a
wrong merge. The spectra are random and non-zero (``init_weights=False`` plus noise).

Poly has no PEFT merge. The oracle is PEFT's own forward: the Poly model run with ``task_ids=N`` in
eval mode must give the same logits as a plain forward of the base merged with ``--task-id N``, and
each module's change must equal PEFT's forward difference ``layer(I) - base_layer(I)`` (= ΔWᵀ).
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
    load_all,
    make_adapter,
    oracle_merge,
    reload,
    run_case,
    save_base,
    tiny_gpt2,
    tiny_llama,
)
from peft import FourierFTConfig, PeftModel, PolyConfig, WaveFTConfig
from safetensors.torch import load_file, save_file

import wsurgery
from wsurgery.adapters import load_adapter
from wsurgery.cli import main
from wsurgery.errors import InputError, UnsupportedError

DTYPES = dtypes_fp32_bf16()


def _edit_config(adapter_dir, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _merge_vs_oracle(tmp_path, model, config, dtype=torch.float32):
    """Save base + random adapter; return (base_dir, adapter_dir, PEFT's merge, base tensors)."""
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, config, tmp_path / "adapter")
    expected = oracle_merge(reload(model, base_dir, dtype), adapter_dir)
    return base_dir, adapter_dir, expected, load_all(base_dir)


def _assert_wrong_seed_mismatches(tmp_path, base_dir, adapter_dir, expected, base):
    """With another random_loc_seed the regenerated positions differ, and so does the merge."""
    _edit_config(adapter_dir, random_loc_seed=json.loads((adapter_dir / "adapter_config.json").read_text())
                 ["random_loc_seed"] + 1)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "wrong_seed", progress=False)
    wrong = load_all(tmp_path / "wrong_seed")
    with pytest.raises(AssertionError):
        assert_close_to(wrong, expected, base=base)
    changed = [n for n in wrong if not torch.equal(expected[n], base[n])]
    assert changed
    for name in changed:  # not a rounding matter: the changes land elsewhere
        err = (wrong[name].double() - expected[name].double()).abs().max()
        assert err > 0.1 * (expected[name].double() - base[name].double()).abs().max(), name


# -- FourierFT ----------------------------------------------------------------------------------------------------

@DTYPES
def test_fourierft_llama_all_linear_with_pattern(tmp_path, dtype):
    # FourierFT's pattern rule is re.match(rf".*\.{key}$"): a key anchored at the start of the path
    # (the second one) never matches, so layers.1 down_proj keeps the default n_frequency.
    cfg = FourierFTConfig(n_frequency=40, scaling=60.0, random_loc_seed=123, target_modules=LLAMA_LINEAR,
                          init_weights=False,
                          n_frequency_pattern={"q_proj": 70, r"model\.layers\.1\..*down_proj": 90})
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.fourierft_spectrum"].numel() == 70
    assert saved["base_model.model.model.layers.1.mlp.down_proj.fourierft_spectrum"].numel() == 40


def test_fourierft_gpt2_conv1d(tmp_path):
    cfg = FourierFTConfig(n_frequency=60, scaling=40.0, target_modules=["c_attn", "c_fc", "c_proj"],
                          fan_in_fan_out=True, init_weights=False)
    run_case(tmp_path, tiny_gpt2(), cfg)


def test_fourierft_bf16_adapter_on_bf16_base(tmp_path):
    cfg = FourierFTConfig(n_frequency=50, scaling=30.0, target_modules=["q_proj", "up_proj"], init_weights=False)
    run_case(tmp_path, tiny_llama(torch.bfloat16), cfg, dtype=torch.bfloat16, adapter_dtype=torch.bfloat16)


def test_fourierft_wrong_seed_mismatches(tmp_path):
    cfg = FourierFTConfig(n_frequency=50, scaling=30.0, random_loc_seed=5, target_modules=["q_proj", "down_proj"],
                          init_weights=False)
    base_dir, adapter_dir, expected, base = _merge_vs_oracle(tmp_path, tiny_llama(), cfg)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert_close_to(load_all(tmp_path / "merged"), expected, base=base)
    _assert_wrong_seed_mismatches(tmp_path, base_dir, adapter_dir, expected, base)


def test_fourierft_refuses_spectrum_that_disagrees_with_config(tmp_path):
    cfg = FourierFTConfig(n_frequency=30, target_modules=["q_proj"], init_weights=False)
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    adapter_dir = make_adapter(tiny_llama(), cfg, tmp_path / "adapter")
    _edit_config(adapter_dir, n_frequency=31)
    with pytest.raises(InputError, match=r"q_proj.*30 entries.*give 31"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    # a spectrum longer than the layer has positions (as if trained on a larger model)
    _edit_config(adapter_dir, n_frequency=32 * 16 + 1)
    path = adapter_dir / "adapter_model.safetensors"
    tensors = {k: torch.randn(32 * 16 + 1) if "k_proj" not in k else v for k, v in load_file(path).items()}
    tensors = {k.replace("q_proj", "k_proj"): v for k, v in tensors.items()}  # k_proj is (16, 32)
    save_file(tensors, path)
    with pytest.raises(InputError, match=r"k_proj: the spectrum has 513 entries .* only 512 positions"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


# -- WaveFT ---------------------------------------------------------------------------------------------------------

@DTYPES
def test_waveft_llama_db1_all_linear(tmp_path, dtype):
    cfg = WaveFTConfig(n_frequency=48, scaling=4.0, random_loc_seed=11, target_modules=LLAMA_LINEAR,
                       init_weights=False, n_frequency_pattern={"v_proj": 20})
    run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)


@pytest.mark.parametrize("family", ["db2", "sym3", "coif1", "db10"])
def test_waveft_other_families_odd_and_conv1d_shapes(tmp_path, family):
    # conv_net.fc is (7, 12): odd out, padded to even around the centre; GPT-2 Conv1D stores (in, out).
    cfg = WaveFTConfig(n_frequency=30, scaling=3.0, wavelet_family=family, target_modules=["fc"], init_weights=False)
    run_case(tmp_path / "fc", conv_net(), cfg)
    cfg = WaveFTConfig(n_frequency=60, scaling=3.0, wavelet_family=family, target_modules=["c_attn", "c_proj"],
                       fan_in_fan_out=True, init_weights=False)
    run_case(tmp_path / "gpt2", tiny_gpt2(), cfg)


def test_waveft_without_idwt_and_proportional_parameters(tmp_path):
    cfg = WaveFTConfig(n_frequency=40, scaling=2.0, use_idwt=False, proportional_parameters=True,
                       target_modules=["q_proj", "k_proj", "up_proj"], init_weights=False)
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(), cfg)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    sizes = {saved[f"base_model.model.model.layers.0.{m}.waveft_spectrum"].numel()
             for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")}
    assert len(sizes) == 3  # really spread by layer size, so the config's n_frequency is not what was used


def test_waveft_bf16_adapter_on_bf16_base(tmp_path):
    cfg = WaveFTConfig(n_frequency=50, scaling=4.0, target_modules=["o_proj", "gate_proj"], init_weights=False)
    run_case(tmp_path, tiny_llama(torch.bfloat16), cfg, dtype=torch.bfloat16, adapter_dtype=torch.bfloat16)


def test_waveft_wrong_seed_mismatches(tmp_path):
    cfg = WaveFTConfig(n_frequency=50, scaling=4.0, wavelet_family="db2", target_modules=["q_proj", "down_proj"],
                       init_weights=False)
    base_dir, adapter_dir, expected, base = _merge_vs_oracle(tmp_path, tiny_llama(), cfg)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert_close_to(load_all(tmp_path / "merged"), expected, base=base)
    _assert_wrong_seed_mismatches(tmp_path, base_dir, adapter_dir, expected, base)


@pytest.mark.parametrize("family, words, peft_error", [("coif5", "48 taps but its padding assumes 30", RuntimeError),
                                                       ("db11", "has no filter taps for it", ValueError)])
def test_waveft_refuses_families_peft_cannot_run(tmp_path, capsys, family, words, peft_error):
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    cfg = WaveFTConfig(n_frequency=20, wavelet_family=family, target_modules=["q_proj"], init_weights=False)
    adapter_dir = make_adapter(tiny_llama(), cfg, tmp_path / "adapter")
    with pytest.raises(peft_error):  # PEFT itself cannot merge it
        oracle_merge(reload(tiny_llama(), base_dir, torch.float32), adapter_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["merge", "-q", str(base_dir), str(adapter_dir), str(tmp_path / "out")])
    assert e.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and family in lines[0], lines
    assert not (tmp_path / "out").exists()


# -- Poly -------------------------------------------------------------------------------------------------------

N_TASKS = 3
IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=[1, 2], ids=["poly", "mhr_2_splits"])
def poly(request, tmp_path_factory):
    """A saved base and a random Poly adapter (3 tasks, 4 skills), and PEFT's Poly model in eval mode."""
    tmp = tmp_path_factory.mktemp("poly")
    model = tiny_llama()
    base_dir = save_base(model, tmp / "base")
    cfg = PolyConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], r=3,
                     n_tasks=N_TASKS, n_skills=4, n_splits=request.param)
    adapter_dir = make_adapter(model, cfg, tmp / "adapter")
    peft_model = PeftModel.from_pretrained(reload(model, base_dir, torch.float32), adapter_dir).eval()
    with torch.no_grad():
        peft_model.plain_logits = reload(model, base_dir, torch.float32).eval()(input_ids=IDS).logits
    return tmp, base_dir, adapter_dir, peft_model


def _peft_poly_deltas(peft_model, task: int) -> dict[str, torch.Tensor]:
    """ΔW (out, in) of every Poly layer from PEFT's forward: layer(I) - base_layer(I) = ΔWᵀ."""
    deltas = {}
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "poly_lora_A"):
                eye = torch.eye(module.in_features)[None]
                diff = module(eye, task_ids=torch.tensor([task])) - module.base_layer(eye)
                deltas[f"{name}.weight"] = diff[0].T
    return deltas


@pytest.mark.parametrize("task", range(N_TASKS))
def test_poly_task_merge_matches_peft_forward(poly, task):
    tmp, base_dir, adapter_dir, peft_model = poly
    out = tmp / f"merged_{task}"
    result = wsurgery.merge(base_dir, adapter_dir, out, progress=False, options={"task_id": task})
    base, merged = load_all(base_dir), load_all(out)
    deltas = _peft_poly_deltas(peft_model, task)
    assert len(deltas) == 8 and result.changed_tensors == 8
    # per module: our change == PEFT's routed change for this task (fp32, tight)
    for patch in load_adapter(adapter_dir, {"task_id": task}).method_patches:
        name = f"{patch.module}.weight"
        patch.check({"weight": tuple(base[name].shape)})
        ours, theirs = patch.delta()["weight"], deltas[name]
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max(), name
        assert theirs.abs().max() > 1e-2  # a real change, not PEFT's zero init
    # the merged checkpoint == base + PEFT's ΔW; everything else untouched
    assert_close_to(merged, {n: base[n] + deltas[n] if n in deltas else base[n] for n in base})
    assert {n for n in merged if not torch.equal(merged[n], base[n])} == set(deltas)
    # logits: PEFT's Poly forward for this task == a plain forward of the merged base
    with torch.no_grad():
        want = peft_model(input_ids=IDS, task_ids=torch.full((len(IDS),), task)).logits
        got = reload(tiny_llama(), out, torch.float32).eval()(input_ids=IDS).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (peft_model.plain_logits - want).abs().max() > 100 * (got - want).abs().max()  # the adapter matters
    # unmerge with the same task gives the base back
    wsurgery.unmerge(out, adapter_dir, tmp / f"unmerged_{task}", progress=False, options={"task_id": task})
    assert_close_to(load_all(tmp / f"unmerged_{task}"), base)


def test_poly_tasks_differ_and_unmerge_needs_the_same_task(poly):
    tmp, base_dir, adapter_dir, _ = poly
    wsurgery.merge(base_dir, adapter_dir, tmp / "m0", progress=False, options={"task_id": 0})
    wsurgery.unmerge(tmp / "m0", adapter_dir, tmp / "u01", progress=False, options={"task_id": 1})
    base, wrong = load_all(base_dir), load_all(tmp / "u01")
    with pytest.raises(AssertionError):
        assert_close_to(wrong, base)


def test_poly_bf16_base(tmp_path, poly):
    _, _, adapter_dir, peft_model = poly
    base_dir = save_base(tiny_llama(torch.bfloat16), tmp_path / "base")
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False, options={"task_id": 2})
    base, merged = load_all(base_dir), load_all(tmp_path / "merged")
    deltas = _peft_poly_deltas(peft_model, 2)
    expected = {n: (base[n].float() + deltas[n]).to(torch.bfloat16) if n in deltas else base[n] for n in base}
    assert_close_to(merged, expected, base=base)


@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_poly_without_task_id_refuses_in_one_line(tmp_path, capsys, poly, command):
    _, base_dir, adapter_dir, _ = poly
    with pytest.raises(SystemExit) as e:
        main([command, "-q", str(base_dir), str(adapter_dir), str(tmp_path / "out")])
    assert e.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--task-id" in lines[0] and f"< {N_TASKS}" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_poly_inspect_without_and_with_task_id(poly):
    _, _, adapter_dir, peft_model = poly
    info = wsurgery.inspect(adapter_dir)
    assert info["peft_type"] == "POLY" and len(info["modules"]) == 8
    assert all(m["task_id"] == "none (pass --task-id)" and m["n_tasks"] == N_TASKS for m in info["modules"])
    patch = load_adapter(adapter_dir, {"task_id": 1}).method_patches[0]
    layer = peft_model.base_model.model.get_submodule(patch.module)
    with torch.no_grad():
        want = layer.poly_router["default"](task_ids=torch.tensor([1]), input_ids=None)[0]
    assert torch.allclose(torch.tensor(patch.describe()["mixing_weights"]), want, atol=1e-6)


def test_poly_task_id_out_of_range_and_cli_flag(tmp_path, capsys, poly):
    _, base_dir, adapter_dir, _ = poly
    for task in (N_TASKS, -1):
        with pytest.raises(InputError, match=f"has {N_TASKS} task"):
            wsurgery.merge(base_dir, adapter_dir, tmp_path / "out", progress=False, options={"task_id": task})
    main(["merge", "-q", "--task-id", "1", str(base_dir), str(adapter_dir), str(tmp_path / "cli")])
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "api", progress=False, options={"task_id": 1})
    cli, api = load_all(tmp_path / "cli"), load_all(tmp_path / "api")
    assert all(torch.equal(cli[n], api[n]) for n in api)


def test_task_id_is_refused_for_other_methods(tmp_path):
    cfg = FourierFTConfig(n_frequency=20, target_modules=["q_proj"], init_weights=False)
    base_dir = save_base(tiny_llama(), tmp_path / "base")
    adapter_dir = make_adapter(tiny_llama(), cfg, tmp_path / "adapter")
    with pytest.raises(UnsupportedError, match="task_id"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "out", progress=False, options={"task_id": 0})
