#!/usr/bin/env python
"""A merge against the speed of a copy: ``cp -r``, the safetensors read+write floor, and ``--workers``.

On the synthetic 1.08B-parameter bf16 Llama of ``scripts/bench_merge.py`` (2 shards, rank-16 LoRA on all 7
linear layers; generated once under ``bench-work/large/``), with a warm page cache, each variant runs in a
subprocess, interleaved, ``--repeats`` times; the median wall time, CPU time and peak RSS of the child are
reported, with ratios to ``cp -r`` and to the safetensors floor measured in the same run:

  cp            ``cp -r BASE OUT``
  safetensors   ``safe_open`` + ``save_file``, shard by shard (every tensor read into memory and written)
  merge-wN      ``wsurgery merge BASE ADAPTER OUT --workers N`` for each N of ``--workers``
  start         ``wsurgery --version``: starting Python and importing torch, which every merge pays first

``--cold`` drops the page cache before every run (``echo 3 > /proc/sys/vm/drop_caches``, as root), so that
each variant reads its input from the disk.

The merges' outputs are checked byte-identical to each other (the number of workers changes nothing).

    python scripts/bench_merge_speed.py                    # --workers 1 2, 3 repeats
    python scripts/bench_merge_speed.py --workers 1 2 4 8 --repeats 5
    sudo python scripts/bench_merge_speed.py --cold
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import SIZES, WORK, ensure_data, warm_up

_PROBE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
          "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
          "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
          "print(time.perf_counter() - t, u.ru_utime + u.ru_stime, u.ru_maxrss, r.returncode)")


def _safetensors_floor(src: Path, out: Path) -> None:
    """Every shard loaded whole with safe_open and written with save_file: what a plain rewrite costs."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        save_file(tensors, out / shard.name, metadata=metadata)
        del tensors


def _drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        sys.exit(f"--cold needs to drop the page cache, as root: {e}")


def _run(cmd: list[str], out: Path, cold: bool = False) -> tuple[float, float, int]:
    """(wall s, CPU s, peak RSS bytes) of ``cmd`` in a fresh process; ``out`` removed first and synced (and
    with ``cold``, the page cache dropped)."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    if cold:
        _drop_page_cache()
    done = subprocess.run([sys.executable, "-c", _PROBE, *cmd], check=False, capture_output=True, text=True)
    wall, cpu, rss_kib, code = done.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr}")
    return float(wall), float(cpu), int(rss_kib) * 1024


def _same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    return names == sorted(p.name for p in b.glob("*.safetensors")) and \
        all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    parser.add_argument("--floor-only", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_only:
        _safetensors_floor(*args.floor_only)
        return
    base, adapter = ensure_data(args.size, SIZES[args.size])
    if args.cold:
        _drop_page_cache()
    else:
        warm_up(base, adapter)
    wsurgery = shutil.which("wsurgery") or sys.exit("the wsurgery command is not on PATH")
    out = WORK / args.size / "out-speed"
    commands = {"start": [wsurgery, "--version"], "cp": ["cp", "-r", str(base), str(out)],
                "safetensors": [sys.executable, __file__, "--floor-only", str(base), str(out)],
                **{f"merge-w{n}": [wsurgery, "merge", str(base), str(adapter), str(out), "--quiet", "--workers", str(n)]
                   for n in args.workers}}
    runs: dict[str, list[tuple[float, float, int]]] = {v: [] for v in commands}
    kept: dict[str, Path] = {}
    for rep in range(args.repeats):
        for variant, cmd in commands.items():
            runs[variant].append(_run(cmd, out, args.cold))
            wall, cpu, rss = runs[variant][-1]
            print(f"rep {rep + 1} {variant:12s} {wall:6.2f} s  cpu {cpu:6.2f} s  {rss / 1e6:6.0f} MB", flush=True)
            if variant.startswith("merge") and variant not in kept:
                kept[variant] = out.with_name(f"out-{variant}")
                shutil.rmtree(kept[variant], ignore_errors=True)
                out.rename(kept[variant])
    first, *others = kept.values()
    identical = all(_same(first, o) for o in others)
    for path in kept.values():
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    med = {v: {"wall_s": statistics.median(r[0] for r in rs), "cpu_s": statistics.median(r[1] for r in rs),
               "peak_rss_mb": statistics.median(r[2] for r in rs) / 1e6} for v, rs in runs.items()}
    print(f"\n{'variant':12s} {'wall s':>7s} {'cpu s':>7s} {'RSS MB':>7s} {'x cp':>6s} {'x safetensors':>13s}")
    for v, m in med.items():
        print(f"{v:12s} {m['wall_s']:7.2f} {m['cpu_s']:7.2f} {m['peak_rss_mb']:7.0f} "
              f"{m['wall_s'] / med['cp']['wall_s']:6.2f} {m['wall_s'] / med['safetensors']['wall_s']:13.2f}")
    print(f"merge outputs byte-identical across --workers: {identical}")
    (WORK / f"merge_speed{'_cold' if args.cold else ''}.json").write_text(
        json.dumps({"medians": med, "repeats": args.repeats, "cold": args.cold, "identical": identical}, indent=2))
    if not identical:
        sys.exit("the merge outputs differ with the number of workers")


if __name__ == "__main__":
    main()
