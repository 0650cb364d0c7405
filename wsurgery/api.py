"""The Python API behind the command line."""

from __future__ import annotations

import functools
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, overload

import torch

from .adapters import Adapter
from .adapters.files import FileAdapter, load_any_adapter
from .checkpoint.dtypes import parse_user_dtype
from .checkpoint.formats import file_format, open_checkpoint
from .checkpoint.writer import parse_size
from .hub import PushResult, PushTarget
from .hub import push as push_folder
from .hub_inputs import resolve
from .engine import Result, execute, plan
from .convert import combine as _combine
from .convert import convert as _convert
from .convert import extract as _extract
from .convert.combine import AdapterSpec, weighted_specs
from .convert.convert import Conversion
from .errors import InputError
from .merging import merge_models as merge_models  # the API of `wsurgery merge-models`
from .model_card import provenance
from .quant.checkpoints import describe_encoding, requantize_targets, through_targets
from .quant.encodings.bnb4bit import Bnb4bit

if TYPE_CHECKING:
    from .convert.gguf_lora import GgufLora
    from .quant.checkpoints import QuantReport
    from .verify import Report


@overload
def _local(spec: str | Path, kind: str = "model") -> Path: ...
@overload
def _local(spec: None, kind: str = "model") -> None: ...
@overload
def _local(spec: str | Path | None, kind: str = "model") -> Path | None: ...


def _local(spec: str | Path | None, kind: str = "model") -> Path | None:
    """A path or Hub repo id as a local path: every repo id is resolved here, where it enters the API."""
    return None if spec is None else resolve(spec, kind=kind)


@functools.wraps(_convert.convert)
def convert(adapter: str | Path, out: str | Path, *, base: str | Path | None = None, **options: Any) -> Conversion:
    return _convert.convert(_local(adapter, "adapter"), out, base=_local(base), **options)


@functools.wraps(_combine.combine)
def combine(out: str | Path, adapters: AdapterSpec | Sequence[AdapterSpec], *, base: str | Path | None = None,
            **options: Any):
    local: list[AdapterSpec] = [(_local(a, "adapter"), w) for a, w in weighted_specs(adapters)]
    return _combine.combine(out, local, base=_local(base), **options)


@functools.wraps(_extract.extract)
def extract(base: str | Path, tuned: str | Path, out: str | Path, **options: Any):
    return _extract.extract(_local(base), _local(tuned), out, **options)


def _load_adapters(adapter: AdapterSpec | Sequence[AdapterSpec], scale: float, options: dict[str, Any] | None
                   ) -> list[tuple[Adapter | FileAdapter, float]]:
    """Each adapter loaded, with its scale·weight."""
    return [(load_any_adapter(_local(a, "adapter"), options), scale * w) for a, w in weighted_specs(adapter)]


def _run(direction: str, base: str | Path, adapter: AdapterSpec | Sequence[AdapterSpec], out: str | Path,
         scale: float, dtype: str | torch.dtype | None, max_shard_size: str | int | None, overwrite: bool,
         progress: bool, options: dict[str, Any] | None, requantize: bool = False, through_nf4: bool = False,
         command: str | None = None, gguf_type: str | None = None, workers: int | None = None) -> Result:
    if isinstance(dtype, str):
        dtype = parse_user_dtype(dtype)
    if isinstance(max_shard_size, str):
        max_shard_size = parse_size(max_shard_size)
    if requantize and through_nf4:
        raise InputError("--requantize and --through-nf4 exclude each other: --through-nf4 is for a 16-bit base, "
                         "--requantize for a 4-bit one")
    ckpt = open_checkpoint(_local(base))
    adapters = _load_adapters(adapter, scale, options)
    job = plan(ckpt, adapters, direction)
    through_fmt = Bnb4bit() if through_nf4 else None
    quantize = requantize_targets(ckpt, requantize)
    through = through_targets(ckpt, through_fmt) if through_fmt else {}
    record = provenance(direction, command, str(base), [(str(a), scale * w) for a, w in weighted_specs(adapter)],
                        quantization=describe_encoding(ckpt, requantize, through_fmt))

    def update(config: dict) -> None:
        if not requantize:
            config.pop("quantization_config", None)
        config["wsurgery"] = record

    return execute(job, Path(out), dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                   progress=progress, extra_inputs=[a.folder for a, _ in adapters], quantize=quantize, through=through,
                   config_update=update, gguf=_gguf_merge_output(ckpt, job.changed_tensors, gguf_type, Path(out)),
                   workers=workers)


def _gguf_merge_output(base, changed: list[str], gguf_type: str | None, out: Path):
    """The GGUF side of a merge (imported only when a GGUF is involved)."""
    if file_format(out) is None and gguf_type is None:
        return None
    from .quant.gguf_jobs import merge_output

    return merge_output(base, changed, gguf_type, out)


def merge(base: str | Path, adapter: AdapterSpec | Sequence[AdapterSpec], out: str | Path, *, scale: float = 1.0,
          dtype: str | torch.dtype | None = None, max_shard_size: str | int | None = None,
          overwrite: bool = False, progress: bool = True, options: dict[str, Any] | None = None,
          requantize: bool = False, through_nf4: bool = False, command: str | None = None,
          gguf_type: str | None = None, workers: int | None = None) -> Result:
    """Merge a PEFT adapter (or several) into a base checkpoint and write the merged model folder ``out``.

    ``base`` is a model folder, a ``.safetensors``/``.bin`` file, an index file or a Hub repo id;
    ``adapter`` a PEFT adapter folder or repo id, or a list of them (or of ``(adapter, weight)`` pairs)
    applied in order. ``scale`` multiplies every adapter's change (W + scale·weight·ΔW). The output
    keeps the base's tensor names, shapes, dtypes (unless ``dtype``) and sharding (unless
    ``max_shard_size``), and is written atomically: on any error ``out`` is not created.
    ``options`` are method-specific choices, e.g. ``{"task_id": 2}`` for Poly.

    QLoRA: a bitsandbytes 4-bit base is merged into its dequantized weights and written in 16 bit
    (``requantize``: changed weights stored in 4-bit again, the rest copied as they are);
    ``through_nf4`` merges a 16-bit base's Linear weights as dequant(quant(W)) in NF4 (blocksize 64,
    double quant), the weights a QLoRA adapter was trained against. config.json's "wsurgery" record
    says which (``command``: the command line to record there).

    GGUF: a ``.gguf`` base is read as its Hugging Face-named tensors; an ``out`` ending in ``.gguf``
    is written as one GGUF file with the base's metadata and tokenizer, the changed tensors
    requantized to their own type or to ``gguf_type`` (``"q8_0"``, ``"f16"``...).

    ``workers``: threads that read, compute and write different tensors at once (default: one per core);
    the output is the same bytes whatever the number.
    """
    return _run("merge", base, adapter, out, scale, dtype, max_shard_size, overwrite, progress, options,
                requantize, through_nf4, command, gguf_type, workers)


def unmerge(merged: str | Path, adapter: str | Path, out: str | Path, *, scale: float = 1.0,
            dtype: str | torch.dtype | None = None, max_shard_size: str | int | None = None,
            overwrite: bool = False, progress: bool = True, options: dict[str, Any] | None = None,
            command: str | None = None, workers: int | None = None) -> Result:
    """Undo ``merge``: subtract the adapter's change from a merged checkpoint.

    Exact (up to rounding) for additive methods. Refuses, before writing anything, where the
    original weights cannot be recovered from the files (DoRA, ``modules_to_save``, saved biases).
    ``command``: the command line to record in config.json's "wsurgery" record.
    """
    return _run("unmerge", merged, adapter, out, scale, dtype, max_shard_size, overwrite, progress, options,
                command=command, workers=workers)


def verify(base: str | Path, adapter: AdapterSpec | Sequence[AdapterSpec], merged: str | Path, *, scale: float = 1.0,
           device: str = "auto", tokens: int = 64, seed: int = 0, rtol: float | None = None, atol: float = 0.0,
           progress: bool = True, options: dict[str, Any] | None = None, workers: int | None = None) -> Report:
    """Check with forward passes that ``merged`` computes what ``base`` + ``adapter`` compute.

    Each changed module runs the adapter's unmerged forward path on seeded inputs and the merged
    layer on the same inputs; every other tensor must be byte-identical to the base. Returns a
    ``Report`` (``.passed``, ``.checks``); nothing is written.
    """
    from .verify import verify_merge

    ckpt = open_checkpoint(_local(base))
    return verify_merge(ckpt, _load_adapters(adapter, scale, options), open_checkpoint(_local(merged)),
                        device=device, tokens=tokens, seed=seed, rtol=rtol, atol=atol, progress=progress,
                        workers=workers)



def verify_quantized(original: str | Path, quantized: str | Path, *, device: str = "auto", tokens: int = 64,
                     seed: int = 0, progress: bool = True) -> Report:
    """Check a bitsandbytes 4-bit checkpoint against the checkpoint it was quantized from: every
    weight's forward error within the 4-bit error bound, every other tensor equal."""
    from .verify import verify_quantized as run

    return run(open_checkpoint(_local(original)), open_checkpoint(_local(quantized)), device=device,
               tokens=tokens, seed=seed, progress=progress)

def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, token: str | None = None,
         provenance: dict[str, Any] | None = None, progress: bool = True) -> PushResult:
    """Upload a checkpoint or adapter folder to the Hub repo ``repo_id`` (created if missing).

    The folder is checked first (every index names existing shards, every safetensors header parses
    and its data ends exactly at the file's end, no unfinished temporary file or folder at any
    depth). Where it has no README.md, a model card is generated from ``provenance`` or the folder's
    own records (wsurgery's record, an adapter's base, config.json's ``_name_or_path`` where it is a
    repo id) and uploaded with it; the folder is never modified.
    ``revision`` is a branch (created if missing) or ``refs/pr/N``; ``create_pr`` opens a pull
    request against main instead. ``token`` defaults to ``HF_TOKEN``, then the stored login.
    """
    target = PushTarget(repo_id, private, revision, create_pr, commit_message, token)
    return push_folder(folder, target, provenance, progress)


def quantize(src: str | Path, out: str | Path, *, quant_type: str = "nf4", blocksize: int = 64,
             double_quant: bool = True, compute_dtype: str | torch.dtype | None = None,
             skip_modules: tuple[str, ...] = (), dtype: str | torch.dtype | None = None,
             max_shard_size: str | int | None = None, overwrite: bool = False, progress: bool = True,
             report: bool = False, command: str | None = None,
             workers: int | None = None) -> tuple[Result, QuantReport | None]:
    """Store a checkpoint's Linear weights in bitsandbytes 4-bit (NF4 or FP4, double quantization),
    as ``from_pretrained(..., load_in_4bit=True)`` + ``save_pretrained`` would, tensor by tensor.

    The files load with transformers + bitsandbytes; ``quantization_config`` lists every 2-D weight
    left in full precision (embeddings, heads, ``skip_modules`` regexes) in ``llm_int8_skip_modules``.
    ``report``: also return each weight's quantization error.
    """
    from .quant.checkpoints import quantize_checkpoint

    fmt = Bnb4bit(quant_type, blocksize, double_quant)
    record = provenance("quantize", command, str(src), quantization={"quant_type": quant_type, "blocksize": blocksize,
                                                                      "double_quant": double_quant})
    return quantize_checkpoint(open_checkpoint(_local(src)), Path(out), fmt, compute_dtype=_dtype(compute_dtype),
                               skip=tuple(skip_modules), dtype=_dtype(dtype), max_shard_size=_size(max_shard_size),
                               overwrite=overwrite, progress=progress, report=report, record=record,
                               workers=workers)


def dequantize(src: str | Path, out: str | Path, *, dtype: str | torch.dtype | None = None,
               max_shard_size: str | int | None = None, overwrite: bool = False, progress: bool = True,
               command: str | None = None, workers: int | None = None) -> Result:
    """Write an encoded checkpoint (bitsandbytes, FP8, GPTQ..., a llama.cpp GGUF file) back as plain tensors
    and drop ``quantization_config``; weights come back in their decoded dtype unless ``dtype``."""
    from .quant.checkpoints import dequantize_checkpoint

    ckpt = open_checkpoint(_local(src))
    ckpt.format.check_plain_output(ckpt, Path(out))
    record = provenance("dequantize", command, str(src))
    return dequantize_checkpoint(ckpt, Path(out), dtype=_dtype(dtype), max_shard_size=_size(max_shard_size),
                                 overwrite=overwrite, progress=progress, record=record, workers=workers)


def export_gguf_lora(adapter: str | Path, out: str | Path, base: str | Path, *, scale: float = 1.0,
                     gguf_type: str = "f32", overwrite: bool = False) -> GgufLora:
    """Write a PEFT LoRA as the llama.cpp LoRA adapter file ``out`` (.gguf) for the GGUF file ``base``:
    ``general.type=adapter``, ``adapter.type=lora``, one ``adapter.lora.alpha`` (modules whose scale
    differs get it baked into B), B's rows in the base's GGUF layout, the token embedding's A
    transposed. DoRA, ``modules_to_save``, LoRA biases and other methods are refused with the reason."""
    from .convert.gguf_lora import export_gguf_lora as run

    return run(_local(adapter, "adapter"), out, _local(base), scale=scale, gguf_type=gguf_type, overwrite=overwrite)


def quantize_gguf(src: str | Path, out: str | Path, gguf_type: str, *, overwrite: bool = False,
                  progress: bool = True, workers: int | None = None) -> tuple[Result, list[str]]:
    """Requantize a GGUF file's weight matrices (what llama-quantize re-encodes: 2-D weights, not norms)
    to ``gguf_type``: a llama-quantize mix (``"q4_k_m"``...: each tensor's type as llama.cpp chooses it) or
    one ggml type (``"q8_0"``, ``"f16"``...), in the GGUF file ``out``; metadata and tokenizer are kept,
    ``general.file_type`` follows. Returns the result and the weights left as they were because their rows
    do not divide into the type's blocks. ``src`` may also be a Hugging Face model folder: it is converted
    as llama.cpp's ``convert_hf_to_gguf.py`` (f32, f16, bf16, q8_0), then ``llama-quantize`` (a mix), would."""
    from .quant.gguf_jobs import quantize_gguf as run

    return run(open_checkpoint(_local(src)), Path(out), gguf_type, overwrite=overwrite, progress=progress,
               workers=workers)


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    return parse_user_dtype(dtype) if isinstance(dtype, str) else dtype


def _size(size: str | int | None) -> int | None:
    return parse_size(size) if isinstance(size, str) else size
