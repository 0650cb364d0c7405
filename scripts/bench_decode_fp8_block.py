"""Decode throughput of one FP8 block-wise tensor: wsurgery's ``Fp8Block.decode`` vs transformers'
``Fp8Dequantize`` (what ``FineGrainedFP8Config(dequantize=True)`` runs on CPU), same tensor in memory,
both to bfloat16; median of 5 runs each, outputs checked bit-identical.

    python scripts/bench_decode_fp8_block.py            # 7168 x 2048
    python scripts/bench_decode_fp8_block.py --big      # and 129280 x 7168 (~10 GB peak for transformers)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import wsurgery.checkpoint  # noqa: F401  (imports the readers before the encodings package)
from wsurgery.checkpoint.safetensors_file import TensorInfo
from wsurgery.quant.encodings import EncodedTensorInfo
from wsurgery.quant.encodings.fp8_block import Fp8Block


def _tensor(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=g)
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
    scales = torch.rand((-(-rows // 128), -(-cols // 128)), generator=g) * 1e-3
    return codes.view(torch.float8_e4m3fn), scales


def _median(fn, runs: int = 5) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(runs):
        out = None
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench(rows: int, cols: int) -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    codes, scales = _tensor(rows, cols)
    tensors = {"weight": codes, "scale_inv": scales}
    parts = {k: TensorInfo(k, t.dtype, tuple(t.shape), Path("memory"), 0) for k, t in tensors.items()}
    info = EncodedTensorInfo("w", torch.bfloat16, (rows, cols), parts, Fp8Block((128, 128)))

    def read(part: TensorInfo, span=None) -> torch.Tensor:
        t = tensors[part.name]
        return t if span is None else t[span[0]:span[1]]

    ours_s, ours = _median(lambda: info.encoding.decode(info, read))
    del ours
    theirs_s, theirs = _median(lambda: Fp8Dequantize(None)._dequantize_one(codes, scales, torch.bfloat16))
    ours = info.encoding.decode(info, read)
    same = torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    gb = rows * cols / 1e9
    print(f"{rows}x{cols}: wsurgery {ours_s * 1e3:.1f} ms ({gb / ours_s:.2f} G elem/s), transformers "
          f"{theirs_s * 1e3:.1f} ms ({gb / theirs_s:.2f} G elem/s), ratio transformers/wsurgery "
          f"{theirs_s / ours_s:.2f}x, bit-identical: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="also the 129280 x 7168 embedding-sized tensor")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench(7168, 2048)
    if args.big:
        bench(129280, 7168)


if __name__ == "__main__":
    main()
