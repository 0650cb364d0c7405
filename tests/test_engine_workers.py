"""``--workers``: several threads read, compute and write different tensors at once. The output must be the
same bytes whatever their number, and a failure must leave nothing behind, as with one."""

from __future__ import annotations

import filecmp
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oracle import run_cli

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BASE, LORA = FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-lora"


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".json") and p.name != "config.json")
    assert names == sorted(p.name for p in b.iterdir() if p.suffix in (".safetensors", ".json")
                           and p.name != "config.json")
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.parametrize("command", [["merge", BASE, LORA], ["unmerge", BASE, LORA], ["quantize", BASE],
                                     ["merge", BASE, LORA, "--dtype", "float32"]])
def test_the_output_does_not_depend_on_the_workers(tmp_path, capsys, command):
    for workers in (1, 3):
        assert run_cli([*command, tmp_path / f"w{workers}", "-q", "--workers", workers], capsys)[0] == 0
    _same_files(tmp_path / "w1", tmp_path / "w3")


def test_quantize_report_lists_weights_in_file_order_with_workers(tmp_path, capsys):
    reports = []
    for workers in (1, 3):
        report = tmp_path / f"r{workers}.json"
        assert run_cli(["quantize", BASE, tmp_path / f"q{workers}", "-q", "--workers", workers, "--report", report],
                       capsys)[0] == 0
        reports.append(json.loads(report.read_text()))
    assert reports[0] == reports[1]


def test_a_failure_with_workers_leaves_nothing(tmp_path, capsys):
    """An adapter tensor with inf: refused while the other workers run; OUT absent, no temporary left."""
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text((LORA / "adapter_config.json").read_text())
    tensors = load_file(LORA / "adapter_model.safetensors")
    last = sorted(k for k in tensors if "lora_B" in k)[-1]
    tensors[last] = torch.full_like(tensors[last], float("inf"))
    save_file(tensors, adapter / "adapter_model.safetensors")
    status, _, stderr = run_cli(["merge", BASE, adapter, tmp_path / "out", "-q", "--workers", 4], capsys)
    assert status == 1 and "inf or NaN" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_workers_must_be_positive(tmp_path, capsys):
    status, _, stderr = run_cli(["merge", BASE, LORA, tmp_path / "out", "--workers", 0], capsys)
    assert status == 2 and "--workers" in stderr


def test_gguf_outputs_do_not_depend_on_the_workers(tmp_path, capsys):
    """A merge into a Q8_0 GGUF and a requantization to Q4_0: the GGUF writer places each tensor at its
    offset, so workers may finish in any order."""
    from gguf import GGMLQuantizationType as T
    from gguf_tiny import tiny_llama as gguf_llama, write_llama_gguf
    from peft import LoraConfig

    from oracle import make_adapter

    model = gguf_llama()
    base = write_llama_gguf(model, tmp_path / "base.gguf", T.Q8_0)
    lora = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                          init_lora_weights=False), tmp_path / "lora")
    for workers in (1, 3):
        assert run_cli(["merge", base, lora, tmp_path / f"m{workers}.gguf", "-q", "--workers", workers], capsys)[0] == 0
        assert run_cli(["quantize", base, tmp_path / f"q{workers}.gguf", "--gguf-type", "q4_0", "-q",
                        "--workers", workers], capsys)[0] == 0
    assert filecmp.cmp(tmp_path / "m1.gguf", tmp_path / "m3.gguf", shallow=False)
    assert filecmp.cmp(tmp_path / "q1.gguf", tmp_path / "q3.gguf", shallow=False)


def test_verify_reports_the_same_whatever_the_workers(tmp_path, capsys):
    merged = tmp_path / "merged"
    assert run_cli(["merge", BASE, LORA, merged, "-q"], capsys)[0] == 0
    reports = []
    for workers in (1, 3):
        status, out, _ = run_cli(["verify", BASE, LORA, merged, "-q", "--workers", workers, "--json"], capsys)
        assert status == 0
        report = json.loads(out)
        report.pop("seconds", None)
        reports.append(report)
    assert reports[0] == reports[1]


def _same_adapters(a: Path, b: Path) -> None:
    """The same tensors, bit for bit, and config (the recorded command lines differ by their --workers)."""
    assert filecmp.cmp(a / "adapter_config.json", b / "adapter_config.json", shallow=False)
    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert list(first) == list(second)
    for name, tensor in first.items():
        assert tensor.dtype == second[name].dtype and torch.equal(tensor, second[name]), name


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_extract_does_not_depend_on_the_workers(tmp_path, capsys, svd):
    """Modules are factorised on several threads; randomized SVDs draw from torch's one global generator,
    so they must still draw the same numbers whatever the number of threads."""
    tuned = tmp_path / "tuned"
    assert run_cli(["merge", BASE, LORA, tuned, "-q"], capsys)[0] == 0
    for workers in (1, 3):
        assert run_cli(["extract", BASE, tuned, tmp_path / f"w{workers}", "--rank", "2", "--svd", svd, "-q",
                        "--workers", workers], capsys)[0] == 0
    _same_adapters(tmp_path / "w1", tmp_path / "w3")
    serial = load_file(tmp_path / "w1" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for t in serial.values())


@pytest.mark.parametrize("to", ["lora", "loha", "oft"])
def test_convert_does_not_depend_on_the_workers(tmp_path, capsys, to):
    for workers in (1, 3):
        assert run_cli(["convert", LORA, tmp_path / f"w{workers}", "--to", to, "--base", BASE, "-q", "--force",
                        "--workers", workers], capsys)[0] == 0
    _same_adapters(tmp_path / "w1", tmp_path / "w3")


def test_randomized_svds_on_several_threads_draw_what_one_thread_draws():
    """torch.svd_lowrank draws from torch's global generator: concurrent calls must not interleave draws."""
    from concurrent.futures import ThreadPoolExecutor

    from wsurgery.convert.extract import RankRule, truncated_svd

    g = torch.Generator().manual_seed(1)
    matrices = [torch.randn(48, 48, generator=g) for _ in range(400)]
    rule = RankRule(2, None, None)
    serial = [truncated_svd(m.clone(), rule, svd="randomized").B for m in matrices]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two steps, as they may under load
    try:
        with ThreadPoolExecutor(8) as pool:
            threaded = list(pool.map(lambda m: truncated_svd(m.clone(), rule, svd="randomized").B, matrices))
    finally:
        sys.setswitchinterval(interval)
    assert all(torch.equal(a, b) for a, b in zip(serial, threaded))
