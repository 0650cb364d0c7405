"""Combine adapters into one LoRA whose change is the weighted sum of theirs: ΔW = Σ wᵢ·ΔWᵢ.

PEFT's ``add_weighted_adapter(combination_type="linear")`` mixes the A and B factors separately,
which is not a sum of changes. Here LoRAs are concatenated, which is exact:
Σ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ … wₖsₖBₖ]·[A₁; …; Aₖ], with rank the sum of ranks and scaling 1. ``rank``
re-compresses each module to its best rank-R approximation through QR of the factors (the SVD of
the product without forming it). Other methods' changes are summed densely and truncated by SVD
to ``rank``; they are computed from the base (its shapes, and W where the change depends on it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import Adapter, load_adapter
from ..checkpoint import Checkpoint, check_output_path, open_checkpoint
from ..engine import plan
from ..errors import InputError, UnsupportedError
from ..hub_inputs import looks_like_repo_id
from ..methods import Patch, ReplacePatch
from ..methods.lora import LoraPatch
from .extract import LoraModule, RankRule, as_product, layer_kind, lora_adapter, truncated_svd, uses_conv1d
from ..model_card import provenance
from .peft_writer import write_adapter

AdapterSpec = str | Path | tuple[str | Path, float]
# LoraPatch kinds as the output names them.
_KINDS = {"linear": "linear", "conv1d_transposed": "conv1d", "embedding": "embedding", "conv": "conv"}


def adapter_with_weight(spec: str) -> tuple[str, float]:
    """``my-lora:0.5`` -> ``("my-lora", 0.5)``. Paths may contain ':', so what follows the last ':' is a weight
    only where the part before it is an existing path or a Hub repo id, and the whole is not a path; it must
    then be a finite number."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or Path(spec).exists() or not (Path(head).exists() or looks_like_repo_id(head)):
        return spec, 1.0
    return head, _weight(head, tail)


def weighted_specs(adapters: AdapterSpec | Sequence[AdapterSpec]) -> list[tuple[str | Path, float]]:
    """``adapter``, ``(adapter, weight)`` or a list of those -> ``[(adapter, weight), ...]`` (weight 1 by default)."""
    if isinstance(adapters, (str, Path)) or (isinstance(adapters, tuple) and len(adapters) == 2
                                             and isinstance(adapters[1], (int, float))):
        adapters = [adapters]
    out = [(a, 1.0) if isinstance(a, (str, Path)) else (a[0], _weight(a[0], a[1])) for a in adapters]
    if not out:
        raise InputError("no adapter given")
    return out


def _weight(spec: str | Path, weight: Any) -> float:
    """An adapter's weight: a finite number (a bool is no number here; text is parsed). ``weight`` is
    whatever the caller passed: ``float`` decides, and what it refuses is refused."""
    try:
        value = float(weight) if not isinstance(weight, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise InputError(f"{spec}: weight {weight!r} is not a finite number; give ADAPTER:WEIGHT with a number "
                         "such as 0.5")
    return value


@dataclass
class Contribution:
    adapter: Adapter
    patch: Patch
    weight: float
    tensors: dict[str, str] = field(default_factory=dict)  # role -> base tensor name (with a base only)

    @property
    def plain_lora(self) -> bool:
        return isinstance(self.patch, LoraPatch) and self.patch.role == "weight" and self.patch.factor == 1.0

    def where(self) -> str:
        return f"adapter {self.adapter.folder} ({self.adapter.config.peft_type}) at {self.patch.module}"

    @property
    def lora(self) -> LoraPatch:
        """The patch of a contribution the layout found ``plain_lora``."""
        assert isinstance(self.patch, LoraPatch), self.where()
        return self.patch


@dataclass
class ModuleSummary:
    module: str
    kind: str  # linear | conv1d | embedding | conv | full
    rank: int | None
    how: str  # concatenated | recompressed | svd of the summed change | copied (modules_to_save)
    rel_error: float = 0.0  # of the written change against the exact sum

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CombineResult:
    out: Path
    modules: list[ModuleSummary]
    notes: list[str] = field(default_factory=list)


def _contributions(adapters: list[tuple[Adapter, float]], base: Checkpoint | None) -> dict[str, list[Contribution]]:
    """Every adapter's patches by module: the adapters' own module names, or with a base the base's (each
    adapter mapped onto it and checked as a merge would be)."""
    by_module: dict[str, list[Contribution]] = {}
    for adapter, weight in adapters:
        if base is None:
            for patch in adapter.patches():
                by_module.setdefault(patch.module, []).append(Contribution(adapter, patch, weight))
            continue
        for module, job in plan(base, [(adapter, weight)]).jobs.items():
            for bound, _, roles in job.patches:
                by_module.setdefault(module, []).append(
                    Contribution(adapter, bound.patch, weight, {r: job.tensors[r] for r in roles}))
    return by_module


def _concatenate(parts: list[Contribution], kind: str) -> LoraModule:
    """[w₁s₁B₁ … wₖsₖBₖ]·[A₁; …; Aₖ]: exactly the weighted sum of the LoRAs' changes."""
    A = torch.cat([c.lora.A.to(torch.float32) for c in parts], 0)
    B = torch.cat([c.lora.B.to(torch.float32) * (c.weight * c.lora.scaling) for c in parts], 1)
    biases = [bias.to(torch.float32) * (c.weight * c.lora.scaling) for c in parts if (bias := c.lora.bias) is not None]
    return LoraModule(kind, A, B, torch.stack(biases).sum(0) if biases else None)


def recompress(lora: LoraModule, rank: int) -> tuple[LoraModule, float]:
    """The best rank-``rank`` LoRA of ``B·A`` (Eckart–Young) and its relative error, from QR of the factors:
    B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, so only the small K×K core is decomposed."""
    A, B = lora.A.flatten(1).double(), lora.B.flatten(1).double()
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(r_b @ r_a.T)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    new_b = (q_b @ (U[:, :r] * root)).to(torch.float32)
    new_a = ((root[:, None] * Vh[:r]) @ q_a.T).to(torch.float32)
    total = float((S ** 2).sum())
    error = math.sqrt(float((S[r:] ** 2).sum()) / total) if total > 0 else 0.0
    new_a = new_a.reshape(r, *lora.A.shape[1:])
    new_b = new_b.reshape(lora.B.shape[0], r, *lora.B.shape[2:])
    return LoraModule(lora.kind, new_a, new_b, lora.bias), error


def _check_dense(c: Contribution, base: Checkpoint | None) -> None:
    """What a change summed densely needs: a change of the weight alone, and a base to compute it on."""
    extra = sorted(set(c.patch.roles) - {"weight"})
    if extra:
        raise UnsupportedError(f"{c.where()}: changes {', '.join(extra)} besides the weight, which a LoRA cannot hold")
    if base is None:
        raise InputError(f"{c.where()}: not a plain LoRA; its change is computed from the base (the layer's shape, and "
                         "for some methods its weight); pass --base")


def _dense_change(c: Contribution, base: Checkpoint | None) -> torch.Tensor:
    """One contribution's weighted change of the module's ``weight``, in the base's layout."""
    if c.plain_lora:
        return c.lora.weight_delta().mul_(c.weight)
    assert base is not None, "_check_dense refused a dense change without a base"
    W = base.read(c.tensors["weight"]).to(torch.float32)
    return c.patch.merge({"weight": W.clone()}, c.weight)["weight"].sub_(W)


def _module_kind(module: str, parts: list[Contribution], conv1d: bool) -> str:
    kinds = {_KINDS[c.patch.kind] for c in parts if isinstance(c.patch, LoraPatch)}
    if len(kinds) > 1:
        raise InputError(f"{module}: the adapters see it as different layer kinds ({', '.join(sorted(kinds))}); "
                         "were they trained on different models?")
    return kinds.pop() if kinds else layer_kind(module, conv1d)


def _check_whole(module: str, parts: list[Contribution]) -> None:
    """Replacements (modules_to_save) pass through unchanged, where that is still the weighted sum."""
    sources = {c.adapter.folder for c in parts}
    weights = {c.weight for c in parts}
    if len(sources) > 1 or weights != {1.0} or not all(isinstance(c.patch, ReplacePatch) for c in parts):
        raise UnsupportedError(
            f"{module}: {parts[0].where()} replaces tensors outright (modules_to_save, saved biases), which cannot be "
            "summed with other changes or weighted; combine adapters that do not touch it, or with weight 1")


def _is_base_copy(c: Contribution) -> bool:
    """A saved copy of the frozen base tensor (a targeted embedding's base_layer): no change at all."""
    return isinstance(c.patch, ReplacePatch) and c.patch.original is not None and \
        torch.equal(c.patch.tensor, c.patch.original)


@dataclass
class _Module:
    """One module of the combination, as decided from the adapters' configs and shapes before any work."""

    module: str
    parts: list[Contribution]
    kind: str  # linear | conv1d | embedding | conv | full
    how: str  # concatenated | svd of the summed change | copied (modules_to_save)


def _layout(by_module: dict[str, list[Contribution]], rank: int | None, base: Checkpoint | None,
            conv1d: bool) -> list[_Module]:
    """What becomes of every module, with everything that can be refused refused before any computation."""
    layout = []
    for module, parts in by_module.items():
        parts = [c for c in parts if not _is_base_copy(c)]
        if not parts:
            continue
        if any(isinstance(c.patch, ReplacePatch) for c in parts):
            _check_whole(module, parts)
            layout.append(_Module(module, parts, "full", "copied (modules_to_save)"))
            continue
        kind = _module_kind(module, parts, conv1d)
        if all(c.plain_lora for c in parts):
            layout.append(_Module(module, parts, kind, "concatenated"))
            continue
        other = next(c for c in parts if not c.plain_lora)
        if rank is None:
            raise InputError(f"{other.where()}: not a plain LoRA, so its change is re-compressed by SVD; give --rank")
        if kind == "conv":
            raise UnsupportedError(f"{module}: summing a convolution's dense changes is not supported")
        for c in parts:
            if not c.plain_lora:
                _check_dense(c, base)
        layout.append(_Module(module, parts, kind, "svd of the summed change"))
    if not any(m.kind != "full" for m in layout):
        raise UnsupportedError("no module is left for the LoRA itself (every change replaces tensors outright); "
                               "PEFT cannot load a LoRA without target modules")
    return layout


def combine(out: str | Path, adapters: AdapterSpec | Sequence[AdapterSpec], *, rank: int | None = None,
            base: str | Path | None = None, overwrite: bool = False, progress: bool = True,
            command: str | None = None) -> CombineResult:
    """Write one PEFT LoRA adapter whose change is Σ wᵢ·ΔWᵢ of ``adapters`` (paths, repo ids or
    ``(adapter, weight)`` pairs) to the new folder ``out``.

    LoRAs are concatenated (exact; rank = sum of ranks), then re-compressed to ``rank`` if given.
    Other methods' changes are computed on ``base`` (required then), summed densely and truncated by SVD
    to ``rank`` (required too). ``base`` also maps differently named modules onto the base's names.
    Everything the configs and headers tell is checked before any change is computed. ``command``: the
    command line to record in the adapter's provenance (paths cut to their names).
    """
    if rank is not None and rank < 1:
        raise InputError(f"--rank must be at least 1, not {rank}")
    specs = weighted_specs(adapters)
    loaded = [(load_adapter(spec), w) for spec, w in specs]
    ckpt = open_checkpoint(base) if base is not None else None
    _check_lora_bias(loaded)
    inputs = [a.folder for a, _ in loaded] + ([ckpt.folder, *ckpt.shards] if ckpt else [])
    check_output_path(Path(out), inputs, overwrite)
    conv1d = uses_conv1d(ckpt) if ckpt else any(a.config.get("fan_in_fan_out", False) for a, _ in loaded)
    layout = _layout(_contributions(loaded, ckpt), rank, ckpt, conv1d)
    record = provenance("combine", command, str(base) if base is not None else None,
                        [(str(spec), w) for spec, w in specs])
    loras: dict[str, LoraModule] = {}
    full: dict[str, dict[str, torch.Tensor]] = {}
    summaries: list[ModuleSummary] = []
    notes: list[str] = []
    for m in tqdm(layout, desc="combine", unit="module", disable=not progress, leave=False):
        if m.kind == "full":
            full[m.module] = {c.patch.role: c.patch.tensor for c in m.parts}
            summaries.append(ModuleSummary(m.module, "full", None, m.how))
            continue
        how, error = m.how, 0.0
        if how == "concatenated":
            lora = _concatenate(m.parts, m.kind)
            if rank is not None and rank < lora.rank:
                lora, error = recompress(lora, rank)
                how = "recompressed"
        else:
            delta = torch.stack([_dense_change(c, ckpt) for c in m.parts]).sum(0)
            _check_finite(m, {"change": delta})
            f = truncated_svd(as_product(delta, m.kind).contiguous(), RankRule(rank=rank), svd="exact")
            lora, error = LoraModule(m.kind, f.A.contiguous(), f.B.contiguous()), f.rel_error
        _check_finite(m, {"A": lora.A, "B": lora.B, "bias": lora.bias})
        loras[m.module] = lora
        summaries.append(ModuleSummary(m.module, m.kind, lora.rank, how, error))
    if rank is not None and loras and all(s.how == "concatenated" for s in summaries if s.kind != "full"):
        notes.append(f"every module's summed rank is at most {rank}: concatenated without re-compression (exact)")
    config, tensors = lora_adapter(loras, full, base_model=_base_name(loaded, base),
                                   all_modules={n.rpartition(".")[0] for n in ckpt.tensors} if ckpt else None)
    write_adapter(out, config, tensors, overwrite=overwrite, inputs=inputs, record=record)
    return CombineResult(Path(out), summaries, notes)


def _check_finite(m: _Module, tensors: dict[str, torch.Tensor | None]) -> None:
    """A combined LoRA must hold numbers: inf or NaN in an adapter, or a sum beyond float32, is refused."""
    bad = [name for name, t in tensors.items() if t is not None and not bool(torch.isfinite(t).all())]
    if bad:
        sources = ", ".join(dict.fromkeys(f"{c.adapter.folder} (weight {c.weight})" for c in m.parts))
        raise InputError(f"{m.module}: the combined change is not finite (inf or NaN in its {'/'.join(bad)}) from "
                         f"{sources}; check those adapters' tensors, scaling and weights")


def _check_lora_bias(adapters: list[tuple[Adapter, float]]) -> None:
    """``lora_bias`` is one switch for the whole adapter: a mix would put a bias on layers that may have none."""
    flags = {bool(a.config.get("lora_bias", False)) for a, _ in adapters}
    if len(flags) > 1:
        raise UnsupportedError("some adapters have lora_bias and some do not; PEFT's lora_bias applies to every "
                               "layer of an adapter, so they cannot be combined into one")


def _base_name(adapters: list[tuple[Adapter, float]], base: str | Path | None) -> str | None:
    return str(base) if base is not None else adapters[0][0].config.base_model
