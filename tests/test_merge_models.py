"""merge-models against mergekit 0.1.5 run in-process on the same tiny Llama fine-tunes (the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from oracle import load_all, save_base, tiny_llama

from wsurgery.errors import InputError, UnsupportedError
from wsurgery.merging import merge_models



def _needs_mergekit() -> None:
    pytest.importorskip("mergekit", reason="needs mergekit==0.1.5 (the oracle)")


def _tuned(base, seed: int, sparse: float):
    """A 'fine-tune': the base plus a random change, dense on some tensors and sparse on others."""
    model = tiny_llama(base.dtype)
    model.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            change = torch.randn(p.shape, generator=g) * 0.02
            if i % 2:
                change *= torch.rand(p.shape, generator=g) < sparse
            p.add_(change.to(p.dtype))
    return model


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def models(request, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp(f"models-{str(request.param)[6:]}")
    base = tiny_llama(request.param)
    paths = {"base": save_base(base, root / "base")}
    for k, seed in (("a", 11), ("b", 12), ("c", 13), ("d", 14), ("e", 15)):
        paths[k] = save_base(_tuned(base, seed, sparse=0.3), root / k)
    return paths


def _mergekit(config: dict, out: Path, seed: int | None) -> dict[str, torch.Tensor]:
    _needs_mergekit()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(random_seed=seed, copy_tokenizer=False, write_model_card=False, quiet=True))
    return load_all(out)


def _ours(config: dict, out: Path, seed: int | None) -> dict[str, torch.Tensor]:
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(config))
    merge_models(out, config=path, seed=seed, progress=False)
    return load_all(out)


def _assert_identical(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    for name, want in theirs.items():
        got = ours[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), f"{name}: max diff {(got.double() - want.double()).abs().max().item():.3g}"


def _config(models: dict[str, Path], method: str, params: dict, per_model: list[dict], base: bool = True) -> dict:
    config = {"merge_method": method, "models": [{"model": str(models[k]), "parameters": p}
                                                 for k, p in zip("abcde", per_model)]}
    if base:
        config["base_model"] = str(models["base"])
    if params:
        config["parameters"] = params
    return config


CASES = {
    "task_arithmetic": ({"lambda": 0.8}, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.3}]),
    "ties": ({"density": 0.5}, [{"weight": 0.6}, {"weight": 0.4, "density": 0.7}, {"weight": 0.5}]),
    "dare_linear": ({}, [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.3}, {"weight": 1.0}]),
    "dare_ties": ({"density": 0.4, "int8_mask": True}, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.5}]),
    "della": ({"density": 0.5, "epsilon": 0.1}, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.5}]),
    "della_linear": ({"density": 0.6, "epsilon": 0.2, "lambda": 1.1}, [{"weight": 0.6}, {"weight": 0.4},
                                                                         {"weight": 0.5}]),
    "breadcrumbs": ({"density": 0.8, "gamma": 0.05}, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.5}]),
    "breadcrumbs_ties": ({"density": 0.7, "gamma": 0.02}, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.5}]),
    "model_stock": ({}, [{}, {}, {}]),
    "linear": ({}, [{"weight": 0.6}, {"weight": 0.4}, {"weight": 0.5}]),
    "slerp": ({"t": 0.3}, [{}]),
    "nearswap": ({"t": 0.01}, [{}]),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_same_as_mergekit(models, method, tmp_path):
    params, per_model = CASES[method]
    config = _config(models, method, params, per_model, base=method != "linear")
    theirs = _mergekit(config, tmp_path / "mergekit", seed=7)
    ours = _ours(config, tmp_path / "ours", seed=7)
    _assert_identical(ours, theirs)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_five_models(models, method, tmp_path):
    """Five models: float32 sums of more than four rows take torch's stacked order, 16-bit ones a running sum."""
    per_model = [{"weight": w} for w in (0.5, 0.3, 0.9, 0.2, 0.6)]
    config = _config(models, method, {"density": 0.6}, per_model)
    _assert_identical(_ours(config, tmp_path / "ours", seed=3), _mergekit(config, tmp_path / "mergekit", seed=3))


def test_filters_gradients_dtype(models, tmp_path):
    """Per-tensor filters, layer gradients, per-model overrides, dtype and out_dtype, as mergekit resolves them."""
    config = _config(models, "della", {
        "density": [{"filter": "mlp", "value": 0.3}, {"filter": "self_attn", "value": [0.4, 0.8]}, {"value": 0.6}],
        "epsilon": 0.05, "lambda": [0.9, 1.2], "normalize": [{"filter": "norm", "value": False}, {"value": True}],
    }, [{"weight": [0.2, 0.9]}, {"weight": 0.4, "density": [{"filter": "embed", "value": 0.9}]},
        {"weight": [{"filter": "layers.1.", "value": 0.7}, {"value": 0.3}]}])
    config.update(dtype="float32", out_dtype="bfloat16")
    theirs = _mergekit(config, tmp_path / "mergekit", seed=5)
    assert {t.dtype for t in theirs.values()} == {torch.bfloat16}
    _assert_identical(_ours(config, tmp_path / "ours", seed=5), theirs)


def test_seed_decides_the_masks(models, tmp_path):
    """The same seed gives the same masks (and mergekit's); another seed other masks."""
    config = _config(models, "dare_linear", {"density": 0.5}, [{"weight": 0.6}, {"weight": 0.4}])
    a = _ours(config, tmp_path / "one", seed=1)
    assert a.keys() == (b := _ours(config, tmp_path / "two", seed=1)).keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    c = _ours(config, tmp_path / "three", seed=2)
    assert any(not torch.equal(a[n], c[n]) for n in a if n.endswith("proj.weight"))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(33,), (7, 5), (64, 48), (3, 1000, 33)])
def test_running_sum_is_torchs(n, dtype, shape):
    """The running sum gives torch's stacked sum bit for bit where it is used (the reference is torch)."""
    from wsurgery.merging.accumulate import StackedSum

    g = torch.Generator().manual_seed(n)
    rows = [(torch.randn(shape, generator=g) * 10 ** torch.randint(-3, 3, (), generator=g)).to(dtype)
            for _ in range(n)]
    acc = StackedSum(n, dtype)
    for r in rows:
        acc.add(r)
    assert torch.equal(acc.result(), torch.stack(rows).sum(dim=0))


def _adapter(models: dict[str, Path], tmp_path: Path) -> Path:
    from oracle import make_adapter
    from peft import LoraConfig

    base = tiny_llama(load_all(models["base"])["model.embed_tokens.weight"].dtype)
    base.load_state_dict(load_all(models["base"]), strict=False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    return make_adapter(base, config, tmp_path / "lora", seed=5)


def test_lora_adapter_contributes_its_change(models, tmp_path):
    """An adapter is the model PEFT's merge_and_unload makes of the base (mergekit's BASE+LORA syntax)."""
    _needs_mergekit()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    lora = _adapter(models, tmp_path)
    config = _config(models, "ties", {"density": 0.5}, [{"weight": 0.6}, {"weight": 0.4}])
    config["models"].append({"model": f"{models['base']}+{lora}", "parameters": {"weight": 0.7}})
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"),
              MergeOptions(lora_merge_cache=str(tmp_path / "cache"), copy_tokenizer=False, write_model_card=False,
                           quiet=True))
    theirs = load_all(tmp_path / "mergekit")
    _assert_identical(_ours(config, tmp_path / "ours", seed=None), theirs)
    config["models"][-1]["model"] = str(lora)  # an adapter folder: its change on the merge's base
    _assert_identical(_ours(config, tmp_path / "ours2", seed=None), theirs)


def test_merge_with_method_mixes_adapters_and_fine_tunes(models, tmp_path):
    """`wsurgery merge BASE ADAPTER TUNED:W OUT --method ties --density 0.5`: an adapter's change and a fine-tune's
    TUNED − BASE combined as mergekit combines BASE+LORA and TUNED."""
    from click.testing import CliRunner

    from wsurgery.commands import cli

    lora = _adapter(models, tmp_path)
    config = _config(models, "ties", {"density": 0.5}, [{"weight": 0.3}])
    config["models"] = [config["models"][0],
                        {"model": f"{models['base']}+{lora}", "parameters": {"weight": 1.0}}]
    _needs_mergekit()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"),
              MergeOptions(lora_merge_cache=str(tmp_path / "cache"), copy_tokenizer=False, write_model_card=False,
                           quiet=True))
    args = ["merge", models["base"], f"{models['a']}:0.3", lora, tmp_path / "ours", "--method", "ties",
            "--density", "0.5", "-q"]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    _assert_identical(load_all(tmp_path / "ours"), load_all(tmp_path / "mergekit"))
    r = CliRunner().invoke(cli, [str(a) for a in [*args[:5], tmp_path / "x", "--method", "ties", "--scale", "0.5"]])
    assert r.exit_code != 0 and "--method combines changes as mergekit does" in r.output


def _cli(args: list) -> object:
    from click.testing import CliRunner

    from wsurgery.commands import cli

    return CliRunner().invoke(cli, ["merge-models", *[str(a) for a in args]])


def test_cli(models, tmp_path):
    """`merge-models BASE A:W B:W OUT --method dare_ties --density 0.5 --seed 0` and `--config YAML OUT` are
    mergekit's merge."""
    per_model = [{"weight": 0.6}, {"weight": 0.4}]
    config = _config(models, "dare_ties", {"density": 0.5}, per_model)
    theirs = _mergekit(config, tmp_path / "mergekit", seed=0)
    r = _cli([models["base"], f"{models['a']}:0.6", f"{models['b']}:0.4", tmp_path / "ours", "--method", "dare_ties",
              "--density", "0.5", "--seed", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    _assert_identical(load_all(tmp_path / "ours"), theirs)
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == \
        json.loads((models["base"] / "config.json").read_text())
    (tmp_path / "m.yml").write_text(yaml.safe_dump(config))
    r = _cli(["--config", tmp_path / "m.yml", tmp_path / "ours2", "--seed", "0"])
    assert r.exit_code == 0, r.output
    assert "merged 3 models with dare_ties" in r.output
    _assert_identical(load_all(tmp_path / "ours2"), theirs)


def _refused(tmp_path: Path, error: type, match: str, **kwargs) -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        merge_models(out, progress=False, **kwargs)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "wsurgery-tmp" in p.name]


def test_bad_models(models, tmp_path):
    other = save_base(tiny_llama(load_all(models["a"])["model.norm.weight"].dtype, vocab=100), tmp_path / "wider")
    _refused(tmp_path, InputError, r"wider: lm_head.weight is \[100, 32\] but \[96, 32\] in .*base; .* share shapes",
             base=models["base"], models=[models["a"], other], method="ties")
    tied = save_base(tiny_llama(load_all(models["a"])["model.norm.weight"].dtype, tie=True), tmp_path / "tied")
    _refused(tmp_path, InputError, "tied: lacks lm_head.weight", base=models["base"], models=[tied])
    for density in (0, 1.5, -0.2):
        _refused(tmp_path, InputError, rf"density {float(density)} is outside \(0, 1\]", base=models["base"],
                 models=[models["a"]], method="ties", parameters={"density": density})
    _refused(tmp_path, InputError, "epsilon", base=models["base"], models=[models["a"]], method="della",
             parameters={"density": 0.9, "epsilon": 0.2})
    _refused(tmp_path, InputError, "slerp merges the base with exactly 1 other model; got 2",
             base=models["base"], models=[models["a"], models["b"]], method="slerp", parameters={"t": 0.5})
    _refused(tmp_path, InputError, "parameter t is required", base=models["base"], models=[models["a"]],
             method="nearswap")
    _refused(tmp_path, InputError, "model_stock needs at least 2", base=models["base"], models=[models["a"]],
             method="model_stock")
    _refused(tmp_path, UnsupportedError, "parameters names gamma, which ties does not have", base=models["base"],
             models=[models["a"]], method="ties", parameters={"gamma": 0.1})
    _refused(tmp_path, InputError, "no such file or folder", base=models["base"], models=[tmp_path / "nope"])


@pytest.mark.parametrize("yaml_text, error, match", [
    ("merge_method: sce\nbase_model: B\nmodels: [{model: A}]", InputError, "merge method 'sce' is not supported"),
    ("merge_method: ties\nslices: []\nbase_model: B", UnsupportedError, "'slices' .* is not supported"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A}]\nfoo: 1", UnsupportedError, "option 'foo'"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A}]\ntokenizer_source: union", UnsupportedError,
     "tokenizer_source 'union'"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A, parameters: {weight: 1, densty: 0.5}}]",
     UnsupportedError, "names densty, which ties does not have"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A, parameters: {weight: x}}]", InputError,
     "weight must be a number"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A}]\n"
     "parameters: {weight: 1, density: [{filter: mlp, value: 2}]}", InputError,
     r"mlp.* density 2.0 is outside \(0, 1\]"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A}]", InputError, "parameter weight is required"),
    ("merge_method: [", InputError, "not valid YAML"),
])
def test_bad_yaml(models, tmp_path, yaml_text, error, match):
    path = tmp_path / "m.yml"
    path.write_text(yaml_text.replace("B", str(models["base"])).replace("{model: A", f"{{model: {models['a']}"))
    _refused(tmp_path, error, match, config=path)


@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_threads_do_not_change_the_masks(models, method, tmp_path):
    """Tensors merged on several threads take the generator in mergekit's order: any --workers, same bytes."""
    params = {"density": 0.5, "epsilon": 0.1} if method.startswith("della") else {"density": 0.5}
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump(_config(models, method, params, [{"weight": 0.6}, {"weight": 0.4}])))
    merge_models(tmp_path / "one", config=path, seed=4, progress=False, workers=1)
    merge_models(tmp_path / "four", config=path, seed=4, progress=False, workers=4)
    one, four = load_all(tmp_path / "one"), load_all(tmp_path / "four")
    assert all(torch.equal(one[n], four[n]) for n in one)
