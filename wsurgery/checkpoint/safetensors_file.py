"""Read and write the safetensors format one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's
dtype, shape and byte range, then the raw bytes. Because the header says where every tensor lives,
a tensor can be read with one positioned read, and a file can be written by laying out the header
first and then dropping each tensor's bytes into place, in any order. Nothing here ever holds more
than one tensor in memory.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import torch

from ..errors import InputError, UnsupportedError
from .dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS, itemsize
from .untrusted import UntrustedError, load_json, open_regular, pread_exact, shown

# The safetensors crate's limit (MAX_HEADER_SIZE): larger headers are refused before anything is read.
MAX_HEADER_BYTES = 100_000_000
_U64_MAX = 2**64 - 1
#: Every dtype name the safetensors crate knows: a file using one we lack is valid but unsupported.
SAFETENSORS_DTYPES = frozenset({
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in ``file`` (-1 when not addressable, e.g. .bin)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: every tensor's dtype, shape and byte range.

    The rules are the safetensors crate's (``SafeTensors::read_metadata``): what it refuses, this
    refuses, so that a file we accept is one every safetensors reader reads the same way. The tensors'
    bytes must tile the data section exactly: no gap, no overlap, nothing after the last tensor.
    Stricter than the crate, on purpose: a key repeated in one JSON object (readers disagree on which
    one counts), a tensor entry that is not a JSON object or whose dtype is not a string (serde
    artefacts no writer produces), and dtypes torch has no equivalent for (``UnsupportedError``).
    """
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise InputError(f"{path}: not a safetensors file (only {size} bytes); the file is truncated")
        (header_len,) = struct.unpack("<Q", pread_exact(fd, 8, 0, path))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:  # the number itself is not shown: any 8 bytes
            raise InputError(f"{path}: not a safetensors file (its first 8 bytes give no header length that fits in "
                             f"its {size} bytes and {MAX_HEADER_BYTES} at most); the file is truncated or of another "
                             "format")
        header_bytes = pread_exact(fd, header_len, 8, path)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    try:
        header = load_json(header_bytes)
    except UntrustedError as e:
        raise InputError(f"{path}: safetensors header is {e}; the file is corrupt") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: safetensors __metadata__ is not an object of strings; the file is corrupt")
    data_start = 8 + header_len
    tensors = {name: _entry(path, name, entry) for name, entry in header.items()}
    _check_layout(path, tensors, size - data_start)
    # Keep the file's own order (by offset): writing in that order keeps output files alike.
    ordered = sorted(tensors.items(), key=lambda item: (item[1][2], item[0]))
    return {name: TensorInfo(name, dtype, shape, path, data_start + begin)
            for name, (dtype, shape, (begin, _)) in ordered}, metadata


def _entry(path: Path, name: str, entry: object) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    """One tensor's dtype, shape and data offsets, checked on their own (not against the other tensors)."""
    where = f"{path}: tensor {shown(name)}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise InputError(f"{where}: its header entry is not an object with dtype, shape and data_offsets; "
                         "the file is corrupt")
    dtype_s, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise InputError(f"{where}: its shape is not a list of non-negative integers; the file is corrupt")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise InputError(f"{where}: its data_offsets are not two non-negative integers; the file is corrupt")
    dtype = SAFETENSORS_TO_TORCH.get(dtype_s) if isinstance(dtype_s, str) else None
    if dtype is None:
        if dtype_s in SAFETENSORS_DTYPES:
            raise UnsupportedError(f"{where} has dtype {dtype_s}, which wsurgery does not handle")
        raise InputError(f"{where} has unknown dtype {shown(dtype_s)}; the file is corrupt")
    begin, end = offsets
    expected = _nbytes(shape, itemsize(dtype))
    if end < begin or end - begin != expected:
        needs = "more than 2^64 bytes" if expected is None else f"{expected} bytes"
        raise InputError(f"{where} spans bytes [{begin}, {end}) but {dtype_s}{shown(shape)} needs {needs}; "
                         "the file is corrupt")
    return dtype, tuple(shape), (begin, end)


def _is_u64(x: object) -> bool:
    return type(x) is int and 0 <= x <= _U64_MAX


def _nbytes(shape: list[int], size: int) -> int | None:
    """Bytes of a tensor, None past 2^64 (stops early: a header may list millions of huge dimensions)."""
    if 0 in shape:
        return 0
    n = size
    for d in shape:
        n *= d
        if n > _U64_MAX:
            return None
    return n


def _check_layout(path: Path, tensors: dict[str, tuple[torch.dtype, tuple[int, ...], tuple[int, int]]],
                  data_size: int) -> None:
    """The tensors, ordered by offsets, must tile the data section from its first byte to its last."""
    pos, previous = 0, None
    for name, (_, _, (begin, end)) in sorted(tensors.items(), key=lambda item: item[1][2]):
        if begin < pos:
            raise InputError(f"{path}: tensors {shown(previous)} and {shown(name)} overlap; the file is corrupt")
        if begin > pos:
            raise InputError(f"{path}: tensor {shown(name)} starts at byte {begin} of the data section, but the "
                             f"tensor before it ends at byte {pos}: a gap; the file is corrupt")
        pos, previous = end, name
    if pos > data_size:
        raise InputError(f"{path}: tensor {shown(previous)} ends at byte {pos} of the data section but the file "
                         f"has only {data_size}; the file is truncated")
    if pos < data_size:
        raise InputError(f"{path}: the data section goes on past the last tensor's end ({data_size - pos} bytes "
                         "more); the file is corrupt or was appended to")


def read_tensor(info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read exactly one tensor's bytes with a positioned read, into ``out`` (contiguous, right shape and
    dtype: lets callers reuse buffers) or into a fresh tensor."""
    if out is None:
        out = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes == 0:
        return out
    view = out.reshape(-1).view(torch.uint8).numpy().data
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done:]], info.offset + done)
            if n <= 0:
                raise InputError(f"{info.file}: unexpected end of file while reading tensor {info.name!r}")
            done += n
    finally:
        os.close(fd)
    return out


def write_at(fd: int, tensor: torch.Tensor, offset: int, path: Path, name: str) -> None:
    """Write a tensor's bytes at ``offset`` of the open file ``fd`` (``path`` names it in errors)."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as e:  # say which file (and so which disk) failed
        raise OSError(e.errno, f"{e.strerror} (writing tensor {name!r})", str(path)) from None


def copy_range(src: Path, src_offset: int, fd: int, offset: int, nbytes: int, path: Path, name: str) -> bool:
    """Copy ``nbytes`` from ``src`` into the open file ``fd`` inside the kernel (``copy_file_range``),
    without passing them through memory. False where the OS cannot; then the caller writes."""
    if not hasattr(os, "copy_file_range"):
        return False
    src_fd = os.open(src, os.O_RDONLY)
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src_fd, fd, nbytes - done, src_offset + done, offset + done)
            if n <= 0:
                if done == 0:
                    return False
                raise InputError(f"{src}: unexpected end of file while copying tensor {name!r}")
            done += n
    except OSError as e:
        if done == 0 and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise OSError(e.errno, f"{e.strerror} (copying tensor {name!r})", str(path)) from None
    finally:
        os.close(src_fd)
    return True


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: known before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    #: The shape is only an upper bound: a small 1-D tensor whose length is known once it is computed
    #: (bitsandbytes' packed quant-state JSON, whose length depends on a float's digits).
    late: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


class _Entry(TypedDict):
    """One tensor's entry in a safetensors header."""

    dtype: str
    shape: list[int]
    data_offsets: list[int]


def _header_blob(header: Mapping[str, object], size: int | None = None) -> bytes:
    blob = json.dumps(header, separators=(",", ":")).encode()
    if size is None:
        return blob + b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as safetensors does
    return blob + b" " * (size - len(blob))


class SafetensorsWriter:
    """Writes one safetensors file whose header is laid out in advance.

    The file is created at its final size; ``write`` puts one tensor's bytes at its offset, so
    tensors may arrive in any order and none is ever buffered. ``close`` checks that every tensor
    announced in the header was written.

    ``late`` specs (tiny tensors of unknown length) go after all others: they are kept in memory
    until ``close``, which places them, writes the final header into room reserved for the largest
    one they could need (padded with spaces, which JSON allows) and trims the file.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = path
        self._metadata = dict(metadata or {"format": "pt"})
        self._entries: dict[str, _Entry] = {}
        self._slots: dict[str, tuple[int, TensorSpec]] = {}
        self._late: dict[str, torch.Tensor | None] = {}
        pos = 0
        for spec in sorted(specs, key=lambda s: s.late):
            if spec.dtype not in TORCH_TO_SAFETENSORS:
                raise InputError(f"cannot write tensor {spec.name!r}: dtype {spec.dtype} has no safetensors name")
            self._entries[spec.name] = {
                "dtype": TORCH_TO_SAFETENSORS[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [pos, pos + spec.nbytes],
            }
            self._slots[spec.name] = (pos, spec)
            if spec.late:
                self._late[spec.name] = None
            pos += spec.nbytes
        blob = _header_blob(self._header())  # with late tensors at their largest: room for any final header
        self._data_start = 8 + len(blob)
        self.total_bytes = pos
        self._pending = set(self._slots)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, struct.pack("<Q", len(blob)) + blob)
        os.ftruncate(self._fd, self._data_start + pos)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, spec = self._slots[name]
        if spec.late:
            if tensor.dtype != spec.dtype or tensor.dim() != 1 or tensor.numel() > spec.shape[0]:
                raise AssertionError(f"late tensor {name!r} is {tensor.dtype}{list(tensor.shape)}, "
                                     f"announced at most {spec.dtype}{list(spec.shape)}")
            self._late[name] = tensor.clone()
            self._pending.discard(name)
            return
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise AssertionError(
                f"tensor {name!r} is {tensor.dtype}{list(tensor.shape)}, announced {spec.dtype}{list(spec.shape)}"
            )
        if spec.nbytes:
            write_at(self._fd, tensor, self._data_start + offset, self.path, name)
        self._pending.discard(name)

    def write_rows(self, name: str, rows: torch.Tensor, first_row: int) -> None:
        """Write rows ``[first_row, first_row + len(rows))`` of the first dimension of tensor ``name``: a
        tensor too large to hold whole is written in chunks. The tensor counts as written once its last
        row is (callers write every chunk, in order)."""
        offset, spec = self._slots[name]
        if spec.late or rows.dtype != spec.dtype or tuple(rows.shape[1:]) != spec.shape[1:] \
                or not 0 <= first_row <= first_row + rows.shape[0] <= spec.shape[0]:
            raise AssertionError(f"rows [{first_row}, +{rows.shape[0]}) of tensor {name!r}: {rows.dtype}"
                                 f"{list(rows.shape)} do not fit {spec.dtype}{list(spec.shape)}")
        row_bytes = math.prod(spec.shape[1:]) * itemsize(spec.dtype)
        if rows.numel():
            write_at(self._fd, rows, self._data_start + offset + first_row * row_bytes, self.path, name)
        if first_row + rows.shape[0] == spec.shape[0]:
            self._pending.discard(name)

    def copy_from(self, name: str, src: TensorInfo) -> bool:
        """Copy a tensor's bytes from another safetensors file inside the kernel (``copy_file_range``),
        without passing them through memory. False where the OS cannot; then the caller writes."""
        offset, spec = self._slots[name]
        if (src.dtype, src.shape) != (spec.dtype, spec.shape) or src.offset < 0:
            return False
        if not copy_range(src.file, src.offset, self._fd, self._data_start + offset, spec.nbytes, self.path, name):
            return False
        self._pending.discard(name)
        return True

    def close(self) -> None:
        try:
            if self._pending:
                raise AssertionError(f"{self.path}: tensors announced but never written: {sorted(self._pending)[:5]}")
            if self._late:
                self._place_late()
        finally:
            os.close(self._fd)

    def _header(self) -> dict[str, object]:
        return {"__metadata__": self._metadata, **self._entries}

    def _place_late(self) -> None:
        pos = min(self._slots[n][0] for n in self._late)
        for name, tensor in self._late.items():
            assert tensor is not None  # close() has refused a late tensor never written
            entry = self._entries[name]
            entry["shape"] = [tensor.numel()]
            entry["data_offsets"] = [pos, pos + tensor.numel() * itemsize(tensor.dtype)]
            os.pwrite(self._fd, tensor.numpy().tobytes(), self._data_start + pos)
            pos = entry["data_offsets"][1]
        os.pwrite(self._fd, _header_blob(self._header(), self._data_start - 8), 8)
        os.ftruncate(self._fd, self._data_start + pos)
        self.total_bytes = pos

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
