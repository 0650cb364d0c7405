"""One name, one meaning: the options every command shares, the old spellings kept hidden, combine's two
argument orders, and the method options made from the methods' own metadata."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from oracle import make_adapter, run_cli, save_base, tiny_llama

from wsurgery import commands
from wsurgery.commands import cli
from wsurgery.methods import Option, registered

COMMANDS = sorted(cli.commands)


def _params(command: str) -> dict[str, click.Parameter]:
    """Every option of ``command`` by each of its spellings."""
    return {opt: p for p in cli.commands[command].params if isinstance(p, click.Option)
            for opt in p.opts + p.secondary_opts}


def _help(command: str) -> str:
    return CliRunner().invoke(cli, [command, "--help"], terminal_width=200).output


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("consistency")
    model = tiny_llama(seed=3)
    base = save_base(model, root / "base")
    a = make_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), root / "a", seed=1)
    b = make_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), root / "b", seed=2)
    return SimpleNamespace(root=root, base=base, a=a, b=b)


# ---------------------------------------------------------------------------------------------
# one name per concept, one meaning per name
# ---------------------------------------------------------------------------------------------

def test_gguf_type_is_one_documented_name():
    for command in ("merge", "quantize", "convert"):
        help_text = _help(command)
        assert "--gguf-type GGML_TYPE" in help_text and " --type" not in help_text
    assert not any(" --type" in _help(c) for c in COMMANDS)


@pytest.mark.parametrize("command, args, value", [
    ("merge", ["B", "A", "O.gguf", "--type", "q8_0"], "q8_0"),
    ("convert", ["A", "O.gguf", "--to", "gguf-lora", "--type", "f16"], "f16"),
    ("quantize", ["S.gguf", "O.gguf", "--type", "q4_0"], "q4_0"),
    ("convert", ["A", "O", "--to", "lora"], "f32"),
])
def test_old_type_spelling_still_parses(command, args, value):
    ctx = cli.commands[command].make_context(command, list(args))
    assert ctx.params["gguf_type"] == value


def test_shared_options_mean_the_same_everywhere():
    """A name two commands share has the same kind (flag or value) and, for the shared definitions, the same help."""
    shared_help = ("--json", "--quiet", "--overwrite", "--device", "--max-shard-size", "--report")
    seen: dict[str, tuple[bool, str | None, str]] = {}
    for command in COMMANDS:
        for name, param in _params(command).items():
            kind = (param.is_flag, param.metavar if param.metavar else None, param.help or "")
            if name in seen:
                assert seen[name][0] == kind[0], f"{command} {name} is a flag in one command, a value in another"
                if name in shared_help and name != "--report":
                    assert seen[name] == kind, f"{command} {name} differs from its other definitions"
            seen.setdefault(name, kind)
    assert all(_params(c)["--json"].is_flag for c in COMMANDS if "--json" in _params(c))
    assert all(_params(c)["--report"].metavar == "PATH" for c in COMMANDS if "--report" in _params(c))
    for command in ("verify", "extract"):
        assert isinstance(_params(command)["--device"].type, click.Choice)
        assert list(_params(command)["--device"].type.choices) == ["auto", "cpu", "cuda"]


def test_every_writing_command_has_quiet_and_overwrite():
    for command in ("merge", "unmerge", "quantize", "dequantize", "extract", "combine", "convert"):
        assert {"--quiet", "-q", "--overwrite"} <= set(_params(command))


def test_quantize_report_writes_json_and_bare_report_keeps_the_table(env, tmp_path, capsys):
    code, out, err = run_cli(["quantize", env.base, tmp_path / "q", "--report", tmp_path / "r.json", "-q"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    names = {t["name"] for t in report["tensors"]}
    assert "model.layers.0.self_attn.q_proj.weight" in names and report["bytes_out"] < report["bytes_in"]
    assert "RMSE" not in out
    code, out, err = run_cli(["quantize", env.base, tmp_path / "q2", "-q", "--report"], capsys)  # the old flag
    assert code == 0, err
    assert "RMSE" in out and "model.layers.0.self_attn.q_proj.weight" in out


# ---------------------------------------------------------------------------------------------
# verify: --json prints, --report PATH writes, the old --json PATH still writes
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def merged(env):
    out = env.root / "merged"
    code = commands.cli.main(["merge", str(env.base), str(env.a), str(out), "-q"], standalone_mode=False)
    assert code is None
    return out


def test_verify_json_report_and_old_spelling(env, merged, tmp_path, capsys):
    paths = [env.base, env.a, merged, "--device", "cpu", "-q"]
    code, out, err = run_cli(["verify", *paths, "--json"], capsys)
    assert code == 0, err
    printed = json.loads(out)
    assert printed["passed"] and printed["modules"] == 2
    code, out, err = run_cli(["verify", *paths, "--report", tmp_path / "new.json"], capsys)
    assert code == 0, err
    written = json.loads((tmp_path / "new.json").read_text())
    assert written.keys() == printed.keys() and written["checks"] == printed["checks"]
    assert out.strip().splitlines()[-1].startswith("PASS")
    code, out, err = run_cli(["verify", env.base, "--json", tmp_path / "old.json", env.a, merged, "-q"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "old.json").read_text())["passed"]
    assert out.strip().splitlines()[-1].startswith("PASS")


# ---------------------------------------------------------------------------------------------
# combine: OUT last (documented) or first (former order); ambiguous cases refused
# ---------------------------------------------------------------------------------------------

def test_combine_accepts_both_orders(env, tmp_path, capsys):
    code, out_last, err = run_cli(["combine", env.a, f"{env.b}:0.5", tmp_path / "last", "-q"], capsys)
    assert code == 0, err
    assert out_last.startswith("module") and err == ""  # --quiet keeps the table, drops the summary
    code, _, err = run_cli(["combine", tmp_path / "first", env.a, f"{env.b}:0.5", "-q"], capsys)
    assert code == 0, err
    last = load_file(tmp_path / "last" / "adapter_model.safetensors")
    first = load_file(tmp_path / "first" / "adapter_model.safetensors")
    assert last.keys() == first.keys() and all(last[k].equal(first[k]) for k in last)
    # an existing empty folder is no adapter: it is OUT, at either end
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["combine", tmp_path / "empty", env.a, "-q", "--overwrite"], capsys)
    assert code == 0, err
    assert (tmp_path / "empty" / "adapter_config.json").exists()


@pytest.mark.parametrize("case", ["two adapters", "two repo ids"])
def test_combine_refuses_an_ambiguous_order(env, tmp_path, capsys, case):
    args = [env.a, env.b] if case == "two adapters" else ["org/lora-a", "org/lora-b"]
    before = sorted(p.name for p in Path(tmp_path).iterdir())
    code, out, err = run_cli(["combine", *args, "--overwrite", "-q"], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "cannot tell whether OUT is" in err
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == before
    assert (env.a / "adapter_config.json").exists() and (env.b / "adapter_config.json").exists()


# ---------------------------------------------------------------------------------------------
# method options come from the methods' metadata
# ---------------------------------------------------------------------------------------------

def _declared() -> dict[str, Option]:
    return {o.name: o for m in registered().values() for o in m.options}


@pytest.mark.parametrize("command", ["merge", "unmerge", "verify"])
def test_method_flags_equal_the_registry(command):
    params = {p.name: p for p in cli.commands[command].params}
    for name, option in _declared().items():
        flag = "--" + name.replace("_", "-")
        param = params[name]
        assert flag in param.opts and param.help == option.help
        if option.negative:
            assert param.secondary_opts == [f"--{option.negative}"]
        assert param.is_flag == (option.type is bool)
    assert _declared(), "no method declares an option: this test would check nothing"


def test_a_new_method_option_becomes_a_flag(monkeypatch):
    method = next(iter(registered().values()))
    monkeypatch.setattr(type(method), "options", (*method.options, Option("fake_knob", "A test knob.", int),
                                                  Option("fake_switch", "A test switch.", bool, "no-fake-switch")))
    seen = {}

    @click.command()
    @commands.method_options
    def probe(options: dict) -> None:
        seen.update(options)

    runner = CliRunner()
    result = runner.invoke(probe, ["--fake-knob", "3", "--no-fake-switch"])
    assert result.exit_code == 0, result.output
    assert seen["fake_knob"] == 3 and seen["fake_switch"] is False
    assert set(seen) == set(_declared())
    assert "A test knob." in runner.invoke(probe, ["--help"]).output
