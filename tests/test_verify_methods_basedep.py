"""``verify`` for the methods whose change depends on the base weight W (HiRA, DEFT, PEANuT, OSF, PSOFT,
FRoD, AdaMSS): their forward paths rebuild what PEFT's layers derive from W (the SVD, the solve against
V, the clustering, the network of W) and run PEFT's inference computation on activations.

Each case builds the adapter as ``test_method_base_dependent.py``/``test_method_svd_based.py`` do, checks
our merge against PEFT's (``run_case``), then the ``check_verify`` contract: the correct merge passes, also
with all merge code disabled; a perturbed element, a merge at scale 1.5 and a transposed change fail.
On float32 bases every forward path is also compared with PEFT's own unmerged module forward, so the paths
are PEFT's inference computation and not merely consistent with our merge (AdaMSS excepted: PEFT needs
scikit-learn for it, absent here; its adapters and merges are fixtures made with PEFT).

All cases pass at verify's default tolerances, bf16 included: OSF's and FRoD's bf16 merges round as PEFT
does (SVD factors, or the whole rebuilt weight, in bf16), which puts them further from the exact function
than a single rounding, but still within 2⁻⁷ of |W'|·|x| (measured worst 2.2e-3 for OSF and 4.2e-3 for
FRoD on these tiny models, smaller on wider ones).

OSF and PSOFT rebuild their factors from an fp32 SVD of W, in the merge and again in the forward path
(both on the CPU). Where verify runs with another LAPACK than the merge did (another machine or torch
build), the two SVDs differ in the last bits and the low/principal subspace moves with them: measured
1.2e-6 (OSF) and 7.1e-6 (PSOFT) of |W'|·|x| on an H100 machine's torch 2.11 CPU for merges made here,
against the fp32 default rtol of 1e-5 (cuSOLVER's SVD: 1.3e-5, which is why the paths use the CPU's).
Such cross-machine checks may need ``--rtol 1e-4``.
"""

from __future__ import annotations

import pytest
import torch
from oracle import (
    LLAMA_LINEAR,
    assert_close_to,
    check_verify,
    conv_net,
    load_all,
    make_adapter,
    reload,
    run_case,
    save_base,
    tiny_gpt2,
    tiny_llama,
)
from peft import DeftConfig, HiraConfig, OSFConfig, PeanutConfig, PeftModel, PsoftConfig
from safetensors.torch import load_file
from test_method_base_dependent import DEFT_VARIANTS, PEANUT_VARIANTS
from test_method_svd_based import (ADAMSS, ADAMSS_CASES, FROD_MODELS, LLAMA, PSOFT_VARIANTS, _frod_config,
                                   merge_adamss)

import wsurgery
from wsurgery.adapters import load_adapter
from wsurgery.checkpoint import open_checkpoint
from wsurgery.engine import plan
from wsurgery.methods import ReplacePatch
from wsurgery.methods.layers import Conv

BF16 = torch.bfloat16


def _case(tmp_path, model, cfg, dtype=torch.float32, **verify):
    base, adapter, _ = run_case(tmp_path, model, cfg, dtype=dtype, check_unmerge=False)
    check_verify(tmp_path, base, adapter, tmp_path / "merged", **verify)
    if dtype == torch.float32:
        _assert_forward_is_peft(model, base, adapter)


def _assert_forward_is_peft(model, base_dir, adapter_dir, tokens=16):
    """Every patch's forward path against PEFT's own unmerged forward of that module (float32, eval mode)."""
    peft = PeftModel.from_pretrained(reload(model, base_dir, torch.float32), adapter_dir).eval()
    ckpt = open_checkpoint(base_dir)
    jobs = plan(ckpt, [(load_adapter(adapter_dir), 1.0)]).jobs.values()
    assert jobs
    for job in jobs:
        base = {role: ckpt.read(name).float() for role, name in job.tensors.items()}
        # PEFT saves targeted embeddings whole (save_embedding_layers): the base as the adapter's layers see it.
        patches = [bound.patch for bound, _, _ in job.patches]
        base |= {p.role: p.tensor.float() for p in patches if isinstance(p, ReplacePatch)}
        (patch,) = [p for p in patches if not isinstance(p, ReplacePatch)]
        shapes = {role: tuple(t.shape) for role, t in base.items()}
        layer = patch.layer(shapes)
        x = layer.inputs(shapes, tokens, torch.Generator().manual_seed(0))
        ours = patch.forward(x, base, layer)
        bias = f"{job.module}.bias"
        if "bias" not in base and bias in ckpt.tensors:  # a bias the patch does not change: PEFT's layer adds it
            ours = ours + ckpt.read(bias).float().view(-1, *[1] * (ours.dim() - 2))
        module = peft.base_model.model.get_submodule(job.module)
        if isinstance(layer, Conv):  # verify's Conv runs unpadded (padding is not in the files)
            module.get_base_layer().padding = (0,) * (x.dim() - 2)
        with torch.no_grad():
            theirs = module(x)
        err = float((ours - theirs).abs().max() / theirs.abs().max())
        assert err < 1e-5, f"{job.module}: forward path is {err:.2g} (relative) from PEFT's forward"


# -- HiRA ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_hira_llama_linear_embedding_and_head(tmp_path, dtype):
    _case(tmp_path, tiny_llama(dtype), HiraConfig(r=4, target_modules=LLAMA_LINEAR + ["embed_tokens", "lm_head"]),
          dtype)


def test_hira_conv_and_embedding(tmp_path):
    _case(tmp_path, conv_net(), HiraConfig(r=3, target_modules=["emb", "c1", "c2", "pw", "c3", "fc"]),
          transposable=False)


def test_hira_gpt2_conv1d(tmp_path):
    _case(tmp_path, tiny_gpt2(), HiraConfig(r=3, target_modules=["c_attn", "c_proj", "c_fc"]))


# -- DEFT ------------------------------------------------------------------------------------------

DEFT_CASES = [("relu", torch.float32), ("relu", BF16), ("relu-para", torch.float32), ("qr-alpha", torch.float32),
              ("qr-para", BF16)]


@pytest.mark.parametrize(("variant", "dtype"), DEFT_CASES, ids=[f"{v}-{str(d)[6:]}" for v, d in DEFT_CASES])
def test_deft_llama(tmp_path, variant, dtype):
    _case(tmp_path, tiny_llama(dtype), DeftConfig(**{"r": 3, **DEFT_VARIANTS[variant]}, target_modules=LLAMA_LINEAR),
          dtype)


def test_deft_gpt2_conv1d(tmp_path):
    _case(tmp_path, tiny_gpt2(), DeftConfig(r=3, alpha=4, fan_in_fan_out=True, target_modules=["c_attn", "c_proj",
                                                                                                 "c_fc"]))


# -- PEANuT ----------------------------------------------------------------------------------------

PEANUT_CASES = [("relu-depth2", torch.float32), ("relu-depth2", BF16), ("gelu_new-depth1-scaled", torch.float32),
                ("silu-depth0", BF16)]


@pytest.mark.parametrize(("variant", "dtype"), PEANUT_CASES, ids=[f"{v}-{str(d)[6:]}" for v, d in PEANUT_CASES])
def test_peanut_llama(tmp_path, variant, dtype):
    _case(tmp_path, tiny_llama(dtype), PeanutConfig(r=4, **PEANUT_VARIANTS[variant], target_modules=LLAMA_LINEAR),
          dtype)


# -- OSF -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_osf_llama(tmp_path, dtype):
    _case(tmp_path, tiny_llama(dtype), OSFConfig(target_modules=LLAMA + ["o_proj"], effective_rank=5), dtype)


# -- PSOFT -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", PSOFT_VARIANTS, ids=list(PSOFT_VARIANTS))
def test_psoft_llama(tmp_path, variant):
    _case(tmp_path, tiny_llama(), PsoftConfig(r=6, psoft_alpha=12, target_modules=LLAMA + ["o_proj"],
                                              **PSOFT_VARIANTS[variant]))


def test_psoft_bf16(tmp_path):
    _case(tmp_path, tiny_llama(BF16), PsoftConfig(r=4, target_modules=LLAMA + ["o_proj"],
                                                  **PSOFT_VARIANTS["neumann-pissa"]), BF16)


# -- FRoD ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", FROD_MODELS, ids=list(FROD_MODELS))
def test_frod(tmp_path, model):
    make, targets = FROD_MODELS[model]
    _case(tmp_path, make(), _frod_config(_with_square(targets)))


def test_frod_gpt2_with_lm_head_layout_from_the_shapes(tmp_path):
    """PEFT saves the last wrapped layer's fan_in_fan_out (the lm_head's False); c_attn/c_fc are Conv1D."""
    from test_method_hra_road_ia3 import _untied_gpt2

    _case(tmp_path, _untied_gpt2(), _frod_config(["c_attn", "c_fc", "lm_head"]), transposable=False)


@pytest.mark.parametrize("model", ["llama", "gpt2-conv1d"])
def test_frod_bf16(tmp_path, model):
    make, targets = FROD_MODELS[model]
    _case(tmp_path, make(BF16), _frod_config(_with_square(targets)), BF16)


def _with_square(targets):
    """GPT-2's attn.c_proj (32x32) gives the transposed-change check a square Conv1D weight."""
    return targets + ["c_proj"] if "c_attn" in targets else targets


# -- AdaMSS ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ADAMSS_CASES)
def test_adamss(tmp_path, case):
    folder = ADAMSS / case
    if not merge_adamss(case, tmp_path / "merged"):
        return  # refused, as it must be where the clustering cannot be reproduced (ADAMSS_SIMD_DEPENDENT)
    assert_close_to(load_all(tmp_path / "merged"), load_file(folder / "expected.safetensors"),
                    base=load_all(folder / "base"))
    check_verify(tmp_path, folder / "base", folder / "adapter", tmp_path / "merged")


# -- CUDA ------------------------------------------------------------------------------------------

CUDA_CASES = {  # one adapter per method, bf16 where the method's bf16 merge rounds as PEFT does
    "hira": (lambda: tiny_llama(BF16), HiraConfig(r=4, target_modules=LLAMA_LINEAR + ["embed_tokens", "lm_head"])),
    "hira-conv": (conv_net, HiraConfig(r=3, target_modules=["emb", "c1", "c2", "pw", "c3", "fc"])),
    "deft-qr": (tiny_llama, DeftConfig(r=3, **DEFT_VARIANTS["qr-alpha"], target_modules=LLAMA_LINEAR)),
    "peanut": (lambda: tiny_llama(BF16), PeanutConfig(r=4, **PEANUT_VARIANTS["relu-depth2"],
                                                      target_modules=LLAMA_LINEAR)),
    "osf": (lambda: tiny_llama(BF16), OSFConfig(target_modules=LLAMA + ["o_proj"], effective_rank=5)),
    "psoft": (tiny_llama, PsoftConfig(r=6, psoft_alpha=12, target_modules=LLAMA + ["o_proj"])),
    "frod": (lambda: tiny_gpt2(BF16), _frod_config(["c_attn", "c_fc", "c_proj"])),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [*CUDA_CASES, "adamss"])
def test_cuda_matches_cpu(tmp_path, case):
    if case == "adamss":
        base, adapter = ADAMSS / "bf16" / "base", ADAMSS / "bf16" / "adapter"
    else:
        make, cfg = CUDA_CASES[case]
        model = make()
        base = save_base(model, tmp_path / "base")
        adapter = make_adapter(model, cfg, tmp_path / "adapter")
    wsurgery.merge(base, adapter, tmp_path / "merged", progress=False)
    wsurgery.merge(base, adapter, tmp_path / "scaled", scale=1.5, progress=False)
    cpu, gpu, wrong = (wsurgery.api.verify(base, adapter, tmp_path / merged, progress=False, device=device)
                       for merged, device in (("merged", "cpu"), ("merged", "cuda"), ("scaled", "cuda")))
    assert cpu.passed and gpu.passed and gpu.device == "cuda" and not wrong.passed
    for a, b in zip(cpu.checks, gpu.checks):
        assert a.module == b.module and abs(a.max_rel - b.max_rel) < 1e-3
