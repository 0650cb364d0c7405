"""bitsandbytes 4-bit quantization (NF4 / FP4, optional double quantization) on plain tensors.

The stored tensors are byte-identical to what bitsandbytes 0.50.2 computes on CPU and what
``Linear4bit.state_dict()`` holds; ``dequantize_4bit`` equals bitsandbytes' ``dequantize_4bit``
(``torch.equal``), with the two exceptions below where bitsandbytes' CPU kernel is wrong or
CPU-dependent. bitsandbytes itself is never imported: the tests compare against it.

What bitsandbytes does, step by step, and what is reproduced here:

- The weight is flattened and cut into blocks of ``blocksize``. Each block is scaled into [-1, 1]
  by its absmax as ``s = x * (1 / absmax)`` (an IEEE reciprocal, then a product; absmax clamped to
  1e-38 for the scaling only), except the ragged last block, which bitsandbytes *divides*,
  ``s = x / absmax``. The two differ in the last bit for some x, so both are kept.
- The 4-bit code of s is the number of code-book midpoints strictly below s (``bucketize``; the
  CUDA kernel's decision tree uses the same strict ``>``), remapped for FP4, whose code book is not
  sorted. FP4 has +0 (code 0) and -0 (code 8): exact zeros and tiny negatives get code 0, tiny
  positives code 8, as bitsandbytes' ``argsort`` orders them. Codes are packed two per byte,
  element 2i in the high nibble; an odd count is padded with the code of 0.
- Double quantization: ``offset`` is the float32 mean of the absmax vector, as torch computes it
  on the CPU (the CUDA path takes that mean on the CPU too, so that the offset is the same float).
  ``absmax - offset`` is quantized in blocks of 256 with the signed dynamic 8-bit map by
  bitsandbytes' C++ CPU kernel, which looks the code up in a 65,536-entry table indexed by
  ``trunc(fma((v + 1) * 0.5, 65535, 0.5))``; that table is rebuilt here the way the kernel builds
  it, so the 8-bit codes are the CPU kernel's, also on CUDA. bitsandbytes' *CUDA* kernel instead
  binary-searches the map with a midpoint test and gives different 8-bit codes for some values
  near zero, where the dynamic map is densest: checkpoints quantized by bitsandbytes on a GPU can
  differ from ours in those absmax codes (never in the 4-bit codes, which both derive from the
  same midpoints), and ours are the CPU kernel's.
- Dequantization is ``code[nibble] * absmax[block]`` in float32, rounded once to the output
  dtype; with double quantization ``absmax = nested_map[code] * nested_absmax[i // 256] + offset``
  in float32. bitsandbytes' C++ table has -0.0 for FP4 code 8 where the stored ``quant_map`` has
  +0.0; the dequantized values follow the C++ table (``torch.equal`` treats the zeros as equal).
  The stored ``quant_map`` is checked for shape only: bitsandbytes ignores its values too.
- bitsandbytes' ``dequantize_4bit`` returns ``out.t()`` when the packed tensor has a single row
  (a tensor of one or two elements), a legacy shim; we return the shape in the JSON.
- bitsandbytes 0.50.2's CPU dequantization of a weight whose last dimension is a multiple of 16
  but not of the blocksize (blocksize < 2048, AVX-512 machines) takes the wrong absmax: its
  AVX-512 kernel numbers blocks row by row, as if each row started a block. Ours numbers them over
  the flattened weight, as bitsandbytes quantizes, as its CUDA and portable kernels dequantize, and
  as its CPU kernel does for the flattened weight.
- Dequantized values below float32's normal range (absmax under ~1e-36): bitsandbytes' AVX-512
  kernel flushes them to zero in bf16 on CPUs with AVX512-BF16; we keep them, as its portable
  path and CUDA do.

Non-finite weights are refused: bitsandbytes would silently store a NaN absmax or codes that do not
round-trip.

Speed: the CPU path works on chunks of ``CPU_CHUNK`` elements in reused buffers (see
``_for_each_chunk``). The 4-bit code is read from a 1023-cell grid over
[-1, 1], narrow enough that no cell holds two midpoints: one table gives the code at the cell's low
end, a second the one midpoint inside the cell (if any) to compare against, which is exact and
several times faster than ``bucketize``. Dequantization runs in the compiled AVX-512/AVX2 kernel
(``bnb4bit_native``) where it was built; otherwise torch looks both values of a byte up at once.
On CUDA, Triton kernels (``bnb4bit_triton``) do the blockwise absmax, scaling, coding and packing,
and the dequantization, when Triton imports; otherwise the same torch code runs on the GPU.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from . import bnb4bit_native
from .bnb4bit_codes import ASCENDING_CODES, code_book, dequantized_codes, midpoints

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
SUFFIXES = ("", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")
JSON_SUFFIX_PREFIX = "quant_state.bitsandbytes__"
# Elements per step on CPU (see _for_each_chunk).
CPU_CHUNK = 1 << 18
# On CUDA (the torch fallback without Triton) big steps, to keep the GPU busy between launches.
CUDA_CHUNK = 1 << 22
HUGE_PAGE_BYTES = 2 << 20
# repr() of a float32 value read as a Python float is at most 23 characters ("-1.2345678901234567e-38").
MAX_FLOAT_REPR_LEN = 24

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_JSON_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
_NESTED_JSON_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")

GRID_CELLS = 1023  # odd, so that no cell edge falls on 0, where FP4 has a midpoint


def json_suffix(quant_type: str) -> str:
    """The key suffix of the packed-JSON tensor: ``quant_state.bitsandbytes__nf4`` or ``__fp4``."""
    return JSON_SUFFIX_PREFIX + quant_type


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map()``), stored as ``nested_quant_map``.

    Seven decades 1e-6..1 of 2**i linearly spaced means each, both signs, plus 0 and 1, computed in
    the same float32 steps so that every value is the same float.
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        decade = 10 ** (i - 6)
        values += (decade * means).tolist() + (-decade * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def check_blocksize(blocksize: int) -> None:
    """Raise InputError unless bitsandbytes' 4-bit quantization accepts this blocksize."""
    if not _is_int(blocksize) or blocksize not in BLOCKSIZES:
        raise InputError(f"4-bit blocksize {blocksize!r} is not supported: bitsandbytes accepts "
                         f"{', '.join(map(str, BLOCKSIZES))}")


def _check_quant_type(quant_type: Any, where: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise InputError(f"{where}: unknown 4-bit quant_type {quant_type!r}; expected 'nf4' or 'fp4'")


def _as_float32(value: float) -> float:
    """The float32 nearest to value, as a Python float (bitsandbytes keeps the offset as a float32 tensor)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


@dataclass(frozen=True)
class QuantState:
    """Everything the packed JSON of one bitsandbytes 4-bit weight says.

    ``nested_offset`` is None without double quantization; with it, the float32 offset (as a
    Python float) subtracted from the absmax vector before its 8-bit quantization.
    """

    quant_type: str
    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nested_offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_offset is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def n_packed_bytes(self) -> int:
        return -(-self.numel // 2)

    @property
    def json_suffix(self) -> str:
        return json_suffix(self.quant_type)

    def to_json_bytes(self) -> bytes:
        """bitsandbytes' packed JSON (``QuantState.as_dict(packed=True)``): same keys, order and numbers."""
        fields: dict[str, Any] = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                                  "dtype": _DTYPE_NAMES[self.dtype], "shape": list(self.shape)}
        if self.double_quant:
            fields.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                          nested_offset=self.nested_offset)
        return json.dumps(fields).encode("utf-8")

    @classmethod
    def from_json_bytes(cls, data: bytes, where: str) -> QuantState:
        """Parse and validate a packed JSON; InputError naming ``where`` on anything bitsandbytes could not use."""
        try:
            fields = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{where}: the 4-bit quant-state JSON does not parse ({exc})") from None
        if not isinstance(fields, dict):
            raise InputError(f"{where}: the 4-bit quant-state JSON is not an object")
        unknown = sorted(set(fields) - set(_JSON_KEYS))
        missing = [key for key in ("quant_type", "blocksize", "dtype", "shape") if key not in fields]
        if unknown or missing:
            raise InputError(f"{where}: the 4-bit quant-state JSON has unknown keys {unknown} / lacks {missing}")
        _check_quant_type(fields["quant_type"], where)
        try:
            check_blocksize(fields["blocksize"])
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        if fields["dtype"] not in _DTYPES_BY_NAME:
            raise InputError(f"{where}: 4-bit dtype {fields['dtype']!r} is not one of float32, float16, bfloat16")
        shape = fields["shape"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape) or math.prod(shape) == 0:
            raise InputError(f"{where}: 4-bit shape {shape!r} is not a list of positive sizes")
        nested = [key for key in _NESTED_JSON_KEYS if key in fields]
        if nested and len(nested) != len(_NESTED_JSON_KEYS):
            raise InputError(f"{where}: the 4-bit quant-state JSON has {nested} but not all of "
                             f"{list(_NESTED_JSON_KEYS)}")
        offset = None
        if nested:
            if not _is_int(fields["nested_blocksize"]) or fields["nested_blocksize"] <= 0:
                raise InputError(f"{where}: nested_blocksize {fields['nested_blocksize']!r} is not a positive integer")
            if fields["nested_dtype"] != "float32":
                raise InputError(f"{where}: nested_dtype {fields['nested_dtype']!r} is not supported "
                                 "(bitsandbytes writes float32)")
            raw_offset = fields["nested_offset"]
            if (isinstance(raw_offset, bool) or not isinstance(raw_offset, (int, float))
                    or not math.isfinite(raw_offset)):
                raise InputError(f"{where}: nested_offset {raw_offset!r} is not a finite number")
            offset = _as_float32(float(raw_offset))
        return cls(quant_type=fields["quant_type"], blocksize=fields["blocksize"],
                   dtype=_DTYPES_BY_NAME[fields["dtype"]], shape=tuple(shape), nested_offset=offset,
                   nested_blocksize=fields.get("nested_blocksize", NESTED_BLOCKSIZE))

    def stored_specs(self, quant_storage: torch.dtype = torch.uint8) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Suffix -> (dtype, shape) of every tensor ``Linear4bit.state_dict()`` stores, in its order.

        Known before quantizing, except the JSON's length, which depends on the digits of
        ``nested_offset``: lay it out with :meth:`max_json_len` when the offset is not known yet.
        """
        storage_bytes = torch.empty((), dtype=quant_storage).element_size()
        if self.n_packed_bytes % storage_bytes:
            raise InputError(f"{self.n_packed_bytes} packed bytes cannot be stored as {quant_storage} "
                             f"({storage_bytes} bytes each); use quant_storage uint8")
        specs = {"": (quant_storage, (self.n_packed_bytes // storage_bytes, 1)),
                 "absmax": (torch.uint8 if self.double_quant else torch.float32, (self.n_blocks,)),
                 "quant_map": (torch.float32, (16,))}
        if self.double_quant:
            specs["nested_absmax"] = (torch.float32, (-(-self.n_blocks // self.nested_blocksize),))
            specs["nested_quant_map"] = (torch.float32, (256,))
        specs[self.json_suffix] = (torch.uint8, (len(self.to_json_bytes()),))
        return specs

    @staticmethod
    def max_json_len(quant_type: str, blocksize: int, dtype: torch.dtype, shape: tuple[int, ...],
                     double_quant: bool) -> int:
        """An upper bound of ``len(to_json_bytes())`` for any offset a finite float32 mean can take."""
        state = QuantState(quant_type, blocksize, dtype, tuple(shape), 0.0 if double_quant else None)
        return len(state.to_json_bytes()) + (MAX_FLOAT_REPR_LEN - len(repr(0.0)) if double_quant else 0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# 4-bit codes


@dataclass(frozen=True)
class _CodeGrid:
    """Tables that give the 4-bit code of a scaled value s without a binary search.

    Cell ``c = trunc((s + 1) * GRID_CELLS / 2)`` covers s in ``[2c/K - 1, 2(c+1)/K - 1)``; no cell
    holds two midpoints, and no midpoint lies within float32 rounding of a cell edge, so
    ``code = low[c] + step[c] * (s > midpoint[c])`` is exact. Cells without a midpoint compare
    against +inf.
    """

    low: torch.Tensor        # uint8 (K + 1,): the code at the cell's low end
    midpoint: torch.Tensor   # float32 (K + 1,)
    step: torch.Tensor | None  # uint8 (K + 1,): code change across the midpoint (mod 256); None = always 1


@functools.cache
def _code_grid(quant_type: str, device: torch.device) -> _CodeGrid:
    bounds = midpoints(quant_type).double()
    lows = torch.arange(GRID_CELLS + 1, dtype=torch.float64) * 2 / GRID_CELLS - 1
    below = torch.searchsorted(bounds, lows)  # midpoints strictly below each cell's low end
    inside = below.clamp(max=len(bounds) - 1)
    has_midpoint = (below < len(bounds)) & (bounds[inside] < lows + 2 / GRID_CELLS)
    midpoint = torch.where(has_midpoint, bounds[inside], math.inf).float()
    ascending = torch.tensor(ASCENDING_CODES[quant_type])
    low = ascending[below]
    step = None
    if quant_type != "nf4":
        step = (ascending[(below + 1).clamp(max=15)] - low).remainder(256).to(torch.uint8).to(device)
    return _CodeGrid(low.to(torch.uint8).to(device), midpoint.to(device), step)


class _Scratch:
    """Buffers for one chunk of quantization, allocated once per call and reused for every chunk."""

    def __init__(self, elements: int, device: torch.device, fp4: bool):
        self.scaled = torch.empty(elements, dtype=torch.float32, device=device)
        self.cell = torch.empty(elements, dtype=torch.float32, device=device)
        self.index = torch.empty(elements, dtype=torch.int32, device=device)
        self.codes = torch.empty(elements, dtype=torch.uint8, device=device)
        self.above = torch.empty(elements, dtype=torch.bool, device=device)
        self.step = torch.empty(elements, dtype=torch.uint8, device=device) if fp4 else None
        self.pairs = torch.empty(elements // 2, dtype=torch.int16, device=device)


def _codes(scaled: torch.Tensor, grid: _CodeGrid, scratch: _Scratch) -> torch.Tensor:
    """The 4-bit codes (uint8, in scratch) of the scaled values."""
    m = scaled.numel()
    cell = torch.add(scaled, 1.0, out=scratch.cell[:m]).mul_(GRID_CELLS / 2)
    index = scratch.index[:m]
    index.copy_(cell)  # truncation; s in [-1 - ulp, 1 + ulp] gives 0..K
    midpoint = torch.index_select(grid.midpoint, 0, index, out=scratch.cell[:m])
    codes = torch.index_select(grid.low, 0, index, out=scratch.codes[:m])
    above = torch.gt(scaled, midpoint, out=scratch.above[:m])
    if grid.step is None:
        return codes.add_(above)
    assert scratch.step is not None  # allocated for FP4, as grid.step is
    step = torch.index_select(grid.step, 0, index, out=scratch.step[:m])
    return codes.add_(step.mul_(above))


def _pack(codes: torch.Tensor, out: torch.Tensor, scratch: _Scratch) -> None:
    """Pack an even number of 4-bit codes into bytes, the first of each pair in the high nibble.

    As int16, a pair (a, b) reads a | b << 8 on little-endian machines (x86, ARM, CUDA):
    (v << 4) | (v >> 8) holds a << 4 | b in its low byte, which the cast to uint8 keeps.
    """
    pairs = codes.view(torch.int16)
    packed = torch.bitwise_left_shift(pairs, 4, out=scratch.pairs[: pairs.numel()])
    packed.bitwise_or_(pairs >> 8)
    out.copy_(packed)


def _for_each_chunk(total: int, device: torch.device, work: Callable[[int, int, Any], None],
                    make_scratch: Callable[[int], Any]) -> None:
    """Call ``work(start, stop, scratch)`` on consecutive chunks of ``total`` elements, reusing one scratch.

    On CPU, chunks of ``CPU_CHUNK`` elements: small enough that the scratch stays in the cache, large
    enough that torch's per-op cost (several microseconds, a dozen ops per chunk) is a few percent.
    Measured on 2 cores, 11008x4096 bf16: 16K-element chunks took 505 ms to quantize and 118 ms to
    dequantize, 256K-element chunks 133 ms and 36-46 ms. Worker threads over chunks (intra-op threads
    set to 1 meanwhile) did not help: dequantization is bound by page faults on the fresh output (on
    that VM, 100 ms per 180 MB in 4 KiB pages, hence ``_empty``'s huge pages) and memory traffic.
    """
    chunk = CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK
    scratch = make_scratch(min(chunk, total))
    for start in range(0, total, chunk):
        work(start, min(start + chunk, total), scratch)


def _quantize_full_blocks(flat: torch.Tensor, blocksize: int, quant_type: str,
                          packed: torch.Tensor, absmax: torch.Tensor, where: str) -> None:
    """Quantize ``flat`` (a whole number of blocks) into ``packed`` and ``absmax``, chunk by chunk."""
    grid = _code_grid(quant_type, flat.device)

    def quantize_chunk(start: int, stop: int, scratch: _Scratch) -> None:
        m = stop - start
        scaled = scratch.scaled[:m].view(-1, blocksize)
        scaled.copy_(flat[start:stop].view(-1, blocksize))  # float32, exact
        block_absmax = absmax[start // blocksize:stop // blocksize]
        torch.amax(torch.abs(scaled, out=scratch.cell[:m].view_as(scaled)), dim=1, out=block_absmax)
        _check_finite(block_absmax, where)
        scaled.mul_(torch.reciprocal(block_absmax.clamp(min=1e-38))[:, None])
        _pack(_codes(scratch.scaled[:m], grid, scratch), packed[start // 2:stop // 2], scratch)

    _for_each_chunk(flat.numel(), flat.device, quantize_chunk,
                    lambda elements: _Scratch(elements, flat.device, grid.step is not None))


def _requantize_blocks(blocks: torch.Tensor, weight_blocks: torch.Tensor, quant_type: str, packed: torch.Tensor,
                       absmax: torch.Tensor, where: str) -> None:
    """Redo some blocks (indices ``blocks``) with the torch code, e.g. where a GPU kernel may flush subnormals."""
    blocksize = weight_blocks.shape[1]
    redone_packed = torch.empty(blocks.numel() * blocksize // 2, dtype=torch.uint8, device=packed.device)
    redone_absmax = torch.empty(blocks.numel(), dtype=torch.float32, device=absmax.device)
    _quantize_full_blocks(weight_blocks[blocks].view(-1), blocksize, quant_type, redone_packed, redone_absmax, where)
    packed[: weight_blocks.numel() // 2].view(-1, blocksize // 2)[blocks] = redone_packed.view(-1, blocksize // 2)
    absmax[blocks] = redone_absmax


def _check_finite(absmax: torch.Tensor, where: str) -> None:
    """Refuse inf/NaN weights (their block's absmax is not finite: amax propagates NaN)."""
    if not bool(torch.isfinite(absmax).all()):
        raise InputError(f"{where}: the weight has inf or NaN values, which 4-bit quantization cannot represent")


def _quantize_ragged_block(tail: torch.Tensor, quant_type: str, packed: torch.Tensor, absmax: torch.Tensor,
                           where: str) -> None:
    """The last, shorter block: bitsandbytes divides by its absmax instead of multiplying by the inverse."""
    values = tail.float()
    absmax.copy_(values.abs().amax())
    _check_finite(absmax, where)
    scaled = values / absmax.clamp(min=1e-38)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # bitsandbytes pads with a scaled 0
    scratch = _Scratch(scaled.numel(), tail.device, quant_type != "nf4")
    _pack(_codes(scaled, _code_grid(quant_type, tail.device), scratch), packed, scratch)


def _triton_kernels(device: torch.device):
    """The Triton kernels module for CUDA tensors, or None (CPU, or Triton missing)."""
    if device.type != "cuda":
        return None
    try:
        from . import bnb4bit_triton
    except ImportError:
        return None
    return bnb4bit_triton


# ---------------------------------------------------------------------------------------------
# Double quantization of the absmax vector (bitsandbytes' C++ CPU kernel)


@functools.cache
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """bitsandbytes' 65,536-entry table: for v = -1 + 2i/65535, the number of map midpoints below v."""
    code = dynamic_map()
    bounds = (code[:-1] + code[1:]) * 0.5
    values = torch.arange(1 << 16, dtype=torch.float32) * 2 / torch.tensor(65535.0) - 1
    return torch.searchsorted(bounds, values).to(torch.uint8).to(device)


def _quantize_nested(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-map codes and per-block absmax of ``values`` (float32), as the C++ kernel computes them.

    Per block: absmax; all-zero blocks get code 0; else v = clamp(x * (1 / absmax), -1, 1),
    index = trunc(fma((v + 1) * 0.5, 65535, 0.5)). The fma is evaluated in float64, exact here:
    the product has at most 40 significant bits, and where adding 0.5 rounds (t < 2**-14) the
    result is below 4.5 and at least 2**-41 away from any float32 rounding tie.
    """
    n = values.numel()
    blocks = torch.nn.functional.pad(values, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    nonzero = absmax > 0
    inverse = torch.where(nonzero, torch.reciprocal(absmax), 0.0)
    halves = (blocks * inverse[:, None]).clamp_(-1, 1).add_(1).mul_(0.5)
    index = halves.double().mul_(65535).add_(0.5).float().to(torch.int32)
    codes = torch.where(nonzero[:, None], _dynamic_lut(values.device)[index], 0).to(torch.uint8)
    return codes.view(-1)[:n], absmax


def _dequantize_nested(codes: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor,
                       nested_blocksize: int, offset: float) -> torch.Tensor:
    """absmax = nested_map[code] * nested_absmax[i // nested_blocksize] + offset, in float32."""
    values = nested_map[codes.long()]
    scale = nested_absmax.repeat_interleave(nested_blocksize)[: values.numel()]
    return values.mul_(scale).add_(torch.tensor(offset, dtype=torch.float32, device=values.device))


# ---------------------------------------------------------------------------------------------
# Public API


def quantize_4bit(w: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                  quant_storage: torch.dtype = torch.uint8, where: str = "tensor",
                  ) -> tuple[dict[str, torch.Tensor], QuantState]:
    """Quantize one weight as bitsandbytes' ``Linear4bit`` stores it.

    Returns suffix -> tensor (``""`` is the packed weight; dtypes, shapes and order as in
    ``Linear4bit.state_dict()``) and the state. CPU or CUDA tensors of float32/float16/bfloat16,
    any shape. ``where`` names the tensor in error messages.
    """
    _check_quant_type(quant_type, where)
    check_blocksize(blocksize)
    if w.dtype not in _DTYPE_NAMES:
        raise InputError(f"{where}: 4-bit quantization takes float32/float16/bfloat16 weights, not {w.dtype}")
    if w.numel() == 0:
        raise InputError(f"{where}: cannot 4-bit quantize an empty tensor")
    state = QuantState(quant_type, blocksize, w.dtype, tuple(w.shape))
    try:
        state.stored_specs(quant_storage)  # refuses a byte count quant_storage cannot hold, before any work
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None

    flat = w.detach().reshape(-1)
    n, full = flat.numel(), flat.numel() - flat.numel() % blocksize
    packed = torch.empty(state.n_packed_bytes, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(state.n_blocks, dtype=torch.float32, device=w.device)
    if full:
        kernels = _triton_kernels(w.device)
        if kernels is None:
            _quantize_full_blocks(flat[:full], blocksize, quant_type, packed[: full // 2], absmax[: full // blocksize],
                                  where)
        else:
            redo = kernels.quantize_full_blocks(flat[:full], blocksize, quant_type, packed[: full // 2],
                                                absmax[: full // blocksize])
            if redo.numel():
                _requantize_blocks(redo, flat[:full].view(-1, blocksize), quant_type, packed, absmax, where)
    if full < n:
        _quantize_ragged_block(flat[full:], quant_type, packed[full // 2:], absmax[-1:], where)

    parts = {"": packed.view(quant_storage).unsqueeze(1), "absmax": absmax,
             "quant_map": _constant_on(quant_type, w.device).clone()}
    if double_quant:
        offset = absmax.cpu().mean()  # torch's CPU float32 mean, as bitsandbytes on CPU
        codes, nested_absmax = _quantize_nested(absmax - offset, NESTED_BLOCKSIZE)
        parts.update(absmax=codes, nested_absmax=nested_absmax,
                     nested_quant_map=_constant_on("dynamic", w.device).clone())
        state = QuantState(quant_type, blocksize, w.dtype, tuple(w.shape), nested_offset=offset.item())
    json_bytes = state.to_json_bytes()
    parts[state.json_suffix] = torch.frombuffer(bytearray(json_bytes), dtype=torch.uint8).to(w.device)
    return parts, state


@functools.cache
def _constant_on(name: str, device: torch.device) -> torch.Tensor:
    """A code book ("nf4", "fp4") or the dynamic map ("dynamic"), copied to a device once (callers clone it)."""
    return (dynamic_map() if name == "dynamic" else code_book(name)).to(device)


def _find_json_part(parts: dict[str, torch.Tensor], where: str) -> tuple[str, torch.Tensor]:
    keys = [key for key in parts if key.startswith(JSON_SUFFIX_PREFIX)]
    if len(keys) != 1:
        raise InputError(f"{where}: expected one '{JSON_SUFFIX_PREFIX}nf4' or '...fp4' tensor, found {keys or 'none'}")
    key = keys[0]
    _check_quant_type(key[len(JSON_SUFFIX_PREFIX):], f"{where}.{key}")
    tensor = parts[key]
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise InputError(f"{where}.{key}: the quant-state JSON must be a 1-D uint8 tensor, "
                         f"not {tensor.dtype} {tuple(tensor.shape)}")
    return key, tensor


def parse_parts(parts: dict[str, torch.Tensor], *, where: str) -> QuantState:
    """The state of a stored 4-bit weight, after checking every part against its JSON.

    Raises InputError naming ``where`` and the bad part: a missing or unexpected part, a dtype or
    shape that disagrees with the JSON, an unknown quant_type or blocksize.
    """
    key, json_tensor = _find_json_part(parts, where)
    state = QuantState.from_json_bytes(json_tensor.cpu().numpy().tobytes(), f"{where}.{key}")
    if state.json_suffix != key:
        raise InputError(f"{where}.{key}: the JSON says quant_type {state.quant_type!r}, the key says otherwise")
    expected = state.stored_specs()
    missing = [suffix for suffix in expected if suffix not in parts]
    unexpected = [suffix for suffix in parts if suffix not in expected]
    if missing or unexpected:
        nested_hint = " (the JSON says double quantization)" if state.double_quant else ""
        raise InputError(f"{where}: 4-bit parts missing {missing}{nested_hint}, unexpected {unexpected}")
    for suffix, (dtype, shape) in expected.items():
        tensor = parts[suffix]
        name = f"{where}.{suffix}" if suffix else where
        if suffix == "":
            _check_packed_weight(tensor, state, name)
        elif tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise InputError(f"{name}: expected {dtype} {shape} for a 4-bit weight of shape {list(state.shape)}, "
                             f"blocksize {state.blocksize}, found {tensor.dtype} {tuple(tensor.shape)}")
    return state


def _check_packed_weight(tensor: torch.Tensor, state: QuantState, name: str) -> None:
    """Any quant_storage dtype is a reinterpretation of the packed bytes: only the byte count must agree."""
    n_bytes = tensor.numel() * tensor.element_size()
    is_column = tensor.dim() == 1 or (tensor.dim() == 2 and tensor.shape[1] == 1)
    if n_bytes != state.n_packed_bytes or not is_column or tensor.dtype == torch.bool:
        raise InputError(f"{name}: a 4-bit weight of shape {list(state.shape)} packs into {state.n_packed_bytes} "
                         f"bytes as a (n, 1) column; found {tensor.dtype} {tuple(tensor.shape)}")


@functools.cache
def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """For each byte, its two code values (high nibble first) as one float64-sized item: one lookup per byte."""
    code, byte = dequantized_codes(quant_type), torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()
    return pairs.view(torch.float64).view(-1).to(device)


def _dequantize_full_blocks(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                            out: torch.Tensor) -> None:
    """Dequantize whole blocks: with the compiled kernel where it runs, else chunk by chunk with torch ops,
    where one table lookup per byte gives both values."""
    if bnb4bit_native.dequantize_full_blocks(packed, absmax, dequantized_codes(quant_type), blocksize, out):
        return
    table = _pair_table(quant_type, packed.device)

    def dequantize_chunk(start: int, stop: int, scratch: tuple[torch.Tensor, torch.Tensor]) -> None:
        index, pairs = (buffer[: (stop - start) // 2] for buffer in scratch)
        index.copy_(packed[start // 2:stop // 2])
        values = torch.index_select(table, 0, index, out=pairs).view(torch.float32).view(-1, blocksize)
        scales = absmax[start // blocksize:stop // blocksize, None]
        if out.dtype == torch.float32:
            torch.mul(values, scales, out=out[start:stop].view(-1, blocksize))
        else:  # the product in float32, as bitsandbytes rounds it; a separate cast is faster than a mixed mul
            out[start:stop].view(-1, blocksize).copy_(values.mul_(scales))

    _for_each_chunk(out.numel(), out.device, dequantize_chunk,
                    lambda elements: (torch.empty(elements // 2, dtype=torch.int32, device=out.device),
                                      torch.empty(elements // 2, dtype=torch.float64, device=out.device)))


def _redequantize_blocks(blocks: torch.Tensor, packed_blocks: torch.Tensor, absmax: torch.Tensor, quant_type: str,
                         out_blocks: torch.Tensor) -> None:
    """Redo some blocks (indices ``blocks``) with the torch code, e.g. where a GPU kernel may flush subnormals."""
    redone = torch.empty(blocks.numel(), out_blocks.shape[1], dtype=out_blocks.dtype, device=out_blocks.device)
    _dequantize_full_blocks(packed_blocks[blocks].view(-1), absmax[blocks], out_blocks.shape[1], quant_type,
                            redone.view(-1))
    out_blocks[blocks] = redone


def _empty(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor; on Linux CPUs, large ones in transparent huge pages.

    Faulting in a fresh output 4 KiB page by page costs about as much CPU as dequantizing into it
    (measured on a 2-core VM: 19 ms for 32 MiB); with huge pages it is a third of that.
    """
    n_bytes = n * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or n_bytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(n, dtype=dtype, device=device)
    buffer = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype)


def block_absmax(parts: dict[str, torch.Tensor], state: QuantState, device: torch.device) -> torch.Tensor:
    """The float32 absmax of every block on ``device``, with the double quantization undone."""
    if state.nested_offset is None:  # no double quantization
        return parts["absmax"].to(device)
    return _dequantize_nested(parts["absmax"].to(device), parts["nested_absmax"].to(device),
                              parts["nested_quant_map"].to(device), state.nested_blocksize, state.nested_offset)


def dequantize_4bit(parts: dict[str, torch.Tensor], *, where: str,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight a stored bitsandbytes 4-bit tensor stands for, from its parts alone.

    ``parts`` maps suffix -> tensor (``""`` is the packed weight, in any quant_storage dtype).
    Returns the JSON's shape in ``out_dtype`` (default: the JSON's dtype), equal to bitsandbytes'
    ``dequantize_4bit``. InputError naming ``where`` and the part on any inconsistency.
    """
    state = parse_parts(parts, where=where)
    dtype = out_dtype or state.dtype
    if dtype not in _DTYPE_NAMES:
        raise InputError(f"{where}: 4-bit dequantization writes float32/float16/bfloat16, not {dtype}")
    packed = parts[""].contiguous().view(torch.uint8).view(-1)
    absmax = block_absmax(parts, state, packed.device)
    if not bool(torch.isfinite(absmax).all()):  # a damaged file: every weight of its block would be inf/NaN
        raise InputError(f"{where}: the 4-bit absmax (block scales) holds inf or NaN; the checkpoint is damaged")

    n, blocksize = state.numel, state.blocksize
    full = n - n % blocksize
    out = _empty(n, dtype, packed.device)
    if full:
        kernels = _triton_kernels(packed.device)
        if kernels is None:
            _dequantize_full_blocks(packed[: full // 2], absmax, blocksize, state.quant_type, out[:full])
        else:
            redo = kernels.dequantize_full_blocks(packed[: full // 2], absmax, blocksize, state.quant_type, out[:full])
            if redo.numel():
                _redequantize_blocks(redo, packed[: full // 2].view(-1, blocksize // 2), absmax, state.quant_type,
                                     out[:full].view(-1, blocksize))
    if full < n:
        pairs = _pair_table(state.quant_type, packed.device)[packed[full // 2:].long()]
        out[full:] = (pairs.view(torch.float32)[: n - full] * absmax[-1]).to(dtype)
    return out.view(state.shape)


def quantization_error(original: torch.Tensor, dequantized: torch.Tensor) -> dict[str, float]:
    """How far the round trip moved a weight, accumulated in float64 one chunk at a time.

    ``rmse``, ``snr_db`` (signal power over error power; inf for a perfect round trip),
    ``max_abs``, plus ``numel``, ``sum_sq_error`` and ``sum_sq_signal`` so that callers can add
    tensors up into a whole-model figure.
    """
    if original.shape != dequantized.shape:
        raise InputError(f"cannot compare shapes {tuple(original.shape)} and {tuple(dequantized.shape)}")
    a, b = original.reshape(-1), dequantized.reshape(-1)
    sum_sq_error = sum_sq_signal = max_abs = 0.0
    for start in range(0, a.numel(), CUDA_CHUNK):
        x = a[start:start + CUDA_CHUNK].double()
        error = b[start:start + CUDA_CHUNK].double().sub_(x)
        sum_sq_error += float(error.square().sum())
        sum_sq_signal += float(x.square().sum())
        max_abs = max(max_abs, float(error.abs().max()))
    return error_summary(a.numel(), sum_sq_error, sum_sq_signal, max_abs)


def error_summary(numel: int, sum_sq_error: float, sum_sq_signal: float, max_abs: float) -> dict[str, float]:
    """rmse / snr_db / max_abs from sums (for one tensor, or several added together)."""
    snr_db = math.inf if sum_sq_error == 0 else (
        -math.inf if sum_sq_signal == 0 else 10 * math.log10(sum_sq_signal / sum_sq_error))
    return {"rmse": math.sqrt(sum_sq_error / numel) if numel else 0.0, "snr_db": snr_db, "max_abs": max_abs,
            "numel": numel, "sum_sq_error": sum_sq_error, "sum_sq_signal": sum_sq_signal}
