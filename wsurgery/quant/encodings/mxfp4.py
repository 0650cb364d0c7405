"""MXFP4 (OCP microscaling FP4): gpt-oss's MoE experts, as transformers stores and decodes them.

gpt-oss stores each expert projection ``<experts>.gate_up_proj`` / ``<experts>.down_proj`` as
``<name>_blocks`` (uint8, (E, N, K/32, 16): two e2m1 codes per byte, low nibble first, 32 values per
block along the projection's input dimension K) and ``<name>_scales`` (uint8 e8m0, (E, N, K/32): the
block's power of two, biased by 127). The logical tensor is what transformers' dequantizing loader
(``Mxfp4Config(dequantize=True)`` -> ``convert_moe_packed_tensors``) gives the ``GptOssExperts``
parameter: (E, K, N) in the model's dtype, the transpose of the decoded (E, N, K). That is the
parameter a PEFT ``target_parameters`` LoRA trained on the dequantized model changes.

``decode`` is bit-exact to ``convert_moe_packed_tensors`` (the same e2m1 table in the target dtype,
scaled by ``torch.ldexp``); ``encode`` is byte-identical to transformers' ``quantize_to_mxfp4``, i.e.
the ``downcast_to_mxfp_torch`` of the ``gpt-oss-triton-kernels`` hub kernel transformers loads:
bfloat16 input, scale = 2**ceil(log2(amax / 6)) by rounding the float32 ``amax / 6`` up to a power
of two, values rounded on their first dropped bit (ties away from zero), saturating at 6.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...checkpoint.dtypes import dtype_name
from ...checkpoint.safetensors_file import TensorInfo, TensorSpec
from ...errors import InputError
from .base import EncodedTensorInfo, Encoding, GroupContext, ReadPart, Rows, register

BLOCK = 32  # values per e8m0 scale
_PROJECTIONS = ("gate_up_proj", "down_proj")  # what transformers' Mxfp4 loader decodes (serialized_names)
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_NAN_SCALE = 255  # e8m0's NaN: transformers' ldexp makes it 2**128 = inf, so NaN and inf weights; refused
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@functools.cache
def _nibble_tables(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale byte << 8 | code byte) -> the byte's low-nibble value, and its high-nibble value, each as
    an integer of the value's bits.

    Built with the reference's own operations (its e2m1 table in ``dtype``, ``torch.ldexp`` by
    scale - 127), so one gather per value gives bit for bit what it computes."""
    lut = torch.tensor(_E2M1, dtype=dtype)
    byte = torch.arange(256)
    exp = (torch.arange(256, dtype=torch.int32) - 127).view(256, 1)
    bits = {2: torch.int16, 4: torch.int32}[dtype.itemsize]

    def table(nibble: torch.Tensor) -> torch.Tensor:
        return torch.ldexp(lut[nibble].expand(256, 256).contiguous(), exp).view(bits).reshape(-1)

    return table(byte & 0x0F), table(byte >> 4)


@functools.cache
def _code_table() -> torch.Tensor:
    """Sign, float32 exponent and two leading mantissa bits of a scaled value -> its e2m1 code.

    The reference (``downcast_to_mxfp_torch``) decides the code from these 11 bits only: magnitudes
    of 1 and up keep one mantissa bit, rounded up when the next bit is set; [0.5, 1) rounds to 0.5
    or 1; [0.25, 0.5) to 0.5; below 0.25 to 0; 6 saturates."""
    prefix = torch.arange(2048, dtype=torch.int32)
    sign, exp, top2 = prefix >> 10, (prefix >> 2) & 0xFF, prefix & 0x3
    normal = torch.clamp((((exp - 126).clamp(min=0) << 2) | top2) + 1 >> 1, max=7)
    half = ((2 | (top2 >> 1)) + 1) >> 1
    code = torch.where(exp >= 127, normal, torch.where(exp == 126, half, (exp == 125).to(torch.int32)))
    return ((sign << 3) | code).to(torch.uint8)


def decode_blocks(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(E, N, G, 16) codes + (E, N, G) scales -> the logical (E, G*32, N) tensor in ``dtype``.

    One expert at a time, the transpose is done on the bytes (a quarter of a bfloat16 output's size)
    before decoding; each byte then gives its two values to two adjacent output rows."""
    e, n, g, _ = blocks.shape
    low, high = _nibble_tables(dtype)
    out = torch.empty((e, g * BLOCK, n), dtype=low.dtype)
    for i in range(e):
        index = blocks[i].reshape(n, g * 16).t().to(torch.int32, memory_format=torch.contiguous_format)
        index.view(g, 16, n).bitwise_or_((scales[i].t().to(torch.int32) << 8).view(g, 1, n))
        index = index.view(-1)
        torch.stack([torch.index_select(low, 0, index).view(g * 16, n),
                     torch.index_select(high, 0, index).view(g * 16, n)], dim=1, out=out[i].view(g * 16, 2, n))
    return out.view(dtype)


def encode_blocks(w: torch.Tensor, name: str, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The logical (E, K, N) tensor (experts ``first``... of ``name``) -> (E, N, K/32, 16) codes +
    (E, N, K/32) e8m0 scales, one expert at a time (each block is quantized on its own)."""
    e, k, n = w.shape
    blocks = torch.empty((e, n, k // BLOCK, BLOCK // 2), dtype=torch.uint8)
    scales = torch.empty((e, n, k // BLOCK), dtype=torch.uint8)
    for i in range(e):
        x = w[i].to(torch.bfloat16)  # what the reference quantizes
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"{name}: expert {first + i} holds inf or NaN (after rounding to bfloat16), which MXFP4 "
                             "cannot store (the reference quantizer makes garbage of it); the merged weight is not "
                             "finite")
        x = x.t().to(torch.float32).reshape(n, k // BLOCK, BLOCK)
        dequant = x.abs().amax(dim=-1, keepdim=True) / 6.0
        scale_bits = (dequant.view(torch.int32) + 0x007FFFFF) & 0x7F800000  # rounded up to a power of two
        scale = scale_bits.view(torch.float32)
        x.mul_(torch.where(scale == 0, torch.zeros((), dtype=torch.float32), 1.0 / scale))
        codes = _code_table()[(x.view(torch.int32) >> 21) & 0x7FF]
        torch.bitwise_or(codes[..., 0::2], codes[..., 1::2] << 4, out=blocks[i])
        scales[i] = (scale_bits >> 23).squeeze(-1)
    return blocks, scales


def _logical_dtype(context: GroupContext, stored: dict[str, TensorInfo]) -> torch.dtype:
    """The dtype transformers loads the model in by default (``dtype="auto"``): config.json's, else the
    first floating-point tensor's; the decoded experts take it."""
    config = context.config or {}
    named = config.get("dtype") or config.get("torch_dtype")
    if named is not None:
        if named not in _DTYPES:
            raise InputError(f"{context.where}: config.json's dtype {named!r} is not one MXFP4 weights decode to "
                             "(bfloat16, float16, float32); fix config.json")
        return _DTYPES[named]
    return next((t.dtype for t in stored.values() if t.dtype.is_floating_point and t.dtype.itemsize >= 2),
                torch.bfloat16)


@register
@dataclass(frozen=True)
class Mxfp4(Encoding):
    """gpt-oss expert weights in MXFP4 (32-value blocks, e8m0 scales, stored transposed); no parameters."""

    name = "mxfp4"
    quant_methods = ("mxfp4",)

    def describe(self) -> str:
        return "mxfp4 e2m1, 32-value blocks, e8m0 scales"

    @classmethod
    def group(cls, stored: dict[str, TensorInfo], context: GroupContext) -> dict[str, EncodedTensorInfo]:
        if context.quantization_config is None or not cls.recognizes(context.quantization_config):
            return {}
        found: dict[str, EncodedTensorInfo] = {}
        dtype: torch.dtype | None = None
        for part in [n for n in stored if n.endswith(("_blocks", "_scales"))]:
            name, role = part[:-7], part[-6:]
            where = f"{context.where}: {name}"
            other = f"{name}_{'scales' if role == 'blocks' else 'blocks'}"
            if name.rpartition(".")[2] not in _PROJECTIONS:
                if role == "blocks" and other in stored and stored[part].dtype == torch.uint8:
                    raise InputError(f"{where}: {part} and {other} look like MXFP4, but transformers decodes MXFP4 "
                                     f"only for the experts' {' and '.join(_PROJECTIONS)}; this checkpoint would not "
                                     "load as stored")
                continue
            if other not in stored:
                raise InputError(f"{where}: {part} has no {other} next to it; an MXFP4 weight needs both, so the "
                                 "checkpoint is incomplete")
            if role == "scales":
                continue
            blocks, scales = stored[part], stored[other]
            _check_shapes(blocks, scales, name, context.config, where)
            dtype = dtype or _logical_dtype(context, stored)
            e, n, g, _ = blocks.shape
            found[name] = EncodedTensorInfo(name, dtype, (e, g * BLOCK, n), {"blocks": blocks, "scales": scales}, cls())
        return found

    def row_chunk(self, info: EncodedTensorInfo) -> int | None:
        return 1  # one expert

    def decode(self, info: EncodedTensorInfo, read: ReadPart, rows: Rows | None = None) -> torch.Tensor:
        scales = read(info.parts["scales"], rows)
        if bool((scales == _NAN_SCALE).any()):
            expert = int((scales == _NAN_SCALE).nonzero()[0, 0]) + (rows[0] if rows else 0)
            raise InputError(f"{info.name}: expert {expert} has an e8m0 scale of 255 (NaN) in "
                             f"{info.parts['scales'].name}; the MXFP4 checkpoint is damaged")
        return decode_blocks(read(info.parts["blocks"], rows), scales, info.dtype)

    def stored_specs(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[TensorSpec]:
        e, k, n = _check_logical(name, shape)
        return [TensorSpec(f"{name}_blocks", torch.uint8, (e, n, k // BLOCK, BLOCK // 2)),
                TensorSpec(f"{name}_scales", torch.uint8, (e, n, k // BLOCK))]

    def encode(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_logical(name, tuple(tensor.shape))
        blocks, scales = encode_blocks(tensor, name)
        return {f"{name}_blocks": blocks, f"{name}_scales": scales}

    def encode_row_chunk(self, shape: tuple[int, ...]) -> int | None:
        return 1  # one expert

    def encode_rows(self, name: str, tensor: torch.Tensor, rows: Rows,
                    shape: tuple[int, ...]) -> dict[str, tuple[torch.Tensor, int]]:
        _check_logical(name, shape)
        blocks, scales = encode_blocks(tensor, name, rows[0])
        return {f"{name}_blocks": (blocks, rows[0]), f"{name}_scales": (scales, rows[0])}


def _check_logical(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3 or shape[1] % BLOCK:
        raise InputError(f"{name}: MXFP4 stores (experts, in, out) weights whose 'in' is a multiple of {BLOCK}; "
                         f"this one is {list(shape)}")
    return shape[0], shape[1], shape[2]


def _check_shapes(blocks: TensorInfo, scales: TensorInfo, name: str, config: dict | None, where: str) -> None:
    """Refuse parts that cannot be one gpt-oss expert tensor, or one of another size than config.json's."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise InputError(f"{where}: MXFP4 blocks and scales are uint8; here {blocks.name} is "
                         f"{dtype_name(blocks.dtype)} and {scales.name} {dtype_name(scales.dtype)}")
    if len(blocks.shape) != 4 or blocks.shape[-1] != BLOCK // 2:
        raise InputError(f"{where}: {blocks.name} is {list(blocks.shape)}; MXFP4 blocks are (experts, out, in/32, "
                         f"{BLOCK // 2}) bytes, {BLOCK} values per block")
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise InputError(f"{where}: {scales.name} is {list(scales.shape)} but {blocks.name} "
                         f"{list(blocks.shape)} needs one scale per block, {list(blocks.shape[:-1])}")
    cfg = config or {}
    hidden, inter, experts = cfg.get("hidden_size"), cfg.get("intermediate_size"), cfg.get("num_local_experts")
    if not (isinstance(hidden, int) and isinstance(inter, int) and isinstance(experts, int)):
        return
    e, n, g, _ = blocks.shape
    out, k = (2 * inter, hidden) if name.endswith("gate_up_proj") else (hidden, inter)
    if (e, n, g * BLOCK) != (experts, out, k):
        raise InputError(f"{where}: {blocks.name} holds {e} experts of ({n} out, {g * BLOCK} in), but config.json "
                         f"(num_local_experts {experts}, hidden_size {hidden}, intermediate_size {inter}) needs "
                         f"{experts} of ({out}, {k})")
