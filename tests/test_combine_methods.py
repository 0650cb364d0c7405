"""``combine --method``: every ``combination_type`` of PEFT 0.21.2's ``add_weighted_adapter``.

The judge is PEFT itself: the adapters loaded into one PeftModel on a tiny Llama, ``add_weighted_adapter``
run under ``torch.manual_seed(seed)``, the combined adapter saved with ``save_pretrained``. Ours must be
that saved adapter: the same tensor names and shapes, every tensor ``torch.equal`` (float32; our ops are
PEFT's ops in PEFT's order, and the SVD the same LAPACK call on the same input), and the same ``r``,
``lora_alpha``, ``target_modules`` and ``use_rslora``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from oracle import make_adapter, run_cli, save_base, tiny_llama

import wsurgery
from wsurgery.convert.combine_methods import METHODS
from wsurgery.errors import InputError, UnsupportedError

SEED = 1234


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft import LoHaConfig, LoraConfig

    root = tmp_path_factory.mktemp("combine_methods")
    model = tiny_llama(seed=5)
    base = save_base(model, root / "base")
    make = lambda config, name, seed: make_adapter(model, config, root / name, seed=seed)  # noqa: E731
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    order = root / "order.txt"
    order.write_text("\n".join(name for name, _ in model.named_modules()))
    return SimpleNamespace(
        root=root, base=base, order=order,
        a=make(LoraConfig(r=4, lora_alpha=8, target_modules=targets), "a", 1),
        b=make(LoraConfig(r=4, lora_alpha=6, target_modules=targets), "b", 2),
        # partial overlap (k_proj only here), another rank, rsLoRA: for the SVD methods and cat
        c=make(LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj"]), "c", 3),
        q_only=make(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), "q_only", 4),
        q_only2=make(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]), "q_only2", 5),
        loha=make(LoHaConfig(r=4, alpha=4, target_modules=["q_proj"]), "loha", 6),
        dora=make(LoraConfig(r=4, lora_alpha=4, use_dora=True, target_modules=["q_proj"]), "dora", 7),
    )


def peft_combined(env, tmp: Path, adapters: list[tuple[Path, float]], method: str, seed: int = SEED,
                  **kwargs) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT's ``add_weighted_adapter`` of the saved adapters, as PEFT saves the new adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env.base, dtype=torch.float32)
    names = [f"x{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(model, adapters[0][0], adapter_name=names[0])
    for name, (path, _) in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    torch.manual_seed(seed)
    model.add_weighted_adapter(names, [w for _, w in adapters], "mix", combination_type=method, **kwargs)
    model.save_pretrained(tmp / "peft", selected_adapters=["mix"], save_embedding_layers=False)
    folder = tmp / "peft" / "mix"
    return load_file(folder / "adapter_model.safetensors"), json.loads((folder / "adapter_config.json").read_text())


def ours(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(out / "adapter_model.safetensors"), json.loads((out / "adapter_config.json").read_text())


def assert_same_adapter(got: tuple[dict, dict], expected: tuple[dict, dict]) -> None:
    tensors, config = got
    peft_tensors, peft_config = expected
    assert set(tensors) == set(peft_tensors)
    for k, t in peft_tensors.items():
        assert tensors[k].dtype == t.dtype and tensors[k].shape == t.shape, k
        assert torch.equal(tensors[k], t), (k, (tensors[k] - t).abs().max())
    for key in ("r", "lora_alpha", "use_rslora"):
        assert config[key] == peft_config[key], key
    targets = peft_config["target_modules"]
    assert (sorted(config["target_modules"]) == sorted(targets)) if isinstance(targets, list) \
        else config["target_modules"] == targets


# -- element for element against PEFT, every method ----------------------------------------------------------

FACTOR_CASES = {  # the non-SVD methods need equal ranks: a and b (r=4), weights 0.7 and -0.4
    "linear": {},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.6},
    "dare_ties": {"density": 0.3, "majority_sign_method": "frequency"},
    "magnitude_prune": {"density": 0.4},
}
SVD_CASES = {  # a, b and c (r=4, 4, 2; c rsLoRA and on q_proj/k_proj only)
    "svd": {},
    "ties_svd": {"density": 0.5, "svd_rank": 3, "svd_clamp": 0.9},
    "dare_linear_svd": {"density": 0.6, "svd_full_matrices": False},
    "dare_ties_svd": {"density": 0.3, "majority_sign_method": "frequency", "svd_rank": 5},
    "magnitude_prune_svd": {"density": 0.4, "svd_clamp": 0.95},
}


def _api_options(kwargs: dict) -> dict:
    return {("rank" if k == "svd_rank" else k): v for k, v in kwargs.items()}


@pytest.mark.parametrize("method", list(FACTOR_CASES))
def test_factor_methods_are_peft_bit_for_bit(env, tmp_path, method):
    """Linear, TIES, DARE and magnitude pruning on A and B separately (√(w·s) on each, the sign on A),
    embeddings included; DARE's masks drawn in the model's module order (--module-order) with PEFT's seed."""
    kwargs = FACTOR_CASES[method]
    adapters = [(env.a, 0.7), (env.b, -0.4)]
    extra = {"seed": SEED, "module_order": env.order} if METHODS[method].random else {}
    wsurgery.combine(tmp_path / "out", adapters, method=method, progress=False, **_api_options(kwargs), **extra)
    expected = peft_combined(env, tmp_path, adapters, method, **kwargs)
    assert_same_adapter(ours(tmp_path / "out"), expected)
    if METHODS[method].random:  # the order matters: by name (embed, layers.0.mlp, ...) the masks are others
        r = wsurgery.combine(tmp_path / "by_name", adapters, method=method, seed=SEED, progress=False, **kwargs)
        assert any("--module-order" in n for n in r.notes)
        by_name = ours(tmp_path / "by_name")[0]
        assert any(not torch.equal(by_name[k], t) for k, t in expected[0].items())


@pytest.mark.parametrize("method", list(SVD_CASES))
def test_svd_methods_are_peft_bit_for_bit(env, tmp_path, method):
    """The weighted changes merged, then PEFT's SVD (svd_rank, clamp, full_matrices); unequal ranks allowed."""
    kwargs = SVD_CASES[method]
    adapters = [(env.a, 1.0), (env.b, 0.5), (env.c, -0.8)]
    extra = {"seed": SEED, "module_order": env.order} if METHODS[method].random else {}
    wsurgery.combine(tmp_path / "out", adapters, method=method, progress=False, **_api_options(kwargs), **extra)
    assert_same_adapter(ours(tmp_path / "out"), peft_combined(env, tmp_path, adapters, method, **kwargs))


def test_cat_puts_the_weights_on_a_as_peft_does(env, tmp_path):
    """Where every adapter targets every module, cat is PEFT's cat tensor for tensor (PEFT pads a module that
    some adapter lacks with zeros up to the summed rank; ours keeps its own rank: the same change)."""
    adapters = [(env.a, 0.7), (env.b, -0.4)]
    wsurgery.combine(tmp_path / "out", adapters, progress=False)
    assert_same_adapter(ours(tmp_path / "out"), peft_combined(env, tmp_path, adapters, "cat"))


@pytest.mark.parametrize("method, kwargs", [("dare_linear", {"density": 0.5}),
                                             ("dare_ties_svd", {"density": 0.5, "svd_rank": 3})])
def test_gpt2_conv1d_and_bf16_adapters_are_peft_bit_for_bit(tmp_path, method, kwargs):
    """Conv1D layers (fan_in_fan_out: PEFT's delta transposed, then back for the SVD) and an adapter saved
    in bfloat16 (PEFT loads it into float32 LoRA weights, as we read it)."""
    from peft import LoraConfig

    from oracle import tiny_gpt2

    model = tiny_gpt2(seed=2)
    base = save_base(model, tmp_path / "base")
    config = dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    a = make_adapter(model, LoraConfig(lora_alpha=8, **config), tmp_path / "a", seed=1)
    b = make_adapter(model, LoraConfig(lora_alpha=4, **config), tmp_path / "b", seed=2, adapter_dtype=torch.bfloat16)
    order = tmp_path / "order.txt"
    # the names as a PeftModel lists them (base_model.model. prefixed) are taken too
    order.write_text("\n".join(f"base_model.model.{name}" for name, _ in model.named_modules()))
    adapters = [(a, 0.9), (b, 0.5)]
    wsurgery.combine(tmp_path / "out", adapters, method=method, seed=3, module_order=order, progress=False,
                     **_api_options(kwargs))
    env = SimpleNamespace(base=base)
    assert_same_adapter(ours(tmp_path / "out"), peft_combined(env, tmp_path, adapters, method, seed=3, **kwargs))


def test_one_adapter_is_combined_as_linear_like_peft(env, tmp_path):
    r = wsurgery.combine(tmp_path / "out", [(env.a, 0.3)], method="ties", density=0.5, progress=False)
    assert any("linear" in n for n in r.notes)
    assert_same_adapter(ours(tmp_path / "out"), peft_combined(env, tmp_path, [(env.a, 0.3)], "ties", density=0.5))


def test_dare_in_name_order_is_peft_where_that_is_the_model_order(env, tmp_path):
    """Without --module-order the masks are drawn by name, layer numbers as numbers: PEFT's order when each
    layer has one targeted module (q_proj here); a note says the order is assumed."""
    adapters = [(env.q_only, 1.0), (env.q_only2, 0.6)]
    r = wsurgery.combine(tmp_path / "out", adapters, method="dare_ties", density=0.5, seed=7, progress=False)
    assert any("--module-order" in n for n in r.notes)
    assert_same_adapter(ours(tmp_path / "out"), peft_combined(env, tmp_path, adapters, "dare_ties", seed=7,
                                                              density=0.5))


def test_dare_draws_depend_on_the_seed(env, tmp_path):
    """The seed reaches the masks: another seed, another adapter (so a test of equality can fail)."""
    adapters = [(env.a, 1.0), (env.b, 1.0)]
    for seed in (1, 2):
        wsurgery.combine(tmp_path / str(seed), adapters, method="dare_linear", density=0.5, seed=seed,
                         module_order=env.order, progress=False)
    one, two = ours(tmp_path / "1")[0], ours(tmp_path / "2")[0]
    assert any(not torch.equal(one[k], two[k]) for k in one)


# -- the CLI --------------------------------------------------------------------------------------------------

def test_cli_ties_and_dare_ties_with_weights(env, tmp_path, capsys):
    code, out, err = run_cli(["combine", env.a, f"{env.b}:0.7", tmp_path / "ties", "--method", "ties",
                              "--density", "0.5", "--quiet"], capsys)
    assert code == 0, err
    (tmp_path / "p1").mkdir()
    assert_same_adapter(ours(tmp_path / "ties"),
                        peft_combined(env, tmp_path / "p1", [(env.a, 1.0), (env.b, 0.7)], "ties", density=0.5))
    code, out, err = run_cli(["combine", env.a, env.b, env.c, tmp_path / "dts", "--method", "dare_ties_svd",
                              "--density", "0.3", "--seed", "0", "--rank", "3", "--majority-sign-method",
                              "frequency", "--svd-clamp", "0.9", "--no-svd-full-matrices",
                              "--module-order", env.order, "--quiet"], capsys)
    assert code == 0, err
    (tmp_path / "p2").mkdir()
    assert_same_adapter(ours(tmp_path / "dts"), peft_combined(
        env, tmp_path / "p2", [(env.a, 1.0), (env.b, 1.0), (env.c, 1.0)], "dare_ties_svd", seed=0, density=0.3,
        svd_rank=3, majority_sign_method="frequency", svd_clamp=0.9, svd_full_matrices=False))
    assert "dare_ties_svd" in out


def test_help_lists_every_peft_method_and_says_which_are_not_sums(capsys):
    code, out, _ = run_cli(["combine", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    for name in METHODS:
        assert name in flat
    assert "not a sum of changes" in flat


# -- refusals ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"method": "ties", "density": 0.0}, "(0, 1]"),
    ({"method": "ties", "density": 1.5}, "(0, 1]"),
    ({"method": "dare_ties"}, "needs --density"),
    ({"method": "linear", "density": 0.5}, "--density applies"),
    ({"method": "ties", "density": 0.5, "seed": 1}, "--seed applies"),
    ({"method": "svd", "svd_driver": "gesvd"}, "CUDA"),
    ({"method": "ties", "density": 0.5, "rank": 2}, "svd_rank"),
    ({"method": "nope"}, "unknown --method"),
    ({"method": "ties", "density": 0.5, "svd_full_matrices": False}, "--no-svd-full-matrices applies"),
    ({"method": "svd", "module_order": ["x"]}, "draws nothing"),
    ({"method": "svd", "rank": 40}, "smaller dimension"),
])
def test_bad_options_are_refused_before_anything_is_written(env, tmp_path, options, message):
    with pytest.raises((InputError, UnsupportedError), match=message.replace("(", r"\(").replace("]", r"\]")):
        wsurgery.combine(tmp_path / "out", [env.a, env.b], progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_unequal_ranks_and_non_lora_adapters_are_refused(env, tmp_path):
    with pytest.raises(InputError, match="same rank"):
        wsurgery.combine(tmp_path / "out", [env.a, env.c], method="linear", progress=False)
    with pytest.raises(UnsupportedError, match="LOHA.*only LoRA"):
        wsurgery.combine(tmp_path / "out", [env.q_only, env.loha], method="ties_svd", density=0.5, progress=False)
    with pytest.raises(UnsupportedError, match="use_dora"):
        wsurgery.combine(tmp_path / "out", [env.q_only, env.dora], method="ties", density=0.5, progress=False)
    with pytest.raises(InputError, match="does not list"):
        wsurgery.combine(tmp_path / "out", [env.a, env.b], method="dare_linear", density=0.5,
                         module_order=["model.layers.0.self_attn.q_proj"], progress=False)
    assert not (tmp_path / "out").exists()
