"""Hugging Face names and layouts for the tensors of a llama.cpp GGUF file.

llama.cpp's converter (``convert_hf_to_gguf.py``) renames every tensor with the ``gguf`` package's
``TensorNameMap`` and, for some architectures, changes its values on the way: Llama's Q and K rows
are interleaved for llama.cpp's RoPE, Gemma's norm weights are stored plus one. Reading undoes both,
so the logical tensors of a GGUF checkpoint carry Hugging Face names and values, and an adapter
trained on the Hugging Face model applies to them directly; writing redoes them.

The name map lists, for each GGUF name, every Hugging Face spelling any converted model used; the
spelling of ``transformers``' own model classes is the one under ``model.layers.N.`` (``model.X``
and ``lm_head`` outside the blocks) for every architecture supported here. Architectures whose
converter does more than these two changes (fused or split projections, transposed Conv1D weights,
stacked experts under other names) are refused rather than guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import gguf
import torch

from ..errors import UnsupportedError
from .untrusted import shown

_BLOCK_PREFIX = "model.layers."
_TOP_PREFIX = "model."
_HEAD = "lm_head"
# Where the name map offers several spellings inside a block, transformers' own (other converted
# models spelled ``q_layernorm`` or ``feed_forward.up_proj``).
_TRANSFORMERS_BLOCK_NAMES = frozenset({
    "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
    "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
})


@dataclass(frozen=True)
class ArchRules:
    """What llama.cpp's converter does to an architecture's tensors besides renaming them."""

    permute_qk: bool = False  # Llama: Q/K rows interleaved per head (``LlamaModel.permute``)
    norm_offset: float = 0.0  # Gemma: norm weights stored as w + 1


#: Architectures (``general.architecture``) whose conversion is known exactly.
ARCHITECTURES: dict[str, ArchRules] = {
    "llama": ArchRules(permute_qk=True),
    "qwen2": ArchRules(),
    "qwen3": ArchRules(),
    "gemma": ArchRules(norm_offset=1.0),
    "gemma2": ArchRules(norm_offset=1.0),
    "gemma3": ArchRules(norm_offset=1.0),
}


def arch_rules(arch: str, where: str) -> ArchRules:
    rules = ARCHITECTURES.get(arch)
    if rules is None:
        raise UnsupportedError(
            f"{where}: GGUF architecture {shown(arch)} is not supported; wsurgery maps GGUF tensors to Hugging Face "
            f"names and layouts only for {', '.join(sorted(ARCHITECTURES))}, whose llama.cpp conversion it knows")
    return rules


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def _hf_spelling(candidates: list[str], in_block: bool) -> str | None:
    """The ``transformers`` spelling among the converter's candidates (see the module docstring)."""
    if in_block:
        ours = [c for c in candidates if c.startswith(_BLOCK_PREFIX)]
        known = [c for c in ours if c[len(_BLOCK_PREFIX):].partition(".")[2] in _TRANSFORMERS_BLOCK_NAMES]
        return next(iter(known or ours), None)
    return next((c for c in candidates if c == _HEAD or (c.startswith(_TOP_PREFIX) and c.count(".") == 1)), None)


def hf_names(arch: str, gguf_names: list[str], n_blocks: int) -> dict[str, str]:
    """``{GGUF name: Hugging Face name}``; a tensor with no Hugging Face counterpart (``rope_freqs``,
    computed by the converter) keeps its GGUF name."""
    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    tensor_map = gguf.TensorNameMap(arch_id, n_blocks)
    candidates: dict[str, list[str]] = {}
    for key, (_, gguf_base) in tensor_map.mapping.items():
        if key != gguf_base:
            candidates.setdefault(gguf_base, []).append(key)
    names: dict[str, str] = {}
    for name in gguf_names:
        base, suffix = _split_suffix(name)
        hf = _hf_spelling(candidates.get(base, []), base.startswith("blk."))
        names[name] = hf + suffix if hf is not None else name
    return names


def _head_counts(kv: Mapping[str, object], arch: str) -> tuple[int, int]:
    n_head = kv.get(gguf.Keys.Attention.HEAD_COUNT.format(arch=arch))
    n_kv = kv.get(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch), n_head)
    if not isinstance(n_head, int) or not isinstance(n_kv, int):
        raise UnsupportedError(f"GGUF {arch}: attention.head_count(_kv) is {n_head!r}/{n_kv!r}, not one number; "
                               "per-layer head counts are not supported")
    return n_head, n_kv


def _interleave(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: within each head, rows (first half, second half) -> pairs."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _deinterleave(t: torch.Tensor, n_head: int) -> torch.Tensor:
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


@dataclass(frozen=True)
class Layout:
    """How one tensor's GGUF values differ from its Hugging Face values."""

    heads: int | None = None  # rows interleaved per head (Llama Q/K)
    offset: float = 0.0  # stored value = Hugging Face value + offset

    def to_hf(self, t: torch.Tensor) -> torch.Tensor:
        if self.heads is not None:
            t = _deinterleave(t, self.heads)
        return t - self.offset if self.offset else t

    def to_gguf(self, t: torch.Tensor) -> torch.Tensor:
        if self.heads is not None:
            t = _interleave(t, self.heads)
        return t + self.offset if self.offset else t

    def rows_to_gguf(self, t: torch.Tensor) -> torch.Tensor:
        """A LoRA B (out, r): its rows follow the weight's rows; an additive change has no offset."""
        return _interleave(t, self.heads) if self.heads is not None else t


PLAIN = Layout()


def layout(rules: ArchRules, arch: str, gguf_name: str, kv: Mapping[str, object]) -> Layout:
    """The layout of ``gguf_name`` in a file of this architecture."""
    base, _ = _split_suffix(gguf_name)
    kind = base.rpartition(".")[2]
    if rules.permute_qk and base.startswith("blk.") and kind in ("attn_q", "attn_k"):
        n_head, n_kv = _head_counts(kv, arch)
        return Layout(heads=n_head if kind == "attn_q" else n_kv)
    if rules.norm_offset and gguf_name.endswith("norm.weight"):
        return Layout(offset=rules.norm_offset)
    return PLAIN


#: ``config.json`` model types whose llama.cpp architecture has another name.
_MODEL_TYPE_ARCH = {"mistral": "llama", "gemma3_text": "gemma3"}


def arch_of_config(config: dict, where: str) -> tuple[str, ArchRules, dict[str, object]]:
    """A Hugging Face model's llama.cpp architecture, its rules, and the key/values layouts need."""
    model_type = config.get("model_type")
    arch = _MODEL_TYPE_ARCH.get(str(model_type), str(model_type))
    rules = arch_rules(arch, f"{where} (model_type {model_type!r})")
    n_head = config.get("num_attention_heads")
    kv: dict[str, object] = {gguf.Keys.Attention.HEAD_COUNT.format(arch=arch): n_head,
          gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch): config.get("num_key_value_heads", n_head)}
    return arch, rules, kv


def gguf_names(arch: str, names: list[str], n_blocks: int) -> dict[str, str]:
    """``{Hugging Face name: GGUF name}`` as llama.cpp's converter renames (names it would not convert
    are left out)."""
    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    tensor_map = gguf.TensorNameMap(arch_id, n_blocks)
    out = {}
    for name in names:
        converted = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if converted is not None:
            out[name] = converted
    return out
