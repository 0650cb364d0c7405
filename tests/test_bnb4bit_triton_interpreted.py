"""The Triton kernels' arithmetic, run by Triton's interpreter on the CPU: CI has no GPU.

The interpreter executes the same kernel code with numpy, so the coding logic (absmax, scaling,
binary search, FP4 remap, nibble packing, the flags for blocks redone in torch) is checked against
the CPU path byte for byte on every dtype, quant type and blocksize. Speed and the GPU's own rounding
are not: ``scripts/bench_nf4.py --check-cuda`` checks the real kernels on a GPU. The interpreter's
float32 -> bfloat16 cast truncates where a GPU rounds to nearest even, so dequantization is checked
here into float32 and float16 only.

``TRITON_INTERPRET`` must be set before the kernels are defined, so the check runs in a subprocess
(this file, run as a script).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CASES = [((64, 64), 64), ((33, 128), 128), ((8, 256), 32), ((4, 1024), 1024), ((2, 4096), 4096), ((3, 512), 512),
         ((300, 64), 64)]


def test_triton_kernels_interpreted_match_the_cpu_path():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mismatches: 0" in result.stdout, result.stdout


def check() -> int:
    """Print each mismatch and a count; the CPU path (bnb4bit's torch code) is the reference."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench_nf4 import special_values

    from wsurgery.quant import bnb4bit, bnb4bit_triton

    mismatches = cases = 0
    for dtype in DTYPES:
        weights = [((torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.05).to(dtype), blocksize, False)
                   for i, (shape, blocksize) in enumerate(CASES)]
        weights.append((special_values(dtype), 64, True))
        for w, blocksize, special in weights:
            for quant_type in ("nf4", "fp4"):
                cases += 1
                flat = w.reshape(-1)[: w.numel() // blocksize * blocksize]
                n = flat.numel()
                packed, absmax = torch.empty(n // 2, dtype=torch.uint8), torch.empty(n // blocksize)
                redo = torch.empty(n // blocksize, dtype=torch.int8)
                bnb4bit_triton.launch_quantize(flat, blocksize, quant_type, packed, absmax, redo)
                kept = redo == 0
                if special:  # blocks with non-finite values are flagged, and the CPU path would refuse them
                    kept &= torch.isfinite(flat.float().view(-1, blocksize)).all(dim=1)
                    finite = flat.view(-1, blocksize)[kept].reshape(-1)
                else:
                    finite = flat
                    if redo.any():
                        print(f"FLAGGED ordinary blocks: {dtype} {quant_type} {tuple(w.shape)}")
                        mismatches += 1
                expected_packed = torch.empty(finite.numel() // 2, dtype=torch.uint8)
                expected_absmax = torch.empty(finite.numel() // blocksize)
                bnb4bit._quantize_full_blocks(finite, blocksize, quant_type, expected_packed, expected_absmax, "w")
                if not (torch.equal(packed.view(-1, blocksize // 2)[kept].reshape(-1), expected_packed)
                        and torch.equal(absmax[kept], expected_absmax)):
                    print(f"MISMATCH quantize: {dtype} {quant_type} {tuple(w.shape)} blocksize {blocksize}")
                    mismatches += 1
                for out_dtype in (torch.float32, torch.float16):
                    out, expected = torch.empty(n, dtype=out_dtype), torch.empty(n, dtype=out_dtype)
                    bnb4bit_triton.launch_dequantize(packed, absmax, blocksize, quant_type, out)
                    bnb4bit._dequantize_full_blocks(packed, absmax, blocksize, quant_type, expected)
                    same = out.view(torch.uint8 if out_dtype == torch.float32 else torch.int16)
                    if not torch.equal(same, expected.view(same.dtype)):
                        print(f"MISMATCH dequantize: {dtype} -> {out_dtype} {quant_type} {tuple(w.shape)}")
                        mismatches += 1
    print(f"cases: {cases}, mismatches: {mismatches}")
    return mismatches


if __name__ == "__main__":
    sys.exit(1 if check() else 0)
