"""``inspect``: what is in a checkpoint or an adapter, as a dict (for --json) or a short text."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .adapters import Adapter, load_adapter, map_modules
from .checkpoint.dtypes import dtype_name
from .checkpoint.formats import open_checkpoint, registered_formats
from .checkpoint.reader import Checkpoint
from .hub_inputs import resolve
from .model_card import adapter_record


def inspect(path: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    """Describe a checkpoint, or an adapter (with ``base``: also the base tensors it will change)."""
    local = resolve(path, kind="adapter")
    if (local / "adapter_config.json").is_file() or local.name == "adapter_config.json":
        base_ckpt = open_checkpoint(resolve(base)) if base is not None else None
        return describe_adapter(load_adapter(local), base_ckpt)
    return describe_checkpoint(open_checkpoint(resolve(path)))


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


def _made_by(made: dict[str, Any]) -> list[str]:
    """The line saying which wsurgery command wrote the folder, where its record tells."""
    if not made.get("operation"):
        return []
    return [f"made by     wsurgery {made.get('version', '')} {made['operation']}"
            + (f": {made['command']}" if made.get("command") else "")]


def format_text(info: dict[str, Any]) -> str:
    """A human-readable summary of ``inspect``'s dict."""
    lines: list[str] = []
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
