"""Output folders that appear whole or not at all, and the non-weight files that travel with them."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError

# Files that belong to the weights (rewritten, never copied) or that would describe the wrong thing.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
_NEVER_COPY = {"README.md", "adapter_config.json", ".gitattributes"}

# The one naming convention of wsurgery's temporary siblings: ``.OUT.wsurgery-tmp-PID`` (the output being
# written) and ``.OUT.wsurgery-old-PID`` (the old OUT while --overwrite swaps it out).
_TEMPORARY = re.compile(r"^\.(?P<out>.+)\.wsurgery-(?P<kind>tmp|old)-(?P<pid>\d+)$")


def temporary_sibling(out: Path, kind: str, pid: int | None = None) -> Path:
    """The temporary sibling of ``out`` of ``kind`` ("tmp" or "old") for process ``pid`` (this one)."""
    return out.parent / f".{out.name}.wsurgery-{kind}-{os.getpid() if pid is None else pid}"


def is_temporary_name(name: str) -> bool:
    """Whether a file or folder name is one of wsurgery's temporary siblings."""
    return _TEMPORARY.match(name) is not None


def check_output_path(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an OUT that exists (unless overwrite) or that is, or contains, one of the inputs."""
    out_r = out.resolve()
    for inp in inputs:
        inp_r = inp.resolve()
        if out_r == inp_r or out_r in inp_r.parents:
            raise InputError(f"{out}: the output would overwrite the input {inp}; choose another OUT folder")
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; choose a new folder or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: the parent folder of OUT does not exist")


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; rename it to ``out`` only if the block succeeds.

    On any error, including Ctrl-C, the temporary folder is removed and ``out`` is untouched.
    """
    tmp = temporary_sibling(out, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(f"{out}: appeared while writing; not replacing it without --overwrite")
        old = temporary_sibling(out, "old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def check_output_file(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """``check_output_path`` for an output that is one file (a ``.gguf``)."""
    if out.is_dir():
        raise InputError(f"{out}: is a folder; the output is one file, choose a file name")
    for inp in inputs:
        if out.resolve() == inp.resolve():
            raise InputError(f"{out}: the output would overwrite the input {inp}; choose another file name")
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; choose a new file name or pass --overwrite")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: the folder of OUT does not exist")


@contextmanager
def atomic_output_file(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling file of ``out``, renamed to ``out`` only if the block succeeds."""
    tmp = temporary_sibling(out, "tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if out.exists() and not overwrite:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{out}: appeared while writing; not replacing it without --overwrite")
    os.replace(tmp, out)


def copy_side_files(src_folder: Path, dst_folder: Path, skip: set[str] = frozenset()) -> list[str]:
    """Copy config, generation config, tokenizer and other small non-weight files; return their names."""
    copied = []
    for p in sorted(src_folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name in _NEVER_COPY or p.name in skip or p.name.endswith(".index.json"):
            continue
        if p.suffix in _WEIGHT_SUFFIXES or p.name.startswith("adapter_model"):
            continue
        shutil.copy2(p, dst_folder / p.name)
        copied.append(p.name)
    return copied
