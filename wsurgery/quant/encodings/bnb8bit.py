"""bitsandbytes LLM.int8 (``load_in_8bit``), decoded and encoded as transformers + bitsandbytes do.

transformers saves a ``Linear8bitLt`` weight as ``weight`` int8 (out, in), one row per output
feature, ``SCB`` float32 (out,), the row's absolute maximum, and ``weight_format`` uint8 0 ("row",
bitsandbytes' only layout now): W[i, j] = weight[i, j] * SCB[i] / 127. The arithmetic below is
bitsandbytes' own default (CPU) kernels, op for op, so the bits match:

- dequantize (``int8_vectorwise_dequant``, what ``model.dequantize()`` uses): ``(weight * SCB[:, None])
  * 7.874015718698502e-3`` in float32 (the constant rounds to float32 1/127), in that order, then
  cast to the dtype the model loads in (``model.config.dtype``: config.json's ``dtype``), the
  logical dtype.
- quantize (``Int8Params._quantize`` on load): the weight cast to float16, ``SCB`` its rows' absmax as
  float32, codes ``round(w16 * (127 / SCB))`` in float32, to int8. The ``llm_int8_threshold``
  outlier split happens in the forward pass only; the stored weight never depends on it.

GPT-2's Conv1D weights are quantized as the (out, in) transpose of the stored (in, out) parameter,
so the logical tensor here is that parameter again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...checkpoint.dtypes import dtype_name
from ...checkpoint.safetensors_file import TensorInfo, TensorSpec
from ...conventions import is_conv1d
from ...errors import InputError, UnsupportedError
from .base import EncodedTensorInfo, Encoding, GroupContext, ReadPart, Rows, register

#: bitsandbytes' 1/127 as transformers and bitsandbytes write it (float32 rounds it to 0x3C010204).
INV_127 = 7.874015718698502e-3
_BLOCK_ELEMENTS = 1 << 22  # float32 scratch of 16 MiB: few enough blocks that threads pay off
_MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}  # bitsandbytes' weight_format codes


def is_8bit_config(q: dict) -> bool:
    eight = q.get("load_in_8bit") or q.get("_load_in_8bit")
    four = q.get("load_in_4bit") or q.get("_load_in_4bit")
    return q.get("quant_method") == "bitsandbytes" and bool(eight) and not four


@register
@dataclass(frozen=True)
class Bnb8bit(Encoding):
    """One LLM.int8 weight: whether the logical tensor is the stored codes' transpose (Conv1D), and the
    dtype of its ``weight_format`` tensor (None: the file has none, as some writers leave it out)."""

    name = "bitsandbytes-8bit"
    quant_methods = ("bitsandbytes",)

    transposed: bool = False
    format_dtype: torch.dtype | None = torch.uint8

    @classmethod
    def recognizes(cls, quantization_config: dict) -> bool:
        return is_8bit_config(quantization_config)

    def describe(self) -> str:
        return "int8 per-row absmax (SCB)" + (", Conv1D transposed" if self.transposed else "")

    @classmethod
    def group(cls, stored: dict[str, TensorInfo], context: GroupContext) -> dict[str, EncodedTensorInfo]:
        q = context.quantization_config
        if not isinstance(q, dict) or not is_8bit_config(q):
            return {}
        if q.get("llm_int8_has_fp16_weight"):
            raise UnsupportedError(f"{context.where}: quantization_config has llm_int8_has_fp16_weight: true, "
                                   "bitsandbytes' 8-bit training layout (16-bit weights, no SCB), not LLM.int8 codes; "
                                   "wsurgery reads the int8 layout only: remove quantization_config from config.json "
                                   "to use the weights as a plain model")
        found: dict[str, EncodedTensorInfo] = {}
        dtype = _model_dtype(context, stored)
        for scb_name in (n for n in stored if n == "SCB" or n.endswith(".SCB")):
            prefix = scb_name[: -len("SCB")]
            name = prefix + "weight"
            where = f"{context.where}: {name}"
            weight, scb = stored.get(name), stored[scb_name]
            if weight is None:
                raise InputError(f"{where}: {scb_name} has no int8 weight {name}; the checkpoint is incomplete")
            if weight.dtype != torch.int8 or len(weight.shape) != 2:
                raise InputError(f"{where}: stored as {dtype_name(weight.dtype)}{list(weight.shape)} next to "
                                 f"{scb_name}; LLM.int8 stores a 2-D int8 weight")
            rows = weight.shape[0]
            if scb.dtype != torch.float32 or tuple(scb.shape) != (rows,):
                raise InputError(f"{where}: {scb_name} is {dtype_name(scb.dtype)}{list(scb.shape)} but the int8 weight "
                                 f"{list(weight.shape)} needs float32[{rows}] (one absmax per row)")
            _check_scb(context.read(scb), scb_name, where)
            parts = {"": weight, "SCB": scb}
            fmt = stored.get(prefix + "weight_format")
            if fmt is not None:
                _check_format(fmt, context.read(fmt), where)
                parts["weight_format"] = fmt
            transposed = is_conv1d(prefix[:-1], context.config)
            shape = (weight.shape[1], rows) if transposed else (rows, weight.shape[1])
            encoding = cls(transposed, fmt.dtype if fmt is not None else None)
            found[name] = EncodedTensorInfo(name, dtype, tuple(shape), parts, encoding)
        for name, info in stored.items():
            if info.dtype == torch.int8 and name not in found:
                raise InputError(f"{context.where}: {name} is int8 with no SCB next to it; an LLM.int8 weight needs "
                                 "its row scales (SCB), so the checkpoint is incomplete")
        return found

    def row_chunk(self, info: EncodedTensorInfo) -> int | None:
        return None if self.transposed else 1

    def decode(self, info: EncodedTensorInfo, read: ReadPart, rows: Rows | None = None) -> torch.Tensor:
        if self.transposed:  # logical rows are stored columns: every stored row is needed
            codes, scb = read(info.parts[""]), read(info.parts["SCB"])
            codes = codes if rows is None else codes[:, rows[0]:rows[1]]
        else:
            codes, scb = read(info.parts[""], rows), read(info.parts["SCB"], rows)
        zero = scb == 0
        if bool(zero.any()) and bool(codes[zero].any()):
            raise InputError(f"{info.name}: a row with SCB 0 holds nonzero codes, which bitsandbytes never writes "
                             "(an all-zero row quantizes to zeros); the quantized checkpoint is damaged")
        n, cols = codes.shape
        out = torch.empty((cols, n) if self.transposed else (n, cols), dtype=info.dtype)
        target = out.T if self.transposed else out  # stored layout
        direct = info.dtype == torch.float32 and not self.transposed
        # Blocks of stored rows: one float32 scratch reused (no page faults for a full-size temporary), large
        # enough that each block keeps the intra-op threads busy.
        step = max(64 if self.transposed else 1, _BLOCK_ELEMENTS // max(cols, 1))
        scratch = out if direct else torch.empty((min(step, n), cols), dtype=torch.float32)
        for a in range(0, n, step):
            b = min(a + step, n)
            w = scratch[a:b] if direct else scratch[: b - a]
            torch.mul(codes[a:b], scb[a:b, None], out=w)  # int8 * float32 -> float32, as int8_vectorwise_dequant
            w.mul_(INV_127)
            if not direct:
                target[a:b].copy_(w)  # model.dequantize()'s cast to the model's dtype
        return out

    def encode_row_chunk(self, shape: tuple[int, ...]) -> int | None:
        return None if self.transposed else 1

    def stored_specs(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[TensorSpec]:
        prefix = _prefix(name)
        out, inp = (shape[1], shape[0]) if self.transposed else (shape[0], shape[1])
        specs = [TensorSpec(name, torch.int8, (out, inp)), TensorSpec(prefix + "SCB", torch.float32, (out,))]
        if self.format_dtype is not None:
            specs.append(TensorSpec(prefix + "weight_format", self.format_dtype, ()))
        return specs

    def encode(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        w = tensor.T if self.transposed else tensor
        return {n: t for n, (t, _) in self._encode(name, w, 0).items()}

    def encode_rows(self, name: str, tensor: torch.Tensor, rows: Rows,
                    shape: tuple[int, ...]) -> dict[str, tuple[torch.Tensor, int]]:
        if self.transposed:
            raise NotImplementedError("a Conv1D weight's row scales span all its logical rows")
        return self._encode(name, tensor, rows[0])

    def _encode(self, name: str, w: torch.Tensor, start: int) -> dict[str, tuple[torch.Tensor, int]]:
        """Stored rows for (out, in) rows ``w`` starting at stored row ``start``: int8_vectorwise_quant
        after Int8Params' cast to float16 (threshold 0, as on load)."""
        if w.dim() != 2:
            raise InputError(f"{name}: LLM.int8 encodes 2-D weights; this one is {list(w.shape)}")
        w16 = w.to(torch.float16).contiguous()
        if not bool(torch.isfinite(w16).all()):
            raise InputError(f"{name}: holds inf or NaN in float16 (|x| > 65504): LLM.int8 quantizes through "
                             "float16, so its row scale would be inf; leave out --requantize to write it in 16 bit")
        scb = torch.max(w16.abs(), dim=1).values.float()
        # An all-zero row: bitsandbytes computes 0 * (127 / 0) = NaN, which x86 converts to code 0; here 0 directly.
        inv = torch.where(scb > 0, 127.0 / scb, 0.0)
        codes = torch.mul(w16, inv.unsqueeze(-1)).round_().to(torch.int8)
        prefix = _prefix(name)
        out = {name: (codes, start), prefix + "SCB": (scb, start)}
        if self.format_dtype is not None and start == 0:
            out[prefix + "weight_format"] = (torch.zeros((), dtype=self.format_dtype), 0)
        return out


def _model_dtype(context: GroupContext, stored: dict[str, TensorInfo]) -> torch.dtype:
    """What ``model.dequantize()`` casts to: the dtype transformers loads the model in (``dtype="auto"``),
    config.json's, else the first 16/32-bit float tensor's (the SCBs aside), else float32."""
    for key in ("dtype", "torch_dtype"):
        value = (context.config or {}).get(key)
        if value is not None:
            if value not in _MODEL_DTYPES:
                raise InputError(f"{context.where}: config.json {key} {value!r} is not float32, float16 or bfloat16")
            return _MODEL_DTYPES[value]
    return next((t.dtype for n, t in stored.items() if t.dtype in _MODEL_DTYPES.values() and not n.endswith("SCB")),
                torch.float32)


def _prefix(name: str) -> str:
    if name != "weight" and not name.endswith(".weight"):
        raise InputError(f"{name}: LLM.int8 stores a module's 'weight'; cannot encode another tensor")
    return name[: -len("weight")]


def _check_scb(scb: torch.Tensor, scb_name: str, where: str) -> None:
    """SCB is a row's absmax: finite and not negative in anything bitsandbytes writes."""
    if not bool(torch.isfinite(scb).all()):
        raise InputError(f"{where}: {scb_name} holds inf or NaN; the quantized checkpoint is damaged")
    if bool((scb < 0).any()):
        raise InputError(f"{where}: {scb_name} holds a negative row absmax; the quantized checkpoint is damaged")


def _check_format(info: TensorInfo, value: torch.Tensor, where: str) -> None:
    if info.dtype.is_floating_point or info.dtype.is_complex or value.numel() != 1:
        raise InputError(f"{where}: {info.name} is {dtype_name(info.dtype)}{list(info.shape)}; bitsandbytes writes "
                         "one integer layout code")
    code = int(value.reshape(-1)[0])
    if code != 0:
        layout = _FORMATS.get(code, "unknown")
        raise UnsupportedError(f"{where}: {info.name} is {code} ({layout} layout); only the row-major layout "
                               "(0) that bitsandbytes and transformers save today is read")
