"""Model cards for pushed folders: the YAML front matter the Hub reads, and a body saying how the
weights were made.

What a card says comes from, first found: the provenance the writing command hands over, the
``"wsurgery"`` record in ``config.json`` (or ``adapter_config.json``), and what the folder shows by
itself (an adapter config names its base; a ``quantization_config`` means quantized weights).
The record's format::

    "wsurgery": {"version": "0.1.0", "operation": "merge", "command": "wsurgery merge base lora out",
                 "base": "org/base", "adapters": [{"source": "user/lora", "peft_type": "LORA", "weight": 1.0}],
                 "quantization": {"quant_type": "nf4", "blocksize": 64, "double_quant": true}}
"""

from __future__ import annotations

import json
import re
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
        found = ["wsurgery", self.operation, *(str(a.get("peft_type", "")).lower() for a in self.adapters),
                 (self.quantization or {}).get("quant_type"), "gguf" if self.kind == "gguf" else None]
        return list(dict.fromkeys(str(t) for t in found if t))


def model_card(folder: Path, repo_id: str, provenance: dict[str, Any] | None = None) -> str:
    """The README.md to push with ``folder`` when it has none of its own."""
    return render_card(card_facts(folder, provenance), repo_id)


def provenance(operation: str, command: str, base: str | None = None,
               adapters: list[tuple[str, float]] = (), quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``"wsurgery"`` record of a command's output (``command`` with any token already hidden)."""
    from . import __version__

    return {"version": __version__, "operation": operation, "command": command, "base": base,
            "adapters": [{"source": source, "peft_type": _peft_type(source), "weight": weight}
                         for source, weight in adapters],
            "quantization": quantization}


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
    record = provenance or config.get(PROVENANCE_KEY) or adapter_config.get(PROVENANCE_KEY)
    record = record if isinstance(record, dict) else {}
    kind = "adapter" if adapter_config else "gguf" if any(folder.glob("*.gguf")) else "model"
    facts = CardFacts(kind, base=record.get("base"), operation=record.get("operation"),
                      adapters=[a for a in record.get("adapters") or [] if isinstance(a, dict)],
                      quantization=record.get("quantization"),
                      command=record.get("command"), version=record.get("version"))
    if adapter_config:
        facts.base = facts.base or adapter_config.get("base_model_name_or_path")
        facts.adapters = facts.adapters or [{"peft_type": adapter_config.get("peft_type")}]
    if facts.quantization is None and isinstance(config.get("quantization_config"), dict):
        facts.quantization = _quantization_from_config(config["quantization_config"])
    return facts


def render_card(facts: CardFacts, repo_id: str) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=facts.base if _is_repo_id(facts.base) else None,
                         base_model_relation=facts.relation, library_name=facts.library, tags=facts.tags)
    lines = [f"# {repo_id.split('/')[-1]}", "", _summary(facts), ""]
    if facts.base:
        lines.append(f"- Base model: `{facts.base}`")
    if facts.adapters and facts.kind != "adapter":
        lines.append(f"- Adapter{'s' if len(facts.adapters) > 1 else ''}: "
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
        return f"A {methods} adapter for {base}."
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
    from .hub import looks_like_repo_id

    return bool(name) and looks_like_repo_id(name)


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
