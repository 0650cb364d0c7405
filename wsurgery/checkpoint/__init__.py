"""Reading and writing weight files, one tensor at a time.

The names below are imported on first use: the low-level modules (``safetensors_file``, ``dtypes``)
that the encodings build on must not pull in the readers, which build on the encodings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

_LAZY = {
    "Checkpoint": (".reader", "Checkpoint"), "open_checkpoint": (".formats", "open_checkpoint"),
    "CheckpointWriter": (".writer", "CheckpointWriter"), "parse_size": (".writer", "parse_size"),
    "plan_shards": (".writer", "plan_shards"), "SafetensorsWriter": (".safetensors_file", "SafetensorsWriter"),
    "TensorInfo": (".safetensors_file", "TensorInfo"), "TensorSpec": (".safetensors_file", "TensorSpec"),
    "read_header": (".safetensors_file", "read_header"), "read_tensor": (".safetensors_file", "read_tensor"),
    "atomic_output_dir": (".output", "atomic_output_dir"), "check_output_path": (".output", "check_output_path"),
    "copy_side_files": (".output", "copy_side_files"),
}

__all__ = ["Checkpoint", "CheckpointWriter", "SafetensorsWriter", "TensorInfo", "TensorSpec", "atomic_output_dir",
           "check_output_path", "copy_side_files", "open_checkpoint", "parse_size", "plan_shards", "read_header",
           "read_tensor"]

if TYPE_CHECKING:
    from .formats import open_checkpoint
    from .output import atomic_output_dir, check_output_path, copy_side_files
    from .reader import Checkpoint
    from .safetensors_file import SafetensorsWriter, TensorInfo, TensorSpec, read_header, read_tensor
    from .writer import CheckpointWriter, parse_size, plan_shards

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
