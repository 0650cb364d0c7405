"""What a merge method is: its parameters (mergekit's names, scopes and defaults) and how it merges one tensor.

Each method module defines a ``MergeMethod`` subclass and registers an instance with ``register``; the
runner resolves every parameter per tensor (mergekit's filters and layer gradients, ``config.py``) and
calls ``merge`` with lazy readers of the inputs, so a method holds no more of them at once than it needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import InputError

#: Reads one input's tensor (in the merge's working dtype) when called.
Reader = Callable[[], torch.Tensor]

REQUIRED = object()


class Draws:
    """The merge's random generator, and one tensor's turn at it.

    mergekit draws every random mask from one generator, tensor after tensor in name order. Tensors are
    merged on several threads, so a tensor takes the generator only once every earlier tensor is done
    with it (``with draws as generator:``, once per tensor, around all its draws).
    """

    def __init__(self, generator: torch.Generator, after: threading.Event | None, done: threading.Event):
        self.generator, self._after, self.done = generator, after, done

    def __enter__(self) -> torch.Generator:
        if self._after is not None:
            self._after.wait()
        return self.generator

    def __exit__(self, *exc: object) -> None:
        self.done.set()


@dataclass(frozen=True)
class Param:
    """A parameter: its Python type (float or bool) and default (``REQUIRED``: none)."""

    kind: type
    default: Any = REQUIRED

    def check(self, name: str, value: Any, where: str) -> Any:
        """The value as ``kind``, or a one-line error naming the parameter and where it was set."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise InputError(f"{where}: {name} must be true or false, not {value!r}")
        if isinstance(value, bool):
            raise InputError(f"{where}: {name} must be a number, not {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InputError(f"{where}: {name} must be a number, not {value!r}") from None


@dataclass
class Inputs:
    """One tensor's inputs: the base (None for methods without one) and the other models, in order."""

    base: Reader | None
    models: Sequence[Reader]
    shape: tuple[int, ...]
    dtype: torch.dtype  # the working dtype every reader returns


class MergeMethod(ABC):
    """One of mergekit's merge methods, reproduced exactly (same ops, same order, same dtypes)."""

    name: ClassVar[str]
    #: Parameters one value of which applies to the whole tensor (mergekit's SHARED scope).
    shared: ClassVar[dict[str, Param]] = {}
    #: Parameters each model has its own value of (the base has none, except for base-less methods).
    per_model: ClassVar[dict[str, Param]] = {}
    uses_base: ClassVar[bool] = True  # False: the base only lends config and tokenizer (linear)
    min_models: ClassVar[int] = 1  # besides the base
    max_models: ClassVar[int | None] = None
    random: ClassVar[bool] = False  # draws random masks (needs the seed)

    def check(self, shared: dict[str, Any], per_model: list[dict[str, Any]], where: str) -> None:
        """Refuse parameter values the method cannot use (one line naming them); default: all accepted."""

    @abstractmethod
    def merge(self, inputs: Inputs, shared: dict[str, Any], per_model: list[dict[str, Any]],
              draws: Draws) -> torch.Tensor:
        """The merged tensor, in the dtype mergekit's method returns."""


_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    if name not in _METHODS:
        raise InputError(f"merge method {name!r} is not supported; use one of {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)
