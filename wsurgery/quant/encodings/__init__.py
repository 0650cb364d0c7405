"""Stored weight encodings, one module each; importing this package registers them all.

To add an encoding, add a module here that defines an ``Encoding`` subclass decorated with
``@register`` (see ``base.py``).
"""

from __future__ import annotations

import importlib
import pkgutil

from ...checkpoint.safetensors_file import TensorInfo
from ...errors import InputError
from .base import EncodedTensorInfo, Encoding, GroupContext, ReadPart, Rows, register, registered

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def group_encoded(stored: dict[str, TensorInfo], config: dict | None, read: ReadPart,
                  where: str) -> dict[str, TensorInfo | EncodedTensorInfo]:
    """``stored`` with each encoded weight's stored tensors replaced by one ``EncodedTensorInfo``, in
    file order (a logical tensor takes the place of its first part)."""
    q = (config or {}).get("quantization_config")
    context = GroupContext(config, q if isinstance(q, dict) else None, read, where)
    owner: dict[str, str] = {}
    found: dict[str, EncodedTensorInfo] = {}
    for encoding in registered():
        for name, info in encoding.group(stored, context).items():
            for part in info.parts.values():
                if part.name in owner:
                    raise InputError(f"{where}: {part.name} is read as part of both {owner[part.name]} and {name}; "
                                     "the checkpoint mixes encodings in a way wsurgery cannot tell apart")
                owner[part.name] = name
            found[name] = info
    if not found:
        return dict(stored)
    grouped: dict[str, TensorInfo | EncodedTensorInfo] = {}
    for n, plain in stored.items():
        logical = owner.get(n)
        if logical is None:
            if n in found:
                raise InputError(f"{where}: {n} is stored plain and also encoded by other tensors; the checkpoint "
                                 "is inconsistent")
            grouped[n] = plain
        elif logical not in grouped:
            grouped[logical] = found[logical]
    return grouped


def recognized(quantization_config: dict) -> type[Encoding] | None:
    """The encoding a ``quantization_config`` records, if one is registered."""
    return next((e for e in registered() if e.recognizes(quantization_config)), None)


__all__ = ["EncodedTensorInfo", "Encoding", "GroupContext", "ReadPart", "Rows", "group_encoded", "recognized",
           "register", "registered"]
