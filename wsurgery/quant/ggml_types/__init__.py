"""ggml's reference quantizers, byte for byte, vectorized with numpy.

One class per ggml type (``legacy``: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; ``kquants``: Q2_K...Q6_K, Q8_K),
each writing what ggml's ``quantize_row_*_ref`` writes, i.e. what ``ggml_quantize_chunk`` writes
without an importance matrix (llama-quantize without ``--imatrix``). Types without a class here are
quantized by the ``gguf`` package where it can (its numpy quantizers are slower, same bytes).

API for the rest of wsurgery: ``can_quantize(type, row_len)`` says why a row cannot be written in a
type (None: it can), ``quantize(values, type)`` writes it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GgmlType

from . import kquants, legacy
from .base import QUANTIZERS, GgmlQuant

__all__ = ["QUANTIZERS", "GgmlQuant", "can_quantize", "quantize", "kquants", "legacy"]


@functools.cache
def _gguf_can_quantize(t: GgmlType) -> bool:
    import gguf

    try:  # the package says so only by trying: it raises NotImplementedError for the others
        gguf.quants.quantize(np.zeros((1, GGML_QUANT_SIZES[t][0]), np.float32), t)
    except NotImplementedError:
        return False
    return True


def can_quantize(t: GgmlType, row_len: int) -> str | None:
    """Why rows of ``row_len`` values cannot be quantized to ``t``; None when they can."""
    if t not in QUANTIZERS and not _gguf_can_quantize(t):
        return f"wsurgery cannot quantize to {t.name}"
    block = GGML_QUANT_SIZES[t][0]
    if row_len % block:
        return f"rows of {row_len} values do not divide into {t.name} blocks of {block}"
    return None


def quantize(values: np.ndarray | torch.Tensor, t: GgmlType) -> np.ndarray:
    """``values`` (float32, rows along the last axis) in ggml type ``t``: uint8 of shape
    ``(*shape[:-1], shape[-1] // block_size * type_size)``, as ``gguf.quants.quantize`` returns."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    array = np.ascontiguousarray(array, np.float32)
    reason = can_quantize(t, array.shape[-1] if array.ndim else 1)
    if reason is not None:
        raise ValueError(reason)
    cls = QUANTIZERS.get(t)
    if cls is None:
        import gguf

        return gguf.quants.quantize(array, t)
    blocks = array.reshape(-1, cls.block_size)
    out = np.empty((blocks.shape[0], cls.type_size), np.uint8)
    with np.errstate(all="ignore"):  # ggml's arithmetic on flat or zero groups divides by 0, then discards it
        for start in range(0, blocks.shape[0], cls.chunk_blocks):
            stop = start + cls.chunk_blocks
            out[start:stop] = cls.quantize_blocks(blocks[start:stop])
    return out.reshape(*array.shape[:-1], array.shape[-1] // cls.block_size * cls.type_size)
