"""VeRA, PVeRA and RandLoRA against PEFT 0.21.2's ``merge_and_unload()``.

All three share random projections across layers: saved in the adapter (``save_projection=True``) or
regenerated from ``projection_prng_key`` over the largest in/out dims of *all* targeted layers. The
target sets below are chosen so the largest in and out come from different layers (and differ from
each other), so a wrong rule for the dims, a wrong draw order or a wrong init changes the result.
Every adapter parameter is random and non-zero (``make_adapter``), the oracle is PEFT on the very
files we read, and every merge is unmerged again.

bf16 bases: PEFT builds the shared projections when it injects the adapter, casts them to the base
layer's dtype there and back to float32 (``autocast_adapter_dtype``), and only then loads saved ones at
full precision. So on a bf16 base it merges with bf16-rounded *regenerated* projections (VeRA, PVeRA and
sparse RandLoRA draw in float32; dense RandLoRA draws in bf16, which survives the round trip) and with
saved projections as saved. The engine tells each patch its base dtype (``patch.base_dtypes``), so
wsurgery rounds the same way and agrees to 1 ulp.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracle import (
    assert_close_to,
    dtypes_fp32_bf16,
    edit_adapter_config,
    edit_adapter_tensors,
    load_all,
    make_adapter,
    oracle_merge,
    reload,
    save_base,
    tiny_gpt2,
    tiny_llama,
)
from peft import PveraConfig, RandLoraConfig, VeraConfig
from safetensors.torch import load_file, save_file

import wsurgery
from wsurgery.adapters import load_adapter
from wsurgery.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# Llama dims (out, in): q (32, 32), v (16, 32), o (32, 32), up (48, 32), down (32, 48).
MIXED = ["q_proj", "v_proj", "up_proj", "down_proj"]  # max out 48 from up_proj, max in 48 from down_proj
WIDE_OUT = ["q_proj", "v_proj", "o_proj", "up_proj"]  # max out 48, max in 32: A and B differ in size
GPT2 = ["c_attn", "c_fc"]  # Conv1D weights (in, out): (32, 96), (32, 128): max in 32, max out 128

EPS32 = 2.0 ** -24


def check_unmerged(unmerged, base, merged):
    """Unmerge undoes the merge up to the roundings of W' = W + ΔW and W' - ΔW (relative to |W'|, not |W|)."""
    for name, want in base.items():
        got = unmerged[name]
        if want.dtype in (torch.bfloat16, torch.float16):
            assert_close_to({name: got}, {name: want}, base={name: merged[name]}, ulps=2)
        elif not torch.equal(got, want):
            err = (got.double() - want.double()).abs().max().item()
            bound = 4 * EPS32 * merged[name].double().abs().max().item() + 1e-6 * want.double().abs().max().item()
            assert err <= bound, f"{name}: unmerge error {err:.3g} > {bound:.3g}"


def case(tmp_path, model, config, dtype=torch.float32, *, edit=None, ulps=1, trained_on=None):
    """Save base and random adapter (trained on ``trained_on``, default the base; ``edit`` may change the saved
    adapter), compare our merge with PEFT's on the same files, unmerge again; returns (merge result, merged
    tensors, PEFT's tensors, adapter folder)."""
    base_dir = save_base(model, tmp_path / "base")
    adapter_dir = make_adapter(trained_on if trained_on is not None else model, config, tmp_path / "adapter")
    if edit is not None:
        edit(adapter_dir)
    expected = oracle_merge(reload(model, base_dir, dtype), adapter_dir)
    result = wsurgery.merge(base_dir, adapter_dir, tmp_path / "merged", progress=False)
    merged, base = load_all(tmp_path / "merged"), load_all(base_dir)
    assert_close_to(merged, expected, base=base, ulps=ulps)
    changed = {n for n in merged if not torch.equal(merged[n], base[n])}
    targets = config.target_modules
    assert changed and all(any(f".{t}." in n for t in targets) for n in changed)
    assert result.changed_tensors == len([n for n in base if any(f".{t}.weight" in n for t in targets)])
    wsurgery.unmerge(tmp_path / "merged", adapter_dir, tmp_path / "unmerged", progress=False)
    check_unmerged(load_all(tmp_path / "unmerged"), base, merged)
    return result, merged, expected, adapter_dir


def max_rel_err(a, b):
    return max((a[n].double() - b[n].double()).abs().max().item() / b[n].double().abs().max().item() for n in b)


DTYPES = dtypes_fp32_bf16()
SAVED = pytest.mark.parametrize("save", [True, False], ids=["saved", "regenerated"])


# -- VeRA and PVeRA ----------------------------------------------------------------------------------------------

VERA_FAMILY = pytest.mark.parametrize("cls", [VeraConfig, PveraConfig], ids=["vera", "pvera"])


@VERA_FAMILY
@DTYPES
@SAVED
def test_vera_family_llama(tmp_path, cls, dtype, save):
    cfg = cls(r=4, target_modules=MIXED, save_projection=save)
    # Regenerated projections on bf16: PEFT rounds them to bf16 (buffers follow the base dtype).
    result, _, _, adapter_dir = case(tmp_path, tiny_llama(dtype), cfg, dtype)
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    prefix = "pvera" if cls is PveraConfig else "vera"
    assert (f"base_model.{prefix}_A" in keys) == save  # the regeneration really is exercised
    assert not result.notes


@VERA_FAMILY
def test_vera_family_fp32_trained_saved_projections_on_bf16_base(tmp_path, cls):
    # PEFT loads saved float32 projections into float32 buffers even on a bf16 base: they must not be rounded.
    cfg = cls(r=4, target_modules=WIDE_OUT)
    case(tmp_path, tiny_llama(torch.bfloat16), cfg, torch.bfloat16, trained_on=tiny_llama())


@VERA_FAMILY
def test_vera_family_regenerated_wide_out(tmp_path, cls):
    # max_in (32) != max_out (48): A (r, 32) and B (48, r) are drawn from one generator, A first.
    case(tmp_path, tiny_llama(), cls(r=6, target_modules=WIDE_OUT, save_projection=False, projection_prng_key=123))


@VERA_FAMILY
@SAVED
def test_vera_family_gpt2_conv1d(tmp_path, cls, save):
    # Conv1D weights are (in, out): the dims PEFT maximises come from the transposed shape.
    case(tmp_path, tiny_gpt2(), cls(r=4, target_modules=GPT2, save_projection=save))


def test_pvera_sample_at_inference_merges_the_mean_and_says_so(tmp_path):
    cfg = PveraConfig(r=4, target_modules=MIXED, sample_at_inference=True)
    result, _, _, _ = case(tmp_path, tiny_llama(), cfg)
    assert any("sample_at_inference" in n and "mean" in n for n in result.notes)


# -- RandLoRA ----------------------------------------------------------------------------------------------------

@DTYPES
@SAVED
def test_randlora_llama(tmp_path, dtype, save):
    # r=8: q/v/up/down have lo = 32, 16, 32, 32 -> nb = 4, 2, 4, 4; up (out > in) and down (in > out) take
    # the two branches of PEFT's orientation rule. Dense bases are drawn in bf16, so bf16 matches as is.
    cfg = RandLoraConfig(r=8, randlora_alpha=4, target_modules=MIXED, save_projection=save)
    result, _, _, adapter_dir = case(tmp_path, tiny_llama(dtype), cfg, dtype)
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    assert ("base_model.randlora_A" in keys) == save
    assert ("base_model.model.model.layers.0.mlp.up_proj.randlora_B" in keys) == save  # per-layer copies
    assert not result.notes


@pytest.mark.parametrize("variant", ["sparse", "very_sparse"])
@DTYPES
def test_randlora_sparse_bases_regenerated(tmp_path, variant, dtype):
    cfg = RandLoraConfig(r=5, randlora_alpha=10, target_modules=WIDE_OUT, save_projection=False,
                         projection_prng_key=3, **{variant: True})
    # Sparse bases are float32 in PEFT, rounded to bf16 on a bf16 base.
    case(tmp_path, tiny_llama(dtype), cfg, dtype)


def test_randlora_regenerated_wide_out_default_alpha(tmp_path):
    # min_max 32 / max_max 48, r=6 -> nb_max = 6 with a partial last basis; default alpha 640 (scaling 106.7).
    case(tmp_path, tiny_llama(), RandLoraConfig(r=6, target_modules=WIDE_OUT, save_projection=False))


@SAVED
def test_randlora_gpt2_conv1d(tmp_path, save):
    case(tmp_path, tiny_gpt2(), RandLoraConfig(r=8, randlora_alpha=8, target_modules=GPT2, save_projection=save))


@pytest.mark.parametrize("make_config", [
    lambda: VeraConfig(r=4, target_modules=WIDE_OUT, save_projection=False, projection_prng_key=5),
    lambda: PveraConfig(r=4, target_modules=WIDE_OUT, save_projection=False, projection_prng_key=5),
    lambda: RandLoraConfig(r=8, randlora_alpha=8, target_modules=MIXED, save_projection=False, projection_prng_key=5),
], ids=["vera", "pvera", "randlora"])
def test_wrong_prng_key_gives_a_mismatching_merge(tmp_path, make_config):
    config = make_config()
    _, _, expected, adapter_dir = case(tmp_path / "right", tiny_llama(), config)
    base_dir = tmp_path / "right" / "base"
    # The same adapter with another key: the regenerated projections, and so the merge, no longer match PEFT's.
    edit_adapter_config(adapter_dir, projection_prng_key=6)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "wrong", progress=False)
    wrong = load_all(tmp_path / "wrong")
    with pytest.raises(AssertionError):
        assert_close_to(wrong, expected)
    assert max_rel_err(wrong, expected) > 1e-2
    # ... and PEFT, given that key, regenerates the same other projections as we do.
    assert_close_to(wrong, oracle_merge(reload(tiny_llama(), base_dir, torch.float32), adapter_dir))


# -- saved projections that the config says to ignore, and bad input ---------------------------------------------

def _edit_tensors(adapter_dir, fn):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("cls, key", [(VeraConfig, "base_model.vera_A"), (RandLoraConfig, "base_model.randlora_A")],
                         ids=["vera", "randlora"])
def test_saved_projections_with_save_projection_false_are_ignored_like_peft(tmp_path, cls, key):
    cfg = cls(r=4, target_modules=MIXED)

    def edit(d):  # PEFT ignores saved projections when the config says they were not saved
        edit_adapter_config(d, save_projection=False)
        _edit_tensors(d, lambda t: t.update({k: v * 1.5 for k, v in t.items() if k.endswith(key.split(".")[-1])}))

    result, _, _, _ = case(tmp_path / "changed", tiny_llama(), cfg, edit=edit)
    assert any("save_projection=false" in n and "differ" in n for n in result.notes)
    # Saved projections that equal the regenerated ones: nothing to report.
    result, _, _, _ = case(tmp_path / "equal", tiny_llama(), cfg,
                           edit=lambda d: edit_adapter_config(d, save_projection=False))
    assert not result.notes


def _adapter(tmp_path, config, model=None):
    model = model or tiny_llama()
    base_dir = save_base(model, tmp_path / "base")
    return base_dir, make_adapter(model, config, tmp_path / "adapter")


@pytest.mark.parametrize("cls, name", [(VeraConfig, "vera"), (PveraConfig, "pvera"), (RandLoraConfig, "randlora")])
def test_missing_saved_projections_refused(tmp_path, cls, name):
    _, adapter_dir = _adapter(tmp_path, cls(r=4, target_modules=MIXED))
    _edit_tensors(adapter_dir, lambda t: [t.pop(k) for k in list(t) if k.endswith(f"{name}_B")])
    with pytest.raises(InputError, match=f"{name}_B"):
        load_adapter(adapter_dir)


def test_randlora_inconsistent_per_layer_copy_refused(tmp_path):
    _, adapter_dir = _adapter(tmp_path, RandLoraConfig(r=4, target_modules=MIXED))
    key = "base_model.model.model.layers.1.self_attn.q_proj.randlora_A"
    _edit_tensors(adapter_dir, lambda t: t.update({key: t[key] + 1}))
    with pytest.raises(InputError, match="differs from the model-wide one"):
        load_adapter(adapter_dir)


@VERA_FAMILY
def test_saved_fan_in_fan_out_does_not_override_the_shapes(tmp_path, cls):
    """PEFT sets fan_in_fan_out per layer by its type (and saves the last layer's): a flag that says Conv1D
    on Llama's nn.Linear layers is ignored by PEFT, and by wsurgery, which reads the layout from the shapes."""
    base_dir, adapter_dir = _adapter(tmp_path, cls(r=4, target_modules=MIXED))
    edit_adapter_config(adapter_dir, fan_in_fan_out=True)
    expected = oracle_merge(reload(tiny_llama(), base_dir, torch.float32), adapter_dir)
    wsurgery.merge(base_dir, adapter_dir, tmp_path / "out", progress=False)
    assert_close_to(load_all(tmp_path / "out"), expected)


@VERA_FAMILY
def test_lambda_b_that_fits_no_axis_is_refused_before_writing(tmp_path, cls):
    base_dir, adapter_dir = _adapter(tmp_path, cls(r=4, target_modules=MIXED))
    key = f"base_model.model.model.layers.0.self_attn.q_proj.{'p' if cls is PveraConfig else ''}vera_lambda_b"
    edit_adapter_tensors(adapter_dir, lambda t: t.__setitem__(key, t[key][:30].clone()))
    with pytest.raises(InputError, match=r"q_proj: P?VeRA lambda_b has 30 entries but the base weight \[32, 32\]"):
        wsurgery.merge(base_dir, adapter_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_rank_disagreeing_with_config_refused(tmp_path):
    _, adapter_dir = _adapter(tmp_path, VeraConfig(r=4, target_modules=MIXED))
    edit_adapter_config(adapter_dir, r=5)
    with pytest.raises(InputError, match="r=5"):
        load_adapter(adapter_dir)


def test_describe_without_a_base(tmp_path):
    _, adapter_dir = _adapter(tmp_path, RandLoraConfig(r=8, target_modules=MIXED, save_projection=False))
    adapter = load_adapter(adapter_dir)
    facts = [p.describe() for p in adapter.patches()]
    assert {f["projections"] for f in facts} == {"regenerated from projection_prng_key"}
    assert {f["num_bases"] for f in facts} == {2, 4}
    assert math.isclose(facts[0]["scaling"], 640 / 8)
