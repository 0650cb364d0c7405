"""Open a model checkpoint in any of the layouts ``save_pretrained`` writes, without loading it.

Supported: a single ``.safetensors`` file; a folder with ``model.safetensors``; a folder with shards
and a ``*.safetensors.index.json``; legacy ``pytorch_model.bin`` (+ ``pytorch_model.bin.index.json``),
read with ``torch.load(weights_only=True, mmap=True)`` so that only the tensor asked for is paged in.
Every shard header is read and validated on open, so a broken checkpoint fails before any work.
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

import torch

from ..errors import InputError
from .safetensors_file import TensorInfo, read_header, read_tensor
from .untrusted import UntrustedError, load_json, read_small, shown
from ..quant.encodings import EncodedTensorInfo, group_encoded

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
    format: str  # "safetensors" or "bin"
    index_file: Path | None = None
    side_files: bool = True  # whether ``folder`` holds this model's config/tokenizer files
    metadata: dict[str, str] = field(default_factory=dict)
    #: The tensors as stored (``tensors`` lists quantized weights as one logical tensor each).
    stored: dict[str, TensorInfo] = field(default_factory=dict)
    _bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = field(default=None, repr=False)

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
        if self.format == "safetensors":
            return read_tensor(info, out)
        if self._bin_cache is None or self._bin_cache[0] != info.file:
            self._bin_cache = (info.file, _load_bin(info.file))
        src = self._bin_cache[1][info.name]  # memory-mapped: only this tensor's pages are read
        return src.clone() if out is None else out.copy_(src)

    def read_part(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One stored tensor, or rows ``[start, stop)`` of its first dimension (what encodings read)."""
        if rows is None:
            return self.read_stored(info)
        start, stop = rows
        if not 0 <= start <= stop <= (info.shape[0] if info.shape else 1):
            raise ValueError(f"rows {rows} of {info.name} {list(info.shape)}")
        if self.format != "safetensors":
            return self.read_stored(info)[start:stop]
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


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint file or folder and validate every shard header.

    Encoded weights are listed as the logical tensors they stand for (see ``wsurgery.quant.encodings``),
    and so are the tensors of a llama.cpp ``.gguf`` file (see ``gguf_format``).
    """
    if Path(path).suffix == ".gguf":
        from .gguf_format import open_gguf  # imported here: gguf_format builds on this module

        return open_gguf(Path(path))
    ckpt = _open(Path(path))
    ckpt.stored = dict(ckpt.tensors)
    ckpt.tensors = group_encoded(ckpt.stored, ckpt.config, ckpt.read_part, str(ckpt.index_file or ckpt.folder))
    return ckpt


def _open(path: Path) -> Checkpoint:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not path.is_dir():
        if path.name.endswith(SAFETENSORS_INDEX_SUFFIX) or path.name == BIN_INDEX_NAME:
            return _open_index(path)
        if path.suffix == ".safetensors":
            ckpt = _open_safetensors([path], path.parent, None)
        elif path.suffix in (".bin", ".pt", ".pth"):
            ckpt = _open_bin([path], path.parent, None)
        else:
            raise InputError(f"{path}: not a checkpoint file (expected .safetensors, .bin, .gguf or an index .json)")
        # A lone file carries its folder's config only if that folder is a model folder.
        ckpt.side_files = (path.parent / "config.json").is_file()
        return ckpt

    indexes = sorted(p for p in path.glob("*" + SAFETENSORS_INDEX_SUFFIX) if not p.name.startswith("adapter"))
    if len(indexes) > 1:
        raise InputError(f"{path}: several safetensors index files ({', '.join(p.name for p in indexes)}); "
                         "pass the one to use")
    if indexes:
        return _open_index(indexes[0])
    singles = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if path / "model.safetensors" in singles:
        singles = [path / "model.safetensors"]
    if len(singles) == 1:
        return _open_safetensors(singles, path, None)
    if len(singles) > 1:
        raise InputError(f"{path}: several .safetensors files and no index ({', '.join(p.name for p in singles)}); "
                         "pass the file to use")
    if (path / BIN_INDEX_NAME).exists():
        return _open_index(path / BIN_INDEX_NAME)
    if (path / "pytorch_model.bin").exists():
        return _open_bin([path / "pytorch_model.bin"], path, None)
    if (path / "adapter_config.json").is_file():
        raise InputError(f"{path}: this is an adapter folder, not a model checkpoint")
    raise InputError(f"{path}: no model weights found (expected model.safetensors, a safetensors index, "
                     "or pytorch_model.bin)")


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


def _open_index(index_path: Path) -> Checkpoint:
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
    shards = [folder / name for name in dict.fromkeys(listed.values())]  # in order of first mention
    is_bin = index_path.name == BIN_INDEX_NAME or all(p.suffix == ".bin" for p in shards)
    ckpt = _open_bin(shards, folder, index_path) if is_bin else _open_safetensors(shards, folder, index_path)
    for tensor_name, name in listed.items():
        info = ckpt.tensors.get(tensor_name)
        if info is None:
            raise InputError(f"{index_path}: names tensor {shown(tensor_name)} in {name}, but that shard lacks it")
        if info.file != folder / name:
            raise InputError(f"{index_path}: tensor {shown(tensor_name)} is listed in {name} but found in "
                             f"{os.path.relpath(info.file, folder)}")
    return ckpt


def _open_safetensors(shards: list[Path], folder: Path, index: Path | None) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard in shards:
        check_weights_file(shard, folder, index)
        infos, meta = read_header(shard)
        metadata = metadata or meta
        for name, info in infos.items():
            if name in tensors:
                raise InputError(f"{shard}: tensor {shown(name)} is also in {tensors[name].file.name}")
            tensors[name] = info
    return Checkpoint(folder, shards, tensors, "safetensors", index, metadata=metadata)


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
    except Exception as e:  # noqa: BLE001 -- garbage makes the unpickler fail in any way (IndexError, OSError, ...)
        raise InputError(f"{path}: cannot load as a PyTorch weights file ({_first_line(e)}); "
                         "the file is corrupt or truncated") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    return sd


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _open_bin(shards: list[Path], folder: Path, index: Path | None) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    ckpt = Checkpoint(folder, shards, tensors, "bin", index)
    for shard in shards:
        check_weights_file(shard, folder, index)
        sd = _load_bin(shard)
        for name, t in sd.items():
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), shard, -1)
        ckpt._bin_cache = (shard, sd)
    return ckpt
