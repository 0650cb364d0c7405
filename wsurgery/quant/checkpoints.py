"""Whole-checkpoint NF4/FP4 jobs: quantize, dequantize, and the two QLoRA merges.

Each is the streaming merge engine with another output encoding (see ``quant/encodings/bnb4bit.py``):
``quantize`` stores the weights transformers would load as ``Linear4bit`` in 4-bit and records
``quantization_config``; ``dequantize`` writes every tensor plain and drops it; a merge into a 4-bit
base merges into the dequantized weights and writes 16 bit, or with ``requantize`` stores the changed
weights in 4-bit again (unchanged ones are copied byte for byte); ``through_nf4`` makes a 16-bit base
look like dequant(quant(W)), the weights a QLoRA adapter was trained against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..checkpoint.dtypes import dtype_name
from ..conventions import linear_weights
from ..engine import Result, execute, plan
from ..errors import InputError, UnsupportedError
from .encodings import EncodedTensorInfo, Encoding, recognized
from .encodings.bnb4bit import Bnb4bit


@dataclass
class TensorError:
    name: str
    rmse: float
    snr_db: float
    max_abs: float
    numel: int


@dataclass
class QuantReport:
    """``quantize --report``: how far each dequantized weight is from the original, and bytes saved."""

    tensors: list[TensorError] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def rmse(self) -> float:
        n = sum(t.numel for t in self.tensors)
        return math.sqrt(sum(t.rmse**2 * t.numel for t in self.tensors) / n) if n else 0.0

    @property
    def snr_db(self) -> float:
        noise = sum(t.rmse**2 * t.numel for t in self.tensors)
        signal = sum(t.rmse**2 * t.numel * 10 ** (t.snr_db / 10) for t in self.tensors)
        return 10 * math.log10(signal / noise) if noise else math.inf

    @property
    def max_abs(self) -> float:
        return max((t.max_abs for t in self.tensors), default=0.0)

    def format(self) -> str:
        width = max((len(t.name) for t in self.tensors), default=6)
        lines = [f"{'tensor'.ljust(width)}  {'RMSE':>10}  {'SNR dB':>7}  {'max abs':>10}"]
        lines += [f"{t.name.ljust(width)}  {t.rmse:10.3e}  {t.snr_db:7.2f}  {t.max_abs:10.3e}" for t in self.tensors]
        saved = self.bytes_in - self.bytes_out
        lines.append(f"{'overall'.ljust(width)}  {self.rmse:10.3e}  {self.snr_db:7.2f}  {self.max_abs:10.3e}")
        lines.append(f"{self.bytes_in:,} -> {self.bytes_out:,} bytes ({saved:,} saved, "
                     f"{100 * saved / max(self.bytes_in, 1):.1f}%)")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Measured(Bnb4bit):
    """Encodes like ``Bnb4bit`` and records each tensor's quantization error in ``sink``."""

    sink: list = field(default_factory=list, compare=False, hash=False)

    def encode(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        from .bnb4bit import dequantize_4bit, quantization_error

        parts = super().encode(name, tensor)
        prefix = len(name) + 1
        back = dequantize_4bit({k[prefix:] if k != name else "": v for k, v in parts.items()}, where=name)
        err = quantization_error(tensor.T if self.transposed else tensor, back)
        self.sink.append(TensorError(name, err["rmse"], err["snr_db"], err["max_abs"], tensor.numel()))
        return parts


def _encoded(ckpt: Checkpoint) -> list[EncodedTensorInfo]:
    return [t for t in ckpt.tensors.values() if isinstance(t, EncodedTensorInfo)]


def _is_quantized(ckpt: Checkpoint) -> bool:
    q = (ckpt.config or {}).get("quantization_config")
    return isinstance(q, dict) and recognized(q) is not None or bool(_encoded(ckpt))


def _encoding_name(ckpt: Checkpoint) -> str:
    infos = _encoded(ckpt)
    return infos[0].encoding.name if infos else str(((ckpt.config or {}).get("quantization_config") or {})
                                                     .get("quant_method"))


def quantize_checkpoint(src: Checkpoint, out: Path, fmt: Bnb4bit, *, compute_dtype: torch.dtype | None = None,
                        skip: tuple[str, ...] = (), dtype: torch.dtype | None = None,
                        max_shard_size: int | None = None, overwrite: bool = False, progress: bool = True,
                        report: bool = False, record: dict | None = None,
                        workers: int | None = None) -> tuple[Result, QuantReport | None]:
    """Store the Linear weights of ``src`` in 4-bit; ``record`` goes to config.json's "wsurgery" key."""
    job = plan(src, [])  # first: refuses encodings not decoded, before they read as "already quantized"
    if _is_quantized(src):
        raise InputError(f"{src.folder}: already quantized ({_encoding_name(src)}); nothing to do. To change the "
                         "format, dequantize it first")
    chosen, kept = linear_weights(src.tensors, src.config, skip)
    if not chosen:
        raise InputError(f"{src.folder}: no Linear weights to quantize (2-D *.weight tensors that are not "
                         "embeddings or heads)" + (" after --skip-modules" if skip else ""))
    sink: list[TensorError] = []
    encoder = (_Measured(fmt.quant_type, fmt.blocksize, fmt.double_quant, fmt.quant_storage, sink=sink)
               if report else fmt)
    weights = [src.tensors[n] for n in chosen]
    compute = compute_dtype or dtype or max((w.dtype for w in weights), key=lambda d: torch.finfo(d).bits)

    def update(config: dict) -> None:
        config["quantization_config"] = fmt.config(compute, kept)
        if record is not None:
            config["wsurgery"] = record

    result = execute(job, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                     progress=progress, quantize={n: encoder.with_transposed(t) for n, t in chosen.items()},
                     config_update=update, workers=workers)
    result.modules = result.changed_tensors = len(chosen)
    quant_report = None
    if report:  # workers finish in any order: the report lists the weights in file order
        order = {name: i for i, name in enumerate(chosen)}
        sink.sort(key=lambda t: order[t.name])
        quant_report = QuantReport(sink, src.total_bytes, result.bytes_written)
    return result, quant_report


def dequantize_checkpoint(src: Checkpoint, out: Path, *, dtype: torch.dtype | None = None,
                          max_shard_size: int | None = None, overwrite: bool = False, progress: bool = True,
                          record: dict | None = None, workers: int | None = None) -> Result:
    """Write every tensor of an encoded checkpoint plain (as decoded, or in ``dtype``)."""
    job = plan(src, [])  # first: refuses encodings not decoded, whose tensors cannot be written plain
    if not _is_quantized(src):
        raise InputError(f"{src.folder}: no encoded weights and no quantization_config: the checkpoint is plain "
                         "already; nothing to dequantize")
    result = execute(job, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                     progress=progress, config_update=lambda c: _plain_config(c, record), workers=workers)
    result.modules = result.changed_tensors = len(_encoded(src))
    return result


def _plain_config(config: dict, record: dict | None) -> None:
    config.pop("quantization_config", None)
    if record is not None:
        config["wsurgery"] = record


def requantize_targets(base: Checkpoint, requantize: bool) -> dict[str, Encoding]:
    """For a merge into an encoded base: which tensors to store encoded again, each in its own encoding
    (unchanged ones are then copied as stored)."""
    if not requantize:
        return {}
    targets = {n: t.encoding for n, t in base.tensors.items() if isinstance(t, EncodedTensorInfo)}
    if not targets:
        raise InputError(f"{base.folder}: --requantize needs a quantized base (bitsandbytes, FP8, MXFP4, int8...); "
                         "this one stores plain tensors")
    for name, encoding in targets.items():
        if encoding.cannot_encode is not None:
            raise UnsupportedError(f"{base.folder}: --requantize: {name} is stored in {encoding.name}, which wsurgery "
                                   f"cannot encode again ({encoding.cannot_encode}); leave out --requantize to write "
                                   "the merge in 16 bit")
    return targets


def through_targets(base: Checkpoint, fmt: Bnb4bit, skip: tuple[str, ...] = ()) -> dict[str, Callable]:
    """``--through-nf4``: every weight ``quantize`` would store in 4-bit, as dequant(quant(W))."""
    if _is_quantized(base):
        raise InputError(f"{base.folder}: --through-nf4 is for a 16-bit base; this one is already quantized, and a "
                         "merge into it already uses its dequantized weights")
    chosen, _ = linear_weights(base.tensors, base.config, skip)
    return {n: fmt.with_transposed(t).roundtrip for n, t in chosen.items()}


def describe_encoding(base: Checkpoint, requantize: bool, through: Bnb4bit | None) -> dict | None:
    """The "quantization" part of the output's "wsurgery" record: what the adapter was merged into."""
    if through is not None:
        return {"merged_into": "dequant(quant(W)) of the 16-bit base", "quant_type": through.quant_type,
                "blocksize": through.blocksize, "double_quant": through.double_quant, "output": "16-bit"}
    infos = _encoded(base)
    if not infos:
        return None
    encodings = sorted({t.encoding.describe() for t in infos})
    dtypes = sorted({dtype_name(t.dtype) for t in infos})
    return {"merged_into": f"the decoded {infos[0].encoding.name} base", "stored_as": encodings,
            "output": "re-encoded as stored" if requantize else "/".join(dtypes)}
