"""ggml's 32-value block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (``quantize_row_q*_ref``)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as GgmlType

from .base import F32, GgmlQuant, first_absmax, fp16, half_bytes, register, roundf


def _cvtt(v: np.ndarray) -> np.ndarray:
    """x86's float -> int32 conversion (cvttss2si): truncation, INT_MIN for NaN, inf and out of range."""
    t = np.trunc(v)
    with np.errstate(invalid="ignore"):
        inside = np.abs(t) < F32(2**31)
    return np.where(inside, t, F32(-(2**31))).astype(np.int32)


def _c_int8(v: np.ndarray) -> np.ndarray:
    """C's ``(int8_t)`` of a float as gcc compiles it: ``_cvtt``, kept modulo 256."""
    return ((_cvtt(v) & 0xFF) ^ 0x80) - 0x80


def _inverse(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0))


def _min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``if (v < min) min = v; if (v > max) max = v;`` from (FLT_MAX, -FLT_MAX), in order:
    which zero (+0 or -0) wins a tie is kept as ggml keeps it."""
    lo, hi = x[:, 0].copy(), x[:, 0].copy()
    for j in range(1, x.shape[1]):
        v = x[:, j]
        lo = np.where(v < lo, v, lo)
        hi = np.where(v > hi, v, hi)
    return lo, hi


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> (n, 16) bytes: value j in the low nibble of byte j, value j+16 in the high one."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """The fifth bit of each of the 32 codes, as ggml's little-endian uint32 ``qh``."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


@register
class Q8_0(GgmlQuant):
    type = GgmlType.Q8_0
    block_size, type_size = 32, 34
    chunk_blocks = 32768

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = np.abs(blocks).max(axis=1) / F32(127)
        q = roundf(blocks * _inverse(d)[:, None])
        return np.concatenate([half_bytes(fp16(d)), (_cvtt(q) & 0xFF).astype(np.uint8)], axis=1)


@register
class Q4_0(GgmlQuant):
    type = GgmlType.Q4_0
    block_size, type_size = 32, 18
    chunk_blocks = 32768

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        _, mx = first_absmax(blocks.T)
        d = mx / F32(-8)
        q = np.minimum(15, _c_int8(blocks * _inverse(d)[:, None] + F32(8.5)))
        return np.concatenate([half_bytes(fp16(d)), _nibbles(q)], axis=1)


@register
class Q4_1(GgmlQuant):
    type = GgmlType.Q4_1
    block_size, type_size = 32, 20
    chunk_blocks = 16384

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        lo, hi = _min_max(blocks)
        d = (hi - lo) / F32(15)
        q = np.minimum(15, _c_int8((blocks - lo[:, None]) * _inverse(d)[:, None] + F32(0.5)))
        return np.concatenate([half_bytes(fp16(d)), half_bytes(fp16(lo)), _nibbles(q)], axis=1)


@register
class Q5_0(GgmlQuant):
    type = GgmlType.Q5_0
    block_size, type_size = 32, 22
    chunk_blocks = 32768

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        _, mx = first_absmax(blocks.T)
        d = mx / F32(-16)
        q = np.minimum(31, _c_int8(blocks * _inverse(d)[:, None] + F32(16.5)))
        return np.concatenate([half_bytes(fp16(d)), _high_bits(q), _nibbles(q & 0xF)], axis=1)


@register
class Q5_1(GgmlQuant):
    type = GgmlType.Q5_1
    block_size, type_size = 32, 24
    chunk_blocks = 16384

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        lo, hi = _min_max(blocks)
        d = (hi - lo) / F32(31)
        q = _c_int8((blocks - lo[:, None]) * _inverse(d)[:, None] + F32(0.5)) & 0xFF  # (uint8_t), no clamp
        return np.concatenate([half_bytes(fp16(d)), half_bytes(fp16(lo)), _high_bits(q), _nibbles(q & 0xF)],
                              axis=1)
