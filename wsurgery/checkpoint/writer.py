"""Write a (sharded) safetensors checkpoint whose layout is fixed before any data is computed."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class OutputPart:
    """One checkpoint of its own inside an output folder (a diffusers pipeline's ``unet/``, ``vae/``...).

    The tensors named ``prefix + key`` go to files in the subfolder ``folder``, stored under ``key``
    (what that component's own loader reads), sharded and indexed on their own.
    """

    folder: str  # "unet"
    prefix: str  # "unet."
    single: str  # the file name when the part is one file: "diffusion_pytorch_model.safetensors"
    index: str  # the index name when it is sharded: "diffusion_pytorch_model.safetensors.index.json"

    def owns_file(self, file_name: str) -> bool:
        return file_name.startswith(self.folder + "/")


def plan_shards(
    specs: list[TensorSpec],
    base_assignment: dict[str, str] | None,
    max_shard_size: int | None,
    single_name: str = "model.safetensors",
    parts: Sequence[OutputPart] = (),
) -> list[tuple[str, list[TensorSpec]]]:
    """Decide which output file holds which tensor.

    Without ``max_shard_size`` the base's own assignment (tensor -> shard file name) is kept, so the
    output looks like the input. Tensors the base did not have go with the last shard. With
    ``max_shard_size`` tensors are packed greedily in order, as transformers does. With ``parts``
    each part is planned so on its own, in its subfolder (file names then include it: ``unet/...``).
    """
    if parts:
        return _plan_parts(specs, base_assignment, max_shard_size, parts)
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


def _part_of(name: str, parts: Sequence[OutputPart]) -> OutputPart:
    """The part a tensor belongs to: the one with the longest prefix of its name."""
    best = max((p for p in parts if name.startswith(p.prefix)), key=lambda p: len(p.prefix), default=None)
    if best is None:
        raise AssertionError(f"tensor {name!r} belongs to none of the output parts {[p.folder for p in parts]}")
    return best


def _plan_parts(specs: list[TensorSpec], base_assignment: dict[str, str] | None, max_shard_size: int | None,
                parts: Sequence[OutputPart]) -> list[tuple[str, list[TensorSpec]]]:
    by_part: dict[OutputPart, list[TensorSpec]] = {}
    for spec in specs:
        by_part.setdefault(_part_of(spec.name, parts), []).append(spec)
    out: list[tuple[str, list[TensorSpec]]] = []
    for part in parts:
        if part not in by_part:
            continue
        inside = None if base_assignment is None else {
            n: f.removeprefix(part.folder + "/") for n, f in base_assignment.items() if part.owns_file(f)}
        out += [(f"{part.folder}/{f}", g) for f, g in plan_shards(by_part[part], inside, max_shard_size, part.single)]
    return out


class CheckpointWriter:
    """Creates every output shard up front; tensors are then written into place one at a time.

    With ``parts`` (see ``OutputPart``) a tensor is stored under its part's key, and each part that
    has several shards gets its own index; ``index_name`` is then not used.
    """

    def __init__(self, folder: Path, shards: list[tuple[str, list[TensorSpec]]], index_name: str | None,
                 parts: Sequence[OutputPart] = ()):
        self.folder = folder
        self.index_name = index_name
        self._parts = list(parts)
        self._writers: list[SafetensorsWriter] = []
        self._where: dict[str, tuple[SafetensorsWriter, str]] = {}
        self.weight_map: dict[str, str] = {}
        self._files: dict[str, SafetensorsWriter] = {}
        try:
            for file_name, specs in shards:
                part = next((p for p in self._parts if p.owns_file(file_name)), None)
                if part is None and "/" in file_name:  # keys would keep their component prefix
                    raise AssertionError(f"output file {file_name} lies in a sub-folder no output part owns: pass "
                                         "the base format's output_parts")
                keys = [s.name if part is None else s.name.removeprefix(part.prefix) for s in specs]
                (folder / file_name).parent.mkdir(parents=True, exist_ok=True)
                w = SafetensorsWriter(folder / file_name, [replace(s, name=k) for s, k in zip(specs, keys)],
                                      {"format": "pt"})
                self._writers.append(w)
                self._files[file_name] = w
                for spec, key in zip(specs, keys):
                    self._where[spec.name] = (w, key)
                    self.weight_map[spec.name] = file_name
        except BaseException:
            self.abort()
            raise
        self.total_bytes = sum(w.total_bytes for w in self._writers)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        w, key = self._where[name]
        w.write(key, tensor)

    def write_rows(self, name: str, rows: torch.Tensor, first_row: int) -> None:
        w, key = self._where[name]
        w.write_rows(key, rows, first_row)

    def copy_from(self, name: str, src: TensorInfo) -> bool:
        """Copy an unchanged tensor file-to-file in the kernel where possible (see SafetensorsWriter)."""
        w, key = self._where[name]
        return w.copy_from(key, src)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        self.total_bytes = sum(w.total_bytes for w in self._writers)
        if not self._parts:
            if self.index_name is not None:
                self._write_index(self.folder / self.index_name, self.weight_map, list(self._files.values()))
            return
        for part in self._parts:
            files = {f: w for f, w in self._files.items() if part.owns_file(f)}
            if len(files) > 1:
                cut = len(part.folder) + 1
                weight_map = {self._where[n][1]: f[cut:] for n, f in self.weight_map.items() if f in files}
                self._write_index(self.folder / part.folder / part.index, weight_map, list(files.values()))

    @staticmethod
    def _write_index(path: Path, weight_map: dict[str, str], writers: list[SafetensorsWriter]) -> None:
        total = sum(w.total_bytes for w in writers)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        path.write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for w in self._writers:
            w.abort()
