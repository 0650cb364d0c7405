"""bitsandbytes LLM.int8 checkpoints (``load_in_8bit``) against transformers + bitsandbytes (CPU) and PEFT.

The bases are written by transformers itself (``from_pretrained(..., BitsAndBytesConfig(load_in_8bit=True))``
then ``save_pretrained``): a tiny Llama and a tiny GPT-2, whose Conv1D weights transformers quantizes as
their (out, in) transpose. Each base holds weights beyond ``llm_int8_threshold`` (6.0), whose columns
would be zeroed if the threshold's outlier split touched the stored codes. Oracles: transformers'
``model.dequantize()`` (decode), the stored bytes (encode), PEFT merging into the dequantized model
(merge), bitsandbytes' ``Int8Params`` quantizing PEFT's merged weights (``--requantize``), and
transformers running both int8 models on the CPU (logits).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from oracle import assert_close_to, make_adapter, run_cli, save_base, tiny_gpt2, tiny_llama
from test_bad_input import assert_refused

bnb = pytest.importorskip("bitsandbytes")
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

ARCHS = {
    # name: (builder, LoRA targets, a quantized module, the module given outliers)
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], "model.layers.0.self_attn.q_proj",
              "model.layers.1.mlp.up_proj"),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"),
}
CONV1D = ("c_attn", "c_proj", "c_fc")


def _is_conv1d(arch: str, name: str) -> bool:
    return arch == "gpt2" and name.rpartition(".")[0].rpartition(".")[2] in CONV1D


def stored(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def load_8bit(folder: Path):
    """The model in folder, quantized to LLM.int8 on load where it is not already."""
    quantized = "quantization_config" in json.loads((folder / "config.json").read_text())
    kwargs = {} if quantized else {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kwargs)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=(torch.arange(10)[None] * 7) % 80).logits


@pytest.fixture(scope="module", params=sorted(ARCHS))
def case(request, tmp_path_factory):
    """A bfloat16 base with outliers, its LLM.int8 copy by transformers, and a float32 LoRA."""
    arch = request.param
    build, targets, module, outlier = ARCHS[arch]
    root = tmp_path_factory.mktemp(f"int8-{arch}")
    model = build(torch.bfloat16)
    with torch.no_grad():
        w = model.get_submodule(outlier).weight
        w[:, 3] = 7.5  # a whole column beyond the threshold, and single outliers
        w[2, 5], w[0, 0] = -40.0, 9.0
    base = save_base(model, root / "base")
    q = root / "q"
    load_8bit(base).save_pretrained(q)
    adapter = make_adapter(build(torch.float32), LoraConfig(r=4, lora_alpha=8, target_modules=targets), root / "lora")
    return SimpleNamespace(arch=arch, base=base, q=q, adapter=adapter, module=module, outlier=outlier, root=root)


@pytest.fixture(scope="module")
def peft_merged(case):
    """PEFT's LoRA merged into transformers' dequantized 8-bit model (GPT-2's Conv1D become nn.Linear, (out,
    in)), and as a plain checkpoint (transformers cannot save a dequantized model: written here)."""
    model = load_8bit(case.q).dequantize()
    merged = PeftModel.from_pretrained(model, case.adapter).merge_and_unload()
    tensors = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    folder = case.root / "peft-merged"
    folder.mkdir()
    names = stored(case.base)
    save_file({k: v.contiguous() for k, v in as_model_layout(case.arch, tensors).items() if k in names},
              folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((case.q / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    return SimpleNamespace(folder=folder, tensors=tensors)


def as_model_layout(arch: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' dequantized GPT-2 has nn.Linear (out, in) weights; the checkpoint's Conv1D are (in, out)."""
    return {k: v.T.contiguous() if _is_conv1d(arch, k) and v.dim() == 2 else v for k, v in tensors.items()}


def test_dequantize_equals_transformers_bit_for_bit(case, tmp_path, capsys):
    """``wsurgery dequantize`` = ``model.dequantize()`` (bitsandbytes' int8_vectorwise_dequant in float32, cast
    to the model's dtype), element for element, and transformers loads it as a plain model."""
    status, _, err = run_cli(["dequantize", case.q, tmp_path / "plain", "-q"], capsys)
    assert status == 0, err
    theirs = {k: v.detach() for k, v in load_8bit(case.q).dequantize().state_dict().items()}
    ours = as_model_layout(case.arch, stored(tmp_path / "plain"))
    tied = [k for k in theirs if k not in ours]
    assert tied in ([], ["lm_head.weight"]), tied
    encoded = [k for k, v in stored(case.q).items() if v.dtype == torch.int8]
    assert encoded and all(ours[k].dtype == torch.bfloat16 for k in encoded)  # config.json's dtype
    for k, v in ours.items():
        assert same_bytes(v, theirs[k]), k
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert not getattr(plain, "is_quantized", False)
    name = f"{case.module}.weight"
    assert torch.equal(plain.get_parameter(name), stored(tmp_path / "plain")[name])


def test_row_chunks_decode_as_the_whole(case):
    """``decode(rows=...)`` of any chunk is those rows of the whole decode, reading only their stored rows."""
    from wsurgery.checkpoint import open_checkpoint

    ckpt = open_checkpoint(case.q)
    info = ckpt.tensors[f"{case.outlier}.weight"]
    whole = ckpt.read(info.name)
    chunk = info.encoding.row_chunk(info)
    if chunk is None:  # Conv1D: the row scales run along the logical columns
        assert case.arch == "gpt2" and info.encoding.transposed
        return
    read_rows = []

    def read(part, rows=None):
        read_rows.append((part.name, rows))
        return ckpt.read_part(part, rows)

    n = whole.shape[0]
    pieces = [info.encoding.decode(info, read, (a, min(a + 5, n))) for a in range(0, n, 5 * chunk)]
    assert same_bytes(torch.cat(pieces), whole)
    assert all(rows is not None and rows[1] - rows[0] <= 5 for _, rows in read_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_in_blocks_equals_bitsandbytes(case, monkeypatch, dtype):
    """Blocks of a few rows (the cache-sized decode of large weights) give bitsandbytes' int8_vectorwise_dequant
    bits, in float32 and cast, Conv1D transposed too."""
    import dataclasses

    from wsurgery.checkpoint import open_checkpoint
    from wsurgery.quant.encodings import bnb8bit

    monkeypatch.setattr(bnb8bit, "_BLOCK_ELEMENTS", 100)
    ckpt, raw = open_checkpoint(case.q), stored(case.q)
    for name, info in ckpt.tensors.items():
        if not isinstance(getattr(info, "encoding", None), bnb8bit.Bnb8bit):
            continue
        expected = bnb.functional.int8_vectorwise_dequant(raw[name], raw[name[: -len("weight")] + "SCB"])
        expected = (expected.T if info.encoding.transposed else expected).to(dtype)
        got = info.encoding.decode(dataclasses.replace(info, dtype=dtype), ckpt.read_part)
        assert same_bytes(got, expected.contiguous()), name


def test_encode_equals_transformers_quantization(case):
    """Our encoder on the 16-bit base's weights gives the bytes transformers + bitsandbytes stored on load
    (float16 cast, per-row absmax, no outlier zeroing from the 6.0 threshold), whole and row by row."""
    from wsurgery.checkpoint import open_checkpoint

    ckpt, theirs, base = open_checkpoint(case.q), stored(case.q), stored(case.base)
    names = [k for k, v in theirs.items() if v.dtype == torch.int8]
    assert f"{case.outlier}.weight" in names
    assert (base[f"{case.outlier}.weight"].abs() > 6.0).any()
    for name in names:
        encoding = ckpt.tensors[name].encoding
        assert encoding.transposed == _is_conv1d(case.arch, name)
        parts = encoding.encode(name, base[name])
        prefix = name[: -len("weight")]
        assert sorted(parts) == sorted([name, prefix + "SCB", prefix + "weight_format"])
        assert all(same_bytes(t, theirs[k]) for k, t in parts.items()), name
        if encoding.encode_row_chunk(tuple(base[name].shape)) == 1:
            rows = base[name].shape[0]
            chunks = [encoding.encode_rows(name, base[name][a:a + 7], (a, min(a + 7, rows)), tuple(base[name].shape))
                      for a in range(0, rows, 7)]
            assert [c[name][1] for c in chunks] == list(range(0, rows, 7))
            assert same_bytes(torch.cat([c[name][0] for c in chunks]), theirs[name])
            assert same_bytes(torch.cat([c[prefix + "SCB"][0] for c in chunks]), theirs[prefix + "SCB"])


def test_merge_equals_peft_on_the_dequantized_model(case, peft_merged, tmp_path, capsys):
    status, _, err = run_cli(["merge", case.q, case.adapter, tmp_path / "out", "-q"], capsys)
    assert status == 0, err
    ours = as_model_layout(case.arch, stored(tmp_path / "out"))
    expected = {k: v for k, v in peft_merged.tensors.items() if k in ours}
    assert_close_to(ours, expected, rel=1e-6)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    status, out, err = run_cli(["verify", case.q, case.adapter, tmp_path / "out"], capsys)
    assert status == 0, err + out


def test_merge_requantize_is_bitsandbytes_of_the_peft_merge(case, peft_merged, tmp_path, capsys):
    """Changed weights: bitsandbytes' Int8Params quantizing PEFT's merged weights (what PEFT's own 8-bit
    merge stores), byte for byte; unchanged ones copied; the config kept; transformers runs it in int8
    with the logits of its own 8-bit quantization of PEFT's merged model."""
    out = tmp_path / "re"
    status, _, err = run_cli(["merge", case.q, case.adapter, out, "--requantize", "-q"], capsys)
    assert status == 0, err
    ours, orig = stored(out), stored(case.q)
    assert sorted(ours) == sorted(orig)
    targets = ARCHS[case.arch][1]
    changed = [k for k, v in orig.items() if v.dtype == torch.int8 and k.split(".")[-2] in targets]
    assert changed
    for name in changed:
        prefix = name[: -len("weight")]
        param = bnb.nn.Int8Params(peft_merged.tensors[name], requires_grad=False).to("cpu")
        assert same_bytes(ours[name], param.data), name
        assert same_bytes(ours[prefix + "SCB"], param.SCB), name
        assert not same_bytes(ours[name], orig[name]), name
    changed_parts = {n[: -len("weight")] + s for n in changed for s in ("weight", "SCB", "weight_format")}
    assert [k for k in orig if k not in changed_parts and not same_bytes(ours[k], orig[k])] == []
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == json.loads((case.q / "config.json").read_text())["quantization_config"]
    mine = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert mine.is_quantized and type(mine.get_submodule(case.module)).__name__ == "Linear8bitLt"
    theirs = load_8bit(peft_merged.folder)
    assert torch.equal(logits(mine), logits(theirs))


def test_requantize_without_weight_format_keeps_the_files_layout(case, tmp_path, capsys):
    """A base saved without ``weight_format`` (bitsandbytes' loader defaults to "row"): the re-encoded weights
    leave it out too, and transformers loads the result in 8-bit."""
    base = Path(shutil.copytree(case.q, tmp_path / "base"))
    tensors = {k: v for k, v in load_file(base / "model.safetensors").items() if not k.endswith("weight_format")}
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    status, _, err = run_cli(["merge", base, case.adapter, tmp_path / "re", "--requantize", "-q"], capsys)
    assert status == 0, err
    ours = stored(tmp_path / "re")
    assert sorted(ours) == sorted(tensors)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "re", device_map="cpu").is_quantized


def test_inspect_lists_the_logical_weights(case, capsys):
    status, out, err = run_cli(["inspect", case.q], capsys)
    assert status == 0, err
    line = next(line for line in out.splitlines() if f"{case.module}.weight " in line)
    rows, cols = stored(case.q)[f"{case.module}.weight"].shape
    shape = [cols, rows] if case.arch == "gpt2" else [rows, cols]
    assert "bfloat16" in line and str(shape) in line and "int8 per-row absmax (SCB)" in line, line


# -- broken files ----------------------------------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj"


BROKEN = {
    "no-scb": (lambda t: t.pop(f"{Q}.SCB"), [f"{Q}.weight", "no SCB"]),
    "scb-shape": (lambda t: t.update({f"{Q}.SCB": t[f"{Q}.SCB"][:-1].clone()}), [f"{Q}.SCB", "float32[32]"]),
    "scb-dtype": (lambda t: t.update({f"{Q}.SCB": t[f"{Q}.SCB"].half()}), [f"{Q}.SCB", "float16"]),
    "scb-nan": (lambda t: t[f"{Q}.SCB"].__setitem__(3, float("nan")), [f"{Q}.SCB", "inf or NaN"]),
    "scb-inf": (lambda t: t[f"{Q}.SCB"].__setitem__(0, float("inf")), [f"{Q}.SCB", "inf or NaN"]),
    "scb-negative": (lambda t: t[f"{Q}.SCB"].__setitem__(1, -0.5), [f"{Q}.SCB", "negative"]),
    "scb-zero": (lambda t: t[f"{Q}.SCB"].__setitem__(2, 0.0), [f"{Q}.weight", "SCB 0", "nonzero codes"]),
    "no-weight": (lambda t: t.pop(f"{Q}.weight"), [f"{Q}.SCB", "no int8 weight"]),
    "weight-float": (lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].half()}), [f"{Q}.weight", "float16"]),
    "format-col32": (lambda t: t.update({f"{Q}.weight_format": torch.tensor(1, dtype=torch.uint8)}),
                     [f"{Q}.weight_format", "col32"]),
}


@pytest.fixture(scope="module")
def llama_q(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8-broken")
    base = save_base(tiny_llama(torch.bfloat16), root / "base")
    load_8bit(base).save_pretrained(root / "q")
    adapter = make_adapter(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), root / "lora")
    return SimpleNamespace(q=root / "q", adapter=adapter)


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_broken_int8_files_are_refused(llama_q, broken, tmp_path, capsys):
    edit, named = BROKEN[broken]
    base = Path(shutil.copytree(llama_q.q, tmp_path / "base"))
    tensors = {k: v.clone() for k, v in load_file(base / "model.safetensors").items()}
    edit(tensors)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    for args, out in ((["dequantize", base, tmp_path / "o1"], tmp_path / "o1"),
                      (["merge", base, llama_q.adapter, tmp_path / "o2", "--requantize"], tmp_path / "o2")):
        assert_refused(capsys, args, out, [base, llama_q.adapter], named)


def test_fp16_weight_training_layout_is_refused(llama_q, tmp_path, capsys):
    """transformers saves ``llm_int8_has_fp16_weight`` models as 16-bit weights without SCB under an 8-bit config."""
    plain = save_base(tiny_llama(torch.bfloat16), tmp_path / "plain")
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True)
    AutoModelForCausalLM.from_pretrained(plain, quantization_config=config, device_map="cpu").save_pretrained(
        tmp_path / "base")
    base = tmp_path / "base"
    assert load_file(base / "model.safetensors")[f"{Q}.weight"].dtype == torch.bfloat16
    assert_refused(capsys, ["merge", base, llama_q.adapter, tmp_path / "out"], tmp_path / "out",
                   [base, llama_q.adapter], ["llm_int8_has_fp16_weight"])


def test_requantize_refuses_what_float16_cannot_hold(llama_q, tmp_path, capsys):
    """LLM.int8 quantizes through float16: a merged weight beyond 65504 would get an inf row scale."""
    adapter = Path(shutil.copytree(llama_q.adapter, tmp_path / "adapter"))
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if "layers.0" in k and "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], 1e6)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", llama_q.q, adapter, out, "--requantize"], out, [llama_q.q, adapter],
                   [f"{Q}.weight", "float16"])
