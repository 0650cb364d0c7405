"""Fine-tuning methods, one module each; importing this package registers them all.

To add a method, add a module here that defines a ``Method`` subclass decorated with ``@register``.
"""

import importlib
import pkgutil

from .base import (AdapterContext, AdditivePatch, Bound, Method, ModuleParams, Option, Patch, get_method, not_mergeable,
                   register, register_not_mergeable, registered, Support)
from .replace import ReplacePatch

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "replace"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["AdapterContext", "AdditivePatch", "Bound", "Method", "ModuleParams", "Option", "Patch", "ReplacePatch",
           "get_method", "not_mergeable", "register", "register_not_mergeable", "registered", "Support"]
