"""Output folders that appear whole or not at all, and the non-weight files that travel with them.

An output is written under a temporary sibling of OUT and renamed into place at the end; with
--overwrite the new folder and the old OUT are exchanged in one step where the kernel can
(``renameat2(RENAME_EXCHANGE)``). The renames and every clean-up run with signals deferred
(``interrupts.deferred``), so SIGINT, SIGTERM or SIGHUP leave either the new OUT or the old one,
never both and never a temporary sibling; what SIGKILL or a power cut leaves, the next run on the
same OUT removes (or, for an old OUT caught half-swapped, puts back).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import stat
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError
from ..interrupts import deferred, output_written

# Files that belong to the weights (rewritten, never copied) or that would describe the wrong thing.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
_NEVER_COPY = {"README.md", "adapter_config.json", ".gitattributes"}

# The one naming convention of wsurgery's temporary siblings: ``.OUT.wsurgery-tmp-PID`` (the output being
# written) and ``.OUT.wsurgery-old-PID`` (the old OUT while --overwrite swaps it out).
_TEMPORARY = re.compile(r"^\.(?P<out>.+)\.wsurgery-(?P<kind>tmp|old)-(?P<pid>\d+)$")

# What an output folder of wsurgery can hold: --overwrite replaces a folder holding nothing else (or
# files named as in an input folder: the side files copied from there), so that it never deletes a
# folder of the user's own files.
_OUTPUT_FILE = re.compile(r"""^(
    .+\.(safetensors|bin) | .+\.index\.json
    | (generation_|adapter_|preprocessor_|quantize_|scheduler_)?config\.json | model_index\.json
    | tokenizer.* | special_tokens_map\.json | added_tokens\.json | vocab\.(json|txt) | merges\.txt | .+\.model
    | chat_template\.(jinja|json) | README\.md | \.gitattributes
)$""", re.X)

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def temporary_sibling(out: Path, kind: str, pid: int | None = None) -> Path:
    """The temporary sibling of ``out`` of ``kind`` ("tmp" or "old") for process ``pid`` (this one)."""
    return out.parent / f".{out.name}.wsurgery-{kind}-{os.getpid() if pid is None else pid}"


def is_temporary_name(name: str) -> bool:
    """Whether a file or folder name is one of wsurgery's temporary siblings."""
    return _TEMPORARY.match(name) is not None


def _changes_input_folder(folder: Path, out: Path, whole: bool) -> bool:
    """Whether writing ``out`` inside the folder ``folder`` changes an input: always where the folder was
    given as an input (``whole``); else (it may be only the folder of a lone weights file) where it is a
    model or adapter folder, or where ``out`` takes a name the folder's reader would pick up."""
    first = out.relative_to(folder).parts[0]
    return (whole or any((folder / n).is_file() for n in ("config.json", "adapter_config.json", "model_index.json"))
            or any(folder.glob("*.index.json")) or bool(_OUTPUT_FILE.match(first)) or first.endswith(_WEIGHT_SUFFIXES))


def _check_place(out: Path, inputs: list[Path], role: str = "OUT", links: bool = False,
                 whole_folders: bool = False) -> None:
    """Refuse an ``out`` (of ``role``) that is not a plain name in an existing, writable folder, or that
    is, holds or lies inside one of the inputs (symbolic links followed)."""
    if out.name in ("", ".", ".."):
        raise InputError(f"{out}: name the {role} itself (e.g. ../NAME), not '.', '..' or '/'")
    if out.is_symlink() and not links:
        raise InputError(f"{out}: is a symbolic link (to {os.readlink(out)}); give the real path of {role}")
    out_r = out.resolve()
    for inp in inputs:
        inp_r = Path(inp).resolve()
        if out_r == inp_r:
            raise InputError(f"{out}: is the input {inp}; choose another {role}")
        if out_r in inp_r.parents:
            raise InputError(f"{out}: holds the input {inp}; choose another {role}")
        if inp_r in out_r.parents and inp_r.is_dir() and _changes_input_folder(inp_r, out_r, whole_folders):
            raise InputError(f"{out}: is inside the input {inp} and would change it; put {role} elsewhere")
    parent = out.parent
    if not parent.is_dir():
        raise InputError(f"{parent}: the folder of {role} does not exist" if not parent.exists()
                         else f"{parent}: the folder of {role} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{parent}: the folder of {role} is not writable; choose another {role}")
    cwd = Path.cwd().resolve()
    if out.exists() and (out_r == cwd or out_r in cwd.parents):
        raise InputError(f"{out}: is (or holds) the current folder; run from elsewhere or choose another {role}")


def check_output_path(out: Path, inputs: list[Path], overwrite: bool, whole_folders: bool = False) -> None:
    """Refuse an OUT that is, holds or lies inside an input, that exists (unless overwrite), or that
    --overwrite may not replace: anything but a folder of files wsurgery writes. ``whole_folders``: the
    folders among ``inputs`` are inputs themselves, not only the folders of input files."""
    out = Path(out)
    _check_place(out, inputs, whole_folders=whole_folders)
    remove_leftovers(out)
    if not out.exists():
        return
    if not overwrite:
        raise InputError(f"{out}: already exists; choose a new folder or pass --overwrite")
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; --overwrite replaces only an output folder")
    unknown = _foreign(out, [inp for inp in map(Path, inputs) if inp.is_dir()])
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise InputError(f"{out}: holds files wsurgery does not write ({', '.join(unknown[:3])}{more}); --overwrite "
                         "replaces only a folder of checkpoint, adapter, config and tokenizer files: move them away "
                         "or choose another OUT")


def _foreign(folder: Path, inputs: list[Path], depth: int = 0) -> list[str]:
    """What in ``folder`` (an old OUT) wsurgery does not write: files not named as its outputs or as files of
    the input folders, and sub-folders other than an input folder's own (a diffusers pipeline's ``unet/``...)
    that hold anything else, or anything below them."""
    from_inputs = {p.name for inp in inputs for p in inp.iterdir()}
    unknown = []
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():
            subs = [inp / p.name for inp in inputs if (inp / p.name).is_dir() and not (inp / p.name).is_symlink()]
            if depth or not subs:
                unknown.append(p.name + "/")
            else:
                unknown += [f"{p.name}/{n}" for n in _foreign(p, subs, depth + 1)]
        elif not (_OUTPUT_FILE.match(p.name) or p.name in from_inputs):
            unknown.append(p.name)
    return sorted(unknown)


def check_output_file(out: Path, inputs: list[Path], overwrite: bool, whole_folders: bool = False) -> None:
    """``check_output_path`` for an output that is one file (a ``.gguf``): --overwrite replaces only a
    regular file."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{out}: is a folder; the output is one file, choose a file name")
    _check_place(out, inputs, whole_folders=whole_folders)
    remove_leftovers(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; choose a new file name or pass --overwrite")
    if out.exists() and not stat.S_ISREG(out.stat().st_mode):
        raise InputError(f"{out}: exists and is not a regular file; --overwrite replaces only a file")


def check_written_file(path: Path, option: str, inputs: list[Path], out: Path | None = None) -> None:
    """Refuse, before any work, a file a command writes beside its output (``option``: --report, --json,
    --plot...) that could not be written there or that would change an input or OUT."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; {option} takes a file name")
    _check_place(path, inputs, option, links=True, whole_folders=True)
    if out is not None and (path.resolve() == Path(out).resolve() or Path(out).resolve() in path.resolve().parents):
        raise InputError(f"{path}: is OUT or inside it; write {option} elsewhere")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode) and not path.is_char_device():
        raise InputError(f"{path}: exists and is not a regular file; choose another file for {option}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process, alive
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(out: Path) -> None:
    """Remove the temporary siblings of ``out`` that a run killed outright (its PID dead) left, with a
    note on stderr; an old OUT caught between the two renames of a swap is put back instead."""
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        m = _TEMPORARY.match(p.name)
        if m is None or m["out"] != out.name:
            continue
        pid = int(m["pid"])
        if pid == os.getpid():  # ours, from an earlier call in this process
            with deferred():
                _remove(p)
            continue
        if _alive(pid):
            continue
        with deferred():
            if m["kind"] == "old" and not os.path.lexists(out):
                p.rename(out)
                done = f"restored {out} from {p.name}"
            else:
                _remove(p)
                done = f"removed {p}"
        print(f"wsurgery: note: {done} left by an interrupted run (pid {pid})", file=sys.stderr)


@functools.cache
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the C library, kernel or file system lacks it."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _put_in_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``, exchanging it with an old OUT under --overwrite.
    Called with signals deferred."""
    if not os.path.lexists(out):
        try:
            if not _rename2(tmp, out, _RENAME_NOREPLACE):
                tmp.rename(out)
            return
        except FileExistsError:
            pass  # appeared meanwhile: treated below
    if not overwrite:
        raise InputError(f"{out}: appeared while writing; not replacing it without --overwrite")
    if _rename2(tmp, out, _RENAME_EXCHANGE):
        _remove(tmp)  # now the old OUT
        return
    old = temporary_sibling(out, "old")
    out.rename(old)
    tmp.rename(out)
    _remove(old)


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; rename it to ``out`` only if the block succeeds.

    On any error or signal the temporary folder is removed and ``out`` is untouched.
    """
    out = Path(out)
    tmp = temporary_sibling(out, "tmp")
    try:
        with deferred():
            remove_leftovers(out)
            tmp.mkdir()
        yield tmp
        with deferred():
            _put_in_place(tmp, out, overwrite)
            output_written(out)
    except BaseException:
        with deferred():
            if os.path.lexists(tmp):
                _remove(tmp)
        raise


@contextmanager
def atomic_output_file(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling file of ``out``, renamed to ``out`` only if the block succeeds."""
    out = Path(out)
    tmp = temporary_sibling(out, "tmp")
    try:
        with deferred():
            remove_leftovers(out)
        yield tmp
        with deferred():
            if os.path.lexists(out) and not overwrite:
                raise InputError(f"{out}: appeared while writing; not replacing it without --overwrite")
            os.replace(tmp, out)
            output_written(out)
    except BaseException:
        with deferred():
            if os.path.lexists(tmp):
                _remove(tmp)
        raise


def copy_side_files(src_folder: Path, dst_folder: Path, skip: Collection[str] = frozenset()) -> list[str]:
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
