"""Reading adapters (PEFT folders; kohya, LyCORIS and diffusers files in ``formats/``) and mapping their modules
onto base tensors (``mapping``; for image models, through the model family: ``locate``)."""

from .config import AdapterConfig, load_config, match_pattern
from .loader import Adapter, load_adapter
from .mapping import map_modules

__all__ = ["Adapter", "AdapterConfig", "load_adapter", "load_config", "map_modules", "match_pattern"]
