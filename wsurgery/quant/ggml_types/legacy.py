"""ggml's 32-value block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (``quantize_row_q*_ref``).

Each type has a fast path for blocks of finite values whose inverse scale is finite, where C's
conversions reduce to numpy's (``rint`` with its ties fixed, ``astype`` truncation of positive values),
and ggml's reductions to numpy's up to which zero (+0 or -0) wins a tie, fixed where it matters. Other
blocks (NaN, inf, scales so small that their inverse overflows) take the exact path, which spells
out every C conversion; both give ggml's bytes.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as GgmlType

from .base import F32, GgmlQuant, fp16, half_bytes, register, roundf


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


def _signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """``base.first_absmax``'s max along rows: ``argmax`` returns the first of equal magnitudes as ggml's loop
    keeps it; all-zero rows give +0 (ggml's start value, never replaced)."""
    first = np.abs(blocks).argmax(axis=1)[:, None]
    mx = np.take_along_axis(blocks, first, axis=1)[:, 0]
    return np.where(mx == 0, F32(0), mx)


def _fast_min_max(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_min_max`` from two reductions; rows whose min or max is a zero are redone in order (its sign
    is stored)."""
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    zero = (lo == 0) | (hi == 0)
    if zero.any():
        lo[zero], hi[zero] = _min_max(blocks[zero])
    return lo, hi


def _finite(*arrays: np.ndarray) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays)


def _rint_away(q: np.ndarray) -> np.ndarray:
    """``roundf`` of finite values: numpy's round-half-even, with the (rare) ties moved away from zero."""
    r = np.rint(q)
    ties = np.flatnonzero(np.abs(q - r) == F32(0.5))
    if ties.size:
        flat_q, flat_r = q.reshape(-1), r.reshape(-1)
        flat_r[ties] = roundf(flat_q[ties])
    return r


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> (n, 16) bytes: value j in the low nibble of byte j, value j+16 in the high one."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """The fifth bit of each of the 32 codes, as ggml's little-endian uint32 ``qh``."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


def _codes(values: np.ndarray, scale_inverse: np.ndarray, offset: float, top: int | None) -> np.ndarray:
    """``MIN(top, (int8_t)(values*id + offset))`` (no MIN where ``top`` is None: a ``(uint8_t)`` cast)."""
    v = values * scale_inverse[:, None] + F32(offset)
    if _finite(v):  # positive here: astype truncates as C does
        q = v.astype(np.int32)
    else:
        q = _c_int8(v)
    return np.minimum(top, q) if top is not None else q & 0xFF


@register
class Q8_0(GgmlQuant):
    type = GgmlType.Q8_0
    block_size, type_size = 32, 34
    chunk_blocks = 16384

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = np.abs(blocks).max(axis=1) / F32(127)
        inverse = _inverse(d)
        q = blocks * inverse[:, None]
        if _finite(d, inverse):
            codes = _rint_away(q).astype(np.int8).view(np.uint8)
        else:
            codes = (_cvtt(roundf(q)) & 0xFF).astype(np.uint8)
        out = np.empty((blocks.shape[0], cls.type_size), np.uint8)
        out[:, :2] = half_bytes(fp16(d))
        out[:, 2:] = codes
        return out


@register
class Q4_0(GgmlQuant):
    type = GgmlType.Q4_0
    block_size, type_size = 32, 18
    chunk_blocks = 16384

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _signed_absmax(blocks) / F32(-8)
        q = _codes(blocks, _inverse(d), 8.5, 15)
        return np.concatenate([half_bytes(fp16(d)), _nibbles(q)], axis=1)


@register
class Q4_1(GgmlQuant):
    type = GgmlType.Q4_1
    block_size, type_size = 32, 20
    chunk_blocks = 16384

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        lo, hi = _fast_min_max(blocks)
        d = (hi - lo) / F32(15)
        q = _codes(blocks - lo[:, None], _inverse(d), 0.5, 15)
        return np.concatenate([half_bytes(fp16(d)), half_bytes(fp16(lo)), _nibbles(q)], axis=1)


@register
class Q5_0(GgmlQuant):
    type = GgmlType.Q5_0
    block_size, type_size = 32, 22
    chunk_blocks = 16384

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = _signed_absmax(blocks) / F32(-16)
        q = _codes(blocks, _inverse(d), 16.5, 31)
        return np.concatenate([half_bytes(fp16(d)), _high_bits(q), _nibbles(q & 0xF)], axis=1)


@register
class Q5_1(GgmlQuant):
    type = GgmlType.Q5_1
    block_size, type_size = 32, 24
    chunk_blocks = 16384

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        lo, hi = _fast_min_max(blocks)
        d = (hi - lo) / F32(31)
        q = _codes(blocks - lo[:, None], _inverse(d), 0.5, None)
        return np.concatenate([half_bytes(fp16(d)), half_bytes(fp16(lo)), _high_bits(q), _nibbles(q & 0xF)],
                              axis=1)
