"""merge-models against mergekit 0.1.5 run in-process on the same tiny Llama fine-tunes (the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from oracle import load_all, run_cli, save_base, tiny_llama

from wsurgery.errors import InputError, UnsupportedError
from wsurgery.merging import merge_models

mergekit = pytest.importorskip("mergekit", reason="needs mergekit==0.1.5 (the oracle)")


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
    for k, seed in (("a", 11), ("b", 12), ("c", 13)):
        paths[k] = save_base(_tuned(base, seed, sparse=0.3), root / k)
    return paths


def _mergekit(config: dict, out: Path, seed: int | None) -> dict[str, torch.Tensor]:
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
                                                 for k, p in zip("abc", per_model)]}
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
