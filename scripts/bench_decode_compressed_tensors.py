"""Decode throughput: wsurgery's compressed-tensors decoder vs compressed-tensors' own decompressor.

One 4096x4096 bfloat16 weight, compressed by compressed-tensors as W4A16 (pack-quantized, int4,
group 128, symmetric) and as FP8 per channel (float-quantized); each decoded 5 times by both, from
the same tensors in memory (and ours once more from the saved file, as ``Checkpoint.read`` does).
Prints the median seconds, GB/s of decoded bf16 output, and the ratio ours/theirs (< 1: ours faster).
The outputs are checked identical before timing. Needs compressed-tensors (a test dependency).

    python scripts/bench_decode_compressed_tensors.py [--size 4096] [--runs 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file

from wsurgery.checkpoint import open_checkpoint

SCHEMES = {
    "W4A16 g128 (pack-quantized)": ("pack-quantized",
                                    {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}),
    "FP8 per channel (float-quantized)": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel"}),
}


def _compress(w: torch.Tensor, fmt: str, weights: dict) -> tuple[QuantizationScheme, dict[str, torch.Tensor]]:
    args = QuantizationArgs(**weights)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    if args.strategy == "group":
        g = w.unflatten(-1, (w.shape[1] // args.group_size, args.group_size))
        lo, hi = g.amin(-1), g.amax(-1)
    else:
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale, zp = calculate_qparams(lo, hi, args)
    local = BaseCompressor.get_value_from_registry(fmt).compress(
        {"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    return scheme, local


def _median(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    w = (torch.randn(a.size, a.size) * 0.02).to(torch.bfloat16)
    out_gb = w.numel() * 2 / 1e9
    print(f"{a.size}x{a.size} bf16, median of {a.runs}, torch threads {torch.get_num_threads()}")
    for label, (fmt, weights) in SCHEMES.items():
        t_ours, t_theirs, t_file = _bench(w, fmt, weights, a.runs)
        print(f"{label}: ours {t_ours * 1e3:.1f} ms ({out_gb / t_ours:.2f} GB/s), compressed-tensors "
              f"{t_theirs * 1e3:.1f} ms ({out_gb / t_theirs:.2f} GB/s), ratio ours/theirs {t_ours / t_theirs:.2f}; "
              f"ours from the file {t_file * 1e3:.1f} ms")


def _bench(w: torch.Tensor, fmt: str, weights: dict, runs: int) -> tuple[float, float, float]:
    """Median seconds: ours from memory, compressed-tensors from memory, ours through ``Checkpoint.read``."""
    scheme, local = _compress(w, fmt, weights)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_file({f"m.{k}": v.contiguous() for k, v in local.items()}, folder / "model.safetensors")
        q = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
             "ignore": [], "config_groups": {"g": {"targets": ["Linear"], "format": fmt,
                                                   "weights": scheme.weights.model_dump(mode="json")}}}
        (folder / "config.json").write_text(json.dumps({"quantization_config": q}))
        ckpt = open_checkpoint(folder)
        info = ckpt.tensors["m.weight"]
        parts = {p.name: local[p.name[2:]] for p in info.parts.values()}

        def read(part, rows=None):
            t = parts[part.name]
            return t if rows is None else t[rows[0]:rows[1]]

        def ours():
            return info.encoding.decode(info, read)

        def theirs():
            return compressor.decompress(local, scheme)["weight"]

        assert torch.equal(ours().view(torch.int16), theirs().view(torch.int16)), "outputs differ"
        return _median(ours, runs), _median(theirs, runs), _median(lambda: ckpt.read("m.weight"), runs)


if __name__ == "__main__":
    main()
