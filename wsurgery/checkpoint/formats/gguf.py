"""llama.cpp ``.gguf`` files: read as Hugging Face-named tensors, written back as one GGUF file.

The file format itself is ``gguf_format`` (with ``gguf_header``, ``gguf_names``, ``gguf_config``);
this module plugs it into ``open_checkpoint``, the engine, ``inspect`` and ``push``, importing the
``gguf`` package only when a GGUF file is opened or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from ...errors import InputError
from ..reader import Checkpoint
from .base import CheckpointFormat, FileWriter, register_format

if TYPE_CHECKING:
    from ..gguf_format import GgufCheckpoint, GgufTensorInfo


class GgufFormat(CheckpointFormat):
    name = "gguf"
    output_suffix = ".gguf"
    preference = 30

    def claims_file(self, path: Path) -> bool:
        return path.suffix == ".gguf"

    def open(self, path: Path) -> Checkpoint:
        from ..gguf_format import open_gguf

        return open_gguf(path, self)

    def describe(self, ckpt: Checkpoint) -> dict[str, Any]:
        """The architecture and every key/value; arrays (the tokenizer's) by element type and length."""
        ckpt = cast("GgufCheckpoint", ckpt)  # this format opens only GgufCheckpoints
        return {"gguf": {"architecture": ckpt.arch,
                         "metadata": {e.key: e.value if e.item_type is None and e.value is not None
                                      else f"[{e.count} x {e.item_type.name.lower() if e.item_type else '?'}]"
                                      for e in ckpt.key_values}}}

    def describe_lines(self, info: dict[str, Any]) -> list[str] | None:
        meta = info.get("gguf")
        if meta is None:
            return None
        return [f"gguf        {meta['architecture']}, {len(meta['metadata'])} key/values; "
                "tensors listed under their Hugging Face names, [GGUF name and type]",
                *(f"  {k} = {v}" for k, v in meta["metadata"].items())]

    def stored_as(self, info: Any) -> str:
        return f"{info.gguf_name} {info.encoding.describe()}"

    def check_pushed(self, path: Path) -> None:
        """Any GGUF file gguf's own reader parses (a model of an architecture wsurgery does not map, an
        adapter...) may be pushed."""
        import gguf

        try:
            gguf.GGUFReader(path)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{path}: not a readable GGUF file ({first}); the file is corrupt or truncated") from None

    def check_plain_output(self, ckpt: Checkpoint, out: Path) -> None:
        if out.suffix == self.output_suffix:
            raise InputError(f"{out}: dequantize writes a safetensors folder; to change a GGUF file's types use "
                             "quantize --gguf-type")

    # -- writing one GGUF file

    def check_file_output(self, base: Checkpoint, out: Path, options: Any, changed: list[str],
                          out_shapes: dict[str, tuple[int, ...]]) -> Any:
        from ..gguf_format import GgufCheckpoint, GgufOutput, check_encodable

        if not isinstance(base, GgufCheckpoint):  # a Hugging Face model: converted as convert_hf_to_gguf.py does
            from ...convert.hf_to_gguf import HfGgufOutput, plan_conversion

            if options is None or options == GgufOutput():
                options = HfGgufOutput()
            if not isinstance(options, HfGgufOutput):
                raise InputError(f"{out}: --type retypes a GGUF base's tensors; a Hugging Face base is converted "
                                 "with --gguf-type")
            return plan_conversion(base, options.outtype, options.type_for, out_shapes)
        options = options or GgufOutput()
        check_encodable(base, options.types, changed, out_shapes)
        return options

    def file_writer(self, path: Path, base: Checkpoint, options: Any) -> FileWriter:
        from ...convert.hf_to_gguf import GgufConversion, HfToGgufWriter
        from ..gguf_format import GgufWriter

        if isinstance(options, GgufConversion):
            return HfToGgufWriter(path, options)
        return GgufWriter(path, cast("GgufCheckpoint", base), options.types, options.updates)

    def file_rounding(self, base: Checkpoint, options: Any, name: str,
                      changed: bool) -> tuple[torch.dtype, str | None] | None:
        """The writer rounds changed and retyped tensors: checked against what it rounds to. Block types
        store float16 scales (absmax / 127 for Q8_0...): |x| must round to a finite float16."""
        from ...convert.hf_to_gguf import GgufConversion
        from ...quant.encodings.ggml import plain_types, type_name

        if isinstance(options, GgufConversion):
            return options.rounding(name, changed)
        if not changed and name not in options.types:
            return None
        target = options.types.get(name, cast("GgufTensorInfo", base.tensors[name]).type)
        remedy = None if changed else (f"{type_name(target)} cannot store (GGUF block types keep float16 scales); "
                                       "keep the tensor in a wider type")
        return plain_types().get(target, torch.float16), remedy


GGUF = register_format(GgufFormat())
