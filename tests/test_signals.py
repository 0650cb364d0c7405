"""SIGINT, SIGTERM and SIGHUP, once or twice, at any moment, end a run in one state or the other.

The contract, checked on a real ``wsurgery merge`` process writing a 128 MB checkpoint:

* exit status 128 + the signal (130, 143, 129) and exactly one line on stderr, no traceback;
* OUT is either absent (or, with --overwrite, the old OUT byte for byte), or complete; never both,
  and no ``.OUT.wsurgery-*`` temporary sibling is left;
* the inputs are untouched.

Signals are sent on observable states (the temporary folder's weights file exists; torch's library is
mapped into the process), never after a guessed delay. The moments too short to hit from outside (the
final rename or swap, the clean-up) are hit from inside: the signal is sent by the very call that
renames or removes, in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from oracle import run_cli
from test_bad_input import leftovers, screen_lines

import wsurgery.checkpoint.output as output
import wsurgery.engine as engine
from wsurgery.cli import main

LAYERS, SIZE = 8, 2048  # 8 float32 matrices of 2048x2048: 128 MB, seconds of writing on a loaded machine
CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A base of zeros, a LoRA on every matrix, and the uninterrupted merge of the two."""
    root = tmp_path_factory.mktemp("signals")
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(LAYERS)]
    save_file({f"{n}.weight": torch.zeros(SIZE, SIZE) for n in names}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    g = torch.Generator().manual_seed(0)
    save_file({f"base_model.model.{n}.lora_{ab}.weight": torch.randn(shape, generator=g)
               for n in names for ab, shape in (("A", (4, SIZE)), ("B", (SIZE, 4)))},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["q_proj"]}))
    reference = root / "reference"
    main(["merge", str(base), str(adapter), str(reference), "-q"])
    return SimpleNamespace(base=base, adapter=adapter, reference=digest(reference), reference_dir=reference,
                           inputs={**digest(base), **{"a/" + k: v for k, v in digest(adapter).items()}})


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wsurgery.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 120) -> None:
    """Poll ``condition`` until it holds; fail (with the process's stderr) if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def writing(proc: subprocess.Popen, out: Path):
    weights = output.temporary_sibling(out, "tmp", proc.pid) / "model.safetensors"
    return weights.exists


def send(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:  # already gone: the second signal came after the end
        pass


def check_stopped(proc: subprocess.Popen, sigs: tuple[int, ...], out: Path, big,
                  old: dict[str, str] | None = None) -> str:
    """The whole contract for a run stopped by one of ``sigs`` (signals that arrive together are
    handled in signal-number order, so either may be the one); return its one stderr line."""
    _, stderr = proc.communicate(timeout=120)
    by_code = {CODES[s]: s for s in sigs}
    assert proc.returncode in by_code, f"exit {proc.returncode}: {stderr}"
    assert "Traceback" not in stderr, stderr
    lines = screen_lines(stderr)
    name = signal.Signals(by_code[proc.returncode]).name
    assert len(lines) == 1 and lines[0].startswith(f"wsurgery: interrupted ({name})"), lines
    assert leftovers(out) == []
    if old is None:
        assert not out.exists() and "no output was left behind" in lines[0], lines
    else:
        assert digest(out) == old
    assert {**digest(big.base), **{"a/" + k: v for k, v in digest(big.adapter).items()}} == big.inputs
    return lines[0]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_one_signal_while_writing(big, tmp_path, sig):
    out = tmp_path / "out"
    proc = start("merge", big.base, big.adapter, out, "-q")
    wait_for(proc, writing(proc, out), "the output was being written")
    send(proc, sig)
    check_stopped(proc, (sig,), out, big)


@pytest.mark.parametrize("first, second, when", [
    (signal.SIGINT, signal.SIGINT, "at once"),  # lands while the first unwinds and cleans up
    (signal.SIGTERM, signal.SIGHUP, "after the clean-up"),
])
def test_two_signals_while_writing(big, tmp_path, first, second, when):
    out = tmp_path / "out"
    proc = start("merge", big.base, big.adapter, out, "-q")
    wait_for(proc, writing(proc, out), "the output was being written")
    tmp = output.temporary_sibling(out, "tmp", proc.pid)
    send(proc, first)
    if when == "after the clean-up":
        deadline = time.monotonic() + 120
        while tmp.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
    send(proc, second)
    check_stopped(proc, (first,) if when == "after the clean-up" else (first, second), out, big)


def test_signal_while_overwriting_keeps_the_old_out(big, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(big.reference_dir, out)
    (out / "config.json").write_text('{"an": "older result"}')
    old = digest(out)
    proc = start("merge", big.base, big.adapter, out, "-q", "--overwrite")
    wait_for(proc, writing(proc, out), "the output was being written")
    send(proc, signal.SIGTERM)
    send(proc, signal.SIGTERM)
    check_stopped(proc, (signal.SIGTERM,), out, big, old=old)


def test_entry_point_imports_no_torch():
    """The handlers are installed before torch is imported: `import wsurgery.cli` must not import it."""
    probe = subprocess.run([sys.executable, "-c", "import sys, wsurgery.cli; sys.exit('torch' in sys.modules)"],
                           check=False)
    assert probe.returncode == 0


def test_ctrl_c_while_importing_torch(big, tmp_path):
    sig = signal.SIGINT
    out = tmp_path / "out"
    proc = start("merge", big.base, big.adapter, out, "-q")
    maps = Path(f"/proc/{proc.pid}/maps")

    def importing_torch() -> bool:
        try:
            return "libtorch" in maps.read_text()
        except OSError:
            return False
    wait_for(proc, importing_torch, "torch was being imported")
    send(proc, sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == CODES[sig], stderr
    assert "Traceback" not in stderr, stderr
    lines = screen_lines(stderr)
    assert lines == [f"wsurgery: interrupted ({signal.Signals(sig).name}); no output was left behind"], lines
    assert not out.exists() and leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# in-process: a signal sent from inside the final rename or swap, or from inside the clean-up
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    """A tiny base and LoRA, made by hand, for in-process runs."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)}, str(base / "model.safetensors"))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 2)},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                             "target_modules": ["q_proj"]}))
    return SimpleNamespace(base=base, adapter=adapter, out=tmp_path / "out")


def signalling(monkeypatch, owner, attr: str, sig: int, times: int = 1):
    """Make ``owner.attr`` send ``sig`` to this process before doing its work (the first ``times`` calls)."""
    real = getattr(owner, attr)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= times:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, attr, wrapper)
    return calls


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_signal_during_the_overwrite_swap_completes_it(small, capsys, monkeypatch, exchange):
    """The swap is a critical section: a SIGTERM inside it is raised only once the new OUT is in place
    (and the old one removed); the exit says so."""
    run_cli(["merge", small.base, small.adapter, small.out, "-q"], capsys)
    (small.out / "config.json").write_text("the old OUT")
    if exchange:
        calls = signalling(monkeypatch, output, "_rename2", signal.SIGTERM)
        if not output._renameat2():
            pytest.skip("no renameat2 in this C library")
    else:
        monkeypatch.setattr(output, "_renameat2", lambda: None)
        calls = signalling(monkeypatch, os, "rename", signal.SIGTERM)
    code, _, err = run_cli(["merge", small.base, small.adapter, small.out, "-q", "--overwrite"], capsys)
    assert calls["n"] >= 1
    assert code == 143, err
    lines = screen_lines(err)
    assert len(lines) == 1 and "interrupted (SIGTERM)" in lines[0] and "written completely" in lines[0], lines
    assert sorted(p.name for p in small.out.iterdir()) == ["model.safetensors"]  # the new OUT, whole
    assert leftovers(small.out) == []


def test_second_signal_during_the_clean_up_is_ignored(small, capsys, monkeypatch):
    """Ctrl-C while writing, then SIGTERM and Ctrl-C from inside the removal of the temporary folder:
    the removal finishes, the exit is the first signal's."""
    signalling(monkeypatch, engine.CheckpointWriter, "write", signal.SIGINT)
    cleanup = signalling(monkeypatch, output, "_remove", signal.SIGTERM, times=2)
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(output.shutil, "rmtree",
                        lambda path, **kw: (os.kill(os.getpid(), signal.SIGINT), real_rmtree(path, **kw)))
    code, _, err = run_cli(["merge", small.base, small.adapter, small.out, "-q"], capsys)
    assert cleanup["n"] >= 1
    assert code == 130, err
    assert screen_lines(err) == ["wsurgery: interrupted (SIGINT); no output was left behind"]
    assert not small.out.exists() and leftovers(small.out) == []


def test_handlers_are_put_back_after_an_in_process_run(small, capsys):
    before = {s: signal.getsignal(s) for s in CODES}
    run_cli(["merge", small.base, small.adapter, small.out, "-q"], capsys)
    run_cli(["merge", small.base, small.adapter, small.out, "-q"], capsys)  # refused: exists
    assert {s: signal.getsignal(s) for s in CODES} == before
