"""Legacy PyTorch weights: ``pytorch_model.bin`` (+ ``pytorch_model.bin.index.json`` and its shards),
read with ``torch.load(weights_only=True, mmap=True)`` so that only the tensor asked for is paged in."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...quant.encodings import EncodedTensorInfo
from ..reader import (BIN_INDEX_NAME, SAFETENSORS_INDEX_SUFFIX, Checkpoint, _load_bin, check_index,
                      check_weights_file, grouped, read_index)
from ..safetensors_file import TensorInfo
from .base import CheckpointFormat, register_format


@dataclass
class BinCheckpoint(Checkpoint):
    """Tensors read from memory-mapped pickles, one shard mapped at a time."""

    _bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    # The engine's workers read concurrently: one of them maps a shard, the others use that mapping.
    _bin_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _mapped(self, info: TensorInfo) -> torch.Tensor:
        with self._bin_lock:
            if self._bin_cache is None or self._bin_cache[0] != info.file:
                self._bin_cache = (info.file, _load_bin(info.file))
            mapped = self._bin_cache[1]
        return mapped[info.name]  # memory-mapped: only the pages used are read

    def read_stored(self, info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
        src = self._mapped(info)
        return src.clone() if out is None else out.copy_(src)

    def _read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        return self._mapped(info)[start:stop].clone()


class BinFormat(CheckpointFormat):
    name = "bin"
    preference = 20

    def claims_file(self, path: Path) -> bool:
        return path.name == BIN_INDEX_NAME or path.suffix in (".bin", ".pt", ".pth")

    def find_in_folder(self, folder: Path) -> Path | None:
        for name in (BIN_INDEX_NAME, "pytorch_model.bin"):
            if (folder / name).exists():
                return folder / name
        return None

    def open(self, path: Path) -> Checkpoint:
        if path.name != BIN_INDEX_NAME:
            ckpt = self.open_shards([path], path.parent, None)
            # A lone file carries its folder's config only if that folder is a model folder.
            ckpt.side_files = (path.parent / "config.json").is_file()
            return grouped(ckpt)
        listed, shards = read_index(path)
        return grouped(check_index(self.open_shards(shards, path.parent, path), path, listed))

    def open_shards(self, shards: list[Path], folder: Path, index: Path | None) -> BinCheckpoint:
        tensors: dict[str, TensorInfo | EncodedTensorInfo] = {}
        ckpt = BinCheckpoint(folder, shards, tensors, self, index)
        for shard in shards:
            check_weights_file(shard, folder, index)
            sd = _load_bin(shard)
            for name, t in sd.items():
                tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), shard, -1)
            ckpt._bin_cache = (shard, sd)
        return ckpt

    def output_layout(self, ckpt: Checkpoint) -> tuple[dict[str, str], str, str]:
        """Each shard renamed as ``save_pretrained`` names safetensors shards."""
        renamed = {p.name: p.name.replace("pytorch_model", "model").removesuffix(".bin") + ".safetensors"
                   for p in ckpt.shards}
        assignment = {n: renamed[t.file.name] for n, t in ckpt.tensors.items()}
        return assignment, "model.safetensors", "model" + SAFETENSORS_INDEX_SUFFIX

    def pushed(self, name: str) -> bool:
        return name.startswith("pytorch_model") and name.endswith(".bin")


BIN = register_format(BinFormat())
