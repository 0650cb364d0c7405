"""The interface every checkpoint file format implements, and the registry that finds them.

A format knows which files are its own (``claims_file``) and which file of a model folder it would
read (``find_in_folder``); it opens them into a ``Checkpoint`` (every header checked on open), says
how a plain-safetensors copy of such a checkpoint is laid out (``output_layout``) and whether an
unchanged tensor's stored bytes can be copied as they are (``copy_raw``), what ``inspect`` shows
besides the tensors (``describe``), and how a pushed file of its kind is checked (``check_pushed``).
A format that writes its own single files (GGUF) also implements the ``*_file_output`` methods. The
engine, ``describe``, ``api`` and the Hub code only call these, so adding a format means adding one
module to this package that defines a ``CheckpointFormat`` subclass and registers an instance.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from ...errors import InputError
from ...quant.encodings import EncodedTensorInfo
from ..reader import SAFETENSORS_INDEX_SUFFIX, Checkpoint
from ..output import copy_side_files
from ..writer import CheckpointWriter, OutputPart


class FileWriter(Protocol):
    """Writes one output file of a format's own, one tensor at a time, in any order."""

    total_bytes: int

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def copy_raw(self, name: str) -> bool: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class CheckpointFormat(ABC):
    """One way of storing a checkpoint on disk; one instance per format, registered with ``register_format``."""

    #: Short name, shown by ``inspect`` ("safetensors", "bin", "gguf").
    name: ClassVar[str]
    #: Formats are tried in ascending order (a folder with both safetensors and .bin weights is read
    #: as safetensors, as transformers reads it).
    preference: ClassVar[int] = 100
    #: The suffix of the single files this format writes itself (None: its checkpoints are written as
    #: safetensors folders).
    output_suffix: ClassVar[str | None] = None

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{self.name} format>"

    @abstractmethod
    def claims_file(self, path: Path) -> bool:
        """Whether ``path`` (a file, by its name) is one this format opens."""

    def find_in_folder(self, folder: Path) -> Path | None:
        """The file of ``folder`` this format would read as the model (None: none of its own); raises
        where the folder is ambiguous (several candidates)."""
        return None

    @abstractmethod
    def open(self, path: Path) -> Checkpoint:
        """Open the file ``path`` (one ``claims_file`` accepts), checking every header now."""

    def output_layout(self, ckpt: Checkpoint) -> tuple[dict[str, str], str, str]:
        """(tensor -> output shard name, single-file name, index name) of a safetensors copy of ``ckpt``:
        by default one ``model.safetensors``, split as ``--max-shard-size`` asks."""
        return ({n: "model.safetensors" for n in ckpt.tensors}, "model.safetensors",
                "model" + SAFETENSORS_INDEX_SUFFIX)

    def open_variant(self, path: Path, variant: str) -> Checkpoint:
        """Open ``path`` reading the weight files of ``variant`` ("fp16"; "" for the files without one), where
        the format may hold several sets of the same weights (a diffusers pipeline's components)."""
        raise InputError(f"{path}: {self.name} checkpoints have no weight variants; a variant applies to diffusers "
                         "pipeline folders")

    def output_parts(self, ckpt: Checkpoint) -> list[OutputPart]:
        """The checkpoints of their own a safetensors copy of ``ckpt`` is made of, each in a subfolder with
        its own keys and index (a diffusers pipeline's components); empty (the default): one checkpoint
        at the top of the folder. ``output_layout``'s file names then include the subfolder."""
        return []

    def copy_side_files(self, ckpt: Checkpoint, dst: Path) -> list[str]:
        """Copy the non-weight files that travel with a copy of ``ckpt`` (config, tokenizer...) into the
        output folder ``dst``; their paths relative to it."""
        return copy_side_files(ckpt.folder, dst)

    def copy_raw(self, ckpt: Checkpoint, writer: CheckpointWriter, name: str, target: Any) -> bool:
        """Copy an untouched tensor's stored bytes into a safetensors output where they are already
        what the output stores (``target``: the encoding the output asks for, None for plain); False
        where it must be read and written."""
        return False

    def describe(self, ckpt: Checkpoint) -> dict[str, Any]:
        """What ``inspect`` shows of ``ckpt`` besides its tensors."""
        return {}

    def stored_as(self, info: Any) -> str | None:
        """How ``inspect`` says a logical tensor is stored (None: plain, as listed)."""
        return info.encoding.describe() if isinstance(info, EncodedTensorInfo) else None

    def describe_lines(self, info: dict[str, Any]) -> list[str] | None:
        """``inspect``'s text lines for what ``describe`` added to ``info`` (None: nothing added)."""
        return None

    def pushed(self, name: str) -> bool:
        """Whether a top-level file ``name`` of a folder being pushed is weights of this format."""
        return self.claims_file(Path(name)) and not name.endswith(".index.json")

    def check_pushed(self, path: Path) -> None:
        """Refuse a broken file of this format before it is pushed."""
        self.open(path)

    def check_plain_output(self, ckpt: Checkpoint, out: Path) -> None:
        """Refuse an ``out`` that a plain (dequantized) copy of ``ckpt`` cannot be written to."""

    # -- single files of the format's own (``output_suffix``)

    def check_file_output(self, base: Checkpoint, out: Path, options: Any, changed: list[str],
                          out_shapes: dict[str, tuple[int, ...]]) -> Any:
        """Refuse, before anything is written, an output file this format cannot produce from ``base``;
        return the options to write it with."""
        raise NotImplementedError(f"{self.name} writes no files of its own")

    def file_writer(self, path: Path, base: Checkpoint, options: Any) -> FileWriter:
        raise NotImplementedError(f"{self.name} writes no files of its own")

    def file_rounding(self, base: Checkpoint, options: Any, name: str,
                      changed: bool) -> tuple[torch.dtype, str | None] | None:
        """How a tensor written into the file is checked before it is rounded: (the dtype its values
        must fit, the remedy to name where an unchanged tensor does not); None: written as it is."""
        return None


_FORMATS: list[CheckpointFormat] = []
F = TypeVar("F", bound=CheckpointFormat)


def register_format(fmt: F) -> F:
    """Make a format known to ``open_checkpoint``; formats are tried in ``preference`` order."""
    _FORMATS.append(fmt)
    _FORMATS.sort(key=lambda f: f.preference)
    return fmt


def registered_formats() -> list[CheckpointFormat]:
    return list(_FORMATS)


__all__ = ["CheckpointFormat", "FileWriter", "register_format", "registered_formats"]
