"""Decode throughput of one gpt-oss-120b-shaped MXFP4 expert slice: wsurgery vs transformers.

A gate_up_proj slice of ``--experts`` experts of (5760 out, 2880 in) (gpt-oss-120b has 128 per layer) is made
from random codes and realistic e8m0 scales, then decoded to bfloat16 by transformers'
``convert_moe_packed_tensors`` and by ``wsurgery.quant.encodings.mxfp4.decode_blocks``, one expert at a
time (as the reader decodes rows) and whole. Both results are checked bit for bit first. Prints the
median of ``--runs`` runs and one (first) run, in GB/s of bfloat16 output, and the ratio.

    python scripts/bench_decode_mxfp4.py [--experts 8] [--runs 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wsurgery.checkpoint  # noqa: F401  (imports the encodings package in its own order)
from wsurgery.quant.encodings.mxfp4 import decode_blocks


def timed(fn, runs: int) -> tuple[float, float]:
    """(first run, median of ``runs``) in seconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--out", type=int, default=5760)
    parser.add_argument("--in", dest="inp", type=int, default=2880)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    e, n, groups = args.experts, args.out, args.inp // 32
    blocks = torch.randint(0, 256, (e, n, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(115, 128, (e, n, groups), dtype=torch.uint8, generator=g)  # 2**-12 .. 2**0

    ours = decode_blocks(blocks, scales, torch.bfloat16)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    assert torch.equal(ours.view(torch.int16), ref.view(torch.int16)), "decode differs from transformers"
    del ours, ref
    out_gb = e * n * args.inp * 2 / 1e9

    cases = {
        "transformers convert_moe_packed_tensors (whole)":
            lambda: convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16),
        "wsurgery decode (whole)": lambda: decode_blocks(blocks, scales, torch.bfloat16),
        "wsurgery decode (one expert at a time)":
            lambda: [decode_blocks(blocks[i:i + 1], scales[i:i + 1], torch.bfloat16) for i in range(e)],
    }
    print(f"{e} experts of ({n} out, {args.inp} in): {blocks.numel() + scales.numel():,} bytes stored, "
          f"{out_gb:.3f} GB bfloat16 decoded; torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {}
    for label, fn in cases.items():
        first, median = timed(fn, args.runs)
        results[label] = median
        print(f"  {label:52s} median {median * 1e3:8.1f} ms ({out_gb / median:6.2f} GB/s)   "
              f"one run {first * 1e3:8.1f} ms")
    ref_t = results["transformers convert_moe_packed_tensors (whole)"]
    for label in list(cases)[1:]:
        print(f"  speed-up, {label}: {ref_t / results[label]:.2f}x")


if __name__ == "__main__":
    main()
