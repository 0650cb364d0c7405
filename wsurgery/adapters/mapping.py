"""Map the module paths an adapter names onto the tensor names of a base checkpoint.

The adapter names modules as they were in the model PEFT wrapped (``model.layers.0.q_proj`` for a
``LlamaForCausalLM``); a checkpoint may have been saved from the bare model (``layers.0.q_proj``) or
from a model with a task head (``bert.encoder...`` vs ``encoder...``). One renaming is chosen for the
whole adapter: unchanged names, a stripped leading prefix, or an added one. A renaming must account
for every module; if none does, or several different ones do, that is an error, never a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

from ..errors import InputError

Rename = tuple[str, Callable[[str], str | None]]


def _as_saved(module: str) -> str:
    return module


def _without_first(module: str, k: int) -> str | None:
    return ".".join(module.split(".")[k:]) if module.count(".") >= k else None


def _with_prefix(module: str, prefix: str) -> str:
    return f"{prefix}.{module}"


def _renamings(base_prefixes: Iterable[str]) -> list[Rename]:
    out: list[Rename] = [("as saved", _as_saved)]
    for k in (1, 2):
        out.append((f"without the first {k} name component{'s' if k > 1 else ''}", partial(_without_first, k=k)))
    for prefix in sorted(base_prefixes):
        out.append((f"with prefix {prefix!r}", partial(_with_prefix, prefix=prefix)))
    return out


def map_modules(modules: list[str], base_tensor_names: Iterable[str], adapter_desc: str,
                base_desc: str) -> dict[str, str]:
    """Return ``{adapter module path: base module path}`` for every module, or raise ``InputError``."""
    names = list(base_tensor_names)
    base_modules = {n.rpartition(".")[0] for n in names}
    prefixes = {n.split(".", 1)[0] for n in names if "." in n}
    results: list[tuple[str, dict[str, str], list[str]]] = []
    for desc, rename in _renamings(prefixes):
        mapped, missing = {}, []
        for m in modules:
            target = rename(m)
            if target is not None and target in base_modules:
                mapped[m] = target
            else:
                missing.append(m)
        results.append((desc, mapped, missing))
        if desc == "as saved" and not missing:
            return mapped
    complete = [(d, mp) for d, mp, miss in results if not miss]
    distinct = {tuple(sorted(mp.items())) for _, mp in complete}
    if len(distinct) == 1:
        return complete[0][1]
    if len(distinct) > 1:
        options = "; ".join(d for d, _ in complete)
        raise InputError(f"{adapter_desc}: its module names fit {base_desc} in several ways ({options}); "
                         "the base and the adapter do not belong together unambiguously")
    desc, mapped, missing = max(results, key=lambda r: len(r[1]))
    shown = ", ".join(repr(m) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    raise InputError(
        f"{adapter_desc}: {len(missing)} of {len(modules)} adapted modules are not in {base_desc} "
        f"(e.g. {shown}); is this the base model the adapter was trained on?"
    )
