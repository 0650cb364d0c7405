"""Where each module an adapter names lives in a diffusion checkpoint, through its family's tables.

An image-model adapter names a module in one of several conventions: diffusers' path with its component
(``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``), kohya's flattened name
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``lora_te1_text_model_...``), or the original
module under a single-file prefix (``diffusion_model.double_blocks.0.img_attn.qkv``). The family
(``wsurgery.families``) knows where each canonical module is stored: a whole tensor, a row slice of a fused one
(q of a ``qkv``), and a module that is fused in the adapter but separate in the checkpoint is the row-wise
concatenation of several. Every module must resolve to exactly one such place; one that resolves to none is an
error naming it, never a silent no-op.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..checkpoint import Checkpoint
from ..errors import InputError
from ..families import Family, Layout, Location, detect, detect_folder

#: A module's place: its parts in row order, each (the checkpoint's name of the stored weight, where in it).
Place = tuple[tuple[str, Location], ...]


def checkpoint_family(base: Checkpoint, where: str) -> Family | None:
    """The diffusion family of ``base`` (None for any other model): a diffusers folder opened as one checkpoint
    names its tensors ``<component>.<param>``."""
    if base.format.name == "diffusers":
        components: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, info in base.tensors.items():
            component, _, param = name.partition(".")
            components.setdefault(component, {})[param] = tuple(info.shape)
        return detect_folder(components, where)
    return detect({n: tuple(t.shape) for n, t in base.tensors.items()}, where)


def stored_name(family: Family, loc: Location, tensor: str) -> str:
    """The checkpoint's name of ``tensor`` (a Location's weight or bias)."""
    return f"{loc.component}.{tensor}" if family.layout is Layout.DIFFUSERS else tensor


_DENOISER_ALIASES = ("diffusion_model.", "")


def _aliases(family: Family) -> dict[str, tuple[str, ...]]:
    """Every name an adapter may give a module -> the canonical modules it changes, in row order."""
    modules = family.modules()
    out: dict[str, tuple[str, ...]] = {m: (m,) for m in modules}
    out.update(family.kohya_names())
    # single-file prefixes, and those adapter files use for the denoiser (ai-toolkit, ComfyUI: ``diffusion_model.``)
    prefixes = {c.name: (*c.prefixes, *(_DENOISER_ALIASES if c.name in ("unet", "transformer") else ()))
                for c in family.components}
    for key, members in family.fused().items():
        component, _, original = key.partition(":")
        for prefix in prefixes.get(component, ()):
            out.setdefault(prefix + original, members)
    fused = {m for members in family.fused().values() for m in members}
    for module, original in family.original_names().items():
        component = module.split(".", 1)[0]
        if module in fused:
            continue
        for prefix in prefixes.get(component, ()):
            out.setdefault(prefix + original, (module,))
    return out


def place(modules: Iterable[str], family: Family) -> tuple[dict[str, Place], dict[str, str]]:
    """``({adapter module: its place}, {adapter module: why it maps to nothing})``, never raising: what
    ``inspect --base`` shows, and what ``locate`` refuses on."""
    aliases = _aliases(family)
    where = family.modules()
    placed: dict[str, Place] = {}
    unplaced: dict[str, str] = {}
    for module in modules:
        name = module.removeprefix("base_model.model.")
        members = aliases.get(name)
        if members is None:
            unplaced[module] = _why_unplaced(name, family)
            continue
        placed[module] = tuple((stored_name(family, where[m], where[m].weight), where[m]) for m in members)
    return placed, unplaced


_KOHYA_PREFIX = re.compile(r"^(lora_(?:unet|transformer|te\d?))_")


def _why_unplaced(name: str, family: Family) -> str:
    """Why an adapter module names nothing here: a component the family lacks, one this checkpoint leaves out,
    or a module name the component does not have."""
    present = {m.split(".", 1)[0] for m in family.modules()}
    kohya = _KOHYA_PREFIX.match(name)
    if kohya:
        comp = next((c for c in family.components if c.kohya_prefix == kohya.group(1)), None)
        label = f"kohya prefix {kohya.group(1)}_"
    else:
        head = name.split(".", 1)[0]
        comp = next((c for c in family.components
                     if head == c.name or any(p and name.startswith(p) for p in c.prefixes)), None)
        if comp is None and any(name.startswith(p) for p in _DENOISER_ALIASES if p):
            comp = next((c for c in family.components if c.name in ("unet", "transformer")), None)
        label = f"component {head}"
        if comp is None and "." not in name:
            return f"not a module name of any convention this {family.title} checkpoint is read with"
    if comp is None:
        return f"{label} names no part of a {family.title} model; is the adapter for another model family?"
    if comp.name not in present:
        return f"{label} is the {comp.name}, which this checkpoint does not hold"
    return (f"no {comp.name} module of a {family.title} model is named so; is the adapter for another model "
            "family or another size?")


def locate(modules: Iterable[str], family: Family, adapter_desc: str) -> dict[str, Place]:
    """``{adapter module: its place}`` for every module, or one ``InputError`` naming those that map to nothing."""
    placed, unplaced = place(modules, family)
    if unplaced:
        missing = list(unplaced)
        sample = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"{adapter_desc}: {len(missing)} of its modules map to nothing in this {family.title} "
                         f"checkpoint ({sample}); is the adapter for another model family?")
    return placed
