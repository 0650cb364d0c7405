"""The support table, generated from the method registry so that it cannot drift from the code."""

from __future__ import annotations

from .methods import Support, not_mergeable, registered

# Changes every method may carry (PEFT's auxiliary wrappers), handled outside any one method.
_GENERIC = (
    Support("modules_to_save (resized vocabularies too), bias=\"all\"/\"lora_only\"", "any",
            "replaces the tensor", "only where the adapter saved the original (original_module, base_layer.weight)",
            "0.21.2"),
)


def support_rows() -> list[Support]:
    """Every mergeable method's rows, in peft_type order, then the generic ones."""
    seen: set[int] = set()
    rows: list[Support] = []
    for _, method in sorted(registered().items()):
        if id(method) not in seen:
            seen.add(id(method))
            rows.extend(method.support)
    return rows + list(_GENERIC)


def support_markdown() -> str:
    lines = ["| method | layers | merge | unmerge | PEFT versions tested |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.layers} | {r.merge} | {r.unmerge} | {r.peft_versions} |" for r in support_rows()]
    lines += ["", "Refused, with the reason (no weight-space change to fold in):", ""]
    lines += [f"- `{t}`: {why}" for t, why in sorted(not_mergeable().items())]
    return "\n".join(lines) + "\n"
