"""The README quick start, run on the committed fixtures, checked against PEFT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from oracle import assert_close_to, load_all, oracle_merge, run_cli

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def wsurgery(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsurgery.cli", *args], capture_output=True, text=True)


def test_quickstart_merge_and_unmerge_on_fixtures(tmp_path):
    base, adapter = FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-lora"
    r = wsurgery("merge", str(base), str(adapter), str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    merged_dir = tmp_path / "merged"
    # Same layout as the base: shards, index, config, generation config, tokenizer.
    assert sorted(p.name for p in merged_dir.iterdir()) == sorted(p.name for p in base.iterdir())
    expected = oracle_merge(LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter)
    base_tensors = load_all(base)
    assert_close_to(load_all(merged_dir), expected, base=base_tensors)
    # transformers loads our output.
    LlamaForCausalLM.from_pretrained(merged_dir)

    r = wsurgery("unmerge", str(merged_dir), str(adapter), str(tmp_path / "unmerged"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert_close_to(load_all(tmp_path / "unmerged"), base_tensors, base=load_all(merged_dir), ulps=2)


def test_readme_quick_start_commands_run_as_written(tmp_path, capsys, monkeypatch):
    """Every command of README's quick start block runs (its /tmp paths moved into the test's folder)."""
    readme = (FIXTURES.parent / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].split() for line in block.splitlines() if line.startswith("wsurgery ")]
    assert [line[1] for line in lines] == ["inspect", "inspect", "merge", "unmerge"]
    monkeypatch.chdir(FIXTURES.parent)
    for line in lines:
        args = [str(tmp_path / a[len("/tmp/"):]) if a.startswith("/tmp/") else a for a in line[1:]]
        code, _, err = run_cli(args, capsys)
        assert code == 0, f"{' '.join(line)}: {err}"
    assert (tmp_path / "base-again" / "config.json").exists()
