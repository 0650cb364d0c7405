"""Whole-checkpoint jobs on GGUF files: requantize, and the output types of a merge.

Each is the streaming engine over a GGUF checkpoint (``checkpoint/gguf_format.py``) with a GGUF
output: quantize re-encodes the weights llama.cpp's ``llama-quantize`` would and records the new
``general.file_type``. A K-quant name (q4_k_m, q5_k_m, q3_k_s, q2_k, q6_k...) is llama-quantize's
mix: each tensor's type as it chooses it (``gguf_mixes``); any other ggml type (q8_0, q4_0, f16...)
is stored in every weight matrix whose rows divide into its blocks, the others kept as they were.
Dequantizing needs nothing of its own: every GGUF tensor is an encoded tensor (its ggml type),
written plain by ``api.dequantize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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
from ..checkpoint.gguf_header import KeyValue, pack_key_value
from ..engine import Result, execute, plan
from ..errors import InputError, UnsupportedError
from .encodings.ggml import can_encode
from .gguf_mixes import FILE_TYPES, mix_types, model_from_kv

if TYPE_CHECKING:  # imported where a Hugging Face model is converted
    from ..convert.hf_to_gguf import HfGgufOutput

#: The names ``--gguf-type`` takes as llama-quantize's mixes: its K-quant file types. Its other names
#: (q4_0, q8_0, f16...) are also ggml types, and stay what they were before mixes: that type throughout.
MIXES = [name for name in FILE_TYPES if "_k" in name]


def merge_output(base: Checkpoint, changed: list[str], gguf_type: str | None,
                 out: Path) -> GgufOutput | HfGgufOutput | None:
    """The GGUF output of a merge into ``out``: changed tensors in ``gguf_type``, else their own type."""
    if out.suffix != ".gguf":
        if gguf_type is not None:
            raise InputError(f"{out}: --type chooses a GGUF tensor type; the output is not a .gguf file")
        return None
    if not isinstance(base, GgufCheckpoint):  # Hugging Face base: converted as convert_hf_to_gguf.py does
        from ..convert.hf_to_gguf import HfGgufOutput

        return HfGgufOutput(gguf_type or "f16")
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


def _valid_names() -> str:
    plain = [type_name(t) for t in GgmlType if can_encode(t)]
    return ", ".join([*MIXES, *plain])


def _mix(src: GgufCheckpoint, name: str) -> tuple[dict[str, GgmlType], list[KeyValue]]:
    """The types llama-quantize gives ``src``'s tensors for the mix ``name``, and the key/values it records."""
    model = model_from_kv(src.kv, str(src.shards[0]))
    logical = {info.gguf_name: name for name, info in src.gguf_items()}
    chosen, ftype = mix_types(model, [(info.gguf_name, info.shape) for _, info in src.gguf_items()], name)
    missing = sorted({type_name(t) for t in chosen.values() if not can_encode(t)})
    if missing:
        raise UnsupportedError(f"{src.shards[0]}: --gguf-type {name} stores tensors as {', '.join(missing)}, which "
                               "wsurgery cannot quantize yet; choose a plain type such as q8_0")
    updates = [pack_key_value(gguf.Keys.General.QUANTIZATION_VERSION, gguf.GGUFValueType.UINT32,
                              gguf.GGML_QUANT_VERSION),
               pack_key_value(gguf.Keys.General.FILE_TYPE, gguf.GGUFValueType.UINT32, int(ftype))]
    return {logical[g]: t for g, t in chosen.items()}, updates


def quantize_gguf(src: Checkpoint, out: Path, target_name: str, *, overwrite: bool = False,
                  progress: bool = True, workers: int | None = None) -> tuple[Result, list[str]]:
    """Re-encode ``src``'s weight matrices as ``target_name`` (a mix or a ggml type, see the module
    docstring); returns the result and the weights kept as they were because their rows do not divide
    into the type's blocks (none for a mix: llama-quantize's fallbacks choose another type). A Hugging
    Face model is converted as ``convert_hf_to_gguf.py`` (then ``llama-quantize``) would."""
    if out.suffix != ".gguf":
        raise InputError(f"{out}: --gguf-type writes a GGUF file; name the output *.gguf")
    if not isinstance(src, GgufCheckpoint):
        from ..convert.hf_to_gguf import HfGgufOutput

        return execute(plan(src, []), out, overwrite=overwrite, progress=progress, gguf=HfGgufOutput(target_name),
                       workers=workers), []
    name = target_name.strip().lower()
    if name in MIXES:
        types, updates = _mix(src, name)
        kept: list[str] = []
    else:
        if name.upper() not in GgmlType.__members__:
            raise InputError(f"unknown --gguf-type {target_name!r}; valid: {_valid_names()}")
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
