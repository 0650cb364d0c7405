"""MiSS (``MISS``) and the old Bone (``BONE``) against PEFT.

Current format: PEFT 0.21.2 builds the adapter on a tiny Llama (all linear layers), every block gets
non-zero random values, and PEFT's ``merge_and_unload()`` is the reference, in the default mode
(r dividing in_features or not), ``mini`` and ``bat``, on fp32 and bf16 bases.
Old format: ``fixtures/old-bone`` holds Bone adapters written by PEFT 0.15.2 and 0.17.1 with those
versions' own merge output (``scripts/make_old_bone_fixtures.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import MissConfig, PeftModel
from safetensors.torch import load_file, save_file

import wsurgery
from oracle import (
    LLAMA_LINEAR,
    assert_close_to,
    dtypes_fp32_bf16,
    load_all,
    make_adapter,
    oracle_merge,
    reload,
    run_case,
    save_base,
    tiny_llama,
)
from wsurgery.adapters import load_adapter
from wsurgery.checkpoint import open_checkpoint
from wsurgery.engine import execute, plan

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "old-bone"
DTYPES = dtypes_fp32_bf16()
Q = "base_model.model.model.layers.0.self_attn.q_proj.miss_block"


def _residuals(notes: list[str]) -> list[float]:
    """The relative re-merge residuals the bat unmerge reported, one per module."""
    return [float(m.group(1)) for n in notes if (m := re.search(r"\(relative ([0-9.e+-]+)\)", n))]


# -- current PEFT (0.21.2) --------------------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("r", [5, 8], ids=["r5-partial-block", "r8-divides"])
def test_default_mode(tmp_path, dtype, r):
    # tiny Llama: in_features 32 (attention, gate/up) and 48 (down_proj); r=5 leaves 2 and 3 columns over.
    run_case(tmp_path, tiny_llama(dtype), MissConfig(r=r, target_modules=LLAMA_LINEAR), dtype=dtype)


@DTYPES
def test_mini_mode(tmp_path, dtype):
    # out_features 32, 16 and 48 are all multiples of mini_r=8; r=5 also leaves partial input blocks.
    cfg = MissConfig(r=5, mini_r=8, init_weights="mini", target_modules=LLAMA_LINEAR)
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(dtype), cfg, dtype=dtype)
    assert load_file(adapter_dir / "adapter_model.safetensors")[Q].shape == (5, 8)


@DTYPES
def test_bat_mode(tmp_path, dtype):
    cfg = MissConfig(r=8, init_weights="bat", target_modules=LLAMA_LINEAR)
    model = tiny_llama(dtype)
    base_dir, adapter_dir, merged = run_case(tmp_path, model, cfg, dtype=dtype, check_unmerge=False)
    assert load_file(adapter_dir / "adapter_model.safetensors")[Q].shape == (4, 8, 8)
    base = load_all(base_dir)

    result = wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    unmerged = load_all(tmp_path / "unmerged")
    residuals = _residuals(result.notes)
    assert len(residuals) == 2 * len(LLAMA_LINEAR), result.notes
    # The float64 solve re-merges to the merged weight up to float32 rounding of the solution.
    assert max(residuals) < 1e-6, result.notes
    blocks = {k.removeprefix("base_model.model.").removesuffix(".miss_block") + ".weight": v
              for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    _assert_within_bat_bound(unmerged, base, merged, blocks)
    assert all(torch.equal(unmerged[k], base[k]) for k in base if not k.endswith("proj.weight"))


def _ulp(x: float, dtype: torch.dtype) -> float:
    bits = {torch.float32: 23, torch.bfloat16: 7}[dtype]
    return 2.0 ** (torch.tensor(max(x, 1e-30)).log2().floor().item() - bits)


def _assert_within_bat_bound(unmerged, base, merged, blocks):
    """bat unmerge is W = (W' - B)(I + B)^-1 on a W' that was rounded to the file's dtype: the rounding error E
    (|E| <= ulp(W')/2) comes back as E (I+B)^-1, so per r-row tile band i the error is at most
    ulp(max|W'_i|)/2 * ||(I+B_i)^-1||_1, plus the final rounding of W. Checked with a factor 2 of slack; the
    inverse is taken here with torch.linalg.inv, independently of the tool."""
    checked = 0
    for name, block in blocks.items():
        W, Wm, Wu = base[name].double(), merged[name].double(), unmerged[name].double()
        r = block.shape[-1]
        inv_norm = torch.linalg.inv(torch.eye(r, dtype=torch.float64) + block.double()).abs().sum(-2).amax(-1)
        for i in range(block.shape[0]):
            rows = slice(i * r, (i + 1) * r)
            bound = (_ulp(Wm[rows].abs().max().item(), merged[name].dtype) / 2 * inv_norm[i].item()
                     + _ulp(W[rows].abs().max().item(), base[name].dtype) / 2)
            err = (Wu[rows] - W[rows]).abs().max().item()
            assert err <= 2 * bound, f"{name} tile row {i}: error {err:.3g} > 2 x bound {bound:.3g}"
            checked += 1
    assert checked


def test_bat_singular_block_merges_but_refuses_unmerge(tmp_path):
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, MissConfig(r=8, init_weights="bat", target_modules=["q_proj", "v_proj"]),
                               tmp_path / "adapter")
    st = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(st)
    tensors[Q][1] = -torch.eye(8)  # I + B_1 = 0
    save_file(tensors, st)
    expected = oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    assert_close_to(load_all(tmp_path / "merged"), expected)
    with pytest.raises(wsurgery.NotInvertibleError, match=r"q_proj.*singular"):
        wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    assert not (tmp_path / "unmerged").exists()


def test_mode_is_per_adapter(tmp_path):
    """A default-mode and a bat adapter on the same layers (PEFT <= 0.21.2 keeps one miss_fn per layer,
    huggingface/peft#3379): each adapter is applied in its own mode. Reference: PEFT merging them one after
    the other, each into a fresh PEFT model."""
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    targets = ["q_proj", "v_proj", "down_proj"]
    a = make_adapter(model, MissConfig(r=5, target_modules=targets), tmp_path / "a", seed=1)
    b = make_adapter(model, MissConfig(r=8, init_weights="bat", target_modules=targets), tmp_path / "b", seed=2)
    first = PeftModel.from_pretrained(reload(model, base_dir, torch.float32), a).merge_and_unload()
    expected = {k: v.detach() for k, v in PeftModel.from_pretrained(first, b).merge_and_unload().state_dict().items()}

    adapters = [(load_adapter(a), 1.0), (load_adapter(b), 1.0)]
    execute(plan(open_checkpoint(base_dir), adapters, "merge"), tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    assert_close_to(merged, expected)
    execute(plan(open_checkpoint(tmp_path / "merged"), adapters, "unmerge"), tmp_path / "unmerged", progress=False)
    assert_close_to(load_all(tmp_path / "unmerged"), load_all(base_dir), base=merged)


# -- refusals ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    return save_base(tiny_llama(), tmp_path_factory.mktemp("miss") / "base")


def _hand_adapter(folder: Path, block: torch.Tensor, peft_type="MISS", **config) -> Path:
    folder.mkdir(parents=True)
    key = Q if peft_type == "MISS" else Q.replace("miss_block", "bone_block")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": block.shape[-1], **config}))
    save_file({key: block}, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize("block,config,message", [
    (torch.ones(6, 5, 5), {"init_weights": "bat"}, r"q_proj.*5x5 tiles.*\[32, 32\].*divide"),
    (torch.ones(4, 8), {"init_weights": "bat"}, r"q_proj.*\[4, 8\].*bat"),
    (torch.ones(4, 8, 8), {"init_weights": True}, r"q_proj.*\[4, 8, 8\].*init_weights"),
    (torch.ones(5, 7), {"init_weights": "mini", "mini_r": 7}, r"q_proj.*out_features 32.*mini_r"),
    (torch.ones(5, 8), {"init_weights": "mini", "mini_r": 4}, r"q_proj.*mini_r=4.*inconsistent"),
    (torch.ones(40, 32), {"init_weights": True}, r"q_proj.*r=40 > in_features=32"),
    (torch.ones(4, 16), {"init_weights": True}, r"q_proj.*\[4, 16\].*out_features=32"),
], ids=["bat-r-not-dividing", "bat-2d", "default-3d", "mini-not-dividing-out", "mini-r-mismatch", "r-gt-in",
        "wrong-out"])
def test_bad_input_is_one_line_error(tmp_path, llama_base, block, config, message):
    adapter = _hand_adapter(tmp_path / "adapter", block, **config)
    with pytest.raises(wsurgery.InputError, match=message) as info:
        wsurgery.merge(llama_base, adapter, tmp_path / "merged", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "merged").exists()


def test_unknown_mode_and_mini_on_bone_refused(tmp_path, llama_base):
    with pytest.raises(wsurgery.UnsupportedError, match="init_weights='mini'"):
        wsurgery.merge(llama_base, _hand_adapter(tmp_path / "a", torch.ones(4, 8), "BONE", init_weights="mini"),
                       tmp_path / "m1", progress=False)
    with pytest.raises(wsurgery.UnsupportedError, match="init_weights='cat'"):
        wsurgery.merge(llama_base, _hand_adapter(tmp_path / "b", torch.ones(4, 32), init_weights="cat"),
                       tmp_path / "m2", progress=False)


# -- old Bone format, fixtures written by PEFT 0.15.2 / 0.17.1 -------------------------------------------------------

OLD_CASES = sorted(p.parent for p in FIXTURES.glob("peft-*/*/expected.safetensors"))


def test_old_bone_fixtures_present():
    names = {f"{p.parent.name}/{p.name}" for p in OLD_CASES}
    for version in ("peft-0.15.2", "peft-0.17.1"):
        assert {f"{version}/default-fp32", f"{version}/default-bf16", f"{version}/bat-fp32"} <= names
    assert "peft-0.17.1/bat-bf16" in names  # 0.15.2 itself cannot merge bat on bf16 (dtype error in its matmul)


@pytest.mark.parametrize("case", OLD_CASES, ids=[f"{p.parent.name}-{p.name}" for p in OLD_CASES])
def test_old_bone_matches_old_peft(tmp_path, case):
    assert json.loads((case / "adapter" / "adapter_config.json").read_text())["peft_type"] == "BONE"
    assert all(k.endswith(".bone_block") for k in load_file(case / "adapter" / "adapter_model.safetensors"))
    base = load_all(case / "base")
    wsurgery.merge(case / "base", case / "adapter", tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    # PEFT 0.15.2 leaves some bf16 weights in float32 after merging (W + B not cast back when r divides in);
    # the tool keeps the base dtype, so the reference is rounded once, as we round.
    expected = {k: v.to(merged[k].dtype) for k, v in load_file(case / "expected.safetensors").items()}
    assert_close_to(merged, expected, base=base)
    assert {k for k in merged if not torch.equal(merged[k], base[k])} == {f"lin{i}.weight" for i in range(3)}

    result = wsurgery.unmerge(tmp_path / "merged", case / "adapter", tmp_path / "unmerged", progress=False)
    unmerged = load_all(tmp_path / "unmerged")
    if "bat" in case.name:
        assert len(_residuals(result.notes)) == 3 and max(_residuals(result.notes)) < 1e-6, result.notes
    if "bat" in case.name:  # approximate: the rounding of W' comes back amplified by (I+B)^-1
        blocks = {k.removeprefix("base_model.model.").removesuffix(".bone_block") + ".weight": v
                  for k, v in load_file(case / "adapter" / "adapter_model.safetensors").items()}
        _assert_within_bat_bound(unmerged, base, merged, blocks)
        assert all(torch.equal(unmerged[k], base[k]) for k in base if k.endswith("bias"))
    else:
        assert_close_to(unmerged, base, base=merged, ulps=2)
