"""Diffusion model families as data: where every diffusers module lives in a single file or a folder.

``detect(shapes)`` (a single file's tensor names -> shapes) and ``detect_folder(components)`` (a diffusers
folder: component -> its tensor names -> shapes; ``read_folder`` reads them from disk) return the one
family the keys belong to, built and validated, or None when the keys are no diffusion family's; keys
that point at several families are refused (InputError naming why). See ``base.Family`` for the API.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..checkpoint.safetensors_file import read_header
from ..errors import InputError
from . import flux, sd1, sd2, sd3, sdxl  # noqa: F401  (registers the families)
from .base import Component, Family, Layout, Location, Rule, Shape, Split
from .registry import families

__all__ = ["Component", "Family", "Layout", "Location", "Rule", "Shape", "Split", "detect", "detect_folder",
           "families", "read_folder"]

#: diffusers pipeline classes (model_index.json ``_class_name``) -> family; a folder whose keys say otherwise
#: is refused. Pipelines not listed (img2img, inpaint, ControlNet variants...) are judged by their keys alone.
PIPELINES = {"StableDiffusionPipeline": ("sd1", "sd2"), "StableDiffusionXLPipeline": ("sdxl",),
             "StableDiffusionXLImg2ImgPipeline": ("sdxl",), "StableDiffusion3Pipeline": ("sd3",),
             "FluxPipeline": ("flux",)}


def _pick(found: dict[str, list[str]], where: str) -> type[Family] | None:
    hits = {name: why for name, why in found.items() if why}
    if not hits:
        return None
    if len(hits) > 1:
        fams = families()
        told = "; ".join(f"{fams[n].title} ({', '.join(w)})" for n, w in hits.items())
        raise InputError(f"{where}: its tensors belong to several model families: {told}; a checkpoint holds one "
                         "model, so parts of it come from different models")
    return families()[next(iter(hits))]


def detect(shapes: Mapping[str, Sequence[int]], where: str = "checkpoint") -> Family | None:
    """The family of a single file, from its tensor names and shapes (never its file name); None: none."""
    sf = {k: tuple(s) for k, s in shapes.items()}
    cls = _pick({name: fam.evidence(sf) for name, fam in families().items()}, where)
    return None if cls is None else cls.from_single_file(sf, where)


def detect_folder(folder: Mapping[str, Mapping[str, Sequence[int]]], where: str = "folder",
                  pipeline_class: str | None = None) -> Family | None:
    """The family of a diffusers folder (component -> tensor name -> shape), from the keys; the pipeline class
    of model_index.json, when given and known, must agree."""
    comps = {c: {k: tuple(s) for k, s in keys.items()} for c, keys in folder.items()}
    cls = _pick({name: fam.evidence_folder(comps) for name, fam in families().items()}, where)
    expected = PIPELINES.get(pipeline_class or "")
    if expected is not None and (cls is None or cls.name not in expected):
        told = "no known family" if cls is None else f"{cls.title}"
        titles = " or ".join(families()[e].title for e in expected)
        raise InputError(f"{where}: model_index.json names {pipeline_class} ({titles}) but the component tensors "
                         f"are {told}'s; the folder mixes models")
    return None if cls is None else cls.from_diffusers(comps, where)


def read_folder(path: Path) -> tuple[dict[str, dict[str, Shape]], str | None]:
    """A diffusers folder's components (the sub-folders holding .safetensors) -> tensor shapes, read from the
    headers only, and model_index.json's ``_class_name``. A tensor found in two files of one component
    (e.g. both an fp32 and an .fp16 variant) is refused: which one is meant cannot be told."""
    index = path / "model_index.json"
    if not index.is_file():
        raise InputError(f"{path}: no model_index.json; not a diffusers pipeline folder")
    try:
        meta = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{index}: unreadable ({e}); the folder is corrupt") from None
    pipeline = meta.get("_class_name") if isinstance(meta, dict) else None
    out: dict[str, dict[str, Shape]] = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        seen: dict[str, Path] = {}
        for f in sorted(sub.glob("*.safetensors")):
            tensors, _ = read_header(f)
            for name, info in tensors.items():
                if name in seen:
                    raise InputError(f"{sub}: {name} is in both {seen[name].name} and {f.name}; keep one variant "
                                     "of the component's weights")
                seen[name] = f
                out.setdefault(sub.name, {})[name] = info.shape
    return out, pipeline if isinstance(pipeline, str) else None
