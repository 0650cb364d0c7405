"""The command line on good input: help, version, inspect (text and JSON), merge and its options.

Expected values come from independent sources (the torch model, the safetensors library, PEFT's
``merge_and_unload``, transformers' loader), never from wsurgery's own output.
"""

from __future__ import annotations

import json
import math
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from oracle import run_cli
from oracle import assert_close_to, load_all, make_adapter, oracle_merge, save_base, tiny_llama

from wsurgery.cli import main

TARGETS = ["q_proj", "v_proj", "down_proj"]
LAYERS = 2
ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("cli")
    model = tiny_llama(seed=7)
    base = save_base(model, root / "base")
    adapter = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), root / "adapter", seed=2)
    other = make_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]), root / "other", seed=3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expected = oracle_merge(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    changed = {f"model.layers.{i}.{m}.weight" for i in range(LAYERS)
               for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    return SimpleNamespace(root=root, base=base, adapter=adapter, other=other, state=state, expected=expected,
                           changed=changed)




def ok(args, capsys) -> tuple[str, str]:
    code, out, err = run_cli(args, capsys)
    assert code == 0, f"exit {code}: {err}"
    assert "Traceback" not in err
    return out, err


def st_entries(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype, shape)} of a safetensors file, read by the safetensors library."""
    with safe_open(path, "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}


# ---------------------------------------------------------------------------------------------
# help and version
# ---------------------------------------------------------------------------------------------

def test_help(capsys):
    out, _ = ok(["--help"], capsys)
    for command in ("merge", "unmerge", "inspect"):
        assert command in out
    assert "--version" in out and "--debug" in out
    assert ok(["-h"], capsys)[0] == out


@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_command_help_lists_output_options(capsys, command):
    out, _ = ok([command, "--help"], capsys)
    for option in ("--dtype", "--max-shard-size", "--scale", "--overwrite", "--quiet"):
        assert option in out, option


def test_version(capsys):
    out, _ = ok(["--version"], capsys)
    assert out.strip() == f"wsurgery, version {version('wsurgery')}"


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------

def test_inspect_checkpoint_json(env, capsys):
    out, _ = ok(["inspect", env.base, "--json"], capsys)
    info = json.loads(out)
    entries = st_entries(env.base / "model.safetensors")
    assert info["type"] == "checkpoint"
    assert info["format"] == "safetensors"
    assert info["num_tensors"] == len(entries) == len(env.state)
    assert info["num_parameters"] == sum(t.numel() for t in env.state.values())
    assert info["total_bytes"] == sum(t.numel() * t.element_size() for t in env.state.values())
    assert info["dtypes"] == {"float32": len(env.state)}
    assert [s["file"] for s in info["shards"]] == ["model.safetensors"]
    assert info["index"] is None
    got = {t["name"]: (t["dtype"], t["shape"]) for t in info["tensors"]}
    assert got == {n: ("float32", list(env.state[n].shape)) for n in env.state}


def test_inspect_checkpoint_text(env, capsys):
    out, err = ok(["inspect", env.base], capsys)
    assert err == ""
    assert str(env.base) in out
    assert f"{sum(t.numel() for t in env.state.values()):,}" in out
    lines = out.splitlines()
    for name, t in env.state.items():  # one line per tensor, with its shape
        row = [ln for ln in lines if ln.split() and ln.split()[0] == name]
        assert len(row) == 1, name
        assert str(list(t.shape)) in row[0]


def test_inspect_sharded_checkpoint_json(env, tmp_path, capsys):
    model = tiny_llama(seed=7)
    sharded = save_base(model, tmp_path / "sharded", max_shard_size="30KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    out, _ = ok(["inspect", sharded, "--json"], capsys)
    info = json.loads(out)
    assert info["index"] == "model.safetensors.index.json"
    assert sorted(s["file"] for s in info["shards"]) == sorted(set(index["weight_map"].values()))
    assert {t["name"]: t["shard"] for t in info["tensors"]} == index["weight_map"]


def test_inspect_adapter_json(env, capsys):
    out, _ = ok(["inspect", env.adapter, "--json"], capsys)
    info = json.loads(out)
    saved = load_file(env.adapter / "adapter_model.safetensors")
    config = json.loads((env.adapter / "adapter_config.json").read_text())
    assert info["type"] == "adapter"
    assert info["peft_type"] == "LORA"
    assert info["num_tensors"] == len(saved) == 2 * len(TARGETS) * LAYERS
    assert info["num_parameters"] == sum(t.numel() for t in saved.values())
    assert info["dtypes"] == ["float32"]
    assert sorted(info["target_modules"]) == sorted(config["target_modules"])
    assert info["unmerge"] == "exact"
    modules = {m["module"]: m for m in info["modules"]}
    assert set(modules) == {n.removesuffix(".weight") for n in env.changed}
    for m in modules.values():
        assert m["rank"] == 4 and m["alpha"] == 8 and m["scaling"] == pytest.approx(8 / 4)


def test_inspect_adapter_with_base(env, capsys):
    out, _ = ok(["inspect", env.adapter, "--base", env.base, "--json"], capsys)
    info = json.loads(out)
    assert {t for m in info["modules"] for t in m["base_tensors"]} == env.changed


def test_inspect_adapter_text(env, capsys):
    out, err = ok(["inspect", env.adapter], capsys)
    assert err == ""
    assert "LORA" in out and str(env.adapter) in out
    for name in env.changed:
        assert name in out


# ---------------------------------------------------------------------------------------------
# merge and its options
# ---------------------------------------------------------------------------------------------

def test_merge_reports_and_matches_peft(env, tmp_path, capsys):
    out_dir = tmp_path / "merged"
    out, err = ok(["merge", env.base, env.adapter, out_dir], capsys)
    assert out == ""
    summary = [ln.rsplit("\r", 1)[-1].strip() for ln in err.split("\n")]
    summary = [ln for ln in summary if ln]
    assert len(summary) == 1, summary
    assert summary[0].startswith(f"merged {len(env.changed)} module(s), {len(env.changed)} tensor(s) changed "
                                 f"of {len(env.state)}")
    assert str(out_dir) in summary[0]
    ours = load_all(out_dir)
    assert set(ours) == set(env.state)
    assert_close_to(ours, env.expected, rel=1e-5)
    assert {n for n in ours if not torch.equal(ours[n], env.state[n])} == env.changed
    # the non-weight files travel along; adapter files do not
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_quiet(env, tmp_path, capsys):
    out, err = ok(["merge", env.base, env.adapter, tmp_path / "merged", "--quiet"], capsys)
    assert out == "" and err == ""
    out, err = ok(["merge", env.base, env.adapter, tmp_path / "merged2", "-q"], capsys)
    assert out == "" and err == ""
    assert_close_to(load_all(tmp_path / "merged2"), env.expected, rel=1e-5)


def test_overwrite_replaces_previous_output(env, tmp_path, capsys):
    out_dir = tmp_path / "merged"
    ok(["merge", env.base, env.other, out_dir, "-q"], capsys)
    first = load_all(out_dir)
    assert not torch.equal(first["model.layers.0.self_attn.k_proj.weight"],
                           env.state["model.layers.0.self_attn.k_proj.weight"])
    (out_dir / "model-00002-of-00002.safetensors").write_text("a stale shard of an earlier, sharded run")

    code, _, err = run_cli(["merge", env.base, env.adapter, out_dir, "-q"], capsys)
    assert code == 1 and "--overwrite" in err
    assert torch.equal(load_all(out_dir)["model.layers.0.self_attn.k_proj.weight"],
                       first["model.layers.0.self_attn.k_proj.weight"])

    ok(["merge", env.base, env.adapter, out_dir, "-q", "--overwrite"], capsys)
    assert not (out_dir / "model-00002-of-00002.safetensors").exists()
    assert_close_to(load_all(out_dir), env.expected, rel=1e-5)
    assert not list(tmp_path.glob(".merged.wsurgery-*"))


@pytest.mark.parametrize("flag, dtype", [("bf16", torch.bfloat16), ("float16", torch.float16),
                                         ("bfloat16", torch.bfloat16)])
def test_dtype_option(env, tmp_path, capsys, flag, dtype):
    out_dir = tmp_path / "merged"
    ok(["merge", env.base, env.adapter, out_dir, "-q", "--dtype", flag], capsys)
    entries = st_entries(out_dir / "model.safetensors")
    assert {d for d, _ in entries.values()} == {ST_DTYPE[dtype]}
    config = json.loads((out_dir / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(dtype).removeprefix("torch.")
    # one rounding of the float32 merge: PEFT's result rounded to the new dtype, give or take one ulp
    assert_close_to(load_all(out_dir), {k: v.to(dtype) for k, v in env.expected.items()}, ulps=1)


def test_dtype_option_float32_keeps_values(env, tmp_path, capsys):
    out_dir = tmp_path / "merged"
    ok(["merge", env.base, env.adapter, out_dir, "-q", "--dtype", "float32"], capsys)
    assert_close_to(load_all(out_dir), env.expected, rel=1e-5)


def test_max_shard_size(env, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    limit = 30_000
    out_dir = tmp_path / "merged"
    ok(["merge", env.base, env.adapter, out_dir, "-q", "--max-shard-size", "30KB"], capsys)
    shards = sorted(out_dir.glob("*.safetensors"))
    total = sum(t.numel() * t.element_size() for t in env.state.values())
    assert len(shards) >= math.ceil(total / limit) >= 2
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    seen = {}
    for shard in shards:
        entries = st_entries(shard)
        size = sum(math.prod(s) * 4 for _, s in entries.values())
        assert size <= limit or len(entries) == 1, f"{shard.name}: {size} bytes"
        for name in entries:
            assert name not in seen
            seen[name] = shard.name
    assert seen == index["weight_map"]
    assert set(seen) == set(env.state)
    assert_close_to(load_all(out_dir), env.expected, rel=1e-5)
    # transformers reads the sharded output
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).state_dict()
    assert_close_to({k: reloaded[k] for k in env.state}, env.expected, rel=1e-5)


def test_max_shard_size_large_gives_one_file(env, tmp_path, capsys):
    sharded = save_base(tiny_llama(seed=7), tmp_path / "sharded", max_shard_size="30KB")
    out_dir = tmp_path / "merged"
    ok(["merge", sharded, env.adapter, out_dir, "-q", "--max-shard-size", "5GB"], capsys)
    assert sorted(p.name for p in out_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out_dir / "model.safetensors.index.json").exists()
    assert_close_to(load_all(out_dir), env.expected, rel=1e-5)


def test_merge_then_unmerge_round_trip(env, tmp_path, capsys):
    ok(["merge", env.base, env.adapter, tmp_path / "merged", "-q"], capsys)
    out, err = ok(["unmerge", tmp_path / "merged", env.adapter, tmp_path / "unmerged"], capsys)
    assert out == ""
    assert any(ln.strip().startswith("unmerged ") for ln in err.replace("\r", "\n").splitlines())
    back = load_all(tmp_path / "unmerged")
    merged = load_all(tmp_path / "merged")
    for name, t in back.items():
        # W + ΔW − ΔW in float32: off by a few roundings of the larger of |W|, |ΔW|
        bound = 4 * torch.finfo(torch.float32).eps * max(merged[name].abs().max().item(),
                                                         env.state[name].abs().max().item(), 1e-30)
        assert (t.double() - env.state[name].double()).abs().max().item() <= bound, name


def test_console_script_entry_point():
    """``wsurgery`` as installed is the same ``main``."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "wsurgery"]
    assert ep.load() is main


def test_method_options_reach_the_method_or_are_refused(env, tmp_path, capsys):
    """--task-id means nothing to LoRA: one-line refusal, no output. --experts-not-transposed is a LoRA option."""
    code, _, err = run_cli(["merge", str(env.base), str(env.adapter), str(tmp_path / "out"), "--task-id", "2"],
                           capsys)
    assert code == 1 and err.strip().count("\n") == 0
    assert "task_id do not apply to LORA" in err and not (tmp_path / "out").exists()
    ok(["merge", str(env.base), str(env.adapter), str(tmp_path / "out2"), "--experts-not-transposed", "-q"], capsys)
    assert (tmp_path / "out2" / "model.safetensors").is_file()


def test_methods_table(capsys):
    out, _ = ok(["methods"], capsys)
    assert out.startswith("| method |") and "| LoRA" in out and "`PROMPT_TUNING`" in out
    rows = json.loads(ok(["methods", "--json"], capsys)[0])
    assert {"name", "layers", "merge", "unmerge", "peft_versions"} <= set(rows["mergeable"][0])


@pytest.mark.parametrize("argv", [["merge", "a"], ["verify", "--tokens", "0", "a", "b", "c"], ["nosuch"],
                                  ["merge", "a", "b", "c", "--scale", "x"]])
def test_usage_errors_are_one_line(argv, capsys):
    """A mistyped command line is bad input like any other: one line, exit 2, no usage block."""
    status, stdout, stderr = run_cli(argv, capsys)
    assert status == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsurgery: error: ") and "--help" in lines[0], stderr
