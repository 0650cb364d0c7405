"""Extract a PEFT LoRA from a fine-tune: per module, TUNED − BASE, truncated SVD, written as an adapter.

By Eckart–Young the rank-r truncated SVD is the best rank-r approximation of the difference in
Frobenius norm, so the extracted LoRA is as close to the fine-tune as any LoRA of its ranks can be.
Each module's factors are split evenly (``B = U·√S``, ``A = √S·Vh``) with ``lora_alpha = r`` so PEFT's
scaling is 1. The two checkpoints are streamed one module at a time; only the adapter is kept.

What cannot be a LoRA goes to ``modules_to_save`` (the tuned tensors, exact): changed tensors that
are not a 2-D weight (norms, biases without a LoRA, ...), resized embeddings, and weights whose LoRA
would not be smaller than the weight itself. Changed biases of LoRA modules become ``lora_B.bias``
(``lora_bias``) where PEFT allows that, else their modules go to ``modules_to_save`` too, whichever
keeps the adapter smaller.
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import conventions
from ..checkpoint import Checkpoint, check_output_path, open_checkpoint
from ..conventions import CONV1D_LAYERS, is_embedding, is_output_head, last_name
from ..errors import InputError, UnsupportedError
from ..model_card import provenance
from ..workers import run_ordered
from .peft_writer import write_adapter

# Randomized SVD (``--rank`` only): q = rank + oversampling columns, power iterations.
_MIN_OVERSAMPLING, _POWER_ITERATIONS = 10, 4


def layer_kind(module: str, conv1d: bool) -> str:
    """How PEFT wraps the layer that owns ``module.weight``: ``embedding``, ``conv1d`` or ``linear``.

    Checkpoints do not record layer classes, so this follows transformers' names: embeddings by name,
    Conv1D (``conv1d``: the model type is one of GPT-2's family) for GPT-2's c_attn/c_proj/c_fc.
    """
    if is_embedding(module):
        return "embedding"
    return "conv1d" if conv1d and last_name(module) in CONV1D_LAYERS else "linear"


def uses_conv1d(ckpt: Checkpoint) -> bool:
    return conventions.uses_conv1d(ckpt.config)


def as_product(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The matrix PEFT writes as ``B @ A`` for a change of ``weight`` (stored transposed for Conv1D and
    embeddings: PEFT's embedding LoRA is ``lora_embedding_A`` (r, V), ``lora_embedding_B`` (d, r))."""
    return weight.T if kind in ("embedding", "conv1d") else weight


# -- choosing the rank -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankRule:
    """Exactly one of: a fixed rank, a kept-energy fraction, or a largest relative error."""

    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None

    def __post_init__(self) -> None:
        given = ["--" + n.replace("_", "-") for n in ("rank", "energy", "max_error") if getattr(self, n) is not None]
        if len(given) != 1:
            raise InputError("give exactly one of --rank, --energy and --max-error "
                             f"({' and '.join(given) or 'none'} given)")
        if self.rank is not None and self.rank < 1:
            raise InputError(f"--rank must be at least 1, not {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise InputError(f"--energy is the fraction of ||ΔW||² to keep, in (0, 1], not {self.energy}")
        if self.max_error is not None and not 0 <= self.max_error < 1:
            raise InputError(f"--max-error is a relative Frobenius error in [0, 1), not {self.max_error}")

    @property
    def fixed(self) -> bool:
        return self.rank is not None

    def choose(self, singular_values: torch.Tensor, total: float) -> int:
        """The rank this rule asks for, given the spectrum and ||ΔW||_F² (Eckart–Young: the rank-r error²
        is the sum of the squared singular values after the r-th)."""
        if self.rank is not None:
            return min(self.rank, singular_values.numel())
        kept = torch.cumsum(singular_values.double() ** 2, 0)
        if self.energy is not None:
            wanted = total * self.energy
        else:
            assert self.max_error is not None, "__post_init__ requires exactly one rule"
            wanted = total * (1 - self.max_error ** 2)
        return min(int(torch.searchsorted(kept, torch.tensor([wanted], dtype=torch.float64) * (1 - 1e-12))) + 1,
                   singular_values.numel())

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        return f"energy {self.energy}" if self.energy is not None else f"max error {self.max_error}"


# -- the factorisation -------------------------------------------------------------------------------

@dataclass
class Factorization:
    B: torch.Tensor  # (out, r), float32, CPU
    A: torch.Tensor  # (r, in)
    singular_values: torch.Tensor  # every one computed (all of them for the exact SVD), CPU
    norm: float  # ||M||_F
    rel_error: float  # ||M − B·A||_F / ||M||_F, measured
    energy: float  # Σ_{i<r} σ_i² / ||M||_F²
    method: str  # "exact" or "randomized"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r}: expected auto, cpu or cuda") from None


def _randomized(rule: RankRule, svd: str, shape: tuple[int, int]) -> int | None:
    """The sketch size where the SVD is randomized, else None. Randomized SVD only for a fixed rank (the
    rank-choosing rules need the whole spectrum); under ``auto`` only where the matrix is at least 4x
    wider than the sketch, else exact is as cheap."""
    if svd == "exact" or rule.rank is None:
        return None
    sketch = _sketch(rule.rank, shape)
    return sketch if svd == "randomized" or 4 * sketch <= min(shape) else None


_GLOBAL_RNG = threading.Lock()


def _sketch(rank: int, shape: tuple[int, int]) -> int:
    return min(rank + max(rank, _MIN_OVERSAMPLING), min(shape))


def truncated_svd(M: torch.Tensor, rule: RankRule, *, svd: str = "auto", device: torch.device | None = None
                  ) -> Factorization:
    """Best rank-r factors of the float32 matrix ``M`` (on the CPU, ``M`` is overwritten by the residual)."""
    device = device or M.device
    total = float(torch.linalg.vector_norm(M, dtype=torch.float64) ** 2)
    work = M.to(device)
    rows, cols = M.shape
    sketch = _randomized(rule, svd, (rows, cols))
    if sketch is not None:
        # torch's generator is global: one randomized SVD at a time, so each draws the same numbers.
        with _GLOBAL_RNG, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)  # the same factors every run
            U, S, V = torch.svd_lowrank(work, q=sketch, niter=_POWER_ITERATIONS)
        Vh, method = V.T, "randomized"
    else:
        # cuSOLVER's float32 SVD is less accurate than LAPACK's (1e-5 off in the tests); float64 costs little there.
        U, S, Vh = torch.linalg.svd(work.double() if device.type == "cuda" else work, full_matrices=False)
        U, S, Vh, method = U.to(work.dtype), S.to(work.dtype), Vh.to(work.dtype), "exact"
    S_cpu = S.cpu()
    r = rule.choose(S_cpu, total)
    root = S[:r].sqrt()
    B, A = U[:, :r] * root, root[:, None] * Vh[:r]
    residual = work.addmm_(B, A, alpha=-1)
    error = float(torch.linalg.vector_norm(residual, dtype=torch.float64) ** 2)
    energy = float((S_cpu[:r].double() ** 2).sum()) / total
    return Factorization(B.cpu(), A.cpu(), S_cpu, math.sqrt(total), math.sqrt(error / total), min(energy, 1.0),
                         method)


# -- writing a LoRA adapter --------------------------------------------------------------------------

@dataclass
class LoraModule:
    """One module's LoRA in PEFT's layout: ΔW = B·A (transposed back for Conv1D and embeddings), scaling 1."""

    kind: str  # linear | conv1d | embedding | conv
    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None  # the bias change (lora_B.bias)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def num_parameters(self) -> int:
        return self.A.numel() + self.B.numel() + (self.bias.numel() if self.bias is not None else 0)


def target_modules(lora: list[str], all_modules: set[str]) -> list[str]:
    """PEFT's ``target_modules`` for exactly the ``lora`` modules: a short name (``q_proj``) where it picks
    out just those among ``all_modules``, the full path elsewhere."""
    by_last: dict[str, list[str]] = {}
    for m in lora:
        by_last.setdefault(m.rpartition(".")[2], []).append(m)
    out: list[str] = []
    for last, mods in by_last.items():
        same_name = {m for m in all_modules if m == last or m.endswith("." + last)}
        out.extend([last] if same_name == set(mods) else mods)
    return sorted(out)


def lora_adapter(loras: dict[str, LoraModule], full: dict[str, dict[str, torch.Tensor]], *, base_model: str | None,
                 all_modules: set[str] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors (PEFT's saved key names) of a LoRA adapter with the given modules.

    ``full`` are ``modules_to_save``: module -> {parameter: tensor}. Ranks that differ from the most
    common one go to ``rank_pattern`` with the same ``alpha_pattern`` (scaling 1 everywhere).
    """
    if not loras:
        raise UnsupportedError("no module is left for the LoRA itself; PEFT cannot load a LoRA without target "
                               "modules")
    ranks = Counter(m.rank for m in loras.values())
    r = ranks.most_common(1)[0][0]
    pattern = {re.escape(name): m.rank for name, m in loras.items() if m.rank != r}
    lora_bias = any(m.bias is not None for m in loras.values())
    tensors: dict[str, torch.Tensor] = {}
    for name, m in loras.items():
        prefix = f"base_model.model.{name}."
        if m.kind == "embedding":
            tensors[prefix + "lora_embedding_A"], tensors[prefix + "lora_embedding_B"] = m.A, m.B
        else:
            tensors[prefix + "lora_A.weight"], tensors[prefix + "lora_B.weight"] = m.A, m.B
            if lora_bias:
                tensors[prefix + "lora_B.bias"] = m.bias if m.bias is not None else torch.zeros(m.B.shape[0])
    for module, params in full.items():
        for param, t in params.items():
            tensors[f"base_model.model.{module}.{param}"] = t
    config = {
        "peft_type": "LORA", "base_model_name_or_path": base_model, "r": r, "lora_alpha": r,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": target_modules(list(loras), all_modules if all_modules is not None else set(loras)),
        "modules_to_save": sorted(full) or None, "fan_in_fan_out": any(m.kind == "conv1d" for m in loras.values()),
        "lora_bias": lora_bias, "bias": "none", "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True,
    }
    return config, tensors


# -- extraction --------------------------------------------------------------------------------------

@dataclass
class ModuleReport:
    """What became of one changed module."""

    module: str
    kind: str  # linear | conv1d | embedding, or "full" (modules_to_save)
    shape: tuple[int, ...]
    norm: float | None = None  # ||ΔW||_F
    rank: int | None = None
    rel_error: float = 0.0  # ||ΔW − B·A||_F / ||ΔW||_F
    energy: float = 1.0  # kept fraction of ||ΔW||_F²
    svd: str | None = None  # exact | randomized
    reason: str | None = None  # why a module is stored whole
    singular_values: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        keys = ("module", "kind", "shape", "norm", "rank", "rel_error", "energy", "svd", "reason")
        return {k: list(v) if k == "shape" else v for k in keys if (v := getattr(self, k)) is not None}


@dataclass
class ExtractResult:
    out: Path
    rule: str
    modules: list[ModuleReport]
    left_out: dict[str, str]  # changed tensors that are not in the adapter, with the reason
    notes: list[str]

    @property
    def lora(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.kind != "full"]

    @property
    def saved_whole(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.kind == "full"]

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "rule": self.rule, "modules": [m.to_dict() for m in self.modules],
                "left_out": self.left_out, "notes": self.notes}


def _direct_tensors(ckpt: Checkpoint) -> dict[str, list[str]]:
    """module -> its own tensor names (``model.norm`` -> [``model.norm.weight``]), in file order."""
    groups: dict[str, list[str]] = {}
    for name in ckpt.tensors:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    return groups


def _check_pair(base: Checkpoint, tuned: Checkpoint, base_path: Path, tuned_path: Path) -> None:
    """Both checkpoints must hold the same tensor names (dtypes may differ; shapes are checked per tensor)."""
    missing = [n for n in base.tensors if n not in tuned.tensors]
    extra = [n for n in tuned.tensors if n not in base.tensors]
    for names, problem in ((missing, f"lacks tensor(s) that {base_path} has"),
                           (extra, f"has tensor(s) that {base_path} lacks")):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise InputError(f"TUNED {tuned_path} {problem}: {shown}; are they the same architecture?")


def _difference(base: Checkpoint, tuned: Checkpoint, name: str) -> torch.Tensor | None:
    """TUNED − BASE in float32 (for integer tensors: TUNED itself, only ever stored whole), or None where the
    two are identical."""
    b, t = base.read(name), tuned.read(name)
    if b.dtype == t.dtype and torch.equal(b, t):
        return None
    if not (b.is_floating_point() and t.is_floating_point()):
        return t
    d = t.to(torch.float32).sub_(b.to(torch.float32))
    if not torch.isfinite(d).all():
        raise InputError(f"{name}: TUNED − BASE is not finite (inf or NaN in one of the checkpoints)")
    return d if d.any() else None


@dataclass
class _Plan:
    loras: dict[str, LoraModule] = field(default_factory=dict)
    full: dict[str, str] = field(default_factory=dict)  # module -> reason
    reports: dict[str, ModuleReport] = field(default_factory=dict)
    has_bias: set[str] = field(default_factory=set)  # LoRA modules whose base layer has a bias
    whole_size: dict[str, int] = field(default_factory=dict)  # LoRA module -> parameters if stored whole
    left_out: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def absorb(self, part: _Plan) -> None:
        """Add one module's findings (worked out on its own, maybe on another thread), in module order."""
        self.loras.update(part.loras)
        self.full.update(part.full)
        self.reports.update(part.reports)
        self.has_bias |= part.has_bias
        self.whole_size.update(part.whole_size)
        self.left_out.update(part.left_out)
        self.notes += part.notes


def _vocabulary_sized(module: str, rows: int, ckpt: Checkpoint) -> bool:
    """An embedding or output head, whose rows may grow with the vocabulary."""
    return layer_kind(module, False) == "embedding" or is_output_head(module) or \
        rows == (ckpt.config or {}).get("vocab_size")


def _resized(module: str, names: list[str], base: Checkpoint, tuned: Checkpoint) -> tuple[int, int] | None:
    """(rows in BASE, rows in TUNED) where the module is a resized embedding or output head, None where no
    shape differs; any other difference in shape is refused (from the headers alone)."""
    for name in names:
        b, t = base.tensors[name].shape, tuned.tensors[name].shape
        if b == t:
            continue
        if name == f"{module}.weight" and len(b) == len(t) == 2 and b[1] == t[1] and \
                _vocabulary_sized(module, b[0], base):
            return b[0], t[0]
        raise InputError(f"{name}: BASE has shape {list(b)} but TUNED has {list(t)}; only a resized embedding "
                         "or output head may change shape")
    return None


def _extract_module(module: str, names: list[str], base: Checkpoint, tuned: Checkpoint, rule: RankRule,
                    conv1d: bool, svd: str, device: torch.device, plan: _Plan) -> None:
    """Classify one module from its tensors' differences; factorise its weight where that is a LoRA."""
    weight, bias = f"{module}.weight", f"{module}.bias"
    resized = _resized(module, names, base, tuned)
    if resized is not None:
        rows, new_rows = resized
        plan.full[module] = f"resized from {rows} to {new_rows} rows"
        plan.notes.append(f"{module}: resized from {rows} to {new_rows} rows; PEFT needs "
                          f"model.resize_token_embeddings({new_rows}) on the base before loading the adapter")
        return
    changed: dict[str, torch.Tensor] = {}
    for name in names:
        d = _difference(base, tuned, name)
        if d is not None:
            changed[name] = d
    if not changed:
        return
    others = [n.rpartition(".")[2] for n in sorted(set(changed) - {weight, bias})]
    delta = changed.pop(weight, None)
    if delta is None:
        plan.full[module] = f"changed {', '.join(n.rpartition('.')[2] for n in sorted(changed))} but not its weight"
        return
    if delta.ndim != 2 or not delta.is_floating_point():
        what = f"{delta.ndim}-D" if delta.is_floating_point() else str(delta.dtype).removeprefix("torch.")
        plan.full[module] = f"its changed weight is {what}, not a matrix of numbers to factorise"
        return
    if others:
        plan.full[module] = f"changed {', '.join(others)} besides the weight"
        return
    kind = layer_kind(module, conv1d)
    M = as_product(delta, kind).contiguous()
    out_f, in_f = M.shape
    fits = (out_f * in_f - 1) // (out_f + in_f)  # the largest rank whose factors are smaller than the weight
    if rule.rank is not None and min(rule.rank, out_f, in_f) > fits:
        plan.full[module] = f"a rank-{rule.rank} LoRA of a {out_f}x{in_f} weight is no smaller than the weight"
        return
    f = truncated_svd(M, rule, svd=svd, device=device)
    if f.A.shape[0] > fits:
        plan.full[module] = (f"{rule.describe()} needs rank {f.A.shape[0]}, whose factors are no smaller than the "
                             f"{out_f}x{in_f} weight")
        return
    plan.loras[module] = LoraModule(kind, f.A.contiguous(), f.B.contiguous(), changed.get(bias))
    plan.whole_size[module] = sum(base.tensors[n].numel for n in names)
    if bias in base.tensors:
        plan.has_bias.add(module)
    plan.reports[module] = ModuleReport(module, kind, tuple(base.tensors[weight].shape), f.norm, f.A.shape[0],
                                        f.rel_error, f.energy, f.method, singular_values=f.singular_values)


def _settle_biases(plan: _Plan) -> None:
    """Changed biases of LoRA modules: ``lora_bias`` (PEFT: one switch for every LoRA layer, none may be an
    embedding or lack a bias) or their modules stored whole, whichever adapter is smaller."""
    with_bias = [m for m, lora in plan.loras.items() if lora.bias is not None]
    if not with_bias:
        return
    cannot = [m for m, lora in plan.loras.items() if lora.kind == "embedding" or m not in plan.has_bias]

    def growth(modules: list[str]) -> int:
        return sum(plan.whole_size[m] - plan.loras[m].num_parameters for m in modules)

    bias_cost = sum(plan.loras[m].B.shape[0] for m in plan.loras if m not in cannot)
    if cannot and growth(cannot) + bias_cost >= growth(with_bias):
        demote, reason = with_bias, "changed bias; lora_bias is impossible here (embeddings or bias-less layers " \
                                    "also get a LoRA), and storing the module costs less than storing those whole"
    else:
        demote, reason = cannot, "lora_bias carries the other modules' changed biases, and PEFT allows it only on " \
                                 "layers with a bias"
    for m in demote:
        plan.full[m] = reason
        del plan.loras[m]
        del plan.reports[m]


def _whole_modules(plan: _Plan, tuned: Checkpoint, groups: dict[str, list[str]]
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """The tuned tensors of every module stored whole. A module with tensors below it cannot be: PEFT's
    modules_to_save would wrap those children too (and refuse a LoRA inside)."""
    full: dict[str, dict[str, torch.Tensor]] = {}
    for module, reason in plan.full.items():
        inner = [m for m in groups if m.startswith(module + ".")] if module else ["every other module"]
        if inner:
            for name in groups[module]:
                plan.left_out[name] = (f"{reason}; PEFT's modules_to_save would wrap {module or 'the whole model'} "
                                       f"with {inner[0]} inside, so this change cannot go into the adapter")
            continue
        full[module] = {n.rpartition(".")[2]: tuned.read(n) for n in groups[module]}
        main = f"{module}.weight" if f"{module}.weight" in tuned.tensors else groups[module][0]
        plan.reports[module] = ModuleReport(module, "full", tuple(tuned.tensors[main].shape), reason=reason)
    return full


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UnsupportedError("--plot needs matplotlib, which is not installed: pip install 'wsurgery[plot]'"
                               ) from None
    return Figure


def check_plot_path(path: Path) -> None:
    """Refuse a ``--plot`` file that could not be written, before the work rather than after it."""
    figure = _figure_class()
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"--plot {path}: the folder {folder} does not exist; create it or choose another path")
    if path.is_dir():
        raise InputError(f"--plot {path}: is a folder; give a file name such as {path / 'spectra.png'}")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"--plot {path}: not writable here; choose a path in a folder you can write to")
    suffix = path.suffix.lstrip(".").lower()
    formats = figure().canvas.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise InputError(f"--plot {path}: matplotlib cannot write .{suffix} files; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")


def plot_spectra(result: ExtractResult, path: Path, count: int = 6) -> None:
    """Singular values (relative to the largest) and kept energy against rank, for ``count`` LoRA modules
    spread over the model, each with its chosen rank marked: to choose a rank by eye."""
    lora = [(m, m.singular_values) for m in result.lora if m.singular_values is not None and m.singular_values.numel()]
    if not lora:
        raise InputError(f"--plot {path}: no module became a LoRA, so there is no spectrum to draw")
    picked = [lora[i] for i in sorted({round(k * (len(lora) - 1) / max(count - 1, 1)) for k in range(count)})]
    fig = _figure_class()(figsize=(12, 4.5))
    spectrum, energy = fig.subplots(1, 2)
    for m, values in picked:
        assert m.norm is not None and m.rank is not None, f"{m.module}: a LoRA module has its norm and rank"
        s = values.double()
        index = range(1, s.numel() + 1)
        kept = torch.cumsum(s ** 2, 0) / m.norm ** 2
        (line,) = spectrum.semilogy(index, (s / s[0]).numpy(), label=f"{m.module} (r={m.rank})")
        spectrum.plot([m.rank], [float(s[m.rank - 1] / s[0])], "o", color=line.get_color())
        energy.plot(index, kept.numpy(), color=line.get_color())
        energy.plot([m.rank], [m.energy], "o", color=line.get_color())
    spectrum.set(xlabel="index", ylabel="σ_i / σ_1", title="singular values of TUNED − BASE")
    energy.set(xlabel="rank", ylabel="kept fraction of ||ΔW||²", title=f"kept energy ({result.rule})",
               ylim=(0, 1.01))
    spectrum.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _check_rank_fits(rule: RankRule, base: Checkpoint, targeted: list[str], groups: dict[str, list[str]]) -> None:
    """``--rank`` beyond every targeted weight's dimensions is a mistake; tell before reading any data."""
    dims = [min(base.tensors[f"{m}.weight"].shape) for m in targeted
            if f"{m}.weight" in groups[m] and len(base.tensors[f"{m}.weight"].shape) == 2]
    if rule.rank is not None and dims and rule.rank > max(dims):
        raise InputError(f"--rank {rule.rank} is larger than every targeted weight allows (the largest "
                         f"min(out, in) is {max(dims)}); choose a rank of at most {max(dims)}")


def extract(base: str | Path, tuned: str | Path, out: str | Path, *, rank: int | None = None,
            energy: float | None = None, max_error: float | None = None, targets: str | None = None,
            device: str = "auto", svd: str = "auto", overwrite: bool = False, progress: bool = True,
            plot: str | Path | None = None, command: str | None = None, workers: int | None = None) -> ExtractResult:
    """Write the PEFT LoRA that best approximates TUNED − BASE to the new adapter folder ``out``.

    Exactly one of ``rank`` (the same rank everywhere), ``energy`` (per module, the smallest rank that
    keeps this fraction of ||ΔW||_F²) and ``max_error`` (per module, the smallest rank whose relative
    Frobenius error is at most this) chooses the ranks. ``targets`` is a regex searched in module
    names; changed modules it does not match are left out (and listed). ``svd``: ``exact``
    (torch.linalg.svd), ``randomized`` (torch.svd_lowrank, fixed rank only) or ``auto`` (randomized
    for a fixed rank on large matrices, exact otherwise). ``plot`` draws a few modules' spectra.
    ``command``: the command line to record in the adapter's provenance (paths cut to their names).
    ``workers``: threads factorising different modules at once (default one per core); the adapter is the
    same bytes whatever the number.
    """
    rule = RankRule(rank, energy, max_error)
    if svd not in ("auto", "exact", "randomized"):
        raise InputError(f"--svd {svd!r}: expected auto, exact or randomized")
    if svd == "randomized" and not rule.fixed:
        raise InputError("--svd randomized needs --rank: --energy and --max-error choose the rank from the whole "
                         "spectrum, which only the exact SVD gives")
    try:
        pattern = re.compile(targets) if targets else None
    except re.error as e:
        raise InputError(f"--targets {targets!r} is not a valid regular expression: {e}") from None
    if plot is not None:
        check_plot_path(Path(plot))
    dev = resolve_device(device)
    base_path, tuned_path, out = Path(base), Path(tuned), Path(out)
    base_ckpt, tuned_ckpt = open_checkpoint(base_path), open_checkpoint(tuned_path)
    _check_pair(base_ckpt, tuned_ckpt, base_path, tuned_path)
    check_output_path(out, [base_ckpt.folder, *base_ckpt.shards, tuned_ckpt.folder, *tuned_ckpt.shards], overwrite)
    groups = _direct_tensors(base_ckpt)
    targeted = [m for m in groups if pattern is None or pattern.search(m)]
    if not targeted:
        raise InputError(f"--targets {targets!r} matches no module of {base_path}")
    _check_rank_fits(rule, base_ckpt, targeted, groups)
    for module in targeted:  # every shape from the headers, before the first tensor is read
        _resized(module, groups[module], base_ckpt, tuned_ckpt)
    record = provenance("extract", command, str(base), tuned=str(tuned))
    conv1d = uses_conv1d(base_ckpt)
    plan = _Plan()

    def extracted(module: str) -> _Plan:
        part = _Plan()
        _extract_module(module, groups[module], base_ckpt, tuned_ckpt, rule, conv1d, svd, dev, part)
        return part

    tasks = [functools.partial(extracted, m) for m in targeted]
    for part in tqdm(run_ordered(tasks, workers), total=len(tasks), desc="extract", unit="module",
                     disable=not progress, leave=False):
        plan.absorb(part)
    for module in groups:
        if module not in targeted:
            for name in groups[module]:
                if base_ckpt.tensors[name].shape != tuned_ckpt.tensors[name].shape or \
                        _difference(base_ckpt, tuned_ckpt, name) is not None:
                    plan.left_out[name] = f"changed, but --targets {targets!r} does not match its module"
    if not plan.loras and not plan.full:
        raise InputError(f"TUNED ({tuned_path}) equals BASE ({base_path}) in every targeted tensor: nothing to "
                         "extract")
    _settle_biases(plan)
    full = _whole_modules(plan, tuned_ckpt, groups)
    config, tensors = lora_adapter(plan.loras, full, base_model=str(base), all_modules=set(groups))
    write_adapter(out, config, tensors, overwrite=overwrite,
                  inputs=[base_ckpt.folder, *base_ckpt.shards, tuned_ckpt.folder, *tuned_ckpt.shards], record=record)
    reports = [plan.reports[m] for m in groups if m in plan.reports]
    result = ExtractResult(out, rule.describe(), reports, plan.left_out, plan.notes)
    if plot is not None:
        plot_spectra(result, Path(plot))
    return result
