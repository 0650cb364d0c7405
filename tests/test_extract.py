"""``extract``: a LoRA from TUNED − BASE by truncated SVD.

The judges are independent of wsurgery: numpy's float64 SVD for optimality (Eckart–Young: the best
rank-r error² is the sum of the squared singular values after the r-th), PEFT's ``from_pretrained``
+ ``merge_and_unload`` for what the written adapter means, and the known deltas the tests add.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from oracle import LLAMA_LINEAR, assert_close_to, load_all, save_base, tiny_gpt2, tiny_llama, with_random_biases

import wsurgery
from oracle import run_cli
from wsurgery.convert.extract import RankRule, truncated_svd
from wsurgery.errors import InputError, UnsupportedError


def low_rank(shape, rank, gen, scale=0.1) -> torch.Tensor:
    return (torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen)) * scale


def tuned_copy(model, edit, seed=5):
    """A copy of ``model`` whose parameters ``edit(name, param, generator)`` changed in place."""
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            edit(name, p, gen)
    return tuned


def peft_merged(model_cls, base_dir: Path, adapter_dir: Path, resize: int | None = None) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    base = model_cls.from_pretrained(base_dir, dtype=torch.float32)
    if resize is not None:
        base.resize_token_embeddings(resize)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def on_tuned_keys(merged: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: merged[k] for k in tuned}


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def config_of(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def product(tensors: dict[str, torch.Tensor], module: str) -> np.ndarray:
    """B·A of one module as saved, float64."""
    p = f"base_model.model.{module}."
    if p + "lora_embedding_A" in tensors:
        return tensors[p + "lora_embedding_B"].double().numpy() @ tensors[p + "lora_embedding_A"].double().numpy()
    return tensors[p + "lora_B.weight"].double().numpy() @ tensors[p + "lora_A.weight"].double().numpy()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    model = tiny_llama(seed=3)
    return root, model, save_base(model, root / "base")


# -- optimality ---------------------------------------------------------------------------------------

def test_rank_r_error_is_the_eckart_young_optimum(llama, tmp_path):
    """Full-rank random changes: our rank-4 error² equals numpy's tail Σ_{i>=4} σ_i², module by module."""
    _, model, base_dir = llama

    def edit(name, p, gen):
        if p.ndim == 2:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)

    tuned_dir = save_base(tuned_copy(model, edit), tmp_path / "tuned")
    result = wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", rank=4, svd="exact", progress=False)
    base, tuned = load_all(base_dir), load_all(tuned_dir)
    tensors = adapter_tensors(tmp_path / "lora")
    checked = 0
    for report in result.lora:
        delta = tuned[report.module + ".weight"].double().numpy() - base[report.module + ".weight"].double().numpy()
        if report.kind == "embedding":
            delta = delta.T
        sigma = np.linalg.svd(delta, compute_uv=False)
        tail = float((sigma[4:] ** 2).sum())
        ours = float(((delta - product(tensors, report.module)) ** 2).sum())
        assert ours == pytest.approx(tail, rel=1e-5), report.module
        assert report.rel_error ** 2 == pytest.approx(tail / float((sigma ** 2).sum()), rel=1e-4)
        assert report.energy == pytest.approx(float((sigma[:4] ** 2).sum() / (sigma ** 2).sum()), rel=1e-5)
        checked += 1
    assert checked == len(LLAMA_LINEAR) * 2 + 2  # every linear layer, the embedding and the head


def test_randomized_svd_reaches_the_optimum_on_a_low_rank_plus_noise_change():
    gen = torch.Generator().manual_seed(0)
    signal = low_rank((600, 400), 8, gen, scale=1.0)
    M = signal + 1e-3 * torch.randn(600, 400, generator=gen)
    sigma = np.linalg.svd(M.double().numpy(), compute_uv=False)
    optimum = np.sqrt((sigma[8:] ** 2).sum() / (sigma ** 2).sum())
    f = truncated_svd(M.clone(), RankRule(rank=8), svd="auto")
    assert f.method == "randomized"
    assert f.rel_error == pytest.approx(optimum, rel=1e-3)
    residual = M.double().numpy() - f.B.double().numpy() @ f.A.double().numpy()
    assert np.linalg.norm(residual) / np.linalg.norm(M.double().numpy()) == pytest.approx(f.rel_error, rel=1e-4)


def spectrum_delta(shape, singular_values, gen) -> torch.Tensor:
    """A change with exactly these singular values (orthonormal U, V from QR)."""
    k = len(singular_values)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen, dtype=torch.float64))
    return ((U * torch.tensor(singular_values, dtype=torch.float64)) @ V.T).float()


SPECTRA = {"q_proj": [8, 4, 2, 1, 0.5, 0.25], "v_proj": [5, 5, 0.3, 0.1], "down_proj": [3, 0.2, 0.1, 0.05]}


def expected_rank(sigma: list[float], *, energy: float | None = None, max_error: float | None = None) -> int:
    s2 = np.array(sigma, dtype=np.float64) ** 2
    kept = np.cumsum(s2) / s2.sum()
    need = energy if energy is not None else 1 - max_error ** 2
    return int(np.argmax(kept >= need)) + 1


@pytest.mark.parametrize("rule", [{"energy": 0.99}, {"energy": 0.9}, {"max_error": 0.05}, {"max_error": 0.3}],
                         ids=["energy0.99", "energy0.9", "err0.05", "err0.3"])
def test_energy_and_max_error_choose_the_smallest_sufficient_rank(llama, tmp_path, rule):
    """Per-module ranks from a known spectrum; PEFT builds each module with that rank (rank_pattern)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _, model, base_dir = llama

    def edit(name, p, gen):
        short = name.split(".")[-2]
        if short in SPECTRA and ".layers.0." in name:
            p.add_(spectrum_delta(p.shape, SPECTRA[short], gen))

    tuned_dir = save_base(tuned_copy(model, edit), tmp_path / "tuned")
    result = wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", progress=False, **rule)
    want = {f"model.layers.0.{'self_attn' if s != 'down_proj' else 'mlp'}.{s}": expected_rank(sigma, **rule)
            for s, sigma in SPECTRA.items()}
    assert {r.module: r.rank for r in result.lora} == want
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                     tmp_path / "lora")
    modules = dict(peft.base_model.model.named_modules())
    assert {m: modules[m].lora_A["default"].weight.shape[0] for m in want} == want
    assert {m: modules[m].scaling["default"] for m in want} == {m: 1.0 for m in want}
    limit = rule.get("max_error", np.sqrt(1 - rule.get("energy", 1)))
    assert all(r.rel_error <= limit + 1e-6 for r in result.lora)


# -- PEFT loads the result: a real model, recovered -----------------------------------------------------

def test_llama_low_rank_change_is_recovered_exactly_through_peft(llama, tmp_path):
    """TUNED − BASE of rank <= 3 on every linear layer and the embedding, norms changed too: PEFT's merge
    of the extracted adapter gives TUNED back (1e-5); so does wsurgery's own merge."""
    from transformers import LlamaForCausalLM

    _, model, base_dir = llama

    def edit(name, p, gen):
        if p.ndim == 2:
            p.add_(low_rank(p.shape, 3, gen))
        elif "layers.1.post_attention_layernorm" in name:
            p.mul_(1.5)

    tuned_dir = save_base(tuned_copy(model, edit), tmp_path / "tuned")
    result = wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", rank=3, progress=False)
    config = config_of(tmp_path / "lora")
    assert config["modules_to_save"] == ["model.layers.1.post_attention_layernorm"]
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (3, 3, {})
    assert {r.kind for r in result.lora} == {"linear", "embedding"}
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in adapter_tensors(tmp_path / "lora")
    tuned = load_all(tuned_dir)
    assert_close_to(on_tuned_keys(peft_merged(LlamaForCausalLM, base_dir, tmp_path / "lora"), tuned), tuned, rel=1e-5)
    wsurgery.merge(base_dir, tmp_path / "lora", tmp_path / "merged", progress=False)
    assert_close_to(load_all(tmp_path / "merged"), tuned, rel=1e-5)


def test_llama_low_rank_change_plus_noise_is_recovered_to_the_noise_level(llama, tmp_path):
    """TUNED = BASE + L (rank 3) + N: the rank-3 extraction lies within 2·||N|| of L in every module."""
    from transformers import LlamaForCausalLM

    _, model, base_dir = llama
    signal, noise = {}, {}

    def edit(name, p, gen):
        if p.ndim == 2:
            signal[name], noise[name] = low_rank(p.shape, 3, gen), 1e-4 * torch.randn(p.shape, generator=gen)
            p.add_(signal[name] + noise[name])

    tuned_dir = save_base(tuned_copy(model, edit), tmp_path / "tuned")
    wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", rank=3, progress=False)
    merged = peft_merged(LlamaForCausalLM, base_dir, tmp_path / "lora")
    base = load_all(base_dir)
    for name, L in signal.items():
        recovered = merged[name].double() - base[name].double()
        assert torch.linalg.norm(recovered - L.double()) <= 2 * torch.linalg.norm(noise[name].double()) + 1e-5, name


def test_gpt2_conv1d_with_bias_changes_uses_fan_in_fan_out_and_lora_bias(tmp_path):
    """GPT-2's Conv1D stores (in, out); changed biases go to lora_B.bias. PEFT's merge gives TUNED back."""
    from transformers import GPT2LMHeadModel

    model = with_random_biases(tiny_gpt2(seed=1))
    base_dir = save_base(model, tmp_path / "base")

    def edit(name, p, gen):
        if ".h." in name and p.ndim == 2:
            p.add_(low_rank(p.shape, 2, gen))
        elif ".h." in name and name.endswith(".bias") and ".ln_" not in name:
            p.add_(torch.randn(p.shape, generator=gen))
        elif name.endswith("ln_f.weight"):
            p.add_(0.25)

    tuned_dir = save_base(tuned_copy(model, edit), tmp_path / "tuned")
    result = wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", rank=2, progress=False)
    config = config_of(tmp_path / "lora")
    assert config["fan_in_fan_out"] and config["lora_bias"]
    assert config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert config["modules_to_save"] == ["transformer.ln_f"]
    assert {r.kind for r in result.lora} == {"conv1d"}
    tuned = load_all(tuned_dir)
    assert_close_to(on_tuned_keys(peft_merged(GPT2LMHeadModel, base_dir, tmp_path / "lora"), tuned), tuned, rel=1e-5)


def test_gpt2_embedding_and_bias_changes_pick_the_smaller_adapter_peft_can_load(tmp_path):
    """lora_bias excludes embedding LoRAs: the (small) embedding is stored whole, the biases ride on lora_B."""
    from transformers import GPT2LMHeadModel

    model = with_random_biases(tiny_gpt2(seed=2))
    base_dir = save_base(model, tmp_path / "base")

    def edit(name, p, gen):
        if p.ndim == 2:
            p.add_(low_rank(p.shape, 2, gen))
        elif ".h." in name and name.endswith(".bias") and ".ln_" not in name:
            p.add_(torch.randn(p.shape, generator=gen))

    tuned_dir = save_base(tuned_copy(model, edit), tmp_path / "tuned")
    result = wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", rank=2, progress=False)
    config = config_of(tmp_path / "lora")
    assert config["lora_bias"]
    assert config["modules_to_save"] == ["transformer.wpe", "transformer.wte"]
    assert all("lora_bias" in r.reason for r in result.saved_whole)
    tuned = load_all(tuned_dir)
    assert_close_to(on_tuned_keys(peft_merged(GPT2LMHeadModel, base_dir, tmp_path / "lora"), tuned), tuned, rel=1e-5)


def test_resized_embedding_goes_to_modules_to_save(llama, tmp_path):
    """A grown vocabulary: the new embedding and head are stored whole; PEFT loads them on a resized base."""
    from transformers import LlamaForCausalLM

    _, model, base_dir = llama
    tuned_model = copy.deepcopy(model)
    tuned_model.resize_token_embeddings(100)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        tuned_model.model.layers[0].self_attn.q_proj.weight.add_(low_rank((32, 32), 2, gen))
    tuned_dir = save_base(tuned_model, tmp_path / "tuned")
    result = wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", rank=2, progress=False)
    assert config_of(tmp_path / "lora")["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    assert any("resize_token_embeddings(100)" in n for n in result.notes)
    tuned = load_all(tuned_dir)
    merged = peft_merged(LlamaForCausalLM, base_dir, tmp_path / "lora", resize=100)
    assert_close_to(on_tuned_keys(merged, tuned), tuned, rel=1e-5)


def test_targets_limit_the_adapter_and_list_what_is_left_out(llama, tmp_path):
    _, model, base_dir = llama

    def edit(name, p, gen):
        if p.ndim == 2 and ".layers." in name:
            p.add_(low_rank(p.shape, 2, gen))

    tuned_dir = save_base(tuned_copy(model, edit), tmp_path / "tuned")
    result = wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", rank=2, targets=r"\.(q|v)_proj$",
                              progress=False)
    assert {r.module.rpartition(".")[2] for r in result.lora} == {"q_proj", "v_proj"}
    assert config_of(tmp_path / "lora")["target_modules"] == ["q_proj", "v_proj"]
    assert sorted(result.left_out) == sorted(f"model.layers.{i}.{m}.weight" for i in range(2)
                                             for m in ("self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                       "mlp.up_proj", "mlp.down_proj"))


def test_different_dtypes_are_fine(llama, tmp_path):
    """A bfloat16 BASE and a float32 TUNED: values equal after upcasting are unchanged; the change is exact."""
    _, model, _ = llama
    base_model = copy.deepcopy(model).to(torch.bfloat16)
    base_dir = save_base(base_model, tmp_path / "base")

    def edit(name, p, gen):
        if name.endswith("q_proj.weight"):
            p.add_(low_rank(p.shape, 2, gen))

    tuned_dir = save_base(tuned_copy(base_model.to(torch.float32), edit), tmp_path / "tuned")
    result = wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", rank=2, progress=False)
    assert [r.module for r in result.lora] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert not result.saved_whole and not result.left_out
    base, tuned = load_all(base_dir), load_all(tuned_dir)
    tensors = adapter_tensors(tmp_path / "lora")
    for r in result.lora:
        delta = tuned[r.module + ".weight"].double().numpy() - base[r.module + ".weight"].double().numpy()
        assert np.abs(product(tensors, r.module) - delta).max() <= 1e-5 * np.abs(delta).max()


# -- bad input -----------------------------------------------------------------------------------------

@pytest.fixture
def pair(llama, tmp_path):
    """BASE and a TUNED with a rank-2 change of every linear layer, as plain safetensors state dicts."""
    _, model, base_dir = llama

    def edit(name, p, gen):
        if p.ndim == 2:
            p.add_(low_rank(p.shape, 2, gen))

    return base_dir, save_base(tuned_copy(model, edit), tmp_path / "tuned")


def rewrite(folder: Path, edit) -> Path:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 40}, "--rank 40 is larger than every targeted weight allows (the largest min(out, in) is 32)"),
    ({"rank": 0}, "--rank must be at least 1"),
    ({"rank": 2, "energy": 0.9}, "give exactly one of --rank, --energy and --max-error (--rank and --energy given)"),
    ({}, "give exactly one of --rank, --energy and --max-error (none given)"),
    ({"energy": 1.5}, "--energy is the fraction"),
    ({"max_error": 1.0}, "--max-error is a relative Frobenius error in [0, 1)"),
    ({"energy": 0.9, "svd": "randomized"}, "--svd randomized needs --rank"),
    ({"rank": 2, "targets": "("}, "--targets '(' is not a valid regular expression"),
    ({"rank": 2, "targets": "no_such_module"}, "--targets 'no_such_module' matches no module"),
])
def test_bad_options_are_refused_before_any_output(pair, tmp_path, kwargs, message):
    base_dir, tuned_dir = pair
    with pytest.raises(InputError) as e:
        wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", progress=False, **kwargs)
    assert message in str(e.value)
    assert not (tmp_path / "lora").exists()


def test_shape_mismatch_is_refused_with_the_tensor_name(pair, tmp_path):
    base_dir, tuned_dir = pair
    rewrite(tuned_dir, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(40, 32)}))
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: BASE has shape \[48, 32\] but "
                                         r"TUNED has \[40, 32\]"):
        wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", rank=2, progress=False)
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("model.norm.weight"), r"lacks tensor\(s\) that .* model\.norm\.weight"),
    (lambda t: t.update({"model.extra.weight": torch.zeros(2)}), r"has tensor\(s\) that .* lacks: model\.extra\."),
])
def test_missing_or_extra_tensors_are_refused(pair, tmp_path, change, message):
    base_dir, tuned_dir = pair
    rewrite(tuned_dir, change)
    with pytest.raises(InputError, match=message):
        wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", rank=2, progress=False)


def test_identical_checkpoints_have_nothing_to_extract(llama, tmp_path):
    _, _, base_dir = llama
    with pytest.raises(InputError, match="equals BASE .* nothing to extract"):
        wsurgery.extract(base_dir, base_dir, tmp_path / "lora", rank=2, progress=False)


def test_plot_without_matplotlib_is_a_clear_error(pair, tmp_path, monkeypatch):
    import sys

    base_dir, tuned_dir = pair
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UnsupportedError, match=r"--plot needs matplotlib.*pip install 'wsurgery\[plot\]'"):
        wsurgery.extract(base_dir, tuned_dir, tmp_path / "lora", rank=2, plot=tmp_path / "s.png", progress=False)
    assert not (tmp_path / "lora").exists()


def test_cuda_matches_the_cpu_or_is_refused_with_a_clear_error(pair, tmp_path):
    """On a machine with CUDA the GPU's factors give the CPU's products; without it, --device cuda says so."""
    base_dir, tuned_dir = pair
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedError, match="--device cuda: no CUDA device is available here"):
            wsurgery.extract(base_dir, tuned_dir, tmp_path / "gpu", rank=2, device="cuda", progress=False)
        return
    for svd in ("exact", "randomized"):
        cpu = wsurgery.extract(base_dir, tuned_dir, tmp_path / f"cpu-{svd}", rank=2, device="cpu", svd=svd,
                               progress=False)
        gpu = wsurgery.extract(base_dir, tuned_dir, tmp_path / f"gpu-{svd}", rank=2, device="cuda", svd=svd,
                               progress=False)
        assert [m.module for m in gpu.lora] == [m.module for m in cpu.lora]
        ours, theirs = adapter_tensors(tmp_path / f"gpu-{svd}"), adapter_tensors(tmp_path / f"cpu-{svd}")
        for m in cpu.lora:
            want = product(theirs, m.module)
            assert np.abs(product(ours, m.module) - want).max() <= 1e-5 * np.abs(want).max(), m.module


# -- the command line ----------------------------------------------------------------------------------



def test_cli_extract_reports_per_module_and_writes_json_and_plot(pair, tmp_path, capsys):
    base_dir, tuned_dir = pair
    code, out, err = run_cli(["extract", base_dir, tuned_dir, tmp_path / "lora", "--energy", "0.999",
                              "--report", tmp_path / "report.json", "--plot", tmp_path / "spectra.png"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rule"] == "energy 0.999"
    assert {m["module"]: m["rank"] for m in report["modules"]} == {
        **{f"model.layers.{i}.{p}.{m}": 2 for i in range(2) for p, ms in
           (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
           for m in ms},
        "model.embed_tokens": 2, "lm_head": 2}
    lines = out.splitlines()
    assert lines[0].split() == ["module", "kind", "shape", "rank", "rel_error", "energy"]
    assert any(line.split()[:4] == ["model.layers.0.self_attn.q_proj", "linear", "32x32", "2"] for line in lines)
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_extract_error_is_one_line(pair, tmp_path, capsys):
    base_dir, tuned_dir = pair
    code, out, err = run_cli(["extract", base_dir, tuned_dir, tmp_path / "lora", "--rank", "99"], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("wsurgery: error: --rank 99 is larger")
    assert not (tmp_path / "lora").exists()
