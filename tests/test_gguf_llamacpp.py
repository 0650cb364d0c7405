"""Proof with the real consumer: llama.cpp (through llama-cpp-python) runs what wsurgery writes.

(0) llama.cpp on the test's GGUF base computes what transformers computes on the HF model (the test
    converter is right); (1) llama.cpp on our merged GGUF equals llama.cpp on the base with our GGUF
    LoRA applied at run time; (2) both equal transformers on PEFT's merged model, at f32 and f16, and
    within quantization error at Q8_0. Skipped where llama-cpp-python is not installed (it builds
    llama.cpp from source, longer than this project's CI budget; see README).
"""

from __future__ import annotations

import copy

import pytest

llama_cpp = pytest.importorskip("llama_cpp")  # before the heavy imports: a skip costs nothing

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf_tiny import tiny_llama, write_llama_gguf
from oracle import make_adapter, oracle_merge
from peft import LoraConfig

import wsurgery

TOKENS = [1, 5, 17, 42, 99, 3, 64, 120, 7, 88]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama_cpp_logits(model, lora=None) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=32, n_batch=32,
                          logits_all=True, n_threads=2, n_gpu_layers=0, verbose=False)
    try:
        llm.eval(TOKENS)
        return np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    finally:
        llm.close()


def _transformers_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model.float()(torch.tensor([TOKENS])).logits[0].double().numpy()


def _close(got: np.ndarray, want: np.ndarray, rel: float, what: str) -> None:
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rel, f"{what}: max error {err:.3g} of the logits' scale (allowed {rel})"


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcpp")
    model = tiny_llama()
    lora = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=[*LINEAR, "lm_head", "embed_tokens"],
                                          rank_pattern={"q_proj": 8}, alpha_pattern={"down_proj": 3}),
                        root / "lora")
    merged = copy.deepcopy(model)
    merged.load_state_dict(oracle_merge(copy.deepcopy(model), lora))
    return root, model, lora, merged


@pytest.mark.parametrize("kind, rel", [(T.F32, 1e-4), (T.F16, 5e-3)], ids=["f32", "f16"])
def test_llama_cpp_runs_our_merge_and_our_lora_like_transformers_runs_peft(w, kind, rel):
    root, model, lora, merged = w
    base = write_llama_gguf(model, root / f"base-{kind.name}.gguf", kind)
    _close(_llama_cpp_logits(base), _transformers_logits(model), rel, "llama.cpp base vs transformers base")
    wsurgery.merge(base, lora, root / f"merged-{kind.name}.gguf", progress=False)
    wsurgery.api.export_gguf_lora(lora, root / f"lora-{kind.name}.gguf", base, gguf_type=kind.name.lower())
    ours_merged = _llama_cpp_logits(root / f"merged-{kind.name}.gguf")
    ours_runtime = _llama_cpp_logits(base, root / f"lora-{kind.name}.gguf")
    reference = _transformers_logits(merged)
    assert np.abs(reference - _transformers_logits(model)).max() > 10 * rel * np.abs(reference).max(), \
        "the adapter barely changes the logits; the comparison would prove nothing"
    _close(ours_merged, ours_runtime, rel, "merged GGUF vs base + GGUF LoRA (llama.cpp)")
    _close(ours_merged, reference, rel, "merged GGUF (llama.cpp) vs PEFT merge (transformers)")
    _close(ours_runtime, reference, rel, "GGUF LoRA at run time (llama.cpp) vs PEFT merge (transformers)")


def test_llama_cpp_on_a_q8_0_merge(w):
    """Q8_0 base: merged-and-requantized vs the LoRA at run time over the same Q8_0 base."""
    root, model, lora, merged = w
    base = write_llama_gguf(model, root / "base-q8.gguf", T.Q8_0)
    wsurgery.merge(base, lora, root / "merged-q8.gguf", progress=False)
    wsurgery.api.export_gguf_lora(lora, root / "lora-f32.gguf", base)
    reference = _transformers_logits(merged)
    _close(_llama_cpp_logits(root / "merged-q8.gguf"), _llama_cpp_logits(base, root / "lora-f32.gguf"), 3e-2,
           "merged Q8_0 GGUF vs Q8_0 base + GGUF LoRA (llama.cpp)")
    _close(_llama_cpp_logits(root / "merged-q8.gguf"), reference, 3e-2, "merged Q8_0 GGUF vs PEFT merge")
