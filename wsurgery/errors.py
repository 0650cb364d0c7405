"""Exceptions that carry a user-facing, one-line message.

Anything raised as a ``WsurgeryError`` is a problem with the user's input (or a refusal on
principle) and is printed by the CLI as a single line, without a traceback.
"""

from __future__ import annotations


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
