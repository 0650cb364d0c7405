#!/usr/bin/env python
"""Benchmark wsurgery's LLM.int8 decode against transformers + bitsandbytes dequantization.

One Llama-sized int8 weight (4096 x 11008 codes, float32 SCB per row) in memory. Compared, for each
output dtype:

- ours: ``Bnb8bit.decode`` (whole tensor), as ``wsurgery dequantize`` / merge read it;
- theirs: ``transformers.integrations.dequantize_bnb_weight`` on an ``Int8Params`` (bitsandbytes'
  ``int8_vectorwise_dequant``), then ``.to(dtype)`` as ``model.dequantize()`` does.

Both results are checked bit for bit first. Each call is timed once cold (the first run) and then
``--runs`` more times with the two calls alternating (so other work on a shared machine hits both
alike); the table gives the first run, the median, GB/s of int8 codes read and the ratio theirs / ours
(above 1: ours is faster).

    python scripts/bench_decode_bnb8bit.py [--runs 5] [--threads N] [--block-elements N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wsurgery.checkpoint  # noqa: F401  (imports the encodings in their order)
from wsurgery.checkpoint.safetensors_file import TensorInfo
from wsurgery.quant.encodings.base import EncodedTensorInfo
from wsurgery.quant.encodings import bnb8bit
from wsurgery.quant.encodings.bnb8bit import Bnb8bit

SHAPE = (4096, 11008)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype.itemsize == 4 else torch.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--block-elements", type=int, default=None, help="float32 scratch per block (tuning)")
    args = parser.parse_args()
    if args.block_elements:
        bnb8bit._BLOCK_ELEMENTS = args.block_elements
    if args.threads:
        torch.set_num_threads(args.threads)

    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    torch.manual_seed(0)
    w = torch.randn(SHAPE, dtype=torch.float16) * torch.rand(SHAPE[0], 1, dtype=torch.float16)
    param = bnb.nn.Int8Params(w, requires_grad=False).to("cpu")  # quantized as transformers does on load
    codes, scb = param.data, param.SCB
    state = bnb.MatmulLtState()
    parts = {"": TensorInfo("w.weight", torch.int8, SHAPE, Path("mem"), 0),
             "SCB": TensorInfo("w.SCB", torch.float32, SHAPE[:1], Path("mem"), 0)}
    data = {"w.weight": codes, "w.SCB": scb}

    def read(info: TensorInfo, rows=None) -> torch.Tensor:
        t = data[info.name]
        return t if rows is None else t[rows[0]:rows[1]]

    results = []
    print(f"LLM.int8 decode, {SHAPE[0]}x{SHAPE[1]} int8, torch threads {torch.get_num_threads()}, "
          f"{args.runs} timed runs (median) after one cold run")
    print(f"{'dtype':9} {'ours first':>11} {'ours median':>12} {'theirs first':>13} {'theirs median':>14} "
          f"{'ours GB/s':>10} {'theirs/ours':>12}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        info = EncodedTensorInfo("w.weight", dtype, SHAPE, parts, Bnb8bit())

        def ours() -> torch.Tensor:
            return info.encoding.decode(info, read)

        def theirs() -> torch.Tensor:
            state.SCB = None
            return dequantize_bnb_weight(param, state).to(dtype)

        first = {}
        for name, call in (("ours", ours), ("theirs", theirs)):
            start = time.perf_counter()
            out = call()
            first[name] = time.perf_counter() - start
            if name == "ours":
                mine = out
        ref = theirs()
        assert mine.dtype == ref.dtype and torch.equal(bits(mine), bits(ref)), \
            f"{dtype}: decode differs from transformers/bitsandbytes"
        del mine, ref
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        for _ in range(args.runs):
            for name, call in (("ours", ours), ("theirs", theirs)):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        gbs = codes.numel() / med["ours"] / 1e9
        row = {"dtype": str(dtype).removeprefix("torch."), "ours_first_s": first["ours"], "ours_median_s": med["ours"],
               "theirs_first_s": first["theirs"], "theirs_median_s": med["theirs"], "ours_gb_per_s": gbs,
               "ratio_theirs_over_ours": med["theirs"] / med["ours"], "runs": times}
        results.append(row)
        print(f"{row['dtype']:9} {first['ours'] * 1e3:9.1f}ms {med['ours'] * 1e3:10.1f}ms "
              f"{first['theirs'] * 1e3:11.1f}ms {med['theirs'] * 1e3:12.1f}ms {gbs:10.2f} "
              f"{row['ratio_theirs_over_ours']:12.2f}")
    if args.json:
        args.json.write_text(json.dumps({"shape": SHAPE, "threads": torch.get_num_threads(), "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
