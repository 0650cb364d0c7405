"""Merging whole models that share a base, as mergekit 0.1.5 does: ``merge_models``.

Methods (one module each, registered in ``base``): linear, task_arithmetic, ties, dare_linear,
dare_ties, della, della_linear, breadcrumbs, breadcrumbs_ties (``task_arithmetic``), model_stock,
slerp, nearswap. Inputs are checkpoints wsurgery opens, or LoRA/PEFT adapters, which contribute the
model they make of the base (their dense change). See ``config`` for mergekit's YAML and parameter
rules, ``runner`` for planning and streaming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import parse_size
from ..errors import InputError
from .base import get_method, method_names
from .config import MergeConfig, ModelSpec, read_yaml
from .runner import MergeResult, plan_merge, run_merge

from . import linear, model_stock, nearswap, slerp, task_arithmetic  # noqa: F401  (they register themselves)

ModelArg = str | Path | tuple[str | Path, float]


def split_weight(spec: str) -> tuple[str, float | None]:
    """``PATH:WEIGHT`` -> (PATH, WEIGHT) where PATH exists and WEIGHT is a number; else (spec, None)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and Path(path.split("+")[0]).exists():
        try:
            value = float(weight)
        except ValueError:
            return spec, None
        if not math.isfinite(value):
            raise InputError(f"{spec}: weight {weight!r} is not a finite number")
        return path, value
    return spec, None


def merge_models(out: str | Path, base: str | Path | None = None, models: Sequence[ModelArg] = (), *,
                 method: str | None = None, parameters: dict[str, Any] | None = None,
                 config: str | Path | None = None, seed: int | None = None, dtype: str | None = None,
                 max_shard_size: str | int | None = None, overwrite: bool = False, progress: bool = True,
                 workers: int | None = None, options: dict[str, Any] | None = None) -> MergeResult:
    """Merge whole models into the new folder ``out``, exactly as mergekit 0.1.5 would.

    Either ``config`` (a mergekit YAML file, read as it is) or ``base``, ``models`` (paths, or
    ``(path, weight)``; ``"path:weight"`` strings too), ``method`` and merge-wide ``parameters``
    (``density``, ``lambda``, ``epsilon``, ``gamma``, ``t``, ``normalize``, ``rescale``, ``int8_mask``,
    ``filter_wise``; each model's weight defaults to 1). ``seed`` seeds DARE's and DELLA's random masks as
    mergekit's ``--random-seed`` does. ``dtype`` is the dtype written (mergekit's ``out_dtype``).
    """
    if config is not None:
        if base is not None or models or method is not None or parameters:
            raise InputError("--config names the models, method and parameters; give only OUT with it")
        cfg = read_yaml(config)
        m = get_method(cfg.method)
        if not m.uses_base and cfg.base is not None and all(s.path != cfg.base for s in cfg.models):
            cfg.models.append(ModelSpec(cfg.base))  # mergekit adds the base as one more input
    else:
        if base is None or not models:
            raise InputError("give BASE and at least one model to merge (or --config mergekit.yml)")
        name = method or "task_arithmetic"
        m = get_method(name)
        specs = []
        for arg in models:
            path, weight = (str(arg[0]), float(arg[1])) if isinstance(arg, tuple) else split_weight(str(arg))
            specs.append(ModelSpec(path, {} if weight is None else {"weight": weight}))
        params = dict(parameters or {})
        if "weight" in m.per_model:
            params.setdefault("weight", 1.0)
        cfg = MergeConfig(name, str(base), specs, params)
    size = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    planned = plan_merge(cfg, seed=seed, dtype=dtype, options=options)
    return run_merge(planned, out, max_shard_size=size, overwrite=overwrite, progress=progress, workers=workers)


__all__ = ["MergeResult", "merge_models", "method_names"]
