"""Model cards for pushed folders: the YAML front matter the Hub reads, and a body saying how the
weights were made.

What a card says comes from, first found: the provenance the writing command hands over, the
``"wsurgery"`` record (in ``config.json``; in an adapter, a JSON string under that key of
``adapter_model.safetensors``' ``__metadata__``, where PEFT does not see it: PEFT warns of unknown
``adapter_config.json`` keys as of a newer PEFT), and what the folder shows by itself (its config's
``_name_or_path`` or an adapter config's base; a ``quantization_config`` means quantized weights).
The record's format::

    "wsurgery": {"version": "0.1.0", "operation": "merge", "command": "wsurgery merge base org/lora out",
                 "base": "base", "base_sha256": "9f2c...",
                 "adapters": [{"source": "org/lora", "peft_type": "LORA", "weight": 1.0}],
                 "quantization": {"quant_type": "nf4", "blocksize": 64, "double_quant": true}}

The record is published with the folder, so it holds no local path: a Hub input is kept as the repo
id given, a local one as its folder (or file) name with the sha256 of what identifies its weights (an
adapter's weights file, a checkpoint's index, else its single weights file), and the command line
with every path cut down to its last component.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROVENANCE_KEY = "wsurgery"
# A token must never reach a card, even where a recorded command line carries one.
_SECRETS = [(re.compile(r"(--token[= ])\S+"), r"\1***"), (re.compile(r"\bhf_[A-Za-z0-9]{16,}\b"), "***")]


@dataclass
class CardFacts:
    """What the card states; None where the folder and its records do not tell."""

    kind: str  # "model", "adapter" or "gguf"
    base: str | None = None
    operation: str | None = None
    adapters: list[dict[str, Any]] = field(default_factory=list)
    quantization: dict[str, Any] | None = None
    command: str | None = None
    version: str | None = None
    base_sha256: str | None = None
    tuned: str | None = None  # extract's fine-tune
    method: str | None = None  # an adapter folder's own peft_type

    @property
    def relation(self) -> str | None:
        """The Hub's ``base_model_relation``: only where it is true of these weights."""
        if self.kind == "adapter":
            return "adapter"
        if self.operation == "merge":
            return "merge"
        return "quantized" if self.quantization else None

    @property
    def library(self) -> str:
        return {"adapter": "peft", "gguf": "gguf"}.get(self.kind, "transformers")

    @property
    def tags(self) -> list[str]:
        # An adapter is tagged with its own method; a model with the methods of the adapters merged into it.
        methods = [self.method] if self.kind == "adapter" else [a.get("peft_type") for a in self.adapters]
        found = ["wsurgery", self.operation, *(str(m or "").lower() for m in methods),
                 (self.quantization or {}).get("quant_type"), "gguf" if self.kind == "gguf" else None]
        return list(dict.fromkeys(str(t) for t in found if t))


def model_card(folder: Path, repo_id: str, provenance: dict[str, Any] | None = None) -> str:
    """The README.md to push with ``folder`` when it has none of its own."""
    return render_card(card_facts(folder, provenance), repo_id)


def provenance(operation: str, command: str | None, base: str | None = None,
               adapters: Sequence[tuple[str, float]] = (), quantization: dict[str, Any] | None = None,
               **extra: str | None) -> dict[str, Any]:
    """The ``"wsurgery"`` record of a command's output (``command`` with any token already hidden).

    ``base`` and ``adapters`` are the inputs as given; ``extra`` names other checkpoint inputs (extract's
    ``tuned``), recorded like ``base``.
    """
    from . import __version__

    record: dict[str, Any] = {"version": __version__, "operation": operation, "command": public_command(command)}
    for role, spec in {"base": base, **extra}.items():
        name, digest = _source(spec, "model")
        record[role] = name
        if digest:
            record[f"{role}_sha256"] = digest
    record["adapters"] = []
    for spec, weight in adapters:
        name, digest = _source(str(spec), "adapter")
        record["adapters"].append({"source": name, **({"sha256": digest} if digest else {}),
                                   "peft_type": _peft_type(str(spec)), "weight": weight})
    record["quantization"] = quantization
    return record


def public_command(command: str | None) -> str | None:
    """The command line as it may be published: every path (an argument that exists here, or has a
    folder part and is no repo id) cut down to its last component; repo ids, numbers, words kept."""
    if command is None:
        return None
    words = []
    for word in command.split(" "):
        flag, eq, value = word.partition("=") if word.startswith("-") else ("", "", word)
        words.append(flag + eq + _public(value) if not word.startswith("-") or eq else word)
    return " ".join(words)


def _public(value: str) -> str:
    head, sep, weight = value.rpartition(":")
    if sep and head and re.fullmatch(r"[-+]?[\d.]+(e[-+]?\d+)?", weight):  # ADAPTER:WEIGHT
        return _public(head) + sep + weight
    path = Path(value)
    if _is_repo_id(value) and not path.parent.exists():
        return value
    if path.exists() or "/" in value or os.sep in value or value.startswith("~"):
        return path.name or value
    return value


def _source(spec: str | None, kind: str) -> tuple[str | None, str | None]:
    """An input as the record names it: a repo id as given (or as the Hub cache snapshot it was resolved
    to names it); a local path as its name, with the sha256 of the file that identifies its weights."""
    from .hub_inputs import cached_repo_id

    if spec is None:
        return None, None
    if _is_repo_id(str(spec)):
        return str(spec), None
    repo_id = cached_repo_id(Path(spec))
    if repo_id is not None:
        return repo_id, None
    path = Path(spec).resolve()
    weights = _identifying_file(path, kind)
    return path.name, _sha256(weights) if weights else None


def _identifying_file(path: Path, kind: str) -> Path | None:
    """An adapter's weights file; a checkpoint's index, else its one weights file."""
    if path.is_file() and path.name != "adapter_config.json":
        return path
    folder = path.parent if path.is_file() else path
    if kind == "adapter":
        return next((f for f in (folder / "adapter_model.safetensors", folder / "adapter_model.bin") if f.is_file()),
                    None)
    from .checkpoint.formats import open_checkpoint

    ckpt = open_checkpoint(folder)
    return ckpt.index_file or (ckpt.shards[0] if len(ckpt.shards) == 1 else None)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_record(folder: Path) -> dict[str, Any]:
    """The ``"wsurgery"`` record of an adapter folder written by extract, combine or convert ({} if none)."""
    from .checkpoint.safetensors_file import read_header
    from .errors import WsurgeryError

    weights = folder / "adapter_model.safetensors"
    try:
        record = json.loads(read_header(weights)[1].get(PROVENANCE_KEY, "{}")) if weights.is_file() else {}
    except (WsurgeryError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _peft_type(source: str) -> str | None:
    """An adapter's method from its config: the local folder, or the Hub cache (no request made)."""
    config = Path(source) / "adapter_config.json"
    if not config.is_file() and _is_repo_id(source):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "adapter_config.json")
        config = Path(cached) if isinstance(cached, str) else config
    return _read_json(config).get("peft_type")


def card_facts(folder: Path, provenance: dict[str, Any] | None = None) -> CardFacts:
    config = _read_json(folder / "config.json")
    adapter_config = _read_json(folder / "adapter_config.json")
    record = provenance or config.get(PROVENANCE_KEY) or adapter_config.get(PROVENANCE_KEY) or \
        (adapter_record(folder) if adapter_config else None)
    record = record if isinstance(record, dict) else {}
    kind = "adapter" if adapter_config else "gguf" if any(folder.glob("*.gguf")) else "model"
    facts = CardFacts(kind, base=record.get("base"), operation=record.get("operation"),
                      adapters=[a for a in record.get("adapters") or [] if isinstance(a, dict)],
                      quantization=record.get("quantization"),
                      command=record.get("command"), version=record.get("version"),
                      base_sha256=record.get("base_sha256"), tuned=record.get("tuned"))
    if adapter_config:
        facts.method = adapter_config.get("peft_type")
        facts.base = facts.base or adapter_config.get("base_model_name_or_path")
    name_or_path = config.get("_name_or_path")
    if not facts.base and isinstance(name_or_path, str) and _is_repo_id(name_or_path):
        facts.base = name_or_path  # transformers' save_pretrained records where the model came from
    if facts.quantization is None and isinstance(config.get("quantization_config"), dict):
        facts.quantization = _quantization_from_config(config["quantization_config"])
    return facts


def render_card(facts: CardFacts, repo_id: str) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=facts.base if _is_repo_id(facts.base) else None,
                         base_model_relation=facts.relation, library_name=facts.library, tags=facts.tags)
    lines = [f"# {repo_id.split('/')[-1]}", "", _summary(facts), ""]
    if facts.base:
        lines.append(f"- Base model: `{facts.base}`" + (f" (sha256 {facts.base_sha256})" if facts.base_sha256 else ""))
    if facts.tuned:
        lines.append(f"- Fine-tuned model: `{facts.tuned}`")
    if facts.adapters and (facts.kind != "adapter" or facts.operation in ("combine", "convert")):
        plural = "s" if len(facts.adapters) > 1 else ""
        lines.append(f"- {'Made from a' if facts.kind == 'adapter' else 'A'}dapter{plural}: "
                     + ", ".join(_describe_adapter(a) for a in facts.adapters))
    if facts.quantization:
        lines.append(f"- Quantization: {_describe_quantization(facts.quantization)}")
    made_with = f"wsurgery {facts.version}" if facts.version else "wsurgery"
    lines.append(f"- Made with {made_with}" + (f": `{_redact(facts.command)}`" if facts.command else ""))
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def _summary(facts: CardFacts) -> str:
    base = f"`{facts.base}`" if facts.base else "the base model"
    methods = "/".join(dict.fromkeys(str(a.get("peft_type") or "PEFT") for a in facts.adapters)) or "PEFT"
    if facts.kind == "adapter":
        made = {"extract": f", extracted from the difference between `{facts.tuned}` and {base}",
                "combine": ", the weighted sum of other adapters' changes",
                "convert": f", converted from a {methods} adapter"}.get(facts.operation or "", "")
        return f"A {facts.method or methods} adapter for {base}{made}."
    if facts.operation == "merge":
        return f"The weights of {base} with the {methods} adapter merged in."
    if facts.operation == "unmerge":
        return f"The weights of {base} with the {methods} adapter taken out again."
    if facts.quantization:
        return f"The weights of {base}, quantized ({_describe_quantization(facts.quantization)})."
    if facts.operation:
        return f"Weights written by `wsurgery {facts.operation}` from {base}."
    return "Model weights pushed with wsurgery."


def _describe_adapter(adapter: dict[str, Any]) -> str:
    source = f"`{adapter['source']}`" if adapter.get("source") else "an adapter"
    details = [str(adapter["peft_type"])] if adapter.get("peft_type") else []
    if adapter.get("sha256"):
        details.append(f"sha256 {adapter['sha256']}")
    if adapter.get("weight") is not None:
        details.append(f"weight {adapter['weight']}")
    return source + (f" ({', '.join(details)})" if details else "")


def _describe_quantization(q: dict[str, Any]) -> str:
    parts = [str(q.get("quant_type") or q.get("quant_method") or "quantized")]
    if q.get("blocksize"):
        parts.append(f"block size {q['blocksize']}")
    if q.get("double_quant"):
        parts.append("double quantization")
    return ", ".join(parts)


def _quantization_from_config(qc: dict[str, Any]) -> dict[str, Any]:
    """transformers' ``quantization_config`` (bitsandbytes and others) in the record's terms."""
    quant_type = qc.get("bnb_4bit_quant_type") if qc.get("load_in_4bit") else "int8" if qc.get("load_in_8bit") else None
    return {"quant_type": quant_type or qc.get("quant_method"), "quant_method": qc.get("quant_method"),
            "double_quant": qc.get("bnb_4bit_use_double_quant")}


def _is_repo_id(name: str | None) -> bool:
    from .hub_inputs import looks_like_repo_id

    return looks_like_repo_id(name) if name else False


def _redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or {} where there is none (the folder check reports broken files)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
