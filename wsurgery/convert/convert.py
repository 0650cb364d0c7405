"""``wsurgery convert ADAPTER OUT --to METHOD``: an adapter rewritten as another PEFT method.

Each module's change ΔW comes from the source adapter's own patch: its dense delta where the change
does not depend on W, else the patched base weight minus W (read from ``--base``, in float64). The
target fits it (see ``to_lora``, ``to_structured``). The relative error ``‖ΔW' − ΔW‖_F / ‖ΔW‖_F`` (bias
change included) is measured on the adapter as written: read back from its files like any adapter,
its change against the source's. A module the target cannot express at all (error >= 0.99) stops the
conversion unless ``force``; one whose written change is not finite stops it always.

Everything that can be checked from headers and configs (targets, shapes, layer kinds, the need for
a base) is checked before the first module is read; modules are then read and fitted one at a time
(a non-finite change is refused there), and the adapter is written atomically once all are done and
measured. ``modules_to_save`` and trainable-token rows are carried over as they are.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import Adapter, load_adapter
from ..checkpoint import Checkpoint, check_output_path, open_checkpoint
from ..engine import plan
from ..errors import InputError, UnsupportedError
from ..model_card import provenance
from ..methods import AdditivePatch, Patch
from ..methods.adalora import AdaLoraPatch
from ..methods.lora import LoraPatch
from ..methods.trainable_tokens import TokenPatch
from ..methods.vblora import VBLoraPatch
from . import to_lora, to_structured  # noqa: F401  (they register the targets)
from .peft_writer import write_adapter
from ..workers import run_ordered
from .target import (KINDS, TARGETS, Factors, Fit, ModuleDelta, Options, Target, as_matrix, get_target,
                     matrix_shape)

#: A module whose relative error reaches this gains nothing from the conversion.
USELESS_ERROR = 0.99
#: At or below this relative error a module counts as converted exactly.
EXACT_ERROR = 1e-5

__all__ = ["TARGETS", "Conversion", "ModuleReport", "convert"]


@dataclass
class ModuleReport:
    module: str
    rank: int  # what the target spent: rank, MiSS r, block size
    error: float  # ‖ΔW' − ΔW‖_F / ‖ΔW‖_F

    @property
    def exact(self) -> bool:
        return self.error <= EXACT_ERROR


@dataclass
class Conversion:
    """What a conversion wrote, and how close each module came."""

    out: Path
    source: str  # the source's peft_type
    target: str  # the --to name
    method: str  # the target method's name ("MiSS")
    size_name: str  # what ModuleReport.rank counts ("rank", "r", "block")
    modules: list[ModuleReport]
    notes: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules), default=0.0)


@dataclass
class _Source:
    """One module of the source adapter, checked against its base weight."""

    patch: Patch
    kind: str
    shapes: dict[str, tuple[int, ...]]  # role -> the base tensor's shape as stored
    tensors: dict[str, str]  # role -> base tensor name; empty without a base

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shapes["weight"]

    @property
    def changes_bias(self) -> bool:
        return "bias" in self.shapes

    @property
    def module(self) -> str:
        return self.patch.module


def _kind(patch: Patch, shape: tuple[int, ...], fan_in_fan_out: bool) -> str:
    """The layer kind from the patch where it knows (LoRA, DoRA, OFT, IA3...), else from the shape and config."""
    kind = getattr(patch, "kind", None) or getattr(getattr(patch, "lora", None), "kind", None)
    if len(shape) > 2:
        return "conv"
    if kind in KINDS and kind != "linear":
        return kind
    return "conv1d_transposed" if fan_in_fan_out else "linear"


def _check_roles(patch: Patch, roles: tuple[str, ...]) -> None:
    if "weight" not in roles or set(roles) - {"weight", "bias"}:
        raise UnsupportedError(f"{patch.module}: the change touches {', '.join(roles) or 'no base tensor'}; convert "
                               "handles changes of a layer's weight (and bias)")


def _own_shapes(patch: Patch) -> dict[str, tuple[int, ...]] | None:
    """The base shapes a patch implies by itself, where its tensors tell them unambiguously."""
    if isinstance(patch, LoraPatch):
        shapes = {patch.role: patch.weight_shape()}
        if patch.bias is not None:
            shapes["bias"] = tuple(patch.bias.shape)
        return shapes
    if isinstance(patch, VBLoraPatch):
        return {"weight": patch.out_in[::-1] if patch.transposed else patch.out_in}
    return None


def _sources(ad: Adapter, base: Checkpoint | None) -> list[_Source]:
    """The method patches to convert, each checked against its base shapes; nothing is read yet."""
    methods = {id(p) for p in ad.method_patches}
    fan_in_fan_out = bool(ad.config.get("fan_in_fan_out", False))
    found: list[_Source] = []
    if base is not None:
        for job in plan(base, [(ad, 1.0)]).jobs.values():
            for bound, _, roles in job.patches:
                patch = bound.patch
                if id(patch) not in methods:
                    continue
                _check_roles(patch, roles)
                shapes = {r: tuple(base.tensors[job.tensors[r]].shape) for r in roles}
                found.append(_Source(patch, _kind(patch, shapes["weight"], fan_in_fan_out), shapes,
                                     {r: job.tensors[r] for r in roles}))
        return found
    for patch in ad.method_patches:
        _check_roles(patch, patch.roles)
        if not isinstance(patch, AdditivePatch):
            raise InputError(f"{patch.module}: the {ad.config.peft_type} change depends on the base weight; pass "
                             "--base BASE")
        own = _own_shapes(patch)
        if own is None:
            raise InputError(f"{ad.folder}: {ad.config.peft_type} adapters do not record the shape of "
                             f"{patch.module}'s weight (in_features, layer type); pass --base BASE")
        shapes = patch.bind(own).shapes
        found.append(_Source(patch, _kind(patch, shapes["weight"], fan_in_fan_out), shapes, {}))
    return found


def _factors(patch: Patch) -> tuple[Factors, torch.Tensor | None] | None:
    """``(B, A)`` with ΔW = B·A in (out, fan_in) orientation, and the bias change, for sources that are a
    product (plain LoRA on any layer, AdaLoRA); None for the rest."""
    if isinstance(patch, LoraPatch):
        B = patch.B.flatten(1).to(torch.float64) * (patch.scaling * patch.factor)
        bias = None if patch.bias is None else patch.bias.to(torch.float64) * patch.scaling
        return (B, patch.A.flatten(1).to(torch.float64)), bias
    if isinstance(patch, AdaLoraPatch):
        A = patch.A.to(torch.float64) * patch.E.to(torch.float64)
        return (patch.B.to(torch.float64) * patch.factor, A), None
    return None


def _read(src: _Source, base: Checkpoint | None, needs_weight: bool) -> ModuleDelta:
    """The module's change (float64, (out, fan_in)), with the base weight where asked for."""
    patch = src.patch
    delta = ModuleDelta(src.module, src.kind, src.shape)
    product = _factors(patch)
    if product is not None:
        delta.factors, delta.bias = product
    elif isinstance(patch, AdditivePatch):
        change = {role: t.to(torch.float64) for role, t in patch.delta().items()}
        delta.matrix, delta.bias = as_matrix(src.kind, change["weight"]), change.get("bias")
    else:
        assert base is not None, "_sources refuses a change that depends on W without a base"
        before = {role: base.read(name).to(torch.float64) for role, name in src.tensors.items()}
        after = patch.apply({role: t.clone() for role, t in before.items()})
        delta.matrix = as_matrix(src.kind, after["weight"].sub_(before["weight"]))
        delta.bias = after["bias"].sub_(before["bias"]) if "bias" in before else None
        delta.weight = as_matrix(src.kind, before["weight"])
    parts = [*(delta.factors or ()), delta.matrix, delta.bias]
    if not all(bool(torch.isfinite(t).all()) for t in parts if t is not None):
        where = "the adapter's tensors or scaling" + (", or the base weight" if src.tensors else "")
        raise InputError(f"{src.module}: the change is not finite (inf or NaN in {where}); fix or retrain the "
                         "adapter")
    if delta.bias is not None and not bool(delta.bias.any()):
        delta.bias = None
    if not needs_weight:
        delta.weight = None
    elif delta.weight is None:
        assert base is not None, "convert refuses a target that needs W without a base"
        delta.weight = as_matrix(src.kind, base.read(src.tensors["weight"]).to(torch.float64))
    return delta


def _product_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖_F without forming it: ‖B·A‖² = tr((BᵀB)(AAᵀ)); float64 resolves it to ~1e-8 of the terms."""
    return math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))


def _relative_error(written: ModuleDelta, source: ModuleDelta) -> float:
    """‖ΔW' − ΔW‖_F / ‖ΔW‖_F with the bias changes counted in (0 where the source changes nothing), from
    factors where both sides have them."""
    if written.matrix is None and source.matrix is None:
        assert written.factors is not None and source.factors is not None, "a delta without a matrix has factors"
        (B1, A1), (B2, A2) = written.factors, source.factors
        diff, norm = _product_norm(torch.cat([B1, -B2], 1), torch.cat([A1, A2])), _product_norm(B2, A2)
    else:
        diff = float(torch.linalg.matrix_norm(written.delta - source.delta))
        norm = float(torch.linalg.matrix_norm(source.delta))
    zero = torch.zeros(())
    bias_w, bias_s = (d.bias if d.bias is not None else zero for d in (written, source))
    diff, norm = math.hypot(diff, float((bias_w - bias_s).norm())), math.hypot(norm, float(bias_s.norm()))
    return diff / norm if norm > 0 else 0.0 if diff == 0 else math.inf


def _measure(folder: Path, sources: list[_Source], base: Checkpoint | None, fits: dict) -> list[ModuleReport]:
    """Every module's relative error, from the adapter written in ``folder`` read back as any adapter."""
    written = {p.module: p for p in load_adapter(folder).method_patches}
    reports = []
    for src in sources:
        patch = written.get(src.module)
        if patch is None:
            raise UnsupportedError(f"{src.module}: the written adapter does not hold this module; please report this")
        patch.bind(src.shapes, src.patch.base_dtypes)
        error = _relative_error(_read(_Source(patch, src.kind, src.shapes, src.tensors), base, False),
                                _read(src, base, False))
        reports.append(ModuleReport(src.module, fits[src.module].rank, error))
    return reports


def _carried(ad: Adapter, carries_tokens: bool, to: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``modules_to_save`` tensors and trainable-token rows, as the source saved them, and their config fields."""
    bias = ad.config.get("bias", "none")
    if bias != "none":
        raise UnsupportedError(f"{ad.config.path}: bias={bias!r}: the adapter trained biases, which convert does not "
                               "carry over; merge the adapter instead")
    tensors = {r.key: r.tensor for reps in ad.replacements.values() for r in reps}
    config = {"modules_to_save": ad.config.modules_to_save or None}
    if ad.tokens:
        if not carries_tokens:
            raise UnsupportedError(f"{ad.config.path}: trainable_token_indices has no place in a {to} adapter; "
                                   "convert to lora, which keeps them")
        for t in ad.tokens:
            assert isinstance(t, TokenPatch), t.module  # Adapter.tokens holds token_patch()'s patches only
            tensors[t.key] = t.rows
        config["trainable_token_indices"] = ad.config.raw["trainable_token_indices"]
    return tensors, config


def _fit(target: Target, src: _Source, base: Checkpoint | None, options: Options) -> Fit:
    """One module's fit: a task of its own, so that modules run on several threads."""
    return target.fit(_read(src, base, target.needs_weight), options)


def convert(adapter: str | Path, out: str | Path, *, to: str, base: str | Path | None = None,
            rank: int | None = None, block_size: int | None = None, butterfly_factors: int | None = None,
            force: bool = False, overwrite: bool = False, progress: bool = True,
            command: str | None = None, workers: int | None = None) -> Conversion:
    """Rewrite ``adapter`` as a ``to`` adapter (``lora``, ``miss``, ``bone``, ``oft``, ``boft``, ``loha``, ``lokr``).

    ``base`` is needed where the change depends on W (DoRA, OFT, BOFT, HRA, IA3, MiSS bat...), for the
    ``oft``/``boft`` targets, and where the adapter does not record its layers' shapes (all but LoRA and
    VB-LoRA). ``rank``: the LoRA/LoHa/LoKr rank (default: each module's exact rank) or MiSS/Bone's r.
    ``block_size``/``butterfly_factors``: OFT/BOFT's size. Raises ``UnsupportedError`` where a module's
    relative error reaches 0.99, unless ``force``. ``command``: the command line to record in the
    adapter's provenance (paths cut to their names). ``workers``: threads fitting different modules at
    once (default one per core); the adapter is the same bytes whatever the number.
    """
    target = get_target(to)
    ad = load_adapter(adapter)
    options = Options(rank, block_size, butterfly_factors)
    target.check_options(options)
    if target.needs_weight and base is None:
        raise InputError(f"--to {to} needs --base BASE: {target.method} rotates the base weight, so the best "
                         f"{target.method} depends on W")
    ckpt = open_checkpoint(base) if base is not None else None
    out = Path(out)
    inputs = [ad.folder, *([ckpt.folder] if ckpt is not None else [])]
    check_output_path(out, inputs, overwrite)
    carried, carried_config = _carried(ad, target.carries_tokens, to)
    sources = _sources(ad, ckpt)
    if not sources:
        raise UnsupportedError(f"{ad.folder}: the adapter changes no layer weight (only whole tensors or token rows); "
                               "there is nothing to convert")
    for src in sources:
        target.check_module(src.module, src.kind, matrix_shape(src.kind, src.shape), src.changes_bias, options)
    target.check_kinds({src.kind for src in sources})
    record = provenance("convert", command, str(base) if base is not None else None, [(str(adapter), 1.0)])

    fits, notes = {}, [target.remark] if target.remark else []
    tasks = [functools.partial(_fit, target, src, ckpt, options) for src in sources]
    for src, fit in zip(sources, tqdm(run_ordered(tasks, workers), total=len(tasks), desc=f"convert to {to}",
                                      unit="module", disable=not progress, leave=False)):
        if not all(bool(torch.isfinite(t).all()) for t in fit.tensors.values()):
            raise InputError(f"{src.module}: the {target.method} tensors of this change are not finite (it exceeds "
                             "float32's range); check the adapter's scaling (lora_alpha, r)")
        notes += [f"{src.module}: {n}" for n in fit.notes]
        fits[src.module] = fit
    config = {**target.config(fits, options), **carried_config,
              "base_model_name_or_path": ad.config.base_model, "task_type": ad.config.raw.get("task_type")}
    tensors = {f"base_model.model.{m}.{name}": t for m, fit in fits.items() for name, t in fit.tensors.items()}
    reports: list[ModuleReport] = []

    def measured(folder: Path) -> None:
        """Refuse, before ``out`` exists, a written adapter whose change is not the source's."""
        reports.extend(_measure(folder, sources, ckpt, fits))
        broken = [r for r in reports if not math.isfinite(r.error)]
        if broken:
            raise UnsupportedError(f"{broken[0].module}: the written {target.method} adapter does not hold the "
                                   f"change (relative error {broken[0].error}); nothing was written")
        useless = [r for r in reports if r.error >= USELESS_ERROR]
        if useless and not force:
            worst = max(useless, key=lambda r: r.error)
            raise UnsupportedError(
                f"{target.method} cannot express the change of {len(useless)} of {len(reports)} module(s): relative "
                f"error >= {USELESS_ERROR} (worst {worst.module}: {worst.error:.3f}), no better than no adapter; pass "
                "--force to write it anyway")

    write_adapter(out, config, {**tensors, **carried}, overwrite=overwrite, inputs=inputs, record=record,
                  check=measured)
    return Conversion(out, ad.config.peft_type, to, target.method, target.size_name, reports, notes)
