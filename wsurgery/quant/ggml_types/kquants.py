"""ggml's K-quants: 256-value super-blocks of 16 or 32-value sub-blocks (``quantize_row_q*_K_ref``).

Each sub-block search (``make_qkx2_quants``, ``make_q3_quants``, ``make_qx_quants``) runs on all the
sub-blocks at once: arrays are (values in a sub-block, sub-blocks), so that ggml's loop over a
sub-block's values is a loop over rows here and every row operation spans the whole chunk.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as GgmlType

from .base import (F32, GROUP_MAX_EPS, GgmlQuant, clamp, first_absmax, fp16, half_bytes, i8, nearest_int,
                   register, running_max, seqsum, u8)

QK_K = 256


def _columns(blocks: np.ndarray, n: int) -> np.ndarray:
    """(B, 256) -> (n, B*256/n): column m is sub-block m (super-block m // (256/n))."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _rows(values: np.ndarray, n_blocks: int) -> np.ndarray:
    """The inverse of ``_columns``: (n, B*256/n) -> (B, 256)."""
    return values.T.reshape(n_blocks, QK_K)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` on each column of ``x`` (weights ``w``): (scale, the_min, L)."""
    lo, hi, sum_w, sum_x = x[0].copy(), x[0].copy(), w[0].copy(), w[0] * x[0]
    for xi, wi in zip(x[1:], w[1:], strict=True):
        lo = np.where(xi < lo, xi, lo)
        hi = np.where(xi > hi, xi, hi)
        sum_w += wi
        sum_x += wi * xi
    lo = np.where(lo > 0, F32(0), lo)
    flat, flat_min = hi == lo, -lo

    def error(scale: np.ndarray, lf: np.ndarray, mn: np.ndarray) -> np.ndarray:
        diff = scale * lf + mn - x
        return seqsum(w * (np.abs(diff) if use_mad else diff * diff))

    def quants(iscale: np.ndarray, mn: np.ndarray) -> np.ndarray:
        return clamp(nearest_int(iscale * (x - mn)), 0, nmax)

    # The levels of the best step so far are recomputed once at the end from that step's (iscale, min):
    # the same operations give the same levels, and no step pays for keeping them.
    iscale = F32(nmax) / (hi - lo)
    scale = F32(1) / iscale
    best_iscale, best_lo = iscale, lo
    best = error(scale, quants(iscale, lo).astype(F32), lo)
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - lo)
        lf = quants(iscale, lo).astype(F32)
        wl = w * lf
        sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * lf), seqsum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = np.where(positive, F32(0), this_min)
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, lf, this_min)
        better = (det > 0) & (cur < best)
        best_iscale, best_lo = np.where(better, iscale, best_iscale), np.where(better, lo, best_lo)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    levels = quants(best_iscale, best_lo)
    return np.where(flat, F32(0), scale), np.where(flat, flat_min, -lo), np.where(flat, 0, levels)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_q3_quants(do_rmse=true)`` on each column of ``x``: (scale, L + nmax)."""
    amax, mx = first_absmax(x)
    iscale = F32(-nmax) / mx
    levels = clamp(nearest_int(iscale * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = levels.astype(F32)
    sumlx, suml2 = seqsum(wx * lf), seqsum(w * lf * lf)
    # ggml stops a group after a pass that changes nothing; a later pass would change nothing either (same
    # state, same decisions), so each pass runs on the columns the previous one changed, gathered.
    active: np.ndarray | None = None  # None: all columns (no gathering)
    for _ in range(5):
        if active is None:
            xa, wa, wxa, la, sx, s2 = x, w, wx, levels, sumlx, suml2
        else:
            xa, wa, wxa, la = (np.take(a, active, axis=1) for a in (x, w, wx, levels))
            sx, s2 = sumlx[active], suml2[active]
        changed = np.zeros(xa.shape[1], bool)
        for i in range(x.shape[0]):
            li = la[i].astype(F32)
            slx = sx - wxa[i] * li
            sl2 = s2 - wa[i] * li * li
            new = clamp(nearest_int(xa[i] * sl2 / slx), -nmax, nmax - 1)
            nf = new.astype(F32)
            take = (slx > 0) & (new != la[i])
            slx = slx + wxa[i] * nf
            sl2 = sl2 + wa[i] * nf * nf
            take &= (sl2 > 0) & (slx * slx * s2 > sx * sx * sl2)
            if take.any():
                la[i] = np.where(take, new, la[i])
                sx = np.where(take, slx, sx)
                s2 = np.where(take, sl2, s2)
                changed |= take
        if active is None:
            sumlx, suml2 = sx, s2
            active = np.flatnonzero(changed)
        else:
            levels[:, active], sumlx[active], suml2[active] = la, sx, s2
            active = active[changed]
        if not active.size:
            break
    zero = amax < GROUP_MAX_EPS
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, levels + nmax)


def make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``make_qx_quants(rmse_type=1, qw=NULL)`` on each column of ``x``: (scale, L + nmax)."""
    amax, mx = first_absmax(x)
    w = x * x
    wx = w * x

    def quants(iscale: np.ndarray) -> np.ndarray:
        return clamp(nearest_int(iscale * x), -nmax, nmax - 1)

    def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lf = quants(iscale).astype(F32)
        return seqsum(wx * lf), seqsum(w * lf * lf)

    # As in make_qkx2_quants: the best attempt's levels are recomputed once, from its iscale.
    best_iscale = F32(-nmax) / mx
    sumlx, suml2 = sums(best_iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = np.where(better, iscale, best_iscale)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    zero = amax < GROUP_MAX_EPS
    return np.where(zero, F32(0), scale), np.where(zero, 0, quants(best_iscale) + nmax)


def _requantize(x: np.ndarray, levels: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int,
                hi: int) -> np.ndarray:
    """ggml's second pass: ``L = clamp(nearest_int((x + dm)/d), lo, hi) - lo`` in the columns whose
    ``d`` is not 0; the others keep the search's ``levels``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = clamp(nearest_int((x if dm is None else x + dm) / d), lo, hi)
    return np.where(d != 0, q - lo, levels)


def _pack2(levels: np.ndarray) -> np.ndarray:
    """(B, 256) 2-bit codes -> (B, 64): byte l of each 128 holds codes l, l+32, l+64, l+96."""
    r = levels.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (r[:, :, 0] | (r[:, :, 1] << 2) | (r[:, :, 2] << 4) | (r[:, :, 3] << 6)).reshape(-1, 64)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of 8 six-bit scales and 8 six-bit mins (ggml's ``get_scale_min_k4`` order)."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _scales_mins_k4(blocks: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's shared first half: sub-block search, 6-bit scales and mins, fp16 d/dmin, second pass.
    Returns (header bytes (B, 16), L (B, 256))."""
    n_blocks = blocks.shape[0]
    x = _columns(blocks, 32)
    av_x = np.sqrt(seqsum(x * x) / F32(32))
    scales, mins, levels = make_qkx2_quants(x, av_x + np.abs(x), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(n_blocks, 8), mins.reshape(n_blocks, 8)
    max_scale, max_min = running_max(scales), running_max(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(u8(nearest_int(inv_scale[:, None] * scales)), 63)
    lm = np.minimum(u8(nearest_int(inv_min[:, None] * mins)), 63)
    d, dmin = fp16(max_scale / F32(63)), fp16(max_min / F32(63))
    sub_d = (d.astype(F32)[:, None] * ls.astype(F32)).reshape(-1)
    sub_dm = (dmin.astype(F32)[:, None] * lm.astype(F32)).reshape(-1)
    levels = _requantize(x, levels, sub_d, sub_dm, 0, nmax)
    header = np.concatenate([half_bytes(d), half_bytes(dmin), _pack_scales_k4(ls, lm)], axis=1)
    return header, _rows(levels, n_blocks).astype(np.uint8)


@register
class Q2_K(GgmlQuant):
    type = GgmlType.Q2_K
    block_size, type_size = QK_K, 84
    chunk_blocks = 512

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n_blocks = blocks.shape[0]
        x = _columns(blocks, 16)
        scales, mins, levels = make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(n_blocks, 16), mins.reshape(n_blocks, 16)
        max_scale, max_min = running_max(scales), running_max(mins)
        with np.errstate(divide="ignore"):
            low = np.where(max_scale[:, None] > 0, nearest_int((F32(15) / max_scale)[:, None] * scales), 0)
            high = np.where(max_min[:, None] > 0, nearest_int((F32(15) / max_min)[:, None] * mins) << 4, 0)
        packed = u8(low) | u8(high)
        d = fp16(np.where(max_scale > 0, max_scale / F32(15), F32(0)))
        dmin = fp16(np.where(max_min > 0, max_min / F32(15), F32(0)))
        sub_d = (d.astype(F32)[:, None] * (packed & 0xF).astype(F32)).reshape(-1)
        sub_dm = (dmin.astype(F32)[:, None] * (packed >> 4).astype(F32)).reshape(-1)
        levels = _rows(_requantize(x, levels, sub_d, sub_dm, 0, 3), n_blocks)
        return np.concatenate([packed, _pack2(levels), half_bytes(d), half_bytes(dmin)], axis=1)


@register
class Q3_K(GgmlQuant):
    type = GgmlType.Q3_K
    block_size, type_size = QK_K, 110
    chunk_blocks = 4096

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n_blocks = blocks.shape[0]
        x = _columns(blocks, 16)
        scales, levels = make_q3_quants(x, 4)
        scales = scales.reshape(n_blocks, 16)
        _, max_scale = first_absmax(scales.T)
        nonzero = max_scale != 0
        with np.errstate(divide="ignore"):
            iscale = F32(-32) / max_scale
            ls = clamp(i8(nearest_int(iscale[:, None] * scales)).astype(np.int32), -32, 31) + 32
        ls = np.where(nonzero[:, None], ls, 0).astype(np.uint8)
        packed = np.zeros((n_blocks, 12), np.uint8)
        packed[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
        high = ls >> 4
        for j in range(16):
            packed[:, 8 + j % 4] |= high[:, j] << (2 * (j // 4))
        with np.errstate(divide="ignore"):
            d = fp16(np.where(nonzero, F32(1) / iscale, F32(0)))
        sub_d = (d.astype(F32)[:, None] * (ls.astype(F32) - F32(32))).reshape(-1)
        levels = _rows(_requantize(x, levels, sub_d, None, -4, 3), n_blocks)
        hmask = np.zeros((n_blocks, 32), np.uint8)
        top = levels > 3
        for k in range(8):
            hmask |= top[:, 32 * k: 32 * k + 32].astype(np.uint8) << k
        levels = np.where(top, levels - 4, levels)
        return np.concatenate([hmask, _pack2(levels), packed, half_bytes(d)], axis=1)


@register
class Q4_K(GgmlQuant):
    type = GgmlType.Q4_K
    block_size, type_size = QK_K, 144
    chunk_blocks = 512

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        header, levels = _scales_mins_k4(blocks, 15, -1.0, 20)
        r = levels.reshape(-1, 4, 2, 32)
        return np.concatenate([header, (r[:, :, 0] | (r[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


@register
class Q5_K(GgmlQuant):
    type = GgmlType.Q5_K
    block_size, type_size = QK_K, 176
    chunk_blocks = 512

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        header, levels = _scales_mins_k4(blocks, 31, -0.5, 15)
        r = levels.reshape(-1, 4, 2, 32)
        low, high = r & 0xF, r >> 4
        qh = np.zeros((r.shape[0], 32), np.uint8)
        for k in range(4):
            qh |= (high[:, k, 0] << (2 * k)) | (high[:, k, 1] << (2 * k + 1))
        return np.concatenate([header, qh, (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


@register
class Q6_K(GgmlQuant):
    type = GgmlType.Q6_K
    block_size, type_size = QK_K, 210
    chunk_blocks = 512

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        n_blocks = blocks.shape[0]
        x = _columns(blocks, 16)
        scales, levels = make_qx_quants_rmse1(x, 32)
        scales = scales.reshape(n_blocks, 16)
        max_abs, max_scale = first_absmax(scales.T)
        zero = max_abs < GROUP_MAX_EPS
        with np.errstate(divide="ignore"):
            iscale = F32(-128) / max_scale
            d = fp16(np.where(zero, F32(0), F32(1) / iscale))
            sc = i8(np.minimum(127, nearest_int(iscale[:, None] * scales)))
        sc = np.where(zero[:, None], 0, sc).astype(np.int8)
        sub_d = (d.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
        levels = _rows(_requantize(x, levels, sub_d, None, -32, 31), n_blocks)
        levels = np.where(zero[:, None], 0, levels).astype(np.uint8)
        r = levels.reshape(-1, 2, 4, 32)
        low, high = r & 0xF, r >> 4
        ql = np.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
        qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), half_bytes(d)], axis=1)


@register
class Q8_K(GgmlQuant):
    """Q8_K: ggml's dot-product partner of the K-quants (float32 ``d``, int16 sums of 16)."""

    type = GgmlType.Q8_K
    block_size, type_size = QK_K, 292
    chunk_blocks = 4096

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        amax, mx = first_absmax(blocks.T)
        zero = amax == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F32(-127) / mx
            q = i8(np.minimum(127, nearest_int(iscale[:, None] * blocks)))
            d = np.where(zero, F32(0), F32(1) / iscale)
        q = np.where(zero[:, None], 0, q).astype(np.int8)
        sums = q.reshape(-1, 16, 16).astype(np.int32).sum(axis=2).astype("<i2")
        return np.concatenate([d.astype("<f4").view(np.uint8).reshape(-1, 4), q.view(np.uint8),
                               sums.view(np.uint8).reshape(-1, 32)], axis=1)
