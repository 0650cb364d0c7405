"""Plan and run a merge of whole models, one output tensor at a time.

Everything that can be refused is refused in ``plan_merge``, before OUT exists: unknown methods and
parameters, inputs whose tensor names or shapes differ from the base's, parameter values the method
cannot use (for every tensor, after filters and gradients). ``run_merge`` then computes each output
tensor from the matching tensors of every input, read from memory-mapped files only when the method
asks (``Inputs``' readers), and writes it into a safetensors output laid out like the base's.

Tensors are merged in mergekit's order, sorted by name: mergekit draws the random masks of DARE and
DELLA from one generator seeded once, tensor after tensor in that order, so the same seed gives the
same masks. Tensors are merged on ``--workers`` threads, each taking its turn at the generator (``Draws``),
so the output is the same whatever the number of threads.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import load_adapter
from ..checkpoint import Checkpoint, CheckpointWriter, TensorSpec, atomic_output_dir, check_output_path
from ..checkpoint import open_checkpoint, plan_shards
from ..checkpoint.dtypes import dtype_name, parse_user_dtype
from ..engine import Plan, plan
from ..errors import InputError, UnsupportedError
from ..quant.encodings import EncodedTensorInfo
from ..workers import run_ordered
from .base import Draws, Inputs, MergeMethod, get_method
from .config import MergeConfig, check_names, layer_t, resolve


@dataclass
class Source:
    """One input model: a checkpoint, or a checkpoint with an adapter merged into it as ``wsurgery
    merge`` would write it (each patched tensor computed in float32, then rounded to its own dtype)."""

    label: str
    ckpt: Checkpoint
    adapter_plan: Plan | None = None
    paths: list[Path] = field(default_factory=list)

    def dtype(self, name: str) -> torch.dtype:
        return self.ckpt.tensors[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.ckpt.tensors[name].shape)

    def read(self, name: str) -> torch.Tensor:
        p = self.adapter_plan
        if p is None or name not in p.owner:
            return self.ckpt.read(name)
        job = p.jobs[p.owner[name]]
        tensors = {}
        for role, tensor_name in job.tensors.items():
            raw = self.ckpt.read(tensor_name)
            tensors[role] = raw.to(torch.promote_types(raw.dtype, torch.float32)) if raw.is_floating_point() else raw
        for bound, scale, roles in job.patches:
            tensors.update(bound.merge({r: tensors[r] for r in roles}, scale))
        role = next(r for r, n in job.tensors.items() if n == name)
        return tensors[role].to(self.dtype(name))


def _looks_like_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def open_source(spec: str, base: Checkpoint | None, options: dict[str, Any] | None) -> Source:
    """A model path; an adapter folder (merged into ``base``); or mergekit's ``MODEL+ADAPTER``."""
    path = Path(spec)
    if path.is_dir() and _looks_like_adapter(path):
        if base is None:
            raise InputError(f"{spec}: an adapter contributes its change to a base model; give the base")
        return _with_adapter(spec, base, path, [path], options)
    if not path.exists() and "+" in spec:
        model, _, adapter = spec.rpartition("+")
        ckpt = open_checkpoint(model)
        return _with_adapter(spec, ckpt, Path(adapter), [Path(model), Path(adapter)], options)
    return Source(spec, open_checkpoint(path), None, [path])


def _with_adapter(label: str, ckpt: Checkpoint, adapter: Path, paths: list[Path],
                  options: dict[str, Any] | None) -> Source:
    p = plan(ckpt, [(load_adapter(adapter, options), 1.0)])
    for name in p.owner:
        if tuple(p.out_shapes[name]) != tuple(ckpt.tensors[name].shape):
            raise UnsupportedError(f"{label}: the adapter changes the shape of {name}; merge it first (wsurgery "
                                   "merge) if the other models share that shape")
    return Source(label, ckpt, p, paths)


@dataclass
class TensorJob:
    name: str
    work: torch.dtype  # what the inputs are read in and merged in
    out: torch.dtype  # what is written
    shared: dict[str, Any]
    per_model: list[dict[str, Any]]


@dataclass
class MergePlan:
    method: MergeMethod
    base: Source | None  # None: a method without a base (linear) and none given
    models: list[Source]  # the inputs besides the base, in the config's order
    donor: Checkpoint  # config, tokenizer and output layout come from here
    jobs: list[TensorJob]  # in mergekit's order (sorted by name)
    copied: list[str]  # tensors that are not floating point: taken from the donor, all inputs must agree
    seed: int | None
    paths: list[Path]
    out_dtype: torch.dtype | None


def _user_dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return parse_user_dtype(str(name))
    except InputError:
        raise InputError(f"{what} {name!r} is not a dtype; use float32, float16 or bfloat16") from None


def plan_merge(config: MergeConfig, *, seed: int | None = None, dtype: str | None = None,
               options: dict[str, Any] | None = None) -> MergePlan:
    """Open every input and check every parameter of every tensor; write nothing."""
    method = get_method(config.method)
    where = f"merge_method {method.name}"
    check_names(method, config, where)
    work_dtype = _user_dtype(config.dtype, "dtype")
    out_dtype = _user_dtype(dtype if dtype is not None else config.out_dtype, "--dtype/out_dtype")
    if method.uses_base and config.base is None:
        raise InputError(f"{method.name} merges changes from a base model; name the base (base_model)")
    base = open_source(config.base, None, options) if config.base is not None else None
    base_ckpt = base.ckpt if base is not None else None
    sources = [open_source(m.path, base_ckpt, options) for m in config.models]
    settings = list(config.models)
    if base is not None and method.uses_base:  # the base listed among the models is the base, as in mergekit
        keep = [i for i, m in enumerate(config.models) if m.path != config.base]
        sources, settings = [sources[i] for i in keep], [settings[i] for i in keep]
    if len(sources) < method.min_models:
        raise InputError(f"{method.name} needs at least {method.min_models} model(s) besides the base; got "
                         f"{len(sources)}")
    if method.max_models is not None and len(sources) > method.max_models:
        raise InputError(f"{method.name} merges the base with exactly {method.max_models} other model; got "
                         f"{len(sources)}")
    reference = base if base is not None else sources[0]
    inputs = ([reference] if method.uses_base else []) + sources
    _check_same_tensors(reference, [s for s in [base, *sources] if s is not None and s is not reference])
    donor = reference.ckpt
    cfg = donor.config or {}
    num_layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
    jobs, copied = [], []
    for name in sorted(donor.tensors):
        if not donor.tensors[name].dtype.is_floating_point:
            copied.append(name)
            continue
        t = layer_t(name, num_layers if isinstance(num_layers, int) else None)
        shared = {k: resolve(k, p, [(config.parameters, "parameters")], name, t) for k, p in method.shared.items()}
        per_model = [{k: resolve(k, p, [(m.parameters, f"{m.path}: parameters"), (config.parameters, "parameters")],
                                 name, t) for k, p in method.per_model.items()} for m in settings]
        method.check(shared, per_model, f"{name}")
        work = work_dtype
        if work is None:
            work = inputs[0].dtype(name)
            for s in inputs[1:]:
                work = torch.promote_types(work, s.dtype(name))
        jobs.append(TensorJob(name, work, out_dtype or work, shared, per_model))
    if method.random and seed is None:
        seed = int(torch.seed() % 2**63)
    paths = [p for s in [base, *sources] if s is not None for p in s.paths]
    return MergePlan(method, base if method.uses_base else None, sources, donor, jobs, copied, seed, paths,
                     out_dtype)


def _check_same_tensors(reference: Source, others: list[Source]) -> None:
    """Every input must hold the reference's tensors with the reference's shapes: a merge of differently
    shaped models has no meaning (mergekit would fail midway)."""
    names = set(reference.ckpt.tensors)
    for s in others:
        theirs = set(s.ckpt.tensors)
        missing, extra = sorted(names - theirs), sorted(theirs - names)
        if missing or extra:
            which = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which {reference.label} lacks"
            more = len(missing) + len(extra) - 1
            raise InputError(f"{s.label}: {which}{f' (and {more} more differences)' if more else ''}; the models "
                             f"merged must share {reference.label}'s tensors")
        for n in sorted(names):
            if s.shape(n) != reference.shape(n):
                raise InputError(f"{s.label}: {n} is {list(s.shape(n))} but {list(reference.shape(n))} in "
                                 f"{reference.label}; the models merged must share shapes")


@dataclass
class MergeResult:
    out: Path
    method: str
    tensors: int
    models: int
    bytes_written: int
    seed: int | None
    shards: list[str]


def _reader(source: Source, name: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: source.read(name).to(dtype)


def run_merge(p: MergePlan, out: str | Path, *, max_shard_size: int | None = None, overwrite: bool = False,
              progress: bool = True, workers: int | None = None) -> MergeResult:
    """Write the planned merge to ``out`` atomically (nothing at ``out`` unless it all succeeds)."""
    out = Path(out)
    check_output_path(out, p.paths, overwrite, whole_folders=True)
    donor = p.donor
    assignment, single, index_name = donor.format.output_layout(donor)
    parts = donor.format.output_parts(donor)
    by_name = {j.name: j for j in p.jobs}
    specs = [TensorSpec(n, by_name[n].out if n in by_name else donor.tensors[n].dtype, tuple(donor.tensors[n].shape))
             for n in donor.tensors]
    shards = plan_shards(specs, assignment, max_shard_size, single, parts)
    generator = torch.Generator()
    if p.seed is not None:
        generator.manual_seed(p.seed)
    turns = [threading.Event() for _ in p.jobs]  # job i has drawn its random masks (or has none to draw)
    everyone = ([p.base] if p.base is not None else []) + p.models

    def merged(i: int) -> tuple[str, torch.Tensor]:
        job = p.jobs[i]
        shape = tuple(donor.tensors[job.name].shape)
        inputs = Inputs(_reader(p.base, job.name, job.work) if p.base is not None else None,
                        [_reader(s, job.name, job.work) for s in p.models], shape, job.work)
        try:
            result = p.method.merge(inputs, job.shared, job.per_model,
                                    Draws(generator, turns[i - 1] if i else None, turns[i]))
        finally:
            turns[i].set()
        if not bool(torch.isfinite(result).all()):
            raise InputError(f"{job.name}: the merge is not finite (inf or NaN); check the models' tensors and the "
                             "weights")
        return job.name, result.to(job.out)

    def copied(name: str) -> tuple[str, torch.Tensor]:
        first = everyone[0].read(name)
        for s in everyone[1:]:
            if not torch.equal(s.read(name), first):
                raise InputError(f"{name}: the integer tensor differs between {everyone[0].label} and {s.label}; "
                                 "it cannot be merged, only agreed on")
        return name, first

    tasks: list[Callable[[], tuple[str, torch.Tensor]]] = [functools.partial(merged, i) for i in range(len(p.jobs))]
    tasks += [functools.partial(copied, n) for n in p.copied]
    with atomic_output_dir(out, overwrite) as tmp:
        writer = CheckpointWriter(tmp, shards, index_name if len(shards) > 1 else None, parts)
        try:
            total = sum(math_bytes(s) for s in specs)
            with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="merge-models") as bar:
                for name, tensor in run_ordered(tasks, workers):
                    writer.write(name, tensor.contiguous())
                    bar.update(tensor.numel() * tensor.element_size())
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if donor.side_files:
            donor.format.copy_side_files(donor, tmp)
        _update_config(tmp / "config.json", donor, p)
    return MergeResult(out, p.method.name, len(specs), len(p.models) + (p.base is not None), writer.total_bytes,
                       p.seed, [s[0] for s in shards])


def math_bytes(spec: TensorSpec) -> int:
    return spec.nbytes


def _update_config(path: Path, donor: Checkpoint, p: MergePlan) -> None:
    """The written weights are plain (quantization_config goes) and in ``--dtype``/``out_dtype`` if given."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    changed = False
    if "quantization_config" in config and any(isinstance(t, EncodedTensorInfo) for t in donor.tensors.values()):
        del config["quantization_config"]
        changed = True
    if p.out_dtype is not None:
        for k in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[k] = dtype_name(p.out_dtype)
        changed = True
    if changed:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
