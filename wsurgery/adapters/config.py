"""``adapter_config.json``: the fields that decide how saved tensors turn into weight changes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError


def match_pattern(patterns: dict[str, Any] | None, module_path: str) -> Any | None:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: the first key, in dict order, that matches
    the end of the module path at a component boundary (``re.match(rf"(.*\\.)?({key})$", path)``)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return None


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """``"0.18.1.dev0"`` -> ``(0, 18, 1)``; None when absent (PEFT < 0.18 did not record it)."""
    if not text:
        return None
    parts = []
    for piece in str(text).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts) or None


@dataclass(frozen=True)
class AdapterConfig:
    """The parsed config; ``raw`` keeps every field, typed accessors cover the common ones."""

    path: Path
    raw: dict[str, Any]

    @property
    def peft_type(self) -> str:
        return str(self.raw.get("peft_type", "")).upper()

    @property
    def peft_version(self) -> tuple[int, ...] | None:
        return parse_version(self.raw.get("peft_version"))

    @property
    def base_model(self) -> str | None:
        return self.raw.get("base_model_name_or_path")

    def get(self, key: str, default: Any = None) -> Any:
        value = self.raw.get(key, default)
        return default if value is None else value

    def pattern(self, field: str, module_path: str) -> Any | None:
        return match_pattern(self.raw.get(field), module_path)

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.raw.get("modules_to_save") or [])


def load_config(folder: Path) -> AdapterConfig:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise InputError(f"{folder}: no adapter_config.json; is this a PEFT adapter folder?")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); fix or re-save the adapter") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: must hold a JSON object")
    if not raw.get("peft_type"):
        raise InputError(f"{path}: has no 'peft_type'; cannot tell which method the adapter uses")
    return AdapterConfig(path, raw)
