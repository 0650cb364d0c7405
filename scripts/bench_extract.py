#!/usr/bin/env python
"""Benchmark ``wsurgery extract`` against ``mergekit-extract-lora`` at equal rank.

The pair: bench_merge.py's synthetic Llama-shaped bf16 base (``bench-work/<size>/base``) and, as the
fine-tune, that base merged with bench_merge's rank-16 LoRA on every linear layer (written once by
``wsurgery merge`` into ``bench-work/<size>/tuned``). TUNED − BASE is then the rank-16 change plus
bf16 rounding noise, so a rank-16 extraction should recover the change up to that noise.

Variants, each timed in a subprocess under ``/usr/bin/time -v`` on warm caches (bench_merge's
``measure``: after a ``sync``, on quiet CPUs, rerun when other work took the CPUs):

  wsurgery        ``wsurgery extract BASE TUNED OUT --rank 16 --device cpu`` (randomized SVD)
  wsurgery-exact  the same with ``--svd exact`` (torch.linalg.svd, the algorithm mergekit uses)
  wsurgery-cuda   ``--device cuda`` (randomized SVD on the GPU), where torch sees one
  mergekit        ``mergekit-extract-lora --model TUNED --base-model BASE --out-path OUT --max-rank 16``
                  from the venv given by ``--mergekit`` (default ``bench-work/mergekit-venv``)
  mergekit-cuda   the same with ``--cuda``, where torch sees a GPU

The exact SVDs take minutes per run of the 1B model on 2 cores, so those variants run only on the
sizes in ``--slow-sizes`` (default: tiny, ~0.11B). Every adapter written is then scored with the
same code: for each LoRA module, ||ΔW − s·B·A||_F against TUNED − BASE and against the true rank-16
change, summed over modules (and the worst module). Results are printed and written to
``bench-work/extract-results.json``.

Usage (from the repository root):

    python scripts/bench_extract.py                        # tiny (all variants), small and large (fast ones)
    python scripts/bench_extract.py --sizes large --slow-sizes large --slow-repeats 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge
from bench_merge import ROOT, WORK, ModelSize, Run, code_state, ensure_data, measure, remove, warm_up

RANK = 16
# bench_merge's sizes, and a ~0.11B one (same layout, narrower) on which the exact SVDs take seconds, not minutes.
SIZES = {**bench_merge.SIZES, "tiny": ModelSize(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=4,
                                                vocab=32000, max_shard_bytes=200 * 10**6)}


def ensure_tuned(name: str) -> tuple[Path, Path, Path]:
    """BASE, TUNED (= BASE merged with the rank-16 adapter, bf16) and the adapter that made it."""
    import wsurgery

    base, adapter = ensure_data(name, SIZES[name])
    tuned = WORK / name / "tuned"
    stamp = tuned / "made-from.json"
    want = json.loads((WORK / name / "generated.json").read_text())
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
        remove(tuned)
        wsurgery.merge(base, adapter, tuned, progress=False)
        stamp.write_text(json.dumps(want, indent=2) + "\n")
    return base, tuned, adapter


def score(adapter_dir: Path, base: Path, tuned: Path, truth_dir: Path) -> dict:
    """Relative Frobenius errors of the adapter's LoRA changes, against TUNED − BASE and against the true
    change, over all its LoRA modules; read through wsurgery's loader (its merge matches PEFT's)."""
    from wsurgery.adapters import load_adapter
    from wsurgery.checkpoint import open_checkpoint
    from wsurgery.methods.lora import LoraPatch

    b, t = open_checkpoint(base), open_checkpoint(tuned)
    truth = {p.module: p for p in load_adapter(truth_dir).patches() if isinstance(p, LoraPatch)}
    sums = {"err_tuned": 0.0, "norm_tuned": 0.0, "err_true": 0.0, "norm_true": 0.0}
    worst, modules, whole = 0.0, 0, 0
    for patch in load_adapter(adapter_dir).patches():
        if not isinstance(patch, LoraPatch):
            whole += 1  # modules_to_save: stored exactly
            continue
        name = f"{patch.module}.weight"
        delta = t.read(name).to(torch.float32) - b.read(name).to(torch.float32)
        ours = patch.weight_delta()
        true = truth[patch.module].weight_delta()
        e_t, n_t = float(torch.linalg.vector_norm(delta - ours)) ** 2, float(torch.linalg.vector_norm(delta)) ** 2
        sums["err_tuned"] += e_t
        sums["norm_tuned"] += n_t
        sums["err_true"] += float(torch.linalg.vector_norm(true - ours)) ** 2
        sums["norm_true"] += float(torch.linalg.vector_norm(true)) ** 2
        worst = max(worst, math.sqrt(e_t / n_t))
        modules += 1
    return {"lora_modules": modules, "stored_whole": whole,
            "rel_error_vs_tuned": math.sqrt(sums["err_tuned"] / sums["norm_tuned"]),
            "worst_module_rel_error_vs_tuned": worst,
            "rel_error_vs_true_change": math.sqrt(sums["err_true"] / sums["norm_true"]),
            "adapter_bytes": sum(p.stat().st_size for p in adapter_dir.iterdir())}


def commands(base: Path, tuned: Path, out: Path, mergekit: Path | None) -> dict[str, list[str]]:
    """Every variant this machine can run (the CUDA ones where torch sees a GPU, mergekit where installed).
    wsurgery runs as ``python -m wsurgery.cli`` with this checkout first on PYTHONPATH (see ``main``): this
    checkout's code is measured, whatever is installed."""
    ours = [sys.executable, "-m", "wsurgery.cli", "extract", str(base), str(tuned), str(out), "--rank", str(RANK),
            "--quiet"]
    found = {"wsurgery": [*ours, "--device", "cpu"], "wsurgery-exact": [*ours, "--device", "cpu", "--svd", "exact"]}
    if torch.cuda.is_available():
        found["wsurgery-cuda"] = [*ours, "--device", "cuda"]
    if mergekit is not None:
        theirs = [str(mergekit / "bin" / "mergekit-extract-lora"), "--model", str(tuned), "--base-model", str(base),
                  "--out-path", str(out), "--max-rank", str(RANK)]
        found["mergekit"] = theirs
        if torch.cuda.is_available():
            found["mergekit-cuda"] = [*theirs, "--cuda"]
    return found


FAST = ("wsurgery", "wsurgery-cuda")  # randomized SVD; the others run exact SVDs (slow on a CPU)


def bench_size(name: str, repeats: int, slow_repeats: int, slow: bool, mergekit: Path | None, quiet: float,
               max_wait: float, retries: int) -> dict:
    base, tuned, truth = ensure_tuned(name)
    warm_up(base, tuned)
    out = WORK / name / "out-extract"
    results = {}
    for variant, cmd in commands(base, tuned, out, mergekit).items():
        times = repeats if variant in FAST else slow_repeats if slow else 0
        runs: list[Run] = []
        for rep in range(times):
            runs.append(measure(cmd, out, quiet, max_wait, retries))
            run = runs[-1]
            print(f"[{name}] {variant:14s} rep {rep + 1}: {run.wall_s:7.1f} s  {run.peak_rss_bytes / 1e6:7.0f} MB"
                  f"  (other processes: {run.others:.0%} of the CPUs)", flush=True)
        if not runs:
            continue
        results[variant] = {"wall_s": statistics.median(r.wall_s for r in runs),
                            "peak_rss_mb": statistics.median(r.peak_rss_bytes for r in runs) / 1e6,
                            "runs": [{"wall_s": r.wall_s, "peak_rss_mb": round(r.peak_rss_bytes / 1e6),
                                      "others_cpu_share": round(r.others, 2)} for r in runs],
                            **score(out, base, tuned, truth)}
        remove(out)
    shapes = SIZES[name].shapes()
    return {"parameters": sum(math.prod(s) for s in shapes.values()), "variants": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "small", "large"])
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of wsurgery's default (default 3)")
    parser.add_argument("--slow-repeats", type=int, default=3, help="repetitions of the exact-SVD variants")
    parser.add_argument("--slow-sizes", nargs="*", choices=sorted(SIZES), default=["tiny"],
                        help="sizes on which the exact-SVD variants (wsurgery-exact, mergekit) run")
    parser.add_argument("--mergekit", type=Path, default=WORK / "mergekit-venv",
                        help="a virtual environment with mergekit installed ('none' to skip it)")
    parser.add_argument("--quiet-threshold", type=float, default=0.25)
    parser.add_argument("--max-wait", type=float, default=60.0)
    parser.add_argument("--retries", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    mergekit = args.mergekit if (args.mergekit / "bin" / "mergekit-extract-lora").is_file() else None
    if mergekit is None:
        print(f"no mergekit-extract-lora under {args.mergekit}: mergekit is skipped")
    code = code_state()
    results = {name: bench_size(name, args.repeats, args.slow_repeats, name in args.slow_sizes, mergekit,
                                args.quiet_threshold, args.max_wait, args.retries) for name in args.sizes}
    print(f"\nrank {RANK}; medians of {args.repeats} runs (wsurgery), {args.slow_repeats} (exact-SVD variants); "
          "warm cache")
    print(f"{'size':6s} {'variant':15s} {'wall s':>7s} {'RSS MB':>7s} {'err vs TUNED-BASE':>18s} "
          f"{'worst module':>13s} {'err vs true Δ':>14s}")
    for name, r in results.items():
        for v, m in r["variants"].items():
            print(f"{name:6s} {v:15s} {m['wall_s']:7.1f} {m['peak_rss_mb']:7.0f} {m['rel_error_vs_tuned']:18.6f} "
                  f"{m['worst_module_rel_error_vs_tuned']:13.6f} {m['rel_error_vs_true_change']:14.6f}")
    summary = {"rank": RANK, "repeats": args.repeats, "slow_repeats": args.slow_repeats, "code": code,
               "sizes": results}
    (WORK / "extract-results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {WORK / 'extract-results.json'}")


if __name__ == "__main__":
    main()
