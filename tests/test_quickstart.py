"""The README quick start, run on the committed fixtures, checked against PEFT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from oracle import assert_close_to, load_all, oracle_merge

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
