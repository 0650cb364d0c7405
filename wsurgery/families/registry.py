"""The registered families, in a fixed order (detection tries them all and wants exactly one)."""

from __future__ import annotations

from typing import TypeVar

from .base import Family

F = TypeVar("F", bound=type[Family])
_FAMILIES: dict[str, type[Family]] = {}


def register(cls: F) -> F:
    if cls.name in _FAMILIES:
        raise ValueError(f"family {cls.name} registered twice")
    _FAMILIES[cls.name] = cls
    return cls


def families() -> dict[str, type[Family]]:
    return dict(_FAMILIES)
