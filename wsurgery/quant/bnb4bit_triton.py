"""Triton kernels for bitsandbytes 4-bit on CUDA: the bandwidth-bound part, byte-identical to the CPU path.

``bnb4bit`` imports this module only for CUDA tensors and falls back to its torch code when Triton
does not import. One program handles ``ROWS`` whole blocks:

- quantize: absmax per block (NaN counted as inf), ``s = x * div_rn(1, max(absmax, 1e-38))`` (an
  IEEE division, as torch's reciprocal, not the approximate one), the sorted code index as a
  four-level binary search over the 15 midpoints with strict ``>`` (FP4 then maps it to its code
  through a 16-entry table), and the nibble packing of element pairs;
- dequantize: ``code[nibble] * absmax`` in float32, rounded to nearest even by the cast.

GPUs may flush subnormal floats to zero where the CPU keeps them. The quantize kernel therefore
flags every block where that could change a byte (a nonzero |x| below 2**-101, a scaled value that
could be subnormal, absmax of 2**125 or more) or whose absmax is not finite, and the caller redoes
those blocks with torch ops, which keep subnormals and refuse non-finite weights. Dequantization
can only meet subnormals in blocks whose absmax is below ``TINY_ABSMAX``, which the caller redoes
the same way. The ragged last block and the double quantization stay in torch.

Both kernels load and store contiguous rows (pairs are split and joined in registers). Their
arithmetic is tested without a GPU by Triton's interpreter (tests/test_bnb4bit_triton_interpreted.py);
on a GPU, ``scripts/bench_nf4.py --check-cuda`` and the CUDA tests.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .bnb4bit_codes import ASCENDING_CODES, dequantized_codes, midpoints

# Elements per program: enough independent loads in flight to keep HBM busy.
ELEMENTS_PER_PROGRAM = 4096
# Below this absmax a dequantized value can be subnormal (the smallest nonzero code is 0.0052).
TINY_ABSMAX = 2.0**-100


@triton.jit
def _magnitude(x):
    """|x|, with NaN as inf so that a NaN block's absmax is not finite."""
    return tl.where(x == x, tl.abs(x), float("inf"))


@triton.jit
def _exponent_and_nonzero(raw):
    """The biased float32 exponent field of each value and whether it is nonzero, from its bits.

    No float op may flush them.
    """
    if raw.dtype == tl.float32:
        bits = raw.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        exponent = bits >> 23
    elif raw.dtype == tl.bfloat16:
        bits = raw.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        exponent = bits >> 7
    else:  # float16: its subnormals are normal float32 values, far from float32's subnormal range
        bits = raw.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        exponent = tl.full(raw.shape, 127, tl.int32)
    return exponent, bits != 0


@triton.jit
def _at_risk(raw, absmax_exponent):
    """Per row: a nonzero value below 2**-101, or so small against absmax that x / absmax may be subnormal."""
    exponent, nonzero = _exponent_and_nonzero(raw)
    risky = nonzero & ((exponent < 26) | (absmax_exponent[:, None] - exponent >= 124))
    return tl.max(risky.to(tl.int32), axis=1)


@triton.jit
def _sorted_index(s, midpoints_ptr):
    """Number of midpoints strictly below s: a binary search in four comparisons."""
    m0 = tl.load(midpoints_ptr + 0)
    m1 = tl.load(midpoints_ptr + 1)
    m2 = tl.load(midpoints_ptr + 2)
    m3 = tl.load(midpoints_ptr + 3)
    m4 = tl.load(midpoints_ptr + 4)
    m5 = tl.load(midpoints_ptr + 5)
    m6 = tl.load(midpoints_ptr + 6)
    m7 = tl.load(midpoints_ptr + 7)
    m8 = tl.load(midpoints_ptr + 8)
    m9 = tl.load(midpoints_ptr + 9)
    m10 = tl.load(midpoints_ptr + 10)
    m11 = tl.load(midpoints_ptr + 11)
    m12 = tl.load(midpoints_ptr + 12)
    m13 = tl.load(midpoints_ptr + 13)
    m14 = tl.load(midpoints_ptr + 14)
    above8 = s > m7
    above4 = s > tl.where(above8, m11, m3)
    above2 = s > tl.where(above8, tl.where(above4, m13, m9), tl.where(above4, m5, m1))
    above1 = s > tl.where(above8, tl.where(above4, tl.where(above2, m14, m12), tl.where(above2, m10, m8)),
                          tl.where(above4, tl.where(above2, m6, m4), tl.where(above2, m2, m0)))
    return above8.to(tl.int32) * 8 + above4.to(tl.int32) * 4 + above2.to(tl.int32) * 2 + above1.to(tl.int32)


@triton.jit
def _code(s, midpoints_ptr, codes_ptr, REMAP: tl.constexpr):
    index = _sorted_index(s, midpoints_ptr)
    if REMAP:
        index = tl.load(codes_ptr + index)
    return index


@triton.jit
def _quantize_kernel(x_ptr, packed_ptr, absmax_ptr, redo_ptr, midpoints_ptr, codes_ptr, n_blocks,
                     BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, REMAP: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_range = rows < n_blocks
    rows = rows.to(tl.int64)
    pairs = tl.arange(0, BLOCKSIZE // 2)
    # One contiguous load, split into the pairs' first and second elements in registers.
    raw = tl.load(x_ptr + rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :], mask=in_range[:, None],
                  other=0.0)
    raw_first, raw_second = tl.split(tl.reshape(raw, [ROWS, BLOCKSIZE // 2, 2]))
    x_first, x_second = raw_first.to(tl.float32), raw_second.to(tl.float32)
    absmax = tl.maximum(tl.max(_magnitude(x_first), axis=1), tl.max(_magnitude(x_second), axis=1))
    tl.store(absmax_ptr + rows, absmax, mask=in_range)

    absmax_exponent = (absmax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    redo = ((absmax_exponent >= 252) | (_at_risk(raw_first, absmax_exponent) > 0)
            | (_at_risk(raw_second, absmax_exponent) > 0))
    tl.store(redo_ptr + rows, redo.to(tl.int8), mask=in_range)

    # absmax below 2**-101 means a block of zeros (s = 0 whatever the scale) or one redone in torch
    inverse = tl.div_rn(tl.full([ROWS], 1.0, tl.float32), tl.where(absmax_exponent < 26, 1.0, absmax))[:, None]
    high = _code(x_first * inverse, midpoints_ptr, codes_ptr, REMAP)
    low = _code(x_second * inverse, midpoints_ptr, codes_ptr, REMAP)
    tl.store(packed_ptr + rows[:, None] * (BLOCKSIZE // 2) + pairs[None, :], ((high << 4) | low).to(tl.uint8),
             mask=in_range[:, None])


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_blocks,
                       BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_range = rows < n_blocks
    rows = rows.to(tl.int64)
    byte = tl.load(packed_ptr + rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :],
                   mask=in_range[:, None], other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + rows, mask=in_range, other=0.0)[:, None]
    high = tl.load(code_ptr + (byte >> 4)) * scale
    low = tl.load(code_ptr + (byte & 15)) * scale
    values = tl.reshape(tl.join(high, low), [ROWS, BLOCKSIZE])
    tl.store(out_ptr + rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :],
             values.to(out_ptr.dtype.element_ty), mask=in_range[:, None])


def _grid(n_blocks: int, blocksize: int) -> tuple[int, tuple[int]]:
    rows = max(1, ELEMENTS_PER_PROGRAM // blocksize)
    return rows, (triton.cdiv(n_blocks, rows),)


@functools.cache
def _coding_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The midpoints, and the code of each sorted index (the identity for NF4), on the device."""
    codes = torch.tensor(ASCENDING_CODES[quant_type], dtype=torch.int32, device=device)
    return midpoints(quant_type).to(device), codes


@functools.cache
def _device_codes(quant_type: str, device: torch.device) -> torch.Tensor:
    return dequantized_codes(quant_type).to(device)


def launch_quantize(flat: torch.Tensor, blocksize: int, quant_type: str, packed: torch.Tensor, absmax: torch.Tensor,
                    redo: torch.Tensor) -> None:
    """Queue the quantize kernel over whole blocks of ``flat`` (no synchronization)."""
    midpoints_, codes = _coding_tables(quant_type, flat.device)
    n_blocks = flat.numel() // blocksize
    rows, grid = _grid(n_blocks, blocksize)
    _quantize_kernel[grid](flat, packed, absmax, redo, midpoints_, codes, n_blocks,
                           BLOCKSIZE=blocksize, ROWS=rows, REMAP=quant_type != "nf4")


def launch_dequantize(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                      out: torch.Tensor) -> None:
    """Queue the dequantize kernel over whole blocks of ``out`` (no synchronization)."""
    n_blocks = out.numel() // blocksize
    rows, grid = _grid(n_blocks, blocksize)
    _dequantize_kernel[grid](packed, absmax, _device_codes(quant_type, out.device), out, n_blocks,
                             BLOCKSIZE=blocksize, ROWS=rows)


def quantize_full_blocks(flat: torch.Tensor, blocksize: int, quant_type: str, packed: torch.Tensor,
                         absmax: torch.Tensor) -> torch.Tensor:
    """Fill ``packed`` and ``absmax`` from whole blocks of ``flat``; return the blocks to redo in torch."""
    redo = torch.empty(flat.numel() // blocksize, dtype=torch.int8, device=flat.device)
    launch_quantize(flat, blocksize, quant_type, packed, absmax, redo)
    return redo.nonzero().squeeze(1)


def dequantize_full_blocks(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                           out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (whole blocks) from ``packed`` bytes and the float32 ``absmax``; return the blocks to redo."""
    launch_dequantize(packed, absmax, blocksize, quant_type, out)
    return (absmax[: out.numel() // blocksize] < TINY_ABSMAX).nonzero().squeeze(1)
