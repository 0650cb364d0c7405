"""Reading files that may be anything: opened without blocking, parsed with bounded depth and exact rules.

A path named like a checkpoint may be a FIFO (opening it waits for a writer forever), a device, or a
JSON file built to crash a parser: nested ten thousand deep, numbers like ``1e400``, keys repeated so
that different readers see different files. Everything here either returns what the file says or
raises ``UntrustedError`` with a message that names no bytes of the file; callers add which file.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

from ..errors import InputError

#: serde_json (which the safetensors crate parses headers with) refuses JSON nested deeper than this.
MAX_JSON_DEPTH = 127
_SURROGATE = re.compile("[\ud800-\udfff]")
_U64_MAX = 2**64 - 1
_I64_MIN = -(2**63)


class UntrustedError(ValueError):
    """What is wrong with a file's content, in words that quote none of it."""


def open_regular(path: Path) -> int:
    """A read-only descriptor for ``path`` if it is a regular file (symlinks followed); refused otherwise.

    Checked before opening (opening some devices has effects) and again on the open descriptor (the
    path may have changed in between); ``O_NONBLOCK`` makes even that open return at once on a FIFO.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise InputError(f"{path}: not a regular file; pass a checkpoint file or the folder that holds it")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise InputError(f"{path}: cannot open: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path}: not a regular file; pass a checkpoint file or the folder that holds it")
    return fd


def pread_exact(fd: int, n: int, offset: int, path: Path) -> bytes:
    """``n`` bytes at ``offset``; a file that ends sooner (or shrank since its size was read) is truncated."""
    parts, done = [], 0
    while done < n:
        chunk = os.pread(fd, min(n - done, 1 << 24), offset + done)
        if not chunk:
            raise InputError(f"{path}: the file ends before its header does; the file is truncated")
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def read_small(path: Path, limit: int, what: str) -> bytes:
    """The whole of a small regular file (an index, a config), refused above ``limit`` bytes."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise InputError(f"{path}: {size} bytes, too large for {what} (at most {limit})")
        return pread_exact(fd, size, 0, path)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def load_json(raw: bytes) -> object:
    """Parse JSON as serde_json does, refusing what it refuses and what two readers could read apart.

    Refused: bytes that are not UTF-8, ``NaN``/``Infinity``, numbers out of the float range, lone
    surrogate escapes, nesting deeper than ``MAX_JSON_DEPTH``, and a key repeated in one object (serde_json
    refuses it for struct fields and keeps the last for maps; other readers keep the first).
    Integers beyond 64 bits come back as floats, and ``-0`` as ``-0.0``, as serde_json reads them.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UntrustedError(f"not valid JSON (not UTF-8 at byte {e.start})") from None
    repeated: list[str] = []
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_float, parse_int=_int,
                           object_pairs_hook=lambda pairs: _object(pairs, repeated))
    except json.JSONDecodeError as e:
        raise UntrustedError(f"not valid JSON ({e.msg.removesuffix(' at')} at character {e.pos})") from None
    except RecursionError:
        raise UntrustedError(f"not valid JSON (nested deeper than {MAX_JSON_DEPTH})") from None
    _check_tree(value)
    if repeated:
        raise UntrustedError(f"ambiguous: the key {shown(repeated[0])} appears twice in one object")
    return value


def shown(text: object, limit: int = 200) -> str:
    """``repr`` of a name taken from a file, cut short: a message stays one readable line."""
    s = repr(text)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _no_constant(name: str) -> object:
    raise UntrustedError(f"not valid JSON ({name} is not a JSON number)")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise UntrustedError("not valid JSON (a number out of range)")
    return value


def _int(text: str) -> int | float:
    if text == "-0":
        return -0.0
    try:
        value = int(text)
        return value if _I64_MIN <= value <= _U64_MAX else float(value)
    except (ValueError, OverflowError):  # past Python's digit limit, or past the float range
        raise UntrustedError("not valid JSON (a number out of range)") from None


def _object(pairs: list[tuple[str, object]], repeated: list[str]) -> dict[str, object]:
    """A JSON object; its first repeated key, if any, goes to ``repeated`` (reported once parsing is done)."""
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            repeated.append(key)
        obj[key] = value
    return obj


def _check_tree(value: object) -> None:
    """Depth and lone surrogates, walked without recursion (the tree may be as deep as Python parsed)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii() and _SURROGATE.search(node):
                raise UntrustedError("not valid JSON (a lone surrogate in a \\u escape)")
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise UntrustedError(f"not valid JSON (nested deeper than {MAX_JSON_DEPTH})")
        if isinstance(node, dict):
            stack.extend((k, depth) for k in node)
            stack.extend((v, depth + 1) for v in node.values())
        else:
            stack.extend((v, depth + 1) for v in node)
