"""bitsandbytes 4-bit checkpoints (QLoRA's NF4, and FP4) as one more checkpoint format.

transformers saves a ``Linear4bit`` weight as six tensors (``weight`` packed codes, ``absmax``,
``quant_map``, and with double quantization ``nested_absmax``, ``nested_quant_map``, plus the packed
JSON ``quant_state.bitsandbytes__nf4``). Here those six are one *logical* tensor: the reader lists
``...q_proj.weight`` with the original dtype and shape and dequantizes it when read; the writer
turns a logical tensor back into the six. So merge, verify and everything else see a plain
checkpoint, and quantize, dequantize and the QLoRA merge are the same streaming engine run with a
different output encoding. The arithmetic lives in ``wsurgery.quant.bnb4bit``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import torch

from ..errors import InputError

if TYPE_CHECKING:
    from ..quant.bnb4bit import QuantState


def _q():
    """The 4-bit arithmetic, imported on first use: opening a plain checkpoint never needs it."""
    from ..quant import bnb4bit

    return bnb4bit
from .dtypes import dtype_name
from .safetensors_file import TensorInfo, TensorSpec

_STATE_MARK = ".quant_state.bitsandbytes__"
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
# Models whose projections are transformers' Conv1D (weight stored (in, out)): transformers
# quantizes their transpose, so the stored state's shape is (out, in).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt", "clvp"})
_CONV1D_LAYERS = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# Output heads transformers keeps in full precision (its "output embedding" rule; BERT's MLM decoder
# is tied to the embeddings). Task heads are "the last module", which transformers 5.x keeps only
# when the model's last parameter is its weight, i.e. when the head has no bias.
_OUTPUT_HEADS = frozenset({"lm_head", "embed_out", "decoder"})
_TASK_HEADS = frozenset({"score", "classifier", "qa_outputs"})
_EMBEDDING = re.compile(r"(^|\.)(embed\w*|wte|wpe|shared|word_embeddings|position_embeddings|"
                        r"token_type_embeddings|tok_embeddings|relative_attention_bias)$")


@dataclass(frozen=True)
class QuantizedTensorInfo:
    """One quantized weight as the logical tensor it stands for; ``parts`` are the stored tensors."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: dict[str, TensorInfo]  # suffix ("" for the packed codes) -> stored tensor
    state: QuantState
    transposed: bool  # Conv1D: the logical (in, out) tensor is the stored state's transpose

    offset = -1  # not addressable as one byte range

    @property
    def file(self) -> Path:
        return self.parts[""].file

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def nbytes(self) -> int:
        """Bytes stored (what reading it costs), not the logical size."""
        return sum(p.nbytes for p in self.parts.values())

    @property
    def encoding(self) -> Bnb4bit:
        return Bnb4bit(self.state.quant_type, self.state.blocksize, self.state.double_quant,
                       self.parts[""].dtype)


@dataclass(frozen=True)
class Bnb4bit:
    """How to store a weight in bitsandbytes 4-bit: quant type, block size, double quant, storage dtype."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    quant_storage: torch.dtype = torch.uint8

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise InputError(f"unknown 4-bit quant type {self.quant_type!r}: expected nf4 or fp4")
        _q().check_blocksize(self.blocksize)

    def stored_specs(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, transposed: bool) -> list[TensorSpec]:
        """The six (or four) tensors ``name`` becomes, known before any data: the JSON's length only as a bound."""
        shape = tuple(shape[::-1]) if transposed else tuple(shape)
        specs = _stored_specs(self.quant_type, self.blocksize, dtype, shape, self.double_quant, self.quant_storage)
        out = []
        for suffix, (sdtype, sshape) in specs.items():
            full = f"{name}.{suffix}" if suffix else name
            if suffix.startswith("quant_state."):
                bound = _q().QuantState.max_json_len(self.quant_type, self.blocksize, dtype, shape, self.double_quant)
                out.append(TensorSpec(full, sdtype, (bound,), late=True))
            else:
                out.append(TensorSpec(full, sdtype, tuple(sshape)))
        return out

    def encode(self, name: str, tensor: torch.Tensor, transposed: bool) -> dict[str, torch.Tensor]:
        """Stored tensors for the logical ``tensor`` (already in the dtype the JSON should record)."""
        w = tensor.T.contiguous() if transposed else tensor
        parts, _ = _q().quantize_4bit(w, quant_type=self.quant_type, blocksize=self.blocksize,
                                 double_quant=self.double_quant, quant_storage=self.quant_storage)
        return {f"{name}.{s}" if s else name: t for s, t in parts.items()}

    def roundtrip(self, tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
        """dequant(quant(tensor)): the weight a QLoRA adapter was trained against, in tensor's dtype."""
        w = tensor.T.contiguous() if transposed else tensor
        parts, _ = _q().quantize_4bit(w, quant_type=self.quant_type, blocksize=self.blocksize,
                                 double_quant=self.double_quant, quant_storage=self.quant_storage)
        back = _q().dequantize_4bit(parts, where="round trip")
        return back.T.contiguous() if transposed else back

    def config(self, compute_dtype: torch.dtype, skip_modules: list[str]) -> dict:
        """``quantization_config`` as transformers' ``BitsAndBytesConfig.to_dict()`` writes it."""
        return {
            "_load_in_4bit": True, "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": dtype_name(compute_dtype),
            "bnb_4bit_quant_storage": dtype_name(self.quant_storage),
            "bnb_4bit_quant_type": self.quant_type, "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip_modules, "llm_int8_threshold": 6.0,
            "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
        }


def _stored_specs(quant_type: str, blocksize: int, dtype: torch.dtype, shape: tuple[int, ...], double_quant: bool,
                  storage: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    state = _q().QuantState(quant_type, blocksize, dtype, shape, 0.0 if double_quant else None)
    return state.stored_specs(storage)


def is_conv1d(module: str, config: dict | None) -> bool:
    return (config or {}).get("model_type") in CONV1D_MODEL_TYPES and module.rpartition(".")[2] in _CONV1D_LAYERS


def group_quantized(tensors: dict[str, TensorInfo], read_bytes: Callable[[TensorInfo], bytes],
                    config: dict | None, where: str) -> dict[str, TensorInfo | QuantizedTensorInfo]:
    """Replace each quantized weight's stored tensors by one ``QuantizedTensorInfo``, in file order.

    Every part is checked against the packed JSON now, so a broken checkpoint fails before any work.
    """
    states = [n for n in tensors if _STATE_MARK in n]
    if not states:
        return tensors
    grouped: dict[str, TensorInfo | QuantizedTensorInfo] = {}
    owned: dict[str, str] = {}
    infos: dict[str, QuantizedTensorInfo] = {}
    for state_name in states:
        name = state_name[: state_name.index(_STATE_MARK)]
        where_t = f"{where}: {name}"
        if name not in tensors:
            raise InputError(f"{where_t}: the quant state {state_name} has no packed weight {name}; "
                             "the checkpoint is incomplete")
        state = _q().QuantState.from_json_bytes(read_bytes(tensors[state_name]), where_t)
        if not state_name.endswith("__" + state.quant_type):
            raise InputError(f"{where_t}: {state_name} holds a {state.quant_type} state; the name says otherwise")
        parts = {"": tensors[name], state_name[len(name) + 1:]: tensors[state_name]}
        for suffix in _PARTS:
            if f"{name}.{suffix}" in tensors:
                parts[suffix] = tensors[f"{name}.{suffix}"]
        _check_parts(parts, state, where_t)
        _check_finite_state(parts, read_bytes, where_t)
        transposed = is_conv1d(name.rpartition(".")[0], config)
        shape = tuple(state.shape[::-1]) if transposed else tuple(state.shape)
        infos[name] = QuantizedTensorInfo(name, state.dtype, shape, parts, state, transposed)
        for p in parts.values():
            owned[p.name] = name
    for n, info in tensors.items():
        owner = owned.get(n)
        if owner is None:
            grouped[n] = info
        elif owner not in grouped:
            grouped[owner] = infos[owner]
    return grouped


def _check_parts(parts: dict[str, TensorInfo], state: QuantState, where: str) -> None:
    storage = parts[""].dtype
    expected = state.stored_specs(storage)
    for suffix, (dtype, shape) in expected.items():
        if suffix.startswith("quant_state."):
            continue
        got = parts.get(suffix)
        label = suffix or "packed weight"
        if got is None:
            raise InputError(f"{where}: missing {label} tensor ({where.split(': ')[-1]}.{suffix}); the quantized "
                             "checkpoint is incomplete")
        if got.dtype != dtype or int(torch.Size(got.shape).numel()) != int(torch.Size(shape).numel()):
            raise InputError(f"{where}: {label} is {dtype_name(got.dtype)}{list(got.shape)} but its quant state "
                             f"(shape {list(state.shape)}, blocksize {state.blocksize}) needs "
                             f"{dtype_name(dtype)}{list(shape)}")
    extra = set(parts) - set(expected) - {s for s in parts if s.startswith("quant_state.")}
    if extra:
        raise InputError(f"{where}: {sorted(extra)} present but the quant state says no double quantization")


# The small float32 parts of a quant state, read when the checkpoint is opened (the absmax vector of
# a weight without double quantization is checked where it is read, when the weight is dequantized).
_STATE_PARTS = ("quant_map", "nested_absmax", "nested_quant_map")


def _check_finite_state(parts: dict[str, TensorInfo], read_bytes: Callable[[TensorInfo], bytes], where: str) -> None:
    """Refuse inf/NaN in a quant state's code books and nested scales: a damaged file, never bitsandbytes' output."""
    for suffix in _STATE_PARTS:
        if suffix in parts:
            values = torch.frombuffer(bytearray(read_bytes(parts[suffix])), dtype=torch.float32)
            if not bool(torch.isfinite(values).all()):
                raise InputError(f"{where}: {parts[suffix].name} holds inf or NaN; the quantized checkpoint is damaged")


def dequantize_info(info: QuantizedTensorInfo, read: Callable[[TensorInfo], torch.Tensor]) -> torch.Tensor:
    """The logical tensor, in its original dtype."""
    parts = {suffix: read(p) for suffix, p in info.parts.items()}
    w = _q().dequantize_4bit(parts, where=info.name)
    return w.T.contiguous() if info.transposed else w


def compile_skip(pattern: str) -> re.Pattern:
    """One ``--skip-modules`` regex, compiled before any work; InputError naming it if it is not one."""
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise InputError(f"--skip-modules {pattern!r} is not a valid regular expression ({e}); quote or escape it") \
            from None


def linear_weights(tensors: dict[str, TensorInfo | QuantizedTensorInfo], config: dict | None,
                   skip: Iterable[str] = ()) -> tuple[dict[str, bool], list[str]]:
    """The weights transformers would replace with ``Linear4bit`` (name -> is Conv1D), and the modules
    with 2-D weights left in full precision (for ``llm_int8_skip_modules``).

    Linear weights are told from embeddings by name, since the files hold no layer types: 2-D
    ``*.weight`` tensors except embeddings, output heads, bias-free task heads, and ``skip`` (regexes,
    searched in module paths).
    """
    patterns = [compile_skip(p) for p in skip]
    modules = [n[: -len(".weight")] for n, t in tensors.items()
               if n.endswith(".weight") and len(t.shape) == 2 and t.dtype.is_floating_point]
    heads = {m for m in modules if m.rpartition(".")[2] in _OUTPUT_HEADS
             or (m.rpartition(".")[2] in _TASK_HEADS and f"{m}.bias" not in tensors)}
    chosen: dict[str, bool] = {}
    # A tied output head is not in the files but is a Linear in the model: keep it out of 4-bit too.
    kept: list[str] = [] if "lm_head" in modules else ["lm_head"]
    for m in modules:
        if m in heads or _EMBEDDING.search(m) or any(p.search(m) for p in patterns):
            kept.append(m)
        else:
            chosen[f"{m}.weight"] = is_conv1d(m, config)
    return chosen, kept


def quantization_record(config: dict | None) -> dict | None:
    q = (config or {}).get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == "bitsandbytes" else None


def write_config(path: Path, update: Callable[[dict], None]) -> None:
    """Apply ``update`` to ``config.json`` in place, if there is one."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    update(config)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
