"""Prove that a merged checkpoint computes what base + adapter compute, with forward passes.

For every module the adapter changes, seeded inputs shaped like that module's inputs go through
(a) the adapter's own unmerged forward path (``Patch.forward``: written the way PEFT computes it at
inference, sharing no code with the merge) over the base tensors and (b) the plain layer over the
merged tensors. The two must agree to within the rounding the merged file's dtype allows: the
error of each output element is measured against the same layer run on magnitudes,
``|W'|·|x| (+|b|)``, which bounds what rounding each weight to the output dtype can do. Every tensor
the adapter does not change must be byte-identical to the base (or its cast, after ``--dtype``).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import TypeGuard

import torch
from tqdm.auto import tqdm

from .adapters import Adapter
from .adapters.files import FileAdapter
from .adapters.locate import Place
from .checkpoint import Checkpoint
from .checkpoint.encodings import check_decoded
from .engine import ModuleJob, Plan, gather, plan
from .errors import InputError, UnsupportedError
from .methods import AdditivePatch, ReplacePatch
from .methods.layers import Direct, Layer
from .workers import run_ordered

# Relative error allowed per output element, in units of the layer run on magnitudes: a little
# over the half-ulp each stored weight may be off by in the merged file's dtype.
DEFAULT_RTOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@dataclass
class Check:
    """One module's comparison (or one untouched tensor's byte check)."""

    module: str
    kind: str  # "forward" or "bytes"
    passed: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    detail: str = ""


@dataclass
class Report:
    checks: list[Check]
    untouched: int  # tensors compared byte for byte
    device: str
    tokens: int
    seed: int
    rtol: float | None  # None: by dtype
    atol: float
    modules: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(device)


def check_options(tokens: object, seed: object, rtol: object = None, atol: object = 0.0) -> None:
    """``--tokens``/``--seed``/``--rtol``/``--atol`` as numbers the check can use: a NaN tolerance
    would fail every module, an infinite one pass every module."""
    def is_int(v: object) -> TypeGuard[int]:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(tokens) or tokens < 1:
        raise InputError(f"--tokens {tokens!r}: must be a positive integer (input rows per module)")
    if not is_int(seed):
        raise InputError(f"--seed {seed!r}: must be an integer")
    for name, value in (("--rtol", rtol), ("--atol", atol)):
        if value is None and name == "--rtol":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InputError(f"{name} {value!r}: must be a finite number >= 0")


def verify_merge(base: Checkpoint, adapters: Sequence[tuple[Adapter | FileAdapter, float]], merged: Checkpoint, *,
                 device: str = "auto", tokens: int = 64, seed: int = 0, rtol: float | None = None,
                 atol: float = 0.0, progress: bool = True, workers: int | None = None) -> Report:
    """Compare ``merged`` with ``base`` + ``adapters`` module by module; nothing is written. ``workers``
    threads check different modules and tensors at once; the report is the same whatever their number."""
    import time

    start = time.perf_counter()
    check_options(tokens, seed, rtol, atol)
    dev = pick_device(device)
    job_plan = plan(base, adapters, "merge")
    check_decoded(merged.tensors, merged.config, [n for n in job_plan.owner if n in merged.tensors],
                  f"merged {merged.folder}")  # first: an encoding's side tensors are not "extra" tensors
    _check_same_tensors(job_plan, merged)
    for job in job_plan.jobs.values():  # known from the plan: refused before the first tensor is read
        bent = next((b.patch for b, s, _ in job.patches if s != 1.0 and not b.patch.scales_linearly()), None)
        if bent is not None:
            raise UnsupportedError(f"{job.module}: {type(bent).__name__}'s change does not scale linearly with the "
                                   "multiplier, which verify's reference assumes; verify it at --scale 1")
        groups = [steps for _, steps in _regions(job)] if job.placed else [job.patches]
        if any(len(changes := [b.patch for b, _, _ in steps if not isinstance(b.patch, ReplacePatch)]) > 1
               and not all(isinstance(p, AdditivePatch) for p in changes) for steps in groups):
            raise UnsupportedError(f"{job.module}: several adapters change this module and not all are additive; "
                                   "verify checks stacked non-additive changes one adapter at a time")
    report = Report([], 0, str(dev), tokens, seed, rtol, atol, modules=len(job_plan.jobs))
    total = sum(t.nbytes for t in base.tensors.values()) + sum(t.nbytes for t in merged.tensors.values())
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="verify", leave=False) as bar:
        jobs = list(job_plan.jobs.values())
        module_checks = [functools.partial(_check_module, job_plan, job, merged, dev, tokens, seed + index, rtol, atol)
                         for index, job in enumerate(jobs)]
        sizes = iter([sum(base.tensors[t].nbytes + merged.tensors[t].nbytes for t in job.tensors.values())
                      for job in jobs])
        for check in run_ordered(module_checks, workers):
            report.checks.append(check)
            n = next(sizes)
            bar.update(n)
            report.bytes_read += n
        untouched = [name for name in base.tensors if name not in job_plan.owner]
        byte_checks = [functools.partial(_check_bytes, base, merged, name) for name in untouched]
        sizes = iter([base.tensors[name].nbytes + merged.tensors[name].nbytes for name in untouched])
        for check in run_ordered(byte_checks, workers):
            report.checks.append(check)
            report.untouched += 1
            n = next(sizes)
            bar.update(n)
            report.bytes_read += n
    report.seconds = time.perf_counter() - start
    return report


def _check_same_tensors(job_plan: Plan, merged: Checkpoint) -> None:
    missing = [n for n in job_plan.base.tensors if n not in merged.tensors]
    extra = [n for n in merged.tensors if n not in job_plan.base.tensors]
    if missing or extra:
        what = (f"lacks {len(missing)} base tensors (e.g. {missing[0]})" if missing
                else f"has {len(extra)} tensors the base lacks (e.g. {extra[0]})")
        raise InputError(f"{merged.folder}: {what}; is it a merge of this base?")
    for name, shape in job_plan.out_shapes.items():
        if tuple(merged.tensors[name].shape) != tuple(shape):
            raise InputError(f"{merged.folder}: {name} has shape {list(merged.tensors[name].shape)}, expected "
                             f"{list(shape)} after merging; is it a merge of this base and adapter?")


def _read(ckpt: Checkpoint, name: str, dev: torch.device) -> torch.Tensor:
    t = ckpt.read(name)
    return t.to(dev, torch.float32 if t.dtype != torch.float64 else torch.float64)


def _check_module(job_plan: Plan, job: ModuleJob, merged: Checkpoint, dev: torch.device, tokens: int, seed: int,
                  rtol: float | None, atol: float) -> Check:
    base = {role: _read(job_plan.base, name, dev) for role, name in job.tensors.items()}
    after = {role: _read(merged, name, dev) for role, name in job.tensors.items()}
    dtypes = [merged.tensors[n].dtype for n in job.tensors.values() if merged.tensors[n].dtype.is_floating_point]
    out_dtype = max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)
    if not job.placed:
        return _compare(job.module, base, after, out_dtype, job.patches, dev, tokens, seed, rtol, atol)
    # Patches placed in parts of stored tensors (q/k/v of a fused qkv): each region checked as its own layer,
    # with the patches that change exactly that region; the worst result stands for the job.
    checks = []
    for views, steps in _regions(job):
        roles = {r for _, _, rs in steps for r in rs}
        checks.append(_compare(job.module, {r: gather(base, views[r]) for r in roles},
                               {r: gather(after, views[r]) for r in roles}, out_dtype, steps, dev, tokens, seed,
                               rtol, atol))
    return min(checks, key=lambda c: (c.passed, -c.max_rel))


def _regions(job: ModuleJob) -> list[tuple[dict[str, Place], list]]:
    """A placed job's patches grouped by the parts of stored tensors they see."""
    regions: dict[str, tuple[dict[str, Place], list]] = {}
    for step, views in zip(job.patches, job.views):
        assert views is not None, "a placed job places every patch"
        key = repr(sorted((r, tuple((n, loc.slice) for n, loc in parts)) for r, parts in views.items()))
        regions.setdefault(key, (views, []))[1].append(step)
    return list(regions.values())


def _compare(module: str, base: dict[str, torch.Tensor], after: dict[str, torch.Tensor], out_dtype: torch.dtype,
             steps: list, dev: torch.device, tokens: int, seed: int, rtol: float | None, atol: float) -> Check:
    """One layer's forward pass with the merged tensors against the unmerged adapters' output."""
    tol = rtol if rtol is not None else DEFAULT_RTOL.get(out_dtype, 1e-5)
    # Replaced tensors (modules_to_save, saved biases) are the base as the adapter's layers see it.
    for bound, _, _ in steps:
        if isinstance(bound.patch, ReplacePatch):
            base[bound.patch.role] = bound.patch.tensor.to(dev, torch.float32)
    changes = [(b, s) for b, s, _ in steps if not isinstance(b.patch, ReplacePatch)]
    shapes = {r: tuple(t.shape) for r, t in base.items()}
    try:
        layer: Layer = changes[0][0].layer(shapes) if changes else Direct(tuple(base))
        generator = torch.Generator().manual_seed(seed)
        x = layer.inputs(shapes, tokens, generator).to(dev)
        expected = _unmerged(layer, x, base, changes)
    except UnsupportedError as e:
        return Check(module, "forward", False, detail=str(e))
    got = layer(x, after)
    scale = layer.magnitude(x, after)
    err = (got - expected).abs()
    rel = err / scale.clamp_min(torch.finfo(torch.float32).tiny)
    finite = bool(torch.isfinite(got).all() and torch.isfinite(expected).all())
    passed = finite and bool((err <= atol + tol * scale).all())
    cosine = float(torch.nn.functional.cosine_similarity(got.flatten().double(), expected.flatten().double(),
                                                          dim=0)) if got.numel() else 1.0
    detail = "" if passed else ("non-finite output" if not finite else
                                f"error exceeds tolerance (rtol {tol:g} of |W'|·|x|, atol {atol:g})")
    return Check(module, "forward", passed, float(err.max()) if err.numel() else 0.0,
                 float(rel.max()) if rel.numel() else 0.0, cosine if math.isfinite(cosine) else 0.0, detail)


def _unmerged(layer: Layer, x: torch.Tensor, base: dict[str, torch.Tensor], changes: list) -> torch.Tensor:
    """The adapters' unmerged output. Every layer is linear in its tensors, so a change merged at scale
    s is ``y₀ + s·(y - y₀)``, and several additive changes add up."""
    if not changes:
        return layer(x, base)
    if len(changes) == 1 and changes[0][1] == 1.0:
        return changes[0][0].forward(x, base, layer)
    y0 = layer(x, base)  # several changes: all additive (verify_merge refused the others up front)
    return y0 + sum(s * (p.forward(x, base, layer) - y0) for p, s in changes)


def _check_bytes(base: Checkpoint, merged: Checkpoint, name: str) -> Check:
    a = base.read(name)
    b = merged.read(name)
    if a.dtype != b.dtype:
        a = a.to(b.dtype)
    same = a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    return Check(name, "bytes", same,
                 detail="" if same else "differs from the base, but the adapter does not change it")


def format_report(report: Report, everything: bool = False) -> str:
    """A table of the module checks (failures only unless ``everything``) and a summary line."""
    forward = [c for c in report.checks if c.kind == "forward"]
    shown = forward if everything else report.failures
    lines = []
    if shown:
        width = max(len(c.module) for c in shown)
        lines.append(f"{'module'.ljust(width)}  {'max abs err':>11}  {'max rel err':>11}  {'cosine':>10}  result")
        for c in shown:
            lines.append(f"{c.module.ljust(width)}  {c.max_abs:11.3e}  {c.max_rel:11.3e}  {c.cosine:10.7f}  "
                         f"{'pass' if c.passed else 'FAIL'}{'  ' + c.detail if c.detail else ''}")
    bad_bytes = [c for c in report.checks if c.kind == "bytes" and not c.passed]
    worst = max((c.max_rel for c in forward), default=0.0)
    lines.append(f"{'PASS' if report.passed else 'FAIL'}: {sum(c.passed for c in forward)}/{len(forward)} modules "
                 f"agree with the unmerged forward (worst rel err {worst:.2e}); "
                 f"{report.untouched - len(bad_bytes)}/{report.untouched} untouched tensors byte-identical; "
                 f"{report.device}, {report.tokens} tokens, seed {report.seed}, {report.seconds:.1f} s")
    return "\n".join(lines)


def verify_quantized(original: Checkpoint, quantized: Checkpoint, *, device: str = "auto", tokens: int = 64,
                     seed: int = 0, slack: float = 1e-4, progress: bool = True) -> Report:
    """Check a 4-bit checkpoint against the one it was made from, weight by weight, with forward passes.

    Each output's error must stay inside what 4-bit quantization can do to it: every weight is at
    most half the widest code gap times its block's absmax away from the original (plus, with double
    quantization, the 8-bit error of that absmax), so ``|Δy| ≤ E·|x|`` with ``E`` that per-weight
    bound computed from the *original* weights and the file's quantization settings. A damaged block
    breaks it; honest quantization never does. The report also gives each weight's relative error.
    Tensors left unquantized must be equal (or equal after a dtype cast).
    """
    import time

    from .quant.encodings.bnb4bit import Bnb4bit
    from .methods.layers import Linear

    start = time.perf_counter()
    check_options(tokens, seed)
    dev = pick_device(device)
    for ckpt in (original, quantized):  # encodings not decoded: their codes would be compared as numbers
        check_decoded(ckpt.tensors, ckpt.config, (), str(ckpt.folder))
    for name, info in quantized.tensors.items():  # the error bound below is bitsandbytes 4-bit's
        encoding = getattr(info, "encoding", None)
        if encoding is not None and not isinstance(encoding, Bnb4bit):
            raise UnsupportedError(
                f"{quantized.folder}: {name} is stored in {encoding.name}; verify --quantized checks bitsandbytes "
                "4-bit weights against their error bound and has none for this encoding. Check a merge into it with "
                "`wsurgery verify BASE ADAPTER MERGED`, which decodes it")
    missing = [n for n in original.tensors if n not in quantized.tensors]
    if missing:
        raise InputError(f"{quantized.folder}: lacks {len(missing)} tensors of {original.folder} "
                         f"(e.g. {missing[0]}); is it a quantization of it?")
    for name, info in quantized.tensors.items():  # the headers tell: refused before any tensor is read
        if name not in original.tensors:
            raise InputError(f"{quantized.folder}: {name} is not in {original.folder}; is it a quantization of it?")
        if tuple(info.shape) != tuple(original.tensors[name].shape):
            raise InputError(f"{quantized.folder}: {name} has shape {list(info.shape)}, {original.folder} "
                             f"{list(original.tensors[name].shape)}; is it a quantization of it?")
    report = Report([], 0, str(dev), tokens, seed, None, 0.0)
    items = list(quantized.tensors.items())
    for index, (name, info) in enumerate(tqdm(items, disable=not progress, desc="verify", leave=False)):
        if not isinstance(getattr(info, "encoding", None), Bnb4bit):
            a, b = original.read(name), quantized.read(name)
            same = a.shape == b.shape and torch.equal(a.to(b.dtype), b)
            report.checks.append(Check(name, "bytes", same, detail="" if same else "differs from the original"))
            report.untouched += 1
            continue
        W = _read(original, name, dev)
        Q = _read(quantized, name, dev)
        bound = _weight_error_bound(W, info)
        layer = Linear(fan_in_fan_out=info.encoding.transposed)
        x = layer.inputs({"weight": tuple(W.shape)}, tokens, torch.Generator().manual_seed(seed + index)).to(dev)
        got, expected = layer(x, {"weight": Q}), layer(x, {"weight": W})
        limit = layer(x.abs(), {"weight": bound}) * (1 + slack) + slack * layer.magnitude(x, {"weight": W})
        err = (got - expected).abs()
        weights_ok = bool(((Q - W).abs() <= bound * (1 + slack)).all())  # the bound holds weight by weight too
        passed = bool(torch.isfinite(got).all()) and bool((err <= limit).all()) and weights_ok
        rel = float(err.norm() / expected.norm().clamp_min(1e-30))
        cosine = float(torch.nn.functional.cosine_similarity(got.flatten().double(), expected.flatten().double(),
                                                             dim=0))
        detail = "" if passed else "error beyond what 4-bit quantization can cause: a damaged block?"
        report.checks.append(Check(name, "forward", passed, float(err.max()), rel, cosine, detail))
        report.modules += 1
    report.seconds = time.perf_counter() - start
    return report


def _weight_error_bound(W: torch.Tensor, info) -> torch.Tensor:
    """Per-weight bound of |dequant(quant(W)) - W| for the file's settings, from the original W alone."""
    from .quant.bnb4bit import code_book, dynamic_map

    s, transposed = info.encoding.state, info.encoding.transposed
    flat = (W.T if transposed else W).reshape(-1)
    n, bs = flat.numel(), s.blocksize
    pad = (-n) % bs
    blocks = torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, bs)
    absmax = blocks.amax(dim=1)
    code = code_book(s.quant_type).to(W.device)
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    per_block = absmax * half_gap
    if s.double_quant:
        centred = torch.nn.functional.pad(absmax - absmax.mean(), (0, (-absmax.numel()) % s.nested_blocksize))
        nested = centred.abs().view(-1, s.nested_blocksize).amax(dim=1)
        dyn = dynamic_map().to(W.device)
        dq_error = nested * float((dyn[1:] - dyn[:-1]).max()) / 2
        per_block = per_block + dq_error.repeat_interleave(s.nested_blocksize)[: absmax.numel()]
    per_block = per_block * (1 + 2**-20) + absmax * 2**-20  # the float32 arithmetic of quantize/dequantize
    bound = per_block.repeat_interleave(bs)[:n].view(tuple(s.shape))
    return bound.T if transposed else bound
