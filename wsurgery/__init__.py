"""wsurgery: surgery on model weight files, straight on the checkpoint tensors.

    >>> import wsurgery
    >>> wsurgery.merge("base-model/", "my-lora/", "merged/")
    >>> wsurgery.inspect("my-lora/")
"""

from .api import merge, push, unmerge
from .api import convert as convert_adapter  # plain `convert` is the subpackage wsurgery.convert
from .api import combine, extract
from .errors import InputError, NotInvertibleError, UnsupportedError, WsurgeryError
from .describe import inspect
from .engine import Result

__version__ = "0.1.0"

__all__ = ["InputError", "NotInvertibleError", "Result", "UnsupportedError", "WsurgeryError", "combine",
           "convert_adapter", "extract", "inspect", "merge", "push", "unmerge", "__version__"]
