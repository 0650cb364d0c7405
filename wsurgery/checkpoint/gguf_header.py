"""Parse a GGUF header: key/values (with their exact bytes) and tensor infos, without mapping the file.

gguf's ``GGUFReader`` maps the whole file and builds a numpy view per array element, which takes
seconds per tokenizer (7 s for a 32k vocabulary, its three arrays of 32k entries). This reads the
header sequentially instead: numeric arrays in one read, strings one length at a time, and keeps
each key/value's bytes so that a writer can copy it verbatim. Every read is checked against the end
of the file, so a truncated or corrupt header is one clear error.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import InputError, UnsupportedError
from .untrusted import open_regular, shown

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
#: A key/value's decoded value: str, int, float or bool (an int); None for arrays.
KvValue = str | int | float | None
_CHUNK = 1 << 20
#: Arrays of arrays are legal; deeper nesting than any real file uses is refused (the walk recurses).
_MAX_ARRAY_DEPTH = 8


@dataclass(frozen=True)
class KeyValue:
    """One metadata entry: its decoded value (None for arrays) and its bytes as in the file."""

    key: str
    type: GGUFValueType
    value: KvValue
    count: int  # array length (1 for scalars)
    item_type: GGUFValueType | None  # arrays: the element type
    raw: bytes


@dataclass(frozen=True)
class TensorEntry:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (GGUF lists dimensions innermost first)
    offset: int  # absolute


@dataclass(frozen=True)
class Header:
    version: int
    key_values: list[KeyValue]
    tensors: list[TensorEntry]
    alignment: int


class _Cursor:
    """Sequential reads from the file's start, buffered, every one checked against the file size."""

    def __init__(self, path: Path, fd: int):
        self.path, self.size = path, os.fstat(fd).st_size
        self._fd = fd
        self._buf = bytearray()
        self.pos = 0

    def take(self, n: int) -> bytes:
        self.need(n)
        while len(self._buf) < self.pos + n:
            chunk = os.pread(self._fd, max(_CHUNK, self.pos + n - len(self._buf)), len(self._buf))
            if not chunk:
                raise InputError(f"{self.path}: the file ended while its header was read (it shrank?); "
                                 "the file is truncated")
            self._buf += chunk
        out = bytes(self._buf[self.pos: self.pos + n])
        self.pos += n
        return out

    def need(self, n: int) -> None:
        """Refuse before reading (or looping) when ``n`` more bytes cannot be in the file."""
        if self.pos + n > self.size:
            raise InputError(f"{self.path}: the GGUF header runs past the end of the file ({self.size} bytes); "
                             "the file is truncated or corrupt")

    def since(self, start: int) -> bytes:
        return bytes(self._buf[start: self.pos])

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")


def _value_type(raw: int, where: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise InputError(f"{where}: unknown GGUF value type {raw}; the file is corrupt") from None


def _skip_array(cur: _Cursor, item: GGUFValueType, count: int, where: str, depth: int = 1) -> None:
    if depth > _MAX_ARRAY_DEPTH:
        raise InputError(f"{where}: arrays nested more than {_MAX_ARRAY_DEPTH} deep; the file is corrupt")
    if item in _SCALARS:
        cur.take(count * struct.calcsize(_SCALARS[item]))
    elif item == GGUFValueType.STRING:
        cur.need(count * 8)  # each string has at least its 8-byte length
        for _ in range(count):
            cur.take(cur.unpack("<Q"))
    elif item == GGUFValueType.ARRAY:
        cur.need(count * 12)  # each array has at least its type and count
        for _ in range(count):
            inner = _value_type(cur.unpack("<I"), where)
            _skip_array(cur, inner, cur.unpack("<Q"), where, depth + 1)
    else:
        raise InputError(f"{where}: unknown GGUF value type {item}; the file is corrupt")


def _key_value(cur: _Cursor) -> KeyValue:
    start = cur.pos
    key = cur.string()
    where = f"{cur.path}: key {shown(key)}"
    vtype = _value_type(cur.unpack("<I"), where)
    if vtype == GGUFValueType.ARRAY:
        item = _value_type(cur.unpack("<I"), where)
        count = cur.unpack("<Q")
        _skip_array(cur, item, count, where)
        return KeyValue(key, vtype, None, count, item, cur.since(start))
    value = cur.string() if vtype == GGUFValueType.STRING else cur.unpack(_SCALARS[vtype])
    return KeyValue(key, vtype, value, 1, None, cur.since(start))


def _tensor_info(cur: _Cursor) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
    name = cur.string()
    n_dims = cur.unpack("<I")
    if n_dims > 8:
        raise InputError(f"{cur.path}: tensor {shown(name)} claims {n_dims} dimensions; the file is corrupt")
    dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims))
    raw_type = cur.unpack("<I")
    try:
        kind = GGMLQuantizationType(raw_type)
    except ValueError:
        raise UnsupportedError(f"{cur.path}: tensor {shown(name)} has ggml type {raw_type}, which the gguf package "
                               "does not know (a newer llama.cpp type?)") from None
    return name, kind, tuple(reversed(dims)), cur.unpack("<Q")


def read_header(path: Path) -> Header:
    """Parse and check the header of the GGUF file ``path``."""
    fd = open_regular(path)
    try:
        cur = _Cursor(path, fd)
        if cur.size < 4 or cur.take(4) != struct.pack("<I", gguf.GGUF_MAGIC):
            raise InputError(f"{path}: not a GGUF file (no GGUF magic at its start)")
        version = cur.unpack("<I")
        if version & 0xFFFF == 0:
            raise UnsupportedError(f"{path}: a GGUF file for the other byte order (big-endian); not supported")
        if version not in (2, 3):
            raise UnsupportedError(f"{path}: GGUF version {version}; versions 2 and 3 are supported")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        cur.need(n_kv * 13 + n_tensors * 24)  # the smallest key/value and tensor info, so counts are bounded
        key_values = [_key_value(cur) for _ in range(n_kv)]
        infos = [_tensor_info(cur) for _ in range(n_tensors)]
        header_end = cur.pos
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    _check_unique([e.key for e in key_values], path, "key")
    _check_unique([name for name, *_ in infos], path, "tensor")
    alignment = next((e.value for e in key_values if e.key == gguf.Keys.General.ALIGNMENT), gguf.GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise InputError(f"{path}: general.alignment is {shown(alignment)}, not a power of two; the file is corrupt")
    data_start = -(-header_end // alignment) * alignment
    for name, _, _, offset in infos:
        if offset % alignment:
            raise InputError(f"{path}: tensor {shown(name)} has offset {offset}, not a multiple of the alignment "
                             f"{alignment}; the file is corrupt")
    tensors = [TensorEntry(name, kind, shape, data_start + offset) for name, kind, shape, offset in infos]
    return Header(version, key_values, tensors, alignment)


def _check_unique(names: list[str], path: Path, what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InputError(f"{path}: {what} {shown(name)} appears twice; the file is corrupt")
        seen.add(name)


def pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def pack_key_value(key: str, vtype: GGUFValueType, value: KvValue) -> KeyValue:
    """A new scalar or string entry, encoded as GGUF does (little-endian)."""
    data = pack_string(str(value)) if vtype == GGUFValueType.STRING else struct.pack(_SCALARS[vtype], value)
    return KeyValue(key, vtype, value, 1, None, pack_string(key) + struct.pack("<I", vtype) + data)
