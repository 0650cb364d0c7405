"""What checkpoint files do not record about a model, read from transformers' naming: one truth.

Files hold tensors, not layer classes. Which weights are GPT-2's Conv1D (stored (in, out)), which
are embeddings, which are output or task heads, and which heads a tied checkpoint leaves out are
told from names and ``config.json``'s ``model_type``, here and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import InputError

#: transformers' model types whose projections are GPT-2's Conv1D, and those projections' names.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt", "clvp"})
CONV1D_LAYERS = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
#: Output heads (a Linear the size of the vocabulary): transformers' "output embeddings"; ``output`` is
#: Meta's original name, ``decoder`` BERT's MLM head (tied to the embeddings).
OUTPUT_HEADS = frozenset({"lm_head", "embed_out", "output", "decoder"})
#: Task heads: "the last module", which transformers keeps in full precision when it has no bias.
TASK_HEADS = frozenset({"score", "classifier", "qa_outputs"})
#: Input embeddings whose row count is ``config.json``'s ``vocab_size``.
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                            "tok_embeddings.weight", "shared.weight")
# nn.Embedding modules by their last name; ``embed_out`` is GPT-NeoX's output head, a Linear.
_EMBEDDING = re.compile(r"^(embed(?!_out$)\w*|wte|wpe|shared|word_embeddings|position_embeddings|"
                        r"token_type_embeddings|tok_embeddings|relative_attention_bias)$")


def last_name(module: str) -> str:
    return module.rpartition(".")[2]


def is_embedding(module: str) -> bool:
    return bool(_EMBEDDING.match(last_name(module)))


def is_output_head(module: str) -> bool:
    return last_name(module) in OUTPUT_HEADS


def uses_conv1d(config: Mapping[str, Any] | None) -> bool:
    return (config or {}).get("model_type") in CONV1D_MODEL_TYPES


def is_conv1d(module: str, config: Mapping[str, Any] | None) -> bool:
    """Whether ``module.weight`` is a Conv1D weight (stored (in, out), the transpose of a Linear's)."""
    return uses_conv1d(config) and last_name(module) in CONV1D_LAYERS


def tied_heads(tensors: Iterable[str], config: Mapping[str, Any] | None) -> dict[str, str]:
    """``{head module: input-embedding module}`` for top-level heads a tied checkpoint does not store."""
    if not (config or {}).get("tie_word_embeddings", True):
        return {}
    names = set(tensors)
    embeddings = [n for n in names if n.endswith(INPUT_EMBEDDING_SUFFIXES)]
    if len(embeddings) != 1:
        return {}
    embedding = embeddings[0].rpartition(".")[0]
    return {head: embedding for head in sorted(OUTPUT_HEADS) if f"{head}.weight" not in names}


def compile_skip(pattern: str) -> re.Pattern:
    """One ``--skip-modules`` regex, compiled before any work; InputError naming it if it is not one."""
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise InputError(f"--skip-modules {pattern!r} is not a valid regular expression ({e}); quote or escape it") \
            from None


def linear_weights(tensors: Mapping[str, Any], config: Mapping[str, Any] | None,
                   skip: Iterable[str] = ()) -> tuple[dict[str, bool], list[str]]:
    """The weights transformers' quantizers replace with quantized Linears (name -> is Conv1D), and the
    modules with 2-D weights left in full precision (for ``llm_int8_skip_modules``).

    2-D floating ``*.weight`` tensors except embeddings, output heads, bias-free task heads, and
    ``skip`` (regexes, searched in module paths). ``tensors`` maps names to infos with dtype and shape.
    """
    patterns = [compile_skip(p) for p in skip]
    modules = [n[: -len(".weight")] for n, t in tensors.items()
               if n.endswith(".weight") and len(t.shape) == 2 and t.dtype.is_floating_point]
    heads = {m for m in modules if is_output_head(m)
             or (last_name(m) in TASK_HEADS and f"{m}.bias" not in tensors)}
    chosen: dict[str, bool] = {}
    # A tied output head is not in the files but is a Linear in the model: keep it out of quantization too.
    kept: list[str] = [] if "lm_head" in modules else ["lm_head"]
    for m in modules:
        if m in heads or is_embedding(m) or any(p.search(m) for p in patterns):
            kept.append(m)
        else:
            chosen[f"{m}.weight"] = is_conv1d(m, config)
    return chosen, kept
