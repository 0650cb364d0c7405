"""Write PEFT adapter folders that ``PeftModel.from_pretrained`` loads as they are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint import atomic_output_dir, check_output_path

# What PEFT writes next to every adapter; the rest of the config is the method's own fields.
_COMMON_FIELDS: dict[str, Any] = {"inference_mode": True, "revision": None, "task_type": None}


def write_adapter(out: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                  overwrite: bool = False, inputs: list[Path] = ()) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``out`` atomically.

    ``config`` must hold at least ``peft_type`` and the method's fields; ``tensors`` use PEFT's saved
    key names (``base_model.model.<module>.lora_A.weight``: no adapter name, as PEFT saves them).
    """
    out = Path(out)
    if "peft_type" not in config:
        raise ValueError("adapter config needs a peft_type")
    check_output_path(out, list(inputs), overwrite)
    full = {**_COMMON_FIELDS, **config}
    with atomic_output_dir(out, overwrite) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return out
