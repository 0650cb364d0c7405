"""Benchmark whole-model NF4 quantization: ``wsurgery quantize`` vs transformers + bitsandbytes.

The reference route is what users do today: ``from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))`` then ``save_pretrained``. Both run on
the synthetic bf16 Llama checkpoint ``bench_merge.py`` generates (cached in bench-work/), each under
``/usr/bin/time -v`` after ``sync`` on quiet CPUs, ``--repeats`` times; medians of wall time and peak
RSS are reported, with the ratios, and the two outputs are compared tensor by tensor (bytes).

    python scripts/bench_quantize.py --size large --repeats 3 [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge  # noqa: E402


def transformers_quantize(base: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, device_map="cpu", dtype=torch.bfloat16)
    model.save_pretrained(out)


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors compared, tensors whose bytes differ)."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                found.update({k: (f, k) for k in h.keys()})
        return found

    ta, tb = tensors(a), tensors(b)
    differ = 0
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            differ += 1
            continue
        with safe_open(ta[name][0], "pt") as ha, safe_open(tb[name][0], "pt") as hb:
            x, y = ha.get_tensor(name), hb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.reshape(-1).view(torch.uint8),
                                                                       y.reshape(-1).view(torch.uint8)):
            differ += 1
    return len(set(ta) | set(tb)), differ


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(bench_merge.SIZES), default="large")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--transformers", nargs=2, type=Path, metavar=("BASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.transformers:
        transformers_quantize(*args.transformers)
        return

    base, _ = bench_merge.ensure_data(args.size, bench_merge.SIZES[args.size])
    work = bench_merge.WORK / args.size
    ours_out, theirs_out = work / "nf4-ours", work / "nf4-transformers"
    bench_merge.warm_up(base)
    variants = {
        "wsurgery": ([sys.executable, "-m", "wsurgery.cli", "quantize", str(base), str(ours_out), "--nf4", "-q"],
                     ours_out),
        "transformers": ([sys.executable, __file__, "--transformers", str(base), str(theirs_out)], theirs_out),
    }
    runs: dict[str, list] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (cmd, out) in variants.items():
            runs[name].append(bench_merge.measure(cmd, out, 0.25, 30, 2))
    input_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    results = {}
    for name, rs in runs.items():
        wall = statistics.median(r.wall_s for r in rs)
        rss = statistics.median(r.peak_rss_bytes for r in rs)
        results[name] = {"wall_s": wall, "peak_rss_mb": rss / 2**20, "runs_wall_s": [r.wall_s for r in rs],
                         "input_gb_per_s": input_bytes / wall / 1e9}
        print(f"{name:13s} median wall {wall:7.2f} s   peak RSS {rss / 2**20:8.0f} MB   "
              f"{input_bytes / wall / 1e9:5.2f} GB/s of input", flush=True)
    total, differ = same_tensors(ours_out, theirs_out)
    t, w = results["transformers"], results["wsurgery"]
    print(f"transformers / wsurgery: time {t['wall_s'] / w['wall_s']:.2f}x, peak RSS "
          f"{t['peak_rss_mb'] / w['peak_rss_mb']:.2f}x; outputs: {total - differ}/{total} tensors byte-identical")
    results["byte_identical_tensors"] = [total - differ, total]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
