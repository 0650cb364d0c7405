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
from dataclasses import dataclass

import torch

from ...checkpoint.dtypes import dtype_name
from ...checkpoint.safetensors_file import TensorInfo, TensorSpec
from ...errors import InputError, UnsupportedError
from .base import EncodedTensorInfo, Encoding, GroupContext, ReadPart, Rows, register

_FP8 = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(_FP8).max)  # 448
_SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"; "x.gate_up_proj" -> "x.gate_up_proj_scale_inv"
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
        """float32 codes times the float32 scale, cast once to ``info.dtype``, one block row (or one
        expert) at a time so that at most one float32 copy of a block row exists."""
        start, stop = rows if rows is not None else (0, info.shape[0])
        bm = self.block[0]
        if len(info.shape) == 2:
            if start % bm or (stop % bm and stop != info.shape[0]):
                raise ValueError(f"{info.name}: rows {start}:{stop} do not start and end on {bm}-row blocks")
            codes = read(info.parts["weight"], (start, stop))
            scales = read(info.parts["scale_inv"], (start // bm, -(-stop // bm)))
            out = torch.empty(codes.shape, dtype=info.dtype)
            for i in range(scales.shape[0]):
                a, b = i * bm, min((i + 1) * bm, codes.shape[0])
                out[a:b] = self._scaled(codes[a:b], scales[i])
            return out
        codes = read(info.parts["weight"], (start, stop))
        scales = read(info.parts["scale_inv"], (start, stop))
        out = torch.empty(codes.shape, dtype=info.dtype)
        for e in range(codes.shape[0]):
            for i in range(scales.shape[1]):
                a, b = i * bm, min((i + 1) * bm, codes.shape[1])
                out[e, a:b] = self._scaled(codes[e, a:b], scales[e, i])
        return out

    def _scaled(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """One block row (r <= bm, cols) of codes times its scales (cols blocks), in float32."""
        bn = self.block[1]
        cols = codes.shape[1]
        full = cols // bn
        x = codes.to(torch.float32)
        if full:
            x[:, : full * bn].view(x.shape[0], full, bn).mul_(scales[:full, None])
        if cols % bn:
            x[:, full * bn:].mul_(scales[full])
        return x

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
        self._check_shape(name, shape)
        start, stop = rows
        bm = self.block[0]
        if len(shape) == 2:
            if start % bm or (stop % bm and stop != shape[0]):
                raise ValueError(f"{name}: rows {start}:{stop} do not start and end on {bm}-row blocks")
            codes, scales = self._quantize_matrix(tensor)
            return {name: (codes, start), self.scale_name(name): (scales, start // bm)}
        pairs = [self._quantize_matrix(tensor[e]) for e in range(tensor.shape[0])]
        return {name: (torch.stack([c for c, _ in pairs]), start),
                self.scale_name(name): (torch.stack([s for _, s in pairs]), start)}

    def _quantize_matrix(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``Fp8Quantize._quantize_one`` on each block of one matrix, one block row at a time."""
        bm, bn = self.block
        rows, cols = w.shape
        full, ragged = divmod(cols, bn)
        codes = torch.empty((rows, cols), dtype=_FP8)
        scale_inv = torch.empty(self.grid((rows, cols)), dtype=torch.float32)
        for i in range(scale_inv.shape[0]):
            a, b = i * bm, min((i + 1) * bm, rows)
            x = w[a:b].to(torch.float32, copy=True)
            body = x[:, : full * bn].view(b - a, full, bn)
            amax = body.abs().amax(dim=(0, 2)) if full else x.new_empty(0)
            if ragged:
                amax = torch.cat([amax, x[:, full * bn:].abs().amax().reshape(1)])
            nonzero = amax > 0
            scale = _FP8_MAX / torch.where(nonzero, amax, torch.ones_like(amax))
            scale = torch.where(nonzero, scale, torch.ones_like(scale))
            scale_inv[i] = 1.0 / scale
            body.mul_(scale[:full, None])
            if ragged:
                x[:, full * bn:].mul_(scale[full])
            codes[a:b] = x.clamp_(-_FP8_MAX, _FP8_MAX).to(_FP8)
        return codes, scale_inv

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) not in (2, 3) or 0 in shape:
            raise UnsupportedError(f"{name}: FP8 block encoding needs a non-empty 2-D weight or 3-D fused experts "
                                   f"tensor, not shape {list(shape)}")


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
    """The dtype transformers loads the dequantized weights in (``dtype="auto"``): the config's, else the
    first floating tensor's that is not float8, else float32."""
    for key in ("dtype", "torch_dtype"):
        value = (config or {}).get(key)
        if value is not None:
            if value not in _MODEL_DTYPES:
                raise InputError(f"{where}: config.json {key} {value!r} is not float32, float16 or bfloat16")
            return _MODEL_DTYPES[value]
    for info in stored.values():
        if info.dtype.is_floating_point and info.dtype not in (_FP8, torch.float8_e5m2):
            return info.dtype
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
