"""Reading adapter folders and mapping their keys to base tensor names."""

from .config import AdapterConfig, load_config, match_pattern
from .loader import Adapter, load_adapter
from .mapping import map_modules

__all__ = ["Adapter", "AdapterConfig", "load_adapter", "load_config", "map_modules", "match_pattern"]
