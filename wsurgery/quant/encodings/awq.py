"""AWQ int4 weights in the GEMM layout (``quant_method: "awq"``, ``version``/``format`` "gemm"), decoded
as AutoAWQ's ``dequantize_gemm`` (the one GPT-QModel's AWQ torch kernel, transformers' AWQ path, runs).

A GEMM ``Linear`` is stored as ``qweight`` int32 (in, out/8), ``qzeros`` int32 (in/group, out/8) and
``scales`` float16 (in/group, out), plus a plain ``bias``. Unlike GPTQ both codes and zero points are
packed along the output axis, eight per word in AWQ's interleaved order [0, 2, 4, 6, 1, 3, 5, 7]
(field ``j`` of a word holds column ``AWQ_ORDER[j]`` of its eight), and zero points are stored as
they are. The weight is ``(q - z) * s`` per group, float16 (in, out); the logical tensor is its
(out, in) transpose. The GEMV layouts (qweight (out, in/8), a different interleave) are refused:
AutoAWQ has no CPU decode for them to check against.

Re-encoding is refused: AWQ's quantizer needs calibration activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...checkpoint.dtypes import dtype_name
from ...checkpoint.safetensors_file import TensorInfo
from ...errors import InputError, UnsupportedError
from .base import EncodedTensorInfo, Encoding, GroupContext, ReadPart, Rows, register
from .gptq import CALIBRATION, check_dtype_shape, check_finite, config_int, dequantize, packed_modules, unpack_fields

# Column j of each eight is in field _FIELD_OF_COLUMN[j] of its word (the inverse of AWQ_ORDER).
_FIELD_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)
_HALF = torch.tensor([f // 4 for f in _FIELD_OF_COLUMN])  # the int16 half of the word each column is in
_SHIFT = torch.tensor([f % 4 * 4 for f in _FIELD_OF_COLUMN], dtype=torch.int16).view(1, 8, 1)


def unpack_columns_as_rows(words: torch.Tensor) -> torch.Tensor:
    """(out/8, in) int32 words (qweight transposed) -> (out, in) patterns of ``unpack_fields``, each word's
    eight output columns in AWQ's order, as eight rows."""
    halves = words.view(torch.int16).view(*words.shape, 2).permute(0, 2, 1)  # (out/8, 2, in)
    fields = halves.index_select(1, _HALF).bitwise_right_shift_(_SHIFT)
    return fields.bitwise_and_(15).bitwise_or_(0x6400).view(-1, words.shape[1])


@register
@dataclass(frozen=True)
class Awq(Encoding):
    """One AWQ GEMM weight's storage: its group size (4-bit codes, eight to an int32 word)."""

    name = "awq"
    quant_methods = ("awq",)
    cannot_encode = CALIBRATION

    group_size: int = 128

    def describe(self) -> str:
        return f"awq gemm int4, group {self.group_size}"

    @classmethod
    def group(cls, stored: dict[str, TensorInfo], context: GroupContext) -> dict[str, EncodedTensorInfo]:
        q = context.quantization_config
        if q is None or not cls.recognizes(q):
            return {}
        where = context.where
        bits = config_int(q, "bits", config_int(q, "w_bit", 4, where), where)
        if bits != 4:
            raise UnsupportedError(f"{where}: AWQ with {bits}-bit codes is not decoded (only AutoAWQ's 4-bit GEMM "
                                   "layout); dequantize it with its own library first")
        version = str(q.get("version") or q.get("format") or "gemm").lower()
        if version != "gemm":
            raise UnsupportedError(f"{where}: AWQ layout {version!r} is not decoded (only 'gemm'); convert it with "
                                   "AutoAWQ or GPT-QModel first")
        group_size = config_int(q, "group_size", config_int(q, "q_group_size", 128, where), where)
        if group_size <= 0:
            raise UnsupportedError(f"{where}: AWQ group_size {group_size} is not decoded (AutoAWQ's dequantize_gemm "
                                   "repeats each scale group_size times)")
        found: dict[str, EncodedTensorInfo] = {}
        for module in packed_modules(stored, context, "awq"):
            info = cls._one(module, stored, context, group_size)
            found[info.name] = info
        return found

    @classmethod
    def _one(cls, module: str, stored: dict[str, TensorInfo], context: GroupContext,
             group_size: int) -> EncodedTensorInfo:
        where = f"{context.where}: {module}"
        qweight = stored[f"{module}.qweight"]
        if qweight.dtype != torch.int32 or len(qweight.shape) != 2 or 0 in qweight.shape:
            raise InputError(f"{where}: qweight is {dtype_name(qweight.dtype)}{list(qweight.shape)}; AWQ GEMM stores "
                             "int32 (in, out/8)")
        n_in, words = qweight.shape
        if n_in % group_size:
            raise InputError(f"{where}: qweight has {n_in} input rows, not a multiple of group_size {group_size}; "
                             "shapes inconsistent with the quantization_config")
        groups, out = n_in // group_size, words * 8
        parts = {
            "qweight": qweight,
            "qzeros": check_dtype_shape(stored.get(f"{module}.qzeros"), torch.int32, (groups, words),
                                        f"qzeros ({module}.qzeros)", where),
            "scales": check_dtype_shape(stored.get(f"{module}.scales"), torch.float16, (groups, out),
                                        f"scales ({module}.scales)", where),
        }
        check_finite(context.read(parts["scales"]), parts["scales"], where)
        return EncodedTensorInfo(f"{module}.weight", torch.float16, (out, n_in), parts, cls(group_size))

    def decode(self, info: EncodedTensorInfo, read: ReadPart, rows: Rows | None = None) -> torch.Tensor:
        out, n_in = info.shape
        a, b = rows or (0, out)
        w0, w1 = a // 8, -(-b // 8)  # the words holding output columns [a, b)
        qweight = read(info.parts["qweight"])[:, w0:w1].T.contiguous()  # (words, in)
        codes = unpack_columns_as_rows(qweight)[a - 8 * w0:b - 8 * w0]
        columns = torch.arange(a, b)
        fields = columns - columns % 8 + torch.tensor(_FIELD_OF_COLUMN)[columns % 8]
        zeros = unpack_fields(read(info.parts["qzeros"]), 4)[:, fields].T
        scales = read(info.parts["scales"])[:, a:b].T
        return dequantize(codes, zeros, scales, self.group_size)
