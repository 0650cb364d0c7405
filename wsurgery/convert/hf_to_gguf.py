"""A Hugging Face model folder -> one GGUF file, byte for byte what llama.cpp's ``convert_hf_to_gguf.py``
writes for it (``--outtype f32|f16|bf16|q8_0``), streaming one tensor at a time.

The conversion is two parts, so that a merge can stream into it (``HfToGgufWriter`` has the writer
interface the engine's one-file outputs use):

* ``plan_conversion`` reads the folder up front: the family's rules (``FAMILIES``), every key/value
  the converter writes, in its order (general metadata through ``gguf.Metadata`` as the converter does,
  hyperparameters, the tokenizer: ``convert/gguf_vocab.py``), and each tensor's GGUF name, shape and
  type in the converter's tensor order (parts by file name, tensors by name within a part).
* ``GgufConversion.convert`` turns one tensor in Hugging Face layout into its GGUF bytes (Llama's
  Q/K rows interleaved, Gemma's norms + 1, the ggml type chosen as the converter chooses it, encoded
  with the ``gguf`` package's quantizers as the converter encodes it).

Families: Llama/Mistral (Llama 3's rope scaling as the ``rope_freqs`` tensor the converter computes),
Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text). What the converter does beyond renames, reshapes and these
changes (stacked experts, vision towers, multimodal rope, longrope...) is refused by name, before
anything is written.

A llama-quantize mix (``q4_k_m``, ``q5_k_m``, ``q6_k``...) is the converter's f16 file requantized as
llama-quantize does, in the same pass: the types ``quant/gguf_mixes.py`` chooses, each weight rounded to
f16 first (the values that file holds), then quantized with ggml's reference quantizers
(``quant/ggml_types``); ``general.file_type`` is the mix's. The file keeps the converter's tensor order.

The converter's hyperparameters come from ``AutoConfig(...).to_dict()``; without transformers at run
time, config.json is read with the defaults transformers fills in for these families (``Family.defaults``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as GgmlType

from ..checkpoint.safetensors_file import write_at
from ..errors import InputError, UnsupportedError
from ..quant.encodings import EncodedTensorInfo
from .gguf_vocab import SpecialVocab, check_tokenizer_kind

#: ``--outtype`` -> the converter's file type.
OUT_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_FILE_TYPE_TENSOR = {
    gguf.LlamaFileType.ALL_F32: GgmlType.F32, gguf.LlamaFileType.MOSTLY_F16: GgmlType.F16,
    gguf.LlamaFileType.MOSTLY_BF16: GgmlType.BF16, gguf.LlamaFileType.MOSTLY_Q8_0: GgmlType.Q8_0,
}
#: Tensors the converter drops.
_DROPPED = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class Family:
    """One of the converter's model classes: what it does besides renaming."""

    arch: gguf.MODEL_ARCH
    #: the converter's class: "llama" (LlamaModel: Q/K rows interleaved per head for llama.cpp's RoPE,
    #: vocab_size and rope.dimension_count), "qwen" (TextModel's rules as they are), "gemma"/"gemma2"
    #: (their own hyperparameters, a SentencePiece vocabulary, norms stored + 1, lm_head dropped),
    #: "gemma3" (TextModel's rules and its own on top, norms + 1, the embedding cut to the vocabulary)
    kind: str
    #: transformers' config defaults that ``AutoConfig(...).to_dict()`` (the converter's hparams) fills in
    defaults: tuple[tuple[str, Any], ...] = ()


_LLAMA_DEFAULTS = (("max_position_embeddings", 2048), ("rms_norm_eps", 1e-6))
_QWEN_DEFAULTS = (("max_position_embeddings", 32768), ("rms_norm_eps", 1e-6), ("num_key_value_heads", 32))
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, "llama", defaults=_LLAMA_DEFAULTS),
    "MistralForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, "llama",
                                 defaults=(("max_position_embeddings", 4096 * 32), ("rms_norm_eps", 1e-6),
                                           ("num_key_value_heads", 8))),
    "Qwen2ForCausalLM": Family(gguf.MODEL_ARCH.QWEN2, "qwen", defaults=_QWEN_DEFAULTS),
    "Qwen3ForCausalLM": Family(gguf.MODEL_ARCH.QWEN3, "qwen", defaults=(*_QWEN_DEFAULTS, ("head_dim", 128))),
    "GemmaForCausalLM": Family(gguf.MODEL_ARCH.GEMMA, "gemma",
                               defaults=(("max_position_embeddings", 8192), ("rms_norm_eps", 1e-6),
                                         ("head_dim", 256))),
    "Gemma2ForCausalLM": Family(gguf.MODEL_ARCH.GEMMA2, "gemma2",
                                defaults=(("max_position_embeddings", 8192), ("rms_norm_eps", 1e-6),
                                          ("head_dim", 256), ("num_key_value_heads", 4),
                                          ("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0),
                                          ("sliding_window", 4096))),
    "Gemma3ForCausalLM": Family(gguf.MODEL_ARCH.GEMMA3, "gemma3",
                                defaults=(("max_position_embeddings", 131072), ("rms_norm_eps", 1e-6),
                                          ("head_dim", 256), ("num_key_value_heads", 4), ("sliding_window", 4096))),
}
#: Families whose conversion is known to be more than that, and why they are refused.
_REFUSED = {
    "MixtralForCausalLM": "stacked experts",
    "Qwen2MoeForCausalLM": "stacked experts",
    "Qwen3MoeForCausalLM": "stacked experts",
    "Gemma3ForConditionalGeneration": "a vision tower (a separate mmproj file) next to the text model",
    "Mistral3ForConditionalGeneration": "a vision tower (a separate mmproj file) next to the text model",
    "LlavaForConditionalGeneration": "a vision tower (a separate mmproj file) next to the text model",
}


@dataclass(frozen=True)
class GgufTarget:
    """Where one Hugging Face tensor goes: its GGUF name, shape (torch order) and ggml type."""

    name: str
    shape: tuple[int, ...]
    type: GgmlType
    heads: int | None = None  # rows interleaved per head (Llama Q/K)
    shift: float = 0.0  # added to the values (Gemma's norms: llama.cpp multiplies by the weight, not 1 + it)
    rows: int | None = None  # rows kept (Gemma 3's embedding: those of the vocabulary)
    via: GgmlType | None = None  # a mix: the type of the converter's file that llama-quantize starts from


@dataclass(frozen=True)
class HfGgufOutput:
    """What a GGUF output of a Hugging Face base should be: the converter's ``--outtype`` and, optionally,
    other ggml types for some weights (``type_for(gguf_name, shape)``, None: the outtype's)."""

    outtype: str = "f16"
    type_for: Callable[[str, tuple[int, ...]], GgmlType | None] | None = None


@dataclass
class GgufConversion:
    """A model folder's conversion, computed up front (see the module docstring)."""

    folder: Path
    writer: gguf.GGUFWriter  # holds the key/values and tensor infos; writes only the header
    targets: dict[str, GgufTarget] = field(default_factory=dict)  # Hugging Face name -> target, file order
    #: tensors the converter computes (Llama 3's rope_freqs), under their GGUF names; written with the header
    generated: dict[str, torch.Tensor] = field(default_factory=dict)

    def convert(self, name: str, tensor: torch.Tensor) -> np.ndarray:
        """``name``'s bytes in the GGUF file (as the converter encodes them)."""
        t = self.targets[name]
        if t.rows is not None:
            tensor = tensor[:t.rows]
        if tuple(tensor.shape) != t.shape:
            raise InputError(f"{name}: shape {list(tensor.shape)}, planned as {list(t.shape)}")
        if tensor.dtype not in (torch.float16, torch.float32):
            tensor = tensor.to(torch.float32)
        if t.heads is not None:
            tensor = _interleave(tensor, t.heads)
        if t.shift:
            tensor = tensor + t.shift
        data = tensor.contiguous().numpy()
        if t.via is not None:  # llama-quantize: ggml's reference quantizer over the converter's values
            from ..quant import ggml_types

            return ggml_types.quantize(gguf.quants.dequantize(gguf.quants.quantize(data, t.via), t.via), t.type)
        try:
            return gguf.quants.quantize(data, t.type)
        except gguf.QuantError as e:
            raise AssertionError(f"{t.name}: planned as {t.type.name} but {e}") from e


    def rounding(self, name: str, changed: bool) -> tuple[torch.dtype, str | None] | None:
        """What a changed tensor must fit (its type's values, or the float16 scales of block types);
        unchanged tensors are converted as the converter converts them, unchecked."""
        if not changed or name not in self.targets:
            return None
        t = self.targets[name].type
        return {GgmlType.F32: torch.float32, GgmlType.BF16: torch.bfloat16}.get(t, torch.float16), None


def _interleave(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """The converter's ``LlamaModel.permute``."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _family(config: dict, where: Path) -> Family:
    arches = config.get("architectures") or []
    text = config.get("text_config") or {}
    arch = (text.get("architectures") or arches or [None])[0]
    if arches and arches[0] in _REFUSED:  # a multimodal model: refused by its own name
        arch = arches[0]
    if arch in _REFUSED:
        raise UnsupportedError(f"{where}: {arch} is not converted to GGUF by wsurgery: its llama.cpp conversion "
                               f"involves {_REFUSED[arch]}; use llama.cpp's convert_hf_to_gguf.py")
    family = FAMILIES.get(str(arch))
    if family is None:
        raise UnsupportedError(f"{where}: architecture {arch!r} is not converted to GGUF by wsurgery (it converts "
                               f"{', '.join(sorted(FAMILIES))}); use llama.cpp's convert_hf_to_gguf.py")
    return family


def _find(h: dict, keys: list[str]) -> Any:
    return next((h[k] for k in keys if k in h), None)


def _hparams(config: dict, family: Family) -> dict:
    """The converter's hparams: ``AutoConfig(...).to_dict()`` for these families, i.e. config.json with
    transformers' defaults, rope settings gathered in ``rope_parameters``."""
    h = {**config, **config.get("text_config", {})}
    for key, value in family.defaults:
        h.setdefault(key, value)
    h.setdefault("num_key_value_heads", h.get("num_attention_heads"))
    if family.kind == "llama" and "head_dim" not in h and h.get("num_attention_heads"):
        h["head_dim"] = h["hidden_size"] // h["num_attention_heads"]
    rope = dict(h.get("rope_parameters") or h.get("rope_scaling") or {})
    rope.setdefault("rope_theta", h.get("rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    rope.setdefault("rope_type", "default")
    h["rope_parameters"] = rope
    return h


def _rope_parameters(h: dict) -> dict:
    """``TextModel.__init__``'s mirror of the global rope settings into ``rope_parameters``."""
    rope = dict(h.get("rope_parameters", h.get("rope_scaling")) or {})
    theta = _find(h, ["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"])
    local = _find(h, ["local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                      "rope_local_base_freq"])
    partial = _find(h, ["partial_rotary_factor", "rope_pct", "rope_percent"])
    orig = _find(h, ["original_max_position_embeddings"])
    if "full_attention" not in rope and "sliding_attention" not in rope:
        if local is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and (kind := rope.get("type")) is not None:
            rope["rope_type"] = kind
        if "partial_rotary_factor" not in rope and partial is not None:
            rope["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" not in rope and orig is not None:
            rope["original_max_position_embeddings"] = orig
    return rope


def _add_parameters(w: gguf.GGUFWriter, h: dict, family: Family, ftype: gguf.LlamaFileType,
                    where: Path) -> None:
    """``TextModel.set_gguf_parameters`` (and ``LlamaModel``'s), for the settings these families use;
    settings that would need more (MoE, mrope, llama3 rope) are refused."""
    w.add_block_count(h["num_hidden_layers"])
    if (n_ctx := _find(h, ["max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                           "model_max_length"])) is not None:
        w.add_context_length(n_ctx)
    if (n_embd := _find(h, ["hidden_size", "n_embd", "dim"])) is not None:
        w.add_embedding_length(n_embd)
    if (n_ff := _find(h, ["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                          "n_inner", "hidden_dim"])) is not None:
        w.add_feed_forward_length(n_ff)
    if (n_head := _find(h, ["num_attention_heads", "n_head", "n_heads"])) is not None:
        w.add_head_count(n_head)
    if (n_kv := _find(h, ["num_key_value_heads", "n_kv_heads"])) is not None:
        w.add_head_count_kv(n_kv)
    if h.get("is_causal") is False:
        w.add_causal_attention(False)
    rope_all = _rope_parameters(h)
    rope = rope_all.get("full_attention", rope_all)
    if (kind := rope.get("rope_type")) is not None:
        factor = rope.get("factor")
        if kind == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif kind == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if key == "beta_fast" and (attn := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                    w.add_rope_scaling_yarn_attn_factor(attn)
                if (value := rope.get(key)) is not None:
                    add(value)
        elif kind.lower() not in ("default", "linear", "yarn", "llama3"):  # llama3: a rope_freqs tensor
            raise UnsupportedError(f"{where}: rope type {kind!r}; llama.cpp's converter computes more for it than "
                                   "wsurgery redoes (a rope_freqs tensor or per-model settings)")
    if "mrope_section" in rope_all:
        raise UnsupportedError(f"{where}: multimodal rope sections are not converted by wsurgery")
    if (theta := rope.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (local := rope_all.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local)
    if (eps := _find(h, ["rms_norm_eps", "norm_eps"])) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := _find(h, ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])) is not None:
        w.add_layer_norm_eps(eps)
    moe = ["num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"]
    if any(h.get(k) is not None for k in moe):
        raise UnsupportedError(f"{where}: a mixture-of-experts config; wsurgery does not convert experts to GGUF")
    if (head_dim := h.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(ftype)
    if family.kind == "llama":
        w.add_vocab_size(h["vocab_size"])
        w.add_rope_dimension_count(h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"])
    elif (where / "modules.json").is_file():
        raise UnsupportedError(f"{where}: a sentence-transformers model (modules.json); its pooling settings are "
                               "not converted by wsurgery")


def _add_gemma_parameters(w: gguf.GGUFWriter, h: dict, family: Family, ftype: gguf.LlamaFileType) -> None:
    """``GemmaModel``/``Gemma2Model.set_gguf_parameters``: their own list, in their order."""
    w.add_context_length(h["max_position_embeddings"])
    w.add_embedding_length(h["hidden_size"])
    w.add_block_count(h["num_hidden_layers"])
    w.add_feed_forward_length(h["intermediate_size"])
    w.add_head_count(h["num_attention_heads"])
    w.add_head_count_kv(h["num_key_value_heads"])
    w.add_layer_norm_rms_eps(h["rms_norm_eps"])
    w.add_key_length(h["head_dim"])
    w.add_value_length(h["head_dim"])
    w.add_file_type(ftype)
    if family.kind == "gemma2":
        w.add_attn_logit_softcapping(h["attn_logit_softcapping"])
        w.add_final_logit_softcapping(h["final_logit_softcapping"])
        w.add_sliding_window(h["sliding_window"])


def _add_gemma3_parameters(w: gguf.GGUFWriter, h: dict) -> None:
    """``Gemma3Model.set_gguf_parameters`` after TextModel's: keys written again keep their place."""
    w.add_context_length(h.get("max_position_embeddings", 131072))
    w.add_head_count(h.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(h.get("rms_norm_eps", 1e-6))
    w.add_key_length(h.get("head_dim", 256))
    w.add_value_length(h.get("head_dim", 256))
    rope = _rope_parameters(h)
    w.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    if h.get("attn_logit_softcapping") is not None:
        raise UnsupportedError("Gemma 3 with attn_logit_softcapping: llama.cpp's converter refuses it too")
    if final := h.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(final)
    if h.get("sliding_window_pattern") != 1:
        w.add_sliding_window(h["sliding_window"])
    w.add_head_count_kv(h.get("num_key_value_heads", 4))


def _llama3_rope_freqs(h: dict) -> torch.Tensor | None:
    """``LlamaModel.generate_extra_tensors``: Llama 3's rope scaling as per-frequency factors (float32 torch
    arithmetic, as the converter computes them)."""
    rope_all = _rope_parameters(h)
    rope = rope_all.get("full_attention", rope_all)
    if not rope or str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors: list = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _tensor_type(gguf_name: str, shape: tuple[int, ...], ftype: gguf.LlamaFileType,
                 type_for: Callable[[str, tuple[int, ...]], GgmlType | None] | None) -> GgmlType:
    """The converter's choice (``prepare_tensors``): norms, 1-D tensors and non-weights F32, the rest the
    file type's, Q8_0 falling back to F16 where rows do not divide into blocks; ``type_for`` overrides the
    weights it names."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return GgmlType.F32
    chosen = type_for(gguf_name, shape) if type_for is not None else None
    target = chosen if chosen is not None else _FILE_TYPE_TENSOR[ftype]
    block = gguf.GGML_QUANT_SIZES[target][0]
    if shape[-1] % block:
        if chosen is not None:
            raise UnsupportedError(f"{gguf_name}: rows of {shape[-1]} values do not divide into {target.name} "
                                   f"blocks of {block}")
        return GgmlType.F16
    return target


def _nbytes(shape: tuple[int, ...], t: GgmlType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size if shape else size


def _ordered(tensors: dict[str, Any]) -> list[str]:
    """The converter's tensor order: parts sorted by file name, tensors by name within a part."""
    return sorted(tensors, key=lambda n: (tensors[n].file.name, n))


def plan_conversion(ckpt: Any, outtype: str = "f16",
                    type_for: Callable[[str, tuple[int, ...]], GgmlType | None] | None = None,
                    shapes: dict[str, tuple[int, ...]] | None = None) -> GgufConversion:
    """Everything about the GGUF file of ``ckpt`` (an opened Hugging Face checkpoint) but its tensor data.

    ``shapes`` are the output tensors' shapes where a job changes them (default: the checkpoint's)."""
    folder = Path(ckpt.folder)
    mix = None if outtype in OUT_TYPES else _mix_name(outtype)
    ftype = OUT_TYPES["f16" if mix else outtype]  # a mix: the f16 file llama-quantize would start from
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(f"{folder}: no config.json; converting to GGUF needs the model's config and tokenizer")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    family = _family(config, folder)
    if config.get("quantization_config") or any(isinstance(i, EncodedTensorInfo) for i in ckpt.tensors.values()):
        raise UnsupportedError(f"{folder}: a quantized checkpoint; llama.cpp's converter dequantizes it its own way. "
                               "Run wsurgery dequantize first, then convert the plain model")
    h = _hparams(config, family)
    add_vocab = check_tokenizer_kind(folder, sentencepiece_only=family.kind.startswith("gemma"))
    n_blocks = h["num_hidden_layers"]
    tensor_map = gguf.get_tensor_name_map(family.arch, n_blocks)
    n_head, n_kv = h["num_attention_heads"], h["num_key_value_heads"]
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[family.arch])
    conv = GgufConversion(folder, w)
    if family.kind == "llama" and (rope_freqs := _llama3_rope_freqs(h)) is not None:
        conv.generated["rope_freqs.weight"] = rope_freqs
        conv.targets["rope_freqs.weight"] = GgufTarget("rope_freqs.weight", tuple(rope_freqs.shape), GgmlType.F32)
    for name in _ordered(ckpt.tensors):  # the converter's targets first, then (a mix) llama-quantize's types
        if name.endswith(_DROPPED) or (family.kind in ("gemma", "gemma2") and name == "lm_head.weight"):
            continue
        info = ckpt.tensors[name]
        shape = tuple((shapes or {}).get(name, info.shape))
        rows = None
        if family.kind == "gemma3" and "embed_tokens.weight" in name and h.get("vocab_size"):
            rows = h["vocab_size"]  # the SentencePiece vocabulary's size: rows past it dropped
            shape = (min(rows, shape[0]), *shape[1:])
        gguf_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedError(f"{ckpt.shards[0]}: tensor {name!r} has no GGUF name in llama.cpp's "
                                   f"{gguf.MODEL_ARCH_NAMES[family.arch]} layout (the converter refuses it too)")
        heads = None
        if family.kind == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_head
        elif family.kind == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_kv
        kind = _tensor_type(gguf_name, shape, ftype, type_for)
        shift = 1.0 if family.kind.startswith("gemma") and name.endswith("norm.weight") else 0.0
        conv.targets[name] = GgufTarget(gguf_name, shape, kind, heads, shift, rows)
    file_type = ftype
    if mix is not None:
        file_type = _apply_mix(conv, mix, gguf.MODEL_ARCH_NAMES[family.arch], n_blocks, n_head, n_kv)
    for target in conv.targets.values():
        np_dtype = {GgmlType.F32: np.float32, GgmlType.F16: np.float16}.get(target.type, np.uint8)
        stored = target.shape if np_dtype is not np.uint8 else gguf.quant_shape_to_byte_shape(target.shape,
                                                                                             target.type)
        w.add_tensor_info(target.name, stored, np.dtype(np_dtype), _nbytes(target.shape, target.type),
                          raw_dtype=target.type)
    _add_metadata(w, folder, ftype)
    if family.kind in ("gemma", "gemma2"):
        _add_gemma_parameters(w, h, family, file_type)
    else:
        _add_parameters(w, h, family, file_type, folder)
    if family.kind == "gemma3":
        _add_gemma3_parameters(w, h)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if family.kind == "llama" and (config_file := folder / "tokenizer_config.json").is_file():
        tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
        if (prefix := tokenizer_config.get("add_prefix_space")) is not None:
            w.add_add_space_prefix(prefix)
    if family.kind == "llama" and h.get("vocab_size") == 32016:
        raise UnsupportedError(f"{folder}: a CodeLlama vocabulary (32016 tokens), whose infill tokens llama.cpp's "
                               "converter adds by hand; wsurgery does not convert it")
    add_vocab(w, h.get("vocab_size"))
    if family.kind == "gemma":  # CodeGemma's infill tokens, as GemmaModel.set_vocab adds them for every Gemma
        vocab = SpecialVocab(folder, load_merges=False, types=("prefix", "suffix", "middle", "fsep", "eot"))
        for typ, tid in (("prefix", 67), ("suffix", 69), ("middle", 68), ("fsep", 70), ("eot", 107)):
            vocab.set_id(typ, tid)
        vocab.chat_template = None
        vocab.add_to(w)
    if family.kind.startswith("gemma"):
        w.add_add_space_prefix(False)
    if family.kind == "llama" and h.get("vocab_size") == 49152:  # the converter's rule for small Granite models
        w.add_add_bos_token(False)
    return conv


def _mix_name(outtype: str) -> str:
    from ..quant.gguf_mixes import FILE_TYPES

    name = outtype.strip().lower()
    if name not in FILE_TYPES:
        raise InputError(f"unknown --gguf-type {outtype!r} for a Hugging Face model; choose one of "
                         f"{', '.join(OUT_TYPES)} (the converter's) or a llama-quantize mix: "
                         f"{', '.join(n for n in FILE_TYPES if n not in OUT_TYPES)}")
    return name


def _apply_mix(conv: GgufConversion, mix: str, arch: str, n_layer: int, n_head: int,
               n_kv: int) -> gguf.LlamaFileType:
    """llama-quantize's types for ``mix`` over the converter's f16 file (``quant/gguf_mixes.py``): each weight
    it quantizes is rounded to f16 first, as that file holds it; returns the file type it records."""
    from dataclasses import replace

    from ..quant.gguf_mixes import MixModel, mix_types

    types, file_type = mix_types(MixModel(arch, n_layer, n_head, n_kv),
                                 [(t.name, t.shape) for t in conv.targets.values()], mix)
    for hf_name, t in conv.targets.items():
        if t.name in types and types[t.name] != t.type:
            conv.targets[hf_name] = replace(t, type=types[t.name], via=t.type)
    return file_type


def _add_metadata(w: gguf.GGUFWriter, folder: Path, ftype: gguf.LlamaFileType) -> None:
    """``ModelBase.prepare_metadata``'s general.* keys, from ``gguf.Metadata`` as the converter reads them."""
    total, shared, expert, count = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, folder, None, total)
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():  # the converter's newer gguf also reads transformers' repetition_penalty
        gen = json.loads(gen_path.read_text(encoding="utf-8"))
        if "penalty_repeat" not in gen and "repetition_penalty" in gen:
            meta.sampling_penalty_repeat = gen["repetition_penalty"]
    if meta.name is None:
        meta.name = folder.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    del ftype


class HfToGgufWriter:
    """Writes a conversion's file: the header first (sized for every tensor), then each tensor into its
    place as it comes, in any order (the engine's one-file writer interface: ``write``, ``copy_raw``,
    ``close``, ``abort``, ``total_bytes``)."""

    def __init__(self, path: Path, conversion: GgufConversion):
        self.path, self.conversion = path, conversion
        w = conversion.writer
        w.write_header_to_file(path=Path(path))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        header = os.path.getsize(path)
        align = w.data_alignment
        self._data_start = -(-header // align) * align
        self._offsets: dict[str, int] = {}
        pos = 0
        for name, t in conversion.targets.items():
            self._offsets[name] = pos
            pos += -(-_nbytes(t.shape, t.type) // align) * align
        self.total_bytes = self._data_start + pos
        self._pending = set(conversion.targets)
        self._fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(self._fd, self.total_bytes)
            for name, tensor in conversion.generated.items():
                self.write(name, tensor)
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.conversion.targets:
            return  # dropped by the converter (rotary inv_freq...)
        data = self.conversion.convert(name, tensor)
        t = self.conversion.targets[name]
        if data.nbytes != _nbytes(t.shape, t.type):
            raise AssertionError(f"{t.name}: encoded to {data.nbytes} bytes")
        write_at(self._fd, torch.from_numpy(np.ascontiguousarray(data)), self._data_start + self._offsets[name],
                 self.path, t.name)
        self._pending.discard(name)

    def copy_raw(self, name: str) -> bool:
        return False  # every tensor is converted

    def close(self) -> None:
        try:
            if self._pending:
                raise AssertionError(f"{self.path}: tensors never written: {sorted(self._pending)[:5]}")
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


def hf_to_gguf(ckpt_folder: str | Path, out: str | Path, outtype: str = "f16",
               type_for: Callable[[str, tuple[int, ...]], GgmlType | None] | None = None, *,
               overwrite: bool = False, progress: bool = True, workers: int | None = None) -> Path:
    """Convert a Hugging Face model folder to ``out`` (a .gguf file) as ``convert_hf_to_gguf.py --outtype
    OUTTYPE`` does (f32, f16, bf16, q8_0), or then ``llama-quantize`` for a mix (q4_k_m...);
    ``type_for(gguf_name, shape)`` may choose other ggml types for weights. The engine's path with no
    adapter: the same as ``wsurgery quantize FOLDER OUT.gguf --gguf-type OUTTYPE``."""
    from ..checkpoint import open_checkpoint
    from ..engine import execute, plan

    out = Path(out)
    if out.suffix != ".gguf":
        raise InputError(f"{out}: a GGUF output is one file; name it *.gguf")
    execute(plan(open_checkpoint(Path(ckpt_folder)), []), out, overwrite=overwrite, progress=progress,
            gguf=HfGgufOutput(outtype, type_for), workers=workers)
    return out
