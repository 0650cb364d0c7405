"""Load a PEFT adapter folder and group its tensors by the module they change.

Key rules (PEFT strips the adapter name before saving): per-module tensors are
``base_model.model.<module>.<param>`` where ``<param>`` starts with a name the method owns
(``lora_A.weight``); tensors held by the whole model are ``base_model.<name>``; anything else is a
full tensor that replaces a base tensor (``modules_to_save``, saved biases, or a ``.base_layer.``
copy of a targeted embedding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

import torch

from ..checkpoint.reader import _load_bin, check_weights_file
from ..checkpoint.safetensors_file import read_header, read_tensor
from ..errors import InputError, UnsupportedError
from ..methods import AdapterContext, Method, ModuleParams, Patch, ReplacePatch, get_method
from ..methods.trainable_tokens import PARAM as TOKENS_PARAM
from ..methods.trainable_tokens import token_indices_for, token_patch
from .config import AdapterConfig, load_config

MODEL_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."

_T = TypeVar("_T")


@dataclass
class Replacement:
    """A full tensor the adapter saved for one base tensor."""

    tensor: torch.Tensor
    key: str
    # True for a copy of the frozen base tensor itself (``.base_layer.weight`` of a targeted or
    # resized embedding, ``.original_module.`` of a modules_to_save wrapper): undoing the adapter
    # leads back to exactly this tensor. False for trained values (modules_to_save, biases).
    is_base_copy: bool


@dataclass
class Adapter:
    """A PEFT adapter, read and grouped; tensors are small enough to hold in memory.

    Besides the method's own per-module tensors, PEFT's auxiliary wrappers that any method may carry
    become patches too: ``modules_to_save`` and saved biases (``replacements``) and trainable tokens
    (``tokens``).
    """

    folder: Path
    file: Path
    config: AdapterConfig
    method: Method
    modules: dict[str, ModuleParams] = field(default_factory=dict)
    replacements: dict[str, list[Replacement]] = field(default_factory=dict)  # by adapter-side tensor name
    context: AdapterContext = field(default_factory=AdapterContext)
    tokens: list[Patch] = field(default_factory=list)  # ``trainable_token_indices`` rows, any method
    method_patches: list[Patch] = field(default_factory=list)  # built once, by ``load_adapter``
    num_tensors: int = 0
    num_parameters: int = 0
    dtypes: set[torch.dtype] = field(default_factory=set)

    def patches(self) -> list[Patch]:
        """One patch per changed module or replaced tensor, replacements first."""
        out: list[Patch] = []
        for name, reps in self.replacements.items():
            module, _, role = name.rpartition(".")
            trained = [r for r in reps if not r.is_base_copy]
            copies = [r for r in reps if r.is_base_copy]
            new = trained[0] if trained else copies[0]
            original = copies[0].tensor if copies else None
            out.append(ReplacePatch(module, role, new.tensor, new.key, original))
        return out + self.tokens + self.method_patches


def _read_adapter_tensors(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        check_weights_file(st, folder)  # a link out of the folder would merge (and publish) a file never named
        infos, _ = read_header(st)
        return st, {name: read_tensor(info) for name, info in infos.items()}
    pt = folder / "adapter_model.bin"
    if pt.is_file():
        check_weights_file(pt, folder)
        return pt, {k: v.clone() for k, v in _load_bin(pt).items()}
    raise InputError(f"{folder}: no adapter_model.safetensors or adapter_model.bin next to adapter_config.json")


class _ReadTracker(dict[str, torch.Tensor]):
    """A module's saved tensors that remember which of them the method read, so none is ignored."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(tensors)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    @overload
    def get(self, key: str, default: None = None, /) -> torch.Tensor | None: ...
    @overload
    def get(self, key: str, default: torch.Tensor, /) -> torch.Tensor: ...
    @overload
    def get(self, key: str, default: _T, /) -> torch.Tensor | _T: ...

    def get(self, key: str, default: object = None, /) -> object:
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def _build_patches(adapter: Adapter, keys: dict[tuple[str, str], str]) -> None:
    """Build every module's patch, and refuse saved tensors the method never looked at."""
    shared = adapter.context.shared = _ReadTracker(adapter.context.shared)
    for module, params in adapter.modules.items():
        params.tensors = tracker = _ReadTracker(params.tensors)
        adapter.method_patches.append(adapter.method.patch(params))
        unused = sorted(set(tracker) - tracker.read)
        params.tensors = dict(tracker)
        if unused:
            shown = ", ".join(repr(keys[(module, u)]) for u in unused[:3])
            raise InputError(f"{adapter.file}: tensor(s) {shown} mean nothing to {adapter.config.peft_type} "
                             "and would be ignored; the adapter file is damaged or does not match its config")
    unused = sorted(set(shared) - shared.read)
    adapter.context.shared = dict(shared)
    if unused:
        shown = ", ".join(repr(SHARED_PREFIX + u) for u in unused[:3])
        raise InputError(f"{adapter.file}: model-wide tensor(s) {shown} mean nothing to {adapter.config.peft_type} "
                         "and would be ignored; the adapter file is damaged or does not match its config")


def load_adapter(path: str | Path, options: dict[str, Any] | None = None) -> Adapter:
    """Read ``adapter_config.json`` and the adapter weights, group them by module and build the patches.

    ``options`` are user choices for methods that need them (e.g. Poly's ``task_id``); an option
    the adapter's method does not understand is an error rather than silently ignored.
    """
    folder = Path(path)
    if folder.is_file() and folder.name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{path}: no such adapter folder")
    config = load_config(folder)
    method = get_method(config)
    method.check_config(config)
    file, tensors = _read_adapter_tensors(folder)
    if not tensors:
        raise InputError(f"{file}: holds no tensors")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - method.option_names)
    if unknown:
        raise UnsupportedError(f"{folder}: option(s) {', '.join(unknown)} do not apply to {config.peft_type} adapters")
    adapter = Adapter(folder, file, config, method, context=AdapterContext(options=options))
    keys: dict[tuple[str, str], str] = {}  # (module, param) -> the key in the file, for messages
    prefix = method.key_prefix
    for key, tensor in tensors.items():
        adapter.num_tensors += 1
        adapter.num_parameters += tensor.numel()
        adapter.dtypes.add(tensor.dtype)
        if key.startswith(MODEL_PREFIX):
            rest = key[len(MODEL_PREFIX):]
        elif key.startswith(SHARED_PREFIX):
            name = key[len(SHARED_PREFIX):]
            if name.split(".")[0] not in method.shared_names:
                raise InputError(f"{file}: holds model-wide tensor {key!r}, which {config.peft_type} does not use; "
                                 "the adapter file and its config disagree")
            adapter.context.shared[name] = tensor
            continue
        else:
            rest = key  # very old PEFT and some tools save without the prefix
        parts = rest.split(".")
        if parts[-2:] == ["token_adapter", TOKENS_PARAM]:
            # PEFT's TrainableTokens wrapper, which any method may carry (``trainable_token_indices``).
            module = ".".join(parts[:-2])
            indices = token_indices_for(config.get("trainable_token_indices"), module, str(config.path))
            adapter.tokens.append(token_patch(module, tensor, indices, key))
            continue
        cut = next((i for i, p in enumerate(parts) if p in method.param_names), None)
        stray = next((p for p in parts if prefix and p.startswith(prefix)), None) if cut is None else None
        if stray is not None:
            raise UnsupportedError(f"{file}: tensor {key!r}: {stray!r} has {config.peft_type}'s prefix {prefix!r} "
                                   f"but is no {config.peft_type} tensor wsurgery knows (a newer PEFT variant?); "
                                   "refused rather than read as a module path")
        if cut is not None and cut > 0:
            module, param = ".".join(parts[:cut]), ".".join(parts[cut:])
            params = adapter.modules.setdefault(module, ModuleParams(module, {}, config, adapter.context))
            params.tensors[param] = tensor
            keys[(module, param)] = key
        else:
            # LoRA freezes the wrapped weight, so a saved ``base_layer.weight`` is the base's own tensor;
            # biases under ``base_layer`` are trained (bias="all"/"lora_only").
            is_copy = "original_module" in parts or ("base_layer" in parts and parts[-1] != "bias")
            name = ".".join(p for p in parts if p not in ("base_layer", "original_module", "modules_to_save"))
            if "." not in name:
                raise InputError(f"{file}: tensor {key!r} names no module; cannot tell what it changes")
            reps = adapter.replacements.setdefault(name, [])
            for other in reps:
                if other.is_base_copy == is_copy and not torch.equal(other.tensor, tensor):
                    raise InputError(f"{file}: tensors {other.key!r} and {key!r} both replace {name} with "
                                     "different values; the adapter file is inconsistent")
            reps.append(Replacement(tensor, key, is_copy))
    adapter.context.modules = tuple(adapter.modules)
    _build_patches(adapter, keys)
    return adapter
