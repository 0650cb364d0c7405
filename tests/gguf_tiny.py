"""A tiny Llama in transformers, and the GGUF file llama.cpp's converter would make of it.

``write_llama_gguf`` does what ``convert_hf_to_gguf.py`` does for ``LlamaForCausalLM``: the
hyperparameter and tokenizer key/values llama.cpp reads, tensors renamed with gguf's
``TensorNameMap``, Q and K rows interleaved per head (``LlamaModel.permute``), norms in F32 and the
other weights in the chosen type. It is independent of wsurgery; the tests check it against
transformers' own GGUF loader and, where llama-cpp-python is installed, against llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

VOCAB = 128


def tiny_llama(seed: int = 0, tie: bool = False, dtype=torch.float32):
    """Row lengths (64, 128) divide into every ggml block size up to 32 (Q8_0, Q4_0, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # non-trivial norms, so that a norm mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape))
    return model


def tiny_model(arch: str, seed: int = 0):
    """A tiny model of another architecture wsurgery reads from GGUF (qwen2, qwen3, gemma2, gemma3)."""
    import transformers

    config = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
              "gemma2": transformers.Gemma2Config, "gemma3": transformers.Gemma3TextConfig}[arch]
    torch.manual_seed(seed)
    cfg = config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=arch != "qwen2")
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn(p.shape))
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: Path, weight_type: T = T.F32, types: dict[str, T] | None = None) -> Path:
    """Convert ``model`` as llama.cpp does; ``types`` overrides the type of single GGUF tensors. Besides
    Llama (Q/K interleaved), Qwen2/3 (renamed only) and Gemma2/3 (norms stored + 1)."""
    cfg = model.config
    arch = {"gemma3_text": "gemma3"}.get(cfg.model_type, cfg.model_type)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    w.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])  # Gemma3: per attention type
    w.add_vocab_size(cfg.vocab_size)
    if arch.startswith("gemma"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg.sliding_window)
    w.add_file_type({T.F32: 0, T.F16: 1, T.Q8_0: 7, T.Q4_0: 2}.get(weight_type, 0))
    tokens = ["<unk>", "<s>", "</s>"] + [f"\u2581t{i}" for i in range(cfg.vocab_size - 3)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    name_map = gguf.TensorNameMap(arch_id, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp's converter stores a tied head once, as token_embd
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        data = t.float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        elif arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1
        kind = (types or {}).get(gguf_name, T.F32 if data.ndim == 1 else weight_type)
        if kind == T.F32:
            w.add_tensor(gguf_name, data)
        elif kind == T.F16:
            w.add_tensor(gguf_name, data.astype(np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
