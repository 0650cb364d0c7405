"""Checkpoint file formats, one module each; importing this package registers them all.

To add a format, add a module here that defines a ``CheckpointFormat`` subclass and registers an
instance with ``register_format`` (see ``base.py``). Formats that need a heavy package (GGUF's
``gguf``) import it only when one of their files is opened, so plain jobs never load it.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ...errors import InputError
from ..reader import Checkpoint
from .base import CheckpointFormat, FileWriter, register_format, registered_formats

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint file or folder and validate every shard header.

    Encoded weights are listed as the logical tensors they stand for (see ``wsurgery.quant.encodings``),
    and so are the tensors of a llama.cpp ``.gguf`` file (see ``gguf_format``).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not path.is_dir():
        fmt = format_of_file(path)
        if fmt is None:
            raise InputError(f"{path}: not a checkpoint file (expected .safetensors, .bin, .gguf or an index .json)")
        return fmt.open(path)
    for fmt in registered_formats():
        found = fmt.find_in_folder(path)
        if found is not None:
            ckpt = fmt.open(found)
            ckpt.side_files = True  # the folder named is the model's folder
            return ckpt
    if (path / "adapter_config.json").is_file():
        raise InputError(f"{path}: this is an adapter folder, not a model checkpoint")
    raise InputError(f"{path}: no model weights found (expected model.safetensors, a safetensors index, "
                     "or pytorch_model.bin)")


def format_of_file(path: Path) -> CheckpointFormat | None:
    """The format that opens the file ``path``, by its name."""
    return next((f for f in registered_formats() if f.claims_file(path)), None)


def file_format(out: Path) -> CheckpointFormat | None:
    """The format that writes ``out`` as one file of its own (a ``.gguf``); None for a folder output."""
    return next((f for f in registered_formats() if f.output_suffix is not None and out.suffix == f.output_suffix),
                None)


def pushed_format(name: str) -> CheckpointFormat | None:
    """The format of a top-level file of a folder being pushed, if it is weights."""
    return next((f for f in registered_formats() if f.pushed(name)), None)


__all__ = ["CheckpointFormat", "FileWriter", "file_format", "format_of_file", "open_checkpoint", "pushed_format",
           "register_format", "registered_formats"]
