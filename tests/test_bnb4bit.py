"""bitsandbytes 4-bit (NF4/FP4, double quant) against bitsandbytes 0.50.2 itself, run here on CPU.

Every stored tensor must be byte-identical to what ``bitsandbytes.functional.quantize_4bit`` +
``QuantState.as_dict(packed=True)`` and ``Linear4bit.state_dict()`` give, and the dequantized weight
equal (``torch.equal``) to bitsandbytes' ``dequantize_4bit``.

bitsandbytes 0.50.2's CPU ``dequantize_4bit`` of a 2-D weight whose row length is a multiple of 16
but not of the blocksize picks the wrong absmax (its AVX-512 kernel indexes blocks per row, as if
every row started a block); ``test_bitsandbytes_cpu_dequantize_row_bug`` shows it on CPUs that run that
kernel, and is skipped on the others. The oracle is
therefore bitsandbytes' own dequantization of the flattened weight, which its kernels get right.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from wsurgery.errors import InputError
from wsurgery.quant import (
    QuantState,
    check_blocksize,
    code_book,
    dequantize_4bit,
    dynamic_map,
    parse_parts,
    quantization_error,
    quantize_4bit,
)
from wsurgery.quant import bnb4bit

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# (shape, blocksize): ragged last blocks, odd element counts, one row, tall and wide, one element,
# a tensor smaller than its block, every blocksize bitsandbytes allows.
SHAPES = [
    ((96, 80), 64),
    ((7,), 32),
    ((1, 4096), 4096),
    ((4097, 3), 128),
    ((3, 2049), 2048),
    ((33, 65), 256),
    ((1,), 64),
    ((5, 6, 7), 512),
    ((64, 48), 1024),
    ((130, 130), 32),
]


@pytest.fixture(scope="module", autouse=True)
def eager_bitsandbytes():
    """bitsandbytes torch.compiles its fallback dequantization.

    Eager gives the same floats, without minutes of compiling.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch._dynamo.config, "disable", True)
        yield


def random_weight(shape, dtype, seed=0, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def bnb_parts(w, quant_type, blocksize, double_quant, quant_storage=torch.uint8):
    """What bitsandbytes stores for w, by suffix ("" is the packed weight), and its state."""
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type,
                                    quant_storage=quant_storage)
    return {"": packed, **state.as_dict(packed=True)}, state


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit of the flattened weight, reshaped (see the module docstring)."""
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([state.shape.numel()])
    return F.dequantize_4bit(packed, flat_state).reshape(state.shape)


def bnb_linear4bit_state_dict(w, quant_type, blocksize, double_quant, quant_storage=torch.uint8):
    """``Linear4bit.state_dict()`` of a layer holding w, by suffix of ``weight``."""
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compress_statistics=double_quant,
                              quant_type=quant_type, quant_storage=quant_storage)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=blocksize, compress_statistics=double_quant,
                                     quant_type=quant_type, quant_storage=quant_storage)
    layer.to("cpu")  # Params4bit quantizes when moved
    return {key.removeprefix("weight").removeprefix("."): value for key, value in layer.state_dict().items()}


def assert_same_parts(ours, theirs):
    assert list(ours) == list(theirs)
    for suffix, tensor in theirs.items():
        mine = ours[suffix]
        assert (mine.dtype, mine.shape) == (tensor.dtype, tensor.shape), suffix
        assert mine.contiguous().view(torch.uint8).tolist() == tensor.contiguous().view(torch.uint8).tolist(), suffix


def test_code_books_are_bitsandbytes():
    assert torch.equal(code_book("nf4"), F.get_4bit_type("nf4", device="cpu"))
    fp4 = F.get_4bit_type("fp4", device="cpu")
    assert code_book("fp4").view(torch.int32).tolist() == fp4.view(torch.int32).tolist()
    assert dynamic_map().view(torch.int32).tolist() == F.create_dynamic_map().view(torch.int32).tolist()


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,blocksize", SHAPES, ids=[f"{'x'.join(map(str, s))}-b{b}" for s, b in SHAPES])
def test_matches_bitsandbytes(shape, blocksize, dtype, quant_type, double_quant):
    w = random_weight(shape, dtype, seed=blocksize + len(shape))
    theirs, state = bnb_parts(w, quant_type, blocksize, double_quant)
    ours, our_state = quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    assert_same_parts(ours, theirs)
    assert our_state.to_json_bytes() == bytes(theirs[our_state.json_suffix].tolist())
    expected = bnb_dequantize(theirs[""], state)
    assert torch.equal(dequantize_4bit(theirs, where="w"), expected)
    assert torch.equal(dequantize_4bit(ours, where="w"), expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear4bit_state_dict(dtype, quant_type):
    """What bitsandbytes' Linear4bit (as transformers saves it) holds, double quant on (transformers' default)."""
    w = random_weight((48, 80), dtype, seed=5)
    ours, _ = quantize_4bit(w, quant_type=quant_type, blocksize=64, double_quant=True)
    assert_same_parts(ours, bnb_linear4bit_state_dict(w, quant_type, 64, True))


@pytest.mark.parametrize("quant_storage", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_IDS[::-1])
def test_quant_storage(quant_storage):
    """A float quant_storage (FSDP-QLoRA) only reinterprets the packed bytes."""
    w = random_weight((24, 64), torch.bfloat16, seed=7)
    theirs, state = bnb_parts(w, "nf4", 64, True, quant_storage)
    ours, our_state = quantize_4bit(w, blocksize=64, quant_storage=quant_storage)
    assert_same_parts(ours, theirs)
    assert our_state.stored_specs(quant_storage)[""] == (theirs[""].dtype, tuple(theirs[""].shape))
    assert torch.equal(dequantize_4bit(theirs, where="w"), bnb_dequantize(theirs[""], state))


def test_quant_storage_that_cannot_hold_the_bytes():
    with pytest.raises(InputError, match="w: 3 packed bytes cannot be stored as torch.bfloat16"):
        quantize_4bit(torch.ones(6), quant_storage=torch.bfloat16, where="w")


def _bnb_runs_avx512() -> bool:
    """Whether bitsandbytes' CPU library takes its AVX-512 kernels here (it asks the CPU itself, at run time)."""
    probe = getattr(F.lib, "has_avx512f_cpu", None)
    return bool(probe()) if probe is not None else False


@pytest.mark.skipif(not _bnb_runs_avx512(), reason="the row bug is in bitsandbytes' AVX-512 CPU kernel, which this "
                                                    "CPU does not run")
def test_bitsandbytes_cpu_dequantize_row_bug():
    """Why the oracle dequantizes the flattened weight: bitsandbytes' 2-D CPU result is wrong for 80-wide rows
    where its AVX-512 kernel runs (the oracle is right on every CPU, so the other tests need no skip)."""
    w = random_weight((96, 80), torch.float32)
    theirs, state = bnb_parts(w, "nf4", 64, False)
    flat = bnb_dequantize(theirs[""], state)
    assert not torch.equal(F.dequantize_4bit(theirs[""], state), flat)
    assert torch.equal(dequantize_4bit(theirs, where="w"), flat)
    assert quantization_error(w, flat)["rmse"] < 0.1 * w.std().item()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_zero_blocks_and_extremes(quant_type):
    """Values exactly on (and one ulp around) every midpoint, blocks of zeros, ±absmax, subnormal scaled values."""
    bounds = bnb4bit.midpoints(quant_type)
    around = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)),
                        torch.nextafter(bounds, torch.tensor(-2.0))])
    rows = [
        torch.cat([torch.tensor([1.0]), around, torch.zeros(64 - 1 - around.numel())]),  # absmax 1: s = x exactly
        torch.cat([torch.tensor([-8.0]), around * 8, torch.zeros(64 - 1 - around.numel())]),  # powers of two keep ties
        torch.zeros(64),
        torch.full((64,), 3.0),
        torch.tensor([1.0, 1e-40, -1e-42, 3e-39] * 16),
    ]
    for dtype in DTYPES:
        largest = torch.finfo(dtype).max
        w = torch.stack(rows + [torch.tensor([largest * 0.9, -largest / 3, 1.0, -largest] * 16)]).to(dtype)
        for double_quant in (False, True):
            theirs, state = bnb_parts(w, quant_type, 64, double_quant)
            ours, _ = quantize_4bit(w, quant_type=quant_type, blocksize=64, double_quant=double_quant)
            assert_same_parts(ours, theirs)
            assert torch.equal(dequantize_4bit(ours, where="w"), bnb_dequantize(theirs[""], state))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_absmax_below_the_clamp(dtype):
    """Blocks whose absmax is below the 1e-38 clamp quantize as bitsandbytes does.

    Their dequantized values are subnormal: bitsandbytes' AVX-512 kernel flushes them to zero in bf16
    (vcvtneps2bf16 does, on CPUs that have it), its portable path keeps them; the reference here is
    the portable path, which is also what CUDA gives.
    """
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = torch.tensor([[1e-39, -1e-40, 1e-45, 0.0] * 16, [1e-38, 2e-39, -1e-38, 0.0] * 16]).to(dtype)
    for quant_type in ("nf4", "fp4"):
        theirs, state = bnb_parts(w, quant_type, 64, False)
        ours, _ = quantize_4bit(w, quant_type=quant_type, blocksize=64, double_quant=False)
        assert_same_parts(ours, theirs)
        expected = _dequantize_4bit_compute(theirs[""].view(-1), state.absmax, F.get_4bit_type(quant_type, "cpu"), 64,
                                            w.shape, dtype)
        assert torch.equal(dequantize_4bit(ours, where="w"), expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_grid_is_exact_near_every_edge(quant_type):
    """The grid lookup equals bucketize on every float within 64 ulps of each midpoint and each cell edge."""
    edges = torch.arange(bnb4bit.GRID_CELLS + 1, dtype=torch.float64) * 2 / bnb4bit.GRID_CELLS - 1
    centres = torch.cat([bnb4bit.midpoints(quant_type), edges.float(), torch.tensor([-1.0, 0.0, 1.0])])
    bits = centres.view(torch.int32)[:, None] + torch.arange(-64, 65, dtype=torch.int32)
    scaled = bits.view(torch.float32).reshape(-1)
    scaled = scaled[scaled.isfinite() & (scaled.abs() <= 1.0001)]
    scaled = torch.cat([scaled, -scaled, torch.rand(100_000) * 2 - 1])
    expected = torch.tensor(bnb4bit.ASCENDING_CODES[quant_type])[torch.bucketize(scaled, bnb4bit.midpoints(quant_type))]
    scratch = bnb4bit._Scratch(scaled.numel(), scaled.device, quant_type == "fp4")
    codes = bnb4bit._codes(scaled, bnb4bit._code_grid(quant_type, scaled.device), scratch)
    assert torch.equal(codes.long(), expected)


def test_nested_codes_are_the_cpu_kernels():
    """The 8-bit absmax codes against bitsandbytes' C++ table kernel, on values at every table-bin edge."""
    index = torch.arange(1 << 16, dtype=torch.float32)
    bin_edges = (index - 0.5) / 65535 * 2 - 1  # where trunc((v + 1) / 2 * 65535 + 0.5) changes
    values = torch.cat([bin_edges, torch.nextafter(bin_edges, torch.tensor(2.0)),
                        torch.nextafter(bin_edges, torch.tensor(-2.0)), dynamic_map()]).clamp(-1, 1)
    values = torch.cat([values, torch.zeros(256 * 3)])  # whole blocks of zeros, and the ragged last block
    blocks = values[: values.numel() // 256 * 256].view(-1, 256)
    blocks[:, 0] = 1.0  # absmax 1 in every block, so that the scaled values are the values
    values = torch.cat([blocks.view(-1)[:-256 * 3], torch.zeros(256 * 3), values[-100:]])
    expected, state = F.quantize_blockwise(values, blocksize=256)
    codes, absmax = bnb4bit._quantize_nested(values, 256)
    assert torch.equal(codes, expected)
    assert torch.equal(absmax, state.absmax)


def test_refuses_non_finite_weights():
    for bad in (math.inf, -math.inf, math.nan):
        w = torch.ones(4, 64)
        w[2, 5] = bad
        with pytest.raises(InputError, match="model.layers.0.q_proj.weight: the weight has inf or NaN"):
            quantize_4bit(w, where="model.layers.0.q_proj.weight")
    w = torch.ones(65)
    w[64] = math.nan  # in the ragged block
    with pytest.raises(InputError, match="inf or NaN"):
        quantize_4bit(w)


@pytest.mark.parametrize("bad,match", [
    (dict(quant_type="int4"), "unknown 4-bit quant_type 'int4'"),
    (dict(blocksize=48), "blocksize 48 is not supported"),
    (dict(w=torch.ones(4, dtype=torch.int32)), "not torch.int32"),
    (dict(w=torch.ones(0)), "empty tensor"),
])
def test_quantize_refuses_bad_arguments(bad, match):
    arguments = dict(w=torch.ones(64), quant_type="nf4", blocksize=64)
    arguments.update(bad)
    with pytest.raises(InputError, match=match):
        quantize_4bit(arguments.pop("w"), **arguments)


def test_check_blocksize():
    for blocksize in (32, 64, 4096):
        check_blocksize(blocksize)
    for blocksize in (16, 8192, 96, True, "64"):
        with pytest.raises(InputError, match="blocksize"):
            check_blocksize(blocksize)


def json_part(fields):
    return torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)


def corrupted(change):
    """bitsandbytes' parts for a small double-quantized weight, with ``change`` applied."""
    parts, _ = bnb_parts(random_weight((8, 96), torch.bfloat16), "nf4", 64, True)
    fields = json.loads(bytes(parts["quant_state.bitsandbytes__nf4"].tolist()))
    change(parts, fields)
    if "quant_state.bitsandbytes__nf4" in parts:
        parts["quant_state.bitsandbytes__nf4"] = json_part(fields)
    return parts


@pytest.mark.parametrize("change,match", [
    (lambda p, f: p.pop("nested_absmax"), r"missing \['nested_absmax'\] \(the JSON says double quantization\)"),
    (lambda p, f: [p.pop("nested_absmax"), p.pop("nested_quant_map"), f.pop("nested_offset")],
     "has .* but not all of"),
    (lambda p, f: [f.pop("nested_offset"), f.pop("nested_blocksize"), f.pop("nested_dtype")],
     r"unexpected \['nested_absmax', 'nested_quant_map'\]"),
    (lambda p, f: p.pop(""), r"missing \[''\]"),
    (lambda p, f: p.pop("quant_map"), r"missing \['quant_map'\]"),
    (lambda p, f: p.pop("quant_state.bitsandbytes__nf4"), "expected one 'quant_state.bitsandbytes__nf4'"),
    (lambda p, f: f.update(shape=[8, 95]), r"layer.weight: a 4-bit weight of shape \[8, 95\] packs into 380 bytes"),
    (lambda p, f: f.update(shape=[16, 96]), r"layer.weight: a 4-bit weight of shape \[16, 96\] packs into 768 bytes"),
    (lambda p, f: f.update(blocksize=128), r"layer.weight.absmax: expected torch.uint8 \(6,\)"),
    (lambda p, f: f.update(blocksize=100), "blocksize 100 is not supported"),
    (lambda p, f: f.update(quant_type="fp4"), "the JSON says quant_type 'fp4'"),
    (lambda p, f: f.update(dtype="int8"), "dtype 'int8' is not one of"),
    (lambda p, f: f.update(nested_dtype="bfloat16"), "nested_dtype 'bfloat16' is not supported"),
    (lambda p, f: f.update(nested_offset="0.1"), "nested_offset '0.1' is not a finite number"),
    (lambda p, f: f.update(shape=[8, 0]), "is not a list of positive sizes"),
    (lambda p, f: f.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda p, f: p.update(absmax=p["absmax"].float()), r"layer.weight.absmax: expected torch.uint8 \(12,\)"),
    (lambda p, f: p.update(nested_quant_map=p["nested_quant_map"][:128]), "nested_quant_map: expected torch.float32"),
    (lambda p, f: p.update({"": p[""].view(8, 48)}), r"packs into 384 bytes as a \(n, 1\) column"),
    (lambda p, f: p.update(bias=torch.ones(8)), r"unexpected \['bias'\]"),
])
def test_dequantize_refuses_inconsistent_parts(change, match):
    with pytest.raises(InputError, match=match):
        dequantize_4bit(corrupted(change), where="layer.weight")


def test_dequantize_refuses_unparseable_json():
    parts = corrupted(lambda p, f: None)
    parts["quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(InputError, match="layer.weight.quant_state.bitsandbytes__nf4: the 4-bit quant-state JSON does"):
        dequantize_4bit(parts, where="layer.weight")
    parts["quant_state.bitsandbytes__int4"] = parts.pop("quant_state.bitsandbytes__nf4")
    with pytest.raises(InputError, match="unknown 4-bit quant_type 'int4'"):
        dequantize_4bit(parts, where="layer.weight")


def test_dequantize_to_another_dtype():
    w = random_weight((16, 64), torch.bfloat16)
    theirs, state = bnb_parts(w, "fp4", 64, True)
    state.dtype = torch.float32
    assert torch.equal(dequantize_4bit(theirs, where="w", out_dtype=torch.float32), bnb_dequantize(theirs[""], state))


def test_quant_state_json():
    state = QuantState("nf4", 64, torch.bfloat16, (96, 80), nested_offset=0.11023762822151184)
    assert state.to_json_bytes() == (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [96, 80], '
                                     b'"nested_blocksize": 256, "nested_dtype": "float32", '
                                     b'"nested_offset": 0.11023762822151184}')
    assert QuantState.from_json_bytes(state.to_json_bytes(), "w") == state
    plain = QuantState("fp4", 128, torch.float16, (7,))
    assert QuantState.from_json_bytes(plain.to_json_bytes(), "w") == plain
    assert not plain.double_quant and state.double_quant
    # a JSON offset that is not a float32 is rounded to one, as bitsandbytes' torch.tensor(offset) does
    assert QuantState.from_json_bytes(b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64], '
                                      b'"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1}',
                                      "w").nested_offset == torch.tensor(0.1).item()


def test_max_json_len_bounds_every_float32_offset():
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 0x7F800000, (20_000,), generator=generator, dtype=torch.int32)
    offsets = bits.view(torch.float32).tolist() + [1.1754943508222875e-38, 3.4028234663852886e38, 1e-45, 1e-4, 1e16]
    bound = QuantState.max_json_len("nf4", 64, torch.float32, (11008, 4096), True)
    assert max(len(QuantState("nf4", 64, torch.float32, (11008, 4096), offset).to_json_bytes())
               for offset in offsets) <= bound
    plain = QuantState("nf4", 64, torch.float32, (11008, 4096))
    assert QuantState.max_json_len("nf4", 64, torch.float32, (11008, 4096), False) == len(plain.to_json_bytes())


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_stored_specs_describe_the_parts(double_quant):
    w = random_weight((40, 72), torch.float16)
    parts, state = quantize_4bit(w, blocksize=32, double_quant=double_quant)
    assert state.stored_specs() == {suffix: (t.dtype, tuple(t.shape)) for suffix, t in parts.items()}
    assert parse_parts(parts, where="w") == state


def test_quantization_error():
    original = random_weight((64, 64), torch.bfloat16)
    parts, _ = quantize_4bit(original)
    restored = dequantize_4bit(parts, where="w")
    report = quantization_error(original, restored)
    error = restored.double() - original.double()
    assert report["rmse"] == pytest.approx(error.square().mean().sqrt().item(), rel=1e-12)
    assert report["max_abs"] == error.abs().max().item()
    assert report["snr_db"] == pytest.approx(10 * math.log10(original.double().square().sum() / error.square().sum()))
    assert quantization_error(original, original)["snr_db"] == math.inf


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,blocksize", SHAPES[:6], ids=[f"{'x'.join(map(str, s))}-b{b}" for s, b in SHAPES[:6]])
def test_cuda_is_byte_identical_to_cpu(shape, blocksize, dtype, quant_type):
    w = random_weight(shape, dtype, seed=3)
    on_cpu, state = quantize_4bit(w, quant_type=quant_type, blocksize=blocksize)
    on_gpu, gpu_state = quantize_4bit(w.cuda(), quant_type=quant_type, blocksize=blocksize)
    assert gpu_state == state
    assert_same_parts({k: v.cpu() for k, v in on_gpu.items()}, on_cpu)
    restored = dequantize_4bit({k: v.cuda() for k, v in on_cpu.items()}, where="w")
    assert torch.equal(restored.cpu(), dequantize_4bit(on_cpu, where="w"))


@cuda
def test_cuda_ties_and_extremes_match_cpu():
    rows = [torch.cat([torch.tensor([1.0]), bnb4bit.midpoints("fp4"), torch.zeros(48)]),
            torch.tensor([1.0, 1e-40, -1e-42, 3e-39] * 16), torch.tensor([1e-39, -1e-40, 1e-45, 0.0] * 16),
            torch.tensor([3e38, -1e30, 1.0, -3.4e38] * 16), torch.zeros(64)]
    for quant_type in ("nf4", "fp4"):
        w = torch.stack(rows)
        on_cpu, _ = quantize_4bit(w, quant_type=quant_type)
        on_gpu, _ = quantize_4bit(w.cuda(), quant_type=quant_type)
        assert_same_parts({k: v.cpu() for k, v in on_gpu.items()}, on_cpu)
        restored = dequantize_4bit({k: v.cuda() for k, v in on_cpu.items()}, where="w")
        assert torch.equal(restored.cpu(), dequantize_4bit(on_cpu, where="w"))
