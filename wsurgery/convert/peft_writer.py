"""Write PEFT adapter folders that ``PeftModel.from_pretrained`` loads as they are."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint import atomic_output_dir, check_output_path
from ..model_card import PROVENANCE_KEY

# What PEFT writes next to every adapter; the rest of the config is the method's own fields.
_COMMON_FIELDS: dict[str, Any] = {"inference_mode": True, "revision": None, "task_type": None}


def write_adapter(out: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                  overwrite: bool = False, inputs: Sequence[Path] = (), record: dict[str, Any] | None = None,
                  check: Callable[[Path], None] | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``out`` atomically.

    ``config`` must hold at least ``peft_type`` and the method's fields; ``tensors`` use PEFT's saved
    key names (``base_model.model.<module>.lora_A.weight``: no adapter name, as PEFT saves them).
    ``record`` (wsurgery's provenance) goes into the weights file's ``__metadata__``, which PEFT
    ignores (an unknown adapter_config.json key would make PEFT warn of a newer PEFT). ``check`` is
    called on the written folder before it becomes ``out``: where it raises, nothing is left behind.
    """
    out = Path(out)
    if "peft_type" not in config:
        raise ValueError("adapter config needs a peft_type")
    check_output_path(out, list(inputs), overwrite)
    full = {**_COMMON_FIELDS, **config}
    with atomic_output_dir(out, overwrite) as tmp:
        metadata = {"format": "pt", **({PROVENANCE_KEY: json.dumps(record)} if record else {})}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(tmp / "adapter_model.safetensors"), metadata=metadata)
        (tmp / "adapter_config.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        if check is not None:
            check(tmp)
    return out
