"""Benchmark ``wsurgery verify`` on the synthetic >= 1B Llama checkpoint: CPU vs CUDA in one run.

Uses (and caches) the base + rank-16 LoRA that ``bench_merge.py`` generates, merges once, then runs
``verify`` on each device ``--repeats`` times (after one warm-up run, so the page cache is warm) and
reports the median wall time, modules/s and GB/s (bytes of base + merged tensors read per second).

    python scripts/bench_verify.py --size large --repeats 3 [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge

import wsurgery


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(bench_merge.SIZES), default="large")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    base, adapter = bench_merge.ensure_data(args.size, bench_merge.SIZES[args.size])
    merged = bench_merge.WORK / args.size / "merged-for-verify"
    if not merged.exists():
        wsurgery.merge(base, adapter, merged, progress=False)
    results = {}
    for device in args.devices:
        wsurgery.api.verify(base, adapter, merged, device=device, tokens=args.tokens, progress=False)  # warm-up
        times, report = [], None
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            report = wsurgery.api.verify(base, adapter, merged, device=device, tokens=args.tokens, progress=False)
            times.append(time.perf_counter() - t0)
        assert report is not None and report.passed, [c.module for c in report.failures]
        median = statistics.median(times)
        results[device] = {"median_s": median, "runs_s": times, "modules": report.modules,
                           "modules_per_s": report.modules / median, "bytes_read": report.bytes_read,
                           "gb_per_s": report.bytes_read / median / 1e9,
                           "worst_rel_err": max(c.max_rel for c in report.checks if c.kind == "forward")}
        r = results[device]
        print(f"{device:5s} median {median:6.2f} s  {r['modules_per_s']:7.1f} modules/s  {r['gb_per_s']:6.2f} GB/s  "
              f"({report.modules} modules, {report.bytes_read / 1e9:.2f} GB read, worst rel err "
              f"{r['worst_rel_err']:.2e})", flush=True)
    if "cpu" in results and "cuda" in results:
        print(f"cuda / cpu speed-up: {results['cpu']['median_s'] / results['cuda']['median_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
