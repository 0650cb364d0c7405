"""Reading and writing weight files, one tensor at a time."""

from .output import atomic_output_dir, check_output_path, copy_side_files
from .reader import Checkpoint, open_checkpoint
from .safetensors_file import SafetensorsWriter, TensorInfo, TensorSpec, read_header, read_tensor
from .writer import CheckpointWriter, parse_size, plan_shards

__all__ = [
    "Checkpoint", "CheckpointWriter", "SafetensorsWriter", "TensorInfo", "TensorSpec",
    "atomic_output_dir", "check_output_path", "copy_side_files", "open_checkpoint",
    "parse_size", "plan_shards", "read_header", "read_tensor",
]
