"""OFT against PEFT: the current format with PEFT 0.21.2 as the oracle, older formats against the merge
results the old PEFT releases wrote themselves (fixtures/old-oft, see scripts/make_old_oft_fixtures.py).

OFT's identity init would make any merge look right, and ``oracle.randomize_adapter``'s std 0.2 makes
the Cayley-Neumann series wander far from a rotation; here every ``oft_R`` gets N(0, 0.08) values, so
every block is a real, clearly non-trivial rotation.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import OFTConfig
from safetensors.torch import load_file, save_file

import oracle
import wsurgery
from oracle import LLAMA_LINEAR, assert_close_to, conv_net, load_all, run_case, tiny_llama
from wsurgery.adapters.loader import load_adapter
from wsurgery.errors import InputError, NotInvertibleError, UnsupportedError
from wsurgery.methods.oft import (OftPatch, block_size_from_triangle, cayley_exact, cayley_neumann, rotate_columns,
                                  rotate_rows, skew_from_triangle)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "old-oft"
STD = 0.08


def _randomize(peft_model, seed: int = 1, std: float = STD) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


@pytest.fixture(autouse=True)
def oft_random_values(monkeypatch):
    monkeypatch.setattr(oracle, "randomize_adapter", _randomize)


def _unmerge_close(tmp_path, adapter_dir, base_dir, *, ulps: float):
    """bf16 unmerge: W' was rounded to bf16, and the inverse rotation mixes the b rounding errors of a
    block, so allow ``ulps`` grid steps at the largest magnitude of the block's row."""
    wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    got, base = load_all(tmp_path / "unmerged"), load_all(base_dir)
    for name, want in base.items():
        if torch.equal(got[name], want):
            continue
        err = (got[name].double() - want.double()).abs()
        scale = want.double().abs().flatten(1).amax(dim=1).view(-1, *[1] * (want.ndim - 1))
        bound = ulps * oracle.ulp(scale, want.dtype)
        assert (err <= bound).all(), f"{name}: {(err / bound).max().item() * ulps:.2f} ulps of the row maximum"


# -- current format (peft >= 0.16, written by PEFT 0.21.2) ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("neumann", [True, False], ids=["neumann", "exact"])
def test_llama_linear(tmp_path, dtype, neumann):
    cfg = OFTConfig(oft_block_size=8, r=0, target_modules=LLAMA_LINEAR, use_cayley_neumann=neumann)
    bf16 = dtype == torch.bfloat16
    base_dir, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype, check_unmerge=not bf16)
    if bf16:
        _unmerge_close(tmp_path, adapter_dir, base_dir, ulps=2)
    notes = wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged2", progress=False).notes
    told = [n for n in notes if "not orthogonal" in n and "exact inverse of every block" in n]
    assert len(told) == (14 if neumann else 0), notes  # one per module
    adapter = load_adapter(adapter_dir)
    info = adapter.patches()[0].describe()
    assert info["block_size"] == 8 and info["stored_blocks"] in (4, 6)
    if neumann:  # the series is visibly not orthogonal at this size, and says so
        assert "peft>=0.18" in info["cayley"] and info["max_abs_RRt_minus_I"] > 1e-4
    else:
        assert info["cayley"] == "exact Cayley" and info["max_abs_RRt_minus_I"] < 1e-12


@pytest.mark.parametrize("terms", [3, 4, 7])
def test_neumann_terms_and_block_share(tmp_path, terms):
    # r=4 blocks: b = 32/4 = 8 for the attention inputs, 48/4 = 12 for down_proj
    cfg = OFTConfig(r=4, oft_block_size=0, block_share=True, num_cayley_neumann_terms=terms,
                    target_modules=["q_proj", "v_proj", "down_proj"])
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(), cfg)
    shapes = {k: tuple(v.shape) for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.oft_R.weight"] == (1, 66)  # b = 12
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"] == (1, 28)  # b = 8


@pytest.mark.parametrize("neumann", [True, False], ids=["neumann", "exact"])
def test_coft_projection(tmp_path, monkeypatch, neumann):
    # radius eps/sqrt(4 blocks) = 0.3; a block's skew matrix has norm ~ 0.08*sqrt(56) = 0.6, so PEFT
    # projects most blocks; the small-valued v_proj stays inside the ball
    cfg = OFTConfig(oft_block_size=8, r=0, coft=True, eps=0.6, use_cayley_neumann=neumann,
                    target_modules=["q_proj", "v_proj", "o_proj"])

    def randomize(peft_model, seed=1, std=STD):
        _randomize(peft_model, seed, std)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "v_proj" in name and p.requires_grad:
                    p.mul_(0.1)

    monkeypatch.setattr(oracle, "randomize_adapter", randomize)
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(), cfg)
    norms = torch.cat([v.double().norm(dim=1) * math.sqrt(2)
                       for v in load_file(adapter_dir / "adapter_model.safetensors").values()])
    assert (norms > 0.3).sum() >= 8 and (norms <= 0.3).sum() >= 4  # both branches of the projection ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv2d_linear_embedding(tmp_path, dtype):
    # c2: 3x3 Conv2d, in*k*k = 36 in 9 blocks of 4; pw: 1x1 Conv2d with 10 inputs, where PEFT adjusts the
    # block size 4 to 5 (the config still says 4: the shape decides); fc: Linear; emb: Embedding, E' = E R.
    # Conv1d/Conv3d are not OFT targets in PEFT.
    cfg = OFTConfig(oft_block_size=4, r=0, target_modules=["c2", "pw", "fc", "emb"])
    bf16 = dtype == torch.bfloat16
    base_dir, adapter_dir, _ = run_case(tmp_path, conv_net(dtype), cfg, dtype=dtype, check_unmerge=not bf16)
    if bf16:
        _unmerge_close(tmp_path, adapter_dir, base_dir, ulps=2)
    shapes = {k: tuple(v.shape) for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.pw.oft_R.weight"] == (2, 10)  # b = 5
    assert shapes["base_model.model.emb.oft_embedding_R.weight"] == (3, 6)
    kinds = {p.module: p.describe()["kind"] for p in load_adapter(adapter_dir).patches()}
    assert kinds["emb"] == "embedding"


def test_llama_embedding_exact_and_block_share(tmp_path):
    cfg = OFTConfig(oft_block_size=16, r=0, use_cayley_neumann=False, block_share=True,
                    target_modules=["embed_tokens", "lm_head", "o_proj"])
    run_case(tmp_path, tiny_llama(), cfg)


# -- older formats: the old PEFT's own merge output ----------------------------------------------------

OLD_CASES = sorted(str(p.relative_to(FIXTURES)) for p in FIXTURES.glob("peft-*/*/") if (p / "adapter").is_dir())


def test_old_fixtures_present():
    assert len(OLD_CASES) == 7, OLD_CASES


@pytest.mark.parametrize("case", OLD_CASES)
def test_old_format_against_old_peft(tmp_path, case):
    folder = FIXTURES / case
    result = wsurgery.merge(folder / "base", folder / "adapter", tmp_path / "merged", progress=False)
    merged, base = load_all(tmp_path / "merged"), load_all(folder / "base")
    expected = load_file(folder / "expected.safetensors")
    assert_close_to(merged, expected)
    assert {n for n in merged if not torch.equal(merged[n], base[n])} == {"fc1.weight", "fc2.weight", "conv.weight"}
    assert result.changed_tensors == 3
    # the rotation is far from the identity: a merge that did nothing would fail by this much
    assert max((expected[n] - base[n]).abs().max().item() for n in base) > 0.02
    wsurgery.unmerge(tmp_path / "merged", folder / "adapter", tmp_path / "unmerged", progress=False)
    assert_close_to(load_all(tmp_path / "unmerged"), base, rel=1e-5)
    fmt = load_adapter(folder / "adapter").patches()[0].describe()["format"]
    version = case.split("/")[0]
    assert {"peft-0.13.2": "peft<=0.13", "peft-0.15.2": "peft 0.14-0.15",
            "peft-0.17.1": "peft>=0.16"}[version] in fmt


def test_old_coft_fixtures_project_some_blocks():
    for path in FIXTURES.glob("peft-*/cases.json"):
        for name, case in json.loads(path.read_text())["cases"].items():
            if case["config"].get("coft"):
                assert case["coft_blocks"]["projected"] > 0 and case["coft_blocks"]["inside"] > 0, (path, name)


def _copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_legacy_neumann_series_is_chosen_by_missing_peft_version(tmp_path):
    """0.16/0.17 configs have no peft_version: with one added (claiming 0.18+), the current series is
    used and the result no longer matches what PEFT 0.17.1 merged."""
    folder = FIXTURES / "peft-0.17.1" / "neumann"
    adapter = _copy_adapter(folder / "adapter", tmp_path / "adapter")
    assert "peft 0.16-0.17 series" in load_adapter(adapter).patches()[0].describe()["cayley"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert "peft_version" not in cfg
    cfg["peft_version"] = "0.18.0"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert "peft>=0.18" in load_adapter(adapter).patches()[0].describe()["cayley"]
    wsurgery.merge(folder / "base", adapter, tmp_path / "merged", progress=False)
    expected = load_file(folder / "expected.safetensors")
    with pytest.raises(AssertionError):
        assert_close_to(load_all(tmp_path / "merged"), expected)


def test_old_015_zero_scale_refuses_unmerge(tmp_path):
    folder = FIXTURES / "peft-0.15.2" / "plain"
    adapter = _copy_adapter(folder / "adapter", tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.fc2.oft_s"][3, 0] = 0.0
    save_file(tensors, adapter / "adapter_model.safetensors")
    wsurgery.merge(folder / "base", adapter, tmp_path / "merged", progress=False)
    with pytest.raises(NotInvertibleError, match="oft_s has 1 zero entry"):
        wsurgery.unmerge(tmp_path / "merged", adapter, tmp_path / "unmerged", progress=False)


def test_old_015_missing_oft_s_is_an_error(tmp_path):
    folder = FIXTURES / "peft-0.15.2" / "plain"
    adapter = _copy_adapter(folder / "adapter", tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    del tensors["base_model.model.fc2.oft_s"]
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(InputError, match="oft_s"):
        load_adapter(adapter)


def test_adapter_on_wrong_base_is_refused_before_writing(tmp_path):
    folder = FIXTURES / "peft-0.17.1" / "neumann"
    base = load_file(folder / "base" / "model.safetensors")
    base["fc1.weight"] = torch.randn(20, 28)  # 28 inputs: 6 blocks of 4 no longer fit
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    with pytest.raises(InputError, match=r"fc1.*oft_R.weight \[6, 6\].*24 input.*\[20, 28\]"):
        wsurgery.merge(tmp_path / "base", folder / "adapter", tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


# -- the building blocks, against dense reference computations -----------------------------------------

def test_triangle_layout_and_block_size():
    assert [block_size_from_triangle(n) for n in (0, 1, 3, 6, 28, 496)] == [1, 2, 3, 4, 8, 32]
    assert block_size_from_triangle(5) is None
    Q = skew_from_triangle(torch.tensor([[1.0, 2.0, 3.0]]), 3)[0]
    assert torch.equal(Q, torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]]))


def test_neumann_series_terms():
    Q = skew_from_triangle(torch.randn(2, 6, dtype=torch.float64) * 0.1, 4)
    eye = torch.eye(4, dtype=torch.float64)
    Q2, Q3, Q4 = Q @ Q, Q @ Q @ Q, Q @ Q @ Q @ Q
    torch.testing.assert_close(cayley_neumann(Q, 5, legacy=False), eye + 2 * Q + 2 * Q2 + 2 * Q3 + Q4)
    torch.testing.assert_close(cayley_neumann(Q, 5, legacy=True), eye + 2 * Q + 2 * Q2 + 2 * Q3 + 2 * Q4)
    torch.testing.assert_close(cayley_neumann(Q, 4, legacy=False), eye + 2 * Q + 2 * Q2 + Q3)
    torch.testing.assert_close(cayley_neumann(Q, 3, legacy=False), eye + 2 * Q + 2 * Q2 + Q3)
    # the series approximates (I+Q)(I-Q)^-1, the transpose of the exact map PEFT uses
    exact = cayley_exact(Q)
    torch.testing.assert_close(cayley_neumann(Q, 40, legacy=False), exact.transpose(-2, -1))


def test_block_application_equals_dense():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 6, 6, generator=g)
    W = torch.randn(7, 30, generator=g)
    want = W @ torch.block_diag(*A).T
    got = W.clone()
    rotate_columns(got, A)
    torch.testing.assert_close(got, want)
    got = W.clone()
    rotate_columns(got, A[:1])  # shared block
    torch.testing.assert_close(got, W @ torch.block_diag(*[A[0]] * 5).T)
    # rows: 4 blocks of 6 cover 24 rows of 22; the last block is cut to its 4x4 corner
    W = torch.randn(22, 9, generator=g)
    dense = torch.block_diag(*A[:4])[:22, :22]
    got = W.clone()
    rotate_rows(got, A[:3], A[3, :4, :4])
    torch.testing.assert_close(got, dense @ W)


def test_bad_adapter_tensors():
    from wsurgery.adapters.config import AdapterConfig
    from wsurgery.methods.base import ModuleParams
    from wsurgery.methods.oft import Oft

    cfg = AdapterConfig(Path("/x/adapter_config.json"), {"peft_type": "OFT", "oft_block_size": 4})
    with pytest.raises(InputError, match="5 entries per block"):
        Oft().patch(ModuleParams("m", {"oft_R.weight": torch.zeros(2, 5)}, cfg))
    with pytest.raises(InputError, match="mixes two OFT formats"):
        Oft().patch(ModuleParams("m", {"oft_R.weight": torch.zeros(2, 6), "oft_r": torch.zeros(2, 4, 4)}, cfg))
    shared = AdapterConfig(Path("/x/adapter_config.json"), {"peft_type": "OFT", "block_share": True})
    with pytest.raises(InputError, match="block_share is set"):
        Oft().patch(ModuleParams("m", {"oft_R.weight": torch.zeros(2, 6)}, shared))
    patch = Oft().patch(ModuleParams("m", {"oft_R.weight": torch.zeros(2, 6)}, cfg))
    assert isinstance(patch, OftPatch)
    with pytest.raises(InputError, match="Linear, Conv2d and Embedding"):
        patch.check({"weight": (3, 2, 4)})
    with pytest.raises(UnsupportedError, match="square kernel"):
        patch.check({"weight": (3, 2, 2, 4)})


def test_v13_singular_cut_block_refuses_unmerge():
    """peft<=0.13 cuts the last block of the output-side rotation to its corner, which can be singular:
    with S = [[0, 1], [-1, 0]] the Cayley rotation is [[0, -1], [1, 0]] and its 1x1 corner is 0."""
    from wsurgery.adapters.config import AdapterConfig
    from wsurgery.methods.base import ModuleParams
    from wsurgery.methods.oft import Oft

    cfg = AdapterConfig(Path("/x/adapter_config.json"), {"peft_type": "OFT", "r": 2})
    M = torch.zeros(2, 2, 2)
    M[0, 0, 1] = 0.3
    M[1, 0, 1] = 2.0
    patch = Oft().patch(ModuleParams("m", {"oft_r": M}, cfg))
    patch.check({"weight": (3, 5)})
    assert "singular" in patch.why_not_invertible()
    W = torch.randn(3, 5)
    merged = patch.apply({"weight": W.clone()})["weight"]
    assert torch.equal(merged[2], torch.zeros(5))  # the corner is 0: row 2 is lost, as in PEFT
    with pytest.raises(NotInvertibleError, match="cut last block.*singular"):
        patch.revert({"weight": merged})
    patch.check({"weight": (4, 5)})  # no cut block: invertible
    assert patch.why_not_invertible() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_bf16_saved_adapter(tmp_path, dtype):
    """An adapter saved in bf16: PEFT upcasts it to fp32 on load, so R is built from the bf16 values in fp32."""
    cfg = OFTConfig(oft_block_size=4, r=0, target_modules=["c2", "fc", "emb"])
    bf16 = dtype == torch.bfloat16
    base_dir, adapter_dir, _ = run_case(tmp_path, conv_net(dtype), cfg, dtype=dtype, adapter_dtype=torch.bfloat16,
                                        check_unmerge=not bf16)
    if bf16:
        _unmerge_close(tmp_path, adapter_dir, base_dir, ulps=2)
    assert {t.dtype for t in load_file(adapter_dir / "adapter_model.safetensors").values()} == {torch.bfloat16}
