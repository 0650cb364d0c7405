"""Write kohya / LyCORIS / diffusers-style adapter files: one ``.safetensors``, written atomically, whose tensor
names are those the readers of this package (and kohya's, LyCORIS' and diffusers' loaders) take.

The metadata of the source is kept (``ss_*``, ``modelspec.*``: what trainers and UIs show), stale file hashes
(``sshs_*``, which hash the tensors) are dropped, and wsurgery's record of the operation is added under
``wsurgery``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ...checkpoint.output import atomic_output_file, check_output_file
from ...model_card import PROVENANCE_KEY

#: Metadata keys that hash the tensors (kohya's ``sshs_model_hash``/``sshs_legacy_hash``): wrong once they change.
STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


def kohya_lora(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """kohya's tensors of one LoRA module: ``lora_down``/``lora_up`` and a 0-d ``alpha``."""
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(float(alpha), dtype=down.dtype)}


def diffusers_lora(name: str, A: torch.Tensor, B: torch.Tensor, alpha: float | None) -> dict[str, torch.Tensor]:
    """diffusers' (PEFT-named) tensors of one LoRA module; ``alpha`` as a ``.alpha`` tensor where it is not r,
    which diffusers' loaders read from kohya-converted state dicts and wsurgery's reader takes first."""
    out = {f"{name}.lora_A.weight": A, f"{name}.lora_B.weight": B}
    if alpha is not None and alpha != A.shape[0]:
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=A.dtype)
    return out


def output_metadata(source: Mapping[str, str], record: dict[str, Any] | None,
                    updates: Mapping[str, str | None] = {}) -> dict[str, str]:
    """The source's metadata, with ``updates`` applied (None removes a key), stale hashes dropped and the record
    added."""
    meta = {k: v for k, v in source.items() if k not in STALE_KEYS and k != PROVENANCE_KEY}
    for k, v in updates.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    meta.setdefault("format", "pt")
    if record is not None:
        meta[PROVENANCE_KEY] = json.dumps(record)
    return meta


def write_adapter_file(out: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                       overwrite: bool = False, inputs: Sequence[Path] = (),
                       check: Callable[[Path], None] | None = None) -> Path:
    """Write ``tensors`` and ``metadata`` to the single file ``out`` atomically; ``check`` is called on the written
    temporary file before it becomes ``out`` (where it raises, nothing is left behind)."""
    out = Path(out)
    check_output_file(out, list(inputs), overwrite)
    with atomic_output_file(out, overwrite) as tmp:
        # cloned: converted modules share factors (one lora_A for q, k and v), which safetensors refuses to save
        save_file({k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()},
                  str(tmp), metadata=dict(metadata))
        if check is not None:
            check(tmp)
    return out
