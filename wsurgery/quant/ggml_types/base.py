"""What every ggml quantizer here shares: the base class, the registry, and ggml's scalar helpers.

Byte-identity with ggml (``ggml-quants.c``, ``quantize_row_*_ref``) rests on doing its float32
operations one by one, in its order: numpy float32 ufuncs round each operation as C does on x86-64
without contracting a*b+c into one FMA (ggml's portable build: the xllamacpp wheel's quantizers use
SSE only), and every sum ggml accumulates in a loop is accumulated here in the same order
(``seqsum``; numpy's own reductions may sum pairwise), vectorized across blocks instead of along one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType as GgmlType

F32 = np.float32
#: ggml's GROUP_MAX_EPS: below this absolute maximum, a group is all zero.
GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves round-half-even(x) in the low mantissa bits


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: its bit trick, kept as is so that out-of-range values give ggml's bits too."""
    bits = (v.astype(F32, copy=False) + _MAGIC).view(np.int32)
    bits &= 0x007FFFFF
    bits -= 0x00400000
    return bits


def clamp(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``MAX(lo, MIN(hi, a))``, in place."""
    return np.clip(a, lo, hi, out=a)


def roundf(v: np.ndarray) -> np.ndarray:
    """C's ``roundf`` (half away from zero), exact: ``v - trunc(v)`` is exact in float32."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= F32(0.5), np.sign(v), F32(0))


def fp16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: round to nearest even (numpy's cast rounds the same, subnormals included)."""
    return np.asarray(v, F32).astype(np.float16)


def seqsum(terms: np.ndarray) -> np.ndarray:
    """``s = 0; for t in terms: s += t`` along the first axis, in that order (ggml's loop sums)."""
    acc = np.zeros(terms.shape[1:], F32)
    for t in terms:
        acc += t
    return acc


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max) over the first axis as ggml's ``if (ax > amax) { amax = ax; max = x[i]; }`` from 0:
    the first value of largest magnitude, and +0 where all are zero."""
    ax = np.abs(x)
    amax = ax.max(axis=0)
    first = np.argmax(ax == amax[None], axis=0)
    picked = np.take_along_axis(x, first[None], axis=0)[0]
    return amax, np.where(amax > 0, picked, F32(0))


def running_max(values: np.ndarray) -> np.ndarray:
    """``m = 0; for v in values: if (v > m) m = v;`` along the last axis (keeps ggml's +0 start)."""
    m = np.zeros(values.shape[:-1], F32)
    for j in range(values.shape[-1]):
        m = np.where(values[..., j] > m, values[..., j], m)
    return m


def u8(a: np.ndarray) -> np.ndarray:
    """An int array stored into a C ``uint8_t``: kept modulo 256."""
    return (a & 0xFF).astype(np.uint8)


def i8(a: np.ndarray) -> np.ndarray:
    """An int array stored into a C ``int8_t`` (gcc: modulo 256)."""
    return (a & 0xFF).astype(np.uint8).view(np.int8)


def half_bytes(h: np.ndarray) -> np.ndarray:
    """float16 values (n,) as their little-endian bytes (n, 2)."""
    return h.astype("<f2").view(np.uint8).reshape(-1, 2)


class GgmlQuant(ABC):
    """One ggml type's reference quantizer: ``quantize_blocks`` turns (n, block_size) float32 values
    into (n, type_size) bytes, as ggml's ``quantize_row_*_ref`` writes them."""

    type: ClassVar[GgmlType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    #: blocks per call of ``quantize_blocks``: bounds the temporaries and keeps them in cache.
    chunk_blocks: ClassVar[int] = 4096

    @classmethod
    @abstractmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """(n, block_size) float32 -> (n, type_size) uint8."""


QUANTIZERS: dict[GgmlType, type[GgmlQuant]] = {}


def register(cls: type[GgmlQuant]) -> type[GgmlQuant]:
    QUANTIZERS[cls.type] = cls
    return cls
