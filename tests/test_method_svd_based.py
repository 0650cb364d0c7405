"""OSF, PSOFT, FRoD and AdaMSS: the methods whose change is rebuilt from the base weight itself (an SVD, a
solve against a shared basis, a clustering), against PEFT 0.21.2's merge_and_unload().

fp32 bases must agree with PEFT to the brief's 1e-5 (OSF, PSOFT and FRoD reach ~1e-7 or exactly 0).
Two documented exceptions:

* PSOFT with ``psoft_svd="lowrank"``: ``torch.svd_lowrank`` gives results that depend on the memory
  alignment of its input (MKL takes different SIMD paths), so PEFT's own A/B differ by ~5e-6 between
  two loads of the same weights; we allow 2e-5.
* bf16 bases for OSF and FRoD: PEFT rounds the SVD factors (OSF) or the whole rebuilt weight (FRoD) to
  bf16 before adding, which puts its result up to dozens of ulps away from the exact value of its own
  formula. We do the same from the base dtype the engine hands the patch, and match PEFT's bf16 merge
  to 1 ulp; with ``peft_precision=torch.float32`` a patch gives the correctly rounded value instead,
  checked against a float64 evaluation of the formula.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import (
    assert_close_to,
    load_all,
    make_adapter,
    oracle_merge,
    reload,
    run_case,
    save_base,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from peft import FrodConfig, OSFConfig, PsoftConfig
from safetensors.torch import load_file, save_file

import wsurgery
from wsurgery.adapters.loader import load_adapter
from wsurgery.errors import InputError, NotInvertibleError, UnsupportedError
from wsurgery.methods.adamss import kmeans_random_lloyd
from wsurgery.methods.frod import category

LLAMA = ["k_proj", "down_proj"]  # (16, 32) and (32, 48)


def _refuses_unmerge(tmp_path, adapter_dir, *words):
    with pytest.raises(NotInvertibleError) as e:
        wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    for w in words:
        assert w in str(e.value), str(e.value)


def _changed(merged, base):
    return [n for n in merged if not torch.equal(merged[n], base[n])]


def _bf16_case(tmp_path, model, config, exact):
    """bf16 base: ours is PEFT's bf16 merge (1 ulp), and a patch with ``peft_precision=torch.float32`` gives
    the correctly rounded value of PEFT's formula (``exact(name, base, adapter)`` in float64)."""
    dtype = torch.bfloat16
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, config, tmp_path / "adapter")
    expected = oracle_merge(reload(model, base_dir, dtype), adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged, base = load_all(tmp_path / "merged"), load_all(base_dir)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    changed = _changed(merged, base)
    assert changed
    assert_close_to(merged, expected, base=base)
    exact_mode = {}
    for patch in load_adapter(adapter_dir).patches():
        patch.peft_precision = torch.float32
        name = f"{patch.module}.weight"
        exact_mode[name] = patch.apply({"weight": base[name].float()})["weight"].to(dtype)
    assert sorted(exact_mode) == sorted(changed)
    assert_close_to(exact_mode, {n: exact(n, base, saved).to(dtype) for n in changed}, base=base)
    return adapter_dir


# -- OSF -------------------------------------------------------------------------------------------------

def test_osf_llama_fp32(tmp_path):
    cfg = OSFConfig(target_modules=LLAMA + ["o_proj"], effective_rank=0.25, rank_pattern={"down_proj": 3})
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(), cfg, check_unmerge=False)
    _refuses_unmerge(tmp_path, adapter_dir, "low singular part", "not saved")
    info = {p.module: p.describe() for p in load_adapter(adapter_dir).patches()}
    assert info["model.layers.0.mlp.down_proj"]["trainable_singular_triplets"] == 32 - 3
    assert info["model.layers.0.self_attn.k_proj"]["trainable_singular_triplets"] == 16 - 4  # k_proj is 16 x 32


def _osf_exact(name, base, saved):
    W = base[name].double()
    U, S, Vt = torch.linalg.svd(W, full_matrices=False)
    key = f"base_model.model.{name[:-len('.weight')]}.osf_svd_params."
    Ul, Sl, Vl = (saved[key + p].double() for p in ("U_low", "S_low", "V_low"))
    k = S.numel() - Sl.numel()
    return (U[:, :k] * S[:k]) @ Vt[:k] + (Ul * Sl) @ Vl


def test_osf_llama_bf16(tmp_path):
    cfg = OSFConfig(target_modules=LLAMA, effective_rank=5)
    _bf16_case(tmp_path, tiny_llama(torch.bfloat16), cfg, _osf_exact)


def test_osf_wrong_model(tmp_path):
    adapter_dir = make_adapter(tiny_llama(), OSFConfig(target_modules=["q_proj"], effective_rank=4), tmp_path / "a")
    other = tiny_llama()
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 24, bias=False)
    base_dir = save_base(other, tmp_path / "base")
    with pytest.raises(InputError, match="osf_svd_params"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)


# -- PSOFT -----------------------------------------------------------------------------------------------

PSOFT_VARIANTS = {
    "cayley": {},
    "neumann-pissa": {"use_cayley_neumann": True, "ab_svd_init": "pissa_init"},
    "neumann-eps": {"use_cayley_neumann": True, "cayley_neumann_eps": 0.5, "num_cayley_neumann_terms": 7},
    "free-R-no-mag-a": {"psoft_orth": False, "psoft_mag_a": False},
}


@pytest.mark.parametrize("variant", PSOFT_VARIANTS, ids=list(PSOFT_VARIANTS))
def test_psoft_llama_fp32(tmp_path, variant):
    cfg = PsoftConfig(r=6, psoft_alpha=12, target_modules=LLAMA, **PSOFT_VARIANTS[variant])
    _, adapter_dir, _ = run_case(tmp_path, tiny_llama(), cfg, check_unmerge=False)
    _refuses_unmerge(tmp_path, adapter_dir, "SVD of the original W")
    info = load_adapter(adapter_dir).patches()[0].describe()
    assert info["rank"] == 6 and info["scaling"] == 2.0
    if variant == "cayley":  # the exact Cayley map is a rotation; the magnitude vectors come after it
        assert info["max_abs_RRt_minus_I"] < 1e-5 and info["magnitude_vectors"] == ["vector_b", "vector_a"]
    if variant.startswith("neumann"):
        assert info["max_abs_RRt_minus_I"] > 1e-4  # the truncated series is visibly not orthogonal


@pytest.mark.parametrize("variant", ["neumann-pissa"])
def test_psoft_llama_bf16(tmp_path, variant):
    # PEFT computes ΔW in fp32 and rounds it before adding: the usual 1 ulp at the operands.
    cfg = PsoftConfig(r=4, target_modules=LLAMA, **PSOFT_VARIANTS[variant])
    run_case(tmp_path, tiny_llama(torch.bfloat16), cfg, dtype=torch.bfloat16, check_unmerge=False)


def test_psoft_lowrank_svd(tmp_path):
    cfg = PsoftConfig(r=6, target_modules=LLAMA, psoft_svd="lowrank", psoft_svd_lowrank_niter=4, random_seed=7)
    model = tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(model, cfg, tmp_path / "adapter")
    expected = oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged = load_all(tmp_path / "merged")
    assert _changed(merged, load_all(base_dir))
    assert_close_to(merged, expected, rel=2e-5)  # svd_lowrank's own alignment dependence, see the docstring
    # the seed matters: another seed gives another (clearly different) A and B
    cfg_json = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg_json["random_seed"] = 8
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg_json))
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged8", progress=False)
    other = load_all(tmp_path / "merged8")
    name = "model.layers.0.mlp.down_proj.weight"
    assert (other[name] - expected[name]).abs().max() > 1e-3 * expected[name].abs().max()


def test_psoft_rank_must_match_config(tmp_path):
    adapter_dir = make_adapter(tiny_llama(), PsoftConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["r"] = 5
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"psoft_R.weight is \[6\].*r=5"):
        load_adapter(adapter_dir)


# -- FRoD ------------------------------------------------------------------------------------------------

FROD_MODELS = {
    "llama": (tiny_llama, LLAMA + ["o_proj"]),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_fc"]),
    "bert": (tiny_bert, ["query", "value", "dense"]),  # attention.output.dense -> attention_output
}


def _frod_config(targets, **kw):
    return FrodConfig(target_modules=targets, sparse_rate=0.05, progressbar=False, **kw)


@pytest.mark.parametrize("model", FROD_MODELS, ids=list(FROD_MODELS))
def test_frod_fp32(tmp_path, model):
    make, targets = FROD_MODELS[model]
    _, adapter_dir, _ = run_case(tmp_path, make(), _frod_config(targets), check_unmerge=False)
    _refuses_unmerge(tmp_path, adapter_dir, "initial λ")
    adapter = load_adapter(adapter_dir)
    cats = {p.describe()["category"] for p in adapter.patches()}
    assert {k.split(".", 1)[1] for k in adapter.context.shared if k.startswith("frod_V.")} == cats
    if model == "bert":
        assert {"attention_output", "output_dense", "intermediate_dense", "self_query"} <= cats


def _frod_exact(name, base, saved, transposed=False):
    module = name[:-len(".weight")]
    cat = category(module)
    V = saved[f"base_model.frod_V.{cat}"].double()
    idx = saved[f"base_model.frod_s_indices.{cat}"]
    W = base[name].double()
    W = W.T if transposed else W
    bi = torch.linalg.solve(V, W.T).T
    U = bi / bi.norm(dim=0)
    SL = torch.diag(saved[f"base_model.model.{module}.frod_lambda_l"].double())
    SL[idx[0], idx[1]] += saved[f"base_model.model.{module}.frod_lambda_s_values"].double()
    F = U.float().double() @ SL @ V.T
    return F.T if transposed else F


@pytest.mark.parametrize("model", ["llama", "gpt2-conv1d"])
def test_frod_bf16(tmp_path, model):
    make, targets = FROD_MODELS[model]
    gpt2 = model.startswith("gpt2")
    _bf16_case(tmp_path, make(torch.bfloat16), _frod_config(targets),
               lambda n, b, s: _frod_exact(n, b, s, transposed=gpt2))


def test_frod_without_saved_projections_is_refused(tmp_path):
    adapter_dir = make_adapter(tiny_llama(), _frod_config(["q_proj"], save_projection=False), tmp_path / "a")
    assert not any(k.startswith("base_model.frod_V") for k in load_file(adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedError, match="save_projection=false.*save_projection=True"):
        load_adapter(adapter_dir)


def test_frod_missing_shared_tensor(tmp_path):
    adapter_dir = make_adapter(tiny_llama(), _frod_config(["q_proj", "v_proj"]), tmp_path / "a")
    file = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(file)
    del tensors["base_model.frod_V.self_attn_v_proj"]
    save_file(tensors, file)
    with pytest.raises(InputError, match="base_model.frod_V.self_attn_v_proj"):
        load_adapter(adapter_dir)


def test_frod_singular_v_uses_pinv(tmp_path):
    """An input feature no targeted layer uses makes the shared V singular: PEFT falls back to a
    pseudo-inverse (rtol 1e-6) to rebuild U, and so do we."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[:, 5] = 0
    _, adapter_dir, _ = run_case(tmp_path, model, _frod_config(["q_proj"]), check_unmerge=False)
    assert all(p.describe()["V_singular"] for p in load_adapter(adapter_dir).patches())


# -- AdaMSS ----------------------------------------------------------------------------------------------
# PEFT's AdaMSS needs scikit-learn, which the test environment does not have: its adapters and merges
# come from fixtures/adamss (scripts/make_adamss_fixtures.py ran PEFT 0.21.2 with scikit-learn 1.9.1).

ADAMSS = Path(__file__).resolve().parent.parent / "fixtures" / "adamss"
ADAMSS_CASES = ["fp32", "bf16", "dynamic-rank-seed", "many-subspaces-repeated-rows"]
# Repeated rows put k-means on exact float32 ties, broken by numpy's float32 sums (which scikit-learn's
# KMeans uses too), whose rounding follows the SIMD width numpy dispatches to. The fixture was made where
# numpy runs its AVX-512 (X86_V4) kernels; on other CPUs its clustering may not be reproducible, and
# wsurgery must then refuse it ("cannot be reproduced"), never place the change differently.
try:
    from numpy._core._multiarray_umath import __cpu_features__ as _NUMPY_CPU
except ImportError:  # numpy < 2
    from numpy.core._multiarray_umath import __cpu_features__ as _NUMPY_CPU
ADAMSS_SIMD_DEPENDENT = set() if _NUMPY_CPU.get("AVX512F") else {"many-subspaces-repeated-rows"}


def merge_adamss(case: str, out: Path) -> bool:
    """Merge the AdaMSS fixture ``case`` into ``out``; False where it is refused because its clustering
    depends on the CPU's SIMD width (ADAMSS_SIMD_DEPENDENT) and cannot be reproduced here."""
    folder = ADAMSS / case
    try:
        wsurgery.merge(folder / "base", folder / "adapter", out, progress=False)
    except UnsupportedError as e:
        if case in ADAMSS_SIMD_DEPENDENT and "cannot be reproduced" in str(e) and not out.exists():
            return False
        raise
    return True


def test_adamss_kmeans_matches_scikit_learn():
    data = load_file(ADAMSS / "kmeans.safetensors")
    n = len([k for k in data if k.startswith("X.")])
    assert n == 54
    for i in range(n):
        labels, _ = kmeans_random_lloyd(data[f"X.{i}"].numpy(), int(data[f"k.{i}"]))
        assert np.array_equal(labels, data[f"labels.{i}"].numpy()), f"data set {i}"


@pytest.mark.parametrize("case", ADAMSS_CASES)
def test_adamss_fixture(tmp_path, case):
    folder = ADAMSS / case
    sizes = json.loads((ADAMSS / "cases.json").read_text())["cases"][case]["cluster_sizes"]
    if not merge_adamss(case, tmp_path / "merged"):
        return  # refused, as it must be where the clustering cannot be reproduced
    merged, base = load_all(tmp_path / "merged"), load_all(folder / "base")
    assert sorted(_changed(merged, base)) == ["fc1.bias", "fc1.weight", "fc2.weight", "fc3.bias", "fc3.weight"]
    assert_close_to(merged, load_file(folder / "expected.safetensors"), base=base)
    adapter = load_adapter(folder / "adapter")
    info = {p.module: p.describe() for p in adapter.patches()}
    assert {m: i["rows_per_subspace"] for m, i in info.items()} == sizes
    _refuses_unmerge(tmp_path, folder / "adapter", "clustering of the original")


def _copy_adamss(tmp_path, case="fp32"):
    shutil.copytree(ADAMSS / case, tmp_path / case)
    return tmp_path / case


def test_adamss_refuses_a_clustering_it_cannot_reproduce(tmp_path):
    """The adapter's subspace sizes are the check: move one row from block 0 to block 1 of fc3."""
    folder = _copy_adamss(tmp_path)
    file = folder / "adapter" / "adapter_model.safetensors"
    t = load_file(file)
    b0, b1 = t["base_model.model.fc3.adamss_B.0"], t["base_model.model.fc3.adamss_B.1"]
    t["base_model.model.fc3.adamss_B.0"], t["base_model.model.fc3.adamss_B.1"] = b0[1:], torch.cat([b1, b0[:1]])
    save_file(t, file)
    with pytest.raises(UnsupportedError, match="fc3: AdaMSS's row clustering.*cannot be reproduced"):
        wsurgery.merge(folder / "base", folder / "adapter", tmp_path / "merged", progress=False)


def test_adamss_refuses_another_base(tmp_path):
    folder = _copy_adamss(tmp_path)
    file = folder / "base" / "model.safetensors"
    t = load_file(file)
    t["fc2.weight"] = torch.randn(t["fc2.weight"].shape, generator=torch.Generator().manual_seed(9)) * 0.1
    save_file(t, file)
    with pytest.raises(UnsupportedError, match="fc2: .*(adamss_newB|clustering)"):
        wsurgery.merge(folder / "base", folder / "adapter", tmp_path / "merged", progress=False)


def test_adamss_bias_column_must_match(tmp_path):
    folder = _copy_adamss(tmp_path)
    file = folder / "base" / "model.safetensors"
    t = load_file(file)
    del t["fc1.bias"]  # PEFT saw a bias here: newB has in + 1 columns
    save_file(t, file)
    with pytest.raises(InputError, match=r"fc1: adamss_newB is \[8, 25\].*without a bias needs 24 columns"):
        wsurgery.merge(folder / "base", folder / "adapter", tmp_path / "merged", progress=False)


def test_osf_notes_a_repeated_singular_value_at_the_cut():
    from wsurgery.methods.osf import OsfPatch

    g = torch.Generator().manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    S = torch.tensor([5.0, 4.0, 3.0, 3.0, 2.0, 1.5, 1.0, 0.8, 0.5, 0.2])  # S[2] == S[3]: the cut after k=3
    W = (Q1[:, :10] * S) @ Q2.T
    low = 10 - 3
    patch = OsfPatch("m", torch.randn(12, low, generator=g), torch.rand(low, generator=g), torch.randn(low, 10,
                                                                                                      generator=g))
    patch.check({"weight": (12, 10)})
    patch.apply({"weight": W.clone()})
    assert patch.describe()["relative_gap_at_cut"] < 1e-5
    assert len(patch.notes) == 1 and "nearly equal" in patch.notes[0]
    clear = OsfPatch("m", patch.U_low[:, 1:], patch.S_low[1:], patch.V_low[1:])  # k = 4: a clear gap
    clear.apply({"weight": W.clone()})
    assert clear.notes == [] and clear.describe()["relative_gap_at_cut"] > 0.1
