"""GPTQ and AWQ checkpoints: decoded element for element as their own libraries decode them, merged
as PEFT merges into the decoded model, written plain, never re-encoded.

The checkpoints are packed by the libraries themselves from known integer codes, zero points and
scales: GPTQ by GPT-QModel's ``TorchLinear.pack_original`` (v1 files through its own
``convert_gptq_v2_to_v1_format_module``, as its save does), AWQ by GPT-QModel's ``AwqTorchLinear.pack``
(AutoAWQ's GEMM layout). The decode oracles are GPT-QModel's ``TorchLinear.dequantize_weight`` after
its v1->v2 load conversion (the CPU path transformers' GPTQ integration runs), and AutoAWQ's
``dequantize_gemm`` (run from AutoAWQ's installed ``awq/utils/packing_utils.py``: the ``awq`` package
itself does not import without ``datasets``) and GPT-QModel's copy of it.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from oracle import (
    LLAMA_LINEAR,
    assert_close_to,
    load_all,
    make_adapter,
    oracle_merge,
    run_cli,
)
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from wsurgery.checkpoint import open_checkpoint
from wsurgery.errors import InputError, UnsupportedError

gptq_torch = pytest.importorskip("gptqmodel.nn_modules.qlinear.torch", reason="needs gptqmodel (test oracle)")
from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
from gptqmodel.quantization.awq.utils.packing_utils import (
    dequantize_gemm as gptqmodel_dequantize_gemm,
)
from gptqmodel.utils.model import (
    convert_gptq_v1_to_v2_format_module,
    convert_gptq_v2_to_v1_format_module,
)

TorchLinear = gptq_torch.TorchLinear


def _autoawq_packing():
    """AutoAWQ's packing_utils module, loaded from its installed file (it imports only torch)."""
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs autoawq (test oracle)")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "packing_utils.py"
    module_spec = importlib.util.spec_from_file_location("autoawq_packing_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attention_bias=True)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def _codes(out: int, n_in: int, bits: int, groups: int, sym: bool, seed: int):
    """Known integer codes (out, in), zero points and float16 scales (out, groups)."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2 ** bits - 1
    q = torch.randint(0, maxq + 1, (out, n_in), generator=g)
    z = torch.full((out, groups), 2 ** (bits - 1)) if sym else torch.randint(0, maxq + 1, (out, groups), generator=g)
    s = (torch.rand(out, groups, generator=g) * 0.02 + 0.001).half().float()
    return q, z, s


def _quantized_modules(model):
    return {n: m for n, m in model.named_modules() if n.rpartition(".")[2] in LLAMA_LINEAR}


def _save(model, tensors: dict, qconfig: dict, folder: Path) -> Path:
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def make_gptq(folder: Path, bits: int, group_size: int, desc_act: bool, sym: bool, fmt: str, key: str = "format"):
    """A tiny Llama whose Linear layers GPT-QModel packed; (folder, model whose weights are the codes' values)."""
    model = _llama()
    tensors = {k: v for k, v in model.state_dict().items()}
    for i, (name, linear) in enumerate(_quantized_modules(model).items()):
        out, n_in = linear.weight.shape
        size = n_in if group_size == -1 else group_size
        groups = math.ceil(n_in / size)
        q, z, s = _codes(out, n_in, bits, groups, sym, seed=i)
        g_idx = torch.arange(n_in) // size
        if desc_act:
            g_idx = g_idx[torch.randperm(n_in, generator=torch.Generator().manual_seed(100 + i))]
        values = (q - z[:, g_idx]) * s[:, g_idx]
        src = torch.nn.Linear(n_in, out, bias=False)
        src.weight.data = values
        m = TorchLinear(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, in_features=n_in,
                        out_features=out, bias=False)
        m.pack_original(src, s, z.float(), g_idx.int())
        if fmt == "gptq":
            convert_gptq_v2_to_v1_format_module(m, SimpleNamespace(bits=bits, pack_dtype=torch.int32))
        del tensors[f"{name}.weight"]
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            tensors[f"{name}.{part}"] = getattr(m, part)
    qconfig = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
               "true_sequential": True, "damp_percent": 0.05, "pack_dtype": "int32", key: fmt}
    return _save(model, tensors, qconfig, folder)


def gptqmodel_decode(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight as GPT-QModel loads and dequantizes it (v1 zeros converted as on load), (out, in)."""
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    bits, group_size = qconfig["bits"], qconfig["group_size"]
    fmt = qconfig.get("format") or qconfig.get("checkpoint_format")
    tensors = load_file(folder / "model.safetensors")
    result = {}
    for name in [n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")]:
        words, out = tensors[f"{name}.qweight"].shape
        n_in = tensors[f"{name}.g_idx"].shape[0] if f"{name}.g_idx" in tensors else words * 32 // bits
        m = TorchLinear(bits=bits, group_size=group_size, sym=qconfig["sym"], desc_act=qconfig["desc_act"],
                        in_features=n_in, out_features=out, bias=False)
        m.load_state_dict({p: tensors[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")
                           if f"{name}.{p}" in tensors}, strict=False)  # without g_idx: its default i // group_size
        if fmt == "gptq":
            convert_gptq_v1_to_v2_format_module(m, bits, torch.int32)
        m.eval()
        result[f"{name}.weight"] = m.dequantize_weight().T.contiguous()
    return result


def make_awq(folder: Path, group_size: int, seed: int = 0) -> Path:
    """A tiny Llama whose Linear layers GPT-QModel packed in AutoAWQ's GEMM layout."""
    model = _llama()
    tensors = {k: v for k, v in model.state_dict().items()}
    for i, (name, linear) in enumerate(_quantized_modules(model).items()):
        out, n_in = linear.weight.shape
        groups = n_in // group_size
        q, z, s = _codes(out, n_in, 4, groups, False, seed=seed + i)
        g = torch.arange(n_in) // group_size
        src = torch.nn.Linear(n_in, out, bias=False)
        src.weight.data = (q - z[:, g]) * s[:, g]
        m = AwqTorchLinear(bits=4, group_size=group_size, sym=False, desc_act=False, in_features=n_in,
                           out_features=out, bias=False, register_buffers=True)
        m.pack(src, s, z.float())
        del tensors[f"{name}.weight"]
        for part in ("qweight", "qzeros", "scales"):
            tensors[f"{name}.{part}"] = getattr(m, part)
    qconfig = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
               "modules_to_not_convert": None}
    return _save(model, tensors, qconfig, folder)


def awq_decode(folder: Path, dequantize_gemm) -> dict[str, torch.Tensor]:
    group_size = json.loads((folder / "config.json").read_text())["quantization_config"]["group_size"]
    tensors = load_file(folder / "model.safetensors")
    return {f"{name}.weight": dequantize_gemm(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"],
                                              tensors[f"{name}.scales"], 4, group_size).T.contiguous()
            for name in [n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")]}


def assert_bitwise(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(expected) and expected
    for name, want in expected.items():
        got = ours[name]
        assert got.dtype == want.dtype == torch.float16 and got.shape == want.shape, name
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{name}: differs from the reference"


# -- decode, element for element ------------------------------------------------------------------------------

GPTQ_CASES = [  # bits, group_size, desc_act, sym, format, config key for the format
    (4, 128, False, True, "gptq", "checkpoint_format"),
    (4, 32, True, False, "gptq", "format"),
    (4, 32, False, False, "gptq_v2", "format"),
    (4, -1, False, False, "gptq", "format"),
    (2, 32, True, False, "gptq_v2", "checkpoint_format"),
    (2, 128, False, False, "gptq", "format"),
    (8, 128, False, True, "gptq", "format"),
    (8, -1, True, False, "gptq_v2", "format"),
]


@pytest.mark.parametrize("bits,group_size,desc_act,sym,fmt,key", GPTQ_CASES,
                         ids=[f"int{c[0]}-g{c[1]}{'-act' if c[2] else ''}-{'sym' if c[3] else 'asym'}-{c[4]}"
                              for c in GPTQ_CASES])
def test_gptq_decode_is_gptqmodels(tmp_path, bits, group_size, desc_act, sym, fmt, key):
    base = make_gptq(tmp_path / "base", bits, group_size, desc_act, sym, fmt, key)
    ckpt = open_checkpoint(base)
    expected = gptqmodel_decode(base)
    ours = {n: ckpt.read(n) for n in expected}
    assert_bitwise(ours, expected)
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.qweight" not in ckpt.tensors and f"{q}.bias" in ckpt.tensors  # bias stays a plain tensor
    assert ckpt.tensors[f"{q}.weight"].shape == (128, 128)


def test_gptq_v1_zero_point_borrows_are_decoded_as_gptqmodel_loads_them(tmp_path):
    """Asymmetric v1 files store z-1, so a zero point of 0 borrows from its neighbour field; GPT-QModel's
    packed +0x11111111 on load carries it back, and so must we (a per-field +1 would not)."""
    base = make_gptq(tmp_path / "base", 4, 32, False, False, "gptq")
    tensors = load_file(base / "model.safetensors")
    qzeros = tensors["model.layers.0.mlp.down_proj.qzeros"]
    fields = (qzeros.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 15
    assert bool((fields == 15).any())  # z = 0 stored as -1: the fixture exercises the borrow
    assert_bitwise({n: open_checkpoint(base).read(n) for n in gptqmodel_decode(base)}, gptqmodel_decode(base))


def test_gptq_without_g_idx_uses_the_plain_groups(tmp_path):
    """Without act-order GPT-QModel's g_idx buffer defaults to i // group_size where a file has none."""
    full = make_gptq(tmp_path / "full", 4, 32, False, False, "gptq_v2")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text((full / "config.json").read_text())
    tensors = {k: v for k, v in load_file(full / "model.safetensors").items() if not k.endswith(".g_idx")}
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    expected = gptqmodel_decode(base)
    assert_bitwise({n: open_checkpoint(base).read(n) for n in expected}, expected)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_decode_is_autoawqs(tmp_path, group_size):
    base = make_awq(tmp_path / "base", group_size)
    ckpt = open_checkpoint(base)
    expected = awq_decode(base, _autoawq_packing().dequantize_gemm)
    assert_bitwise({n: ckpt.read(n) for n in expected}, expected)
    assert_bitwise({n: ckpt.read(n) for n in expected}, awq_decode(base, gptqmodel_dequantize_gemm))


def test_rows_of_a_decoded_weight(tmp_path):
    base = make_awq(tmp_path / "awq", 32)
    gptq = make_gptq(tmp_path / "gptq", 4, 32, True, False, "gptq")
    for folder in (base, gptq):
        ckpt = open_checkpoint(folder)
        name = "model.layers.0.mlp.up_proj.weight"
        info = ckpt.tensors[name]
        whole = ckpt.read(name)
        assert torch.equal(info.encoding.decode(info, ckpt.read_part, (5, 43)), whole[5:43])


# -- the CLI ---------------------------------------------------------------------------------------------------

def _reference_model(folder: Path, weights: dict[str, torch.Tensor]):
    """The tiny Llama with the reference-decoded weights and the file's plain tensors."""
    model = _llama()
    plain = {k: v for k, v in load_file(folder / "model.safetensors").items()
             if k.rpartition(".")[2] not in ("qweight", "qzeros", "scales", "g_idx")}
    model.load_state_dict({**plain, **weights}, strict=True)
    return model


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    gptq = make_gptq(root / "gptq", 4, 32, True, False, "gptq")
    awq = make_awq(root / "awq", 32)
    return {"gptq": (gptq, gptqmodel_decode(gptq)), "awq": (awq, awq_decode(awq, gptqmodel_dequantize_gemm))}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_merge_is_pefts_into_the_decoded_model(bases, tmp_path, capsys, method):
    base, weights = bases[method]
    reference = _reference_model(base, weights)
    adapter = make_adapter(reference, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                           tmp_path / "adapter")
    out = tmp_path / "out"
    status, _, err = run_cli(["merge", base, adapter, out, "-q"], capsys)
    assert status == 0, err
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = load_all(out)
    expected = oracle_merge(_reference_model(base, weights), adapter)
    assert set(merged) == set(expected)
    assert_close_to(merged, expected, base={k: v for k, v in reference.state_dict().items()})
    stored = load_file(out / "model.safetensors")
    assert not any(n.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for n in stored)

    status, _, err = run_cli(["verify", base, adapter, out], capsys)
    assert status == 0, err


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_merge_requantize_is_refused_in_one_line(bases, tmp_path, capsys, method):
    base, weights = bases[method]
    adapter = make_adapter(_reference_model(base, weights), LoraConfig(r=2, target_modules=["q_proj"]),
                           tmp_path / "adapter")
    out = tmp_path / "out"
    status, _, err = run_cli(["merge", base, adapter, out, "--requantize"], capsys)
    assert status != 0 and not out.exists()
    message = err.strip()
    assert "\n" not in message and "calibration data" in message and "--requantize" in message, message


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_dequantize_loads_plainly_in_transformers(bases, tmp_path, capsys, method):
    from transformers import AutoModelForCausalLM

    base, weights = bases[method]
    out = tmp_path / "out"
    status, _, err = run_cli(["dequantize", base, out, "-q"], capsys)
    assert status == 0, err
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    state = model.state_dict()
    reference = _reference_model(base, weights).state_dict()
    for name, want in reference.items():
        assert torch.equal(state[name].view(torch.int16), want.view(torch.int16)), name


@pytest.mark.parametrize("method,words", [("gptq", "gptq int4, group 32, act-order g_idx, v1 zeros"),
                                          ("awq", "awq gemm int4, group 32")])
def test_inspect_names_the_encoding(bases, capsys, method, words):
    status, stdout, err = run_cli(["inspect", bases[method][0]], capsys)
    assert status == 0, err
    assert words in stdout and "q_proj.weight" in stdout


def _kernel_model(folder: Path, method: str):
    """The tiny Llama with GPT-QModel's own quantized Linear modules (``TorchLinear`` / ``AwqTorchLinear``,
    what transformers' GPTQ/AWQ integration swaps in) holding the checkpoint's packed tensors. Wired by
    hand: transformers' ``from_pretrained`` needs GPT-QModel's full install (it declares torch>=2.14.1 and
    JIT-compiles a C++ CPU extension for minutes when it loads a model)."""
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = load_file(folder / "model.safetensors")
    model = _llama()
    model.load_state_dict({k: v for k, v in tensors.items() if k.rpartition(".")[2] not in ("qweight", "qzeros",
                                                                                            "scales", "g_idx")},
                          strict=False)
    for name, linear in _quantized_modules(model).items():
        out, n_in = linear.weight.shape
        parts = ("qweight", "qzeros", "scales") + (("g_idx",) if method == "gptq" else ())
        state = {p: tensors[f"{name}.{p}"] for p in parts + ("bias",) if f"{name}.{p}" in tensors}
        if method == "gptq":
            m = TorchLinear(bits=qconfig["bits"], group_size=qconfig["group_size"], sym=qconfig["sym"],
                            desc_act=qconfig["desc_act"], in_features=n_in, out_features=out, bias="bias" in state)
            m.load_state_dict(state, strict=False)
            convert_gptq_v1_to_v2_format_module(m, qconfig["bits"], torch.int32)
        else:
            m = AwqTorchLinear(bits=4, group_size=qconfig["group_size"], sym=False, desc_act=False, in_features=n_in,
                               out_features=out, bias="bias" in state, register_buffers=True)
            m.load_state_dict(state, strict=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.eval())
    return model


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_logits_of_the_dequantized_checkpoint_are_the_quantized_models(bases, tmp_path, capsys, method):
    from transformers import AutoModelForCausalLM

    base, _ = bases[method]
    status, _, err = run_cli(["dequantize", base, tmp_path / "plain", "-q"], capsys)
    assert status == 0, err
    ids = torch.tensor([[1, 5, 9, 2, 33, 17, 60, 4]])
    with torch.no_grad():
        expected = _kernel_model(base, method)(ids).logits.float()
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float16)(ids).logits.float()
    # The same weights; only the float16 matmul's summation order and the bias's rounding may differ. This
    # catches a weight read in the wrong layout or order; single codes are checked by the decode tests.
    err = (got - expected).abs().max().item()
    assert err <= 2e-3 * expected.abs().max().item(), err


# -- refusals --------------------------------------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj"


def _broken(base: Path, folder: Path, edit_tensors=None, edit_config=None) -> Path:
    folder.mkdir()
    tensors = load_file(base / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _set(key, value):
    def edit(d):
        d[key] = value
    return edit


def _nan_scale(t):
    t[f"{Q}.scales"] = t[f"{Q}.scales"].clone()
    t[f"{Q}.scales"][0, 3] = float("nan")


def _g_idx_out_of_range(t):
    t[f"{Q}.g_idx"] = t[f"{Q}.g_idx"].clone()
    t[f"{Q}.g_idx"][5] = 4  # 128 rows in groups of 32: 0..3


GPTQ_BROKEN = {
    "missing-qzeros": (lambda t: t.pop(f"{Q}.qzeros"), None, InputError, ["qzeros", "missing"]),
    "missing-scales": (lambda t: t.pop(f"{Q}.scales"), None, InputError, ["scales", "missing"]),
    "missing-g_idx-under-desc_act": (lambda t: t.pop(f"{Q}.g_idx"), None, InputError, ["g_idx", "desc_act"]),
    "g_idx-out-of-range": (_g_idx_out_of_range, None, InputError, ["g_idx", "outside"]),
    "nan-scale": (_nan_scale, None, InputError, [f"{Q}.scales", "NaN"]),
    "group-size-mismatch": (None, _set("group_size", 64), InputError, ["qzeros", "does not match"]),
    "bits-mismatch": (None, _set("bits", 8), InputError, ["qweight", "bits=8"]),
    "3-bit": (None, _set("bits", 3), UnsupportedError, ["3-bit"]),
    "marlin-format": (None, _set("format", "marlin"), UnsupportedError, ["marlin"]),
    "float-qweight": (lambda t: t.__setitem__(f"{Q}.qweight", t[f"{Q}.qweight"].float()), None, InputError,
                      ["qweight", "float32"]),
}


@pytest.mark.parametrize("case", list(GPTQ_BROKEN))
def test_broken_gptq_is_refused_when_opened(bases, tmp_path, case):
    edit_tensors, edit_config, error, words = GPTQ_BROKEN[case]
    folder = _broken(bases["gptq"][0], tmp_path / "broken", edit_tensors, edit_config)
    with pytest.raises(error) as raised:
        open_checkpoint(folder)
    message = str(raised.value)
    assert "\n" not in message and all(w in message for w in words), message


AWQ_BROKEN = {
    "missing-qzeros": (lambda t: t.pop(f"{Q}.qzeros"), None, InputError, ["qzeros", "missing"]),
    "nan-scale": (_nan_scale, None, InputError, [f"{Q}.scales", "NaN"]),
    "group-size-mismatch": (None, _set("group_size", 64), InputError, ["qzeros", "does not match"]),
    "group-size-not-dividing": (None, _set("group_size", 96), InputError, ["group_size 96"]),
    "gemv": (None, _set("version", "gemv"), UnsupportedError, ["gemv"]),
    "8-bit": (None, _set("bits", 8), UnsupportedError, ["8-bit"]),
}


@pytest.mark.parametrize("case", list(AWQ_BROKEN))
def test_broken_awq_is_refused_when_opened(bases, tmp_path, case):
    edit_tensors, edit_config, error, words = AWQ_BROKEN[case]
    folder = _broken(bases["awq"][0], tmp_path / "broken", edit_tensors, edit_config)
    with pytest.raises(error) as raised:
        open_checkpoint(folder)
    message = str(raised.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_config_that_names_the_method_over_plain_weights_is_refused(tmp_path, method):
    model = _llama()
    folder = _save(model, model.state_dict(), {"quant_method": method, "bits": 4, "group_size": 128}, tmp_path / "b")
    with pytest.raises(InputError, match=f"quant_method {method} but no tensor"):
        open_checkpoint(folder)
