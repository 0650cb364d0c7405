"""The refusal of stored encodings that no registered ``Encoding`` decodes.

A quantized checkpoint stores a weight as codes plus side tensors: LLM.int8 as ``weight`` int8 +
``SCB``, FP8 as ``weight`` float8 + ``weight_scale_inv``, GPTQ/AWQ as ``qweight`` + ``qzeros`` +
``scales``, MXFP4 as ``*_blocks`` + ``*_scales``, compressed-tensors as ``weight_packed`` +
``weight_scale``... The encodings in ``wsurgery.quant.encodings`` turn those they know into plain
logical tensors when a checkpoint is opened; anything still encoded when it reaches the engine is
one no encoding recognised, where a merge would add a float change to codes (rounded away, or a
dtype error) and a rewrite would drop the ``quantization_config`` that says how to read them. So
both are refused up front.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from ..errors import UnsupportedError
from .dtypes import dtype_name


# Side tensors of the encodings above: ``{tensor}{sep}{suffix}`` next to an encoded ``{tensor}``, or
# ``{module}.{part}`` in the module that owns it.
_TENSOR_SIDES = ("SCB", "format", "scale", "scale_inv", "zero_point", "global_scale", "blocks", "scales", "packed",
                 "shape", "absmax", "quant_map")
_MODULE_SIDES = ("SCB", "weight_format", "weight_scale", "weight_scale_inv", "weight_zero_point",
                 "weight_global_scale", "weight_packed", "weight_shape", "qweight", "qzeros", "scales", "g_idx")


def quant_method(config: dict | None) -> str | None:
    """What ``quantization_config`` says the weights are, in words (None without one)."""
    q = (config or {}).get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        return "an unreadable quantization_config"
    method = str(q.get("quant_method", "unknown"))
    if method == "bitsandbytes":
        return "bitsandbytes 8-bit" if q.get("load_in_8bit") or q.get("_load_in_8bit") else "bitsandbytes 4-bit"
    return method


def _decoded(config: dict | None) -> bool:
    from ..quant.encodings import recognized  # the registry imports the readers' modules

    q = (config or {}).get("quantization_config")
    if q is None:
        return True
    return isinstance(q, dict) and recognized(q) is not None


def side_tensors(tensors: dict[str, Any], name: str) -> list[str]:
    """The quantization side tensors stored next to ``name`` (empty for a plain tensor)."""
    module = name.rpartition(".")[0]
    found = [f"{name}{sep}{s}" for s in _TENSOR_SIDES for sep in (".", "_")]
    found += [f"{module}.{s}" if module else s for s in _MODULE_SIDES]
    return sorted(n for n in set(found) if n in tensors and n != name)


def check_decoded(tensors: dict[str, Any], config: dict | None, changed: Iterable[str], where: str,
                  copied: Collection[str] = ()) -> None:
    """Refuse to change an encoded tensor, and to rewrite a checkpoint in an encoding not decoded.

    A changed tensor may be a decoded logical tensor (``EncodedTensorInfo``, not in ``tensors``
    with its parts) or a plain float of at least 16 bits without side tensors; integer and float8
    codes, or side tensors next to it, mean an encoding that no reader has decoded. The exception is
    an integer buffer that is only ``copied`` whole (a replaced BatchNorm's ``num_batches_tracked``).
    """
    method = quant_method(config)
    for name in changed:
        dtype = tensors[name].dtype
        sides = side_tensors(tensors, name)
        plain_integer = name in copied and not dtype.is_floating_point
        if sides or (not plain_integer and (not dtype.is_floating_point or dtype.itemsize < 2)):
            stored = f"{dtype_name(dtype)}" + (f" with {', '.join(sides)}" if sides else "")
            raise UnsupportedError(
                f"{where}: {name} is stored as {stored} (quant_method: {method or 'none recorded'}), an encoding "
                "wsurgery does not decode yet, so a change cannot be merged into it; use an unquantized copy of the "
                "model")
    if not _decoded(config):
        raise UnsupportedError(f"{where}: config.json's quantization_config says {method}, an encoding wsurgery "
                               "does not decode yet: its tensors are not plain numbers, and rewriting them without "
                               "it would give a model that loads wrong. Use an unquantized copy of the model")
