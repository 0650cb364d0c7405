"""Whole-checkpoint jobs on GGUF files: requantize, and the output types of a merge.

Each is the streaming engine over a GGUF checkpoint (``checkpoint/gguf_format.py``) with a GGUF
output: quantize re-encodes the weights llama.cpp's ``llama-quantize`` would (2-D ``*.weight``
tensors except norms) and records the new ``general.file_type``. Dequantizing needs nothing of its
own: every GGUF tensor is an encoded tensor (its ggml type), written plain by ``api.dequantize``.
"""

from __future__ import annotations

from pathlib import Path

import gguf

from ..checkpoint import Checkpoint
from ..checkpoint.gguf_format import (
    GgmlType,
    GgufCheckpoint,
    GgufOutput,
    GgufTensorInfo,
    fits_blocks,
    parse_type,
    type_name,
)
from ..checkpoint.gguf_header import pack_key_value
from ..engine import Result, execute, plan
from ..errors import InputError


def require_gguf(ckpt: Checkpoint, what: str) -> GgufCheckpoint:
    if not isinstance(ckpt, GgufCheckpoint):
        raise InputError(f"{ckpt.shards[0] if len(ckpt.shards) == 1 else ckpt.folder}: {what} needs a GGUF file "
                         "(.gguf); this checkpoint is " + ckpt.format.name)
    return ckpt


def merge_output(base: Checkpoint, changed: list[str], gguf_type: str | None, out: Path) -> GgufOutput | None:
    """The GGUF output of a merge into ``out``: changed tensors in ``gguf_type``, else their own type."""
    if out.suffix != ".gguf":
        if gguf_type is not None:
            raise InputError(f"{out}: --type chooses a GGUF tensor type; the output is not a .gguf file")
        return None
    if gguf_type is None:
        return GgufOutput()
    target = parse_type(gguf_type)
    return GgufOutput(types={name: target for name in changed})


def _quantized_by_llama_cpp(info: GgufTensorInfo) -> bool:
    """What llama-quantize re-encodes: weight matrices, not norms, biases or 1-D tensors."""
    return (len(info.shape) >= 2 and info.gguf_name.endswith(".weight") and "norm" not in info.gguf_name
            and info.dtype.is_floating_point)


def _file_type(target: GgmlType) -> int | None:
    if target == GgmlType.F32:
        return gguf.LlamaFileType.ALL_F32
    member = gguf.LlamaFileType.__members__.get(f"MOSTLY_{target.name}")
    return None if member is None else int(member)


def quantize_gguf(src: GgufCheckpoint, out: Path, target_name: str, *, overwrite: bool = False,
                  progress: bool = True, workers: int | None = None) -> tuple[Result, list[str]]:
    """Re-encode ``src``'s weight matrices as ``target_name``; returns the result and the weights kept
    as they were because their rows do not divide into the type's blocks."""
    if out.suffix != ".gguf":
        raise InputError(f"{out}: --gguf-type writes a GGUF file; name the output *.gguf")
    target = parse_type(target_name)
    weights = [info for _, info in src.gguf_items() if _quantized_by_llama_cpp(info)]
    kept = [info.gguf_name for info in weights if not fits_blocks(info.shape, target)]
    types = {info.name: target for info in weights if fits_blocks(info.shape, target)}
    if not types:
        raise InputError(f"{src.shards[0]}: no weight matrix whose rows divide into {type_name(target)} blocks")
    updates = []
    file_type = _file_type(target)
    if file_type is not None:
        updates.append(pack_key_value(gguf.Keys.General.FILE_TYPE, gguf.GGUFValueType.UINT32, file_type))
    if target not in (GgmlType.F32, GgmlType.F16, GgmlType.BF16):
        updates.append(pack_key_value(gguf.Keys.General.QUANTIZATION_VERSION, gguf.GGUFValueType.UINT32,
                                      gguf.GGML_QUANT_VERSION))
    result = execute(plan(src, []), out, overwrite=overwrite, progress=progress, gguf=GgufOutput(types, updates),
                     workers=workers)
    return result, kept
