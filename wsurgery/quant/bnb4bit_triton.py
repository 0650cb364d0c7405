"""Triton kernels for bitsandbytes 4-bit on CUDA: the bandwidth-bound part, byte-identical to the CPU path.

``bnb4bit`` imports this module only for CUDA tensors and falls back to its torch code when Triton
does not import. One program handles ``ROWS`` whole blocks:

- quantize: absmax per block (NaN counted as inf, so that the caller's finiteness check sees it),
  ``s = x * div_rn(1, max(absmax, 1e-38))`` (an IEEE division, as torch's reciprocal, not the
  approximate one), the code as the number of midpoints strictly below s written as a telescoping
  sum of 15 comparisons (for FP4 each step adds the code difference between neighbours in
  ascending order, so no table lookup is needed), and the nibble packing;
- dequantize: ``code[nibble] * absmax`` in float32, rounded to nearest even by the cast.

The ragged last block, the double quantization and the finiteness check stay in torch.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .bnb4bit import ASCENDING_CODES, dequantized_codes, midpoints

# Elements per program: enough independent loads in flight to saturate HBM with 4 warps.
ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _quantize_kernel(x_ptr, packed_ptr, absmax_ptr, midpoints_ptr, steps_ptr, first_code, n_blocks,
                     BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_range = rows < n_blocks
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :],
                mask=in_range[:, None], other=0.0).to(tl.float32)
    absmax = tl.max(tl.where(x == x, tl.abs(x), float("inf")), axis=1)
    tl.store(absmax_ptr + rows, absmax, mask=in_range)
    # All-zero blocks: any finite inverse gives 0 (the CPU path's 1/1e-38; a float32 subnormal the
    # GPU may flush to zero, and Triton would type the literal as float64).
    one = tl.full([ROWS], 1.0, tl.float32)
    inverse = tl.where(absmax > 0, tl.div_rn(one, tl.where(absmax > 0, absmax, one)), one)
    scaled = x * inverse[:, None]
    code = tl.full([ROWS, BLOCKSIZE], 0, tl.int32) + first_code
    for i in tl.static_range(15):
        code += tl.where(scaled > tl.load(midpoints_ptr + i), tl.load(steps_ptr + i), 0)
    high, low = tl.split(tl.reshape(code, [ROWS, BLOCKSIZE // 2, 2]))
    tl.store(packed_ptr + rows[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :],
             ((high << 4) | low).to(tl.uint8), mask=in_range[:, None])


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
def _coding_constants(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Midpoints, code steps between ascending neighbours, and the lowest code, for the kernel."""
    codes = ASCENDING_CODES[quant_type]
    steps = torch.tensor([b - a for a, b in zip(codes, codes[1:])], dtype=torch.int32, device=device)
    return midpoints(quant_type).to(device), steps, codes[0]


def quantize_full_blocks(flat: torch.Tensor, blocksize: int, quant_type: str, packed: torch.Tensor,
                         absmax: torch.Tensor) -> None:
    """Fill ``packed`` (flat.numel() / 2 bytes) and ``absmax`` (one per block) from whole blocks of ``flat``."""
    midpoints_, steps, first_code = _coding_constants(quant_type, flat.device)
    n_blocks = flat.numel() // blocksize
    rows, grid = _grid(n_blocks, blocksize)
    _quantize_kernel[grid](flat, packed, absmax, midpoints_, steps, first_code, n_blocks, BLOCKSIZE=blocksize, ROWS=rows)


def dequantize_full_blocks(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                           out: torch.Tensor) -> None:
    """Fill ``out`` (whole blocks) from ``packed`` bytes and the float32 ``absmax`` of each block."""
    n_blocks = out.numel() // blocksize
    rows, grid = _grid(n_blocks, blocksize)
    code = _device_codes(quant_type, out.device)
    _dequantize_kernel[grid](packed, absmax, code, out, n_blocks, BLOCKSIZE=blocksize, ROWS=rows)


@functools.cache
def _device_codes(quant_type: str, device: torch.device) -> torch.Tensor:
    return dequantized_codes(quant_type).to(device)
