"""Benchmark whole-model NF4 quantization (and back): ``wsurgery quantize`` vs transformers + bitsandbytes.

The reference route is what users do today: ``from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))`` then ``save_pretrained``. Both run on
the synthetic bf16 Llama checkpoint ``bench_merge.py`` generates (cached in bench-work/), each under
``/usr/bin/time -v`` after ``sync`` on quiet CPUs, ``--repeats`` times; medians of wall time and peak
RSS are reported, with the ratios, and the two outputs are compared tensor by tensor (bytes).

``--dequantize`` also times the way back from the NF4 checkpoint: ``wsurgery dequantize`` against
``from_pretrained`` of the 4-bit folder, ``model.dequantize()`` and ``save_pretrained``.

    python scripts/bench_quantize.py --size large --repeats 3 [--dequantize] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge


def transformers_quantize(base: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, device_map="cpu", dtype=torch.bfloat16)
    model.save_pretrained(out)


def transformers_dequantize(nf4: Path, out: Path) -> None:
    """transformers 5.23's ``save_pretrained`` raises NotImplementedError after ``dequantize()`` (its
    weight conversions have no reverse), so the dequantized weights are saved with safetensors."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(nf4, device_map="cpu", dtype=torch.bfloat16)
    model.dequantize()
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))


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
    parser.add_argument("--dequantize", action="store_true", help="also time the way back to bf16")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--transformers", nargs=2, type=Path, metavar=("BASE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--transformers-dequantize", nargs=2, type=Path, metavar=("NF4", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.transformers:
        transformers_quantize(*args.transformers)
        return
    if args.transformers_dequantize:
        transformers_dequantize(*args.transformers_dequantize)
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
    input_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    results = compare(variants, args.repeats, input_bytes, "quantize")
    if args.dequantize:
        bench_merge.warm_up(ours_out)
        back_ours, back_theirs = work / "bf16-ours", work / "bf16-transformers"
        variants = {
            "wsurgery": ([sys.executable, "-m", "wsurgery.cli", "dequantize", str(ours_out), str(back_ours), "-q"],
                         back_ours),
            "transformers": ([sys.executable, __file__, "--transformers-dequantize", str(ours_out), str(back_theirs)],
                             back_theirs),
        }
        results["dequantize"] = compare(variants, args.repeats, input_bytes, "dequantize")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def compare(variants: dict[str, tuple[list[str], Path]], repeats: int, input_bytes: int, job: str) -> dict:
    """Run each variant ``repeats`` times, alternating; print and return medians, ratios and output equality."""
    runs: dict[str, list] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (cmd, out) in variants.items():
            runs[name].append(bench_merge.measure(cmd, out, 0.25, 30, 2))
    results: dict = {}
    for name, rs in runs.items():
        wall = statistics.median(r.wall_s for r in rs)
        rss = statistics.median(r.peak_rss_bytes for r in rs)
        results[name] = {"wall_s": wall, "peak_rss_mb": rss / 2**20, "runs_wall_s": [r.wall_s for r in rs],
                         "input_gb_per_s": input_bytes / wall / 1e9}
        print(f"{job:10s} {name:13s} median wall {wall:7.2f} s   peak RSS {rss / 2**20:8.0f} MB   "
              f"{input_bytes / wall / 1e9:5.2f} GB/s of bf16 weights", flush=True)
    total, differ = same_tensors(*(out for _, out in variants.values()))
    t, w = results["transformers"], results["wsurgery"]
    print(f"{job:10s} transformers / wsurgery: time {t['wall_s'] / w['wall_s']:.2f}x, peak RSS "
          f"{t['peak_rss_mb'] / w['peak_rss_mb']:.2f}x; outputs: {total - differ}/{total} tensors byte-identical")
    results["byte_identical_tensors"] = [total - differ, total]
    return results


if __name__ == "__main__":
    main()
