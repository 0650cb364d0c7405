"""Parse a GGUF header: key/values (with their exact bytes) and tensor infos, without mapping the file.

gguf's ``GGUFReader`` maps the whole file and builds a numpy view per array element, which takes
seconds per tokenizer (7 s for a 32k vocabulary, its three arrays of 32k entries). This reads the
header sequentially instead: numeric arrays in one read, strings one length at a time, and keeps
each key/value's bytes so that a writer can copy it verbatim. Every read is checked against the end
of the file, so a truncated or corrupt header is one clear error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import InputError, UnsupportedError

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class KeyValue:
    """One metadata entry: its decoded value (None for arrays) and its bytes as in the file."""

    key: str
    type: GGUFValueType
    value: object  # str, int, float or bool; None for arrays
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

    def __init__(self, path: Path, f: BinaryIO):
        self.path, self.size = path, path.stat().st_size
        self._f = f
        self._buf = bytearray()
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise InputError(f"{self.path}: the GGUF header runs past the end of the file ({self.size} bytes); "
                             "the file is truncated or corrupt")
        while len(self._buf) < self.pos + n:
            self._buf += self._f.read(max(_CHUNK, self.pos + n - len(self._buf)))
        out = bytes(self._buf[self.pos: self.pos + n])
        self.pos += n
        return out

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


def _skip_array(cur: _Cursor, item: GGUFValueType, count: int, where: str) -> None:
    if item in _SCALARS:
        cur.take(count * struct.calcsize(_SCALARS[item]))
    elif item == GGUFValueType.STRING:
        for _ in range(count):
            cur.take(cur.unpack("<Q"))
    elif item == GGUFValueType.ARRAY:
        for _ in range(count):
            inner = _value_type(cur.unpack("<I"), where)
            _skip_array(cur, inner, cur.unpack("<Q"), where)
    else:
        raise InputError(f"{where}: unknown GGUF value type {item}; the file is corrupt")


def _key_value(cur: _Cursor) -> KeyValue:
    start = cur.pos
    key = cur.string()
    where = f"{cur.path}: key {key!r}"
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
        raise InputError(f"{cur.path}: tensor {name!r} claims {n_dims} dimensions; the file is corrupt")
    dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims))
    raw_type = cur.unpack("<I")
    try:
        kind = GGMLQuantizationType(raw_type)
    except ValueError:
        raise UnsupportedError(f"{cur.path}: tensor {name} has ggml type {raw_type}, which the gguf package does not "
                               "know (a newer llama.cpp type?)") from None
    return name, kind, tuple(reversed(dims)), cur.unpack("<Q")


def read_header(path: Path) -> Header:
    """Parse and check the header of the GGUF file ``path``."""
    with open(path, "rb") as f:
        cur = _Cursor(path, f)
        if cur.size < 4 or cur.take(4) != struct.pack("<I", gguf.GGUF_MAGIC):
            raise InputError(f"{path}: not a GGUF file (no GGUF magic at its start)")
        version = cur.unpack("<I")
        if version & 0xFFFF == 0:
            raise UnsupportedError(f"{path}: a GGUF file for the other byte order (big-endian); not supported")
        if version not in (2, 3):
            raise UnsupportedError(f"{path}: GGUF version {version}; versions 2 and 3 are supported")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        key_values = [_key_value(cur) for _ in range(n_kv)]
        infos = [_tensor_info(cur) for _ in range(n_tensors)]
        header_end = cur.pos
    _check_unique([e.key for e in key_values], path, "key")
    _check_unique([name for name, *_ in infos], path, "tensor")
    alignment = next((e.value for e in key_values if e.key == gguf.Keys.General.ALIGNMENT), gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise InputError(f"{path}: general.alignment is {alignment!r}, not a power of two; the file is corrupt")
    data_start = -(-header_end // alignment) * alignment
    tensors = [TensorEntry(name, kind, shape, data_start + offset) for name, kind, shape, offset in infos]
    return Header(version, key_values, tensors, alignment)


def _check_unique(names: list[str], path: Path, what: str) -> None:
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{path}: {what} {dup!r} appears twice; the file is corrupt")


def pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def pack_key_value(key: str, vtype: GGUFValueType, value: object) -> KeyValue:
    """A new scalar or string entry, encoded as GGUF does (little-endian)."""
    data = pack_string(str(value)) if vtype == GGUFValueType.STRING else struct.pack(_SCALARS[vtype], value)
    return KeyValue(key, vtype, value, 1, None, pack_string(key) + struct.pack("<I", vtype) + data)
