"""llama-quantize's file types (q4_k_m, q5_k_m, q3_k_m, q2_k, q6_k...): which ggml type each tensor gets.

A file type such as Q4_K_M is a *mix*: a default type (Q4_K) that ``llama_tensor_get_type`` in llama.cpp's
``src/llama-quant.cpp`` raises or lowers per tensor: attn_v and ffn_down of the layers ``use_more_bits`` picks
get more bits, the output head (and a tied token embedding) Q6_K, MoE attention Q8_0, rows that do not divide
into the type's blocks fall back (Q4_K -> Q5_0...). This module is that choice, rule for rule, for the file types
that need no importance matrix (the IQ types and Q2_K_S do), as llama-quantize applies it without ``--imatrix``,
``--pure`` or overrides. THE reference is llama.cpp as vendored in llama-cpp-python 0.3.36's sdist
(``scripts/fetch_llama_cpp_src.sh``); ``fixtures/gguf_mixes/`` holds the types its ``llama-quantize`` chose
(``scripts/make_gguf_mix_fixtures.py``), which ``tests/test_gguf_mixes.py`` checks this module against.

Nothing here reads tensors: the choice depends only on the architecture, a few hyperparameters and the tensors'
names and shapes, so the HF -> GGUF path can call ``mix_types`` before a GGUF file exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gguf import GGMLQuantizationType as GgmlType
from gguf import LlamaFileType

from ..errors import InputError, UnsupportedError

T = GgmlType
F = LlamaFileType

#: llama-quantize's names of the file types chosen here (``tools/quantize/quantize.cpp``; Q3_K/Q4_K/Q5_K are
#: its aliases of the _M mixes), lower case as ``--gguf-type`` takes them.
FILE_TYPES: dict[str, LlamaFileType] = {
    "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1, "q5_0": F.MOSTLY_Q5_0, "q5_1": F.MOSTLY_Q5_1,
    "q8_0": F.MOSTLY_Q8_0, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "f32": F.ALL_F32,
    "q2_k": F.MOSTLY_Q2_K, "q3_k": F.MOSTLY_Q3_K_M, "q3_k_s": F.MOSTLY_Q3_K_S, "q3_k_m": F.MOSTLY_Q3_K_M,
    "q3_k_l": F.MOSTLY_Q3_K_L, "q4_k": F.MOSTLY_Q4_K_M, "q4_k_s": F.MOSTLY_Q4_K_S, "q4_k_m": F.MOSTLY_Q4_K_M,
    "q5_k": F.MOSTLY_Q5_K_M, "q5_k_s": F.MOSTLY_Q5_K_S, "q5_k_m": F.MOSTLY_Q5_K_M, "q6_k": F.MOSTLY_Q6_K,
}

#: ``llama_ftype_get_default_type``.
DEFAULT_TYPE: dict[LlamaFileType, GgmlType] = {
    F.MOSTLY_Q4_0: T.Q4_0, F.MOSTLY_Q4_1: T.Q4_1, F.MOSTLY_Q5_0: T.Q5_0, F.MOSTLY_Q5_1: T.Q5_1,
    F.MOSTLY_Q8_0: T.Q8_0, F.MOSTLY_F16: T.F16, F.MOSTLY_BF16: T.BF16, F.ALL_F32: T.F32,
    F.MOSTLY_Q2_K: T.Q2_K, F.MOSTLY_Q3_K_S: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q3_K, F.MOSTLY_Q3_K_L: T.Q3_K,
    F.MOSTLY_Q4_K_S: T.Q4_K, F.MOSTLY_Q4_K_M: T.Q4_K, F.MOSTLY_Q5_K_S: T.Q5_K, F.MOSTLY_Q5_K_M: T.Q5_K,
    F.MOSTLY_Q6_K: T.Q6_K,
}

#: ``tensor_type_fallback``: a 256-block type whose rows do not divide into blocks becomes a 32-block one.
FALLBACK: dict[GgmlType, GgmlType] = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1,
                                      T.Q6_K: T.Q8_0}

_BLOCK = {T.Q4_0: 32, T.Q4_1: 32, T.Q5_0: 32, T.Q5_1: 32, T.Q8_0: 32, T.Q2_K: 256, T.Q3_K: 256, T.Q4_K: 256,
          T.Q5_K: 256, T.Q6_K: 256}
_PLAIN = (T.F32, T.F16, T.BF16)

#: Substrings of names llama-quantize never quantizes (``tensor_allows_quantization``).
_NEVER = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
          "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
          "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
          "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
          "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
          "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
          ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
          "a.rvq.codebook", "mm.a.code_embd")
_NEVER_GLM5_NEXT = ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
                    "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight")
#: Architectures whose loader calls a model of this many layers LLM_TYPE_70B (attn_v gets Q5_K for Q3_K/Q4_K).
_LAYERS_70B = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}
_LAYER = re.compile(r"blk\.([+-]?\d+)")


@dataclass(frozen=True)
class MixModel:
    """What of the model the choice depends on: ``{arch}.block_count``, the head counts of layer 0
    (``attention.head_count``, ``head_count_kv``) and ``expert_count``."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return 0 if self.n_head_kv == 0 else self.n_head // self.n_head_kv

    @property
    def is_70b(self) -> bool:
        if self.arch == "llama" and (self.n_expert == 8 or self.n_head == self.n_head_kv):
            return False  # llama's loader calls those 8x7B/8x22B or 65B
        return _LAYERS_70B.get(self.arch) == self.n_layer


def model_from_kv(kv: Mapping[str, object], where: str) -> MixModel:
    """The ``MixModel`` of a GGUF file's key/values (``where`` names the file in errors)."""
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise InputError(f"{where}: no general.architecture key; not a llama.cpp model file")

    def first(key: str, default: int | None = None) -> int:
        value = kv.get(f"{arch}.{key}", default)
        if isinstance(value, list) and value:  # per-layer head counts: llama.cpp's n_gqa() looks at layer 0
            value = value[0]
        if type(value) is not int or value < 0:
            raise InputError(f"{where}: {arch}.{key} is {value!r}, not a count; the file is corrupt")
        return value

    n_head = first("attention.head_count", 0)
    return MixModel(arch, first("block_count"), n_head, first("attention.head_count_kv", n_head),
                    first("expert_count", 0))


def file_type(name: str) -> LlamaFileType:
    """``"q4_k_m"`` -> ``LlamaFileType.MOSTLY_Q4_K_M``; a one-line error naming the valid names otherwise."""
    ftype = FILE_TYPES.get(name.strip().lower())
    if ftype is None:
        raise InputError(f"unknown GGUF file type {name!r}; llama-quantize's mixes wsurgery writes: "
                         + ", ".join(FILE_TYPES))
    return ftype


def n_dims(shape: tuple[int, ...]) -> int:
    """``ggml_n_dims``: trailing sizes of 1 in ggml's order (leading in ours) do not count."""
    return next((len(shape) - i for i, n in enumerate(shape) if n > 1), 1)


def allows_quantization(arch: str, name: str, shape: tuple[int, ...]) -> bool:
    """``tensor_allows_quantization``: 2-D and 3-D weights, except norms, routers and the small or positional
    tables llama-quantize keeps as they are."""
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight") or any(s in name for s in _NEVER):
        return False
    return not (arch == "glm5-next" and any(s in name for s in _NEVER_GLM5_NEXT))


def _category(name: str) -> str:
    """``tensor_get_category`` (first match wins)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
                "attn_output.weight", "ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return {"attn_qkv.weight": "attn_v", "attn_kv_b.weight": "attn_v"}.get(key, key.removesuffix(".weight"))
    return "other"


def _layer(name: str) -> int:
    """The block of ``blk.N...`` (-1 for the others): llama.cpp's loader visits tensors by block, then by name."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class _Chooser:
    """``llama_tensor_get_type_impl`` and the state it counts in (``quantize_state_impl``)."""

    def __init__(self, model: MixModel, ftype: LlamaFileType, names: Iterable[str]) -> None:
        self.m, self.ftype = model, ftype
        names = list(names)
        self.n_attention_wv = sum(_category(n) == "attn_v" for n in names)
        self.tied = "output.weight" not in names
        self.i_attention_wv = self.i_ffn_down = 0

    def _ffn_layer(self, counter: int, name: str) -> int:
        """The layer of an ffn_down tensor: its rank among them, or for a MoE model its ``blk.N``."""
        if max(1, self.m.n_expert) == 1:
            return counter
        layer = _layer(name)
        if not name.startswith("blk.") or not 0 <= layer < self.m.n_layer:
            raise InputError(f"{name}: not in a block 0..{self.m.n_layer - 1}; llama-quantize cannot place it")
        return layer

    def choose(self, name: str, ncols: int, new: GgmlType) -> GgmlType:
        m, f, cat, falcon = self.m, self.ftype, _category(name), self.m.arch == "falcon"
        if m.arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
            return T.Q8_0  # glm5-next keeps these at Q8_0 or above
        if cat == "output" or (self.tied and cat == "token_embd"):
            if falcon or ncols % _BLOCK[new]:
                return T.Q8_0
            return new if new == T.Q8_0 else T.Q6_K
        if cat == "attn_v":
            if f == F.MOSTLY_Q2_K:
                new = T.Q4_K if m.n_gqa >= 4 else T.Q3_K
            elif f == F.MOSTLY_Q3_K_M:
                new = T.Q5_K if self.i_attention_wv < 2 else T.Q4_K
            elif f == F.MOSTLY_Q3_K_L:
                new = T.Q5_K
            elif f in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(self.i_attention_wv, self.n_attention_wv):
                new = T.Q6_K
            elif f == F.MOSTLY_Q4_K_S and self.i_attention_wv < 4:
                new = T.Q5_K
            if m.is_70b and new in (T.Q3_K, T.Q4_K):
                new = T.Q5_K
            if m.n_expert == 8:
                new = T.Q8_0
            self.i_attention_wv += 1
        elif cat == "attn_k":
            if m.n_expert == 8:
                new = T.Q8_0
        elif cat == "ffn_down":
            i, n = self._ffn_layer(self.i_ffn_down, name), m.n_layer
            more = _use_more_bits(i, n)
            if f == F.MOSTLY_Q2_K:
                new = T.Q3_K
            elif f == F.MOSTLY_Q3_K_M:
                new = T.Q5_K if i < n // 16 else T.Q4_K if not falcon or more else T.Q3_K
            elif f == F.MOSTLY_Q3_K_L:
                new = T.Q4_K if falcon else T.Q5_K
            elif f == F.MOSTLY_Q4_K_M:
                if falcon:
                    new = T.Q6_K if i < n // 16 else T.Q5_K if more else T.Q4_K
                elif more:
                    new = T.Q6_K
            elif f == F.MOSTLY_Q5_K_M and more:
                new = T.Q6_K
            elif f == F.MOSTLY_Q4_K_S and not falcon and i < n // 8:
                new = T.Q5_K
            self.i_ffn_down += 1
        elif cat == "attn_output":
            if not falcon and m.n_expert == 8:
                if f in (F.MOSTLY_Q2_K, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M):
                    new = T.Q5_K
            elif not falcon:
                new = {F.MOSTLY_Q2_K: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q3_K_L: T.Q5_K}.get(f, new)
            elif f == F.MOSTLY_Q3_K_L:
                new = T.Q4_K
        return new


def _fallback(ncols: int, new: GgmlType) -> GgmlType:
    """``tensor_type_fallback``: rows that do not divide into ``new``'s blocks."""
    if ncols % _BLOCK[new] == 0:
        return new
    new = FALLBACK.get(new, new)
    return new if ncols % _BLOCK[new] == 0 else T.F16


def mix_types(model: MixModel, tensors: Iterable[tuple[str, tuple[int, ...]]],
              ftype: str | LlamaFileType) -> tuple[dict[str, GgmlType], LlamaFileType]:
    """The ggml type llama-quantize gives each tensor it quantizes for file type ``ftype`` (a name of
    ``FILE_TYPES`` or a ``LlamaFileType``), and the ``general.file_type`` it records. ``tensors`` are the
    GGUF names and shapes (ours: row length last) of every tensor of the file, including those it keeps (they
    count: output.weight unties the embedding, every attn_v is numbered); only those it quantizes are returned."""
    f = file_type(ftype) if isinstance(ftype, str) else LlamaFileType(ftype)
    if f not in DEFAULT_TYPE:
        raise UnsupportedError(f"file type {f.name}: wsurgery writes llama-quantize's {', '.join(FILE_TYPES)}")
    default = DEFAULT_TYPE[f]
    items = sorted(((name, tuple(shape)) for name, shape in tensors), key=lambda t: (_layer(t[0]), t[0]))
    chooser = _Chooser(model, f, (name for name, _ in items))
    types: dict[str, GgmlType] = {}
    for name, shape in items:
        if not allows_quantization(model.arch, name, shape):
            continue
        if default in _PLAIN:  # F16/BF16/F32 are not mixes: every weight in that type, no fallback
            types[name] = default
            continue
        ncols = shape[-1]
        types[name] = _fallback(ncols, chooser.choose(name, ncols, default))
    return types, f
