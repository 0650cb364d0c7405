#!/usr/bin/env python
"""What the engine's finiteness check costs: merge of a ~125M-parameter bf16 Llama with a rank-16
LoRA on every linear layer (56 changed tensors, 75M weights), timed with the engine as it is
(``chunked``: each chunk's min/max taken just before the chunk is rounded) and with the check
swapped out for the plain cast it replaced (``plain``); for comparison, a cast then one reduction
over the whole output (``whole+check``, an extra read of the output) and the chunked check run on one
intra-op thread (``chunked-1thread``). Runs alternate; min and median are printed (the median shows
how other work on the CPUs slows each variant, the min what it costs on quiet CPUs).

Usage (from the repository root): ``python scripts/bench_finite_check.py [RUNS] [THREADS]``
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import wsurgery
import wsurgery.engine as engine

ROOT = Path("bench-work/finite-check")


def make_inputs() -> None:
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from oracle import make_adapter, save_base

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    save_base(model, ROOT / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    make_adapter(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets), ROOT / "lora")


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    if not (ROOT / "lora").exists():
        make_inputs()
    checked = engine._rounded_finite

    def plain(scratch, t, dtype, plan, name, fits=None, unchanged=None):
        return scratch.cast("out", t, dtype)

    def whole(scratch, t, dtype, plan, name, fits=None, unchanged=None):
        out = scratch.cast("out", t, dtype)
        low, high = torch.aminmax(out)
        assert bool(torch.isfinite(low)) and bool(torch.isfinite(high))
        return out

    def one_thread(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return checked(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    variants = {"plain": plain, "chunked": checked, "whole+check": whole, "chunked-1thread": one_thread}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            engine._rounded_finite = fn
            start = time.perf_counter()
            wsurgery.merge(ROOT / "base", ROOT / "lora", ROOT / "out", overwrite=True, progress=False)
            times[name].append(time.perf_counter() - start)
    engine._rounded_finite = checked
    print(f"{torch.get_num_threads()} intra-op threads, {runs} runs each")
    for name, ts in times.items():
        print(f"{name:16s} min {min(ts):.3f} s  median {statistics.median(ts):.3f} s")


if __name__ == "__main__":
    main()
