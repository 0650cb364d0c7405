"""Which compressed-tensors configs wsurgery reads, and which config group applies to a module."""

from __future__ import annotations

import re

from ...checkpoint.safetensors_file import TensorInfo
from ...errors import InputError, UnsupportedError

FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")


def unsupported(q: dict) -> str | None:
    """Why a compressed-tensors config is outside what this encoding reads (None: it is inside)."""
    status = q.get("quantization_status", "compressed")
    if status != "compressed":
        return f"has quantization_status {status!r} (weights not stored compressed)"
    if q.get("sparsity_config") or q.get("transform_config"):
        return "records a sparsity or transform config (weights are not plain after decompression)"
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return "has no config_groups"
    for gname, g in groups.items():
        if not isinstance(g, dict):
            return f"has an unreadable config group {gname!r}"
        fmt = g.get("format") or q.get("format")
        if g.get("weights") and fmt not in FORMATS:
            return f"stores config group {gname!r} in format {fmt!r}"
    return None


def _matches(name: str, target: str) -> bool:
    """compressed-tensors' ``match_name``: ``re:`` targets match from the start, others whole names."""
    if not target.startswith("re:"):
        return target == name
    try:
        return re.match(target[3:], name) is not None
    except re.error as e:
        raise InputError(f"quantization_config target {target!r} is not a valid regular expression ({e})") from None


class Matcher:
    """compressed-tensors' choice of config group for a module (``apply_quantization_config``): exact
    name targets, then ``re:`` targets, in its sorted order; failing those a class-name target, here
    any non-regex target naming no module (the files hold no classes). Built once per checkpoint."""

    def __init__(self, q: dict, stored: dict[str, TensorInfo], where: str) -> None:
        self.where = where
        self.ignore = list(q.get("ignore") or [])
        by_target: dict[str, dict] = {}
        for g in q["config_groups"].values():
            for t in g.get("targets") or []:
                by_target[t] = g  # a later group listing the same target wins, as there
        self.by_name = [(t, by_target[t]) for t in sorted(by_target, key=lambda t: ("re:" in t, t))]
        modules = {n.rpartition(".")[0] for n in stored}
        self.classes = sorted(t for t in by_target if not t.startswith("re:") and t not in modules)
        self.class_schemes = list({id(by_target[t]): by_target[t] for t in self.classes}.values())

    def scheme(self, module: str) -> dict:
        label = f"{self.where}: {module}"
        if any(_matches(module, t) for t in self.ignore):
            raise InputError(f"{label} is stored quantized but quantization_config's ignore list names it; the file "
                             "disagrees with its config")
        scheme = next((g for t, g in self.by_name if _matches(module, t)), None)
        if scheme is None:
            if not self.class_schemes:
                raise InputError(f"{label} is stored quantized but no config group of quantization_config targets it")
            if len(self.class_schemes) > 1:
                raise UnsupportedError(f"{label}: several config groups target layer classes "
                                       f"({', '.join(self.classes)}) and the file does not say which class this "
                                       "layer is")
            scheme = self.class_schemes[0]
        if not scheme.get("weights"):
            raise InputError(f"{label} is stored quantized but its config group quantizes no weights")
        return scheme
