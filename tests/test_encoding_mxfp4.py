"""MXFP4 (gpt-oss's MoE experts) against transformers, PEFT and the hub kernel's quantizer.

Oracles:
* decode: transformers' ``convert_moe_packed_tensors``, and a tiny GptOss loaded by transformers with
  ``Mxfp4Config(dequantize=True)`` (its parameters, its logits), element for element;
* encode / ``merge --requantize``: ``downcast_to_mxfp_torch`` of the ``kernels-community/gpt-oss-triton-kernels``
  hub kernel (version 1), which transformers' ``quantize_to_mxfp4`` calls. The hub cannot be reached in a test and
  the function needs no GPU, so it is reproduced below (``_reference_downcast``) from that kernel's source
  (github.com/huggingface/kernels-community, gpt-oss-triton-kernels/torch-ext/gpt_oss_triton_kernels/
  numerics_details/mxfp.py at 40d4194, MIT), its fp4 path only, ``triton.cdiv`` written out;
* merge: PEFT merging a LoRA (``target_parameters`` on the experts, ``target_modules`` on attention) into the
  model transformers dequantizes.
The tiny checkpoint is stored as gpt-oss is: ``*_blocks`` (E, N, K/32, 16) + ``*_scales`` (E, N, K/32), plain
biases, ``quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [...]}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_close_to, load_all, make_adapter, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import wsurgery
from wsurgery.checkpoint import open_checkpoint
from wsurgery.quant.encodings import EncodedTensorInfo
from wsurgery.quant.encodings.mxfp4 import Mxfp4

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel
from transformers import (
    AutoModelForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    Mxfp4Config,
)
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

EXPERTS = ("gate_up_proj", "down_proj")
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


# --- the reference quantizer (hub kernel gpt-oss-triton-kernels v1, fp4 path) --------------------------------------

def _right_shift_unsigned(x, shift):
    return (x >> shift) & ((1 << (32 - shift)) - 1)


def _reference_downcast(src_tensor: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``downcast_to_mxfp_torch(src_tensor, torch.uint8, axis)`` (ROUND_UP), as the hub kernel has it."""
    ndim = src_tensor.ndim
    axis = axis if axis >= 0 else axis + ndim
    device = src_tensor.device
    src = src_tensor.transpose(axis, src_tensor.ndim - 1).to(torch.float32)
    axis_shape = src.shape[-1]
    next_multiple = -(-axis_shape // 32) * 32
    pad_amount = next_multiple - axis_shape
    padded_src = F.pad(src, (0, pad_amount))
    valid_mask = F.pad(torch.ones_like(src, dtype=torch.bool), (0, pad_amount))
    padded_axis_shape = padded_src.size(-1)
    abs_f = torch.abs(padded_src)
    abs_f = torch.where(valid_mask, abs_f, torch.tensor(-1.0, device=device, dtype=padded_src.dtype))
    new_shape = padded_src.shape[:-1] + (padded_axis_shape // 32, 32)
    abs_groups = abs_f.view(*new_shape)
    max_val, _ = abs_groups.max(dim=-1, keepdim=True)
    dequant_scale = max_val / 6.0
    ds_int = dequant_scale.view(torch.int32)
    ds_int_rounded = (ds_int + 0x007FFFFF) & 0x7F800000
    dequant_scale_rounded = ds_int_rounded.view(torch.float32)
    quant_scale = torch.where(dequant_scale_rounded == 0, torch.tensor(0.0, device=device), 1.0 / dequant_scale_rounded)
    orig_padded_shape = padded_src.shape
    padded_src_groups = padded_src.view(*new_shape)
    quant_tensor = padded_src_groups * quant_scale
    quant_tensor = quant_tensor.view(orig_padded_shape)
    quant_tensor = quant_tensor[..., :axis_shape]
    q_int = quant_tensor.contiguous().view(torch.int32)
    signs = q_int & 0x80000000
    exponents = _right_shift_unsigned(q_int, 23) & 0xFF
    mantissas = q_int & 0x7FFFFF
    E8_BIAS = 127
    E2_BIAS = 1
    mantissas = torch.where(exponents < E8_BIAS, (0x400000 | _right_shift_unsigned(mantissas, 1)) >>
                            (E8_BIAS - exponents - 1), mantissas)
    exponents = torch.maximum(exponents, torch.tensor(E8_BIAS - E2_BIAS, device=device)) - (E8_BIAS - E2_BIAS)
    e2m1_tmp = _right_shift_unsigned(((exponents << 2) | _right_shift_unsigned(mantissas, 21)) + 1, 1)
    e2m1_tmp = torch.minimum(e2m1_tmp, torch.tensor(0x7, device=device))
    e2m1_value = (_right_shift_unsigned(signs, 28) | e2m1_tmp).to(torch.uint8)
    e2m1_value = e2m1_value.view(*e2m1_value.shape[:-1], axis_shape // 2, 2)
    evens = e2m1_value[..., 0]
    odds = e2m1_value[..., 1]
    out_weight = evens | (odds << 4)
    dq_scale = (ds_int_rounded.view(*dequant_scale.shape) >> 23).to(torch.uint8)
    dq_scale = dq_scale.squeeze(-1)
    out_weight = out_weight.transpose(axis, src_tensor.ndim - 1)
    dq_scale = dq_scale.transpose(axis, src_tensor.ndim - 1)
    return out_weight, dq_scale


def reference_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A logical (E, K, N) expert tensor as gpt-oss stores it: transformers' ``quantize_to_mxfp4``
    (bfloat16, axis 1), laid out as its ``Mxfp4ReverseDeserialize`` saves it."""
    blocks, scales = _reference_downcast(w.to(torch.bfloat16), axis=1)
    scales = scales.transpose(-1, -2).contiguous()
    return blocks.transpose(-1, -2).reshape(*scales.shape, -1).contiguous(), scales


# --- the tiny gpt-oss ----------------------------------------------------------------------------------------------

def _tiny_gpt_oss() -> GptOssForCausalLM:
    """hidden 64, intermediate 96 (gate_up (E, 64, 192) and down (E, 96, 64) differ in every dim), 4 experts; the
    experts' magnitudes spread over many scales, so the e8m0 exponents vary."""
    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=64, sliding_window=8, tie_word_embeddings=False,
                       layer_types=["sliding_attention", "full_attention"])
    model = GptOssForCausalLM(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(EXPERTS):
                p.mul_(torch.exp2(torch.randint(-3, 6, p.shape[:-1] + (1,), generator=g).float()))
    return model.to(torch.bfloat16)


def _save_mxfp4(model: GptOssForCausalLM, folder: Path) -> Path:
    folder.mkdir(parents=True)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.endswith(EXPERTS):
            out[f"{name}_blocks"], out[f"{name}_scales"] = reference_quantize(t)
        else:
            out[name] = t.detach().contiguous()
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    config["architectures"] = ["GptOssForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _dequantized(folder: Path) -> GptOssForCausalLM:
    """What transformers makes of an MXFP4 checkpoint on a CPU: ``convert_moe_packed_tensors`` at load."""
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _save_mxfp4(_tiny_gpt_oss(), tmp_path_factory.mktemp("mxfp4") / "base")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


# --- the arithmetic ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_bit_exact_to_transformers_every_scale_and_byte(dtype):
    """Every e8m0 scale (0..254) with every code byte, against ``convert_moe_packed_tensors``."""
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 255, 16, 16).contiguous()
    scales = torch.arange(255, dtype=torch.uint8).view(1, 255, 1).expand(2, 255, 16).contiguous()
    scales[1] = scales[1].flip(0)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    info = _info("x.experts.down_proj", dtype, tuple(expected.shape), blocks, scales)
    read = _reader(blocks, scales)
    assert _same(Mxfp4().decode(info, read), expected)
    for rows in ((0, 1), (1, 2)):  # one expert at a time: that slice of the whole
        assert _same(Mxfp4().decode(info, read, rows), expected[rows[0]:rows[1]])


def _info(name: str, dtype: torch.dtype, shape: tuple[int, ...], blocks: torch.Tensor,
          scales: torch.Tensor) -> EncodedTensorInfo:
    from wsurgery.checkpoint.safetensors_file import TensorInfo

    parts = {role: TensorInfo(f"{name}_{role}", t.dtype, tuple(t.shape), Path("x"), 0)
             for role, t in (("blocks", blocks), ("scales", scales))}
    return EncodedTensorInfo(name, dtype, shape, parts, Mxfp4())


def _reader(blocks: torch.Tensor, scales: torch.Tensor):
    def read(part, rows=None):
        t = blocks if part.name.endswith("_blocks") else scales
        return t if rows is None else t[rows[0]:rows[1]]
    return read


def _awkward(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values the quantizer must round alike: exact e2m1 points and the midpoints between them (ties), every
    bfloat16 exponent from subnormal to huge, zeros and negative zeros, whole-zero blocks."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    grid = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 5.9, 6.1])
    kind = torch.randint(0, 3, (n,), generator=g)
    mant = torch.where(kind == 0, grid[torch.randint(0, len(grid), (n,), generator=g)], torch.rand(n, generator=g) * 8)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    exp = torch.randint(-140, 120, (n,), generator=g).float()
    x = (sign * mant * torch.exp2(exp)).reshape(shape)
    flat = x.view(-1)
    flat[: n // 50] = 0.0
    flat[n // 50: n // 25] = -0.0
    x.view(shape[0], -1)[-1, :64] = 0.0
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_encode_byte_identical_to_reference_quantizer(dtype):
    w = _awkward((3, 96, 40), seed=1)
    if dtype == torch.float16:
        w = w.clamp(-60000, 60000)
    w = w.to(dtype)
    blocks, scales = reference_quantize(w)
    got = Mxfp4().encode("m.experts.down_proj", w)
    assert sorted(got) == ["m.experts.down_proj_blocks", "m.experts.down_proj_scales"]
    assert torch.equal(got["m.experts.down_proj_blocks"], blocks)
    assert torch.equal(got["m.experts.down_proj_scales"], scales)
    specs = Mxfp4().stored_specs("m.experts.down_proj", tuple(w.shape), dtype)
    assert [(s.name, s.dtype, s.shape) for s in specs] == [(n, t.dtype, tuple(t.shape)) for n, t in sorted(got.items())]
    for e in range(3):  # one expert at a time gives the same bytes, at that expert's row
        rows = Mxfp4().encode_rows("m.experts.down_proj", w[e:e + 1], (e, e + 1), tuple(w.shape))
        assert rows["m.experts.down_proj_blocks"][1] == e and torch.equal(rows["m.experts.down_proj_blocks"][0],
                                                                            blocks[e:e + 1])
        assert torch.equal(rows["m.experts.down_proj_scales"][0], scales[e:e + 1])
    assert Mxfp4().encode_row_chunk(tuple(w.shape)) == 1


def test_encode_every_bfloat16_value():
    """All 65,536 bfloat16 bit patterns but inf/NaN, in blocks with small and large maxima."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = values[torch.isfinite(values)]
    g = torch.Generator().manual_seed(2)
    values = values[torch.randperm(len(values), generator=g)]
    values = F.pad(values, (0, -len(values) % 1024)).reshape(1, -1, 32)  # (E=1, K, N=32): blocks along K
    for w in (values, values.sort(dim=1).values):  # sorted: similar magnitudes share a block
        blocks, scales = reference_quantize(w)
        got = Mxfp4().encode("e.down_proj", w)
        assert torch.equal(got["e.down_proj_blocks"], blocks) and torch.equal(got["e.down_proj_scales"], scales)


def test_encode_refuses_non_finite_and_bad_shapes():
    w = torch.zeros(2, 64, 8)
    w[1, 3, 2] = float("nan")
    with pytest.raises(wsurgery.InputError, match="expert 1 holds inf or NaN"):
        Mxfp4().encode("m.experts.gate_up_proj", w)
    with pytest.raises(wsurgery.InputError, match="expert 1 holds inf or NaN"):
        Mxfp4().encode_rows("m.experts.gate_up_proj", w[1:], (1, 2), tuple(w.shape))
    with pytest.raises(wsurgery.InputError, match="expert 0 holds inf or NaN"):  # finite, but not in bfloat16
        Mxfp4().encode("m.experts.gate_up_proj", torch.full((1, 32, 2), 3.4e38))
    with pytest.raises(wsurgery.InputError, match="multiple of 32"):
        Mxfp4().encode("m.experts.gate_up_proj", torch.zeros(2, 48, 8))
    with pytest.raises(wsurgery.InputError, match="multiple of 32"):
        Mxfp4().stored_specs("m.experts.gate_up_proj", (64, 8), torch.bfloat16)


# --- the checkpoint, through the CLI ---------------------------------------------------------------------------------

def test_decoded_checkpoint_equals_transformers_dequantized_model(base, capsys):
    ckpt = open_checkpoint(base)
    params = dict(_dequantized(base).named_parameters())
    names = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in EXPERTS]
    for name in names:
        info = ckpt.tensors[name]
        assert isinstance(info, EncodedTensorInfo) and isinstance(info.encoding, Mxfp4)
        want = params[name].detach()
        assert (info.shape, info.dtype) == (tuple(want.shape), want.dtype)
        assert _same(ckpt.read(name), want), name
        assert _same(info.encoding.decode(info, ckpt.read_part, (1, 3)), want[1:3])
        assert info.encoding.row_chunk(info) == 1
    assert not any(n.endswith(("_blocks", "_scales")) for n in ckpt.tensors)
    code, out, err = run_cli(["inspect", base], capsys)
    assert code == 0, err
    assert "4 weights encoded (4 as mxfp4" in out
    line = next(x for x in out.splitlines() if "experts.gate_up_proj " in x)
    assert "[4, 64, 192]" in line and "[mxfp4 e2m1" in line


def test_blocks_and_scales_in_different_shards(base, tmp_path):
    """gpt-oss-120b's shards split a layer's tensors across files; a weight's blocks and scales may be apart."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    tensors = load_file(base / "model.safetensors")
    first = {k: v for k, v in tensors.items() if not k.endswith("_scales")}
    second = {k: v for k, v in tensors.items() if k.endswith("_scales")}
    save_file(first, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(second, folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(first, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(second, "model-00002-of-00002.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text((base / "config.json").read_text())
    ckpt, whole = open_checkpoint(folder), open_checkpoint(base)
    for name in (f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in EXPERTS):
        assert _same(ckpt.read(name), whole.read(name)), name


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decoded_dtype_is_the_models(base, tmp_path, dtype):
    """transformers decodes into the parameter's dtype, config.json's by default."""
    other = _damaged(base, tmp_path / "other", lambda t: None, lambda c: c.update(dtype=dtype))
    ckpt = open_checkpoint(other)
    params = dict(_dequantized(other).named_parameters())
    for name in (f"model.layers.1.mlp.experts.{p}" for p in EXPERTS):
        assert ckpt.tensors[name].dtype == getattr(torch, dtype)
        assert _same(ckpt.read(name), params[name].detach()), name


def test_dequantize_loads_plainly_and_gives_transformers_logits(base, tmp_path, capsys):
    code, _, err = run_cli(["dequantize", base, tmp_path / "plain"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(tmp_path / "plain" / "model.safetensors", "pt") as f:
        assert not any(k.endswith(("_blocks", "_scales")) for k in f.keys())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    reference = _dequantized(base)
    want = dict(reference.named_parameters())
    for name, p in plain.named_parameters():
        assert _same(p.detach(), want[name].detach()), name
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = plain(ids).logits, reference(ids).logits
    assert torch.equal(ours, theirs)


def _lora(targets_experts: tuple[str, ...] = EXPERTS) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      target_parameters=[f"mlp.experts.{p}" for p in targets_experts])


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    merged = PeftModel.from_pretrained(_dequantized(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def test_merge_equals_peft_on_transformers_dequantized_model(base, tmp_path, capsys):
    adapter = make_adapter(_dequantized(base), _lora(), tmp_path / "lora")
    code, _, err = run_cli(["merge", base, adapter, tmp_path / "merged"], capsys)
    assert code == 0, err
    ours = load_all(tmp_path / "merged")
    expected = _peft_merged(base, adapter)
    before = {n: p.detach() for n, p in _dequantized(base).named_parameters()}
    changed = [n for n in ours if n.endswith((".q_proj.weight", ".v_proj.weight", *EXPERTS))]
    assert len(changed) == 8
    for n in changed:  # the adapter did change them
        assert not torch.equal(expected[n], before[n]), n
    assert_close_to({n: ours[n] for n in changed}, expected, base=before)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    code, out, err = run_cli(["verify", base, adapter, tmp_path / "merged"], capsys)
    assert code == 0, err + out


def test_merge_requantize_is_the_reference_quantizer_of_the_merge(base, tmp_path, capsys):
    adapter = make_adapter(_dequantized(base), _lora(("gate_up_proj",)), tmp_path / "lora")
    assert run_cli(["merge", base, adapter, tmp_path / "plain"], capsys)[0] == 0
    code, _, err = run_cli(["merge", base, adapter, tmp_path / "re", "--requantize"], capsys)
    assert code == 0, err
    re_, orig, plain = load_file(tmp_path / "re" / "model.safetensors"), load_file(base / "model.safetensors"), \
        load_all(tmp_path / "plain")
    assert sorted(re_) == sorted(orig)
    peft_merged = _peft_merged(base, adapter)
    for i in range(2):
        name = f"model.layers.{i}.mlp.experts.gate_up_proj"
        blocks, scales = reference_quantize(plain[name])
        assert torch.equal(re_[f"{name}_blocks"], blocks) and torch.equal(re_[f"{name}_scales"], scales), name
        assert not torch.equal(blocks, orig[f"{name}_blocks"])
        # PEFT's merge rounds ΔW to bfloat16 before adding it, we round W + ΔW once (the two are within an ulp, see
        # the merge test): where they agree, the reference quantizer of PEFT's merge gives our bytes
        peft_blocks, peft_scales = reference_quantize(peft_merged[name])
        ours_v, peft_v = (_by_block(t) for t in (plain[name], peft_merged[name]))
        same_max = ours_v.abs().amax(-1) == peft_v.abs().amax(-1)
        assert torch.equal(peft_scales[same_max], scales[same_max]) and same_max.float().mean() > 0.5
        same = (_bits(ours_v) == _bits(peft_v)) & (peft_scales == scales).unsqueeze(-1)
        assert torch.equal(_codes(peft_blocks)[same], _codes(blocks)[same]) and same.float().mean() > 0.5
    for name, t in orig.items():  # unchanged: the expert down_proj codes, biases, embeddings, k/o projections...
        if not (".q_proj." in name or ".v_proj." in name or "gate_up_proj_" in name) or name.endswith("_bias"):
            assert _same(re_[name], t), name
    config = json.loads((tmp_path / "re" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    reloaded = dict(_dequantized(tmp_path / "re").named_parameters())
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert _same(reloaded[name].detach(), convert_moe_packed_tensors(re_[f"{name}_blocks"], re_[f"{name}_scales"]))


def _by_block(w: torch.Tensor) -> torch.Tensor:
    """A logical (E, K, N) tensor as (E, N, K/32, 32): the values of each stored block."""
    e, k, n = w.shape
    return w.transpose(1, 2).reshape(e, n, k // 32, 32)


def _codes(blocks: torch.Tensor) -> torch.Tensor:
    """Stored (E, N, G, 16) bytes as (E, N, G, 32) e2m1 codes, low nibble first."""
    return torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 32)


# --- refusals --------------------------------------------------------------------------------------------------------

def _damaged(base: Path, folder: Path, edit, config_edit=None) -> Path:
    folder.mkdir()
    tensors = load_file(base / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


_L0 = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop(f"{_L0}_scales"), "has no .*gate_up_proj_scales"),
    (lambda t: t.pop(f"{_L0}_blocks"), "has no .*gate_up_proj_blocks"),
    (lambda t: t.update({f"{_L0}_blocks": t[f"{_L0}_blocks"].reshape(4, 192, 1, 32)}), "32 values per block"),
    (lambda t: t.update({f"{_L0}_scales": t[f"{_L0}_scales"][:, :, :1].contiguous()}), "one scale per block"),
    (lambda t: t.update({f"{_L0}_scales": t[f"{_L0}_scales"].to(torch.int16)}), "uint8"),
    (lambda t: t.update({f"{_L0}_blocks": t[f"{_L0}_blocks"][:3].contiguous(),
                         f"{_L0}_scales": t[f"{_L0}_scales"][:3].contiguous()}), "config.json"),
    (lambda t: t.update({"model.layers.0.mlp.experts.up_proj_blocks": t[f"{_L0}_blocks"].clone(),
                         "model.layers.0.mlp.experts.up_proj_scales": t[f"{_L0}_scales"].clone()}),
     "only for the experts'"),
])
def test_broken_parts_refused_when_opened(base, tmp_path, edit, message):
    bad = _damaged(base, tmp_path / "bad", edit)
    with pytest.raises(wsurgery.InputError, match=message):
        open_checkpoint(bad)


def test_nan_scale_refused_and_nothing_written(base, tmp_path, capsys):
    def nan_scale(t):
        t[f"{_L0}_scales"][2, 5, 1] = 255

    bad = _damaged(base, tmp_path / "bad", nan_scale)
    code, out, err = run_cli(["dequantize", bad, tmp_path / "out"], capsys)
    errors = [line for line in (err + out).replace("\r", "\n").splitlines() if "error" in line]
    assert code != 0 and len(errors) == 1 and "expert 2 has an e8m0 scale of 255" in errors[0]
    assert not (tmp_path / "out").exists()


def test_without_mxfp4_config_blocks_are_not_decoded(base, tmp_path, capsys):
    """``*_blocks`` without quant_method mxfp4 is not what transformers dequantizes: left to the refusal of
    encodings not decoded, never read as plain tensors."""
    bad = _damaged(base, tmp_path / "bad", lambda t: None, lambda c: c.pop("quantization_config"))
    ckpt = open_checkpoint(bad)
    assert f"{_L0}_blocks" in ckpt.tensors and _L0 not in ckpt.tensors
    code, out, err = run_cli(["dequantize", bad, tmp_path / "out"], capsys)
    assert code != 0 and "nothing to dequantize" in err + out and not (tmp_path / "out").exists()
