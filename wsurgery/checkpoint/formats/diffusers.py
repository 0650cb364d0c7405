"""A diffusers pipeline folder (``model_index.json`` + ``unet/``, ``text_encoder*/``, ``vae/``...) as one checkpoint.

Each model component's weights are the safetensors ``save_pretrained`` writes in its sub-folder
(``diffusion_pytorch_model.safetensors`` for diffusers models, ``model.safetensors`` for transformers
ones; sharded with an index; ``.fp16`` and other variants). The checkpoint lists them as
``<component>.<key>`` (``unet.conv_in.weight``): the canonical parameter names of ``wsurgery.families``.
A copy is written back component by component, with the same file names, keys and indexes
(``output_parts``), and the components without weights (``scheduler/``, ``tokenizer*/``) copied along.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from ...errors import InputError, UnsupportedError
from ..output import copy_side_files
from ..reader import MAX_JSON_BYTES, Checkpoint, check_weights_file, read_index
from ..safetensors_file import TensorInfo, read_header
from ..untrusted import UntrustedError, load_json, read_small, shown
from ..writer import CheckpointWriter, OutputPart
from .base import CheckpointFormat, register_format

MODEL_INDEX = "model_index.json"
_INDEX = re.compile(r"^(?P<stem>.+)\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json$")
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


@dataclass
class ComponentFiles:
    """One model component's weights as found: its shards (relative to the pipeline folder) and index."""

    name: str
    shards: list[Path]
    index: Path | None
    variant: str | None
    single: str  # the file name the component is written as when it is one file
    index_name: str  # and its index's name when it is sharded


@dataclass
class DiffusersCheckpoint(Checkpoint):
    pipeline_class: str | None = None
    components: dict[str, ComponentFiles] = field(default_factory=dict)
    side_folders: list[str] = field(default_factory=list)  # components without weights (scheduler, tokenizer...)


def _weight_sets(sub: Path) -> dict[str | None, tuple[Path | None, list[Path]]]:
    """The sets of weights a component folder holds, by variant: (index or None, shard files)."""
    sets: dict[str | None, tuple[Path | None, list[Path]]] = {}
    listed: set[Path] = set()
    where: dict[str | None, str] = {}

    def add(variant: str | None, index: Path | None, shards: list[Path], name: str) -> None:
        if variant in sets:
            raise InputError(f"{sub}: holds two sets of {variant or 'non-variant'} weights ({where[variant]} and "
                             f"{name}); diffusers loads one: remove the other")
        sets[variant], where[variant] = (index, shards), name

    for index in sorted(sub.glob("*.safetensors.index*.json")):
        m = _INDEX.match(index.name)
        if m is None:
            continue
        _, shards = read_index(index)
        listed.update(shards)
        add(m["variant"], index, shards, index.name)
    for f in sorted(sub.glob("*.safetensors")):
        if f in listed:
            continue
        stem = _SHARD.sub(".safetensors", f.name).removesuffix(".safetensors")
        if _SHARD.search(f.name):
            raise InputError(f"{f}: a shard that no index of {sub.name}/ lists; the component is incomplete or has "
                             "a stray file: remove it or restore the index")
        variant = stem.split(".", 1)[1] if "." in stem else None
        add(variant, None, [f], f.name)
    return sets


def _pick_set(sub: Path, variant: str | None) -> tuple[str | None, Path | None, list[Path]]:
    sets = _weight_sets(sub)
    chosen = variant or None  # "": the non-variant weights
    if variant is not None and chosen in sets:
        return chosen, *sets[chosen]
    if len(sets) == 1:
        only = next(iter(sets))
        return only, *sets[only]
    if not sets:
        raise InputError(f"{sub}: model_index.json lists a model here, but the folder has no .safetensors weights; "
                         "the pipeline is incomplete")
    names = ", ".join("non-variant" if v is None else v for v in sets)
    raise InputError(f"{sub}: holds several variants of the weights ({names}); which one is meant cannot be told: "
                     "move the other variants' files out of the folder (or choose a variant: fp16..., \"\" for the "
                     "files without one)")


def _names(variant: str | None, stem: str) -> tuple[str, str]:
    """(single-file name, index name) of a component's weights, as save_pretrained names them."""
    if variant is None:
        return f"{stem}.safetensors", f"{stem}.safetensors.index.json"
    return f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json"


def _stem(index: Path | None, shards: list[Path]) -> str:
    if index is not None:
        m = _INDEX.match(index.name)
        assert m is not None  # _weight_sets took only matching indexes
        return m["stem"]
    return shards[0].name.split(".", 1)[0]


def _listed_components(folder: Path) -> tuple[str | None, list[str]]:
    """model_index.json's pipeline class and the components it lists (those not set to null)."""
    path = folder / MODEL_INDEX
    try:
        meta = load_json(read_small(path, MAX_JSON_BYTES, "a model_index.json"))
    except UntrustedError as e:
        raise InputError(f"{path}: {e}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: not a JSON object; a pipeline's model_index.json maps components to classes")
    pipeline = meta.get("_class_name")
    comps = []
    for key, value in meta.items():
        if key.startswith("_") or not isinstance(value, list):
            continue
        if len(value) != 2 or value[1] is None:
            continue  # [null, null]: the pipeline has no such component
        if not isinstance(key, str) or "/" in key or key in ("", ".", ".."):
            raise InputError(f"{path}: component {shown(key)} is not a folder name")
        comps.append(key)
    return (pipeline if isinstance(pipeline, str) else None), comps


def open_diffusers(folder: Path, fmt: CheckpointFormat, variant: str | None = None) -> DiffusersCheckpoint:
    """Open a pipeline folder. ``variant`` ("fp16"; "" for the non-variant files) picks among several sets of
    weights in a component; without it a component holding several is refused (diffusers would load the
    non-variant one unless asked, so which was meant cannot be told)."""
    pipeline, listed = _listed_components(folder)
    tensors: dict[str, TensorInfo] = {}
    components: dict[str, ComponentFiles] = {}
    side: list[str] = []
    shards_all: list[Path] = []
    for comp in listed:
        sub = folder / comp
        if not sub.is_dir():
            raise InputError(f"{folder / MODEL_INDEX}: lists component {shown(comp)}, but there is no {comp}/ folder; "
                             "the pipeline is incomplete")
        if os.path.realpath(sub) != os.path.join(os.path.realpath(folder), comp):
            raise InputError(f"{sub}: is a link out of the pipeline folder; refusing it")
        if not (sub / "config.json").is_file():
            if any(sub.glob("*.safetensors")) or any(sub.glob("*.bin")):
                raise InputError(f"{sub}: holds weights but no config.json; a model component needs its config")
            side.append(comp)
            continue
        config = _component_config(sub / "config.json")
        if config.get("quantization_config") is not None:
            raise UnsupportedError(f"{sub / 'config.json'}: the {comp} component is quantized; wsurgery reads "
                                   "diffusers folders of plain weights only (dequantize it with diffusers first)")
        if not any(sub.glob("*.safetensors")) and any(sub.glob("*.bin")):
            raise UnsupportedError(f"{sub}: weights stored as .bin; wsurgery reads diffusers folders of safetensors "
                                   "(re-save the pipeline with safe_serialization=True)")
        chosen, index, shards = _pick_set(sub, variant)
        listed_keys = read_index(index)[0] if index is not None else None
        found: dict[str, TensorInfo] = {}
        for shard in shards:
            check_weights_file(shard, folder, index)
            infos, _ = read_header(shard)
            for key, info in infos.items():
                if key in found:
                    raise InputError(f"{shard}: tensor {shown(key)} is also in {found[key].file.name}")
                found[key] = info
        if listed_keys is not None:
            assert index is not None
            for key, name in listed_keys.items():
                if key not in found:
                    raise InputError(f"{index}: names tensor {shown(key)} in {name}, but that shard lacks it")
                if found[key].file != sub / name:
                    raise InputError(f"{index}: tensor {shown(key)} is listed in {name} but found in "
                                     f"{found[key].file.name}")
            unlisted = sorted(set(found) - set(listed_keys))
            if unlisted:
                raise InputError(f"{index}: does not list tensor {shown(unlisted[0])} of {found[unlisted[0]].file.name}"
                                 f"{f' (and {len(unlisted) - 1} more)' if len(unlisted) > 1 else ''}; the index "
                                 "does not match its shards")
        if not found:
            raise InputError(f"{sub}: its weights hold no tensor; the component is empty")
        single, index_name = _names(chosen, _stem(index, shards))
        components[comp] = ComponentFiles(comp, shards, index, chosen, single,
                                          index.name if index is not None else index_name)
        shards_all += shards
        tensors.update({f"{comp}.{k}": replace(info, name=f"{comp}.{k}") for k, info in found.items()})
    if not components:
        raise InputError(f"{folder / MODEL_INDEX}: lists no component with weights; nothing to read")
    return DiffusersCheckpoint(folder, shards_all, dict(tensors), fmt, None, metadata={}, stored=dict(tensors),
                               pipeline_class=pipeline, components=components, side_folders=side)


def _component_config(path: Path) -> dict:
    try:
        config = load_json(read_small(path, MAX_JSON_BYTES, "a config.json"))
    except UntrustedError as e:
        raise InputError(f"{path}: {e}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a JSON object; a model config maps names to values")
    return config


class DiffusersFormat(CheckpointFormat):
    name = "diffusers"
    preference = 5  # before plain safetensors: a pipeline folder is read whole

    def claims_file(self, path: Path) -> bool:
        return path.name == MODEL_INDEX

    def find_in_folder(self, folder: Path) -> Path | None:
        index = folder / MODEL_INDEX
        return index if index.is_file() else None

    def open(self, path: Path) -> Checkpoint:
        return open_diffusers(path.parent, self)

    def open_variant(self, path: Path, variant: str) -> Checkpoint:
        return open_diffusers(path.parent, self, variant)

    def pushed(self, name: str) -> bool:
        return False  # model_index.json is no weights file; the weights lie in the component folders

    def output_layout(self, ckpt: Checkpoint) -> tuple[dict[str, str], str, str]:
        """Each tensor in its component's sub-folder, in the file it came from."""
        d = cast(DiffusersCheckpoint, ckpt)  # this format opens only DiffusersCheckpoints
        assignment = {n: os.path.relpath(t.file, d.folder) for n, t in d.tensors.items()}
        first = next(iter(d.components.values()))
        return assignment, f"{first.name}/{first.single}", f"{first.name}/{first.index_name}"

    def output_parts(self, ckpt: Checkpoint) -> list[OutputPart]:
        d = cast(DiffusersCheckpoint, ckpt)
        return [OutputPart(c.name, c.name + ".", c.single, c.index_name) for c in d.components.values()]

    def copy_side_files(self, ckpt: Checkpoint, dst: Path) -> list[str]:
        """model_index.json, each model component's config (not its weights or index), and the components
        without weights (scheduler, tokenizers) whole."""
        d = cast(DiffusersCheckpoint, ckpt)
        copied = copy_side_files(d.folder, dst)
        for comp in [*d.components, *d.side_folders]:
            (dst / comp).mkdir(exist_ok=True)
            copied += [f"{comp}/{n}" for n in copy_side_files(d.folder / comp, dst / comp)]
        return copied

    def copy_raw(self, ckpt: Checkpoint, writer: CheckpointWriter, name: str, target: Any) -> bool:
        info = ckpt.tensors[name]
        return target is None and isinstance(info, TensorInfo) and writer.copy_from(name, info)

    def describe(self, ckpt: Checkpoint) -> dict[str, Any]:
        """The pipeline, its components (files, variant, tensor count), and shard paths with their sub-folder."""
        d = cast(DiffusersCheckpoint, ckpt)
        count = {c: sum(1 for n in d.tensors if n.startswith(c + ".")) for c in d.components}
        return {
            "pipeline": d.pipeline_class,
            "components": {c.name: {"files": [p.name for p in c.shards], "index": c.index.name if c.index else None,
                                    "variant": c.variant, "tensors": count[c.name]} for c in d.components.values()},
            "side_folders": d.side_folders,
            "shards": [{"file": os.path.relpath(p, d.folder),
                        "tensors": sum(1 for t in d.tensors.values() if t.file == p),
                        "bytes": sum(t.nbytes for t in d.tensors.values() if t.file == p)} for p in d.shards],
        }

    def describe_lines(self, info: dict[str, Any]) -> list[str] | None:
        if "components" not in info:
            return None
        lines = [f"pipeline    {info['pipeline'] or 'unnamed'}: {len(info['components'])} model component(s); "
                 "tensors listed as <component>.<key>"]
        for name, c in info["components"].items():
            files = f"{len(c['files'])} shards + {c['index']}" if c["index"] else c["files"][0]
            lines.append(f"  {name + '/':<20} {c['tensors']:>6} tensors  {files}"
                         + (f"  (variant {c['variant']})" if c["variant"] else ""))
        if info["side_folders"]:
            lines.append("  copied along: " + ", ".join(f + "/" for f in info["side_folders"]))
        return lines


DIFFUSERS = register_format(DiffusersFormat())
