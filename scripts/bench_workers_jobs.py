#!/usr/bin/env python
"""``--workers 1`` against ``--workers 2`` for the other jobs on the worker pool: LoRA, OFT and BOFT merges,
``quantize --nf4``, ``dequantize``, ``convert`` of every module's LoRA (to rank 8) and ``extract --svd exact``
(TUNED = the base merged with the LoRA), on the 1.08B bf16 Llama of ``scripts/bench_merge.py`` (generated once
under ``bench-work/large/``; extract on its 0.40B ``small`` sibling, whose exact SVDs already take minutes). Each
job runs in a fresh process, interleaved, ``--repeats`` times; medians are printed, with OFT's and BOFT's time
over the LoRA merge's.

    python scripts/bench_workers_jobs.py
    python scripts/bench_workers_jobs.py --jobs convert extract --repeats 1
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import SIZES, WORK, ensure_data, ensure_method_adapter, warm_up


def _tuned(size: str, base: Path, adapter: Path) -> Path:
    """BASE merged with the LoRA: extract's TUNED, written once."""
    tuned = WORK / size / "tuned"
    if not tuned.exists():
        subprocess.run(["wsurgery", "merge", str(base), str(adapter), str(tuned), "-q"], check=True)
    return tuned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", choices=["merge", "quantize", "dequantize", "convert", "extract"],
                        default=["merge", "quantize", "dequantize", "convert", "extract"])
    parser.add_argument("--repeats", type=int, default=3)
    wanted = parser.parse_args()
    base, adapter = ensure_data("large", SIZES["large"])
    oft = ensure_method_adapter("large", SIZES["large"], "oft")
    boft = ensure_method_adapter("large", SIZES["large"], "boft")
    small_base, small_adapter = ensure_data("small", SIZES["small"])
    small_tuned = _tuned("small", small_base, small_adapter)
    warm_up(base, adapter, oft, boft, small_base, small_tuned)
    out = WORK / "large" / "out-more"
    q = WORK / "large" / "q-nf4"
    shutil.rmtree(q, ignore_errors=True)
    if "dequantize" in wanted.jobs:
        subprocess.run(["wsurgery", "quantize", str(base), str(q), "-q"], check=True)  # dequantize's input
    probe = ("import subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
             "print(time.perf_counter() - t, r.returncode)")
    jobs = {"merge lora": ["merge", str(base), str(adapter)], "merge oft": ["merge", str(base), str(oft)],
            "merge boft": ["merge", str(base), str(boft)], "quantize --nf4": ["quantize", str(base)],
            "dequantize": ["dequantize", str(q)],
            "convert lora r8": ["convert", str(adapter), "--to", "lora", "--rank", "8"],
            "extract exact": ["extract", str(small_base), str(small_tuned), "--rank", "16", "--svd", "exact"]}
    jobs = {name: args for name, args in jobs.items() if name.split()[0] in wanted.jobs}
    res: dict[tuple[str, int], list[float]] = {}
    for _ in range(wanted.repeats):
        for name, args in jobs.items():
            for w in (1, 2):
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=False)
                cmd = [sys.executable, "-c", probe, "wsurgery", *args, str(out), "-q", "--workers", str(w)]
                d = subprocess.run(cmd, capture_output=True, text=True, check=False)
                t, rc = d.stdout.split()
                assert rc == "0", d.stderr
                res.setdefault((name, w), []).append(float(t))
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(q, ignore_errors=True)
    for name in jobs:
        a, b = statistics.median(res[(name, 1)]), statistics.median(res[(name, 2)])
        print(f"{name:16s} w1 {a:6.2f} s  w2 {b:6.2f} s  w1/w2 {a / b:4.2f}")
    if "merge" not in wanted.jobs:
        return
    lora = {w: statistics.median(res[("merge lora", w)]) for w in (1, 2)}
    for m in ("oft", "boft"):
        print(m, "/ lora:", {w: round(statistics.median(res[(f"merge {m}", w)]) / lora[w], 2) for w in (1, 2)})


if __name__ == "__main__":
    main()
