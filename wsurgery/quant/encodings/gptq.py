"""GPTQ int2/int4/int8 weights (``quant_method: "gptq"``), decoded as GPT-QModel's torch kernel does.

A GPTQ ``Linear`` is stored as ``qweight`` int32 (in*bits/32, out: codes packed along the input axis,
little end first), ``qzeros`` int32 (groups, out*bits/32: zero points packed along the output axis),
``scales`` float16 (groups, out) and ``g_idx`` int32 (in: the group of each input row, a permutation
under act-order), plus a plain ``bias``. The weight transformers' GPTQ path (GPT-QModel's
``TorchLinear.dequantize_weight``) computes is ``scales[g_idx] * (q - z[g_idx])`` in float16, (in, out);
the logical tensor is its transpose, the (out, in) ``weight`` a PEFT adapter trained on the model targets.

``checkpoint_format`` "gptq" (v1, the default) stores each zero point minus one; GPT-QModel adds the
packed constant 0x11111111 (per bit width) to the int32 words when it loads one, carries included,
and so do we. 3-bit packing (codes straddling words) and the planar 5-7-bit layouts are refused.

Re-encoding is refused: GPTQ's quantizer needs calibration activations (its Hessian), which a
checkpoint does not hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...checkpoint.dtypes import dtype_name
from ...checkpoint.safetensors_file import TensorInfo
from ...errors import InputError, UnsupportedError
from .base import EncodedTensorInfo, Encoding, GroupContext, ReadPart, Rows, register

CALIBRATION = ("GPTQ/AWQ quantizers need calibration data (GPTQ's Hessian of layer inputs, AWQ's activation "
               "scales) that a checkpoint does not hold")

_BITS = (2, 4, 8)
_FORMATS = ("gptq", "gptq_v2")
# What GPT-QModel adds to each int32 qzeros word of a v1 checkpoint: one in every field.
_V1_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


def config_int(q: dict, key: str, default: int, where: str) -> int:
    """An integer field of quantization_config (bool is not an integer here)."""
    value = q.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: quantization_config.{key} is {value!r}; expected an integer")
    return value


def check_dtype_shape(info: TensorInfo | None, dtype: torch.dtype, shape: tuple[int, ...], what: str,
                      where: str) -> TensorInfo:
    """A stored part, present, in ``dtype`` and ``shape`` (what the config and the other parts imply)."""
    if info is None:
        raise InputError(f"{where}: missing {what}; the quantized checkpoint is incomplete")
    if info.dtype != dtype or tuple(info.shape) != shape:
        raise InputError(f"{where}: {info.name} is {dtype_name(info.dtype)}{list(info.shape)} but {what} must be "
                         f"{dtype_name(dtype)}{list(shape)} here; the file does not match its quantization_config")
    return info


def check_finite(values: torch.Tensor, info: TensorInfo, where: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise InputError(f"{where}: {info.name} holds inf or NaN; the quantized checkpoint is damaged")


def packed_modules(stored: dict[str, TensorInfo], context: GroupContext, method: str) -> list[str]:
    """The modules stored as ``{module}.qweight``; refuses a config that names ``method`` over none."""
    modules = [n[: -len(".qweight")] for n in stored if n.endswith(".qweight")]
    if not modules:
        raise InputError(f"{context.where}: quantization_config says quant_method {method} but no tensor is stored "
                         f"that way (*.qweight, *.qzeros, *.scales); wsurgery does not decode a config that "
                         "contradicts its weights: remove quantization_config if they are plain")
    return modules


def unpack_fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) int32 words -> (..., n * 32/bits): the fields of each word, low bits first, each as the float16
    bit pattern of ``1024 + code`` (0x6400 | code). Integer passes only (no int -> float conversion), and
    ``(1024 + q) - (1024 + z)`` is ``q - z`` exactly in float16 for codes below 1024. The words are read as
    int16 halves, low half first: safetensors and torch on x86-64/ARM are little-endian."""
    shifts = torch.arange(0, 16, bits, dtype=torch.int16)
    fields = torch.bitwise_right_shift(words.view(torch.int16).view(*words.shape, 2, 1), shifts)
    return fields.bitwise_and_((1 << bits) - 1).bitwise_or_(0x6400).view(*words.shape[:-1], -1)


def dequantize(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
               group: torch.Tensor | int) -> torch.Tensor:
    """``scales * (q - z)`` in float16, (out, in), in place, from ``unpack_fields`` patterns: ``codes``
    (out, in), ``zeros`` (out, groups) and float16 ``scales`` (out, groups); ``group`` is each input
    column's group, or their common size. Equal bit for bit to the references' int8 ``q - z`` times
    float16 scales: the difference is exact, and so is float16(q - z), and each float16 product is
    rounded once either way."""
    w = codes.view(torch.float16)
    zeros = zeros.view(torch.float16)
    out, n_in = w.shape
    if isinstance(group, int):
        w = w.view(out, n_in // group, group)
        return w.sub_(zeros.unsqueeze(-1)).mul_(scales.unsqueeze(-1)).view(out, n_in)
    return w.sub_(zeros[:, group]).mul_(scales[:, group])


@register
@dataclass(frozen=True)
class Gptq(Encoding):
    """One GPTQ weight's storage: bit width, group size (-1: one group), zero-point format, and whether
    ``g_idx`` is the plain ``i // group_size`` (else act-order's permutation, read when decoding)."""

    name = "gptq"
    quant_methods = ("gptq",)
    cannot_encode = CALIBRATION

    bits: int = 4
    group_size: int = 128
    v1_zeros: bool = True
    act_order: bool = False

    def describe(self) -> str:
        group = "per column" if self.group_size == -1 else f"group {self.group_size}"
        return (f"gptq int{self.bits}, {group}" + (", act-order g_idx" if self.act_order else "")
                + (", v1 zeros" if self.v1_zeros else ", v2 zeros"))

    @classmethod
    def group(cls, stored: dict[str, TensorInfo], context: GroupContext) -> dict[str, EncodedTensorInfo]:
        q = context.quantization_config
        if q is None or not cls.recognizes(q):
            return {}
        where = context.where
        bits = config_int(q, "bits", 4, where)
        if bits not in _BITS:
            raise UnsupportedError(f"{where}: GPTQ with {bits}-bit codes is not decoded (only 2, 4 and 8 bits, whose "
                                   "codes never straddle an int32 word); dequantize it with GPT-QModel first")
        group_size = config_int(q, "group_size", 128, where)
        if group_size != -1 and group_size <= 0:
            raise InputError(f"{where}: quantization_config.group_size is {group_size}; expected -1 or a positive size")
        fmt = str(q.get("format") or q.get("checkpoint_format") or "gptq").lower()
        if fmt not in _FORMATS:
            raise UnsupportedError(f"{where}: GPTQ checkpoint format {fmt!r} is not decoded (only 'gptq' and "
                                   "'gptq_v2'); convert it with GPT-QModel first")
        pack_dtype = str(q.get("pack_dtype", "int32")).removeprefix("torch.")
        if pack_dtype != "int32":
            raise UnsupportedError(f"{where}: GPTQ packed in {pack_dtype} words is not decoded (only int32)")
        desc_act = bool(q.get("desc_act", False))
        found: dict[str, EncodedTensorInfo] = {}
        for module in packed_modules(stored, context, "gptq"):
            info = cls._one(module, stored, context, bits, group_size, fmt == "gptq", desc_act)
            found[info.name] = info
        return found

    @classmethod
    def _one(cls, module: str, stored: dict[str, TensorInfo], context: GroupContext, bits: int, group_size: int,
             v1: bool, desc_act: bool) -> EncodedTensorInfo:
        where = f"{context.where}: {module}"
        k = 32 // bits
        qweight = stored[f"{module}.qweight"]
        if qweight.dtype != torch.int32 or len(qweight.shape) != 2:
            raise InputError(f"{where}: qweight is {dtype_name(qweight.dtype)}{list(qweight.shape)}; GPTQ stores "
                             "int32 (in*bits/32, out)")
        words, out = qweight.shape
        g_idx_info = stored.get(f"{module}.g_idx")
        if g_idx_info is None and desc_act:
            raise InputError(f"{where}: missing g_idx, which desc_act (act-order) requires; the checkpoint is "
                             "incomplete")
        if g_idx_info is not None and (g_idx_info.dtype != torch.int32 or len(g_idx_info.shape) != 1):
            raise InputError(f"{where}: g_idx is {dtype_name(g_idx_info.dtype)}{list(g_idx_info.shape)}; GPTQ stores "
                             "int32 (in,)")
        n_in = g_idx_info.shape[0] if g_idx_info is not None else words * k
        if words != math.ceil(n_in / k) or n_in == 0 or out == 0:
            raise InputError(f"{where}: qweight {list(qweight.shape)} does not hold {n_in} input rows of {bits}-bit "
                             f"codes ({math.ceil(n_in / k)} int32 rows); shapes inconsistent with bits={bits}")
        size = n_in if group_size == -1 else group_size
        groups = math.ceil(n_in / size)
        parts = {
            "qweight": qweight,
            "qzeros": check_dtype_shape(stored.get(f"{module}.qzeros"), torch.int32, (groups, math.ceil(out / k)),
                                        f"qzeros ({module}.qzeros)", where),
            "scales": check_dtype_shape(stored.get(f"{module}.scales"), torch.float16, (groups, out),
                                        f"scales ({module}.scales)", where),
        }
        check_finite(context.read(parts["scales"]), parts["scales"], where)
        act_order = False
        if g_idx_info is not None:
            parts["g_idx"] = g_idx_info
            g_idx = context.read(g_idx_info).long()
            if bool(((g_idx < 0) | (g_idx >= groups)).any()):
                raise InputError(f"{where}: g_idx holds group numbers outside [0, {groups}) for {n_in} rows in groups "
                                 f"of {size}; the checkpoint is damaged or its group_size is wrong")
            act_order = not torch.equal(g_idx, torch.arange(n_in) // size)
        return EncodedTensorInfo(f"{module}.weight", torch.float16, (out, n_in), parts,
                                 cls(bits, group_size, v1, act_order))

    def decode(self, info: EncodedTensorInfo, read: ReadPart, rows: Rows | None = None) -> torch.Tensor:
        out, n_in = info.shape
        a, b = rows or (0, out)
        qweight = read(info.parts["qweight"])[:, a:b].T.contiguous()  # (rows, in*bits/32): one word per row run
        codes = unpack_fields(qweight, self.bits)[:, :n_in]
        qzeros = read(info.parts["qzeros"])
        if self.v1_zeros:
            qzeros = qzeros + _V1_OFFSET[self.bits]  # int32, wrapping as GPT-QModel's in-place add does
        zeros = unpack_fields(qzeros, self.bits)[:, a:b].T
        scales = read(info.parts["scales"])[:, a:b].T
        size = n_in if self.group_size == -1 else self.group_size
        if self.act_order:
            group: torch.Tensor | int = read(info.parts["g_idx"]).long()
        elif n_in % size == 0:
            group = size
        else:
            group = torch.arange(n_in) // size
        return dequantize(codes.contiguous(), zeros, scales, group)
