"""The compiled dequantization kernel (AVX-512 and AVX2) against the torch code and bitsandbytes.

Every instruction set this CPU runs is forced in turn and must give the torch path's bytes exactly,
on every output dtype, quant type and blocksize, ragged shapes, subnormal, overflowing and NaN
products, and with the work split across threads at odd block boundaries.
"""

from __future__ import annotations

import platform
import shutil
import sys

import pytest
import torch

from wsurgery.quant import bnb4bit, bnb4bit_native, dequantize_4bit, quantize_4bit

ISAS = bnb4bit_native.supported_isas()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_kernel = pytest.mark.skipif(not ISAS, reason="the native kernel is not built or this CPU lacks AVX2/AVX-512")


def torch_path(parts, out_dtype=None):
    """dequantize_4bit with the compiled kernel switched off."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bnb4bit_native, "supported_isas", lambda: ())
        return dequantize_4bit(parts, where="w", out_dtype=out_dtype)


def kernel(parts, isa, out_dtype=None):
    """The full blocks through the kernel with ``isa`` forced, the ragged tail as dequantize_4bit does it."""
    state = bnb4bit.parse_parts(parts, where="w")
    expected = torch_path(parts, out_dtype)
    out = expected.clone().view(-1)
    full = state.numel - state.numel % state.blocksize
    out[:full] = 0
    absmax = bnb4bit.block_absmax(parts, state, torch.device("cpu"))
    assert bnb4bit_native.dequantize_full_blocks(parts[""].view(torch.uint8).view(-1)[: full // 2], absmax,
                                                 bnb4bit.dequantized_codes(state.quant_type), state.blocksize,
                                                 out[:full], isa=isa)
    return out.view(expected.shape), expected


def same_bytes(a, b):
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux" or not shutil.which("cc"),
                    reason="the kernel is built for x86-64 Linux where a C compiler is present")
def test_kernel_is_built_where_it_can_be():
    """Guards the install: on x86-64 Linux with a compiler, a missing kernel means the build silently failed."""
    assert bnb4bit_native._bnb4bit_native is not None
    assert set(ISAS) <= {"avx512", "avx2"}


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,blocksize", [((96, 80), 64), ((130, 130), 32), ((3, 2049), 2048), ((33, 65), 256),
                                             ((64, 48), 1024), ((1, 4096), 4096), ((4097, 3), 128)])
def test_kernel_equals_torch_path(shape, blocksize, dtype, quant_type, isa):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    for double_quant in (False, True):
        parts, _ = quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        for out_dtype in DTYPES:
            ours, expected = kernel(parts, isa, out_dtype)
            assert same_bytes(ours, expected), (double_quant, out_dtype)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_kernel_special_products(isa):
    """Subnormal products (kept, not flushed), float16 overflow to inf, NaN/inf absmax, FP4's -0.0, ties in rounding."""
    packed = torch.arange(256, dtype=torch.uint8).repeat(4)  # every byte, 32 blocks of 64
    absmax = torch.tensor([1e-38, 3e-39, 1e-45, 0.0, 7e4, 1e5, 3.4e38, float("inf"), float("nan"), -1.0, 1.0,
                           1 + 2 ** -8, 1 + 3 * 2 ** -9, 65504.0, 2 ** -14, 2 ** -24] * 2)
    for quant_type in ("nf4", "fp4"):
        code = bnb4bit.dequantized_codes(quant_type)
        values = code[torch.stack([packed >> 4, packed & 15], dim=1).view(-1).long()].view(-1, 64) * absmax[:, None]
        for dtype in DTYPES:
            out = torch.empty(packed.numel() * 2, dtype=dtype)
            assert bnb4bit_native.dequantize_full_blocks(packed, absmax, code, 64, out, isa=isa)
            expected = values.view(-1).to(dtype)
            finite = ~values.view(-1).isnan()
            assert same_bytes(out[finite], expected[finite]), (quant_type, dtype)
            assert out[~finite].isnan().all()


@needs_kernel
def test_kernel_splits_work_across_threads(monkeypatch):
    """Uneven splits: 7 threads over 1023 blocks of 128, each thread's slice starting mid-tensor."""
    monkeypatch.setattr(bnb4bit_native, "MIN_ELEMENTS_PER_THREAD", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    w = torch.randn(1023, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    parts, _ = quantize_4bit(w, blocksize=128)
    assert same_bytes(dequantize_4bit(parts, where="w"), torch_path(parts))


@needs_kernel
def test_kernel_matches_bitsandbytes():
    """The default path (the kernel) against bitsandbytes' own dequantize_4bit, on a Llama-sized row block."""
    functional = pytest.importorskip("bitsandbytes.functional")
    for dtype in DTYPES:
        w = (torch.randn(256, 4096, generator=torch.Generator().manual_seed(3)) * 0.02).to(dtype)
        packed, state = functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        parts = {"": packed, **state.as_dict(packed=True)}
        assert same_bytes(dequantize_4bit(parts, where="w"), functional.dequantize_4bit(packed, state))


def test_kernel_declines_what_it_cannot_do():
    """Not built, a non-CPU or non-contiguous output, an unknown instruction set: False, and torch does the work."""
    packed, absmax, code = torch.zeros(32, dtype=torch.uint8), torch.ones(1), bnb4bit.dequantized_codes("nf4")
    assert not bnb4bit_native.dequantize_full_blocks(packed, absmax, code, 64, torch.empty(64, 2)[:, 0])
    assert not bnb4bit_native.dequantize_full_blocks(packed, absmax, code, 64, torch.empty(64), isa="neon")
    assert not bnb4bit_native.dequantize_full_blocks(packed, absmax, code, 64, torch.empty(64, dtype=torch.float64))
