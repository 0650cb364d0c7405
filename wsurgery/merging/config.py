"""mergekit's configuration, read as mergekit reads it: its YAML (``merge_method``, ``base_model``,
``models[].parameters``, ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source: base``) and its
parameter settings, resolved per tensor (``mergekit/config.py``, ``parameter_resolver.py``):

- a number or bool applies to every tensor;
- a list of numbers is a gradient over the layers: layer i of L takes the value at t = i/(L-1),
  interpolated linearly between neighbouring entries (tensors outside the layers take t = 0);
- a list of ``{filter, value}`` takes the first entry whose filter is a substring of the tensor's name
  (no filter, or ``*``, matches all); if none matches, the next scope decides.
A model's own setting wins over the merge-wide ``parameters``, which win over the method's default.
Anything else in the YAML (slices, modules, tokenizer surgery, chat templates...) is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, UnsupportedError
from .base import REQUIRED, MergeMethod, Param

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

_KNOWN_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_REFUSED_KEYS = {"slices": "slices (layer ranges)", "modules": "modules", "tokenizer": "tokenizer surgery",
                 "chat_template": "chat_template"}


@dataclass
class ModelSpec:
    """One input: a model folder or file, or ``BASE+ADAPTER`` (mergekit's LoRA syntax: the base with the
    adapter merged) or an adapter folder (the same, on the merge's base); with its own settings."""

    path: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    method: str
    base: str | None
    models: list[ModelSpec]
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # the dtype inputs are read in and merged in (mergekit's ``dtype``)
    out_dtype: str | None = None  # the dtype written


def _str(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: {key} must be a model path, not {value!r}")
    return value


def read_yaml(path: str | Path) -> MergeConfig:
    """A mergekit YAML file as a ``MergeConfig``; anything this reader would not reproduce exactly is refused."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a mergekit config (a mapping with merge_method and models)")
    for key in data:
        if key in _REFUSED_KEYS:
            raise UnsupportedError(f"{path}: '{key}' ({_REFUSED_KEYS[key]}) is not supported; merge-models "
                                   "merges whole models listed under 'models'")
        if key not in _KNOWN_KEYS:
            raise UnsupportedError(f"{path}: option '{key}' is not supported (known: {', '.join(sorted(_KNOWN_KEYS))})")
    if "merge_method" not in data:
        raise InputError(f"{path}: names no merge_method")
    source = data.get("tokenizer_source")
    if source not in (None, "base") and source != data.get("base_model"):
        raise UnsupportedError(f"{path}: tokenizer_source {source!r} is not supported; only the base's tokenizer "
                               "(tokenizer_source: base) is copied")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise InputError(f"{path}: 'models' must be a list of {{model: PATH, parameters: {{...}}}}")
    specs = []
    for i, m in enumerate(models):
        where = f"{path}: models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise InputError(f"{where}: must be a mapping with 'model'")
        unknown = set(m) - {"model", "parameters"}
        if unknown:
            raise UnsupportedError(f"{where}: option(s) {', '.join(sorted(unknown))} not supported")
        params = m.get("parameters") or {}
        if not isinstance(params, dict):
            raise InputError(f"{where}: parameters must be a mapping")
        specs.append(ModelSpec(_str(m["model"], "model", where), params))
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError(f"{path}: parameters must be a mapping")
    base = data.get("base_model")
    return MergeConfig(str(data["merge_method"]), _str(base, "base_model", str(path)) if base is not None else None,
                       specs, params, data.get("dtype"), data.get("out_dtype"))


def check_names(method: MergeMethod, config: MergeConfig, where: str) -> None:
    """Refuse a parameter the method does not have (mergekit would ignore it: a typo would go unnoticed)."""
    known = set(method.shared) | set(method.per_model)
    for scope, params in [("parameters", config.parameters)] + [
            (f"models[{i}] ({m.path}).parameters", m.parameters) for i, m in enumerate(config.models)]:
        unknown = sorted(set(params) - known)
        if unknown:
            raise UnsupportedError(f"{where}: {scope} names {', '.join(unknown)}, which {method.name} does not have "
                                   f"(it has {', '.join(sorted(known)) or 'no parameters'})")


def layer_t(tensor: str, num_layers: int | None) -> float:
    """mergekit's gradient position of a tensor: i/(L-1) for layer i of L, 1 for a lone layer, else 0."""
    m = _LAYER.search(tensor)
    if m is None or not num_layers:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def _evaluate(tensor: str, setting: Any, t: float, param: Param, name: str, where: str) -> Any:
    """One scope's value of a setting for ``tensor``, or None where its filters all miss (mergekit's
    ``evaluate_setting``)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (int, float, bool, str)):
        return param.check(name, setting, where)
    if not isinstance(setting, list):
        raise InputError(f"{where}: {name}: cannot read {setting!r} (a value, a list of values, or filters)")
    if not setting:
        return None
    if all(isinstance(e, (int, float, bool, str)) for e in setting):
        values = [param.check(name, e, where) for e in setting]
        if param.kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return param.check(name, (1 - frac) * values[i0] + frac * values[i1], where)
    for cond in setting:
        if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"value", "filter"}:
            raise InputError(f"{where}: {name}: {cond!r} is not a {{filter, value}} entry")
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor and str(flt) in tensor):
            return _evaluate(tensor, cond["value"], t, param, name, where)
    return None


def resolve(name: str, param: Param, scopes: list[tuple[dict[str, Any], str]], tensor: str, t: float) -> Any:
    """The value of parameter ``name`` for ``tensor``: the first scope that sets it, else the default."""
    for settings, where in scopes:
        if name in settings:
            value = _evaluate(tensor, settings[name], t, param, name, where)
            if value is not None:
                return value
    if param.default is REQUIRED:
        raise InputError(f"{tensor}: parameter {name} is required and not set ({', '.join(w for _, w in scopes)})")
    return param.default
