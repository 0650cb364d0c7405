"""bitsandbytes 4-bit (QLoRA's NF4, and FP4), byte-identical to bitsandbytes' quantizer.

transformers saves a ``Linear4bit`` weight as six tensors (``weight`` packed codes, ``absmax``,
``quant_map``, and with double quantization ``nested_absmax``, ``nested_quant_map``, plus the packed
JSON ``quant_state.bitsandbytes__nf4``); they are one logical tensor here. The arithmetic lives in
``wsurgery.quant.bnb4bit``, imported on first use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...checkpoint.dtypes import dtype_name
from ...checkpoint.safetensors_file import TensorInfo, TensorSpec
from ...conventions import is_conv1d
from ...errors import InputError
from .base import EncodedTensorInfo, Encoding, GroupContext, ReadPart, Rows, register

if TYPE_CHECKING:
    from ..bnb4bit import QuantState


def _q() -> Any:
    """The 4-bit arithmetic, imported on first use: opening a plain checkpoint never needs it."""
    from .. import bnb4bit

    return bnb4bit


_STATE_MARK = ".quant_state.bitsandbytes__"
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
# The small float32 parts of a quant state, read when the checkpoint is opened (the absmax vector of
# a weight without double quantization is checked where it is read, when the weight is dequantized).
_STATE_PARTS = ("quant_map", "nested_absmax", "nested_quant_map")


@register
@dataclass(frozen=True)
class Bnb4bit(Encoding):
    """How a weight is stored in bitsandbytes 4-bit: quant type, block size, double quant, storage dtype,
    and whether the logical tensor is the stored state's transpose (Conv1D: transformers quantizes
    the (out, in) transpose of the (in, out) weight)."""

    name = "bitsandbytes-4bit"
    quant_methods = ("bitsandbytes",)

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    quant_storage: torch.dtype = torch.uint8
    transposed: bool = False
    #: The file's own quant state (its shape and nested offset), where one was read.
    state: QuantState | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise InputError(f"unknown 4-bit quant type {self.quant_type!r}: expected nf4 or fp4")
        _q().check_blocksize(self.blocksize)

    @classmethod
    def recognizes(cls, quantization_config: dict) -> bool:
        q = quantization_config
        return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit")) \
            and not (q.get("load_in_8bit") or q.get("_load_in_8bit"))

    def describe(self) -> str:
        return f"{self.quant_type} blocksize {self.blocksize}" + (" double-quant" if self.double_quant else "")

    def with_transposed(self, transposed: bool) -> Bnb4bit:
        return dataclasses.replace(self, transposed=transposed)

    @classmethod
    def group(cls, stored: dict[str, TensorInfo], context: GroupContext) -> dict[str, EncodedTensorInfo]:
        found: dict[str, EncodedTensorInfo] = {}
        for state_name in (n for n in stored if _STATE_MARK in n):
            name = state_name[: state_name.index(_STATE_MARK)]
            where = f"{context.where}: {name}"
            if name not in stored:
                raise InputError(f"{where}: the quant state {state_name} has no packed weight {name}; "
                                 "the checkpoint is incomplete")
            data = context.read(stored[state_name]).numpy().tobytes()
            state = _q().QuantState.from_json_bytes(data, where)
            if not state_name.endswith("__" + state.quant_type):
                raise InputError(f"{where}: {state_name} holds a {state.quant_type} state; the name says otherwise")
            parts = {"": stored[name], state_name[len(name) + 1:]: stored[state_name]}
            for suffix in _PARTS:
                if f"{name}.{suffix}" in stored:
                    parts[suffix] = stored[f"{name}.{suffix}"]
            _check_parts(parts, state, where)
            _check_finite_state(parts, context.read, where)
            transposed = is_conv1d(name.rpartition(".")[0], context.config)
            shape = tuple(state.shape[::-1]) if transposed else tuple(state.shape)
            encoding = cls(state.quant_type, state.blocksize, state.double_quant, parts[""].dtype, transposed, state)
            found[name] = EncodedTensorInfo(name, state.dtype, shape, parts, encoding)
        return found

    def decode(self, info: EncodedTensorInfo, read: ReadPart, rows: Rows | None = None) -> torch.Tensor:
        parts = {suffix: read(p) for suffix, p in info.parts.items()}
        w = _q().dequantize_4bit(parts, where=info.name)
        w = w.T.contiguous() if self.transposed else w
        return w if rows is None else w[rows[0]:rows[1]]

    def stored_specs(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[TensorSpec]:
        """The six (or four) tensors ``name`` becomes, known before any data: the JSON's length only as a bound."""
        shape = tuple(shape[::-1]) if self.transposed else tuple(shape)
        state = _q().QuantState(self.quant_type, self.blocksize, dtype, shape, 0.0 if self.double_quant else None)
        out = []
        for suffix, (sdtype, sshape) in state.stored_specs(self.quant_storage).items():
            full = f"{name}.{suffix}" if suffix else name
            if suffix.startswith("quant_state."):
                bound = _q().QuantState.max_json_len(self.quant_type, self.blocksize, dtype, shape, self.double_quant)
                out.append(TensorSpec(full, sdtype, (bound,), late=True))
            else:
                out.append(TensorSpec(full, sdtype, tuple(sshape)))
        return out

    def encode(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        w = tensor.T.contiguous() if self.transposed else tensor
        parts, _ = _q().quantize_4bit(w, quant_type=self.quant_type, blocksize=self.blocksize,
                                      double_quant=self.double_quant, quant_storage=self.quant_storage)
        return {f"{name}.{s}" if s else name: t for s, t in parts.items()}

    def roundtrip(self, tensor: torch.Tensor) -> torch.Tensor:
        """dequant(quant(tensor)): the weight a QLoRA adapter was trained against, in tensor's dtype."""
        w = tensor.T.contiguous() if self.transposed else tensor
        parts, _ = _q().quantize_4bit(w, quant_type=self.quant_type, blocksize=self.blocksize,
                                      double_quant=self.double_quant, quant_storage=self.quant_storage)
        back = _q().dequantize_4bit(parts, where="round trip")
        return back.T.contiguous() if self.transposed else back

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


def _check_finite_state(parts: dict[str, TensorInfo], read: ReadPart, where: str) -> None:
    """Refuse inf/NaN in a quant state's code books and nested scales: a damaged file, never bitsandbytes' output."""
    for suffix in _STATE_PARTS:
        if suffix in parts:
            values = read(parts[suffix]).reshape(-1).view(torch.float32)
            if not bool(torch.isfinite(values).all()):
                raise InputError(f"{where}: {parts[suffix].name} holds inf or NaN; the quantized checkpoint is damaged")
