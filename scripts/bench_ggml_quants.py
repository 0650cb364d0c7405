#!/usr/bin/env python
"""ggml quantizers: ours (``wsurgery.quant.ggml_types``) against ggml's own, and a merge into GGUF against
the same merge into safetensors.

1. Per ggml type, the same float32 weight-like matrix quantized by ours and by ggml's
   ``ggml_quantize_chunk`` (the ``xllamacpp`` wheel's library, through ctypes, one thread, no importance
   matrix; what llama-quantize runs), and by the ``gguf`` package where it has a quantizer: median MB/s
   (float32 input) of ``--repeats`` runs each, interleaved. Every run's bytes are checked equal to ggml's.
2. ``wsurgery merge BASE.gguf ADAPTER out.gguf`` against ``wsurgery merge BASE.gguf ADAPTER out/``
   (safetensors) on a synthetic Qwen2-0.5B-shaped Q8_0 GGUF (24 layers, hidden 896, vocab 151936; random
   weights written by llama.cpp's converter's rules, ``tests/gguf_tiny.py``) and a rank-16 LoRA on the 7
   linear layers, each merge in a subprocess, median wall time of ``--repeats``; the goal: the GGUF
   output within 1.5x of the safetensors one. Generated once under ``bench-work/ggml/``.

    python scripts/bench_ggml_quants.py            # both parts, 5 repeats
    python scripts/bench_ggml_quants.py --quick    # smaller matrix, 4-layer model, 3 repeats
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from wsurgery.quant.ggml_types import QUANTIZERS, quantize

WORK = ROOT / "bench-work" / "ggml"
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ggml():
    import xllamacpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(xllamacpp.__file__), "xllamacpp.abi3.so"))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t

    def run(x: np.ndarray, t: T) -> np.ndarray:
        block, size = GGML_QUANT_SIZES[t]
        out = np.empty((x.shape[0], x.shape[1] // block * size), np.uint8)
        lib.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out

    return run


def _gguf_has(t: T) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, GGML_QUANT_SIZES[t][0]), np.float32), t)
    except NotImplementedError:
        return False
    return True


def bench_quantizers(rows: int, cols: int, repeats: int) -> list[dict]:
    ggml = _ggml()
    x = (np.random.default_rng(0).standard_normal((rows, cols)) * 0.02).astype(np.float32)
    mb = x.nbytes / 1e6
    results = []
    for t in TYPES:
        variants = {"ours": lambda t=t: quantize(x, t), "ggml": lambda t=t: ggml(x, t)}
        if _gguf_has(t):
            variants["gguf"] = lambda t=t: gguf.quants.quantize(x, t)
        times: dict[str, list[float]] = {k: [] for k in variants}
        expected = ggml(x, t)
        for _ in range(repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                got = run()
                times[name].append(time.perf_counter() - start)
                assert np.array_equal(got, expected), f"{t.name}: {name}'s bytes differ from ggml's"
        row = {"type": t.name, **{f"{k}_MBps": round(mb / statistics.median(v), 1) for k, v in times.items()}}
        row["ours_vs_ggml"] = round(row["ggml_MBps"] / row["ours_MBps"], 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def _config(layers: int, vocab: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True, rms_norm_eps=1e-6)


def ensure_model(layers: int, vocab: int) -> tuple[Path, Path]:
    """A Q8_0 GGUF of random Qwen2-shaped weights and a rank-16 LoRA in PEFT's files, generated once."""
    from gguf_tiny import write_llama_gguf
    from safetensors.torch import save_file

    folder = WORK / f"qwen2-{layers}l-{vocab}v"
    base, adapter = folder / "base-q8_0.gguf", folder / "lora"
    if base.exists() and (adapter / "adapter_model.safetensors").exists():
        return base, adapter
    folder.mkdir(parents=True, exist_ok=True)
    config = _config(layers, vocab)
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(vocab, 896, generator=gen) * 0.02,
                                      "model.norm.weight": torch.ones(896)}
    shapes = {"q_proj": (896, 896), "k_proj": (128, 896), "v_proj": (128, 896), "o_proj": (896, 896),
              "gate_proj": (4864, 896), "up_proj": (4864, 896), "down_proj": (896, 4864)}
    lora: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for m, shape in shapes.items():
            kind = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            state[f"model.layers.{i}.{kind}.{m}.weight"] = torch.randn(shape, generator=gen) * 0.02
            prefix = f"base_model.model.model.layers.{i}.{kind}.{m}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(16, shape[1], generator=gen) * 0.02
            lora[f"{prefix}.lora_B.weight"] = torch.randn(shape[0], 16, generator=gen) * 0.02
        for m in ("q_proj", "k_proj", "v_proj"):
            state[f"model.layers.{i}.self_attn.{m}.bias"] = torch.zeros(shapes[m][0])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{norm}.weight"] = torch.ones(896)
    fake = SimpleNamespace(config=config, state_dict=lambda: state)
    with mock.patch.object(gguf.quants, "quantize", quantize):  # ours: byte-identical, faster
        write_llama_gguf(fake, base, T.Q8_0)
    adapter.mkdir(exist_ok=True)
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": LINEAR, "task_type": "CAUSAL_LM",
         "base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False}))
    return base, adapter


#: how each variant starts the CLI; "gguf-package" is the GGUF merge as it was before ggml_types: every
#: type through the gguf package's quantizers (the same bytes).
_CLI = "from wsurgery.cli import main; main()"
_STARTS = {"gguf": _CLI, "safetensors": _CLI,
           "gguf-package": "import wsurgery.quant.ggml_types as g; g.QUANTIZERS.clear(); " + _CLI}


def bench_merge(layers: int, vocab: int, repeats: int) -> dict:
    base, adapter = ensure_model(layers, vocab)
    outs = {"gguf": base.parent / "out.gguf", "safetensors": base.parent / "out-st",
            "gguf-package": base.parent / "out-package.gguf"}
    times: dict[str, list[float]] = {k: [] for k in outs}
    for _ in range(repeats):
        for name, out in outs.items():
            subprocess.run(["rm", "-rf", str(out)], check=True)
            subprocess.run(["sync"], check=True)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", _STARTS[name], "merge", str(base), str(adapter), str(out), "--quiet"],
                           check=True)
            times[name].append(time.perf_counter() - start)
    assert outs["gguf"].read_bytes() == outs["gguf-package"].read_bytes(), "ours and the gguf package's differ"
    row = {"model": base.parent.name, "base_MB": round(base.stat().st_size / 1e6),
           **{f"{k}_s": round(statistics.median(v), 2) for k, v in times.items()}}
    row["gguf_vs_safetensors"] = round(row["gguf_s"] / row["safetensors_s"], 2)
    row["gguf_package_vs_safetensors"] = round(row["gguf-package_s"] / row["safetensors_s"], 2)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller matrix and a 4-layer model, 3 repeats")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--only", choices=["quantizers", "merge"])
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(1)
    results: dict[str, object] = {"quantizer_types": [t.name for t in QUANTIZERS]}
    if args.only != "merge":
        results["quantizers"] = bench_quantizers(*((64, 4096) if args.quick else (256, 8192)), repeats)
    if args.only != "quantizers":
        results["merge"] = bench_merge(*((4, 32000) if args.quick else (24, 151936)), repeats)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / f"results{'-quick' if args.quick else ''}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
