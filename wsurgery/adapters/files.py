"""Adapters stored as one ``.safetensors`` file by the image-model ecosystems (kohya, LyCORIS, diffusers), read
through ``adapters.formats`` and merged like a PEFT folder: their modules are placed by the base's family."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..methods import Patch
from .formats import AdapterFile, read_adapter_file
from .loader import Adapter, load_adapter


@dataclass
class FileAdapter:
    """One adapter file; ``folder`` is the file itself (what messages name and outputs must not overwrite)."""

    folder: Path
    contents: AdapterFile

    @property
    def file(self) -> Path:
        return self.folder

    def patches(self) -> list[Patch]:
        return [m.patch for m in self.contents.modules.values()]


def is_adapter_file(path: Path) -> bool:
    """A lone ``.safetensors`` adapter (not the weights file of a PEFT folder)."""
    return path.is_file() and path.suffix == ".safetensors" and not (path.parent / "adapter_config.json").is_file()


def load_any_adapter(path: str | Path, options: dict[str, Any] | None = None) -> Adapter | FileAdapter:
    """A PEFT adapter folder, or a kohya / LyCORIS / diffusers adapter file."""
    path = Path(path)
    if not is_adapter_file(path):
        return load_adapter(path, options)
    given = sorted(k for k, v in (options or {}).items() if v is not None)
    if given:
        raise InputError(f"{path}: option(s) {', '.join(given)} are for PEFT adapter folders, not adapter files")
    return FileAdapter(path, read_adapter_file(path))
