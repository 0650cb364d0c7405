"""Combine adapters into one LoRA, by default one whose change is the weighted sum of theirs: ΔW = Σ wᵢ·ΔWᵢ.

``cat`` (the default) concatenates the LoRAs, which is exact:
Σ wᵢ·sᵢ·Bᵢ·Aᵢ = [B₁ … Bₖ]·[w₁s₁A₁; …; wₖsₖAₖ], with rank the sum of ranks and scaling 1 (PEFT's ``cat``
puts the weights on A too). ``rank`` re-compresses each module to its best rank-R approximation through QR
of the factors (the SVD of the product without forming it). Other methods' changes are summed densely
and truncated by SVD to ``rank``; they are computed from the base (its shapes, and W where the change
depends on it).

Every other ``combination_type`` of PEFT's ``add_weighted_adapter`` is reproduced as PEFT computes it
(:mod:`.combine_methods`), streaming one module at a time in PEFT's module order. Its non-SVD variants
(``linear``, ``ties``, ``dare_*``, ``magnitude_prune``) merge the A and the B factors separately, which is
not a sum of changes.
"""

from __future__ import annotations

import math
import re
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
from .combine_methods import METHODS, REPLAYED_INITS, MergeOptions, check_options, factor_weights, merge_tensors, \
    replay_peft_init, svd_factors
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
    how: str  # concatenated | recompressed | svd of the summed change | copied (modules_to_save) | a PEFT method
    rel_error: float | None = 0.0  # of the written change against the merged one (None: not an approximation)

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
    """[B₁ … Bₖ]·[w₁s₁A₁; …; wₖsₖAₖ]: exactly the weighted sum of the LoRAs' changes, with the
    weights on A as PEFT's ``cat`` puts them (the same factors where every adapter targets the module)."""
    A = torch.cat([c.lora.A.to(torch.float32) * c.weight * c.lora.scaling for c in parts], 0)
    B = torch.cat([c.lora.B.to(torch.float32) for c in parts], 1)
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
            base: str | Path | None = None, method: str = "cat", density: float | None = None,
            majority_sign_method: str = "total", seed: int | None = None, svd_clamp: float | None = None,
            svd_full_matrices: bool = True, svd_driver: str | None = None,
            module_order: str | Path | Sequence[str] | None = None, overwrite: bool = False,
            progress: bool = True, command: str | None = None) -> CombineResult:
    """Write one PEFT LoRA adapter combining ``adapters`` (paths, repo ids or ``(adapter, weight)`` pairs)
    to the new folder ``out``.

    ``method="cat"``: the change is Σ wᵢ·ΔWᵢ. LoRAs are concatenated (exact; rank = sum of ranks), then
    re-compressed to ``rank`` if given. Other methods' changes are computed on ``base`` (required then),
    summed densely and truncated by SVD to ``rank`` (required too). ``base`` also maps differently named
    modules onto the base's names.

    Any other ``method`` is that ``combination_type`` of PEFT's ``add_weighted_adapter`` (LoRAs only), with
    ``density``, ``majority_sign_method``, ``svd_clamp``, ``svd_full_matrices`` and ``rank`` as ``svd_rank``;
    the non-SVD ones merge A and B separately, which is not a sum of changes. DARE's masks are PEFT's under
    ``torch.manual_seed(seed)`` when the modules come in the model's order: ``module_order`` (a file of
    module names, one a line, or a list: the model's ``named_modules()``), else by name with layer numbers
    compared as numbers (a note says so). Everything the configs and headers tell is checked before any
    change is computed. ``command``: the command line to record in the adapter's provenance.
    """
    if rank is not None and rank < 1:
        raise InputError(f"--rank must be at least 1, not {rank}")
    options = check_options(method, density=density, majority_sign_method=majority_sign_method, seed=seed,
                            svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver,
                            rank=rank)
    if module_order is not None and not options.method.random:
        raise InputError(f"--module-order sets the order of DARE's random draws; {method} draws nothing")
    specs = weighted_specs(adapters)
    loaded = [(load_adapter(spec), w) for spec, w in specs]
    ckpt = open_checkpoint(base) if base is not None else None
    _check_lora_bias(loaded)
    inputs = [a.folder for a, _ in loaded] + ([ckpt.folder, *ckpt.shards] if ckpt else [])
    check_output_path(Path(out), inputs, overwrite)
    conv1d = uses_conv1d(ckpt) if ckpt else any(a.config.get("fan_in_fan_out", False) for a, _ in loaded)
    by_module = _contributions(loaded, ckpt)
    record = provenance("combine", command, str(base) if base is not None else None,
                        [(str(spec), w) for spec, w in specs])
    if method != "cat":
        peft = _PeftCombination(loaded, options, rank, by_module, conv1d, module_order)
        combined, done, said = peft.run(progress)
        peft_config, peft_tensors = lora_adapter(combined, {}, base_model=_base_name(loaded, base))
        peft_config.update(r=peft.new_rank, lora_alpha=peft.new_rank, target_modules=peft.target_modules,
                           use_rslora=peft.use_rslora, rank_pattern={}, alpha_pattern={}, **peft.restrictions)
        write_adapter(out, peft_config, peft_tensors, overwrite=overwrite, inputs=inputs, record=record)
        return CombineResult(Path(out), done, said)
    layout = _layout(by_module, rank, ckpt, conv1d)
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


def _natural_key(name: str) -> list[Any]:
    """``layers.2`` before ``layers.10``: numbers compared as numbers."""
    return [(1, int(part), "") if part.isdigit() else (0, 0, part) for part in re.split(r"(\d+)", name)]


def _config_rank(adapter: Adapter) -> int:
    """PEFT's rank of an adapter for ``add_weighted_adapter``: ``r``, or the largest of ``rank_pattern``."""
    r = int(adapter.config.get("r", 8))
    pattern = adapter.config.get("rank_pattern") or {}
    return max(r, *map(int, pattern.values())) if pattern else r


class _PeftCombination:
    """One ``add_weighted_adapter`` call, checked as a whole before any module is computed, then run one
    module at a time in PEFT's module order (the order DARE's masks are drawn in)."""

    def __init__(self, loaded: list[tuple[Adapter, float]], options: MergeOptions, rank: int | None,
                 by_module: dict[str, list[Contribution]], conv1d: bool,
                 module_order: str | Path | Sequence[str] | None) -> None:
        self.notes: list[str] = []
        m = options.method
        if len(loaded) == 1 and m.name != "linear":  # as PEFT does: a single adapter can only be scaled
            self.notes.append(f"one adapter: PEFT combines it as 'linear', whatever the method ({m.name})")
            options = MergeOptions(METHODS["linear"], None, "total", None, None, True)
        self.options = options
        for adapter, _ in loaded:
            _check_peft_lora(adapter, options.method.name)
        ranks = [_config_rank(a) for a, _ in loaded]
        if options.method.svd:
            self.new_rank = rank or max(ranks)
        elif len(set(ranks)) > 1:
            got = ", ".join(f"{a.folder.name}: r={r}" for (a, _), r in zip(loaded, ranks))
            raise InputError(f"--method {options.method.name} merges the A and B factors, so every adapter needs the "
                             f"same rank; got {got}; use an SVD method (e.g. ties_svd) or cat")
        else:
            self.new_rank = ranks[0]
        self.target_modules = _peft_target_modules([a for a, _ in loaded])
        self.restrictions = _layer_restrictions([a for a, _ in loaded])
        self.use_rslora = bool(loaded[0][0].config.get("use_rslora", False))
        if self.use_rslora:
            self.notes.append("the first adapter uses rsLoRA, so the combined one does too (PEFT copies its config): "
                              f"scaling lora_alpha/√r = √{self.new_rank}")
        self.modules = self._check_modules(by_module, conv1d)
        self.init_lora_weights = loaded[0][0].config.get("init_lora_weights", True)
        if options.method.random and self.init_lora_weights not in REPLAYED_INITS:
            raise UnsupportedError(f"the first adapter has init_lora_weights={self.init_lora_weights!r}: PEFT "
                                   "initialises the combined adapter with it, drawing from the generator before "
                                   "DARE's masks, which wsurgery replays only for True, False and 'gaussian'; put "
                                   "another adapter first")
        self.order = _module_order(list(self.modules), module_order)
        if options.method.random and module_order is None and options.density != 1 and len(self.order) > 1:
            self.notes.append("DARE's masks drawn module by module in name order (layer numbers as numbers); PEFT "
                              "draws them in the model's module order, which no file records: pass --module-order "
                              "(the model's named_modules(), one a line) for PEFT's masks exactly")

    def _check_modules(self, by_module: dict[str, list[Contribution]], conv1d: bool) -> dict[str, _Module]:
        method = self.options.method
        modules: dict[str, _Module] = {}
        for module, parts in by_module.items():
            parts = [c for c in parts if not _is_base_copy(c)]
            if not parts:
                continue
            for c in parts:
                if isinstance(c.patch, ReplacePatch):
                    raise UnsupportedError(f"{c.where()}: modules_to_save or a saved bias; PEFT's add_weighted_adapter "
                                           "does not carry those over; combine with --method cat")
                if not c.plain_lora:
                    raise UnsupportedError(f"{c.where()}: not a plain LoRA layer, which --method {method.name} "
                                           "(PEFT's add_weighted_adapter) requires; use --method cat")
                if not method.svd and c.lora.rank != self.new_rank:
                    raise InputError(f"{c.where()}: rank {c.lora.rank}, not the adapters' common {self.new_rank}; "
                                     f"--method {method.name} merges A and B factors of equal ranks")
            kind = _module_kind(module, parts, conv1d)
            if (method.svd or method.random) and kind == "conv":
                raise UnsupportedError(f"{module}: convolution layers are not supported by --method {method.name}")
            modules[module] = _Module(module, parts, kind, method.name)
        if not modules:
            raise UnsupportedError("no LoRA module to combine")
        return modules

    def run(self, progress: bool) -> tuple[dict[str, LoraModule], list[ModuleSummary], list[str]]:
        o = self.options
        generator = torch.Generator().manual_seed(o.seed if o.seed is not None else 0) if o.method.random else None
        if o.method.random and o.seed is None:
            self.notes.append("no --seed: DARE's masks drawn with seed 0")
        if generator is not None:  # add_weighted_adapter first injects the new adapter, drawing its init
            for name in self.order:
                A, B = self.modules[name].parts[0].lora.A, self.modules[name].parts[0].lora.B
                replay_peft_init(generator, self.modules[name].kind, A.shape[1], B.shape[0], self.new_rank,
                                 self.init_lora_weights)
        loras: dict[str, LoraModule] = {}
        summaries: list[ModuleSummary] = []
        for name in tqdm(self.order, desc="combine", unit="module", disable=not progress, leave=False):
            m = self.modules[name]
            lora, error = self._module(m, generator)
            _check_finite(m, {"A": lora.A, "B": lora.B})
            loras[name] = lora
            summaries.append(ModuleSummary(name, m.kind, lora.rank, m.how, error))
        return loras, summaries, self.notes

    def _module(self, m: _Module, generator: torch.Generator | None) -> tuple[LoraModule, float | None]:
        """``_generalized_task_arithmetic_weighted_adapter`` (A's, then B's) or
        ``_svd_generalized_task_arithmetic_weighted_adapter`` (the changes, then SVD) for one module."""
        o = self.options
        merge = o.method.merge
        if not o.method.svd:
            wa, wb = factor_weights([c.weight for c in m.parts], [c.lora.scaling for c in m.parts])
            A = merge_tensors(merge, [c.lora.A.to(torch.float32) for c in m.parts], wa, o.density,
                              o.majority_sign_method, generator)
            B = merge_tensors(merge, [c.lora.B.to(torch.float32) for c in m.parts], wb, o.density,
                              o.majority_sign_method, generator)
            return LoraModule(m.kind, A, B), None
        # weight_delta is get_delta_weight: s·B·A, transposed for Conv1D and embeddings, as PEFT lays it out
        deltas = [c.lora.weight_delta() for c in m.parts]
        delta = merge_tensors(merge, deltas, torch.tensor([c.weight for c in m.parts]), o.density,
                              o.majority_sign_method, generator)
        _check_finite(m, {"change": delta})
        if m.kind in ("embedding", "conv1d"):
            delta = delta.T
        A, B = svd_factors(delta, self.new_rank, o.svd_clamp, o.svd_full_matrices, m.module)
        total = float(torch.linalg.vector_norm(delta))
        error = float(torch.linalg.vector_norm((B @ A).sub_(delta)))
        return LoraModule(m.kind, A, B), error / total if total > 0 else 0.0


def _check_peft_lora(adapter: Adapter, method: str) -> None:
    """What PEFT's ``add_weighted_adapter`` defines: plain LoRA adapters (LoraModel's method)."""
    config = adapter.config
    if config.peft_type != "LORA":
        raise UnsupportedError(f"adapter {adapter.folder} is {config.peft_type}: --method {method} is PEFT's "
                               "add_weighted_adapter, which only LoRA defines; use --method cat")
    for flag, what in (("use_dora", "DoRA's magnitude"), ("lora_bias", "lora_B.bias"),
                       ("target_parameters", "targeted parameters")):
        if config.get(flag):
            raise UnsupportedError(f"adapter {adapter.folder} has {flag}: PEFT's add_weighted_adapter does not "
                                   f"combine {what}; use --method cat")


def _peft_target_modules(adapters: list[Adapter]) -> str | list[str]:
    """PEFT's ``target_modules`` of the combined adapter: the union of the lists, or the regexes joined."""
    targets = [a.config.get("target_modules") for a in adapters]
    if any(t is None for t in targets):
        raise InputError(f"adapter {adapters[targets.index(None)].folder} has no target_modules in its config, which "
                         "PEFT's add_weighted_adapter needs; use --method cat")
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if all(isinstance(t, list) for t in targets):
        return sorted(set().union(*targets))
    raise InputError("the adapters' target_modules mix a regex string and lists "
                     f"({', '.join(f'{a.folder.name}: {type(t).__name__}' for a, t in zip(adapters, targets))}), "
                     "which PEFT's add_weighted_adapter refuses; use --method cat")


_RESTRICTIONS = ("layers_to_transform", "layers_pattern", "exclude_modules")


def _layer_restrictions(adapters: list[Adapter]) -> dict[str, Any]:
    """The first adapter's ``layers_to_transform``/``layers_pattern``/``exclude_modules``, which PEFT copies
    to the combined adapter (restricting where it goes): refused where the adapters' differ, since PEFT
    would then leave out layers that some adapter changes."""
    first = {k: adapters[0].config.get(k) for k in _RESTRICTIONS}
    for a in adapters[1:]:
        other = {k: a.config.get(k) for k in _RESTRICTIONS}
        if other != first:
            key = next(k for k in _RESTRICTIONS if other[k] != first[k])
            raise UnsupportedError(f"adapters {adapters[0].folder.name} and {a.folder.name} differ in {key} "
                                   f"({first[key]!r} vs {other[key]!r}); PEFT's add_weighted_adapter applies the "
                                   "first's to the combined adapter; use --method cat")
    return {k: v for k, v in first.items() if v is not None}


def _module_order(modules: list[str], module_order: str | Path | Sequence[str] | None) -> list[str]:
    """The modules in the model's order (``module_order``: its ``named_modules()`` names, from a file or a list,
    of the model or of a PeftModel; names not combined here are skipped), or by name with numbers compared as
    numbers."""
    if module_order is None:
        return sorted(modules, key=_natural_key)
    if isinstance(module_order, (str, Path)):
        path = Path(module_order)
        try:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--module-order {path}: cannot read it ({e}); give a text file of module names, "
                             "one a line") from None
    else:
        names = list(module_order)
    wanted = set(modules)
    names = [n.removeprefix("base_model.model.") for n in names]  # names taken from a PeftModel
    order = list(dict.fromkeys(n for n in names if n in wanted))
    missing = [m for m in modules if m not in set(order)]
    if missing:
        raise InputError(f"--module-order does not list {len(missing)} combined module(s), e.g. {missing[0]}; list "
                         "the model's named_modules() names, one a line")
    return order


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
