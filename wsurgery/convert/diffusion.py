"""``wsurgery convert LORA OUT --to kohya|diffusers|peft --base BASE``: an image-model adapter file renamed into
another ecosystem's convention, with the same change on every module of the base.

Names come from the base's family (``wsurgery.families`` via ``adapters.locate``): kohya's flattened names
(``lora_unet_…``, ``lora_te1_…``; SD3/Flux after the original modules, ``…_img_attn_qkv``) and diffusers' paths
under the component (``unet.…``, ``transformer.…``, ``text_encoder.…``), the names diffusers' ``load_lora_weights``
takes.

- kohya -> diffusers: a LoRA on a fused original module (Flux ``img_attn.qkv``, ``linear1`` = [q; k; v; mlp])
  becomes one LoRA per diffusers module, ``lora_B``'s rows split and ``lora_A`` shared, exactly as diffusers'
  ``lora_conversion_utils`` does it. The scale ``α/r`` is folded into ``lora_B`` (diffusers loads a file without
  ``.alpha`` at α = r). A kohya module that is block-diagonal (written so from separate parts, as below) gives each
  part only its own rank, and a part with zero rows is not written.
- diffusers -> kohya: where kohya names a fused original module, its diffusers parts are joined: ``lora_down`` the
  parts' A concatenated, ``lora_up`` their B block-diagonal (a part the file does not change: zero rows) — the
  same product, exactly. ``alpha`` keeps each module's scale.
- diffusers file <-> PEFT folder (``--to peft``; one component per folder, PEFT's keys and ``adapter_config.json``).
- LoHa, LoKr, Tucker LoCon and full ``diff`` modules (LyCORIS) have no diffusers or PEFT-LoRA form: they are
  factored into LoRA at the change's own numerical rank (exact), or at ``rank`` (best rank, by SVD); a kohya target
  holds them as they are (a PEFT LoHa folder becomes LyCORIS LoHa modules: the same tensors and α/r).
  Base-dependent changes (DoRA, OFT, GLoRA, IA3, norms) are refused.

Every module's written change is read back from the written file and measured against the source's:
``‖ΔW' − ΔW‖_F / ‖ΔW‖_F`` per diffusers module (the report); nothing is written past a non-finite change.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters.formats import AdapterFile, AdapterModule, read_adapter_file
from ..adapters.formats.diffusers import Diffusers
from ..adapters.formats.writer import diffusers_lora, kohya_lora, output_metadata, write_adapter_file
from ..adapters.locate import checkpoint_family, locate, stored_name
from ..checkpoint import Checkpoint
from ..checkpoint.formats import open_checkpoint
from ..errors import InputError, UnsupportedError
from ..families import Family, Location
from ..adapters.loader import load_adapter
from ..methods.loha import LohaPatch
from ..methods.lora import DoraPatch, LoraPatch
from ..model_card import provenance
from .convert import ModuleReport
from .peft_writer import write_adapter
from .target import ModuleDelta
from .to_lora import spectrum

TARGETS = ("kohya", "diffusers", "peft")


@dataclass
class DiffusionConversion:
    out: Path
    source: str  # the source's format: kohya, diffusers
    target: str
    modules: list[ModuleReport]
    notes: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules), default=0.0)


@dataclass
class _Lora:
    """One diffusers module's LoRA: ΔW = scale·B·A (A (r, in[, k, k]), B (out, r[, 1, 1]))."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float | None  # as the source states it, where its scale is α/r


def _family(base: str | Path | None, why: str) -> Family:
    if base is None:
        raise InputError(f"{why} needs --base BASE (a checkpoint of the model the adapter is for): the names "
                         "differ per model family and only the base tells which")
    family = checkpoint_family(open_checkpoint(base), str(base))
    if family is None:
        raise InputError(f"{base}: not a diffusion checkpoint of a known family (SD 1.x/2.x, SDXL, SD3, Flux); "
                         "kohya and diffusers names are mapped through its family")
    return family


def _members(contents: AdapterFile, family: Family) -> dict[str, tuple[str, ...]]:
    """Each module of the file -> the diffusers modules it changes, in row order (several: a fused original)."""
    placed = locate(contents.modules, family, str(contents.path))
    index = {(stored_name(family, loc, loc.weight), loc.slice): name for name, loc in family.modules().items()}
    return {m: tuple(index[(s, loc.slice)] for s, loc in place) for m, place in placed.items()}


def _shape(mods: dict[str, Location], members: tuple[str, ...]) -> tuple[int, ...]:
    shapes = [mods[c].shape for c in members]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _rows(mods: dict[str, Location], members: tuple[str, ...]) -> list[tuple[str, int, int]]:
    out, offset = [], 0
    for c in members:
        size = mods[c].shape[0]
        out.append((c, offset, offset + size))
        offset += size
    return out


def _plain_lora(m: AdapterModule) -> LoraPatch | None:
    p = m.patch
    if m.algo == "lora" and not m.dora and isinstance(p, LoraPatch) and p.bias is None:
        return p
    return None


def _delta(m: AdapterModule, shape: tuple[int, ...], where: Path) -> torch.Tensor:
    """The module's dense change (float64), or UnsupportedError for a change that depends on the base weight."""
    if m.dora:
        raise UnsupportedError(f"{where}: module {m.name} is DoRA, whose change depends on the base weight; convert "
                               "it by merging instead (wsurgery merge)")
    delta = m.patch.bind({"weight": shape}).delta()
    if delta is None or set(delta) != {"weight"}:
        raise UnsupportedError(f"{where}: module {m.name} is {m.algo}, whose change depends on the base weight (or "
                               "changes more than the weight); no LoRA or kohya file holds it")
    return delta["weight"].to(torch.float64).reshape(shape)


def _factor(delta: torch.Tensor, name: str, rank: int | None, dtype: torch.dtype) -> _Lora:
    """LoRA factors of a dense change: its own numerical rank (exact), or ``rank`` (best, by SVD)."""
    shape = tuple(delta.shape)
    matrix = delta.reshape(shape[0], -1)
    spec = spectrum(ModuleDelta(name, "linear", (matrix.shape[0], matrix.shape[1]), matrix=matrix))
    k = rank if rank is not None else max(spec.exact_rank(), 1)
    if rank is None and k >= min(matrix.shape):
        raise UnsupportedError(f"{name}: the change has full rank ({k}) and no LoRA of lower rank holds it exactly; "
                               "pass --rank R for the best rank-R approximation (the error is reported)")
    k = min(k, *matrix.shape)
    B, A = spec.factors(k)
    if len(shape) > 2:
        A = A.reshape(k, *shape[1:])
        B = B.reshape(shape[0], k, *([1] * (len(shape) - 2)))
    return _Lora(A.to(dtype).contiguous(), B.to(dtype).contiguous(), 1.0, None)


def _split(m: AdapterModule, members: tuple[str, ...], mods: dict[str, Location], where: Path,
           rank: int | None) -> dict[str, _Lora]:
    """One source module as a LoRA per diffusers module it changes."""
    lora = _plain_lora(m)
    rows = _rows(mods, members)
    if lora is not None:
        scale = float(lora.scaling)
        alpha = m.alpha if m.alpha is not None and m.alpha / lora.rank == scale else None
        if len(rows) == 1:
            return {members[0]: _Lora(lora.A, lora.B, scale, alpha)}
        out = {}
        for c, a, b in rows:  # a joined module's B is block-diagonal: each part keeps only its own columns
            cols = lora.B[a:b].reshape(b - a, lora.rank, -1).ne(0).any(dim=2).any(dim=0).nonzero().flatten()
            if len(cols):
                A, B = (lora.A, lora.B[a:b]) if len(cols) == lora.rank else (lora.A[cols], lora.B[a:b][:, cols])
                out[c] = _Lora(A, B, scale, None)
        return out
    delta = _delta(m, _shape(mods, members), where)
    dtype = next(t for t in (getattr(m.patch, "A", None), *getattr(m.patch, "t", {}).values(), torch.zeros(()))
                 if isinstance(t, torch.Tensor) and t.is_floating_point()).dtype
    return {c: _factor(delta[a:b], c, rank, dtype) for c, a, b in rows}


def _folded(lora: _Lora) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, s·B): the scale folded into B, in B's dtype."""
    if lora.scale == 1.0:
        return lora.A, lora.B
    return lora.A, (lora.B.to(torch.float32) * lora.scale).to(lora.B.dtype)


def _kohya_names(family: Family) -> tuple[dict[tuple[str, ...], str], dict[str, tuple[str, tuple[str, ...]]]]:
    """(members -> kohya name, the first one kohya's loaders and sd-scripts use; diffusers module -> its fused
    original's (kohya name, members) where kohya names the fused original)."""
    by_members: dict[tuple[str, ...], str] = {}
    fused: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, members in family.kohya_names().items():
        by_members.setdefault(members, name)
        if len(members) > 1:
            for c in members:
                fused.setdefault(c, (name, members))
    return by_members, fused


def _to_kohya(pieces: dict[str, _Lora], whole: dict[tuple[str, ...], AdapterModule], family: Family,
              where: Path) -> dict[str, torch.Tensor]:
    by_members, fused = _kohya_names(family)
    mods = family.modules()
    out: dict[str, torch.Tensor] = {}
    for members, m in whole.items():  # a source module that already is a kohya module: as it is
        patch = _plain_lora(m)
        assert patch is not None
        out.update(kohya_lora(by_members[members], patch.A, patch.B, float(patch.scaling) * patch.rank))
    groups: dict[str, tuple[tuple[str, ...], dict[str, _Lora]]] = {}
    for c, lora in pieces.items():
        name, members = fused.get(c) or (by_members.get((c,), ""), (c,))
        if not name:
            raise UnsupportedError(f"{where}: {c} has no kohya name (kohya trains no module of "
                                   f"{c.split('.', 1)[0]}); it cannot be written as a kohya file")
        groups.setdefault(name, (members, {}))[1][c] = lora
    for name, (members, parts) in groups.items():
        if len(members) == 1:
            lora = parts[members[0]]
            out.update(kohya_lora(name, lora.A, lora.B, lora.alpha if lora.alpha is not None
                                  else lora.scale * lora.A.shape[0]))
            continue
        scales = {p.scale for p in parts.values()}
        common = scales.pop() if len(scales) == 1 else 1.0
        present = [c for c in members if c in parts]
        A = torch.cat([parts[c].A for c in present])
        dtype = A.dtype
        rows = _rows(mods, members)
        B = torch.zeros(rows[-1][2], A.shape[0], dtype=dtype)
        col = 0
        for c, a, b in rows:
            if c in parts:
                p = parts[c]
                r = p.A.shape[0]
                B[a:b, col:col + r] = p.B if p.scale == common else (p.B.float() * (p.scale / common)).to(dtype)
                col += r
        out.update(kohya_lora(name, A, B, common * A.shape[0]))
    return out


def _to_peft_folder(pieces: dict[str, _Lora], where: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    components = sorted({c.split(".", 1)[0] for c in pieces})
    if len(components) != 1:
        raise UnsupportedError(f"{where}: changes {', '.join(components)}; a PEFT adapter folder adapts one model: "
                               "convert to diffusers (one file for the pipeline) instead")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for c, lora in pieces.items():
        inner = c.split(".", 1)[1]
        A, B = _folded(lora)
        tensors[f"base_model.model.{inner}.lora_A.weight"] = A
        tensors[f"base_model.model.{inner}.lora_B.weight"] = B
        ranks[inner] = int(A.shape[0])
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {k: v for k, v in ranks.items() if v != r}
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": sorted(ranks), "bias": "none", "lora_dropout": 0.0, "use_dora": False,
              "use_rslora": False, "base_model_name_or_path": None, "init_lora_weights": True}
    return config, tensors


def _canonical_deltas(contents: AdapterFile, members: dict[str, tuple[str, ...]], mods: dict[str, Location]
                      ) -> dict[str, tuple[str, int, int]]:
    """diffusers module -> (the file's module, rows of its change) for the modules a file changes."""
    out: dict[str, tuple[str, int, int]] = {}
    for m, cs in members.items():
        for c, a, b in _rows(mods, cs):
            if c in out:
                raise InputError(f"{contents.path}: modules {out[c][0]} and {m} both change {c}")
            out[c] = (m, a, b)
    return out


#: A module's change as ``B·A`` (float64 (out, r), (r, fan_in)), or dense (out, fan_in) with ``A`` None.
_Change = tuple[torch.Tensor, torch.Tensor | None]


def _change(m: AdapterModule, shape: tuple[int, ...], where: Path) -> _Change:
    """A plain LoRA's change kept factored (no dense (out, in) matrix per module); anything else dense."""
    lora = _plain_lora(m)
    if lora is not None:
        r = lora.rank
        return (lora.B.reshape(-1, r).double() * float(lora.scaling), lora.A.reshape(r, -1).double())
    return _delta(m, shape, where).reshape(shape[0], -1), None


def _frobenius(parts: list[tuple[float, _Change]]) -> float:
    """‖Σ sign·change‖_F; of products through their small Gram matrices: ‖B·A‖² = Σ (BᵀB) ∘ (A·Aᵀ)."""
    if all(A is not None for _, (_, A) in parts):
        B = torch.cat([sign * Bi for sign, (Bi, _) in parts], 1)
        A = torch.cat([Ai for _, (_, Ai) in parts if Ai is not None])
        return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt())
    total = sum(sign * (Bi @ Ai if Ai is not None else Bi) for sign, (Bi, Ai) in parts)
    return float(torch.linalg.vector_norm(torch.as_tensor(total)))


def _measure(source: AdapterFile, written: AdapterFile, family: Family,
             src_members: dict[str, tuple[str, ...]]) -> list[ModuleReport]:
    """Per diffusers module, the written change against the source's (float64, read back from the file)."""
    out_members = _members(written, family)
    mods = family.modules()
    src, out = _canonical_deltas(source, src_members, mods), _canonical_deltas(written, out_members, mods)

    def change(contents: AdapterFile, members: dict[str, tuple[str, ...]], name: str, a: int, b: int) -> _Change:
        B, A = _change(contents.modules[name], _shape(mods, members[name]), contents.path)
        return B[a:b], A

    reports = []
    for c in sorted(set(src) | set(out)):  # a part one file leaves alone must have no change in the other
        written_change = change(written, out_members, *out[c]) if c in out else None
        if written_change is not None and not all(torch.isfinite(t).all() for t in written_change if t is not None):
            raise InputError(f"{written.path}: the written change of {c} is not finite; nothing written")
        if c not in src:
            if written_change is not None and _frobenius([(1.0, written_change)]) > 0:
                raise InputError(f"{written.path}: the written file changes {c}, which the source does not")
            continue
        d0 = change(source, src_members, *src[c])
        norm = _frobenius([(1.0, d0)])
        diff = _frobenius([(1.0, d0)] + ([(-1.0, written_change)] if written_change is not None else []))
        err = diff / norm if norm else float(diff > 0)
        reports.append(ModuleReport(c, (written.modules[out[c][0]].rank or 0) if c in out else 0, err))
    return reports


def convert_adapter_file(adapter: str | Path, out: str | Path, *, to: str, base: str | Path | None = None,
                         rank: int | None = None, component: str | None = None, overwrite: bool = False,
                         command: str | None = None) -> DiffusionConversion:
    """Convert a kohya / LyCORIS / diffusers-style adapter file, or a PEFT folder of one pipeline component (which
    one: ``component``, else the one whose modules it names), see the module docstring."""
    adapter, out = Path(adapter), Path(out)
    if to not in TARGETS:
        raise InputError(f"--to {to}: one of {', '.join(TARGETS)}")
    if rank is not None and rank < 1:
        raise InputError(f"--rank {rank}: a rank is at least 1")
    if to != "peft" and out.suffix != ".safetensors":
        raise InputError(f"{out}: a {to} adapter is one .safetensors file; name it so")
    if adapter.is_dir():
        family = _family(base, f"converting a PEFT adapter folder to {to}")
        if to == "peft":
            raise InputError(f"{adapter}: is already a PEFT adapter folder")
        contents = _peft_source(adapter, family, component)
    else:
        contents = read_adapter_file(adapter)
        if to == contents.format:
            raise InputError(f"{adapter}: is already a {to} adapter file")
        family = _family(base, f"converting a {contents.format} file to {to}")
    members = _members(contents, family)
    by_members, _ = _kohya_names(family)
    mods = family.modules()
    pieces: dict[str, _Lora] = {}
    whole: dict[tuple[str, ...], AdapterModule] = {}
    tensors: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}  # LoHa modules written as they are (kohya target)
    notes: list[str] = []
    for name, m in contents.modules.items():
        cs = members[name]
        if to == "kohya" and len(cs) > 1 and cs in by_members and _plain_lora(m) is not None:
            whole[cs] = m
            continue
        if to == "kohya" and isinstance(m.patch, LohaPatch) and not m.dora and cs in by_members:
            # a PEFT LoHa is LyCORIS' (same tensors, names and α/r): kept as it is, under kohya's name
            kname = by_members[cs]
            kept.update({f"{kname}.{k}": v for k, v in m.patch.t.items()})
            kept[f"{kname}.alpha"] = torch.tensor(float(m.patch.alpha))
            continue
        if to == "kohya" and _plain_lora(m) is None:
            raise UnsupportedError(f"{adapter}: module {name} is {m.algo}{' (DoRA)' if m.dora else ''}; only LoRA "
                                   "and LoHa modules are converted to kohya names")
        for c, lora in _split(m, cs, mods, adapter, rank).items():
            if c in pieces:
                raise InputError(f"{adapter}: two of its modules change {c}; which one is meant cannot be told")
            pieces[c] = lora
        if _plain_lora(m) is None:
            notes.append(f"{name}: {m.algo} factored into LoRA")
    record = provenance("convert", command, base=str(base), adapters=[(str(adapter), 1.0)])
    record["convert"] = {"from": contents.format, "to": to, "rank": rank}
    drop = {"lora_adapter_metadata": None}  # its alphas are keyed by the source's names and scales
    if to == "diffusers":
        for c, lora in pieces.items():
            A, B = _folded(lora)
            tensors.update(diffusers_lora(c, A, B, None))
    elif to == "kohya":
        tensors = {**_to_kohya(pieces, whole, family, adapter), **kept}
    reports: list[ModuleReport] = []

    def check(path: Path) -> None:
        written = read_adapter_file(path) if to != "peft" else _peft_as_file(path, next(iter(pieces)).split(".")[0])
        reports.extend(_measure(contents, written, family, members))

    if to == "peft":
        config, peft_tensors = _to_peft_folder(pieces, adapter)
        write_adapter(out, config, peft_tensors, overwrite=overwrite, inputs=[adapter], record=record,
                      check=check)
    else:
        write_adapter_file(out, tensors, output_metadata(contents.metadata, record, drop), overwrite=overwrite,
                           inputs=[adapter], check=check)
    return DiffusionConversion(out, contents.format, to, reports, notes)


def _peft_source(folder: Path, family: Family, component: str | None) -> AdapterFile:
    """A PEFT adapter folder of one pipeline component as a diffusers-style file (its modules under the component)."""
    ad = load_adapter(folder)
    if ad.replacements or ad.tokens:
        raise UnsupportedError(f"{folder}: saves whole modules or token rows (modules_to_save, trainable tokens), "
                               "which kohya and diffusers LoRA files cannot hold")
    patches = ad.method_patches
    mods = family.modules()
    names = [c.name for c in family.components]
    if component is None:
        fits = [c for c in names if all(f"{c}.{p.module}" in mods for p in patches)]
        if len(fits) != 1:
            told = f"fits {', '.join(fits)}" if fits else f"fits none of {', '.join(names)}"
            raise InputError(f"{folder}: its modules' names {told} of this {family.title} base; "
                             "name the component (--component)")
        component = fits[0]
    elif component not in names:
        raise InputError(f"--component {component}: a {family.title} pipeline has {', '.join(names)}")
    modules = {}
    for p in patches:
        name = f"{component}.{p.module}"
        algo = "lora" if isinstance(p, LoraPatch) else ad.config.peft_type.lower()
        rank = int(p.rank) if isinstance(p, LoraPatch) else None
        alpha = float(p.alpha) if isinstance(p, LoraPatch) else None
        modules[name] = AdapterModule(name, algo, p, rank, alpha, (), dora=isinstance(p, DoraPatch))
    return AdapterFile(folder, "peft", modules, {})


def _readable(path: Path) -> None:
    """The written file must read back as an adapter (a check before it becomes OUT)."""
    read_adapter_file(path)


def _peft_as_file(folder: Path, component: str) -> AdapterFile:
    """A written PEFT LoRA folder read back as a diffusers-style file: its keys under ``component``."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    renamed = {f"{component}.{k.removeprefix('base_model.model.')}": v for k, v in tensors.items()}
    return Diffusers().read(folder, renamed, {})


# --- extract ------------------------------------------------------------------------------------------------------
#: Where kohya's LoRA network (sd-scripts networks/lora.py) puts modules in a UNet family: every Linear and 1x1
#: Conv2d inside a Transformer2DModel (``attentions.``); with a conv rank also those inside ResnetBlock2D,
#: Downsample2D and Upsample2D (3x3 convs at the conv rank, Linear/1x1 at the rank); in the CLIP text encoders the
#: Linear layers of CLIPAttention and CLIPMLP.
_UNET_ATTENTION = (".attentions.",)
_UNET_CONV_BLOCKS = (".resnets.", ".downsamplers.", ".upsamplers.")
_TEXT_LINEARS = (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj", ".mlp.fc1",
                 ".mlp.fc2")
#: kohya extract's defaults: the quantile the factors are clamped at, and the text encoders' largest difference
#: below which they count as unchanged (kohya then extracts the UNet only).
CLAMP_QUANTILE = 0.99
MIN_DIFF = 0.01
_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass
class ExtractedModule:
    module: str  # the name written (kohya or diffusers)
    rank: int
    error: float  # ‖ΔW − up·down‖_F / ‖ΔW‖_F, after the clamp


@dataclass
class DiffusionExtract:
    out: Path
    modules: list[ExtractedModule]
    text_encoders: bool  # False: they differed by at most min_diff, so only the denoiser was extracted


def _kohya_targets(family: Family, conv_rank: int | None) -> dict[str, str]:
    """diffusers module -> "rank" or "conv": the modules kohya's LoRA network adapts, in the family's order."""
    out: dict[str, str] = {}
    for c, loc in family.modules().items():
        component, _, inner = c.partition(".")
        shape = loc.shape
        one_by_one = len(shape) == 2 or (len(shape) == 4 and tuple(shape[2:]) == (1, 1))
        if component == "unet":
            if any(s in c for s in _UNET_ATTENTION) and one_by_one:
                out[c] = "rank"
            elif conv_rank is not None and any(s in c for s in _UNET_CONV_BLOCKS) and len(shape) in (2, 4):
                out[c] = "rank" if one_by_one else "conv"
        elif component.startswith("text_encoder") and inner.endswith(_TEXT_LINEARS) and len(shape) == 2:
            out[c] = "rank"
    return out


def _read_module(ckpt: Checkpoint, family: Family, mods: dict[str, Location], module: str) -> torch.Tensor:
    loc = mods[module]
    return loc.take(ckpt.read(stored_name(family, loc, loc.weight))).to(torch.float32)


def kohya_svd(diff: torch.Tensor, rank: int, clamp_quantile: float = CLAMP_QUANTILE
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of one module's difference as kohya's extract_lora_from_models.py computes them: rank capped by
    the out/in channels, 3x3 convs flattened to (out, in·k·k), ``up = U·S``, both clamped at ±(the
    ``clamp_quantile`` of their values)."""
    out_dim, in_dim = diff.shape[:2]
    rank = min(rank, in_dim, out_dim)
    conv = diff.dim() == 4
    mat = diff.flatten(start_dim=1) if conv else diff
    U, S, Vh = torch.linalg.svd(mat)
    U = U[:, :rank] @ torch.diag(S[:rank])
    Vh = Vh[:rank, :]
    hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp_quantile)
    U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    if conv:
        U = U.reshape(out_dim, rank, 1, 1)
        Vh = Vh.reshape(rank, in_dim, *diff.shape[2:])
    return U.contiguous(), Vh.contiguous()


def extract_diffusion(base: str | Path, tuned: str | Path, out: str | Path, *, rank: int = 4,
                      conv_rank: int | None = None, format: str = "kohya", clamp_quantile: float = CLAMP_QUANTILE,
                      min_diff: float = MIN_DIFF, dtype: str | None = None, overwrite: bool = False,
                      command: str | None = None) -> DiffusionExtract:
    """A LoRA (LoCon with ``conv_rank``) of ``tuned − base``, two single-file checkpoints of one UNet family
    (SD 1.x/2.x, SDXL), as kohya's extract_lora_from_models.py makes it: its modules, SVD, clamp and alpha = rank;
    written with kohya's names (``format="kohya"``) or diffusers' (``"diffusers"``, no alpha: it is the rank)."""
    base, tuned, out = Path(base), Path(tuned), Path(out)
    if format not in ("kohya", "diffusers"):
        raise InputError(f"--format {format}: kohya or diffusers")
    for label, value in (("--rank", rank), ("--conv-rank", conv_rank)):
        if value is not None and value < 1:
            raise InputError(f"{label} {value}: a rank is at least 1")
    if not 0 < clamp_quantile <= 1:
        raise InputError(f"--clamp-quantile {clamp_quantile}: a quantile in (0, 1]")
    if out.suffix != ".safetensors":
        raise InputError(f"{out}: the extracted adapter is one .safetensors file; name it so")
    save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32, None: None}.get(dtype, "?")
    if save_dtype == "?":
        raise InputError(f"--dtype {dtype}: one of float, fp16, bf16")
    b_ckpt, t_ckpt = open_checkpoint(base), open_checkpoint(tuned)
    family, t_family = checkpoint_family(b_ckpt, str(base)), checkpoint_family(t_ckpt, str(tuned))
    if family is None or t_family is None:
        raise InputError(f"{base if family is None else tuned}: not a diffusion checkpoint of a known family")
    if family.name != t_family.name:
        raise InputError(f"{tuned}: is {t_family.title} but {base} is {family.title}; extract compares one model")
    if family.name not in _MODEL_VERSION:
        raise UnsupportedError(f"{base}: extract for diffusion models covers the UNet families (SD 1.x/2.x, SDXL); "
                               f"{family.title} is not supported yet")
    targets = _kohya_targets(family, conv_rank)
    shapes, t_shapes = family.modules(), t_family.modules()
    bad = [c for c in targets if c not in t_shapes or t_shapes[c].shape != shapes[c].shape]
    if bad:
        raise InputError(f"{tuned}: modules {bad[:3]} are missing or shaped otherwise than in {base}; the two files "
                         "are not the same model")
    by_members, _ = _kohya_names(family)
    text = [c for c in targets if c.startswith("text_encoder")]
    text_changed = False
    for c in text:  # kohya: the text encoders only where one differs by more than min_diff
        d = _read_module(t_ckpt, t_family, t_shapes, c) - _read_module(b_ckpt, family, shapes, c)
        text_changed = text_changed or float(d.abs().max()) > min_diff
    tensors: dict[str, torch.Tensor] = {}
    reports: list[ExtractedModule] = []
    for c, kind in targets.items():
        if c in text and not text_changed:
            continue
        diff = _read_module(t_ckpt, t_family, t_shapes, c) - _read_module(b_ckpt, family, shapes, c)
        up, down = kohya_svd(diff, conv_rank if kind == "conv" and conv_rank else rank, clamp_quantile)
        r = down.shape[0]
        approx = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
        norm = float(torch.linalg.vector_norm(diff))
        err = float(torch.linalg.vector_norm(diff.reshape(approx.shape) - approx)) / norm if norm else 0.0
        if save_dtype is not None:
            up, down = up.to(save_dtype), down.to(save_dtype)
        name = by_members[(c,)] if format == "kohya" else c
        tensors.update(kohya_lora(name, down, up, float(r)) if format == "kohya" else diffusers_lora(c, down, up, None))
        reports.append(ExtractedModule(name, r, err))
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank is not None else {}
    metadata = {"ss_v2": str(family.name == "sd2"), "ss_base_model_version": _MODEL_VERSION[family.name],
                "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(rank)),
                "ss_network_args": json.dumps(args)} if format == "kohya" else {}
    record = provenance("extract", command, base=str(base), tuned=str(tuned))
    record["extract"] = {"rank": rank, "conv_rank": conv_rank, "clamp_quantile": clamp_quantile, "format": format}
    write_adapter_file(out, tensors, output_metadata(metadata, record), overwrite=overwrite, inputs=[base, tuned],
                       check=_readable)
    return DiffusionExtract(out, reports, text_changed or not text)
