"""FP8 block-wise weights (DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8, transformers' FineGrainedFP8).

A weight ``W`` (out, in) is stored as ``W`` in float8_e4m3fn plus ``W_scale_inv`` in float32 with one
scale per ``weight_block_size`` block (ceil(out/bm), ceil(in/bn)); the last block row and column are
ragged where out/in are not multiples of the block. Fused MoE expert tensors (experts, out, in) carry
one such grid per expert. ``quantization_config`` is ``{"quant_method": "fp8", "weight_block_size":
[bm, bn], ...}``.

Decoding is transformers' ``Fp8Dequantize``: the float8 codes to float32, one float32 multiply by the
block's scale, one cast to the model's dtype (DeepSeek's ``weight_dequant`` does the same arithmetic).
transformers derives the block from the scale grid (``rows // scale_rows``), which is the stated block
only where the shape is a multiple of it; on ragged shapes it raises or uses a different block, while
its FP8 matmul, its backward's ``_dequantize_fp8_weight`` and DeepSeek's kernels use the stated block
with ragged edges, as here. Encoding is transformers' ``Fp8Quantize`` (scale = 448 / amax, an
all-zero block scale 1, ``scale_inv = 1 / scale``, codes ``clamp(x * scale, ±448)`` rounded to
e4m3fn), applied to each (possibly ragged) block on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...checkpoint.dtypes import dtype_name
from ...checkpoint.safetensors_file import TensorInfo, TensorSpec
from ...errors import InputError, UnsupportedError
from .base import EncodedTensorInfo, Encoding, GroupContext, ReadPart, Rows, register

_FP8 = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(_FP8).max)  # 448
_SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"; "x.gate_up_proj" -> "x.gate_up_proj_scale_inv"
_CHUNK = 1 << 23  # float32 elements decoded or encoded at once (32 MB): few large ops, bounded memory
_MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@register
@dataclass(frozen=True)
class Fp8Block(Encoding):
    """One weight stored as float8_e4m3fn codes with a float32 ``scale_inv`` per ``block`` (rows, cols)
    block of each (out, in) matrix (2-D weights, or 3-D fused experts)."""

    name = "fp8-block"
    quant_methods = ("fp8",)

    block: tuple[int, int] = (128, 128)

    def describe(self) -> str:
        return f"fp8 e4m3fn, {self.block[0]}x{self.block[1]} blocks, float32 scale_inv"

    def scale_name(self, name: str) -> str:
        return name + _SCALE_SUFFIX

    def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale tensor's shape for a weight of ``shape``."""
        *lead, rows, cols = shape
        return (*lead, -(-rows // self.block[0]), -(-cols // self.block[1]))

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def group(cls, stored: dict[str, TensorInfo], context: GroupContext) -> dict[str, EncodedTensorInfo]:
        q = context.quantization_config
        if not q or q.get("quant_method") != "fp8":
            return {}
        where = context.where
        encoding = cls(_block_size(q, where))
        dtype = _model_dtype(context.config, stored, where)
        found: dict[str, EncodedTensorInfo] = {}
        for name, info in stored.items():
            if name.endswith(_SCALE_SUFFIX):
                weight = name[: -len(_SCALE_SUFFIX)]
                if weight in stored and stored[weight].dtype == torch.float8_e5m2:
                    raise UnsupportedError(f"{where}: {weight} is float8_e5m2; transformers' FP8 (quant_method fp8) "
                                           "reads float8_e4m3fn weights only")
                if weight not in stored or stored[weight].dtype != _FP8:
                    raise InputError(f"{where}: {name} is a block scale but {weight} is "
                                     f"{'missing' if weight not in stored else dtype_name(stored[weight].dtype)}, "
                                     "not float8_e4m3fn codes; the FP8 checkpoint is inconsistent")
                continue
            if info.dtype == torch.float8_e5m2:
                raise UnsupportedError(f"{where}: {name} is float8_e5m2; transformers' FP8 (quant_method fp8) "
                                       "reads float8_e4m3fn weights only")
            if info.dtype != _FP8:
                continue
            scale = stored.get(encoding.scale_name(name))
            if scale is None:
                raise InputError(f"{where}: {name} is float8_e4m3fn but has no {encoding.scale_name(name)}; "
                                 "the FP8 checkpoint is incomplete (or stores its scales under names wsurgery "
                                 "does not read)")
            _check_pair(encoding, info, scale, context.read, where)
            found[name] = EncodedTensorInfo(name, dtype, tuple(info.shape), {"weight": info, "scale_inv": scale},
                                            encoding)
        return found

    # -- decoding ----------------------------------------------------------------------------------

    def row_chunk(self, info: EncodedTensorInfo) -> int | None:
        return self.block[0] if len(info.shape) == 2 else 1

    def decode(self, info: EncodedTensorInfo, read: ReadPart, rows: Rows | None = None) -> torch.Tensor:
        """float32 codes times the float32 scale, cast once to ``info.dtype``, a few MB of block rows at a
        time (so at most one float32 copy of those rows exists, and few large ops run, not one per block)."""
        start, stop = rows if rows is not None else (0, info.shape[0])
        bm = self.block[0]
        if len(info.shape) == 2:
            if start % bm or (stop % bm and stop != info.shape[0]):
                raise ValueError(f"{info.name}: rows {start}:{stop} do not start and end on {bm}-row blocks")
            scale_rows = (start // bm, -(-stop // bm))
        else:
            scale_rows = (start, stop)
        codes = read(info.parts["weight"], (start, stop))
        scales = read(info.parts["scale_inv"], scale_rows)
        out = torch.empty(codes.shape, dtype=info.dtype)
        buffer = torch.empty(0, dtype=torch.float32)
        for c, s, o in _matrices(codes, scales, out, bm):
            for a, b, i in self._chunks(c.shape):
                if buffer.numel() < c[a:b].numel():
                    buffer = torch.empty(c[a:b].numel(), dtype=torch.float32)
                x = buffer[: c[a:b].numel()].view(b - a, c.shape[1]).copy_(c[a:b])
                self._apply(x, s[i:i + -(-(b - a) // bm)], torch.Tensor.mul_)
                o[a:b] = x
        return out

    def _chunks(self, shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """Row ranges [a, b) of one matrix, with their first block row i: whole block rows of about
        ``_CHUNK`` elements, the ragged last block row alone."""
        bm = self.block[0]
        rows, cols = shape
        step = max(1, _CHUNK // max(1, cols * bm)) * bm
        whole = rows // bm * bm
        spans = [(a, min(a + step, whole)) for a in range(0, whole, step)]
        if whole < rows:
            spans.append((whole, rows))
        return [(a, b, a // bm) for a, b in spans]

    def _apply(self, x: torch.Tensor, per_block: torch.Tensor,
               op: Callable[[torch.Tensor, torch.Tensor], object]) -> None:
        """``op(x_block, per_block[block])`` in place on each block of the float32 rows ``x`` (whole block
        rows, or one ragged one), ``per_block`` being (block rows, block cols)."""
        bn = self.block[1]
        rows, cols = x.shape
        n = per_block.shape[0]
        x3 = x.view(n, rows // n, cols)
        full = cols // bn
        if full:
            op(x3[:, :, : full * bn].view(n, rows // n, full, bn), per_block[:, None, :full, None])
        if cols % bn:
            op(x3[:, :, full * bn:], per_block[:, None, full:])

    # -- encoding ----------------------------------------------------------------------------------

    def stored_specs(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[TensorSpec]:
        self._check_shape(name, shape)
        return [TensorSpec(name, _FP8, tuple(shape)), TensorSpec(self.scale_name(name), torch.float32,
                                                                 self.grid(tuple(shape)))]

    def encode_row_chunk(self, shape: tuple[int, ...]) -> int | None:
        return self.block[0] if len(shape) == 2 else 1

    def encode(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = self.encode_rows(name, tensor, (0, tensor.shape[0]), tuple(tensor.shape))
        return {n: t for n, (t, _) in parts.items()}

    def encode_rows(self, name: str, tensor: torch.Tensor, rows: Rows,
                    shape: tuple[int, ...]) -> dict[str, tuple[torch.Tensor, int]]:
        """transformers' ``Fp8Quantize._quantize_one`` on each block, a few MB of block rows at a time."""
        self._check_shape(name, shape)
        start, stop = rows
        bm = self.block[0]
        if len(shape) == 2 and (start % bm or (stop % bm and stop != shape[0])):
            raise ValueError(f"{name}: rows {start}:{stop} do not start and end on {bm}-row blocks")
        codes = torch.empty(tensor.shape, dtype=_FP8)
        scale_inv = torch.empty(self.grid(tuple(tensor.shape)), dtype=torch.float32)
        for w, s, c in _matrices(tensor, scale_inv, codes, bm):
            for a, b, i in self._chunks(w.shape):
                x = w[a:b].to(torch.float32, copy=True)
                n = -(-(b - a) // bm)
                amax = torch.empty((n, s.shape[1]), dtype=torch.float32)
                self._apply(x, amax, _block_amax)
                nonzero = amax > 0
                scale = _FP8_MAX / torch.where(nonzero, amax, torch.ones_like(amax))
                scale = torch.where(nonzero, scale, torch.ones_like(scale))  # an all-zero block keeps scale 1
                s[i:i + n] = 1.0 / scale
                self._apply(x, scale, torch.Tensor.mul_)
                c[a:b] = x.clamp_(-_FP8_MAX, _FP8_MAX)
        first = start // bm if len(shape) == 2 else start
        return {name: (codes, start), self.scale_name(name): (scale_inv, first)}

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) not in (2, 3) or 0 in shape:
            raise UnsupportedError(f"{name}: FP8 block encoding needs a non-empty 2-D weight or 3-D fused experts "
                                   f"tensor, not shape {list(shape)}")


def _matrices(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
              bm: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The (rows, cols) matrices of a weight (or its codes), its scale grid and an output alike: the
    tensors themselves, or for fused experts one triple per expert (all experts as one matrix where
    each expert's rows are whole blocks, so no block straddles two experts)."""
    if a.dim() == 2:
        return [(a, b, c)]
    if a.shape[1] % bm == 0:
        return [(a.flatten(0, 1), b.flatten(0, 1), c.flatten(0, 1))]
    return [(a[e], b[e], c[e]) for e in range(a.shape[0])]


def _block_amax(x: torch.Tensor, amax: torch.Tensor) -> None:
    """``amax`` (broadcast shape of the blocks) <- each block's max |x|; the block axes are 1 and 3 (or 1 and 2
    for the ragged column)."""
    dims = (1, 3) if x.dim() == 4 else (1, 2)
    amax.copy_(x.abs().amax(dim=dims, keepdim=True).view(amax.shape))


def _block_size(q: dict, where: str) -> tuple[int, int]:
    """The config's ``weight_block_size``, with the variants transformers does not read refused."""
    for key, value, allowed in (("activation_scheme", q.get("activation_scheme", "dynamic"), ("dynamic",)),
                                ("scale_fmt", q.get("scale_fmt", "float"), ("float",)),
                                ("fmt", q.get("fmt", "e4m3"), ("e4m3",)),
                                ("expert_dtype", q.get("expert_dtype", "fp8"), ("fp8",))):
        if not isinstance(value, str) or value.lower() not in allowed:
            raise UnsupportedError(f"{where}: quantization_config {key} {value!r} is not supported (wsurgery decodes "
                                   f"fp8 with {key} {allowed[0]!r} only)")
    if "weight_block_size" not in q:
        raise InputError(f"{where}: quantization_config (fp8) does not state weight_block_size; the block size of "
                         "the scales cannot be known")
    size = q["weight_block_size"]
    if size is None:
        raise UnsupportedError(f"{where}: quantization_config weight_block_size null (one scale per tensor) is not "
                               "supported; wsurgery decodes block-wise FP8 only")
    if (not isinstance(size, list | tuple) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise InputError(f"{where}: quantization_config weight_block_size {size!r} is not two positive integers")
    return int(size[0]), int(size[1])


def _model_dtype(config: dict | None, stored: dict[str, TensorInfo], where: str) -> torch.dtype:
    """The dtype transformers loads the dequantized weights in (``dtype="auto"``): the config's, else
    that of the first floating tensor not float8 (a float32 scale counts) of the first shard, by name."""
    for key in ("dtype", "torch_dtype"):
        value = (config or {}).get(key)
        if value is not None:
            if value not in _MODEL_DTYPES:
                raise InputError(f"{where}: config.json {key} {value!r} is not float32, float16 or bfloat16")
            return _MODEL_DTYPES[value]
    first = min((info.file.name for info in stored.values()), default=None)
    for name in sorted(n for n, info in stored.items() if info.file.name == first):
        if stored[name].dtype.is_floating_point and stored[name].dtype not in (_FP8, torch.float8_e5m2):
            return stored[name].dtype
    return torch.float32


def _check_pair(encoding: Fp8Block, weight: TensorInfo, scale: TensorInfo, read: ReadPart, where: str) -> None:
    if len(weight.shape) not in (2, 3) or 0 in weight.shape:
        raise UnsupportedError(f"{where}: {weight.name} is float8 with shape {list(weight.shape)}; FP8 block weights "
                               "are 2-D (or 3-D fused experts)")
    if scale.dtype != torch.float32:
        raise InputError(f"{where}: {scale.name} is {dtype_name(scale.dtype)}; fp8 block scales (scale_fmt float) "
                         "are float32")
    grid = encoding.grid(tuple(weight.shape))
    if tuple(scale.shape) != grid:
        raise InputError(f"{where}: {scale.name} has shape {list(scale.shape)} but {weight.name} "
                         f"{list(weight.shape)} in {encoding.block[0]}x{encoding.block[1]} blocks (weight_block_size) "
                         f"needs {list(grid)}; the scales do not match the config's block size")
    # A block row at a time: the scales are 1/(bm*bn) of the weight, but a huge expert tensor's are not tiny.
    step = max(1, (1 << 22) // max(1, math.prod(scale.shape[1:])))
    for a in range(0, scale.shape[0], step):
        if not bool(torch.isfinite(read(scale, (a, min(a + step, scale.shape[0])))).all()):
            raise InputError(f"{where}: {scale.name} holds inf or NaN; the FP8 checkpoint is damaged")
