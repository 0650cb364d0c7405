"""Exceptions that carry a user-facing, one-line message.

Anything raised as a ``WsurgeryError`` is a problem with the user's input (or a refusal on
principle) and is printed by the CLI as a single line, without a traceback (``fail``). This module
imports only the standard library and ``wsurgery.interrupts``, so that the entry point (``cli``) and
the commands share ``fail`` without importing each other.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from . import interrupts


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``wsurgery: MESSAGE`` and exit; no signal can cut the line or add a traceback after it."""
    interrupts.stop_raising()
    try:
        print(f"wsurgery: {one_line(message)}", file=sys.stderr, flush=True)
    except OSError:  # stderr gone with the terminal (SIGHUP): the exit status still tells
        pass
    sys.exit(code)


class WsurgeryError(Exception):
    """Base class: the message says what is wrong, where, and what to do."""


class InputError(WsurgeryError):
    """A file, folder, config or tensor is missing, malformed or inconsistent."""


class UnsupportedError(WsurgeryError):
    """The input is valid but asks for something wsurgery cannot (or will not) do."""


class NotInvertibleError(UnsupportedError):
    """An unmerge was asked for a change that cannot be undone from the files alone."""


class NotExpressible(UnsupportedError):
    """A valid adapter that a target format cannot carry (e.g. DoRA as a GGUF LoRA), where merging it into
    the base can; ``problem`` says why, without the suggested remedy."""

    def __init__(self, problem: str, remedy: str):
        super().__init__(f"{problem}; {remedy}")
        self.problem = problem
