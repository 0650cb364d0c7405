"""The Python API behind the command line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapters import load_adapter
from .checkpoint import open_checkpoint, parse_size
from .checkpoint.dtypes import parse_user_dtype
from .hub import resolve
from .engine import Result, execute, plan

if TYPE_CHECKING:
    from .verify import Report


def _run(direction: str, base: str | Path, adapter: str | Path, out: str | Path, scale: float,
         dtype: str | torch.dtype | None, max_shard_size: str | int | None, overwrite: bool, progress: bool,
         options: dict[str, Any] | None) -> Result:
    if isinstance(dtype, str):
        dtype = parse_user_dtype(dtype)
    if isinstance(max_shard_size, str):
        max_shard_size = parse_size(max_shard_size)
    ckpt = open_checkpoint(resolve(base))
    ad = load_adapter(resolve(adapter, kind="adapter"), options)
    job = plan(ckpt, [(ad, scale)], direction)
    return execute(job, Path(out), dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                   progress=progress, extra_inputs=[ad.folder])


def merge(base: str | Path, adapter: str | Path, out: str | Path, *, scale: float = 1.0,
          dtype: str | torch.dtype | None = None, max_shard_size: str | int | None = None,
          overwrite: bool = False, progress: bool = True, options: dict[str, Any] | None = None) -> Result:
    """Merge a PEFT adapter into a base checkpoint and write the merged model folder ``out``.

    ``base`` is a model folder, a ``.safetensors``/``.bin`` file, an index file or a Hub repo id;
    ``adapter`` a PEFT adapter folder or repo id. ``scale`` multiplies the adapter's change
    (W + scale·ΔW). The output keeps the base's tensor names, shapes, dtypes (unless ``dtype``) and
    sharding (unless ``max_shard_size``), and is written atomically: on any error ``out`` is not created.
    ``options`` are method-specific choices, e.g. ``{"task_id": 2}`` for Poly.
    """
    return _run("merge", base, adapter, out, scale, dtype, max_shard_size, overwrite, progress, options)


def unmerge(merged: str | Path, adapter: str | Path, out: str | Path, *, scale: float = 1.0,
            dtype: str | torch.dtype | None = None, max_shard_size: str | int | None = None,
            overwrite: bool = False, progress: bool = True, options: dict[str, Any] | None = None) -> Result:
    """Undo ``merge``: subtract the adapter's change from a merged checkpoint.

    Exact (up to rounding) for additive methods. Refuses, before writing anything, where the
    original weights cannot be recovered from the files (DoRA, ``modules_to_save``, saved biases).
    """
    return _run("unmerge", merged, adapter, out, scale, dtype, max_shard_size, overwrite, progress, options)


def verify(base: str | Path, adapter: str | Path, merged: str | Path, *, scale: float = 1.0, device: str = "auto",
           tokens: int = 64, seed: int = 0, rtol: float | None = None, atol: float = 0.0, progress: bool = True,
           options: dict[str, Any] | None = None) -> "Report":
    """Check with forward passes that ``merged`` computes what ``base`` + ``adapter`` compute.

    Each changed module runs the adapter's unmerged forward path on seeded inputs and the merged
    layer on the same inputs; every other tensor must be byte-identical to the base. Returns a
    ``Report`` (``.passed``, ``.checks``); nothing is written.
    """
    from .verify import verify_merge

    ckpt = open_checkpoint(resolve(base))
    ad = load_adapter(resolve(adapter, kind="adapter"), options)
    return verify_merge(ckpt, [(ad, scale)], open_checkpoint(resolve(merged)), device=device, tokens=tokens,
                        seed=seed, rtol=rtol, atol=atol, progress=progress)
