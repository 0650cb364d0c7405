"""The plug-in interface of adapter-file formats, and the typed result of reading one file."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...errors import InputError
from ...methods.base import Patch

#: Metadata keys worth showing (``inspect``); any ``modelspec.*`` and ``lycoris_*`` key is shown too.
SUMMARY_KEYS = ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                "ss_sd_model_name", "ss_v2", "ss_output_name", "ss_training_comment")


@dataclass(frozen=True)
class AdapterModule:
    """One module's change, as the file names the module."""

    name: str
    algo: str  # lora, lora/tucker, loha, lokr, full, norm, glora, diag-oft, boft, ia3
    patch: Patch
    rank: int | None
    alpha: float | None  # as stored (None: not stored)
    keys: tuple[str, ...]  # the file's tensor names that make up this module
    dora: bool = False


@dataclass(frozen=True)
class AdapterFile:
    path: Path
    format: str  # the registered format's name: kohya, diffusers
    modules: dict[str, AdapterModule]
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's metadata, whole

    @property
    def patches(self) -> dict[str, Patch]:
        return {n: m.patch for n, m in self.modules.items()}

    @property
    def algos(self) -> dict[str, str]:
        return {n: m.algo for n, m in self.modules.items()}

    @property
    def summary(self) -> dict[str, str]:
        """The metadata a user recognises the adapter by (base model, network module, dim/alpha, modelspec)."""
        return {k: v for k, v in self.metadata.items()
                if k in SUMMARY_KEYS or k.startswith(("modelspec.", "lycoris_"))}

    def table(self) -> list[dict[str, Any]]:
        """One row per module for ``inspect``: name, algo, rank, alpha, DoRA, and the patch's own facts."""
        return [{"module": m.name, "algo": m.algo, "rank": m.rank, "alpha": m.alpha, "dora": m.dora,
                 **m.patch.describe()} for m in self.modules.values()]

    @property
    def base_model(self) -> str | None:
        """What the file says it was trained on, if it says."""
        return self.metadata.get("ss_base_model_version") or self.metadata.get("modelspec.architecture")


class AdapterFormat(ABC):
    """One adapter-file format; subclasses are registered with ``@register_format``."""

    name: ClassVar[str]

    def detect(self, keys: list[str], metadata: Mapping[str, str]) -> bool:
        """True if these tensor names (and metadata) are this format's."""
        return not self.foreign_keys(keys)

    @abstractmethod
    def foreign_keys(self, keys: list[str]) -> list[str]:
        """The tensor names this format cannot hold ([] for a file of this format), for the error that names them
        when no format holds every key."""

    @abstractmethod
    def read(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> AdapterFile:
        """The file's modules and patches; one-line ``InputError`` for unknown keys or inconsistent metadata."""


_FORMATS: dict[str, AdapterFormat] = {}


def register_format(cls: type[AdapterFormat]) -> type[AdapterFormat]:
    if cls.name in _FORMATS:
        raise RuntimeError(f"two adapter formats register {cls.name}")
    _FORMATS[cls.name] = cls()
    return cls


def formats() -> dict[str, AdapterFormat]:
    return dict(_FORMATS)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InputError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .safetensors adapter file ({' '.join(str(e).split())}); "
                         "convert .pt/.ckpt adapters to safetensors first") from e
    return tensors, metadata


def detect_format(path: Path, keys: list[str], metadata: Mapping[str, str]) -> AdapterFormat:
    found = [f for f in _FORMATS.values() if f.detect(keys, metadata)]
    if len(found) == 1:
        return found[0]
    if found:
        raise InputError(f"{path}: its tensor names ({describe_keys(keys, 4)}) fit several adapter formats "
                         f"({', '.join(f.name for f in found)}); cannot tell which")
    # The format that explains most keys names the rest: usually a few keys of an unknown variant.
    best = min(_FORMATS.values(), key=lambda f: len(f.foreign_keys(keys)))
    foreign = best.foreign_keys(keys)
    if len(foreign) < len(keys):
        raise InputError(f"{path}: looks like a {best.name} adapter but {len(foreign)} of its {len(keys)} tensors are "
                         f"not {best.name} adapter tensors: {describe_keys(foreign, 4)}")
    raise InputError(f"{path}: its tensor names ({describe_keys(keys, 4)}) match no known adapter format "
                     f"({', '.join(sorted(_FORMATS))})")


def read_adapter_file(path: str | Path) -> AdapterFile:
    """Read a kohya / LyCORIS / diffusers-style adapter file (format detected from keys and metadata)."""
    path = Path(path)
    tensors, metadata = _load(path)
    if not tensors:
        raise InputError(f"{path}: the adapter file holds no tensors")
    fmt = detect_format(path, list(tensors), metadata)
    return fmt.read(path, tensors, metadata)


def scalar(path: Path, key: str, t: torch.Tensor) -> float:
    """A 0-d (or one-element) tensor such as kohya's ``.alpha`` as a float."""
    if t.numel() != 1:
        raise InputError(f"{path}: {key} should be a single number but has shape {list(t.shape)}")
    return float(t.reshape(()).to(torch.float64))


def describe_keys(keys: list[str] | tuple[str, ...], limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} keys)" if len(keys) > limit else "")
