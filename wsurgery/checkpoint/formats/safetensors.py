"""``save_pretrained``'s safetensors layouts: one ``.safetensors`` file, a folder with
``model.safetensors``, or shards with a ``*.safetensors.index.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import InputError
from ...quant.encodings import EncodedTensorInfo
from ..reader import SAFETENSORS_INDEX_SUFFIX, Checkpoint, check_index, check_weights_file, grouped, read_index
from ..safetensors_file import TensorInfo, read_header
from ..untrusted import shown
from ..writer import CheckpointWriter
from .base import CheckpointFormat, register_format
from .bin import BIN


class SafetensorsFormat(CheckpointFormat):
    name = "safetensors"
    preference = 10

    def claims_file(self, path: Path) -> bool:
        return path.name.endswith(SAFETENSORS_INDEX_SUFFIX) or path.suffix == ".safetensors"

    def find_in_folder(self, folder: Path) -> Path | None:
        indexes = sorted(p for p in folder.glob("*" + SAFETENSORS_INDEX_SUFFIX) if not p.name.startswith("adapter"))
        if len(indexes) > 1:
            raise InputError(f"{folder}: several safetensors index files ({', '.join(p.name for p in indexes)}); "
                             "pass the one to use")
        if indexes:
            return indexes[0]
        singles = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_model"))
        if folder / "model.safetensors" in singles:
            return folder / "model.safetensors"
        if len(singles) > 1:
            raise InputError(f"{folder}: several .safetensors files and no index "
                             f"({', '.join(p.name for p in singles)}); pass the file to use")
        return singles[0] if singles else None

    def open(self, path: Path) -> Checkpoint:
        if not path.name.endswith(SAFETENSORS_INDEX_SUFFIX):
            ckpt = self.open_shards([path], path.parent, None)
            # A lone file carries its folder's config only if that folder is a model folder.
            ckpt.side_files = (path.parent / "config.json").is_file()
            return grouped(ckpt)
        listed, shards = read_index(path)
        if all(p.suffix == ".bin" for p in shards):  # an index named for safetensors, of .bin shards
            return grouped(check_index(BIN.open_shards(shards, path.parent, path), path, listed))
        return grouped(check_index(self.open_shards(shards, path.parent, path), path, listed))

    def open_shards(self, shards: list[Path], folder: Path, index: Path | None) -> Checkpoint:
        tensors: dict[str, TensorInfo | EncodedTensorInfo] = {}
        metadata: dict[str, str] = {}
        for shard in shards:
            check_weights_file(shard, folder, index)
            infos, meta = read_header(shard)
            metadata = metadata or meta
            for name, info in infos.items():
                if name in tensors:
                    raise InputError(f"{shard}: tensor {shown(name)} is also in {tensors[name].file.name}")
                tensors[name] = info
        return Checkpoint(folder, shards, tensors, self, index, metadata=metadata)

    def output_layout(self, ckpt: Checkpoint) -> tuple[dict[str, str], str, str]:
        """The base's own shard names, single-file name and index name."""
        assignment = {n: t.file.name for n, t in ckpt.tensors.items()}
        single = ckpt.shards[0].name if len(ckpt.shards) == 1 else "model.safetensors"
        index = ckpt.index_file.name if ckpt.index_file is not None else "model" + SAFETENSORS_INDEX_SUFFIX
        return assignment, single, index

    def copy_raw(self, ckpt: Checkpoint, writer: CheckpointWriter, name: str, target: Any) -> bool:
        """Stored bytes are safetensors bytes: copied where the output stores the tensor as the base does."""
        info = ckpt.tensors[name]
        if isinstance(info, EncodedTensorInfo):
            if target is None or target != info.encoding:
                return False
            for part in info.parts.values():
                if not writer.copy_from(part.name, part):
                    writer.write(part.name, ckpt.read_stored(part))
            return True
        return target is None and writer.copy_from(name, info)


SAFETENSORS = register_format(SafetensorsFormat())
