"""wsurgery: surgery on model weight files, straight on the checkpoint tensors.

    >>> import wsurgery
    >>> wsurgery.merge("base-model/", "my-lora/", "merged/")
    >>> wsurgery.inspect("my-lora/")

The API is imported on first use: ``import wsurgery`` (and so the command line's start, before its
signal handlers are in place) must not import torch, or a Ctrl-C during start-up prints a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names

__version__ = "0.1.0"

# name -> (module, attribute there); `convert_adapter` because plain `convert` is the subpackage.
_LAZY = {
    "merge": (".api", "merge"), "unmerge": (".api", "unmerge"), "push": (".api", "push"),
    "convert_adapter": (".api", "convert"), "combine": (".api", "combine"), "extract": (".api", "extract"),
    "inspect": (".describe", "inspect"), "Result": (".engine", "Result"),
    "InputError": (".errors", "InputError"), "NotInvertibleError": (".errors", "NotInvertibleError"),
    "UnsupportedError": (".errors", "UnsupportedError"), "WsurgeryError": (".errors", "WsurgeryError"),
}

__all__ = ["InputError", "NotInvertibleError", "Result", "UnsupportedError", "WsurgeryError", "combine",
           "convert_adapter", "extract", "inspect", "merge", "push", "unmerge", "__version__"]

if TYPE_CHECKING:
    from .api import combine, extract, merge, push, unmerge
    from .api import convert as convert_adapter
    from .describe import inspect
    from .engine import Result
    from .errors import InputError, NotInvertibleError, UnsupportedError, WsurgeryError

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
