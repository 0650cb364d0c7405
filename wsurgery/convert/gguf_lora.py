"""A PEFT LoRA as a llama.cpp LoRA adapter (GGUF), for the GGUF base it will run on (or the Hugging
Face checkpoint that base was converted from: then names and layouts follow from its config.json).

llama.cpp applies ``W·x + scale·B·(A·x)`` per base tensor at run time, ``scale = alpha / rank`` with
one ``adapter.lora.alpha`` for the file and ``rank`` read from B. The file holds, per changed base
tensor, ``<gguf name>.lora_a`` = PEFT's A (r, in) and ``.lora_b`` = PEFT's B (out, r) with B's rows
in the base's GGUF layout (Llama's Q/K interleave); for the token embedding A is stored transposed
(V, r), as llama.cpp gathers its rows by token. Where modules' scales differ (rank or alpha
patterns, rsLoRA), each module's s·r/alpha is multiplied into its B, so every module keeps its own
scale under the one alpha. What llama.cpp cannot express (DoRA's renormalisation, whole tensors from
``modules_to_save``, LoRA biases, trainable tokens, other methods) is refused with the reason:
merging into the GGUF base does express it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from ..adapters import Adapter, load_adapter
from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.gguf_format import GgmlType, GgufCheckpoint, fits_blocks, parse_type, type_name
from ..checkpoint.gguf_names import Layout, arch_of_config, gguf_names, layout
from ..checkpoint.output import atomic_output_file, check_output_file
from ..engine import plan
from ..errors import InputError, NotExpressible, UnsupportedError
from ..methods.lora import DoraPatch, LoraPatch
from ..methods.replace import ReplacePatch

#: Tensor types llama.cpp accepts for adapters (export-lora refuses quantized ones).
ADAPTER_TYPES = (GgmlType.F32, GgmlType.F16, GgmlType.BF16, GgmlType.Q8_0)
_MERGE_INSTEAD = ("merge it into the GGUF base instead (wsurgery merge BASE.gguf ADAPTER OUT.gguf, or add "
                  "--merge-into OUT.gguf to this command)")


@dataclass
class GgufLoraModule:
    module: str
    tensor: str  # the base's GGUF tensor name
    rank: int
    scale: float  # the module's own scale s (PEFT's scaling × --scale)
    baked: float  # what B was multiplied by so that alpha/rank gives s (1.0: nothing baked)


@dataclass
class GgufLora:
    """What an export wrote."""

    out: Path
    alpha: float
    modules: list[GgufLoraModule] = field(default_factory=list)
    bytes_written: int = 0


def _is_base_copy(patch) -> bool:
    """A copy of the frozen base tensor PEFT saves with a targeted embedding: nothing to export
    (llama.cpp's converter skips ``.base_layer.weight`` too)."""
    return isinstance(patch, ReplacePatch) and patch.original is patch.tensor


def _refusal(patch, adapter: Adapter) -> str | None:
    """Why llama.cpp's LoRA format cannot hold this patch, or None."""
    if isinstance(patch, DoraPatch):
        return ("DoRA renormalises each row of W + ΔW to a learned magnitude, which needs W; llama.cpp applies "
                "only B·A at run time")
    if not isinstance(patch, LoraPatch):
        what = type(patch).__name__.removesuffix("Patch")
        if what == "Replace":
            return (f"the adapter stores {patch.module}.{patch.roles[0]} whole (modules_to_save or a trained "
                    "bias); llama.cpp's LoRA format holds only lora_a/lora_b pairs")
        return (f"{adapter.config.peft_type} change ({what}) is not a plain LoRA pair; llama.cpp's LoRA format holds "
                "only lora_a/lora_b pairs (convert it with `wsurgery convert --to lora` first)")
    if patch.bias is not None:
        return "lora_bias adds a trained bias, which llama.cpp's LoRA format cannot hold"
    if patch.kind not in ("linear", "embedding") or patch.factor != 1.0 or patch.role != "weight":
        return f"a LoRA on a {patch.kind} layer ({patch.role}), which llama.cpp's LoRA format does not cover"
    return None


def _common_alpha(products: list[float]) -> float:
    """The alpha llama.cpp should apply: the commonest s·r, so that most B's stay untouched."""
    counts = Counter(products)
    return max(counts, key=lambda p: (counts[p], -products.index(p)))


def _pair(patch: LoraPatch, layout: Layout, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_a, lora_b) in the base's GGUF layout, numpy-ordered (rows first)."""
    A, B = patch.A.to(torch.float32), patch.B.to(torch.float32) * factor
    if patch.kind == "embedding":  # A (r, V), B (d, r); llama.cpp gathers rows of lora_a by token id
        return A.T.contiguous(), B
    return A, layout.rows_to_gguf(B).contiguous()


def _targets(base: Checkpoint) -> tuple[str, dict[str, tuple[str, Layout]]]:
    """The base's llama.cpp architecture and, per Hugging Face tensor, its GGUF name and layout: from the
    GGUF file itself, or for a Hugging Face checkpoint from its config.json as llama.cpp's converter would."""
    if isinstance(base, GgufCheckpoint):
        return base.arch, {n: (t.gguf_name, t.layout) for n, t in base.gguf_items()}
    where = str(base.folder)
    if base.config is None:
        raise InputError(f"{where}: --base is neither a .gguf file nor a model folder with a config.json; "
                         "llama.cpp's names and layouts come from one of them")
    arch, rules, kv = arch_of_config(base.config, where)
    names = gguf_names(arch, list(base.tensors), int(base.config.get("num_hidden_layers", 0)))
    return arch, {n: (g, layout(rules, arch, g, kv)) for n, g in names.items()}


def _as_stored(t: torch.Tensor, kind: GgmlType) -> tuple[np.ndarray, GgmlType | None]:
    data = t.numpy()
    if kind == GgmlType.F32:
        return data, None
    if kind == GgmlType.F16:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, kind), kind


def export_gguf_lora(adapter: str | Path, out: str | Path, base: str | Path, *, scale: float = 1.0,
                     gguf_type: str = "f32", overwrite: bool = False) -> GgufLora:
    """Write ``adapter`` (a PEFT LoRA) as the llama.cpp LoRA adapter ``out`` for ``base``: the GGUF file
    it will run on, or the Hugging Face checkpoint that file was converted from.

    Everything is checked (method, layers, mapping, shapes, types) before ``out`` is created; ``out``
    appears whole or not at all.
    """
    out = Path(out)
    kind = parse_type(gguf_type)
    if kind not in ADAPTER_TYPES:
        raise InputError(f"--type {gguf_type}: llama.cpp loads LoRA tensors as "
                         f"{', '.join(type_name(t) for t in ADAPTER_TYPES)} only")
    ad = load_adapter(adapter)
    for patch in ad.patches():
        reason = None if _is_base_copy(patch) else _refusal(patch, ad)
        if reason is not None:
            raise NotExpressible(f"{ad.folder}: cannot write {patch.module or 'the adapter'} as a GGUF LoRA: {reason}",
                                 _MERGE_INSTEAD)
    ckpt = open_checkpoint(base)
    arch, targets = _targets(ckpt)
    job = plan(ckpt, [(ad, scale)])
    pairs = [(bound.patch, s, j.tensors[bound.patch.role]) for j in job.jobs.values() for bound, s, _ in j.patches
             if isinstance(bound.patch, LoraPatch)]
    if not pairs:
        raise InputError(f"{ad.folder}: no LoRA module to export")
    alpha = _common_alpha([p.scaling * s * p.rank for p, s, _ in pairs])
    modules: list[GgufLoraModule] = []
    tensors: list[tuple[str, torch.Tensor]] = []
    order = {name: i for i, name in enumerate(ckpt.tensors)}
    tied = all(gguf_name != "output.weight" for gguf_name, _ in targets.values())
    for patch, s, name in sorted(pairs, key=lambda pair: order[pair[2]]):
        if name not in targets:
            raise UnsupportedError(f"{ad.folder}: {patch.module} changes {name}, which llama.cpp's {arch} converter "
                                   "does not carry over into GGUF")
        if patch.kind == "embedding" and tied:
            raise NotExpressible(f"{ad.folder}: {patch.module} is the token embedding, which this base also uses as "
                                 "its output head; llama.cpp looks LoRA pairs up by tensor name and would apply this "
                                 "one to the head too, in the embedding's orientation", _MERGE_INSTEAD)
        gguf_name, lay = targets[name]
        wanted = patch.scaling * s
        factor = 1.0 if math.isclose(wanted * patch.rank, alpha, rel_tol=1e-12) else wanted * patch.rank / alpha
        lora_a, lora_b = _pair(patch, lay, factor)
        for suffix, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not fits_blocks(tuple(t.shape), kind):
                raise UnsupportedError(f"{gguf_name}.{suffix}: rows of {t.shape[-1]} values do not divide into "
                                       f"{kind.name} blocks; choose --type f32, f16 or bf16")
            tensors.append((f"{gguf_name}.{suffix}", t))
        modules.append(GgufLoraModule(patch.module, gguf_name, patch.rank, wanted, factor))
    check_output_file(out, [ad.folder, *ckpt.shards], overwrite)
    with atomic_output_file(out, overwrite) as tmp:
        _write(tmp, arch, ad, alpha, kind, tensors)
    return GgufLora(out, alpha, modules, out.stat().st_size)


def _write(path: Path, arch: str, ad: Adapter, alpha: float, kind: GgmlType,
           tensors: list[tuple[str, torch.Tensor]]) -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(ad.folder.name)
    for name, t in tensors:
        data, raw = _as_stored(t, kind)
        writer.add_tensor(name, data, raw_dtype=raw)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
