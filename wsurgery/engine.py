"""The streaming merge engine: plan everything from headers and configs, then touch each tensor once.

``plan`` validates the whole job (files, key mapping, shapes, invertibility, scales, stored
encodings) before anything is written, so bad input costs a second, not a pass over the model.
``execute`` then walks the base in file order: untouched tensors are copied (cast if ``dtype`` asks),
each changed module's tensors are read together, upcast to float32, patched, rounded once to the
output dtype (each chunk checked finite as it is rounded) and written into their pre-laid-out place.
Peak memory is a few copies of the largest changed tensor, whatever the model size.
"""

from __future__ import annotations

import functools
import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .adapters import Adapter, map_modules
from .adapters.files import FileAdapter
from .adapters.locate import Place, checkpoint_family, locate, stored_name
from .checkpoint import (Checkpoint, CheckpointWriter, TensorSpec, atomic_output_dir, check_output_path,
                         plan_shards)
from .checkpoint.dtypes import dtype_name
from .checkpoint.output import atomic_output_file, check_output_file
from .checkpoint.encodings import check_decoded
from .checkpoint.formats import CheckpointFormat, file_format
from .conventions import INPUT_EMBEDDING_SUFFIXES
from .conventions import tied_heads as tied_head_names
from .errors import InputError, NotInvertibleError, UnsupportedError, WsurgeryError
from .families import Family
from .methods import AdditivePatch, Bound, Patch
from .quant.encodings import EncodedTensorInfo, Encoding, Rows
from .workers import run_ordered

if TYPE_CHECKING:  # imported where a GGUF is written: plain jobs never load the gguf package
    from .checkpoint.gguf_format import GgufOutput
    from .convert.hf_to_gguf import HfGgufOutput

def tied_heads(base: Checkpoint) -> dict[str, str]:
    """``{head module: input-embedding module}`` for heads a tied checkpoint does not store."""
    return tied_head_names(base.tensors, base.config)


@dataclass
class ModuleJob:
    """All patches (from every adapter, in order) that change one base module."""

    module: str
    tensors: dict[str, str] = field(default_factory=dict)  # role -> base tensor name
    patches: list[tuple[Bound, float, tuple[str, ...]]] = field(default_factory=list)  # bound patch, scale, roles
    sources: list[str] = field(default_factory=list)  # the adapters' folders, for messages
    #: Parallel to ``patches``: for a patch placed by a diffusion family's tables, role -> the parts of stored
    #: tensors it sees (a row slice of a fused qkv, or several tensors a fused adapter module spans); None where
    #: its roles name the job's tensors directly.
    views: list[dict[str, Place] | None] = field(default_factory=list)

    @property
    def placed(self) -> bool:
        """Whether a patch sees parts of stored tensors (jobs other code paths than the engine refuse)."""
        return any(v is not None for v in self.views)


@dataclass
class Plan:
    base: Checkpoint
    direction: str  # "merge" or "unmerge"
    jobs: dict[str, ModuleJob]  # by base module
    owner: dict[str, str]  # base tensor name -> base module of its job
    out_shapes: dict[str, tuple[int, ...]]

    @property
    def changed_tensors(self) -> list[str]:
        return list(self.owner)


@dataclass
class Result:
    """What a merge or unmerge wrote."""

    out: Path
    tensors: int
    changed_tensors: int
    modules: int
    bytes_written: int
    shards: list[str]
    notes: list[str] = field(default_factory=list)


def plan(base: Checkpoint, adapters: Sequence[tuple[Adapter | FileAdapter, float]], direction: str = "merge"
         ) -> Plan:
    """Map every adapter onto the base and check every shape and precondition; write nothing."""
    jobs: dict[str, ModuleJob] = {}
    shapes: dict[str, tuple[int, ...]] = {n: t.shape for n, t in base.tensors.items()}
    base_desc = f"base {base.index_file or (base.shards[0] if len(base.shards) == 1 else base.folder)}"
    tied = tied_heads(base)
    family = checkpoint_family(base, base_desc)
    placed = _PlacedJobs(base, family, jobs, shapes, direction) if family is not None else None
    for adapter, scale in adapters:
        check_scale(scale, f"adapter {adapter.folder}")
        patches = sorted(adapter.patches(), key=lambda p: p.priority)
        if placed is not None:
            placed.add(adapter, scale, patches)
            continue
        mapping = map_modules([p.module for p in patches], [*base.tensors, *(f"{h}.weight" for h in tied)],
                              f"adapter {adapter.folder}", base_desc)
        for patch in patches:
            module = mapping[patch.module]
            if module in tied:
                if any(mapping[q.module] == tied[module] and patch.same_change(q) for q in patches):
                    continue  # PEFT's second copy of a change to the tied pair: applied once, via the embedding
                raise UnsupportedError(
                    f"adapter {adapter.folder}: changes {module}, which {base_desc} ties to {tied[module]} and does "
                    "not store; PEFT would fold the change into the shared tensor and so change the input "
                    f"embedding as well. Store an untied {module}.weight in the base to merge it")
            job = jobs.setdefault(module, ModuleJob(module))
            roles = []
            for role in (*patch.roles, *patch.optional_roles):
                name = f"{module}.{role}" if module else role
                if name not in base.tensors:
                    if role in patch.optional_roles:
                        continue
                    raise InputError(f"adapter {adapter.folder}: changes {name}, but {base_desc} has no such tensor "
                                     f"(it has {', '.join(sorted(r for r in _roles(base, module)))})")
                job.tensors[role] = name
                roles.append(role)
            role_shapes = {r: shapes[job.tensors[r]] for r in roles}
            for role in patch.peeked_roles:  # seen by check, neither read nor written
                name = f"{module}.{role}" if module else role
                if role not in role_shapes and name in base.tensors:
                    role_shapes[role] = shapes[name]
            try:
                bound = patch.bind(role_shapes, {r: base.tensors[job.tensors[r]].dtype for r in roles})
            except WsurgeryError as e:
                raise type(e)(f"adapter {adapter.folder}: {e}") from None
            for r, s in bound.output_shapes().items():
                if r in roles:  # not the peeked roles
                    shapes[job.tensors[r]] = s
            if direction == "unmerge":
                reason = patch.why_not_invertible()
                if reason is None and scale != 1.0 and not isinstance(patch, AdditivePatch):
                    reason = "--scale other than 1 can only be unmerged for additive changes"
                if reason is not None:
                    raise NotInvertibleError(f"cannot unmerge {adapter.folder} at {module}: {reason}")
            job.patches.append((bound, scale, tuple(roles)))
            job.views.append(None)
            if str(adapter.folder) not in job.sources:
                job.sources.append(str(adapter.folder))
    owner = {name: job.module for job in jobs.values() for name in job.tensors.values()}
    copied = {name for job in jobs.values() if all(b.patch.replaces for b, _, _ in job.patches)
              for name in job.tensors.values()}
    check_decoded(base.tensors, base.config, owner, base_desc, copied)
    if direction == "unmerge":
        for job in jobs.values():
            job.patches.reverse()
            job.views.reverse()
    return Plan(base, direction, jobs, owner, shapes)


class _PlacedJobs:
    """Jobs of patches placed by a diffusion family's tables: a patch may see a row slice of a stored tensor
    or the row-wise concatenation of several; patches touching a common stored tensor share one job."""

    def __init__(self, base: Checkpoint, family: Family, jobs: dict[str, ModuleJob],
                 shapes: dict[str, tuple[int, ...]], direction: str) -> None:
        self.base, self.family, self.jobs, self.shapes, self.direction = base, family, jobs, shapes, direction
        self.job_of: dict[str, ModuleJob] = {}  # stored tensor -> its job

    def add(self, adapter: Adapter | FileAdapter, scale: float, patches: list[Patch]) -> None:
        where = f"adapter {adapter.folder}"
        places = locate([p.module for p in patches], self.family, where)
        for patch in patches:
            views = self._views(patch, places[patch.module], where)
            roles = tuple(views)
            role_shapes = {r: self._shape(views[r], where) for r in roles}
            first = views[roles[0]][0][0]
            try:
                bound = patch.bind(role_shapes, {r: self.base.tensors[views[r][0][0]].dtype for r in roles})
            except WsurgeryError as e:
                raise type(e)(f"{where}: {e}") from None
            changed = {r: s for r, s in bound.output_shapes().items() if r in roles and s != role_shapes[r]}
            if changed:
                raise UnsupportedError(f"{where}: {patch.module} would change the shape of {first}, which holds "
                                       "other modules too; such a change cannot be merged in place")
            if self.direction == "unmerge":
                reason = patch.why_not_invertible()
                if reason is None and scale != 1.0 and not isinstance(patch, AdditivePatch):
                    reason = "--scale other than 1 can only be unmerged for additive changes"
                if reason is not None:
                    raise NotInvertibleError(f"cannot unmerge {adapter.folder} at {patch.module}: {reason}")
            job = self._job([name for parts in views.values() for name, _ in parts])
            job.patches.append((bound, scale, roles))
            job.views.append(views)
            if str(adapter.folder) not in job.sources:
                job.sources.append(str(adapter.folder))

    def _views(self, patch: Patch, place: Place, where: str) -> dict[str, Place]:
        """role -> the stored parts it sees: the weights of the place, or the biases beside them."""
        views: dict[str, Place] = {}
        for role in (*patch.roles, *patch.optional_roles):
            if role == "weight":
                views[role] = place
                continue
            biases = [loc.bias for _, loc in place] if role == "bias" else []
            if role == "bias" and all(b is not None for b in biases):
                views[role] = tuple((stored_name(self.family, loc, b), loc) for (_, loc), b in zip(place, biases)
                                    if b is not None)
            elif role not in patch.optional_roles:
                raise InputError(f"{where}: {patch.module} changes its {role}, which {place[0][0]} has no "
                                 "counterpart of in this checkpoint")
        return views

    def _shape(self, parts: Place, where: str) -> tuple[int, ...]:
        """The shape a patch sees: each part as diffusers shapes it (a bias: its rows), stacked by rows."""
        shapes = [loc.shape if len(self.shapes[name]) > 1 else (loc.region_shape[0] if loc.slice else
                                                                  self.shapes[name][0],)
                  for name, loc in parts]
        if any(s[1:] != shapes[0][1:] for s in shapes):
            raise InputError(f"{where}: {', '.join(n for n, _ in parts)} cannot be stacked by rows (shapes "
                             f"{', '.join(str(list(s)) for s in shapes)})")
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def _job(self, names: list[str]) -> ModuleJob:
        """The job of these stored tensors: new, existing, or several existing ones joined."""
        found: list[ModuleJob] = []
        for n in names:
            j = self.job_of.get(n)
            if j is not None and all(j is not f for f in found):
                found.append(j)
        if not found:
            key = names[0].removesuffix(".weight")
            job = self.jobs[key] = ModuleJob(key)
        else:
            job, *others = found
            for other in others:
                job.tensors.update(other.tensors)
                job.patches += other.patches
                job.views += other.views
                job.sources += [s for s in other.sources if s not in job.sources]
                del self.jobs[other.module]
        for n in names:
            job.tensors[n] = n
        for n in job.tensors:
            self.job_of[n] = job
        return job


def check_scale(scale: object, where: str) -> None:
    """A merge weight (``--scale``, ``ADAPTER:WEIGHT``) must be a finite number float32 can hold."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or abs(scale) > torch.finfo(torch.float32).max:
        raise InputError(f"{where}: scale {scale!r} is not a finite number within float32's range; pass a finite "
                         "--scale (or ADAPTER:WEIGHT)")


def notes(plan: Plan) -> list[str]:
    """What the patches had to say after running (residuals of approximate inverses, ...), per module."""
    return [f"{job.module}: {n}" for job in plan.jobs.values() for patch, _, _ in job.patches for n in patch.notes]


def _roles(base: Checkpoint, module: str) -> list[str]:
    prefix = module + "."
    return [n[len(prefix):] for n in base.tensors if n.startswith(prefix) and "." not in n[len(prefix):]] or ["nothing"]


def _output_layout(base: Checkpoint) -> tuple[dict[str, str], str, str]:
    """(tensor -> output shard name, single-file name, index name): as the base's format lays out a copy."""
    return base.format.output_layout(base)


def _output_dtype(src: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    return requested if requested is not None and src.is_floating_point else src


def execute(plan: Plan, out: Path, *, dtype: torch.dtype | None = None, max_shard_size: int | None = None,
            overwrite: bool = False, progress: bool = True, extra_inputs: Sequence[Path] = (),
            quantize: dict[str, Encoding] | None = None,
            through: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
            config_update: Callable[[dict], None] | None = None, gguf: GgufOutput | HfGgufOutput | None = None,
            workers: int | None = None) -> Result:
    """Write the planned result to ``out`` atomically.

    ``quantize`` names the tensors to store encoded, and how (an encoded base's tensors that are left
    unchanged and keep their encoding are copied byte for byte); every other tensor is written plain,
    so an encoded base comes out decoded. ``through`` names base tensors to replace as they are read,
    and by what (QLoRA's dequant(quant(W)) view of a 16-bit base). ``config_update`` edits the
    output's config.json after the engine's own updates.

    An ``out`` a format writes as one file of its own (``.gguf``, from a GGUF base) is written so, with
    the options ``gguf`` gives that format (types, key/values); see ``_execute_file``.
    """
    own = file_format(Path(out))
    if own is not None:
        if dtype is not None or max_shard_size is not None or quantize or through:
            raise InputError(f"{out}: a GGUF output keeps the base's layout and types; --dtype, --max-shard-size and "
                             "4-bit options do not apply (choose the type of changed tensors with --type)")
        return _execute_file(plan, Path(out), own, gguf, overwrite, progress, extra_inputs, workers)
    base = plan.base
    quantize, through = quantize or {}, through or {}
    one_file = Path(out).suffix == ".safetensors"
    if one_file:
        if max_shard_size is not None:
            raise InputError(f"{out}: the output is one .safetensors file; --max-shard-size needs an output folder")
        if base.format.output_parts(base):
            raise InputError(f"{out}: {base.folder} is a pipeline of several models, written back as a folder like "
                             "it; name an output folder")
        check_output_file(Path(out), [*base.shards, *extra_inputs], overwrite)
    else:
        check_output_path(out, [base.folder, *base.shards, *extra_inputs], overwrite)
    logical_dtype = {n: _output_dtype(t.dtype, dtype) for n, t in base.tensors.items()}
    specs: list[TensorSpec] = []
    assignment, single, index_name = _output_layout(base)
    parts = base.format.output_parts(base)  # empty for a one-file output (refused above otherwise)
    for n in base.tensors:
        if n in quantize:
            stored = quantize[n].stored_specs(n, plan.out_shapes[n], logical_dtype[n])
            assignment.update({s.name: assignment[n] for s in stored})
            specs.extend(stored)
        else:
            specs.append(TensorSpec(n, logical_dtype[n], plan.out_shapes[n]))
    shards = ([(Path(out).name, specs)] if one_file
              else plan_shards(specs, assignment, max_shard_size, single, parts))
    sharded = len(shards) > 1
    scratches = _ThreadScratch()

    def rounded(name: str, tensor: torch.Tensor) -> torch.Tensor:
        # Changed tensors must come out finite; unchanged ones may keep the base's own inf/NaN, but no
        # finite value may become inf in a narrower --dtype.
        dtype = logical_dtype[name]
        if name in plan.owner and dtype.is_floating_point:
            return _rounded_finite(scratches.get(), tensor, dtype, plan, name)
        if tensor.is_floating_point() and dtype != tensor.dtype:
            remedy = f"--dtype {dtype_name(dtype)} would make inf; choose a wider --dtype"
            return _rounded_finite(scratches.get(), tensor, dtype, plan, name, unchanged=remedy)
        return scratches.get().cast("out", tensor, dtype)

    def emit(name: str, tensor: torch.Tensor) -> None:
        t = rounded(name, tensor)
        if name in quantize:
            for stored_name, part in quantize[name].encode(name, t).items():
                writer.write(stored_name, part)
        else:
            writer.write(name, t)

    def emit_rows(name: str, tensor: torch.Tensor, span: Rows) -> None:
        t = rounded(name, tensor)
        if name in quantize:
            encoded = quantize[name].encode_rows(name, t, span, plan.out_shapes[name])
            for stored_name, (part, first_row) in encoded.items():
                writer.write_rows(stored_name, part, first_row)
        else:
            writer.write_rows(name, t, span[0])

    rows = _RowChunks(base, plan, quantize, through)

    def read(name: str, use: str) -> torch.Tensor:
        info = base.tensors[name]
        raw = base.read(name, scratches.get().take(use, info.shape, info.dtype))
        if name in through:
            raw = through[name](raw)
        return raw

    output = atomic_output_file(Path(out), overwrite) if one_file else atomic_output_dir(out, overwrite)
    with output as tmp:
        if one_file:  # the single shard is the temporary file itself
            shards = [(tmp.name, specs)]
        writer = CheckpointWriter(tmp.parent if one_file else tmp, shards, index_name if sharded else None, parts)
        try:
            def unchanged(name: str) -> None:
                if name in through or not _copy_raw(base, writer, name, quantize.get(name)):
                    if rows.spans(name):
                        for span in rows.spans(name):
                            emit_rows(name, rows.read(name, span), span)
                    else:
                        emit(name, read(name, "read"))

            def run_job(job: ModuleJob) -> None:
                if rows.job_in_chunks(job):
                    _run_job_in_rows(job, plan.direction, rows, emit_rows, emit)
                else:
                    for tensor_name, tensor in _run_job(job, plan.direction, read, scratches.get()).items():
                        emit(tensor_name, tensor)

            _stream(plan, unchanged, run_job, progress, workers)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if one_file:  # a lone weights file: no config or side files travel with it
            return Result(Path(out), len(base.tensors), len(plan.owner), len(plan.jobs), writer.total_bytes,
                          [Path(out).name], notes(plan))
        if base.side_files:
            base.format.copy_side_files(base, tmp)
        for name, text in base.made_side_files().items():
            (tmp / name).write_text(text)
        _update_config(tmp / "config.json", plan, dtype)
        if config_update is not None:
            _edit_config(tmp / "config.json", config_update)
    return Result(out, len(base.tensors), len(plan.owner), len(plan.jobs), writer.total_bytes,
                  [s[0] for s in shards], notes(plan))


def _stream(plan: Plan, unchanged: Callable[[str], None], run_job: Callable[[ModuleJob], None],
            progress: bool, workers: int | None = 1) -> None:
    """Walk the base in file order: each unchanged tensor copied (or read and written), each job run
    when its first tensor comes up.

    With several ``workers`` the units run on a pool of threads (``run_ordered``); each output tensor
    has its own place in the pre-laid-out files, so the order of completion does not matter and the
    result is the same bytes as with one worker.
    """
    base = plan.base
    units: list[tuple[Callable[[], None], int]] = []
    done_jobs: set[str] = set()
    for name, info in base.tensors.items():
        job_name = plan.owner.get(name)
        if job_name is None:
            units.append((functools.partial(unchanged, name), info.nbytes))
        elif job_name not in done_jobs:
            done_jobs.add(job_name)
            job = plan.jobs[job_name]
            units.append((functools.partial(run_job, job), sum(base.tensors[t].nbytes for t in job.tensors.values())))
    with tqdm(total=base.total_bytes, unit="B", unit_scale=True, disable=not progress,
              desc=plan.direction, leave=False) as bar:
        sizes = iter([nbytes for _, nbytes in units])
        for _ in run_ordered([work for work, _ in units], workers):
            bar.update(next(sizes))


class _ThreadScratch:
    """One ``_Scratch`` per thread: each worker reuses its own buffers."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> _Scratch:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = _Scratch()
        return scratch


#: Tensors with more elements than this are read, changed and written in chunks of rows (of their
#: first dimension: a block row, an expert) where every step on their way works by rows: peak memory
#: is then a few float32 copies of one chunk (64 MiB), however large the tensor.
CHUNK_ELEMENTS = 1 << 24


class _RowChunks:
    """Which tensors go through the engine in row chunks, and in which chunks."""

    def __init__(self, base: Checkpoint, plan: Plan, quantize: dict[str, Encoding],
                 through: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.base, self.plan, self.quantize, self.through = base, plan, quantize, through
        self._spans: dict[str, list[Rows]] = {}

    def spans(self, name: str) -> list[Rows]:
        """The chunks of rows ``name`` is processed in; empty where it is processed whole."""
        if name not in self._spans:
            self._spans[name] = self._compute(name)
        return self._spans[name]

    def _compute(self, name: str) -> list[Rows]:
        info = self.base.tensors[name]
        shape = tuple(info.shape)
        if info.numel <= CHUNK_ELEMENTS or len(shape) < 2 or name in self.through \
                or self.plan.out_shapes[name] != shape:
            return []
        unit = 1
        if isinstance(info, EncodedTensorInfo):
            step = info.encoding.row_chunk(info)
            if step is None:
                return []
            unit = step
        target = self.quantize.get(name)
        if target is not None:
            step = target.encode_row_chunk(shape)
            if step is None:
                return []
            unit = math.lcm(unit, step)
        per_row = math.prod(shape[1:])
        n = max(unit, CHUNK_ELEMENTS // per_row // unit * unit)
        return [(a, min(a + n, shape[0])) for a in range(0, shape[0], n)]

    def job_in_chunks(self, job: ModuleJob) -> bool:
        """Whether every patch of ``job`` changes rows independently and its large tensors chunk."""
        return not job.placed and all(b.patch.row_separable for b, _, _ in job.patches) and \
            any(self.spans(n) for n in job.tensors.values())

    def read(self, name: str, span: Rows) -> torch.Tensor:
        info = self.base.tensors[name]
        if isinstance(info, EncodedTensorInfo):
            return info.encoding.decode(info, self.base.read_part, span)
        return self.base.read_part(info, span)


def _run_job_in_rows(job: ModuleJob, direction: str, rows: _RowChunks,
                     emit_rows: Callable[[str, torch.Tensor, Rows], None],
                     emit: Callable[[str, torch.Tensor], None]) -> None:
    """A job whose patches are all row-separable, one tensor and one chunk of rows at a time (small
    tensors as one chunk): each chunk upcast, changed by every patch in order, rounded and written."""
    sign = 1.0 if direction == "merge" else -1.0
    for role, name in job.tensors.items():
        shape = tuple(rows.base.tensors[name].shape)
        spans = rows.spans(name)
        for span in spans or [(0, shape[0] if shape else 1)]:
            raw = rows.read(name, span) if spans else rows.base.read(name)
            t = raw.to(torch.promote_types(raw.dtype, torch.float32))
            for bound, scale, roles in job.patches:
                if role in roles:
                    bound.patch.add_scaled_rows(role, t, sign * scale, span)
            if spans:
                emit_rows(name, t, span)
            else:
                emit(name, t)


def _execute_file(plan: Plan, out: Path, fmt: CheckpointFormat, options: object, overwrite: bool, progress: bool,
                  extra_inputs: Sequence[Path], workers: int | None) -> Result:
    """Write the result as one file of ``fmt``'s own (GGUF: the base's key/values and tensor order, changed
    tensors and those ``options`` retypes re-encoded, the others copied byte for byte)."""
    base = plan.base
    options = fmt.check_file_output(base, out, options, list(plan.owner), plan.out_shapes)
    check_output_file(out, [*base.shards, *extra_inputs], overwrite)
    scratches = _ThreadScratch()

    def read(name: str, use: str) -> torch.Tensor:
        info = base.tensors[name]
        return base.read(name, scratches.get().take(use, info.shape, info.dtype))

    def emit(name: str, tensor: torch.Tensor) -> None:
        rounding = fmt.file_rounding(base, options, name, name in plan.owner)
        if rounding is not None:  # the writer rounds: check against what it rounds to
            fits, remedy = rounding
            tensor = _rounded_finite(scratches.get(), tensor, tensor.dtype, plan, name, fits, remedy)
        writer.write(name, tensor)

    with atomic_output_file(out, overwrite) as tmp:
        writer = fmt.file_writer(tmp, base, options)
        try:
            def unchanged(name: str) -> None:
                if not writer.copy_raw(name):
                    emit(name, read(name, "read"))

            def run_job(job: ModuleJob) -> None:
                for tensor_name, tensor in _run_job(job, plan.direction, read, scratches.get()).items():
                    emit(tensor_name, tensor)

            _stream(plan, unchanged, run_job, progress, workers)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return Result(out, len(base.tensors), len(plan.owner), len(plan.jobs), writer.total_bytes, [out.name],
                  notes(plan))


def _copy_raw(base: Checkpoint, writer: CheckpointWriter, name: str, target: Encoding | None) -> bool:
    """Copy an untouched tensor's stored bytes where its output encoding is its input encoding (as the
    base's format can)."""
    return base.format.copy_raw(base, writer, name, target)


class _Scratch:
    """Reusable flat buffers, one per use: allocating fresh memory for every tensor costs as much page
    faulting as the arithmetic itself. A buffer's contents live until the next ``take`` of its use."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, use: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buffers.get((use, dtype))
        if buf is None or buf.numel() < n:
            buf = self._buffers[(use, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)

    def cast(self, use: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t`` in ``dtype`` (itself if it already is), contiguous."""
        if t.dtype == dtype:
            return t.contiguous()
        return self.take(use, tuple(t.shape), dtype).copy_(t)


#: Elements checked and rounded at a time, per intra-op thread: torch splits each op over its threads
#: the same way, so every thread's 1 MiB of float32 is still in its cache when it is rounded. Fewer,
#: larger ops also keep the threads' synchronization (per op) rare.
_CHECK_CHUNK = 1 << 18


def overflow_bound(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to ±inf in ``dtype``: its largest value plus half a step (the
    largest value's last mantissa bit is 1, so the tie rounds to even, i.e. up to inf)."""
    info = torch.finfo(dtype)
    return info.max + 2.0 ** (math.floor(math.log2(info.max)) - 1) * info.eps


def _rounded_finite(scratch: _Scratch, tensor: torch.Tensor, dtype: torch.dtype, plan: Plan, name: str,
                    fits: torch.dtype | None = None, unchanged: str | None = None) -> torch.Tensor:
    """``tensor`` rounded to ``dtype`` (as ``scratch.cast``), refused unless every value is finite and
    rounds to a finite value in ``fits`` (default ``dtype``): ``|x| < overflow_bound(fits)``.

    ``unchanged`` is the remedy to name for a tensor no adapter changed; such a tensor may keep the
    base's own inf/NaN (only finite values that would round to inf are refused).

    Each chunk's min and max are taken just before the chunk is rounded, while it is in the cache:
    one reduction over data the cast reads anyway, instead of another pass over memory.
    """
    fits = fits or dtype
    bound = overflow_bound(fits) if torch.finfo(fits).max < torch.finfo(tensor.dtype).max else math.inf
    if tensor.dtype == dtype:
        out = tensor.contiguous()
        source, target = out.view(-1), None
    elif not tensor.is_contiguous():  # strided: rounded in one copy, then the copy is checked
        out = scratch.take("out", tuple(tensor.shape), dtype).copy_(tensor)
        source, target = out.view(-1), None
    else:
        out = scratch.take("out", tuple(tensor.shape), dtype)
        source, target = tensor.reshape(-1), out.view(-1)
    chunk = _CHECK_CHUNK * torch.get_num_threads()
    for start in range(0, source.numel(), chunk):
        part = source[start:start + chunk]
        low, high = torch.aminmax(part)
        if not (bool(low > -bound) and bool(high < bound)):  # NaN fails both
            if unchanged is None or bool((torch.isfinite(part) & (part.abs() >= bound)).any()):
                raise _not_finite(plan, name, tensor, fits, unchanged)
        if target is not None:
            target[start:start + chunk].copy_(part)
    return out


def _not_finite(plan: Plan, name: str, tensor: torch.Tensor, fits: torch.dtype, unchanged: str | None) -> InputError:
    if unchanged is not None:  # refused only for finite values that would round to inf
        return InputError(f"{name}: has values beyond {dtype_name(fits)}'s range, which {unchanged}")
    finite = bool(torch.isfinite(tensor).all())
    problem = f"has values beyond {dtype_name(fits)}'s range" if finite else "gives inf or NaN values"
    job = plan.jobs[plan.owner[name]]
    what = f"{name}: the {plan.direction} of {', '.join(job.sources)} into {job.module} {problem}"
    if finite:
        return InputError(f"{what}; write a wider --dtype/--type, or check the adapter's alpha and tensors and the "
                          "--scale")
    return InputError(f"{what}; check the adapter's tensors for inf/NaN, its alpha and the --scale")


def _run_job(job: ModuleJob, direction: str, read: Callable[[str, str], torch.Tensor],
             scratch: _Scratch) -> dict[str, torch.Tensor]:
    tensors = {}
    # buffers by position in the job, not by role: a placed job's roles are stored tensor names, and a buffer
    # per name would keep every changed tensor of the model (read + float32 work) to the end of the run
    for i, (role, name) in enumerate(job.tensors.items()):
        raw = read(name, f"read:{i}")
        if raw.is_floating_point():
            tensors[role] = scratch.cast(f"work:{i}", raw, torch.promote_types(raw.dtype, torch.float32))
        else:  # an integer buffer a replacement copies (the plan refuses any other change to integers)
            tensors[role] = raw.clone()
    for (patch, scale, roles), views in zip(job.patches, job.views):
        if views is None:
            sub = {r: tensors[r] for r in roles}
        else:
            sub = {r: gather(tensors, views[r]) for r in roles}
        sub = patch.merge(sub, scale) if direction == "merge" else patch.unmerge(sub, scale)
        if views is None:
            tensors.update(sub)
        else:
            for r in roles:
                _scatter(tensors, views[r], sub[r])
    return {job.tensors[r]: t for r, t in tensors.items()}


def gather(tensors: dict[str, torch.Tensor], parts: Place) -> torch.Tensor:
    """What a placed patch sees: each part as diffusers shapes it, stacked by rows."""
    pieces = [loc.take(tensors[name]) for name, loc in parts]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _scatter(tensors: dict[str, torch.Tensor], parts: Place, value: torch.Tensor) -> None:
    """Put a placed patch's result back where ``gather`` took it from."""
    row = 0
    for name, loc in parts:
        region = loc.region(tensors[name])
        rows = region.shape[0] if value.dim() == 1 else loc.shape[0]
        piece = value[row:row + rows]
        row += rows
        if piece.data_ptr() != region.data_ptr() or loc.transposed or loc.halves_swapped:
            region.copy_(loc.to_stored(piece))


def _update_config(path: Path, plan: Plan, dtype: torch.dtype | None) -> None:
    """Keep config.json true to the written weights: vocabulary size and dtype."""
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return
    changed = False
    for name in plan.owner:
        if name.endswith(INPUT_EMBEDDING_SUFFIXES) and plan.out_shapes[name] != plan.base.tensors[name].shape:
            if "vocab_size" in config:
                config["vocab_size"] = plan.out_shapes[name][0]
                changed = True
    if dtype is not None:
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for k in keys:
            config[k] = dtype_name(dtype)
        changed = True
    if changed:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _edit_config(path: Path, update: Callable[[dict], None]) -> None:
    """Apply ``update`` to ``config.json`` in place, if there is one."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    update(config)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
