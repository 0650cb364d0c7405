"""``wsurgery convert``: adapters rewritten as other PEFT methods, judged by PEFT itself.

Every output is loaded with ``PeftModel.from_pretrained`` and merged with ``merge_and_unload()``; the
reference is PEFT's merge of the *source* adapter. Exact conversions must agree to 1e-5 (fp32);
approximations are held to their optimum, computed here from PEFT's own merged weights: the SVD tail
(Eckart–Young) for LoRA, a numerical least-squares solve for MiSS, Procrustes optimality (and a
gradient search that cannot beat it) for OFT, and OFT's error as the bound BOFT must meet. PEFT's own
``convert_to_lora`` is an anchor: where both apply, our error is at most its error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from oracle import (LLAMA_LINEAR, assert_close_to, conv_net, edit_adapter_tensors, load_all, make_adapter,
                    oracle_merge, reload, save_base, tiny_gpt2, tiny_llama)
from peft import (AdaLoraConfig, BOFTConfig, HRAConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, MissConfig,
                  OFTConfig, PeftModel, RandLoraConfig, VBLoRAConfig, VeraConfig)
from safetensors.torch import load_file
from oracle import run_cli
from torch import nn

import wsurgery
from wsurgery.convert.to_structured import periodic_means
from wsurgery.errors import InputError, UnsupportedError

BONE_FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "old-bone" / "peft-0.17.1"


# -- helpers ------------------------------------------------------------------------------------------------------

def peft_merge(model, base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge of a saved adapter into a fresh copy of the saved base."""
    return oracle_merge(reload(model, base_dir, torch.float32), adapter_dir)


def deltas(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float64 changes of every 2-D weight the merge changed, as (out, in) matrices."""
    return {k: (merged[k].double() - base[k].double()) for k in base
            if k.endswith("weight") and base[k].ndim == 2 and not torch.equal(merged[k], base[k])}


def tail(D: torch.Tensor, k: int) -> float:
    """The Frobenius norm of the singular values past the k-th: the best rank-k error (Eckart–Young)."""
    return float(torch.linalg.svdvals(D)[k:].norm())


def reported(conversion) -> dict[str, float]:
    return {m.module: m.error for m in conversion.modules}


def weight_name(module: str) -> str:
    return f"{module}.weight"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and much faster on a busy machine (no spinning worker threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama(tmp_path):
    model = tiny_llama()
    return model, save_base(model, tmp_path / "base")


@pytest.fixture
def no_fbd_cuda(monkeypatch):
    """PEFT's CPU path for BOFT (the extension reported missing, without a slow failed compile); ``factors(N)``
    with N > 1 puts in what the CUDA extension computes, so PEFT keeps N butterfly factors."""
    import peft.tuners.boft.layer as boft_layer

    class FakeFastBlockDiag:
        @staticmethod
        def apply(blocks):
            return torch.stack([torch.block_diag(*level) for level in blocks])

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)

    def factors(n: int) -> None:
        if n > 1:
            monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
            monkeypatch.setattr(boft_layer, "FastBlockDiag", FakeFastBlockDiag)

    return factors


def small_lora(model, folder: Path, r: int = 4, targets=LLAMA_LINEAR, scale: float = 0.05) -> Path:
    """A LoRA whose change is small next to W, as trained ones are (the random test LoRAs dwarf W)."""
    adapter = make_adapter(model, LoraConfig(r=r, lora_alpha=r, target_modules=targets), folder)
    edit_adapter_tensors(adapter, lambda t: t.update({k: v * scale for k, v in t.items() if "lora_B" in k}))
    return adapter


# -- exact conversions to LoRA --------------------------------------------------------------------------------------

EXACT_SOURCES = {
    "lora": LoraConfig(r=4, lora_alpha=6, target_modules=LLAMA_LINEAR),
    "lora-rslora-patterns": LoraConfig(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"q_proj": 2},
                                       alpha_pattern={"down_proj": 3}, target_modules=LLAMA_LINEAR),
    "adalora": AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=LLAMA_LINEAR),
    "loha": LoHaConfig(r=2, alpha=3, target_modules=LLAMA_LINEAR),
    "lokr": LoKrConfig(r=2, alpha=3, target_modules=LLAMA_LINEAR),
    "miss": MissConfig(r=5, target_modules=LLAMA_LINEAR),
    "vera": VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]),
    "vblora": VBLoRAConfig(r=3, num_vectors=12, vector_length=8, target_modules=LLAMA_LINEAR),
}


@pytest.mark.parametrize("name", list(EXACT_SOURCES))
def test_exact_to_lora(tmp_path, llama, name):
    model, base = llama
    source = make_adapter(model, EXACT_SOURCES[name], tmp_path / "source")
    c = wsurgery.convert_adapter(source, tmp_path / "lora", to="lora", base=base, progress=False)
    assert c.modules and all(m.exact for m in c.modules), reported(c)
    assert_close_to(peft_merge(model, base, tmp_path / "lora"), peft_merge(model, base, source))
    if name == "loha":  # (w1a w1b) ⊙ (w2a w2b) with rank-2 factors: rank 4 = r²
        assert {m.rank for m in c.modules} == {4}


def test_randlora_to_lora_at_full_rank(tmp_path, llama):
    # RandLoRA's change has full rank by design: exact as a LoRA of rank min(out, in), and refused without --rank.
    model, base = llama
    source = make_adapter(model, RandLoraConfig(r=4, target_modules=["q_proj", "o_proj"]), tmp_path / "source")
    with pytest.raises(UnsupportedError, match="full rank .*pass --rank"):
        wsurgery.convert_adapter(source, tmp_path / "refused", to="lora", base=base, progress=False)
    assert not (tmp_path / "refused").exists()
    c = wsurgery.convert_adapter(source, tmp_path / "lora", to="lora", base=base, rank=32, progress=False)
    assert all(m.exact for m in c.modules)
    assert_close_to(peft_merge(model, base, tmp_path / "lora"), peft_merge(model, base, source))


def test_lora_without_base_and_to_higher_rank(tmp_path, llama):
    model, base = llama
    source = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR), tmp_path / "source")
    c = wsurgery.convert_adapter(source, tmp_path / "r6", to="lora", rank=6, progress=False)  # no base needed
    assert all(m.exact and m.rank == 6 for m in c.modules)
    saved = load_file(tmp_path / "r6" / "adapter_model.safetensors")
    A = saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert A.shape == (6, 32)
    # The two padded directions keep LoRA's init shape: A rows orthonormal to the rest, B columns zero.
    assert torch.allclose(A[4:] @ A[4:].T, torch.eye(2), atol=1e-6)
    assert torch.allclose(A[4:] @ A[:4].T, torch.zeros(2, 4), atol=1e-5)
    assert_close_to(peft_merge(model, base, tmp_path / "r6"), peft_merge(model, base, source))


@pytest.mark.parametrize("case", ["gpt2-conv1d", "conv-embedding"])
def test_exact_lora_layers(tmp_path, case):
    """Conv1D (fan_in_fan_out), Embedding, Conv1d/2d/3d and lora_bias, re-factored at the same rank."""
    if case == "gpt2-conv1d":
        model = tiny_gpt2()
        config = LoraConfig(r=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True)
    else:
        model = conv_net()
        config = LoraConfig(r=2, target_modules=["emb", "c1", "c2", "pw", "c3", "fc"])
    base = save_base(model, tmp_path / "base")
    source = make_adapter(model, config, tmp_path / "source")
    c = wsurgery.convert_adapter(source, tmp_path / "lora", to="lora", progress=False)
    assert all(m.exact for m in c.modules)
    assert_close_to(peft_merge(model, base, tmp_path / "lora"), peft_merge(model, base, source))


def test_modules_to_save_carried(tmp_path, llama):
    model, base = llama
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    source = make_adapter(model, config, tmp_path / "source")
    wsurgery.convert_adapter(source, tmp_path / "loha", to="loha", progress=False)
    saved = json.loads((tmp_path / "loha" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["lm_head"]
    assert_close_to(peft_merge(model, base, tmp_path / "loha"), peft_merge(model, base, source))


def test_trainable_tokens_carried_to_lora_only(tmp_path, llama):
    model, base = llama
    config = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 5])
    source = make_adapter(model, config, tmp_path / "source")
    wsurgery.convert_adapter(source, tmp_path / "lora", to="lora", rank=3, progress=False)
    assert_close_to(peft_merge(model, base, tmp_path / "lora"), peft_merge(model, base, source))
    with pytest.raises(UnsupportedError, match="trainable_token_indices has no place in a miss adapter"):
        wsurgery.convert_adapter(source, tmp_path / "miss", to="miss", rank=4, base=base, progress=False)


# -- best approximations to LoRA ------------------------------------------------------------------------------------

APPROX_SOURCES = {
    "oft": OFTConfig(r=0, oft_block_size=8, target_modules=LLAMA_LINEAR),
    "boft": BOFTConfig(boft_block_size=4, target_modules=LLAMA_LINEAR),
    "dora": LoraConfig(r=4, use_dora=True, target_modules=LLAMA_LINEAR),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "hra": HRAConfig(r=4, target_modules=LLAMA_LINEAR),
    "miss-bat": MissConfig(r=8, init_weights="bat", target_modules=LLAMA_LINEAR),
}


@pytest.mark.parametrize("name", list(APPROX_SOURCES))
def test_best_rank_r_lora(tmp_path, llama, no_fbd_cuda, name):
    """W-dependent changes: the LoRA's error is the SVD tail of PEFT's own change (Eckart–Young)."""
    model, base = llama
    source = make_adapter(model, APPROX_SOURCES[name], tmp_path / "source")
    with pytest.raises(InputError, match="pass --base"):
        wsurgery.convert_adapter(source, tmp_path / "nobase", to="lora", rank=3, progress=False)
    k = 3
    c = wsurgery.convert_adapter(source, tmp_path / "lora", to="lora", base=base, rank=k, progress=False)
    base_w = load_all(base)
    want = deltas(peft_merge(model, base, source), base_w)
    got = deltas(peft_merge(model, base, tmp_path / "lora"), base_w)
    errors = reported(c)
    assert set(got) == set(want) == {weight_name(m) for m in errors}
    for name_, D in want.items():
        optimum = tail(D, k)
        error = float((got[name_] - D).norm())
        assert abs(error - optimum) <= 1e-5 * float(D.norm()), (name_, error, optimum)
        assert abs(errors[name_.removesuffix(".weight")] - error / float(D.norm())) <= 1e-5


def test_peft_convert_to_lora_is_an_anchor(tmp_path, llama):
    """Where PEFT's own convert_to_lora applies, our error at the same rank is at most its error."""
    from peft import convert_to_lora

    model, base = llama
    base_w = load_all(base)
    for i, config in enumerate([LoHaConfig(r=3, alpha=3, target_modules=LLAMA_LINEAR),
                                LoKrConfig(r=2, target_modules=LLAMA_LINEAR),
                                VeraConfig(r=6, target_modules=["q_proj", "up_proj"])]):
        source = make_adapter(model, config, tmp_path / f"source{i}")
        want = deltas(peft_merge(model, base, source), base_w)
        peft_model = PeftModel.from_pretrained(reload(model, base, torch.float32), source)
        _, theirs = convert_to_lora(peft_model, rank=2)
        c = wsurgery.convert_adapter(source, tmp_path / f"ours{i}", to="lora", base=base, rank=2, progress=False)
        ours = reported(c)
        for name, D in want.items():
            key = "base_model.model." + name.removesuffix(".weight")
            peft_delta = theirs[f"{key}.lora_B.weight"].double() @ theirs[f"{key}.lora_A.weight"].double()
            peft_error = float((peft_delta - D).norm() / D.norm())
            assert ours[name.removesuffix(".weight")] <= peft_error + 1e-6, (type(config).__name__, name)


def test_bone_fixture_to_lora_and_back(tmp_path):
    """Bone (PEFT 0.17.1's own files and merge): exact as a LoRA that PEFT 0.21.2 loads; back to Bone unchanged."""
    case = BONE_FIXTURES / "default-fp32"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.lin1, self.lin2 = nn.Linear(20, 24), nn.Linear(24, 16), nn.Linear(16, 12)

    net = Net()
    net.load_state_dict(load_file(case / "base" / "model.safetensors"))
    c = wsurgery.convert_adapter(case / "adapter", tmp_path / "lora", to="lora", base=case / "base", progress=False)
    assert all(m.exact for m in c.modules)
    merged = PeftModel.from_pretrained(net, tmp_path / "lora").merge_and_unload().state_dict()
    assert_close_to({k: v.detach() for k, v in merged.items()}, load_file(case / "expected.safetensors"))

    c = wsurgery.convert_adapter(tmp_path / "lora", tmp_path / "bone", to="bone", base=case / "base", rank=6,
                                 progress=False)
    assert all(m.exact for m in c.modules) and any("0.14-0.18" in n for n in c.notes)
    original = load_file(case / "adapter" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "bone" / "adapter_model.safetensors")
    assert set(ours) == set(original)
    for key in original:
        assert torch.allclose(ours[key], original[key], atol=1e-5 * float(original[key].abs().max())), key
    config = json.loads((tmp_path / "bone" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["init_weights"]) == ("BONE", 6, True)
    wsurgery.merge(case / "base", tmp_path / "bone", tmp_path / "merged", progress=False)
    assert_close_to(load_all(tmp_path / "merged"), load_file(case / "expected.safetensors"))


def test_bone_bat_fixture_to_lora(tmp_path):
    """Bone's bat mode depends on W: the best rank-3 LoRA of PEFT 0.17.1's own merged change (Eckart–Young)."""
    case = BONE_FIXTURES / "bat-fp32"
    c = wsurgery.convert_adapter(case / "adapter", tmp_path / "lora", to="lora", base=case / "base", rank=3,
                                 progress=False)
    base_w = load_file(case / "base" / "model.safetensors")
    want = deltas(load_file(case / "expected.safetensors"), base_w)
    wsurgery.merge(case / "base", tmp_path / "lora", tmp_path / "merged", progress=False)
    got = deltas(load_all(tmp_path / "merged"), base_w)
    for name, D in want.items():
        assert abs(float((got[name] - D).norm()) - tail(D, 3)) <= 1e-5 * float(D.norm()), name
        assert abs(reported(c)[name.removesuffix(".weight")] - tail(D, 3) / float(D.norm())) <= 1e-5


# -- LoRA -> MiSS ---------------------------------------------------------------------------------------------------

def test_miss_block_is_the_least_squares_solution():
    """The closed form (periodic means) against a numerical least-squares solve of the same problem."""
    g = torch.Generator().manual_seed(0)
    for out, n, r in [(6, 7, 3), (5, 9, 4), (4, 8, 8)]:
        D = torch.randn(out, n, generator=g, dtype=torch.float64)
        design = torch.zeros(out * n, r * out, dtype=torch.float64)  # vec(ΔW) = design · vec(block)
        for o in range(out):
            for i in range(n):
                design[o * n + i, (i % r) * out + o] = 1.0
        solution = torch.linalg.lstsq(design, D.reshape(-1, 1)).solution.reshape(r, out)
        assert torch.allclose(periodic_means(D, r), solution, atol=1e-12)


def test_lora_to_miss_and_back(tmp_path, llama):
    model, base = llama
    source = small_lora(model, tmp_path / "source")
    base_w = load_all(base)
    want = deltas(peft_merge(model, base, source), base_w)
    c = wsurgery.convert_adapter(source, tmp_path / "miss", to="miss", rank=8, base=base, progress=False)
    miss = deltas(peft_merge(model, base, tmp_path / "miss"), base_w)  # PEFT loads and merges our MiSS
    for name, D in want.items():  # PEFT's MiSS change is the least-squares optimum, and we report its error
        optimum = periodic_means(D, 8).T.repeat(1, -(-D.shape[1] // 8))[:, :D.shape[1]]
        assert torch.allclose(miss[name], optimum, atol=1e-6 * float(D.abs().max()))
        assert abs(reported(c)[name.removesuffix(".weight")] - float((miss[name] - D).norm() / D.norm())) <= 1e-5
    back = wsurgery.convert_adapter(tmp_path / "miss", tmp_path / "lora", to="lora", base=base, progress=False)
    assert all(m.exact and m.rank <= 8 for m in back.modules)  # MiSS's change has rank <= r: exact as a LoRA
    assert_close_to(peft_merge(model, base, tmp_path / "lora"), peft_merge(model, base, tmp_path / "miss"))


def test_miss_round_trip_is_exact(tmp_path, llama):
    """MiSS -> LoRA -> MiSS gives the original block back (the structure holds the change exactly)."""
    model, base = llama
    source = make_adapter(model, MissConfig(r=5, target_modules=LLAMA_LINEAR), tmp_path / "source")
    wsurgery.convert_adapter(source, tmp_path / "lora", to="lora", base=base, progress=False)
    c = wsurgery.convert_adapter(tmp_path / "lora", tmp_path / "miss", to="miss", rank=5, base=base, progress=False)
    assert all(m.exact for m in c.modules)
    original = load_file(source / "adapter_model.safetensors")
    ours = load_file(tmp_path / "miss" / "adapter_model.safetensors")
    assert set(ours) == set(original)
    for key in original:
        assert torch.allclose(ours[key], original[key], atol=1e-5 * float(original[key].abs().max())), key


# -- LoRA -> OFT / BOFT ---------------------------------------------------------------------------------------------

def test_oft_recovers_an_oft_change(tmp_path, llama):
    model, base = llama
    config = OFTConfig(r=0, oft_block_size=8, use_cayley_neumann=False, target_modules=LLAMA_LINEAR)
    source = make_adapter(model, config, tmp_path / "source")
    c = wsurgery.convert_adapter(source, tmp_path / "oft", to="oft", block_size=8, base=base, progress=False)
    assert all(m.exact for m in c.modules), reported(c)
    assert_close_to(peft_merge(model, base, tmp_path / "oft"), peft_merge(model, base, source))


def best_rotation_by_search(W: torch.Tensor, T: torch.Tensor, starts: int = 16, steps: int = 300) -> float:
    """min ‖W·X − T‖ over rotations X (det +1), by Riemannian gradient descent from random rotations: the
    gradient's skew part X^T·∇ moves X along the rotation group (Cayley steps keep it there)."""
    g = torch.Generator().manual_seed(0)
    b = W.shape[1]
    X = torch.linalg.qr(torch.randn(starts, b, b, generator=g, dtype=torch.float64)).Q
    X[:, :, 0] *= torch.linalg.det(X).sign()[:, None]
    eye = torch.eye(b, dtype=torch.float64)
    step = 2 / float(torch.linalg.matrix_norm(W, ord=2)) ** 2
    for _ in range(steps):
        A = X.transpose(-1, -2) @ (W.T @ (W @ X - T))
        K = (A.transpose(-1, -2) - A) * (step / 2)
        X = X @ torch.linalg.solve(eye - K / 2, eye + K / 2)
    return float(torch.linalg.matrix_norm(W @ X - T).min())


def test_lora_to_oft_is_the_best_rotation(tmp_path, llama):
    model, base = llama
    source = small_lora(model, tmp_path / "source")
    c = wsurgery.convert_adapter(source, tmp_path / "oft", to="oft", block_size=8, base=base, progress=False)
    base_w = load_all(base)
    want = deltas(peft_merge(model, base, source), base_w)
    got = deltas(peft_merge(model, base, tmp_path / "oft"), base_w)
    errors = reported(c)
    for name, D in want.items():  # what PEFT merges is what we report
        assert abs(errors[name.removesuffix(".weight")] - float((got[name] - D).norm() / D.norm())) <= 1e-5
    # Every block of one module against a search over rotations from 16 random starts: none beats ours.
    name = "model.layers.0.self_attn.q_proj.weight"
    for k in range(0, 32, 8):
        W, T = base_w[name].double()[:, k:k + 8], (base_w[name].double() + want[name])[:, k:k + 8]
        ours = float((got[name][:, k:k + 8] + W - T).norm())
        assert ours <= best_rotation_by_search(W, T) + 1e-6 * float(T.norm())


def test_oft_half_turn(tmp_path, llama):
    """A change that flips two input columns is a rotation by π, which the Cayley map cannot reach: the
    plane is turned a little short of π, the note says so, and PEFT merges what we report."""
    model, base = llama
    source = make_adapter(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]), tmp_path / "source")
    W = load_all(base)["model.layers.0.self_attn.q_proj.weight"]

    def flip(t):
        for key in [k for k in t if "q_proj" in k]:
            layer = key.split(".")[4]
            w = load_all(base)[f"model.layers.{layer}.self_attn.q_proj.weight"] if layer != "0" else W
            t[key] = torch.eye(2, 32) if "lora_A" in key else -2 * w[:, :2]

    edit_adapter_tensors(source, flip)
    c = wsurgery.convert_adapter(source, tmp_path / "oft", to="oft", block_size=8, base=base, progress=False)
    assert any("turns a plane by π" in n for n in c.notes)
    assert all(0 < m.error < 0.01 for m in c.modules), reported(c)
    base_w = load_all(base)
    want = deltas(peft_merge(model, base, source), base_w)
    got = deltas(peft_merge(model, base, tmp_path / "oft"), base_w)
    for name, D in want.items():
        assert abs(reported(c)[name.removesuffix(".weight")] - float((got[name] - D).norm() / D.norm())) <= 1e-5


@pytest.mark.parametrize("factors", [1, 2])
def test_boft_at_least_as_good_as_oft(tmp_path, llama, no_fbd_cuda, factors):
    model, base = llama
    no_fbd_cuda(factors)
    source = small_lora(model, tmp_path / "source")
    oft = reported(wsurgery.convert_adapter(source, tmp_path / "oft", to="oft", block_size=4, base=base,
                                            progress=False))
    c = wsurgery.convert_adapter(source, tmp_path / "boft", to="boft", block_size=4, butterfly_factors=factors,
                                 base=base, progress=False)
    boft = reported(c)
    assert all(boft[m] <= oft[m] + 1e-6 for m in oft), (boft, oft)
    assert sum(oft.values()) - sum(boft.values()) > 1e-3  # the scales (and butterflies) do help
    base_w = load_all(base)
    want = deltas(peft_merge(model, base, source), base_w)
    got = deltas(peft_merge(model, base, tmp_path / "boft"), base_w)  # PEFT loads N factors and merges them
    saved = load_file(tmp_path / "boft" / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.boft_R"].shape == (factors, 8, 4, 4)
    for name, D in want.items():
        assert abs(boft[name.removesuffix(".weight")] - float((got[name] - D).norm() / D.norm())) <= 1e-5


# -- LoHa / LoKr targets --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("to", ["loha", "lokr"])
def test_lora_to_loha_lokr(tmp_path, llama, to):
    model, base = llama
    source = make_adapter(model, LoraConfig(r=3, lora_alpha=5, target_modules=LLAMA_LINEAR), tmp_path / "source")
    c = wsurgery.convert_adapter(source, tmp_path / "exact", to=to, progress=False)
    assert all(m.exact and m.rank == 3 for m in c.modules)
    assert_close_to(peft_merge(model, base, tmp_path / "exact"), peft_merge(model, base, source))
    c = wsurgery.convert_adapter(source, tmp_path / "r2", to=to, rank=2, progress=False)
    base_w = load_all(base)
    want = deltas(peft_merge(model, base, source), base_w)
    got = deltas(peft_merge(model, base, tmp_path / "r2"), base_w)
    for name, D in want.items():
        assert abs(float((got[name] - D).norm()) - tail(D, 2)) <= 1e-5 * float(D.norm())


# -- refusals and bad input -----------------------------------------------------------------------------------------

def test_bad_input(tmp_path, llama):
    model, base = llama
    lora = make_adapter(model, LoraConfig(r=4, target_modules=LLAMA_LINEAR), tmp_path / "lora")
    dora = make_adapter(model, LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]), tmp_path / "dora")
    loha = make_adapter(model, LoHaConfig(r=2, target_modules=["q_proj"]), tmp_path / "loha")
    cases = [
        (dict(adapter=lora, to="lora", rank=20), InputError, r"k_proj: --rank 20 is larger than min\(out, in\) = 16"),
        (dict(adapter=dora, to="lora", rank=2), InputError, "depends on the base weight; pass --base"),
        (dict(adapter=loha, to="lora"), InputError, "do not record the shape .* pass --base"),
        (dict(adapter=lora, to="oft"), InputError, "--to oft needs --base"),
        (dict(adapter=lora, to="oft", base=base, block_size=5), InputError, "not a multiple of --block-size 5"),
        (dict(adapter=lora, to="boft", base=base, block_size=8, butterfly_factors=3), InputError,
         "butterfly factors need"),
        (dict(adapter=lora, to="miss"), InputError, "--to miss needs --rank"),
        (dict(adapter=lora, to="miss", rank=40), InputError, "larger than its in_features"),
        (dict(adapter=lora, to="oft", rank=4, base=base), InputError, "--rank does not apply"),
        (dict(adapter=lora, to="gguf"), UnsupportedError, "cannot convert to 'gguf'"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            wsurgery.convert_adapter(out=tmp_path / "out", progress=False, **kwargs)
        assert not (tmp_path / "out").exists()
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    other = save_base(LlamaForCausalLM(wider), tmp_path / "other")
    with pytest.raises(InputError, match="another model"):
        wsurgery.convert_adapter(lora, tmp_path / "out", to="lora", base=other, progress=False)


def test_useless_target_is_refused_unless_forced(tmp_path, llama):
    """ΔW = W/2 on q_proj: rotations cannot scale, so the best OFT is the identity (relative error 1)."""
    model, base = llama
    source = make_adapter(model, LoraConfig(r=32, lora_alpha=32, target_modules=["q_proj"]), tmp_path / "source")
    base_w = load_all(base)
    edit_adapter_tensors(source, lambda t: t.update({
        k: torch.eye(32) if "lora_A" in k else 0.5 * base_w[k.removeprefix("base_model.model.").replace(
            ".lora_B.weight", ".weight")] for k in t}))
    with pytest.raises(UnsupportedError, match=r"OFT cannot express .* 2 of 2 module.*--force"):
        wsurgery.convert_adapter(source, tmp_path / "oft", to="oft", block_size=8, base=base, progress=False)
    assert not (tmp_path / "oft").exists()
    c = wsurgery.convert_adapter(source, tmp_path / "oft", to="oft", block_size=8, base=base, force=True,
                                 progress=False)
    assert all(abs(m.error - 1.0) < 1e-4 for m in c.modules)
    assert (tmp_path / "oft" / "adapter_model.safetensors").is_file()


def test_cli(tmp_path, llama, capsys):
    model, base = llama
    source = make_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "source")

    def run(*args):
        return run_cli(args, capsys)

    code, out, err = run("convert", source, tmp_path / "miss", "--to", "miss", "--rank", "4", "--base", base)
    assert code == 0, err
    lines = [line for line in out.splitlines() if "model.layers" in line]
    assert len(lines) == 4 and all(line.split()[1] == "4" for line in lines)  # one row per module: r, error
    assert "relative error" in out and "MiSS" in err
    code, out, err = run("convert", source, tmp_path / "lora", "--to", "lora", "--rank", "99")
    assert code == 1 and err.count("\n") == 1 and "--rank 99 is larger" in err and "Traceback" not in err
    code, out, err = run("convert", source, tmp_path / "x", "--to", "nothing")
    assert code == 2 and "nothing" in err
