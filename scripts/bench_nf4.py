#!/usr/bin/env python
"""Benchmark wsurgery's bitsandbytes 4-bit quantize/dequantize against bitsandbytes itself.

CPU (default): ``wsurgery.quant.quantize_4bit`` / ``dequantize_4bit`` against bitsandbytes'
``quantize_4bit`` / ``dequantize_4bit`` on Llama-sized weights (4096x4096, 11008x4096) in bf16, fp16
and fp32, NF4, blocksize 64, double quantization (transformers' QLoRA defaults). Each case is warmed
up, then timed ``--runs`` times with the four calls interleaved (so that other work on a shared
machine hits both sides alike); the table gives medians as GB/s of the original weight (numel x
itemsize per second, for quantize and dequantize alike) and the ratio ours / bitsandbytes.

CUDA (``--device cuda``): the same calls on the GPU, reported as GB/s counting bytes read and
written (weight, packed bytes, absmax) and as % of the device's copy bandwidth, measured in the same
run with a large ``tensor.copy_``; the Triton kernels alone (no double quantization, no checks, CUDA
events around each launch as ``triton.testing.do_bench`` takes them) are timed too, and bitsandbytes'
CUDA kernels when bitsandbytes imports with CUDA.

``--check-cuda`` asserts that the CUDA path stores the same bytes and dequantizes to the same
values as the CPU path, on many shapes, dtypes, blocksizes and both quant types.

CPU dequantization runs in the compiled kernel (``bnb4bit_native``) where it is built;
``--no-native`` times the torch fallback instead.

    python scripts/bench_nf4.py [--runs 7] [--threads 1] [--no-native] [--json out.json]
    python scripts/bench_nf4.py --device cuda [--json out.json]
    python scripts/bench_nf4.py --check-cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wsurgery.quant import bnb4bit, bnb4bit_native, dequantize_4bit, quantize_4bit

SHAPES = [(4096, 4096), (11008, 4096)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def median_seconds(calls: dict[str, Callable[[], object]], runs: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median wall time of each call, after one warm-up each; the calls alternate within every run."""
    for call in calls.values():
        call()
    sync()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def load_bitsandbytes(device: str):
    """bitsandbytes.functional, or None where it does not import (or has no CUDA backend for ``cuda``)."""
    try:
        import bitsandbytes.functional as bnb_functional
        if device == "cuda":
            probe, state = bnb_functional.quantize_4bit(torch.ones(64, device="cuda"), quant_type="nf4")
            bnb_functional.dequantize_4bit(probe, state)
        return bnb_functional
    except Exception as exc:  # a missing library, or one without kernels for this device
        print(f"bitsandbytes not used on {device}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def weight(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype).to(device)


def bench_cpu(args: argparse.Namespace) -> list[dict]:
    bnb = load_bitsandbytes("cpu")
    if args.no_native:
        bnb4bit_native.supported_isas = lambda: ()
    isas = bnb4bit_native.supported_isas()
    print(f"dequantize: {'compiled kernel, ' + isas[0] if isas else 'torch ops'}; {torch.get_num_threads()} threads")
    rows = []
    for shape in SHAPES:
        for dtype_name in args.dtypes:
            w = weight(shape, DTYPES[dtype_name], "cpu")
            parts, _ = quantize_4bit(w, blocksize=args.blocksize, double_quant=not args.no_double_quant)
            calls = {"ours_quantize": lambda: quantize_4bit(w, blocksize=args.blocksize,
                                                            double_quant=not args.no_double_quant),
                     "ours_dequantize": lambda: dequantize_4bit(parts, where="w")}
            if bnb is not None:
                packed, state = bnb.quantize_4bit(w, blocksize=args.blocksize, quant_type="nf4",
                                                  compress_statistics=not args.no_double_quant)
                calls["bnb_quantize"] = lambda: bnb.quantize_4bit(w, blocksize=args.blocksize, quant_type="nf4",
                                                                  compress_statistics=not args.no_double_quant)
                calls["bnb_dequantize"] = lambda: bnb.dequantize_4bit(packed, state)
            seconds = median_seconds(calls, args.runs, lambda: None)
            gigabytes = w.numel() * w.element_size() / 1e9
            row = {"shape": list(shape), "dtype": dtype_name, "threads": torch.get_num_threads(),
                   "dequantize_path": isas[0] if isas else "torch",
                   **{f"{name}_s": value for name, value in seconds.items()},
                   **{f"{name}_GBps": gigabytes / value for name, value in seconds.items()}}
            rows.append(row)
            print_cpu_row(row)
    return rows


def print_cpu_row(row: dict) -> None:
    if "bnb_quantize_s" not in row:
        print(f"{'x'.join(map(str, row['shape'])):>11} {row['dtype']:>5}  "
              f"quantize {row['ours_quantize_GBps']:6.2f} GB/s  dequantize {row['ours_dequantize_GBps']:6.2f} GB/s")
        return
    for op in ("quantize", "dequantize"):
        ours, theirs = row[f"ours_{op}_GBps"], row[f"bnb_{op}_GBps"]
        print(f"{'x'.join(map(str, row['shape'])):>11} {row['dtype']:>5} {op:>10}  ours {ours:7.2f} GB/s "
              f"({row[f'ours_{op}_s'] * 1e3:8.1f} ms)  bitsandbytes {theirs:7.2f} GB/s "
              f"({row[f'bnb_{op}_s'] * 1e3:8.1f} ms)  ratio {ours / theirs:5.2f}x")


def copy_bandwidth(runs: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read and written."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    seconds = median_seconds({"copy": lambda: target.copy_(source)}, runs, torch.cuda.synchronize)["copy"]
    return 2 * source.numel() / seconds / 1e9


def traffic_bytes(w: torch.Tensor, blocksize: int) -> int:
    """Bytes one quantize (or dequantize) reads and writes: the weight, the packed codes, the float32 absmax."""
    return w.numel() * w.element_size() + w.numel() // 2 + w.numel() // blocksize * 4


def bench_cuda(args: argparse.Namespace) -> dict:
    import triton.testing

    from wsurgery.quant import bnb4bit_triton

    bandwidth = copy_bandwidth(args.runs)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth:.0f} GB/s (read + write)")
    bnb = load_bitsandbytes("cuda")
    double_quant = not args.no_double_quant
    rows = []
    for shape in SHAPES:
        for dtype_name in args.dtypes:
            w = weight(shape, DTYPES[dtype_name], "cuda")
            n, blocksize = w.numel(), args.blocksize
            parts, state = quantize_4bit(w, blocksize=blocksize, double_quant=double_quant)
            packed = torch.empty(n // 2, dtype=torch.uint8, device="cuda")
            absmax = torch.empty(n // blocksize, device="cuda")
            out = torch.empty(n, dtype=w.dtype, device="cuda")
            redo = torch.empty(n // blocksize, dtype=torch.int8, device="cuda")
            kernels = {
                "kernel_quantize": lambda: bnb4bit_triton.launch_quantize(w.view(-1), blocksize, "nf4", packed, absmax,
                                                                          redo),
                "kernel_dequantize": lambda: bnb4bit_triton.launch_dequantize(packed, absmax, blocksize, "nf4", out),
            }
            calls = {"ours_quantize": lambda: quantize_4bit(w, blocksize=blocksize, double_quant=double_quant),
                     "ours_dequantize": lambda: dequantize_4bit(parts, where="w")}
            if bnb is not None:
                bnb_packed, bnb_state = bnb.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                                          compress_statistics=double_quant)
                calls["bnb_quantize"] = lambda: bnb.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                                                  compress_statistics=double_quant)
                calls["bnb_dequantize"] = lambda: bnb.dequantize_4bit(bnb_packed, bnb_state)
            seconds = median_seconds(calls, args.runs, torch.cuda.synchronize)
            # Kernel time alone: CUDA events around each launch, L2 flushed in between (triton's do_bench).
            seconds.update({name: triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median") / 1e3
                            for name, call in kernels.items()})
            moved = traffic_bytes(w, blocksize)
            row = {"shape": list(shape), "dtype": dtype_name, "copy_GBps": bandwidth}
            for name, value in seconds.items():
                row[f"{name}_us"] = value * 1e6
                row[f"{name}_GBps"] = moved / value / 1e9
                row[f"{name}_pct_of_copy"] = 100 * moved / value / 1e9 / bandwidth
                print(f"{'x'.join(map(str, shape)):>11} {dtype_name:>5} {name:>18} {value * 1e6:9.1f} us "
                      f"{moved / value / 1e9:7.0f} GB/s {row[f'{name}_pct_of_copy']:5.1f}% of copy")
            rows.append(row)
    return {"device": torch.cuda.get_device_name(), "copy_GBps": bandwidth, "rows": rows}


CHECK_SHAPES = [((4096, 4096), 64), ((11008, 4096), 128), ((96, 80), 64), ((7,), 32), ((1, 4096), 4096),
                ((4097, 3), 128), ((3, 2049), 2048), ((33, 65), 256), ((1,), 64), ((130, 130), 32),
                ((512, 1024), 1024), ((64, 48), 512)]


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Rows that probe ties at every midpoint, zero blocks, ±absmax, subnormals and the largest values."""
    rows = [torch.zeros(64), torch.full((64,), -3.0), torch.tensor([1.0, 1e-40, -1e-42, 3e-39] * 16),
            torch.tensor([1e-39, -1e-40, 1e-45, 0.0] * 16)]
    for quant_type in ("nf4", "fp4"):
        bounds = bnb4bit.midpoints(quant_type)
        around = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)),
                            torch.nextafter(bounds, torch.tensor(-2.0))])
        rows.append(torch.cat([torch.tensor([1.0]), around, torch.zeros(64 - 1 - around.numel())]))
    largest = torch.finfo(dtype).max
    rows.append(torch.tensor([largest * 0.9, -largest / 3, 1.0, -largest] * 16))
    return torch.stack(rows).to(dtype)


def check_cuda(_: argparse.Namespace) -> None:
    cases = failures = 0
    for dtype in DTYPES.values():
        weights = [(weight(shape, dtype, "cpu"), blocksize) for shape, blocksize in CHECK_SHAPES]
        weights.append((special_values(dtype), 64))
        for w, blocksize in weights:
            for quant_type in ("nf4", "fp4"):
                for double_quant in (False, True):
                    cases += 1
                    on_cpu, state = quantize_4bit(w, quant_type=quant_type, blocksize=blocksize,
                                                  double_quant=double_quant)
                    on_gpu, gpu_state = quantize_4bit(w.cuda(), quant_type=quant_type, blocksize=blocksize,
                                                      double_quant=double_quant)
                    bad = [suffix for suffix, tensor in on_cpu.items()
                           if not torch.equal(on_gpu[suffix].cpu().view(torch.uint8), tensor.view(torch.uint8))]
                    if gpu_state != state:
                        bad.append("state")
                    restored = dequantize_4bit({k: v.cuda() for k, v in on_cpu.items()}, where="w").cpu()
                    expected = dequantize_4bit(on_cpu, where="w")
                    if not torch.equal(restored.view(torch.uint8), expected.view(torch.uint8)):
                        bad.append("dequantized")
                    if bad:
                        failures += 1
                        print(f"MISMATCH {tuple(w.shape)} {dtype} {quant_type} blocksize {blocksize} "
                              f"double_quant {double_quant}: {bad}")
    print(f"check-cuda: {cases - failures}/{cases} cases byte-identical to the CPU path")
    if failures:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--check-cuda", action="store_true",
                        help="assert CUDA results equal the CPU path's, byte for byte")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per case (median; at least 5)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--no-native", action="store_true",
                        help="CPU: time the torch ops instead of the compiled kernel")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_cuda:
        check_cuda(args)
        return
    results = bench_cuda(args) if args.device == "cuda" else {"rows": bench_cpu(args)}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
