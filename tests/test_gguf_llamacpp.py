"""Proof with the real consumer: llama.cpp runs what wsurgery writes, and its converter agrees with ours.

(0) llama.cpp on the test's GGUF base computes what transformers computes on the HF model (the test
    converter is right); (1) llama.cpp on our merged GGUF equals llama.cpp on the base with our GGUF
    LoRA applied at run time; (2) both equal transformers on PEFT's merged model, at f32 and f16, and
    within quantization error at Q8_0; (3) our GGUF LoRA equals what llama.cpp's own
    ``convert_lora_to_gguf.py`` writes for the same adapter.

llama.cpp comes from ``xllamacpp`` (a dev dependency): prebuilt CPU wheels of llama.cpp's server. Building
llama-cpp-python from source instead took more than 40 minutes on this project's 2-core CI machine.
The server answers with log-probabilities, not logits; a log-softmax loses nothing the comparison needs
(it is the logits up to one constant per position). (3) needs llama.cpp's source tree (``LLAMA_CPP_SRC``,
see ``scripts/fetch_llama_cpp_src.sh``) and is skipped without it.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import xllamacpp
from gguf import GGMLQuantizationType as T
from gguf_tiny import VOCAB, tiny_llama, write_llama_gguf
from oracle import make_adapter, oracle_merge, save_base
from peft import LoraConfig

import wsurgery

LLAMA_CPP_SRC = os.environ.get("LLAMA_CPP_SRC")  # a llama.cpp source tree (with convert_lora_to_gguf.py)
TOKENS = [1, 5, 17, 42, 99, 3, 64, 120, 7, 88]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama_cpp_logits(model, lora=None) -> np.ndarray:
    """llama.cpp's log-probabilities of the whole vocabulary after each prefix of TOKENS: (len, vocab)."""
    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    if lora:
        params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(lora), 1.0)]
    params.n_ctx = params.n_batch = 32
    params.cpuparams.n_threads = 2
    # float32 KV cache and no flash attention: llama.cpp's defaults round through f16 on the CPU.
    params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
    params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.warmup = False
    server = xllamacpp.Server(params)
    rows = np.full((len(TOKENS), VOCAB), np.nan)
    for n in range(1, len(TOKENS) + 1):  # a prompt of token ids is taken as it is (no BOS added)
        answer = server.handle_completions({"prompt": TOKENS[:n], "max_tokens": 1, "n_probs": VOCAB,
                                            "temperature": 0, "cache_prompt": False})
        for entry in answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]:
            rows[n - 1, entry["id"]] = entry["logprob"]
    assert not np.isnan(rows).any(), "llama.cpp did not return the whole vocabulary's log-probabilities"
    return rows


def _transformers_logits(model) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model.float()(torch.tensor([TOKENS])).logits[0].double(), -1).numpy()


def _close(got: np.ndarray, want: np.ndarray, rel: float, what: str) -> None:
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rel, f"{what}: max error {err:.3g} of the log-probabilities' scale (allowed {rel})"


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


@pytest.mark.parametrize("kind, rel", [(T.F32, 1e-5), (T.F16, 5e-3)], ids=["f32", "f16"])
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
    """Q8_0 base: merged-and-requantized, and the LoRA at run time over the same Q8_0 base, are each as close
    to PEFT's merge as llama.cpp on PEFT's merged weights rounded to Q8_0 once (measured here, not assumed;
    a 2 % error in the adapter's scale is three times that)."""
    root, model, lora, merged = w
    base = write_llama_gguf(model, root / "base-q8.gguf", T.Q8_0)
    wsurgery.merge(base, lora, root / "merged-q8.gguf", progress=False)
    wsurgery.api.export_gguf_lora(lora, root / "lora-f32.gguf", base)
    reference = _transformers_logits(merged)
    direct = write_llama_gguf(merged, root / "peft-merged-q8.gguf", T.Q8_0)
    rounding = np.abs(_llama_cpp_logits(direct) - reference).max() / np.abs(reference).max()
    ours_merged = _llama_cpp_logits(root / "merged-q8.gguf")
    ours_runtime = _llama_cpp_logits(base, root / "lora-f32.gguf")
    _close(ours_merged, ours_runtime, 1.5 * rounding, "merged Q8_0 GGUF vs Q8_0 base + GGUF LoRA (llama.cpp)")
    _close(ours_merged, reference, 1.5 * rounding, "merged Q8_0 GGUF (llama.cpp) vs PEFT merge (transformers)")
    _close(ours_runtime, reference, 1.5 * rounding, "Q8_0 base + GGUF LoRA (llama.cpp) vs PEFT merge (transformers)")


@pytest.mark.skipif(not LLAMA_CPP_SRC, reason="LLAMA_CPP_SRC (a llama.cpp source tree) is not set")
def test_our_gguf_lora_equals_llama_cpps_converter(w, tmp_path):
    """One scale for every module (llama.cpp's converter ignores rank/alpha patterns): the same tensors,
    byte for byte, including the transposed embedding A and the permuted Q/K B rows."""
    _, model, _, _ = w
    base = save_base(model, tmp_path / "hf")
    lora = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=[*LINEAR, "lm_head", "embed_tokens"]),
                        tmp_path / "lora")
    subprocess.run([sys.executable, os.path.join(LLAMA_CPP_SRC, "convert_lora_to_gguf.py"), "--base", str(base),
                    "--outfile", str(tmp_path / "theirs.gguf"), str(lora)], check=True, capture_output=True)
    wsurgery.api.export_gguf_lora(lora, tmp_path / "ours.gguf", write_llama_gguf(model, tmp_path / "base.gguf"))
    theirs, ours = (gguf.GGUFReader(tmp_path / f) for f in ("theirs.gguf", "ours.gguf"))
    assert {t.name: (t.tensor_type, list(t.shape), t.data.tobytes()) for t in ours.tensors} == \
           {t.name: (t.tensor_type, list(t.shape), t.data.tobytes()) for t in theirs.tensors}
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
