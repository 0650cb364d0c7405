"""Write a (sharded) safetensors checkpoint whose layout is fixed before any data is computed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import InputError
from .safetensors_file import SafetensorsWriter, TensorInfo, TensorSpec

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, as transformers' ``max_shard_size`` reads it."""
    m = _SIZE_RE.match(text)
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS:
        raise InputError(f"cannot read size {text!r}: write e.g. 5GB, 500MB or 2GiB")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise InputError(f"size {text!r} is less than one byte: a shard must hold something; write e.g. 5GB")
    return size


def plan_shards(
    specs: list[TensorSpec],
    base_assignment: dict[str, str] | None,
    max_shard_size: int | None,
    single_name: str = "model.safetensors",
) -> list[tuple[str, list[TensorSpec]]]:
    """Decide which output file holds which tensor.

    Without ``max_shard_size`` the base's own assignment (tensor -> shard file name) is kept, so the
    output looks like the input. Tensors the base did not have go with the last shard. With
    ``max_shard_size`` tensors are packed greedily in order, as transformers does.
    """
    if max_shard_size is None and base_assignment is not None:
        groups: dict[str, list[TensorSpec]] = {}
        order = list(dict.fromkeys(base_assignment.values()))
        for name in order:
            groups[name] = []
        last = order[-1] if order else single_name
        for spec in specs:
            groups.setdefault(base_assignment.get(spec.name, last), []).append(spec)
        kept = [(name, g) for name, g in groups.items() if g]
        if len(kept) <= 1:  # one shard left (the others held only side tensors that decoding drops): one file
            return [(single_name, kept[0][1] if kept else [])]
        return kept
    chunks: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if max_shard_size is not None and chunks[-1] and size + spec.nbytes > max_shard_size:
            chunks.append([])
            size = 0
        chunks[-1].append(spec)
        size += spec.nbytes
    if len(chunks) == 1:
        return [(single_name, chunks[0])]
    stem = single_name.removesuffix(".safetensors")
    n = len(chunks)
    return [(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", c) for i, c in enumerate(chunks)]


class CheckpointWriter:
    """Creates every output shard up front; tensors are then written into place one at a time."""

    def __init__(self, folder: Path, shards: list[tuple[str, list[TensorSpec]]], index_name: str | None):
        self.folder = folder
        self.index_name = index_name
        self._writers: list[SafetensorsWriter] = []
        self._where: dict[str, SafetensorsWriter] = {}
        self.weight_map: dict[str, str] = {}
        try:
            for file_name, specs in shards:
                w = SafetensorsWriter(folder / file_name, specs, {"format": "pt"})
                self._writers.append(w)
                for spec in specs:
                    self._where[spec.name] = w
                    self.weight_map[spec.name] = file_name
        except BaseException:
            self.abort()
            raise
        self.total_bytes = sum(w.total_bytes for w in self._writers)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._where[name].write(name, tensor)

    def write_rows(self, name: str, rows: torch.Tensor, first_row: int) -> None:
        self._where[name].write_rows(name, rows, first_row)

    def copy_from(self, name: str, src: TensorInfo) -> bool:
        """Copy an unchanged tensor file-to-file in the kernel where possible (see SafetensorsWriter)."""
        return self._where[name].copy_from(name, src)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        self.total_bytes = sum(w.total_bytes for w in self._writers)
        if self.index_name is not None:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / self.index_name).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for w in self._writers:
            w.abort()
