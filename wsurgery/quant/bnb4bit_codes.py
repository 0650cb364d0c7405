"""bitsandbytes' 4-bit code books (NF4, FP4) and the tables derived from them.

A module of its own so that the Triton kernels (``bnb4bit_triton``) and the torch code
(``bnb4bit``, which imports the kernels) share them without importing each other.
"""

from __future__ import annotations

import functools

import torch

_NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bits) in bit-pattern order, normalized by 12 as bitsandbytes does.
_FP4_UNNORMALIZED = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# Codes in ascending order of value. FP4's two zeros: bitsandbytes' argsort puts code 0 before code 8.
ASCENDING_CODES = {
    "nf4": tuple(range(16)),
    "fp4": (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3),
}


@functools.cache
def code_book(quant_type: str) -> torch.Tensor:
    """The 16 code values bitsandbytes stores as ``quant_map`` (float32, CPU; read-only)."""
    if quant_type == "nf4":
        return torch.tensor(_NF4_CODE, dtype=torch.float32)
    return torch.tensor(_FP4_UNNORMALIZED, dtype=torch.float32) / torch.tensor(12.0)


@functools.cache
def midpoints(quant_type: str) -> torch.Tensor:
    """The 15 float32 midpoints between the code values in ascending order (bitsandbytes' bounds)."""
    ascending = code_book(quant_type)[list(ASCENDING_CODES[quant_type])]
    return (ascending[:-1] + ascending[1:]) / 2


@functools.cache
def dequantized_codes(quant_type: str) -> torch.Tensor:
    """The 16 values bitsandbytes' C++ kernel dequantizes the codes to: FP4 code 8 is -0.0 there."""
    code = code_book(quant_type).clone()
    if quant_type == "fp4":
        code[8] = -0.0
    return code
