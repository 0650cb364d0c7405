"""``inspect``: what is in a checkpoint or an adapter, as a dict (for --json) or a short text."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from .adapters import Adapter, load_adapter, map_modules
from .adapters.files import is_adapter_file
from .adapters.formats import AdapterFile, formats, read_adapter_file
from .adapters.locate import checkpoint_family, place
from .checkpoint.dtypes import dtype_name
from .checkpoint.formats import open_checkpoint, registered_formats
from .checkpoint.reader import Checkpoint
from .checkpoint.safetensors_file import read_header
from .errors import InputError
from .families import families
from .hub_inputs import resolve
from .model_card import adapter_record


def inspect(path: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    """Describe a checkpoint, or an adapter (with ``base``: also the base tensors it will change)."""
    local = resolve(path, kind="adapter")
    if (local / "adapter_config.json").is_file() or local.name == "adapter_config.json":
        base_ckpt = open_checkpoint(resolve(base)) if base is not None else None
        return describe_adapter(load_adapter(local), base_ckpt)
    if _holds_an_adapter(local):
        base_ckpt = open_checkpoint(resolve(base)) if base is not None else None
        return describe_adapter_file(read_adapter_file(local), base_ckpt)
    if base is not None:
        raise InputError(f"{path}: --base is for adapters (a PEFT folder or a kohya/LyCORIS/diffusers .safetensors "
                         "file); this is a checkpoint")
    return describe_checkpoint(open_checkpoint(resolve(path)))


def _holds_an_adapter(path: Path) -> bool:
    """A lone .safetensors file most of whose tensor names an adapter-file format reads (a single-file
    checkpoint's are no format's; a broken adapter file is read as one, to say what is wrong with it): told by
    the header, as merge's ADAPTER argument is told by its place."""
    if not is_adapter_file(path):
        return False
    keys = list(read_header(path)[0])
    return any(2 * len(f.foreign_keys(keys)) < len(keys) for f in formats().values())


def describe_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    dtypes = Counter(dtype_name(t.dtype) for t in ckpt.tensors.values())
    stored_as = {n: ckpt.format.stored_as(t) for n, t in ckpt.tensors.items()}
    return {
        "type": "checkpoint",
        "format": ckpt.format.name,
        "folder": str(ckpt.folder),
        "shards": [{"file": p.name, "tensors": sum(1 for t in ckpt.tensors.values() if t.file == p),
                    "bytes": sum(t.nbytes for t in ckpt.tensors.values() if t.file == p)} for p in ckpt.shards],
        "index": ckpt.index_file.name if ckpt.index_file else None,
        "num_tensors": len(ckpt.tensors),
        "num_parameters": ckpt.num_parameters,
        "total_bytes": ckpt.total_bytes,
        "dtypes": dict(dtypes),
        "tensors": [{"name": t.name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "shard": t.file.name,
                     **({"stored_as": stored_as[t.name]} if stored_as[t.name] else {})}
                    for t in ckpt.tensors.values()],
        "quantization": (ckpt.config or {}).get("quantization_config"),
        "made_by": (ckpt.config or {}).get("wsurgery"),
        **ckpt.format.describe(ckpt),
    }


def describe_adapter(adapter: Adapter, base: Checkpoint | None = None) -> dict[str, Any]:
    config = adapter.config
    patches = adapter.patches()
    mapping = None
    if base is not None:
        mapping = map_modules([p.module for p in patches], base.tensors, f"adapter {adapter.folder}", "the base")
    modules = []
    for p in patches:
        target = mapping[p.module] if mapping is not None else p.module
        modules.append({
            "module": p.module,
            "base_tensors": [f"{target}.{r}" if target else r for r in p.roles],
            **p.describe(),
            "unmerge": p.unmerge_status(),
        })
    not_invertible = [m for m in modules if m["unmerge"].startswith("impossible")]
    approximate = [m for m in modules if m["unmerge"] == "approximate"]
    return {
        "type": "adapter",
        "folder": str(adapter.folder),
        "file": adapter.file.name,
        "peft_type": config.peft_type,
        "peft_version": config.raw.get("peft_version"),
        "base_model": config.base_model,
        "target_modules": config.raw.get("target_modules"),
        "modules_to_save": config.modules_to_save,
        "method": adapter.method.summary(config),
        "num_tensors": adapter.num_tensors,
        "num_parameters": adapter.num_parameters,
        "dtypes": sorted(dtype_name(d) for d in adapter.dtypes),
        "merge": "yes",
        "unmerge": (f"impossible for {len(not_invertible)} module(s)" if not_invertible
                    else f"approximate for {len(approximate)} module(s)" if approximate else "exact"),
        "made_by": adapter_record(adapter.folder) or None,
        "modules": modules,
    }


# What trainers write for the base model (kohya ``ss_base_model_version``, ``modelspec.architecture``): the
# first family whose words appear in it, lower-cased.
_FAMILY_WORDS = (("flux", ("flux",)), ("sd3", ("sd3", "stable-diffusion-3")), ("sdxl", ("sdxl", "-xl-")),
                 ("sd2", ("sd_v2", "stable-diffusion-v2")), ("sd1", ("sd_v1", "stable-diffusion-v1")))
# Module names only one family's adapters use (kohya flattened, or dotted under a component).
_FAMILY_NAMES = (("flux", re.compile(r"^lora_unet_(double|single)_blocks_|single_transformer_blocks\.")),
                 ("sd3", re.compile(r"^lora_unet_joint_blocks_")),
                 ("sdxl", re.compile(r"^lora_te[12]_|^lora_unet_(input|middle|output)_blocks_|^lora_unet_label_emb_"
                                     r"|^text_encoder_2\.")))


def _family_from_names(adapter: AdapterFile) -> tuple[str, str, str] | None:
    """(family, or several joined by ``|``; title; why) from module names only some families' adapters use."""
    for name, pattern in _FAMILY_NAMES:
        hit = next((m for m in adapter.modules if pattern.search(m)), None)
        if hit is not None:
            return name, families()[name].title, f"module names ({hit})"
    hit = next((m for m in adapter.modules if m.startswith("lora_te_")), None)
    if hit is not None:
        return "sd1|sd2", "SD 1.x or 2.x", f"module names (one text encoder: {hit})"
    hit = next((m for m in adapter.modules if m.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_",
                                                             "lora_unet_mid_block_", "unet."))), None)
    if hit is not None:
        return "sd1|sd2|sdxl", "an SD UNet (1.x, 2.x or SDXL)", f"module names (diffusers UNet names: {hit})"
    return None


def adapter_family(adapter: AdapterFile) -> dict[str, Any]:
    """The family the file says it is for (its metadata), else the one its module names point at; the source
    is named, for a guess from names is weaker than a statement. Metadata that the names contradict is told
    (``conflict``): a file relabelled, or merged from another family's."""
    guess = _family_from_names(adapter)
    for key in ("ss_base_model_version", "modelspec.architecture"):
        value = adapter.metadata.get(key)
        if value:
            low = value.lower()
            name = next((f for f, words in _FAMILY_WORDS if any(w in low for w in words)), None)
            conflict = (f"the metadata says {families()[name].title} but the {guess[2]} are {guess[1]}'s"
                        if name and guess and name not in guess[0].split("|") else None)
            return {"family": name, "title": families()[name].title if name else None, "from": f"{key}={value}",
                    "conflict": conflict}
    if guess is not None:
        return {"family": guess[0], "title": guess[1], "from": guess[2], "conflict": None}
    return {"family": None, "title": None, "from": None, "conflict": None}


_KOHYA_PREFIX = re.compile(r"^(lora_(?:unet|transformer|te\d?)|lycoris)_")


def _prefix(module: str) -> str:
    """The part of a module name that says which component it is in (``lora_te2``, ``unet``...)."""
    kohya = _KOHYA_PREFIX.match(module)
    return kohya.group(1) if kohya else module.split(".", 1)[0] if "." in module else "(none)"


def _counts(values: list[Any]) -> dict[str, int]:
    """value -> how many modules have it, most common first (JSON keys are strings)."""
    return {("none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)): n
            for v, n in Counter(values).most_common()}


def describe_adapter_file(adapter: AdapterFile, base: Checkpoint | None = None) -> dict[str, Any]:
    """A kohya / LyCORIS / diffusers adapter file; with ``base``: where each module lands in it (stored tensor and
    row slice, through the base's family tables) and which modules land nowhere, with the reason."""
    tensors = [k for m in adapter.modules.values() for k in m.keys]
    rows = adapter.table()
    prefixes = Counter(_prefix(m) for m in adapter.modules)
    info: dict[str, Any] = {
        "type": "adapter_file",
        "file": str(adapter.path),
        "format": adapter.format,
        "num_modules": len(adapter.modules),
        "num_tensors": len(tensors),
        "algos": _counts([m.algo for m in adapter.modules.values()]),
        "ranks": _counts([m.rank for m in adapter.modules.values()]),
        "alphas": _counts([m.alpha for m in adapter.modules.values()]),
        "dora": sum(m.dora for m in adapter.modules.values()),
        "prefixes": dict(prefixes),
        "metadata": adapter.summary,
        "base_family": adapter_family(adapter),
        "modules": rows,
    }
    if base is None:
        return info
    where = f"base {base.shards[0] if len(base.shards) == 1 else base.folder}"
    family = checkpoint_family(base, where)
    if family is None:
        raise InputError(f"{where}: not an image-model checkpoint (SD 1.x/2.x, SDXL, SD3, Flux), which is what "
                         f"{adapter.path} is placed in; it cannot be merged there")
    placed, unplaced = place(list(adapter.modules), family)
    for row in rows:
        spot = placed.get(row["module"])
        row["lands"] = None if spot is None else [
            {"tensor": name, "rows": None if loc.slice is None else [loc.slice[1], loc.slice[1] + loc.slice[2]],
             "as": list(loc.shape), "module": loc.original or None} for name, loc in spot]
    said = info["base_family"]["family"]
    info["base"] = {"path": str(base.shards[0] if len(base.shards) == 1 else base.folder), "family": family.name,
                    "title": family.title, "layout": family.layout.value,
                    "same_family": None if said is None else family.name in said.split("|")}
    info["placed"] = len(placed)
    info["unplaced"] = [{"module": m, "reason": why} for m, why in unplaced.items()]
    return info


def _format_adapter_file(info: dict[str, Any]) -> list[str]:
    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} ({n})" for k, n in d.items())

    fam = info["base_family"]
    lines = [f"adapter file {info['file']}  ({info['format']})",
             "made for    " + (f"{fam['title'] or 'unknown family'}  (from {fam['from']})" if fam["from"]
                               else "not said (no base-model metadata, no family-specific module names)")
             + (f"\nWARNING     {fam['conflict']}" if fam["conflict"] else ""),
             f"modules     {info['num_modules']} in {info['num_tensors']} tensors: {counts(info['algos'])}"
             + (f"; DoRA on {info['dora']}" if info["dora"] else ""),
             f"ranks       {counts(info['ranks'])}",
             f"alphas      {counts(info['alphas'])}",
             f"prefixes    {counts(info['prefixes'])}"]
    lines += [f"metadata    {k} = {v if len(v) <= 100 else v[:97] + '...'}" for k, v in info["metadata"].items()]
    base = info.get("base")
    if base is not None:
        lines.append(f"base        {base['path']}  ({base['title']}, {base['layout']})"
                     + ("  -- NOT the family the adapter is for" if base["same_family"] is False else ""))
        lines.append(f"placed      {info['placed']} of {info['num_modules']} modules"
                     + (f"; {len(info['unplaced'])} map to nothing (a merge refuses the file)" if info["unplaced"]
                        else ""))
    lines.append("")
    for row in info["modules"]:
        facts = f"{row['algo']}" + (f" r={row['rank']}" if row["rank"] is not None else "") + (
            f" alpha={row['alpha']:g}" if row["alpha"] is not None else "") + (" DoRA" if row["dora"] else "")
        if base is None:
            lines.append(f"  {row['module']}  {facts}")
        elif row["lands"] is not None:
            spots = ", ".join(s["tensor"] + (f"[{s['rows'][0]}:{s['rows'][1]}]" if s["rows"] else "")
                              for s in row["lands"])
            lines.append(f"  {row['module']}  {facts}  -> {spots}")
    for u in info.get("unplaced", []):
        lines.append(f"  {u['module']}  -> NOTHING: {u['reason']}")
    return lines


def _made_by(made: dict[str, Any]) -> list[str]:
    """The line saying which wsurgery command wrote the folder, where its record tells."""
    if not made.get("operation"):
        return []
    return [f"made by     wsurgery {made.get('version', '')} {made['operation']}"
            + (f": {made['command']}" if made.get("command") else "")]


def format_text(info: dict[str, Any]) -> str:
    """A human-readable summary of ``inspect``'s dict."""
    lines: list[str] = []
    if info["type"] == "adapter_file":
        return "\n".join(_format_adapter_file(info))
    if info["type"] == "checkpoint":
        lines.append(f"checkpoint  {info['folder']}  ({info['format']}, {len(info['shards'])} shard(s)"
                     + (f", index {info['index']}" if info["index"] else "") + ")")
        lines.append(f"tensors     {info['num_tensors']}   parameters {info['num_parameters']:,}   "
                     f"bytes {info['total_bytes']:,}")
        lines.append("dtypes      " + ", ".join(f"{k}: {v}" for k, v in info["dtypes"].items()))
        quantized = [t for t in info["tensors"] if "stored_as" in t]
        fmt = next(f for f in registered_formats() if f.name == info["format"])
        own = fmt.describe_lines(info)
        if own is not None:
            lines += own
        elif quantized:
            kinds = Counter(t["stored_as"] for t in quantized)
            lines.append(f"quantized   {len(quantized)} weights encoded "
                         f"({'; '.join(f'{n} as {k}' for k, n in kinds.items())}); listed below as the tensors they "
                         "stand for")
        made = info.get("made_by") or {}
        lines += _made_by(made)
        if (made.get("quantization") or {}).get("merged_into"):
            lines.append(f"merged      into {made['quantization']['merged_into']}, "
                         f"written {made['quantization']['output']}")
        for s in info["shards"]:
            lines.append(f"  {s['file']:<40} {s['tensors']:>6} tensors {s['bytes']:>16,} bytes")
        lines.append("")
        width = max((len(t["name"]) for t in info["tensors"]), default=10)
        for t in info["tensors"]:
            lines.append(f"  {t['name']:<{width}}  {t['dtype']:<9} {str(t['shape']):<20} {t['shard']}"
                         + (f"  [{t['stored_as']}]" if "stored_as" in t else ""))
        return "\n".join(lines)
    lines.append(f"adapter     {info['folder']}  ({info['file']})")
    lines.append(f"method      {info['peft_type']}   PEFT {info['peft_version'] or 'unknown (< 0.18)'}   "
                 + "  ".join(f"{k}={v}" for k, v in info["method"].items()))
    lines.append(f"base model  {info['base_model']}")
    lines.append(f"targets     {info['target_modules']}")
    if info["modules_to_save"]:
        lines.append(f"modules_to_save {info['modules_to_save']}")
    lines.append(f"tensors     {info['num_tensors']}   parameters {info['num_parameters']:,}   "
                 f"dtypes {', '.join(info['dtypes'])}")
    lines.append(f"merge       {info['merge']}   unmerge {info['unmerge']}")
    lines += _made_by(info.get("made_by") or {})
    lines.append("")
    for m in info["modules"]:
        facts = "  ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in m.items() if k not in ("module", "base_tensors", "unmerge"))
        if m["unmerge"] != "exact":
            facts += f"  unmerge={m['unmerge'].split(':')[0]}"
        lines.append(f"  {', '.join(m['base_tensors'])}  {facts}")
    return "\n".join(lines)
