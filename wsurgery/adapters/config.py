"""``adapter_config.json``: the fields that decide how saved tensors turn into weight changes."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError


def match_pattern(patterns: dict[str, Any] | None, module_path: str) -> Any | None:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: the first key, in dict order, that matches
    the end of the module path at a component boundary (``re.match(rf"(.*\\.)?({key})$", path)``)."""
    for key, value in (patterns or {}).items():
        if re.match(_pattern_regex(key), module_path):
            return value
    return None


# Fields that hold a number wherever PEFT has them: a string or bool there would crash a method, or
# be read as some other number. ``r`` is a rank: a whole number (0 in OFT, whose blocks are sized by
# ``oft_block_size`` instead).
_NUMBER_FIELDS = frozenset({"lora_alpha", "alpha", "init_r", "target_r", "randlora_alpha", "psoft_alpha", "scaling",
                            "weight_tying", "sparsity"})
_RANK_FIELDS = frozenset({"r"})
# Fields that take ``True``/``False`` as well as other values (PEFT's init schemes): ``get`` with a
# bool default accepts anything for them.
_NOT_ONLY_BOOL = frozenset({"init_lora_weights", "init_weights"})
# ``*_pattern`` fields that are not {regex: number} maps.
_OTHER_PATTERNS = frozenset({"layers_pattern"})
_FLOAT32_MAX = 3.4028234663852886e38  # the merge computes in float32


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rank(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and value == int(value) and value >= 0


def _check_number(value: Any, where: str) -> None:
    """A number the float32 arithmetic can use: not a string or bool, within float32's range."""
    if not _is_number(value):
        raise InputError(f"{where} is {value!r}; it must be a number")
    if abs(value) > _FLOAT32_MAX:
        raise InputError(f"{where} is {value!r}, beyond float32's range (±3.4e38); the merge computes in float32")


def _non_finite(value: Any, where: str) -> str | None:
    """The path (``alpha_pattern["q_proj"]``) of the first non-finite number in a JSON value, if any."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}[{key!r}]" if isinstance(key, str) else f"{where}[{key}]")
        if found is not None:
            return found
    return None


def _pattern_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


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

    def __post_init__(self) -> None:
        """Refuse, at load, every number a method could misread: non-finite values anywhere (JSON
        ``NaN``/``Infinity``/``1e400``), non-numbers in numeric fields, and bad ``*_pattern`` maps."""
        for key, value in self.raw.items():
            where = _non_finite(value, key)
            if where is not None:
                raise InputError(f"{self.path}: {where} is {value if where == key else 'not finite'}; every number "
                                 "in an adapter config must be finite: fix the file")
            if value is None:
                continue
            if key in _NUMBER_FIELDS:
                _check_number(value, f"{self.path}: {key}")
            if key in _RANK_FIELDS and not _is_rank(value):
                raise InputError(f"{self.path}: {key} is {value!r}; a rank must be a whole number >= 0")
            if key.endswith("_pattern") and key not in _OTHER_PATTERNS:
                self._check_pattern(key, value)

    def _check_pattern(self, field: str, patterns: Any) -> None:
        """A ``{regex: number}`` map (AdaLoRA: ``{name: rank mask}``) whose every key compiles; PEFT matches
        the keys against module paths."""
        if not isinstance(patterns, dict):
            raise InputError(f"{self.path}: {field} must be a mapping of module-name regexes to numbers, "
                             f"not {type(patterns).__name__}")
        for key, value in patterns.items():
            try:
                re.compile(key)
                re.compile(_pattern_regex(key))
            except (re.error, TypeError) as e:
                raise InputError(f"{self.path}: {field} key {key!r} is not a valid regular expression ({e}); "
                                 "fix the adapter config") from None
            if field == "rank_pattern" and isinstance(value, list) and all(isinstance(v, bool) for v in value):
                continue  # AdaLoRA's rank mask
            if field == "rank_pattern" and not _is_rank(value):
                raise InputError(f"{self.path}: {field}[{key!r}] is {value!r}; a rank must be a whole number >= 0")
            _check_number(value, f"{self.path}: {field}[{key!r}]")

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
        """The field, or ``default`` when absent or null; a number default requires a number (not a
        bool or string), a bool default a bool, so a mistyped field is refused instead of misread."""
        value = self.raw.get(key)
        if value is None:
            return default
        if _is_number(default):
            _check_number(value, f"{self.path}: {key}")
        if isinstance(default, bool) and not isinstance(value, bool) and key not in _NOT_ONLY_BOOL:
            raise InputError(f"{self.path}: {key} is {value!r}; it must be true or false")
        return value

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
