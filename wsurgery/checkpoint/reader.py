"""A model checkpoint opened without loading it: ``Checkpoint``, and what every file format's reader shares.

The formats themselves (single/sharded/indexed ``.safetensors``, legacy ``pytorch_model.bin`` read
with ``torch.load(weights_only=True, mmap=True)``, llama.cpp ``.gguf``) are the modules of
``checkpoint/formats``; ``open_checkpoint`` there picks one. Every shard header is read and validated
on open, so a broken checkpoint fails before any work.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from .safetensors_file import TensorInfo, read_tensor
from .untrusted import UntrustedError, load_json, read_small, shown
from ..quant.encodings import EncodedTensorInfo, group_encoded

if TYPE_CHECKING:
    from .formats.base import CheckpointFormat

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
#: Indexes and configs are a few megabytes at most; a larger "index" is not one (and is not read into memory).
MAX_JSON_BYTES = 100_000_000


@dataclass
class Checkpoint:
    """The tensors of a model, listed from headers; data is read one tensor at a time."""

    folder: Path  # where config.json and friends live
    shards: list[Path]  # in order
    tensors: dict[str, TensorInfo | EncodedTensorInfo]  # in shard order, then file order
    format: CheckpointFormat  # how it is stored (``checkpoint/formats``)
    index_file: Path | None = None
    side_files: bool = True  # whether ``folder`` holds this model's config/tokenizer files
    metadata: dict[str, str] = field(default_factory=dict)
    #: The tensors as stored (``tensors`` lists quantized weights as one logical tensor each).
    stored: dict[str, TensorInfo] = field(default_factory=dict)

    def shard_of(self, name: str) -> Path:
        return self.tensors[name].file

    def made_side_files(self) -> dict[str, str]:
        """Side files to write with a plain-safetensors copy of this checkpoint where it has none of its
        own (a GGUF file's config.json); name -> text."""
        return {}

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one (logical) tensor, into ``out`` if given; encoded weights come back decoded."""
        info = self.tensors[name]
        if isinstance(info, EncodedTensorInfo):
            w = info.encoding.decode(info, self.read_part)
            return w if out is None else out.copy_(w)
        return self.read_stored(info, out)

    def read_stored(self, info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor as stored in the files; the only place tensor data enters memory."""
        return read_tensor(info, out)

    def read_part(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One stored tensor, or rows ``[start, stop)`` of its first dimension (what encodings read)."""
        if rows is None:
            return self.read_stored(info)
        start, stop = rows
        if not 0 <= start <= stop <= (info.shape[0] if info.shape else 1):
            raise ValueError(f"rows {rows} of {info.name} {list(info.shape)}")
        return self._read_rows(info, start, stop)

    def _read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a stored tensor (checked to exist): one positioned read."""
        row = math.prod(info.shape[1:]) * info.dtype.itemsize
        part = TensorInfo(info.name, info.dtype, (stop - start, *info.shape[1:]), info.file, info.offset + start * row)
        return read_tensor(part)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def config(self) -> dict | None:
        path = self.folder / "config.json"
        if not path.is_file():
            return None
        try:  # plain json: a config may hold Infinity, which json.dumps writes
            config = json.loads(read_small(path, MAX_JSON_BYTES, "a config.json"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
            raise InputError(f"{path}: not valid JSON ({reason})") from None
        if not isinstance(config, dict):
            raise InputError(f"{path}: not a JSON object; a model config maps names to values")
        return config


def resolves_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (links followed) lies inside ``folder``, or is a Hugging Face cache snapshot's link to
    its repo's blob: ``models--<org>--<name>/snapshots/<revision>/<file> -> models--<org>--<name>/blobs/<hash>``."""
    real, home = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if real.is_relative_to(home):
        return True
    repo = home.parent.parent
    return home.parent.name == "snapshots" and repo.name.startswith("models--") and real.parent == repo / "blobs"


def check_weights_file(path: Path, folder: Path, named_by: Path | None = None) -> None:
    """Refuse a weights file that is not a regular file, or that resolves outside its checkpoint folder.

    A folder from elsewhere (a download, an archive) may hold a symlink ``model.safetensors ->
    /home/you/private.safetensors``: merged and pushed, that would publish a file its owner never
    named. The one layout where weights legitimately point out of their folder is the Hugging Face
    cache, recognised exactly: ``<repo>/snapshots/<revision>/<file> -> <repo>/blobs/<hash>`` where
    ``<repo>`` is named ``models--<org>--<name>``.
    """
    where = f"{named_by}: shard {shown(os.path.relpath(path, folder))}" if named_by else str(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{where} does not exist in {folder}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{where}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{where} is not a regular file; a checkpoint's weights are files")
    if resolves_inside(path, folder):
        return
    raise InputError(f"{where} is a link to a file outside {folder}; refusing it (pass the file itself if you "
                     "trust it)")


def _shard_name(index_path: Path, tensor_name: str, shard: object) -> str:
    """The shard an index names, normalized (``./a`` and ``a`` are one shard); only files inside its folder."""
    if not isinstance(shard, str) or not shard or "\0" in shard:
        raise InputError(f"{index_path}: tensor {shown(tensor_name)} maps to {shown(shard)}, not a file name")
    name = os.path.normpath(shard)
    if os.path.isabs(name) or name == ".." or name.startswith("../"):
        raise InputError(f"{index_path}: shard {shown(shard)} lies outside the checkpoint folder; refusing it")
    if name == ".":
        raise InputError(f"{index_path}: tensor {shown(tensor_name)} maps to {shown(shard)}, the folder itself, "
                         "not a file")
    return name


def read_index(index_path: Path) -> tuple[dict[str, str], list[Path]]:
    """An index's weight map (tensor -> normalized shard name) and its shards, in order of first mention."""
    folder = index_path.parent
    try:
        index = load_json(read_small(index_path, MAX_JSON_BYTES, "an index"))
    except UntrustedError as e:
        raise InputError(f"{index_path}: the index is {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index_path}: not a valid index (needs a JSON object with a 'weight_map' object)")
    if not weight_map:
        raise InputError(f"{index_path}: the index's weight_map is empty; it names no tensor")
    listed = {tensor: _shard_name(index_path, tensor, shard) for tensor, shard in weight_map.items()}
    return listed, [folder / name for name in dict.fromkeys(listed.values())]


def check_index(ckpt: Checkpoint, index_path: Path, listed: dict[str, str]) -> Checkpoint:
    """Refuse an index that names a tensor its shard lacks, or places it in another shard."""
    folder = index_path.parent
    for tensor_name, name in listed.items():
        info = ckpt.tensors.get(tensor_name)
        if info is None:
            raise InputError(f"{index_path}: names tensor {shown(tensor_name)} in {name}, but that shard lacks it")
        if info.file != folder / name:
            raise InputError(f"{index_path}: tensor {shown(tensor_name)} is listed in {name} but found in "
                             f"{os.path.relpath(info.file, folder)}")
    return ckpt


def grouped(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` with its encoded weights listed as the logical tensors they stand for."""
    ckpt.stored = {n: t for n, t in ckpt.tensors.items() if isinstance(t, TensorInfo)}  # all, before grouping
    ckpt.tensors = group_encoded(ckpt.stored, ckpt.config, ckpt.read_part, str(ckpt.index_file or ckpt.folder))
    return ckpt


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch warns (on stderr, over several lines) about odd pickles
            warnings.simplefilter("ignore")
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # old (pre-zip) serialization cannot be memory-mapped
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise InputError(f"{path}: holds Python objects other than tensors, which wsurgery does not unpickle "
                             "(that could run arbitrary code); re-save the weights as safetensors") from None
        raise InputError(f"{path}: cannot load as a PyTorch weights file ({_first_line(e)})") from None
    except Exception as e:
        raise InputError(f"{path}: cannot load as a PyTorch weights file ({_first_line(e)}); "
                         "the file is corrupt or truncated") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    return sd


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
