"""compressed-tensors checkpoints (llm-compressor's "-FP8-dynamic", "-W4A16", "-W8A8" repos).

``quantization_config`` is ``{"quant_method": "compressed-tensors", "format": ..., "config_groups":
{name: {"targets": [...], "weights": {...}, "format": ...}}, "ignore": [...], "quantization_status":
"compressed"}``. Each quantized module ``M`` stores, per its group's format:

* ``float-quantized`` / ``int-quantized`` / ``naive-quantized``: ``M.weight`` (float8_e4m3fn or int8
  codes), ``M.weight_scale``, and ``M.weight_zero_point`` when asymmetric;
* ``pack-quantized``: ``M.weight_packed`` (int32, values of ``num_bits`` densely packed along rows),
  ``M.weight_shape``, ``M.weight_scale``, and when asymmetric ``M.weight_zero_point`` (packed along
  the output dimension for group/channel strategies).

The scale is one value (tensor), one per row (channel), per row and ``group_size`` columns (group),
or per block. The logical weight is compressed-tensors' decompression, in the scale's dtype. The
files carry no layer classes, so a module's group is found by name (exact, then ``re:``), else by a
class target; every 2-D weight stored with side tensors is taken as quantized and checked against it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ...checkpoint.dtypes import dtype_name
from ...checkpoint.safetensors_file import TensorInfo, TensorSpec
from ...errors import InputError, UnsupportedError
from . import compressed_tensors_math as ctm
from .base import EncodedTensorInfo, Encoding, GroupContext, ReadPart, Rows, register
from .compressed_tensors_config import FORMATS, Matcher, unsupported

_METHOD = "compressed-tensors"
_UNPACKED = ("float-quantized", "int-quantized", "naive-quantized")
_STRATEGIES = ("tensor", "channel", "group", "block")
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SIDES = ("weight_scale", "weight_zero_point", "weight_packed", "weight_shape", "weight_g_idx")
# A static activation scheme's calibrated qparams, stored in the same module: they belong to the quantized
# layer (a plain output has no use for them), and are kept byte for byte where the layer is copied.
_ACTIVATION_SIDES = ("input_scale", "input_zero_point", "output_scale", "output_zero_point")
_MINMAX = (None, "minmax", "memoryless_minmax", "static_minmax")


@register
@dataclass(frozen=True)
class CompressedTensors(Encoding):
    """One weight as compressed-tensors stores it: format, weight args, and the stored scale dtype."""

    name = "compressed-tensors"
    quant_methods = (_METHOD,)

    format: str = "float-quantized"
    type: str = "float"  # "int" or "float"
    num_bits: int = 8
    strategy: str = "channel"
    group_size: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.bfloat16
    observer: str | None = None
    rounded_scale: bool = False  # the config asks scales rounded to a scale_dtype (not reproduced)
    static_activations: bool = False  # the module stores calibrated activation qparams

    @classmethod
    def recognizes(cls, quantization_config: dict) -> bool:
        return quantization_config.get("quant_method") == _METHOD and unsupported(quantization_config) is None

    @property
    def cannot_encode(self) -> str | None:  # type: ignore[override]
        """Only FP8 weights quantized from their own min/max are reproducible from the weight alone.

        Integer scales (GPTQ-calibrated) and layers with static (calibrated) activation scales are not."""
        if self.type == "int":
            return ("its integer scales came from calibration (GPTQ in llm-compressor); rounding to nearest would "
                    "not be the model's own quantizer")
        if self.static_activations:
            return ("its layers store activation scales calibrated on data (input_scale), which a changed "
                    "model's activations no longer match")
        if not self.symmetric or self.rounded_scale or self.observer not in _MINMAX:
            return f"its FP8 scales are not min-max of the weight alone (observer {self.observer!r})"
        return None

    def describe(self) -> str:
        kind = "fp8 e4m3fn" if self.type == "float" else f"int{self.num_bits}" + \
            (" packed" if self.format == "pack-quantized" else "")
        how = {"tensor": "per tensor", "channel": "per channel", "group": f"group {self.group_size}",
               "block": f"{self.block[0]}x{self.block[1]} blocks" if self.block else "blocks"}[self.strategy]
        static = ", static activation scales" if self.static_activations else ""
        return f"{kind}, {how}, {'symmetric' if self.symmetric else 'asymmetric'}, {dtype_name(self.scale_dtype)} " \
            f"scale{static}"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        rows, cols = shape
        if self.strategy == "tensor":
            return (1,)
        if self.strategy == "channel":
            return (rows, 1)
        if self.strategy == "group":
            assert self.group_size is not None
            return (rows, cols // self.group_size)
        assert self.block is not None
        return (math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))

    def _packed_zp(self) -> bool:
        return self.format == "pack-quantized" and not self.symmetric and self.strategy in ("group", "channel")

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def group(cls, stored: dict[str, TensorInfo], context: GroupContext) -> dict[str, EncodedTensorInfo]:
        q = context.quantization_config
        if not q or q.get("quant_method") != _METHOD:
            return {}
        where = context.where
        problem = unsupported(q)
        if problem:
            raise UnsupportedError(f"{where}: compressed-tensors checkpoint {problem}; wsurgery decodes "
                                   f"{', '.join(FORMATS)} with quantization_status 'compressed'")
        # A module is quantized where it stores a scale, packed codes, or integer/float8 codes.
        modules = sorted({n.rpartition(".")[0] for n, i in stored.items()
                          if n.rpartition(".")[2] in ("weight_scale", "weight_packed")
                          or (n.endswith(".weight") and i.dtype in (ctm.FP8, torch.int8))})
        found: dict[str, EncodedTensorInfo] = {}
        matcher = Matcher(q, stored, where)
        for module in modules:
            name = f"{module}.weight"
            scheme = matcher.scheme(module)
            encoding = cls._from_scheme(scheme, q, stored, module, where)
            parts = {s: stored[f"{module}.{s}"] for s in _SIDES + _ACTIVATION_SIDES if f"{module}.{s}" in stored}
            if any(s in parts for s in _ACTIVATION_SIDES):
                encoding = dataclasses.replace(encoding, static_activations=True)
            if encoding.format in _UNPACKED and name in stored:
                parts["weight"] = stored[name]
            shape = encoding._check(parts, name, context, where)
            found[name] = EncodedTensorInfo(name, encoding.scale_dtype, shape, parts, encoding)
        return found

    @classmethod
    def _from_scheme(cls, scheme: dict, q: dict, stored: dict[str, TensorInfo], module: str,
                     where: str) -> CompressedTensors:
        w = scheme.get("weights") or {}
        fmt = scheme.get("format") or q.get("format")
        label = f"{where}: {module}"
        if fmt not in FORMATS:
            raise UnsupportedError(f"{label}: stored in compressed-tensors format {fmt!r}; wsurgery decodes "
                                   f"{', '.join(FORMATS)}")
        group_size, block = w.get("group_size"), w.get("block_structure")
        strategy = w.get("strategy") or ("tensor" if group_size is None else "channel" if group_size == -1
                                         else "group")
        if strategy not in _STRATEGIES:
            raise UnsupportedError(f"{label}: weight strategy {strategy!r} is not one wsurgery decodes "
                                   f"({', '.join(_STRATEGIES)})")
        kind, bits = w.get("type", "int"), int(w.get("num_bits", 8))
        if (kind, fmt == "pack-quantized") not in (("float", False), ("int", False), ("int", True)) \
                or (kind == "float" and bits != 8) or not 1 <= bits <= 8:
            raise UnsupportedError(f"{label}: {kind} {bits}-bit weights in format {fmt} are not a layout "
                                   "compressed-tensors writes that wsurgery decodes")
        if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
            raise InputError(f"{label}: group strategy without a positive group_size in its config group")
        if strategy == "block" and not (isinstance(block, list) and len(block) == 2 and all(
                isinstance(b, int) and b > 0 for b in block)):
            raise InputError(f"{label}: block strategy without a [rows, cols] block_structure in its config group")
        scale = stored.get(f"{module}.weight_scale")
        if scale is None:
            raise InputError(f"{label}: quantized codes without {module}.weight_scale; the compressed-tensors "
                             "checkpoint is incomplete")
        if scale.dtype not in _SCALE_DTYPES:
            raise UnsupportedError(f"{label}: weight_scale is {dtype_name(scale.dtype)}; wsurgery decodes float16, "
                                   "bfloat16 or float32 scales")
        blocks = (int(block[0]), int(block[1])) if strategy == "block" and block else None
        return cls(fmt, kind, bits, strategy, group_size if strategy == "group" else None, blocks,
                   bool(w.get("symmetric", True)), scale.dtype, w.get("observer"), w.get("scale_dtype") is not None)

    def _check(self, parts: dict[str, TensorInfo], name: str, context: GroupContext, where: str) -> tuple[int, int]:
        """The logical shape, once every stored part agrees with the scheme (one-line refusal otherwise)."""
        label = f"{where}: {name}"
        codes_role = "weight" if self.format in _UNPACKED else "weight_packed"
        codes = parts.get(codes_role)
        if codes is None:
            raise InputError(f"{label}: missing {name.rpartition('.')[0]}.{codes_role} next to its weight_scale; "
                             "the compressed-tensors checkpoint is incomplete")
        stray = {"weight_packed", "weight_shape"} & set(parts) if self.format in _UNPACKED else set()
        if stray:
            raise InputError(f"{label}: format {self.format} stores no {sorted(stray)}; the file disagrees with "
                             "its quantization_config")
        want = ctm.FP8 if self.type == "float" else torch.int8 if self.format in _UNPACKED else torch.int32
        if codes.dtype != want or len(codes.shape) != 2:
            raise InputError(f"{label}: {codes_role} is {dtype_name(codes.dtype)}{list(codes.shape)}; format "
                             f"{self.format} ({self.type}{self.num_bits}) stores 2-D {dtype_name(want)}")
        if self.format in _UNPACKED:
            shape = (int(codes.shape[0]), int(codes.shape[1]))
        else:
            shape = _weight_shape(parts, context, label)
            packed = (shape[0], ctm.packed_cols(shape[1], self.num_bits))
            if tuple(codes.shape) != packed:
                raise InputError(f"{label}: weight_packed is {list(codes.shape)} but weight_shape {list(shape)} at "
                                 f"{self.num_bits} bits packs to {list(packed)}")
        if self.group_size is not None and shape[1] % self.group_size:
            raise InputError(f"{label}: {shape[1]} columns are not a multiple of group_size {self.group_size}")
        scale = parts["weight_scale"]
        expected = self.scale_shape(shape)
        if tuple(scale.shape) != expected and not (self.strategy == "tensor" and math.prod(scale.shape) == 1):
            raise InputError(f"{label}: weight_scale is {list(scale.shape)}; a {list(shape)} weight with "
                             f"{self.strategy} strategy needs {list(expected)}")
        self._check_zero_point(parts.get("weight_zero_point"), shape, label)
        if "weight_g_idx" in parts:
            _check_g_idx(parts["weight_g_idx"], shape, self.group_size, context, label)
        return shape

    def _check_zero_point(self, zp: TensorInfo | None, shape: tuple[int, int], label: str) -> None:
        if self.symmetric:
            # Older compressed-tensors kept (zero) zero points of symmetric unpacked weights; its decompressor
            # still subtracts them. Packed ones it would misread.
            if zp is not None and self.format not in _UNPACKED:
                raise InputError(f"{label}: weight_zero_point stored but its config group is symmetric")
            if zp is None:
                return
        elif zp is None:
            raise InputError(f"{label}: asymmetric weights without weight_zero_point; the checkpoint is incomplete")
        expected: tuple[int, ...]
        if self._packed_zp():
            cols = self.scale_shape(shape)[1]
            expected, dtype = (ctm.packed_cols(shape[0], self.num_bits), cols), torch.int32
        else:
            expected = self.scale_shape(shape)
            dtype = ctm.FP8 if self.type == "float" else torch.int8
        if zp.dtype != dtype or (tuple(zp.shape) != expected
                                 and not (self.strategy == "tensor" and math.prod(zp.shape) == 1)):
            raise InputError(f"{label}: weight_zero_point is {dtype_name(zp.dtype)}{list(zp.shape)}; the scheme "
                             f"needs {dtype_name(dtype)}{list(expected)}")

    # -- decoding ----------------------------------------------------------------------------------

    def row_chunk(self, info: EncodedTensorInfo) -> int | None:
        return self.block[0] if self.block is not None else 32 if self._packed_zp() else 1

    def decode(self, info: EncodedTensorInfo, read: ReadPart, rows: Rows | None = None) -> torch.Tensor:
        a, b = rows if rows is not None else (0, info.shape[0])
        if self.format in _UNPACKED:
            codes = read(info.parts["weight"], (a, b))
        else:
            codes = ctm.unpack_int32(read(info.parts["weight_packed"], (a, b)), self.num_bits, info.shape[1])
        side = (a, b) if self.strategy in ("channel", "group") else None
        if self.block is not None:
            side = (a // self.block[0], math.ceil(b / self.block[0]))
        scale = read(info.parts["weight_scale"], side)
        scale = scale.reshape(1) if self.strategy == "tensor" else scale
        zp = None
        if "weight_zero_point" in info.parts:
            part = info.parts["weight_zero_point"]
            if self._packed_zp():
                words = read(part, (a * self.num_bits // 32, ctm.packed_cols(b, self.num_bits)))
                zp = ctm.unpack_int32(words.T, self.num_bits, b - a).T
            else:
                zp = read(part, side).reshape(scale.shape)
        return ctm.dequantize(codes, scale, zp, self.strategy, self.group_size, self.block, a)

    # -- encoding (FP8 min-max only) -------------------------------------------------------------------

    def _check_encodable(self) -> None:
        if self.cannot_encode is not None:
            raise UnsupportedError(f"{self.name}: cannot encode ({self.cannot_encode})")

    def stored_specs(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[TensorSpec]:
        self._check_encodable()
        module = name.removesuffix(".weight")
        return [TensorSpec(name, ctm.FP8, tuple(shape)),
                TensorSpec(f"{module}.weight_scale", dtype, self.scale_shape((shape[0], shape[1])))]

    def encode(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_encodable()
        if tensor.dtype != self.scale_dtype:
            raise ValueError(f"{name}: encode expects {dtype_name(self.scale_dtype)}, got {dtype_name(tensor.dtype)}")
        scale = ctm.fp8_minmax_scale(tensor, self.strategy, self.group_size, self.block)
        codes = ctm.fp8_quantize(tensor, scale, self.strategy, self.group_size, self.block)
        return {name: codes, f"{name.removesuffix('.weight')}.weight_scale": scale.contiguous()}

    def encode_row_chunk(self, shape: tuple[int, ...]) -> int | None:
        return self.block[0] if self.block is not None else None if self.strategy == "tensor" else 1

    def encode_rows(self, name: str, tensor: torch.Tensor, rows: Rows,
                    shape: tuple[int, ...]) -> dict[str, tuple[torch.Tensor, int]]:
        chunk = self.encode_row_chunk(shape)
        if chunk is None or rows[0] % chunk or (rows[1] % chunk and rows[1] != shape[0]):
            raise ValueError(f"{name}: rows {rows} do not fall on the {chunk}-row chunks of a {self.strategy} scale")
        parts = self.encode(name, tensor)
        first = rows[0] // chunk if self.block is not None else rows[0]
        return {n: (t, rows[0] if n == name else first) for n, t in parts.items()}


def _weight_shape(parts: dict[str, TensorInfo], context: GroupContext, label: str) -> tuple[int, int]:
    info = parts.get("weight_shape")
    if info is None:
        raise InputError(f"{label}: pack-quantized weight without weight_shape; the checkpoint is incomplete")
    if info.dtype.is_floating_point or info.shape not in ((2,), (1, 2)):
        raise InputError(f"{label}: weight_shape is {dtype_name(info.dtype)}{list(info.shape)}, not two integers")
    values: Any = context.read(info).reshape(-1).tolist()
    if any(v <= 0 for v in values):
        raise InputError(f"{label}: weight_shape {values} is not a 2-D shape")
    return int(values[0]), int(values[1])


def _check_g_idx(info: TensorInfo, shape: tuple[int, int], group_size: int | None, context: GroupContext,
                 label: str) -> None:
    """A stored ``weight_g_idx`` is accepted only where it is the identity grouping (column // group_size),
    which decodes the same as none: compressed-tensors 0.20.1 no longer reads activation-ordered ones."""
    if group_size is None or info.shape != (shape[1],) or info.dtype.is_floating_point:
        raise InputError(f"{label}: weight_g_idx is {dtype_name(info.dtype)}{list(info.shape)}; a group-quantized "
                         f"weight with {shape[1]} columns stores one integer per column")
    g = context.read(info).to(torch.int64)
    if not torch.equal(g, torch.arange(shape[1]) // group_size):
        raise UnsupportedError(f"{label}: weight_g_idx reorders columns (activation ordering); compressed-tensors "
                               "0.20.1 no longer decodes such files, so wsurgery has no reference to decode it by")
