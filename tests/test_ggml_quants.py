"""ggml's quantizers, ours against ggml's own: byte for byte, and a merge into a K-quant GGUF that llama.cpp runs.

The oracle is ggml itself: the ``xllamacpp`` wheel's shared library exports ``ggml_quantize_chunk`` (what
llama-quantize calls; without an importance matrix it runs the ``quantize_row_*_ref`` reference quantizers)
and ``quantize_row_q8_K_ref``, called here through ctypes on random and hostile rows. The K-quant GGUF
base is written by that same library, so the merge test's expected bytes never come from our code.
"""

from __future__ import annotations

import copy
import ctypes
import os
from unittest import mock

import gguf
import numpy as np
import pytest
import torch
import xllamacpp
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf_tiny import _permute, tiny_llama, write_llama_gguf
from oracle import make_adapter, oracle_merge, run_cli
from peft import LoraConfig
from test_gguf_llamacpp import LINEAR, TOKENS, _llama_cpp_logits

import wsurgery
from wsurgery.checkpoint import open_checkpoint
from wsurgery.quant.ggml_types import QUANTIZERS, can_quantize, quantize

LIB = ctypes.CDLL(os.path.join(os.path.dirname(xllamacpp.__file__), "xllamacpp.abi3.so"))
LIB.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_void_p]
LIB.ggml_quantize_chunk.restype = ctypes.c_size_t
LIB.quantize_row_q8_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K]
K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def ggml_quantize(x: np.ndarray, t: T) -> np.ndarray:
    """ggml's bytes for the rows of ``x``: ``ggml_quantize_chunk(imatrix=NULL)``; Q8_K (which llama-quantize
    never writes) through its reference row quantizer."""
    x = np.ascontiguousarray(x, np.float32)
    block, size = GGML_QUANT_SIZES[t]
    rows, n = x.reshape(-1, x.shape[-1]).shape
    assert n % block == 0, "ggml aborts the process on a partial block"
    out = np.zeros(rows * n // block * size, np.uint8)  # zeroed: Q8_K leaves an all-zero block's sums unwritten
    if t == T.Q8_K:
        LIB.quantize_row_q8_K_ref(x.ctypes.data, out.ctypes.data, x.size)
    else:
        assert LIB.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, rows, n, None) == out.size
    return out.reshape(*x.shape[:-1], n // block * size)


def hostile_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows that reach each branch of ggml's quantizers: zero, flat, one outlier, one sign only, values on
    rounding ties, mixed signed zeros, values so small that the fp16 scales are subnormal or flush to 0."""
    normal = rng.standard_normal(n)
    rows = {
        "zeros": np.zeros(n), "signed zeros": np.where(np.arange(n) % 3 == 0, -0.0, 0.0),
        "constant": np.full(n, 0.37), "negative constant": np.full(n, -2.5),
        "outlier": np.where(np.arange(n) == n // 3, 1e4, normal), "negative only": -np.abs(normal),
        "positive only": np.abs(normal) + 1, "halves": rng.integers(-16, 17, n) * 0.5,
        "eighths": rng.integers(0, 16, n) * 0.125 - 1, "small integers": rng.integers(-3, 4, n).astype(float),
        "tiny": normal * 1e-6, "subnormal fp16 scales": normal * 1e-8, "below fp32 normal": normal * 1e-39,
        "zero halves": np.where(np.arange(n) < n // 2, 0.0, normal), "huge": normal * 1e5,
        "one tiny value": np.where(np.arange(n) == 5, -3e-5, 0.0), "heavy tails": rng.standard_t(2, n),
    }
    return np.stack(list(rows.values())).astype(np.float32)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_quantizers_equal_ggml_byte_for_byte(t):
    rng = np.random.default_rng(int(t))
    block = GGML_QUANT_SIZES[t][0]
    weights = rng.standard_normal((48, 2048)) * 0.02
    cases = [hostile_rows(rng, 1024), weights.astype(np.float32),
             torch.from_numpy(weights).to(torch.bfloat16).float().numpy(),  # few mantissa bits: more ties
             torch.from_numpy(weights * 50).to(torch.float16).float().numpy(),
             (rng.laplace(size=(16, 1024)) * 10.0 ** rng.integers(-4, 4, (16, 1))).astype(np.float32),
             np.where(rng.random((16, 1024)) < 0.9, 0, rng.standard_normal((16, 1024))).astype(np.float32),  # sparse
             (rng.standard_normal((16, 1024)) + np.sign(rng.standard_normal((16, 1024))) * 3).astype(np.float32),
             rng.uniform(-1, 1, (QUANTIZERS[t].chunk_blocks + 3, block)).astype(np.float32)]  # across chunks
    for x in cases:
        ours = quantize(x, t)
        assert ours.dtype == np.uint8 and ours.shape == (x.shape[0], x.shape[1] // block * GGML_QUANT_SIZES[t][1])
        theirs = ggml_quantize(x, t)
        bad = np.nonzero((ours != theirs).any(axis=1))[0]
        assert not len(bad), f"{t.name}: rows {bad[:8].tolist()} differ from ggml's"
    np.testing.assert_array_equal(quantize(torch.from_numpy(cases[1]), t), ggml_quantize(cases[1], t))


@pytest.mark.parametrize("t", [t for t in TYPES if t != T.Q8_K], ids=lambda t: t.name)
def test_our_bytes_decode_to_the_input_within_one_step(t):
    """A second reading of the same bytes: the gguf package dequantizes them to within a step of each value."""
    x = (np.random.default_rng(7).standard_normal((16, 1024)) * 0.05).astype(np.float32)
    got = gguf.quants.dequantize(quantize(x, t), t)
    bits = {T.Q8_0: 8, T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q2_K: 2, T.Q3_K: 3, T.Q4_K: 4, T.Q5_K: 5,
            T.Q6_K: 6}[t]
    step = 2 * np.abs(x).max() / (2**bits - 1)
    assert np.abs(got - x).max() <= step, t.name
    assert np.abs(got - x).mean() <= step / 4, t.name


def test_can_quantize_says_why_not():
    assert can_quantize(T.Q4_K, 4096) is None and can_quantize(T.Q8_0, 96) is None
    assert can_quantize(T.Q4_K, 96) == "rows of 96 values do not divide into Q4_K blocks of 256"
    assert "cannot quantize to IQ4_NL" in can_quantize(T.IQ4_NL, 256)
    assert can_quantize(T.TQ1_0, 256) is None  # not ours: the gguf package's quantizer stands in
    with pytest.raises(ValueError, match="do not divide"):
        quantize(np.zeros((2, 96), np.float32), T.Q6_K)


# -- a merge into a K-quant GGUF ----------------------------------------------------------------------------------

#: a Q4_K_M-like mix that uses every K type: the GGUF's types, by tensor (the rest Q4_K, norms F32).
MIX = {"blk.0.attn_k.weight": T.Q5_K, "blk.0.attn_output.weight": T.Q3_K, "blk.0.ffn_gate.weight": T.Q2_K,
       "output.weight": T.Q6_K, **{f"blk.{i}.{m}.weight": T.Q6_K for i in range(2) for m in ("attn_v", "ffn_down")}}


def _wide_llama():
    """A tiny Llama whose rows (256, 512) divide into K-quant super-blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_llama()
    config = LlamaConfig(**{**model.config.to_dict(), "hidden_size": 256, "intermediate_size": 512, "head_dim": 64})
    torch.manual_seed(0)
    wide = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in wide.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape) if name.endswith("norm.weight") else 0.05 * torch.randn(p.shape))
    return wide


def _write_with_ggml(model, path, types=MIX):
    """``write_llama_gguf`` with ggml's own quantizer for every quantized tensor."""
    with mock.patch.object(gguf.quants, "quantize", ggml_quantize):
        return write_llama_gguf(model, path, T.Q4_K, types)


@pytest.fixture(scope="module")
def k(tmp_path_factory):
    root = tmp_path_factory.mktemp("kquants")
    model = _wide_llama()
    lora = make_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR), root / "lora")
    return root, model, _write_with_ggml(model, root / "base.gguf"), lora


def test_merge_into_a_k_quant_gguf_keeps_each_type_and_requantizes_as_ggml(k, capsys):
    """CLI: inspect names the K types; the merge writes every changed tensor back in its own type, exactly
    ggml's bytes for our float merge, which is PEFT's merge into the dequantized base; the rest is copied.
    verify accepts the merge; dequantize writes what transformers' GGUF loader makes of the base."""
    from transformers import AutoModelForCausalLM

    root, _, base, lora = k
    code, out, err = run_cli(["inspect", base], capsys)
    assert code == 0, err
    assert all(name in out for name in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k"))
    code, _, err = run_cli(["merge", base, lora, root / "merged.gguf", "--quiet"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["merge", base, lora, root / "merged-floats", "--quiet"], capsys)
    assert code == 0, err
    floats, names = open_checkpoint(root / "merged-floats"), open_checkpoint(base).tensors
    peft = oracle_merge(AutoModelForCausalLM.from_pretrained(root, gguf_file=base.name), lora)
    before = {t.name: t for t in gguf.GGUFReader(base).tensors}
    after = gguf.GGUFReader(root / "merged.gguf").tensors
    assert [(t.name, t.tensor_type) for t in after] == [(t.name, t.tensor_type) for t in before.values()]
    changed = 0
    for stored in after:
        if np.array_equal(stored.data, before[stored.name].data):
            continue
        changed += 1
        hf = next(n for n, i in names.items() if i.gguf_name == stored.name)
        value, want = floats.read(hf).to(torch.float32).numpy(), peft[hf].numpy()
        heads = {"attn_q": 4, "attn_k": 2}.get(stored.name.split(".")[-2])
        if heads:
            value = _permute(value, heads)
        np.testing.assert_allclose(floats.read(hf).numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert np.array_equal(stored.data, ggml_quantize(value, stored.tensor_type)), stored.name
    assert changed == 2 * len(LINEAR)
    # Q2_K/Q3_K round by up to ~10 % of |W'|·|x| here; an unmerged file is off by far more
    code, out, err = run_cli(["verify", base, lora, root / "merged.gguf", "--rtol", "0.2"], capsys)
    assert code == 0, out + err
    code, out, err = run_cli(["verify", base, lora, base, "--rtol", "0.2"], capsys)
    assert code == 1 and "0/14 modules agree" in out + err, out + err
    code, _, err = run_cli(["dequantize", base, root / "dequantized", "--quiet"], capsys)
    assert code == 0, err
    transformers_view = AutoModelForCausalLM.from_pretrained(root, gguf_file=base.name).state_dict()
    dequantized = open_checkpoint(root / "dequantized")
    assert set(dequantized.tensors) == set(transformers_view)
    for name in dequantized.tensors:
        assert torch.equal(dequantized.read(name), transformers_view[name]), name


def test_llama_cpp_reads_the_k_quant_merge_as_transformers_does(k):
    """llama.cpp runs our merged K-quant GGUF as transformers runs the weights that file dequantizes to, as
    closely as it runs the base, or ggml's own quantization of PEFT's merge (it quantizes activations to Q8_K
    for K-quant products: the gap is measured here, not assumed). With the byte-identity above, this closes
    the chain: PEFT's merge -> ggml's bytes -> llama.cpp's logits."""
    from transformers import AutoModelForCausalLM

    root, model, base, lora = k
    wsurgery.merge(base, lora, root / "merged-api.gguf", progress=False)
    merged_model = copy.deepcopy(model)
    merged_model.load_state_dict(oracle_merge(copy.deepcopy(model), lora))
    _write_with_ggml(merged_model, root / "peft-merged.gguf")
    errors, logits = {}, {}
    for name in (base.name, "merged-api.gguf", "peft-merged.gguf"):
        model = AutoModelForCausalLM.from_pretrained(root, gguf_file=name, dtype=torch.float32)
        with torch.no_grad():
            want = torch.log_softmax(model(torch.tensor([TOKENS])).logits[0].double(), -1).numpy()
        logits[name] = got = _llama_cpp_logits(root / name)
        errors[name] = np.abs(got - want).max() / np.abs(want).max()
    assert errors["merged-api.gguf"] <= 1.5 * max(errors[base.name], errors["peft-merged.gguf"]), errors
    change = np.abs(logits["merged-api.gguf"] - logits[base.name]).max() / np.abs(logits[base.name]).max()
    assert change > 10 * errors["merged-api.gguf"], "the merge barely changes llama.cpp's logits; this proves nothing"


def test_rows_that_do_not_divide_into_super_blocks_are_refused(tmp_path, capsys):
    """Rows of 64 values cannot be Q4_K: one line naming the tensor, and no output file."""
    model = tiny_llama()
    base = write_llama_gguf(model, tmp_path / "f32.gguf")
    lora = make_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "lora")
    code, _, err = run_cli(["merge", base, lora, tmp_path / "out.gguf", "--gguf-type", "q4_k"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "blk.0.attn_q.weight" in err and "rows of 64 values do not divide into q4_k blocks of 256" in err
    assert not (tmp_path / "out.gguf").exists()


def test_gguf_types_written_are_those_read_back():
    """Every K-quant is a --gguf-type; Q8_K (quantized here, but no weight type for llama.cpp, and the gguf
    package cannot dequantize it) is refused by name."""
    from wsurgery.checkpoint.gguf_format import parse_type
    from wsurgery.errors import InputError

    assert [parse_type(n) for n in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")] == K_TYPES
    with pytest.raises(InputError, match="'q8_k'; wsurgery can write .*q4_k, q5_k, q6_k"):
        parse_type("q8_k")
