"""ggml tensor types (llama.cpp's GGUF files): F32/F16/BF16... stored as they are, Q8_0, Q4_K... in blocks.

A GGUF tensor is one stored byte range: its values in the file's ggml type, in the layout llama.cpp's
converter wrote (Llama's Q/K rows interleaved per head, Gemma's norms stored + 1: ``gguf_names.Layout``).
Its ``Ggml`` encoding decodes it as the ``gguf`` package dequantizes it (``gguf.quants.dequantize``,
what transformers' GGUF loader calls) and undoes the layout, so an adapter in Hugging Face layout
applies as it is; ``encode`` is ggml's reference quantizer (``quant/ggml_types``: byte-identical to
ggml's, K-quants included; the ``gguf`` package's for the types it does not cover) of the tensor put
back in GGUF layout. GGUF files are opened by their format (``checkpoint/formats/gguf``),
which builds each tensor's ``EncodedTensorInfo`` under its Hugging Face name, and written by
``gguf_format.GgufWriter``: no safetensors checkpoint stores ggml types, so ``group`` finds none.

The ``gguf`` package is imported only when a ggml type is used: plain jobs never load it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ...checkpoint.safetensors_file import TensorInfo
from ...errors import UnsupportedError
from .base import EncodedTensorInfo, Encoding, GroupContext, ReadPart, Rows, register

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType as GgmlType

    from ...checkpoint.gguf_names import Layout


@functools.cache
def plain_types() -> dict[GgmlType, torch.dtype]:
    """ggml types stored as plain elements, and their torch dtypes."""
    from gguf import GGMLQuantizationType as T

    return {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16, T.F64: torch.float64,
            T.I8: torch.int8, T.I16: torch.int16, T.I32: torch.int32, T.I64: torch.int64}


def type_name(t: GgmlType) -> str:
    return t.name.lower()


def block_sizes(t: GgmlType) -> tuple[int, int]:
    """(values per block, bytes per block)."""
    import gguf

    return gguf.GGML_QUANT_SIZES[t]


def stored_nbytes(shape: tuple[int, ...], t: GgmlType) -> int:
    block, size = block_sizes(t)
    return math.prod(shape) // block * size


def fits_blocks(shape: tuple[int, ...], t: GgmlType) -> bool:
    """ggml quantizes rows in blocks: a row's length must be a multiple of the block size."""
    return not shape or shape[-1] % block_sizes(t)[0] == 0


@functools.cache
def can_decode(t: GgmlType) -> bool:
    """Whether the ``gguf`` package can dequantize ``t`` (plain types are read as they are)."""
    import gguf

    if t in plain_types():
        return True
    try:  # the package says so only by trying: it raises NotImplementedError for the others
        gguf.quants.dequantize(np.zeros((1, block_sizes(t)[1]), np.uint8), t)
    except NotImplementedError:
        return False
    return True


@functools.cache
def can_encode(t: GgmlType) -> bool:
    """Whether ``t`` can be written from floats: plain floats, and the types ``ggml_types`` quantizes that
    can be read back (not Q8_K: ggml's operand format for dot products, which llama.cpp cannot run as
    weights and the gguf package cannot dequantize)."""
    from .. import ggml_types

    plain = plain_types()
    if t in plain:
        return plain[t].is_floating_point
    return ggml_types.can_quantize(t, block_sizes(t)[0]) is None and can_decode(t)


@register
@dataclass(frozen=True)
class Ggml(Encoding):
    """One GGUF tensor: stored in ggml ``type``, in the converter's ``layout`` (one ``data`` part of raw bytes)."""

    name = "ggml"
    cannot_encode = "ggml types are written into a GGUF file: name the output *.gguf"

    type: GgmlType
    layout: Layout

    @classmethod
    def recognizes(cls, quantization_config: dict) -> bool:
        return False  # GGUF files carry no quantization_config

    @classmethod
    def group(cls, stored: dict[str, TensorInfo], context: GroupContext) -> dict[str, EncodedTensorInfo]:
        return {}  # only GGUF files hold ggml types, and their format builds the logical tensors

    def describe(self) -> str:
        return type_name(self.type)

    def row_chunk(self, info: EncodedTensorInfo) -> int | None:
        # Blocks lie within rows; interleaved Q/K rows decode only whole (the interleave spans a head).
        return 1 if len(info.shape) >= 2 and self.layout.heads is None else None

    def decode(self, info: EncodedTensorInfo, read: ReadPart, rows: Rows | None = None) -> torch.Tensor:
        data = info.parts["data"]
        if not can_decode(self.type):
            raise UnsupportedError(f"{data.file}: tensor {data.name} is {self.type.name}, which the gguf package "
                                   "cannot dequantize")
        shape = info.shape
        if rows is not None:
            row_bytes = stored_nbytes(shape[1:], self.type)
            shape = (rows[1] - rows[0], *shape[1:])
            raw = read(data, (rows[0] * row_bytes, rows[1] * row_bytes))
        else:
            raw = read(data)
        plain = plain_types()
        if self.type in plain:
            t = raw.view(plain[self.type]).reshape(shape)
        else:
            import gguf

            block, size = block_sizes(self.type)
            stored = raw.numpy().reshape(*shape[:-1], shape[-1] // block * size)
            t = torch.from_numpy(gguf.quants.dequantize(stored, self.type))
        return self.layout.to_hf(t.to(info.dtype)).to(info.dtype)

    def encode_data(self, tensor: torch.Tensor, target: GgmlType | None = None) -> torch.Tensor:
        """The stored bytes of the logical ``tensor`` in ``target`` (default: this type), quantized once
        from float32 in GGUF layout."""
        target = self.type if target is None else target
        if tensor.is_floating_point():
            tensor = self.layout.to_gguf(tensor.to(torch.float32))
        plain = plain_types()
        if target in plain:
            return tensor.to(plain[target]).contiguous()
        from .. import ggml_types

        return torch.from_numpy(ggml_types.quantize(tensor, target))
