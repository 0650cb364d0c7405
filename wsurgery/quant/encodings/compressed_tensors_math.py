"""compressed-tensors' integer packing, dequantization and FP8 min-max quantizer, reimplemented.

Conventions are compressed-tensors 0.20.1's (``compressors/pack_quantized/helpers.py``,
``quantization/lifecycle/forward*.py``, ``quantization/utils/helpers.py``): codes are widened to the
scale's dtype, the zero point (in that dtype) subtracted, the scale multiplied, every step in the
scale's dtype, so a bfloat16 scale gives a bfloat16 weight rounded exactly as theirs.
"""

from __future__ import annotations

import math
import sys

import torch

FP8 = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(FP8).max)  # 448


def packed_cols(cols: int, bits: int) -> int:
    """int32 words per row for ``cols`` values of ``bits`` bits (dense: values straddle words)."""
    return math.ceil(cols * bits / 32)


def unpack_int32(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Rows of int32 words -> int8 values (offset-binary minus 2**(bits-1)), ``cols`` per row."""
    rows = words.shape[0]
    offset = 1 << (bits - 1)
    if bits in (4, 8) and sys.byteorder == "little":
        # 4- and 8-bit values never straddle a byte: split bytes instead of gathering bits; the offset is
        # taken off in uint8 (wrapping), which viewed as int8 is the signed value.
        u8 = words.contiguous().view(torch.uint8)
        if bits == 8:
            return (u8[:, :cols] ^ 0x80).view(torch.int8)
        nibbles = torch.stack((u8 & 0xF, u8 >> 4), dim=-1).view(rows, -1)[:, :cols]
        return nibbles.sub_(offset).view(torch.int8)
    w = torch.nn.functional.pad(words.to(torch.int64) & 0xFFFFFFFF, (0, 1))
    start = torch.arange(cols, dtype=torch.int64) * bits
    index, shift = start // 32, start % 32
    values = ((w[:, index] >> shift) | (w[:, index + 1] << (32 - shift))) & ((1 << bits) - 1)
    return (values - offset).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, strategy: str,
               group_size: int | None, block: tuple[int, int] | None, row0: int = 0) -> torch.Tensor:
    """``(codes - zero_point) * scale`` in the scale's dtype, the scale broadcast per ``strategy``.

    ``codes`` are rows ``[row0, row0 + len)`` of the weight; ``scale``/``zero_point`` are the rows
    of theirs those need (for blocks: the block rows from ``row0 // block[0]``)."""
    dtype = scale.dtype
    rows, cols = codes.shape
    if strategy == "group":
        assert group_size is not None
        ng = cols // group_size
        out = codes.reshape(rows, ng, group_size).to(dtype)
        if zero_point is not None:
            out.sub_(zero_point.to(dtype).view(rows, ng, 1))
        return out.mul_(scale.view(rows, ng, 1)).view(rows, cols)
    if strategy == "block":
        assert block is not None
        bh, bw = block
        index_r = (torch.arange(row0, row0 + rows) // bh) - row0 // bh
        index_c = torch.arange(cols) // bw
        scale = scale[index_r][:, index_c]
        zero_point = None if zero_point is None else zero_point[index_r][:, index_c]
    out = codes.to(dtype)
    if zero_point is not None:
        out.sub_(zero_point.to(dtype))
    return out.mul_(scale)


def fp8_minmax_scale(w: torch.Tensor, strategy: str, group_size: int | None,
                     block: tuple[int, int] | None) -> torch.Tensor:
    """The symmetric FP8 weight scale compressed-tensors' ``calculate_qparams`` gives for the min/max
    of ``w`` per ``strategy`` (llm-compressor's min-max weight observer), in ``w``'s dtype."""
    if strategy == "tensor":
        lo, hi = torch.aminmax(w)
    elif strategy == "channel":
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    elif strategy == "group":
        assert group_size is not None
        g = w.unflatten(-1, (w.shape[1] // group_size, group_size))
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    else:
        assert block is not None
        b = _blocks(w, block)
        lo, hi = b.amin(dim=(1, 3)), b.amax(dim=(1, 3))
    lo = torch.min(lo, torch.zeros_like(lo))
    hi = torch.max(hi, torch.zeros_like(hi))
    amax = torch.max(torch.abs(lo), torch.abs(hi))
    bit_range = torch.tensor(_FP8_MAX) - torch.tensor(-_FP8_MAX)
    scale = amax / (bit_range.to(amax.dtype) / 2)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
    return scale.reshape(1) if scale.ndim == 0 else scale


def fp8_quantize(w: torch.Tensor, scale: torch.Tensor, strategy: str, group_size: int | None,
                 block: tuple[int, int] | None) -> torch.Tensor:
    """compressed-tensors' ``quantize`` to float8_e4m3fn: ``clamp(w / scale, ±448)`` cast, in ``w``'s dtype."""
    q_min, q_max = torch.tensor(-_FP8_MAX), torch.tensor(_FP8_MAX)
    rows, cols = w.shape
    if strategy == "group":
        assert group_size is not None
        x = w.unflatten(-1, (cols // group_size, group_size)) / scale.unsqueeze(-1)
    elif strategy == "block":
        assert block is not None
        bh, bw = block
        x = _blocks(w, block) / scale.unsqueeze(1).unsqueeze(-1)
        x = x.reshape(x.shape[0] * bh, x.shape[2] * bw)[:rows, :cols]
    else:
        x = w / scale
    return torch.clamp(x, q_min, q_max).to(FP8).reshape(rows, cols).contiguous()


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``w`` zero-padded to whole blocks, as (block rows, bh, block cols, bw)."""
    bh, bw = block
    rows, cols = w.shape
    w = torch.nn.functional.pad(w, (0, -cols % bw, 0, -rows % bh))
    return w.reshape(w.shape[0] // bh, bh, w.shape[1] // bw, bw)
