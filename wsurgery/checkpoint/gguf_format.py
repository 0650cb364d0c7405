"""llama.cpp GGUF files as one more checkpoint format.

A GGUF file is a header (key/values: architecture, hyperparameters, tokenizer; then one entry per
tensor: name, shape, ggml type, offset) followed by the aligned tensor data. Opened here, it is a
``Checkpoint`` like any other: ``tensors`` lists the *logical* tensors under their Hugging Face names
(``gguf_names``), each an ``EncodedTensorInfo`` whose encoding is its ggml type
(``quant/encodings/ggml.py``: dequantized with the ``gguf`` package, the converter's changes undone:
Llama's Q/K interleave, Gemma's norm + 1), so an adapter in Hugging Face layout applies as it is.
``GgufWriter`` writes the same file back with changed tensors re-encoded: every key/value is copied
byte for byte (only those the job changes are rewritten), the tensors keep their order and names,
unchanged tensors are copied in the kernel, and the header is laid out first so that each tensor is
written into place as it comes, one at a time.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import torch
from gguf import GGMLQuantizationType as GgmlType

from ..errors import InputError, UnsupportedError
from ..quant.encodings import EncodedTensorInfo
from ..quant.encodings.ggml import (Ggml, can_decode, can_encode, fits_blocks, plain_types, stored_nbytes,
                                    type_name)
from .gguf_config import hf_config
from .gguf_header import KeyValue, KvValue, pack_string, read_header
from .gguf_names import Layout, arch_rules, hf_names, layout
from .reader import Checkpoint, check_weights_file
from .safetensors_file import TensorInfo, copy_range, read_tensor, write_at
from .untrusted import shown

if TYPE_CHECKING:
    from .formats.base import CheckpointFormat

#: ggml types stored as plain elements, and their torch dtypes.
PLAIN_TYPES: dict[GgmlType, torch.dtype] = plain_types()
#: Far above any released model (Llama 3.1 405B has 126); the name map's size grows with it.
MAX_BLOCKS = 4096


def parse_type(text: str) -> GgmlType:
    """``"q8_0"`` -> ``GGMLQuantizationType.Q8_0``; only types ``encode`` can produce."""
    t = GgmlType.__members__.get(text.strip().upper())
    if t is None or not can_encode(t):
        raise InputError(f"unknown or unsupported GGUF type {text!r}; wsurgery can write "
                         f"{', '.join(type_name(t) for t in GgmlType if can_encode(t))}")
    return t


@dataclass(frozen=True)
class GgufTensorInfo(EncodedTensorInfo):
    """One GGUF tensor as the logical (Hugging Face) tensor it stands for: ``parts`` is its one stored
    byte range (``data``, named by its GGUF name), ``encoding`` its ggml type and layout."""

    encoding: Ggml

    @property
    def gguf_name(self) -> str:
        return self.stored.name

    @property
    def type(self) -> GgmlType:
        return self.encoding.type

    @property
    def layout(self) -> Layout:
        return self.encoding.layout

    @property
    def stored(self) -> TensorInfo:
        """The stored bytes, as a flat uint8 tensor."""
        return self.parts["data"]


@dataclass
class GgufCheckpoint(Checkpoint):
    """A GGUF file as a checkpoint of logical tensors (see the module docstring)."""

    arch: str = ""
    key_values: list[KeyValue] = field(default_factory=list)
    alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT

    @property
    def kv(self) -> dict[str, KvValue]:
        return {e.key: e.value for e in self.key_values}

    @property
    def config(self) -> dict | None:
        return None  # the hyperparameters are key/values of the file itself

    def gguf_info(self, name: str) -> GgufTensorInfo:
        """``tensors[name]``, typed as what ``open_gguf`` makes every tensor of a GGUF file."""
        info = self.tensors[name]
        if not isinstance(info, GgufTensorInfo):
            raise TypeError(f"{name}: {type(info).__name__} in a GGUF checkpoint")
        return info

    def gguf_items(self) -> list[tuple[str, GgufTensorInfo]]:
        """Every tensor, in file order, as ``gguf_info``."""
        return [(name, self.gguf_info(name)) for name in self.tensors]

    def made_side_files(self) -> dict[str, str]:
        embedding = self.tensors.get("model.embed_tokens.weight")
        config = hf_config(self.arch, self.kv, self.tensors, embedding.shape[0] if embedding is not None else None)
        return {} if config is None else {"config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}


def open_gguf(path: Path, fmt: CheckpointFormat) -> GgufCheckpoint:
    """Open a GGUF file (of the format ``fmt``): parse and check its header, map its tensors to Hugging Face
    names."""
    check_weights_file(path, path.parent)
    header = read_header(path)
    kv = {e.key: e.value for e in header.key_values}
    arch = kv.get(gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise InputError(f"{path}: no general.architecture key; not a llama.cpp model file")
    rules = arch_rules(arch, str(path))
    splits = kv.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1)
    if splits != 1:
        raise UnsupportedError(f"{path}: one of {splits} split GGUF files; join them first "
                               "(llama-gguf-split --merge FIRST_SPLIT OUT.gguf)")
    size = path.stat().st_size
    n_blocks = kv.get(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch), 0)
    if type(n_blocks) is not int or not 0 <= n_blocks <= len(header.tensors):  # every block has tensors
        raise InputError(f"{path}: {arch}.block_count is {shown(n_blocks)} for {len(header.tensors)} tensors; "
                         "the file is corrupt")
    if n_blocks > MAX_BLOCKS:  # the name map is built per block: bounded work for any file
        raise UnsupportedError(f"{path}: {n_blocks} blocks; wsurgery reads GGUF models of up to {MAX_BLOCKS}")
    names = hf_names(arch, [t.name for t in header.tensors], n_blocks)
    tensors: dict[str, GgufTensorInfo] = {}
    for t in header.tensors:
        if not fits_blocks(t.shape, t.type):
            raise InputError(f"{path}: tensor {shown(t.name)} has rows of {t.shape[-1]} values, not whole "
                             f"{t.type.name} blocks; the file is corrupt")
        if t.offset + stored_nbytes(t.shape, t.type) > size:
            raise InputError(f"{path}: tensor {shown(t.name)} ends past the end of the file; the file is truncated")
        name = names[t.name]
        if name in tensors:
            raise InputError(f"{path}: tensors {shown(tensors[name].gguf_name)} and {shown(t.name)} both stand "
                             f"for {shown(name)}")
        lay = layout(rules, arch, t.name, kv)
        if lay.heads is not None and (lay.heads <= 0 or not t.shape or t.shape[0] % (2 * lay.heads)):
            raise InputError(f"{path}: tensor {shown(t.name)} has shape {list(t.shape)}, which does not split "
                             f"into {lay.heads} heads of row pairs; the file or its head counts are corrupt")
        dtype = PLAIN_TYPES.get(t.type, torch.float32) if not lay.offset else torch.float32
        data = TensorInfo(t.name, torch.uint8, (stored_nbytes(t.shape, t.type),), path, t.offset)
        tensors[name] = GgufTensorInfo(name, dtype, t.shape, {"data": data}, Ggml(t.type, lay))
    stored = {t.gguf_name: t.stored for t in tensors.values()}
    return GgufCheckpoint(path.parent, [path], dict(tensors), fmt, side_files=False, stored=stored, arch=arch,
                          key_values=header.key_values, alignment=header.alignment)


@dataclass
class GgufOutput:
    """What a GGUF output should look like besides its tensors' values: ``types`` maps a logical
    tensor to the ggml type to store it in (default: its stored type); ``updates`` are key/values
    that replace or join the base's."""

    types: dict[str, GgmlType] = field(default_factory=dict)
    updates: list[KeyValue] = field(default_factory=list)


def check_encodable(source: GgufCheckpoint, types: dict[str, GgmlType], changed: list[str],
                    out_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, before anything is written, an output ``GgufWriter`` could not produce: ``changed``
    tensors and those ``types`` retypes are re-encoded."""
    for name, info in source.gguf_items():
        if tuple(out_shapes.get(name, info.shape)) != info.shape:
            raise UnsupportedError(f"{info.gguf_name}: the job changes its shape {list(info.shape)} to "
                                   f"{list(out_shapes[name])}; a GGUF output keeps the base's shapes (its tokenizer "
                                   "and hyperparameters describe them); write safetensors instead")
    retyped = [n for n, t in types.items() if t != source.gguf_info(n).type]
    for name in dict.fromkeys([*changed, *retyped]):
        info = source.gguf_info(name)
        target = types.get(name, info.type)
        if not can_decode(info.type):
            raise UnsupportedError(f"{source.shards[0]}: tensor {info.gguf_name} is {info.type.name}, which the gguf "
                                   "package cannot dequantize")
        if not can_encode(target):
            writable = ", ".join(type_name(t) for t in GgmlType if can_encode(t))
            raise UnsupportedError(f"{info.gguf_name} is {target.name}, which wsurgery cannot quantize; "
                                   f"pass --gguf-type with one it can ({writable})")
        if not fits_blocks(info.shape, target):
            raise UnsupportedError(f"{info.gguf_name}: rows of {info.shape[-1]} values do not divide into "
                                   f"{type_name(target)} blocks of {gguf.GGML_QUANT_SIZES[target][0]}; choose another "
                                   "--gguf-type; nothing was written")


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


class GgufWriter:
    """Writes ``source``'s file with changed tensors re-encoded, one tensor at a time, in any order.

    ``types`` gives the output type of a tensor (default: its stored type); ``updates`` replace or add
    key/values. The header is written and the file sized on creation; ``write`` and ``copy_raw``
    put one tensor's bytes at its offset; ``close`` checks that every tensor was written.
    """

    def __init__(self, path: Path, source: GgufCheckpoint, types: dict[str, GgmlType],
                 updates: Sequence[KeyValue] = ()):
        self.path, self.source = path, source
        self._types = {n: types.get(n, t.type) for n, t in source.gguf_items()}
        entries = {e.key: e for e in source.key_values}
        entries.update({e.key: e for e in updates})
        header = bytearray(struct.pack("<IIQQ", gguf.GGUF_MAGIC, gguf.GGUF_VERSION, len(source.tensors), len(entries)))
        for e in entries.values():
            header += e.raw
        self._offsets: dict[str, int] = {}
        pos = 0
        for name, info in source.gguf_items():
            t = self._types[name]
            header += pack_string(info.gguf_name) + struct.pack("<I", len(info.shape))
            header += struct.pack(f"<{len(info.shape)}Q", *reversed(info.shape))
            header += struct.pack("<IQ", t, pos)
            self._offsets[name] = pos
            pos += _align(stored_nbytes(info.shape, t), source.alignment)
        self._data_start = _align(len(header), source.alignment)
        self.total_bytes = self._data_start + pos
        self._pending = set(source.tensors)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(self._fd, bytes(header))
            os.ftruncate(self._fd, self.total_bytes)
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store the logical tensor ``name`` in its output type."""
        info = self.source.gguf_info(name)
        data = info.encoding.encode_data(tensor, self._types[name])
        if data.numel() * data.element_size() != stored_nbytes(info.shape, self._types[name]):
            raise AssertionError(f"{info.gguf_name}: encoded to {data.numel() * data.element_size()} bytes")
        write_at(self._fd, data, self._data_start + self._offsets[name], self.path, info.gguf_name)
        self._pending.discard(name)

    def copy_raw(self, name: str) -> bool:
        """Copy an unchanged tensor's stored bytes where its output type is its stored type."""
        info = self.source.gguf_info(name)
        if self._types[name] != info.type:
            return False
        where = self._data_start + self._offsets[name]
        if not copy_range(info.file, info.stored.offset, self._fd, where, info.nbytes, self.path, info.gguf_name):
            write_at(self._fd, read_tensor(info.stored), where, self.path, info.gguf_name)
        self._pending.discard(name)
        return True

    def close(self) -> None:
        try:
            if self._pending:
                raise AssertionError(f"{self.path}: tensors announced but never written: {sorted(self._pending)[:5]}")
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
