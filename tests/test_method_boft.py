"""BOFT against PEFT 0.21.2's ``merge_and_unload()``: Linear (tiny Llama) and Conv2d, block size or
block count, 1, 2 and 3 butterfly factors, fp32 and bf16 bases, and the unmerge round trip.

PEFT only keeps ``boft_n_butterfly_factor > 1`` when its CUDA extension ``fbd_cuda`` compiles; on a
CPU box it silently saves one factor. To test several factors against PEFT itself, the extension is
replaced by what it computes (a batched ``torch.block_diag``), as in the method notes; every other
line of PEFT (permutations, Cayley map, merge) runs unchanged. Single-factor cases run PEFT's own
CPU path (the extension reported missing, without the slow failed compile).
"""

from __future__ import annotations

import json

import oracle
import pytest
import torch
from oracle import load_all, run_case
from peft import BOFTConfig
from safetensors.torch import load_file, save_file
from torch import nn

import wsurgery
from wsurgery.errors import InputError, NotInvertibleError, UnsupportedError
from wsurgery.methods import boft

LLAMA = ["q_proj", "v_proj", "up_proj", "down_proj"]


class _FakeFastBlockDiag:
    """What PEFT's CUDA kernel computes: (N, D, b, b) -> (N, D·b, D·b) block diagonals."""

    @staticmethod
    def apply(blocks):
        return torch.stack([torch.block_diag(*level) for level in blocks])


def randomize_boft(peft_model, seed: int = 1, std: float = 0.08) -> None:
    """boft_R ~ N(0, std) (so the Cayley blocks are real rotations), boft_s = 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "boft_R" in name:
                p.copy_((noise * std).to(p.dtype))
            elif "boft_s" in name:
                p.copy_((1 + 0.1 * noise).to(p.dtype))
            elif name.endswith("bias"):  # bias="boft_only"/"all": trained biases, saved and replaced
                p.copy_((p.float() + 0.1 * noise).to(p.dtype))
                continue
            else:
                raise AssertionError(f"unexpected trainable parameter {name}")
            seen.add(name.split(".")[-2])
    assert seen == {"boft_R", "boft_s"}


@pytest.fixture
def peft_boft(monkeypatch):
    """Set up PEFT for BOFT: our randomisation, and a stand-in for fbd_cuda when factors > 1."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(oracle, "randomize_adapter", randomize_boft)

    def use(factors: int):
        if factors > 1:
            monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
            monkeypatch.setattr(boft_layer, "FastBlockDiag", _FakeFastBlockDiag)
        else:  # PEFT's CPU path, as when the extension fails to build
            monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)

    return use


def _saved(adapter_dir) -> dict[str, torch.Tensor]:
    return load_file(adapter_dir / "adapter_model.safetensors")


def _check_saved_shapes(adapter_dir, factors: int, block_size: int | None = None, block_num: int | None = None):
    tensors = _saved(adapter_dir)
    Rs = [t for k, t in tensors.items() if k.endswith("boft_R")]
    assert Rs, "no boft_R saved"
    for R in Rs:
        assert R.shape[0] == factors, f"PEFT saved {R.shape[0]} butterfly factors, the test wanted {factors}"
        assert block_size is None or R.shape[2] == block_size
        assert block_num is None or R.shape[1] == block_num
    return tensors


def check_low_precision_unmerge(tmp_path, adapter_dir) -> None:
    """Unmerge of a bf16 merge: the rounding of W' (half an ulp per element) is mixed along each row by
    the inverse rotation, so the per-element ``2 ulps`` rule cannot hold. Bound instead, per element:
    one ulp of the result plus ‖half-ulps of the merged row‖₂ / |s| (Cauchy-Schwarz; the columns of the
    inverse rotation have norm 1). A wrong permutation or block would be off by ~|W|, far above it."""
    wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    base, merged, unmerged = load_all(tmp_path / "base"), load_all(tmp_path / "merged"), load_all(tmp_path / "unmerged")
    scales = {k.removeprefix("base_model.model.").removesuffix(".boft_s"): v
              for k, v in _saved(adapter_dir).items() if k.endswith("boft_s")}
    assert scales
    for name, want in base.items():
        got = unmerged[name]
        assert got.dtype == want.dtype and got.shape == want.shape
        module = name.removesuffix(".weight")
        if module not in scales or not name.endswith(".weight"):
            assert torch.equal(got, want), f"{name}: changed by the unmerge"
            continue
        rows = want.shape[0]
        merged_half_ulps = oracle.ulp(merged[name].reshape(rows, -1), want.dtype) / 2
        spread = merged_half_ulps.norm(dim=1, keepdim=True) / scales[module].double().abs().reshape(rows, 1)
        bound = oracle.ulp(want.reshape(rows, -1), want.dtype) + spread * 1.001
        err = (got.double() - want.double()).abs().reshape(rows, -1)
        worst = (err / bound).max().item()
        assert worst <= 1.0, f"{name}: unmerge error {worst:.2f}x the propagated rounding bound"


# -- Linear (tiny Llama: hidden 32, intermediate 48) ---------------------------------------------------------------

LINEAR_CASES = [
    # (factors, block_size, block_num)
    (1, 4, 0),
    (1, 0, 4),
    (2, 4, 0),
    (2, 0, 4),
    (3, 2, 0),
]


@pytest.mark.parametrize("factors,block_size,block_num", LINEAR_CASES,
                         ids=[f"N{n}-{'bs' if bs else 'bn'}{bs or bn}" for n, bs, bn in LINEAR_CASES])
def test_llama_linear_fp32(tmp_path, peft_boft, factors, block_size, block_num):
    peft_boft(factors)
    cfg = BOFTConfig(boft_block_size=block_size, boft_block_num=block_num, boft_n_butterfly_factor=factors,
                     target_modules=LLAMA)
    _, adapter_dir, _ = run_case(tmp_path, oracle.tiny_llama(), cfg)
    _check_saved_shapes(adapter_dir, factors, block_size or None, block_num or None)


@pytest.mark.parametrize("factors,block_size,block_num", [(1, 8, 0), (2, 0, 4)], ids=["N1-bs8", "N2-bn4"])
def test_llama_linear_bf16(tmp_path, peft_boft, factors, block_size, block_num):
    peft_boft(factors)
    cfg = BOFTConfig(boft_block_size=block_size, boft_block_num=block_num, boft_n_butterfly_factor=factors,
                     target_modules=LLAMA)
    _, adapter_dir, _ = run_case(tmp_path, oracle.tiny_llama(torch.bfloat16), cfg, dtype=torch.bfloat16,
                                 check_unmerge=False)
    _check_saved_shapes(adapter_dir, factors)
    check_low_precision_unmerge(tmp_path, adapter_dir)


# -- Conv2d ------------------------------------------------------------------------------------------------------


class BoftConvNet(nn.Module):
    """Channel counts BOFT accepts: in·k·k = 72 (3x3) and 16 (1x1), and a Linear with 24 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.pw = nn.Conv2d(16, 5, 1)
        self.fc = nn.Linear(24, 7)


def boft_conv_net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return BoftConvNet().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("factors", [1, 2])
def test_conv2d_block_size(tmp_path, peft_boft, dtype, factors):
    peft_boft(factors)
    cfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=factors, target_modules=["conv", "pw", "fc"])
    low = dtype != torch.float32
    _, adapter_dir, _ = run_case(tmp_path, boft_conv_net(dtype), cfg, dtype=dtype, check_unmerge=not low)
    if low:
        check_low_precision_unmerge(tmp_path, adapter_dir)
    tensors = _check_saved_shapes(adapter_dir, factors, block_size=4)
    assert tensors["base_model.model.conv.boft_R"].shape[1] == 18  # 8·3·3 / 4
    assert tensors["base_model.model.conv.boft_s"].shape == (1, 6)  # Conv2d keeps s as (1, out)
    assert tensors["base_model.model.fc.boft_s"].shape == (7, 1)


def test_conv2d_block_num_two_factors(tmp_path, peft_boft, monkeypatch):
    peft_boft(2)
    monkeypatch.setattr(boft, "CHUNK_ELEMENTS", 100)  # one output row per chunk, merge and unmerge
    cfg = BOFTConfig(boft_block_size=0, boft_block_num=6, boft_n_butterfly_factor=2, target_modules=["conv"])
    _, adapter_dir, _ = run_case(tmp_path, boft_conv_net(), cfg)
    _check_saved_shapes(adapter_dir, 2, block_size=12, block_num=6)


def test_bf16_adapter_on_fp32_conv_net_with_trained_biases(tmp_path, peft_boft):
    """A bf16-saved adapter (PEFT upcasts it to fp32 on load) and bias="boft_only" (the trained biases of
    the targeted layers replace the base's; unmerging those is refused: the originals are not saved)."""
    peft_boft(2)
    cfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["conv", "fc"], bias="boft_only")
    _, adapter_dir, _ = run_case(tmp_path, boft_conv_net(), cfg, adapter_dtype=torch.bfloat16,
                                 check_unmerge=False)
    tensors = _check_saved_shapes(adapter_dir, 2)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert "base_model.model.conv.base_layer.bias" in tensors
    with pytest.raises(NotInvertibleError, match=r"replaces (conv|fc)\.bias"):
        wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)


# -- the CPU quirk, inspect, unmerge refusal, bad input ------------------------------------------------------------


def test_config_asks_two_factors_but_cpu_saved_one(tmp_path, peft_boft):
    """On a box without fbd_cuda PEFT saves one factor for a config asking two; the tensor rules."""
    peft_boft(1)
    cfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"])
    _, adapter_dir, _ = run_case(tmp_path, oracle.tiny_llama(), cfg)
    _check_saved_shapes(adapter_dir, 1)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 2
    info = wsurgery.inspect(adapter_dir, base=tmp_path / "base")
    module = info["modules"][0]
    assert module["butterfly_factors"] == 1 and module["config_butterfly_factor"] == 2


def test_describe_reports_orthogonality(tmp_path, peft_boft):
    peft_boft(2)
    cfg = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "down_proj"])
    _, adapter_dir, _ = run_case(tmp_path, oracle.tiny_llama(), cfg, check_unmerge=False)
    info = wsurgery.inspect(adapter_dir, base=tmp_path / "base")
    assert info["unmerge"] == "exact"
    by_module = {m["module"]: m for m in info["modules"]}
    down = by_module["model.layers.0.mlp.down_proj"]
    assert (down["butterfly_factors"], down["block_num"], down["block_size"], down["in_features"]) == (2, 12, 4, 48)
    for m in info["modules"]:
        assert 0 < m["orthogonality_deviation"] < 1e-6  # float32 Cayley blocks: rounding only
    result = wsurgery.merge(tmp_path / "base", adapter_dir, tmp_path / "again", progress=False)
    assert not [n for n in result.notes if "orthogonal" in n]


def test_zero_scale_merges_but_refuses_unmerge(tmp_path, peft_boft):
    peft_boft(1)
    cfg = BOFTConfig(boft_block_size=4, target_modules=["v_proj"])
    model = oracle.tiny_llama()
    base_dir = oracle.save_base(model, tmp_path / "base")
    adapter_dir = oracle.make_adapter(model, cfg, tmp_path / "adapter")
    tensors = _saved(adapter_dir)
    key = "base_model.model.model.layers.1.self_attn.v_proj.boft_s"
    tensors[key][3, 0] = 0.0
    save_file(tensors, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    expected = oracle.oracle_merge(oracle.reload(model, base_dir, torch.float32), adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    oracle.assert_close_to(merged, expected)
    assert torch.all(merged["model.layers.1.self_attn.v_proj.weight"][3] == 0)
    with pytest.raises(NotInvertibleError, match=r"v_proj.*boft_s has 1 zero entry"):
        wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    assert not (tmp_path / "unmerged").exists()


def _adapter_with(tmp_path, peft_boft, edit):
    peft_boft(1)
    cfg = BOFTConfig(boft_block_size=4, target_modules=["q_proj"])
    model = oracle.tiny_llama()
    base_dir = oracle.save_base(model, tmp_path / "base")
    adapter_dir = oracle.make_adapter(model, cfg, tmp_path / "adapter")
    tensors = _saved(adapter_dir)
    edit(tensors)
    save_file(tensors, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    return base_dir, adapter_dir


Q0 = "base_model.model.model.layers.0.self_attn.q_proj."


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(Q0 + "boft_s"), r"q_proj.*lacks \['boft_s'\]"),
    (lambda t: t.update({Q0 + "boft_s": t[Q0 + "boft_s"].T.contiguous()}), r"q_proj: boft_s is \[1, 32\]"),
    (lambda t: t.update({Q0 + "boft_R": t[Q0 + "boft_R"][:, :6].contiguous()}),
     r"q_proj: boft_R \[1, 6, 4, 4\] rotates 6·4 = 24 inputs but the base weight \[32, 32\]"),
    (lambda t: t.update({Q0 + "boft_R": t[Q0 + "boft_R"][..., :3].contiguous()}), r"boft_R is \[1, 8, 4, 3\]"),
    (lambda t: t.update({Q0 + "boft_R": torch.cat([t[Q0 + "boft_R"]] * 5)}), r"multiple of 2\^4"),
], ids=["missing-s", "s-transposed", "R-wrong-size", "R-not-square", "factors-vs-blocks"])
def test_bad_adapter_tensors(tmp_path, peft_boft, edit, message):
    base_dir, adapter_dir = _adapter_with(tmp_path, peft_boft, edit)
    with pytest.raises(InputError, match=message):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_unknown_boft_tensor_is_refused_not_read_as_a_module(tmp_path, peft_boft):
    """A tensor with BOFT's prefix that wsurgery does not know (a newer PEFT?) is refused by its key."""
    base_dir, adapter_dir = _adapter_with(tmp_path, peft_boft,
                                          lambda t: t.update({Q0 + "boft_extra": t[Q0 + "boft_s"].clone()}))
    with pytest.raises(UnsupportedError, match=r"'base_model\.model\..*q_proj\.boft_extra'.*prefix 'boft_'"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
