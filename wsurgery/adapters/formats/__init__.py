"""Adapter files of the image-model ecosystems (kohya sd-scripts, LyCORIS, diffusers, OneTrainer, ai-toolkit), one
registered module per format; importing this package registers them all.

``read_adapter_file(path)`` detects the format from the tensor names and the safetensors metadata (never from the
file name) and returns an ``AdapterFile``: per module *as the file names it* (``lora_unet_down_blocks_0_…`` or
``unet.down_blocks.0.…``) the algorithm, rank, alpha and a wsurgery ``Patch`` whose ``merge(W, multiplier)`` is
what that ecosystem computes. Mapping those names onto a checkpoint's tensors is not done here.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (AdapterFile, AdapterFormat, AdapterModule, detect_format, formats, read_adapter_file,
                   register_format)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["AdapterFile", "AdapterFormat", "AdapterModule", "detect_format", "formats", "read_adapter_file",
           "register_format"]
