"""Where the output goes: nothing of the user's is lost, no input changes, every path is checked first.

* --overwrite replaces only a folder wsurgery could have written (checkpoint, adapter, config,
  tokenizer and card files, or files named as in an input folder: the side files it copies), and for a
  one-file output only a regular file;
* OUT is never an input, inside one, or holding one, also through symbolic links; never a symbolic
  link itself, '.', '..' or the current folder;
* the files a command writes beside OUT (--report, --plot, --json) are checked before any work;
* what an interrupted run left behind (its PID dead) is removed by the next run on the same OUT,
  with one note; a live run's is left alone.

Refusals are checked with ``assert_refused``: exit 1, one stderr line naming the path, no traceback,
no OUT, no temporary sibling, inputs byte for byte unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from peft import LoraConfig

from oracle import load_all, make_adapter, run_cli, save_base, tiny_llama
from test_bad_input import assert_refused, leftovers, screen_lines, snapshot

import wsurgery.api as api
from wsurgery.checkpoint.output import check_output_file, temporary_sibling
from wsurgery.errors import InputError


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model = tiny_llama()
    base = save_base(model, root / "base")
    lora = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), root / "lora")
    return SimpleNamespace(base=base, lora=lora)


@pytest.fixture
def work(assets, tmp_path):
    return SimpleNamespace(base=Path(shutil.copytree(assets.base, tmp_path / "base")),
                           adapter=Path(shutil.copytree(assets.lora, tmp_path / "adapter")), out=tmp_path / "out")


def merge(work, out, *extra):
    return ["merge", work.base, work.adapter, out, "-q", *extra]


# ---------------------------------------------------------------------------------------------
# --overwrite
# ---------------------------------------------------------------------------------------------

def test_overwrite_refuses_a_folder_of_the_users_files(work, capsys):
    work.out.mkdir()
    (work.out / "thesis.txt").write_text("four years of work")
    (work.out / "docs").mkdir()
    (work.out / "docs" / "notes.md").write_text("notes")
    (work.out / "config.json").write_text("{}")
    before = snapshot(work.out)
    code, _, err = run_cli(merge(work, work.out, "--overwrite"), capsys)
    assert code == 1
    lines = screen_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"wsurgery: error: {work.out}:"), lines
    assert "thesis.txt" in lines[0] and "docs/" in lines[0] and "config.json" not in lines[0]
    assert snapshot(work.out) == before
    assert leftovers(work.out) == []


def test_overwrite_replaces_a_folder_of_checkpoint_files(work, capsys):
    """The control: what wsurgery writes, and files named as in the base folder (copied from it)."""
    (work.base / "LICENSE").write_text("the base's license, copied into every output")
    code, _, err = run_cli(merge(work, work.out), capsys)
    assert code == 0, err
    assert (work.out / "LICENSE").is_file()
    written = sorted(p.name for p in work.out.iterdir())
    for name in ("model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "README.md",
                 ".gitattributes", "adapter_config.json", "pytorch_model.bin", "tokenizer.model"):
        (work.out / name).write_text("stale")
    code, _, err = run_cli(merge(work, work.out, "--overwrite"), capsys)
    assert code == 0, err
    assert sorted(p.name for p in work.out.iterdir()) == written
    assert load_all(work.out)
    assert leftovers(work.out) == []


def test_overwrite_of_a_one_file_output_needs_a_regular_file(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        check_output_file(fifo, [], overwrite=True)
    link = tmp_path / "link.gguf"
    link.symlink_to(tmp_path / "elsewhere.gguf")
    with pytest.raises(InputError, match="symbolic link"):
        check_output_file(link, [], overwrite=True)
    (tmp_path / "plain.gguf").write_bytes(b"GGUF")
    check_output_file(tmp_path / "plain.gguf", [], overwrite=True)


# ---------------------------------------------------------------------------------------------
# OUT and the inputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_out_inside_an_input_is_refused(work, capsys, overwrite):
    extra = ["--overwrite"] if overwrite else []
    link = work.base.parent / "link-to-base"
    link.symlink_to(work.base)
    for out in (work.base / "merged", work.base / "x.safetensors.index.json", work.adapter / "merged",
                link / "merged"):
        assert_refused(capsys, merge(work, out, *extra), out, [work.base, work.adapter], [out, "inside the input"])
    assert load_all(work.base)  # still opens


def test_out_beside_a_lone_weights_file_is_fine(work, capsys):
    """The control: the folder of a weights file given alone is not an input (unless it is a model folder)."""
    downloads = work.out.parent / "downloads"
    downloads.mkdir()
    shutil.copy(work.base / "model.safetensors", downloads / "model.safetensors")
    code, _, err = run_cli(["merge", downloads / "model.safetensors", work.adapter, downloads / "merged", "-q"], capsys)
    assert code == 0, err
    assert load_all(downloads / "merged")
    out = work.base / "merged"  # the base folder is a model folder: refused even when its file is named
    assert_refused(capsys, ["merge", work.base / "model.safetensors", work.adapter, out], out,
                   [work.base, work.adapter], [out, "inside the input"])


def test_out_a_link_is_refused(work, capsys):
    """A dangling link (the rename would fail after all the work) and a link to the base."""
    dangling = work.out.parent / "dangling"
    dangling.symlink_to(work.out.parent / "nowhere")
    to_base = work.out.parent / "link-to-base"
    to_base.symlink_to(work.base)
    before = snapshot(work.base, work.adapter)
    for link in (dangling, to_base):
        code, _, err = run_cli(merge(work, link, "--overwrite"), capsys)
        assert code == 1 and len(screen_lines(err)) == 1 and f"{link}: is a symbolic link" in err, err
        assert link.is_symlink() and leftovers(link) == []
    assert not (work.out.parent / "nowhere").exists()
    assert snapshot(work.base, work.adapter) == before


@pytest.mark.parametrize("name", [".", ".."])
def test_out_dot_or_dotdot_is_refused(work, capsys, monkeypatch, name):
    here = work.out.parent / "here" / "deeper"
    here.mkdir(parents=True)
    (here / "model.safetensors").write_text("not mine to replace")
    monkeypatch.chdir(here)
    before = snapshot(work.out.parent / "here")
    code, _, err = run_cli(merge(work, name, "--overwrite"), capsys)
    assert code == 1 and len(screen_lines(err)) == 1 and "Traceback" not in err, err
    assert snapshot(work.out.parent / "here") == before
    assert not [p for p in work.out.parent.rglob("*wsurgery-*")]


def test_out_parent_is_a_file(work, capsys):
    parent = work.out.parent / "a-file"
    parent.write_text("x")
    assert_refused(capsys, merge(work, parent / "out"), parent / "out", [work.base, work.adapter],
                   [parent, "not a folder"])


# ---------------------------------------------------------------------------------------------
# files written beside OUT: checked before any work
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def tuned(work, capsys):
    folder = work.base.parent / "tuned"
    code, _, err = run_cli(merge(work, folder), capsys)
    assert code == 0, err
    return folder


@pytest.mark.parametrize("option", ["--report", "--plot"])
def test_extract_side_file_checked_before_writing_out(work, tuned, capsys, option):
    missing = work.out.parent / "missing" / "r.out"
    assert_refused(capsys, ["extract", work.base, tuned, work.out, "--rank", "2", option, missing], work.out,
                   [work.base, tuned], [missing.parent, option])
    folder = work.out.parent / "a-folder"
    folder.mkdir()
    assert_refused(capsys, ["extract", work.base, tuned, work.out, "--rank", "2", option, folder], work.out,
                   [work.base, tuned], [folder, "folder"])
    inside = work.base / "report.json"
    assert_refused(capsys, ["extract", work.base, tuned, work.out, "--rank", "2", option, inside], work.out,
                   [work.base, tuned], [inside, "inside the input"])


def test_verify_json_checked_before_the_forward_passes(work, tuned, capsys, monkeypatch):
    def ran(*a, **k):
        raise AssertionError("verify ran before the refusal")
    monkeypatch.setattr(api, "verify", ran)
    missing = work.out.parent / "missing" / "v.json"
    assert_refused(capsys, ["verify", work.base, work.adapter, tuned, "--json", missing], work.out,
                   [work.base, work.adapter, tuned], [missing.parent, "--json"])


# ---------------------------------------------------------------------------------------------
# leftovers of interrupted runs
# ---------------------------------------------------------------------------------------------

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_dead_run_are_removed_with_a_note(work, capsys):
    pid = dead_pid()
    tmp = temporary_sibling(work.out, "tmp", pid)
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\0" * 1000)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        busy = temporary_sibling(work.out, "tmp", live.pid)
        busy.mkdir()
        other = temporary_sibling(work.out.parent / "other", "tmp", pid)  # another OUT's
        other.mkdir()
        code, _, err = run_cli(merge(work, work.out), capsys)
        assert code == 0, err
        assert screen_lines(err) == [f"wsurgery: note: removed {tmp} left by an interrupted run (pid {pid})"]
        assert not tmp.exists() and busy.is_dir() and other.is_dir()
        assert load_all(work.out)
    finally:
        live.kill()
        live.wait()


def test_an_old_out_caught_mid_swap_is_put_back(work, capsys):
    """Killed (SIGKILL) between the two renames of a swap, where no exchange exists: OUT is missing and
    the old one is under its temporary name; the next run puts it back before deciding anything."""
    pid = dead_pid()
    old = temporary_sibling(work.out, "old", pid)
    old.mkdir()
    (old / "model.safetensors").write_text("the previous result")
    code, _, err = run_cli(merge(work, work.out), capsys)
    assert code == 1
    lines = screen_lines(err)
    assert lines[0] == f"wsurgery: note: restored {work.out} from {old.name} left by an interrupted run (pid {pid})"
    assert lines[1].startswith(f"wsurgery: error: {work.out}: already exists") and len(lines) == 2
    assert (work.out / "model.safetensors").read_text() == "the previous result"
    assert leftovers(work.out) == []
