"""A Hugging Face ``config.json`` from a GGUF file's key/values, so that a GGUF file turned into
safetensors (``dequantize``, a merge into a folder) is a model folder transformers loads.

Only for architectures whose every hyperparameter the key/values carry (Llama/Mistral, Qwen2, Qwen3)
and without rope scaling: llama.cpp keeps Llama 3's rope scaling as a computed ``rope_freqs`` tensor,
not as the parameters transformers needs, and Gemma's soft-capping and attention scalars are
hard-coded in llama.cpp rather than stored. For those no config is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .gguf_header import KvValue

#: llama.cpp architecture -> (config.json model_type, architectures entry)
_MODELS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}


def _float(value: str | float) -> float:
    """A float32 key/value as the decimal it was written from (1e-06, not 9.999999974752427e-07)."""
    return float(str(np.float32(value)))


def hf_config(arch: str, kv: Mapping[str, KvValue], tensor_names: Iterable[str],
              vocab_rows: int | None) -> dict | None:
    """The config.json transformers needs to load the tensors of this GGUF file, or None where the
    key/values do not determine it (see the module docstring). ``vocab_rows``: the token embedding's
    rows (the header parser keeps no array values, so not the token list's length)."""
    if arch not in _MODELS or any(k.startswith(f"{arch}.rope.scaling.") for k in kv):
        return None
    names = set(tensor_names)
    if "rope_freqs.weight" in names:
        return None

    def get(key: str) -> KvValue:
        return kv.get(f"{arch}.{key}")

    def positive(key: str) -> int | None:
        value = get(key)
        return value if isinstance(value, int) and value > 0 else None

    hidden, heads, layers = positive("embedding_length"), positive("attention.head_count"), positive("block_count")
    if hidden is None or heads is None or layers is None or positive("feed_forward_length") is None:
        return None
    model_type, architecture = _MODELS[arch]
    config: dict[str, object] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv") or heads,
        "head_dim": get("attention.key_length") or get("rope.dimension_count") or hidden // heads,
        "rms_norm_eps": _float(get("attention.layer_norm_rms_epsilon") or 1e-6),
        "rope_theta": _float(get("rope.freq_base") or 10000.0),
        "max_position_embeddings": get("context_length") or 2048,
        "tie_word_embeddings": "lm_head.weight" not in names,
        "hidden_act": "silu",
    }
    if vocab_rows:
        config["vocab_size"] = vocab_rows
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
        value = kv.get(f"tokenizer.ggml.{gguf_key}")
        if isinstance(value, int):
            config[key] = value
    return config
