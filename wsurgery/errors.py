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
