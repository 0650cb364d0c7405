"""Image-model adapter files: resize (kohya sd-scripts' resize_lora.py), convert kohya <-> diffusers, extract.

Oracles: kohya's ``networks/resize_lora.py`` (sd-scripts is not on PyPI; its rank rules, alpha rule and SVD are
copied below from commit 063ef100648c016b6b4d804a6de6f5afab7ebd58, ``index_sv_*``, ``rank_resize``,
``extract_linear``/``extract_conv``, ``merge_linear``/``merge_conv``); diffusers' own loaders
(``lora_state_dict`` + ``fuse_lora``) on tiny models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wsurgery.adapters.formats import read_adapter_file
from wsurgery.convert.resize import resize
from wsurgery.errors import InputError, UnsupportedError

# --- kohya sd-scripts networks/resize_lora.py @ 063ef100648c016b6b4d804a6de6f5afab7ebd58 (the oracle) ---------
MIN_SV = 1e-6


def index_sv_cumulative(S, target):
    original_sum = float(torch.sum(S))
    cumulative_sums = torch.cumsum(S, dim=0) / original_sum
    index = int(torch.searchsorted(cumulative_sums, target))
    index = max(0, min(index, len(S) - 1))
    return index


def index_sv_fro(S, target):
    S_squared = S.pow(2)
    S_fro_sq = float(torch.sum(S_squared))
    sum_S_squared = torch.cumsum(S_squared, dim=0) / S_fro_sq
    index = int(torch.searchsorted(sum_S_squared, target**2))
    index = max(0, min(index, len(S) - 1))
    return index


def index_sv_ratio(S, target):
    max_sv = S[0]
    min_sv = max_sv / target
    index = int(torch.sum(S > min_sv).item()) - 1
    index = max(0, min(index, len(S) - 1))
    return index


def rank_resize(S, rank, dynamic_method, dynamic_param, scale=1):
    param_dict = {}
    if dynamic_method == "sv_ratio":
        new_rank = index_sv_ratio(S, dynamic_param) + 1
    elif dynamic_method == "sv_cumulative":
        new_rank = index_sv_cumulative(S, dynamic_param) + 1
    elif dynamic_method == "sv_fro":
        new_rank = index_sv_fro(S, dynamic_param) + 1
    else:
        new_rank = rank
    new_alpha = float(scale * new_rank)
    if S[0] <= MIN_SV:
        new_rank = 1
        new_alpha = float(scale * new_rank)
    elif new_rank > rank:
        new_rank = rank
        new_alpha = float(scale * new_rank)
    s_sum = torch.sum(torch.abs(S))
    s_rank = torch.sum(torch.abs(S[:new_rank]))
    S_squared = S.pow(2)
    s_fro = torch.sqrt(torch.sum(S_squared))
    s_red_fro = torch.sqrt(torch.sum(S_squared[:new_rank]))
    param_dict["new_rank"] = new_rank
    param_dict["new_alpha"] = new_alpha
    param_dict["sum_retained"] = float(s_rank / s_sum)
    param_dict["fro_retained"] = float(s_red_fro / s_fro)
    param_dict["max_ratio"] = float(S[0] / S[new_rank - 1])
    return param_dict


def kohya_resize_module(down, up, alpha, lora_rank, dynamic_method, dynamic_param):
    """resize_lora_model's body for one module (merge_*, extract_* with full SVD: our matrices are < 2048)."""
    old_rank = down.size()[0]
    scale = 1.0 if alpha is None else alpha / old_rank
    if down.dim() == 4:
        in_rank, in_size, kernel_size, _ = down.shape
        out_size = up.shape[0]
        weight = (up.reshape(out_size, -1) @ down.reshape(in_rank, -1))
    else:
        weight = up @ down
    U, S, Vh = torch.linalg.svd(weight)
    p = rank_resize(S, lora_rank, dynamic_method, dynamic_param, scale)
    r = p["new_rank"]
    U = U[:, :r] @ torch.diag(S[:r])
    Vh = Vh[:r, :]
    if down.dim() == 4:
        p["lora_down"] = Vh.reshape(r, in_size, kernel_size, kernel_size)
        p["lora_up"] = U.reshape(out_size, r, 1, 1)
    else:
        p["lora_down"], p["lora_up"] = Vh, U
    return p
# --- end of the copied oracle -------------------------------------------------------------------------------


def _decaying(rank: int, out: int, inp: int, decay: float, g: torch.Generator, kernel: int | None = None):
    """down/up whose product has singular values falling by ``decay`` per index (so dynamic rules differ)."""
    down = torch.randn((rank, inp) if kernel is None else (rank, inp, kernel, kernel), generator=g) * 0.2
    up = torch.randn((out, rank) if kernel is None else (out, rank, 1, 1), generator=g) * 0.2
    scales = decay ** torch.arange(rank, dtype=torch.float32)
    return down, up * (scales.view(1, rank, 1, 1) if kernel else scales)


def kohya_file(path: Path, metadata: dict[str, str] | None = None) -> dict[str, tuple]:
    """A kohya LoCon file: Linear modules of several ranks/decays, a 3x3 and a 1x1 Conv2d, a zero module, a module
    without alpha, and a LoHa module (kept as is)."""
    g = torch.Generator().manual_seed(0)
    specs = {"lora_unet_mid_block_attentions_0_proj_in": (16, 40, 32, 0.9, None, 8.0),
             "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (8, 32, 32, 0.5, None, 4.0),
             "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": (12, 32, 64, 0.98, None, None),
             "lora_unet_down_blocks_0_resnets_0_conv1": (8, 24, 16, 0.7, 3, 1.0),
             "lora_unet_down_blocks_0_resnets_0_conv_shortcut": (4, 24, 16, 0.8, 1, 4.0),
             "lora_te_text_model_encoder_layers_0_mlp_fc1": (8, 48, 32, 0.6, None, 8.0)}
    tensors: dict[str, torch.Tensor] = {}
    for name, (r, out, inp, decay, k, alpha) in specs.items():
        down, up = _decaying(r, out, inp, decay, g, k)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    zero = "lora_te_text_model_encoder_layers_0_mlp_fc2"
    tensors[f"{zero}.lora_down.weight"] = torch.randn(4, 48, generator=g)
    tensors[f"{zero}.lora_up.weight"] = torch.zeros(32, 4)
    tensors[f"{zero}.alpha"] = torch.tensor(2.0)
    specs[zero] = (4, 32, 48, 0.0, None, 2.0)
    loha = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    for p, shape in (("hada_w1_a", (32, 4)), ("hada_w1_b", (4, 32)), ("hada_w2_a", (32, 4)), ("hada_w2_b", (4, 32))):
        tensors[f"{loha}.{p}"] = torch.randn(shape, generator=g) * 0.1
    tensors[f"{loha}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path), metadata=metadata or {})
    return specs


@pytest.mark.parametrize("options, method, param", [
    ({"rank": 6}, None, None),
    ({"rank": 6, "conv_rank": 3}, None, None),
    ({"fro": 0.9}, "sv_fro", 0.9),
    ({"energy": 0.8, "rank": 10}, "sv_cumulative", 0.8),
    ({"ratio": 5.0}, "sv_ratio", 5.0),
])
def test_resize_matches_kohya(tmp_path, options, method, param):
    src = tmp_path / "lora.safetensors"
    specs = kohya_file(src, {"ss_network_module": "lycoris.kohya", "ss_network_dim": "16",
                             "ss_network_args": json.dumps({"algo": "locon"}),
                             "ss_network_alpha": "8.0", "sshs_model_hash": "stale", "ss_training_comment": "hi"})
    out = tmp_path / "small.safetensors"
    result = resize(src, out, **options)
    written = load_file(str(out))
    source = load_file(str(src))
    by_name = {m.module: m for m in result.modules}
    ranks = set()
    for name in specs:
        down, up = source[f"{name}.lora_down.weight"], source[f"{name}.lora_up.weight"]
        alpha = float(source[f"{name}.alpha"]) if f"{name}.alpha" in source else None
        cap = options.get("rank") or down.shape[0]
        if down.dim() == 4:
            cap = options.get("conv_rank") or options.get("rank") or down.shape[0]
        want = kohya_resize_module(down, up, alpha, cap, method, param)
        got = by_name[name]
        assert (got.new_rank, got.alpha) == (want["new_rank"], want["new_alpha"]), name
        for key in ("sum_retained", "fro_retained", "max_ratio"):  # nan for the zero module, as kohya's
            if key == "max_ratio" and want[key] > 1e5:  # kept past the old rank: kohya divides by rounding noise,
                assert got.max_ratio > 1e5  # we by an exact zero (inf)
                continue
            assert getattr(got, key) == pytest.approx(want[key], rel=1e-4, nan_ok=True), (name, key)
        # the same truncated SVD: its product, and each component's singular value (up's column norms); the
        # singular vectors' signs are LAPACK's choice
        up_w, down_w = written[f"{name}.lora_up.weight"], written[f"{name}.lora_down.weight"]
        r = down_w.shape[0]
        assert up_w.shape == want["lora_up"].shape and down_w.shape == want["lora_down"].shape
        product, expected = up_w.reshape(-1, r) @ down_w.reshape(r, -1), want["lora_up"].reshape(-1, r) @ \
            want["lora_down"].reshape(r, -1)
        torch.testing.assert_close(product, expected, rtol=0, atol=1e-5 * float(expected.abs().max()) + 1e-7)
        torch.testing.assert_close(up_w.reshape(-1, r).norm(dim=0), want["lora_up"].reshape(-1, r).norm(dim=0),
                                   rtol=1e-4, atol=1e-6)
        assert float(written[f"{name}.alpha"]) == want["new_alpha"]
        ranks.add(got.new_rank)
    if method is not None:
        assert len(ranks) > 2, f"the dynamic rule should pick several ranks here, got {ranks}"
    # the LoHa module is copied as it was
    assert result.kept == ["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    for k, v in source.items():
        if "hada" in k:
            assert torch.equal(written[k], v)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert "sshs_model_hash" not in meta and json.loads(meta["wsurgery"])["operation"] == "resize"
    if method is None:
        assert meta["ss_network_dim"] == str(options["rank"])
        assert meta["ss_training_comment"].startswith("dimension is resized from 16 to 6")
    else:
        assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
        assert meta["ss_training_comment"] == f"Dynamic resize with {method}: {param} from 16; hi"
    read_adapter_file(out)  # our reader takes what we wrote


def test_resize_keeps_the_change_at_full_rank(tmp_path):
    """At the module's own rank the resized change is the original (truncated SVD loses nothing)."""
    src = tmp_path / "lora.safetensors"
    kohya_file(src)
    out = tmp_path / "same.safetensors"
    resize(src, out, fro=1.0)
    before, after = read_adapter_file(src), read_adapter_file(out)
    for name, m in before.modules.items():
        if m.algo != "lora":
            continue  # copied byte for byte (test_resize_matches_kohya)
        d0 = m.patch.delta()["weight"]
        d1 = after.modules[name].patch.delta()["weight"]
        torch.testing.assert_close(d1, d0, rtol=1e-4, atol=1e-5 * float(d0.abs().max()) + 1e-7)


def test_resize_bad_options(tmp_path):
    src = tmp_path / "lora.safetensors"
    kohya_file(src)
    with pytest.raises(InputError, match="--rank, or one of"):
        resize(src, tmp_path / "a.safetensors")
    with pytest.raises(InputError, match="not several"):
        resize(src, tmp_path / "a.safetensors", fro=0.9, energy=0.9)
    with pytest.raises(InputError, match=r"share in \(0, 1\]"):
        resize(src, tmp_path / "a.safetensors", fro=1.5)
    with pytest.raises(InputError, match="one .safetensors file"):
        resize(src, tmp_path / "a", rank=4)
    assert not list(tmp_path.glob("a*"))


# --- convert ----------------------------------------------------------------------------------------------------
diffusers = pytest.importorskip("diffusers", reason="needs diffusers==0.42.1 (a test dependency)")


def _sd1_unet_and_kohya(tmp_path: Path, algo: str = "lora"):
    """A tiny SD 1.x single file, its diffusers UNet, and a kohya/LyCORIS file on the UNet (attention and conv)."""
    pytest.importorskip("lycoris", reason="needs lycoris-lora==4.1.3 (a test dependency)")
    from diffusers import UNet2DConditionModel
    from test_diffusion_merge import _single_file, _unet_config
    from test_families import build
    from test_kohya_lycoris import _kohya_network

    comps, _, _ = build("sd1")
    _, ucfg = _unet_config()
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(comps["unet"])
    meta = {"ss_network_module": "networks.lora" if algo == "lora" else "lycoris.kohya",
            "ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_base_model_version": "sd_v1"}
    if algo != "lora":
        meta["ss_network_args"] = json.dumps({"algo": algo})
    import copy

    _, lora = _kohya_network(copy.deepcopy(unet), tmp_path, meta, algo=algo, conv_dim="2", conv_alpha="1")
    return unet, comps, lora, _single_file("sd1", tmp_path, comps)


def _diffusers_fused_unet(unet, lora: Path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """diffusers' own loading of an adapter file into a copy of the UNet, fused (the oracle)."""
    import copy

    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    model = copy.deepcopy(unet)
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(lora))
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, model, adapter_name="x")
    model.fuse_lora(lora_scale=scale)
    model.unload_lora()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-6) -> None:
    err = float((got.double() - want.double()).abs().max())
    assert err <= rel * float(want.double().abs().max()) + 1e-7, err


def test_kohya_to_diffusers_sd1_equals_diffusers_loading(tmp_path, capsys):
    """kohya LoRA (attention + 3x3 conv) -> diffusers file: diffusers fuses both files to the same UNet, and
    wsurgery merges both to the same single file."""
    from oracle import run_cli

    from wsurgery.convert.diffusion import convert_adapter_file

    unet, comps, lora, base = _sd1_unet_and_kohya(tmp_path)
    out = tmp_path / "diffusers.safetensors"
    result = convert_adapter_file(lora, out, to="diffusers", base=base)
    assert result.modules and result.max_error < 1e-6
    keys = load_file(str(out))
    assert all(k.startswith("unet.") and ".lora_" in k for k in keys)
    assert any("conv" in k for k in keys)
    before = _diffusers_fused_unet(unet, lora, 0.8)
    after = _diffusers_fused_unet(unet, out, 0.8)
    changed = [k for k in before if not torch.equal(before[k], comps["unet"][k])]
    assert len(changed) > 10
    for k, want in before.items():
        _close(after[k], want)
    merged = {}
    for name, adapter in (("a", lora), ("b", out)):
        status, _, err = run_cli(["merge", base, f"{adapter}:0.8", tmp_path / f"{name}.safetensors", "-q"], capsys)
        assert status == 0, err
        merged[name] = load_file(str(tmp_path / f"{name}.safetensors"))
    for k, want in merged["a"].items():
        _close(merged["b"][k], want)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["wsurgery"])["convert"] == {"from": "kohya", "to": "diffusers", "rank": None}
    # and back: diffusers -> kohya gives kohya's names and the same fused UNet
    back = tmp_path / "kohya.safetensors"
    convert_adapter_file(out, back, to="kohya", base=base)
    assert set(read_adapter_file(back).modules) == set(read_adapter_file(lora).modules)
    again = _diffusers_fused_unet(unet, back, 0.8)
    for k, want in before.items():
        _close(again[k], want)


def _tiny_flux_kohya_converter():
    """diffusers' kohya Flux LoRA converter hard-codes Flux.1's widths for ``linear1`` ([3072]*3 + [12288]); run
    its own code with the tiny model's widths instead (the only change)."""
    import inspect

    from diffusers.loaders import lora_conversion_utils as lcu

    src = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    assert src.count("dims=[3072, 3072, 3072, 12288]") == 1
    ns = dict(vars(lcu))
    exec(src.replace("dims=[3072, 3072, 3072, 12288]", "dims=[16, 16, 16, 64]"), ns)
    return ns["_convert_kohya_flux_lora_to_diffusers"]


def test_flux_diffusers_to_kohya_fused_names_equals_diffusers_loading(tmp_path, monkeypatch, capsys):
    """A diffusers Flux LoRA on q, k, v, the single blocks' MLP and (only) add_q_proj -> kohya: sd-scripts' fused
    names (``img_attn_qkv``, ``txt_attn_qkv`` with zero rows for k/v, ``linear1``); diffusers' kohya Flux loader
    gives the same fused transformer as the original file, and back to diffusers is exact too."""
    from diffusers import FluxPipeline
    from diffusers.loaders import lora_pipeline
    from oracle import run_cli
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from test_diffusion_merge import _flux, _single_file

    from wsurgery.convert.diffusion import convert_adapter_file

    model, comps = _flux()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_mlp", "add_q_proj"])
    model.add_adapter(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=config.to_dict())
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    model.fuse_lora(lora_scale=1.0)
    want = {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    base = _single_file("flux", tmp_path, comps)
    out = tmp_path / "kohya.safetensors"
    result = convert_adapter_file(lora, out, to="kohya", base=base)
    assert result.max_error < 1e-6
    names = set(read_adapter_file(out).modules)
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_1_linear1"} <= names
    monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", _tiny_flux_kohya_converter())
    state = FluxPipeline.lora_state_dict(str(out))
    fresh, _ = _flux()
    fresh.load_lora_adapter(state, prefix="transformer", adapter_name="k")
    fresh.fuse_lora(lora_scale=1.0)
    got = {k.replace(".base_layer", ""): v for k, v in fresh.state_dict().items() if "lora_" not in k}
    changed = [k for k in want if not torch.equal(want[k], comps["transformer"][k])]
    assert any("transformer_blocks.0.attn.add_q_proj" in k for k in changed)
    for k, w in want.items():
        _close(got[k], w)
    # back to diffusers names: the same change, and wsurgery merges all three files alike
    back = tmp_path / "back.safetensors"
    assert convert_adapter_file(out, back, to="diffusers", base=base).max_error < 1e-6
    merged = {}
    for name, adapter in (("a", lora), ("b", out), ("c", back)):
        status, _, err = run_cli(["merge", base, adapter, tmp_path / f"m{name}.safetensors", "-q"], capsys)
        assert status == 0, err
        merged[name] = load_file(str(tmp_path / f"m{name}.safetensors"))
    for k, w in merged["a"].items():
        _close(merged["b"][k], w)
        _close(merged["c"][k], w)
    # resize of this diffusers file (α = 4, r = 2 in its lora_adapter_metadata) at full rank: diffusers' own
    # loading (metadata honoured) fuses the same transformer
    resized = tmp_path / "resized.safetensors"
    resize(lora, resized, fro=1.0)
    state, meta = FluxPipeline.lora_state_dict(str(resized), return_lora_metadata=True)
    fresh, _ = _flux()
    fresh.load_lora_adapter(state, prefix="transformer", adapter_name="r", metadata=meta)
    fresh.fuse_lora(lora_scale=1.0)
    got = {k.replace(".base_layer", ""): v for k, v in fresh.state_dict().items() if "lora_" not in k}
    for k, w in want.items():
        _close(got[k], w)
    # an adapter for another family: refused, nothing written
    from test_families import build

    (tmp_path / "sd1").mkdir()
    sd1 = _single_file("sd1", tmp_path / "sd1", build("sd1")[0])
    with pytest.raises(InputError, match="map to nothing"):
        convert_adapter_file(lora, tmp_path / "other.safetensors", to="kohya", base=sd1)
    assert not (tmp_path / "other.safetensors").exists()


def test_loha_to_diffusers_is_factored_exactly(tmp_path, capsys):
    """A LyCORIS LoHa file (no diffusers form) -> diffusers LoRA, exact at rank 16 >= rank(ΔW): the error report
    is at rounding level, diffusers fuses the converted file to what wsurgery merges from the LoHa (wsurgery's LoHa
    merge is checked against LyCORIS in test_kohya_lycoris), and a forced lower rank reports its real error."""
    from oracle import run_cli

    from wsurgery.convert.diffusion import convert_adapter_file

    unet, comps, lora, base = _sd1_unet_and_kohya(tmp_path, algo="loha")
    assert {m.algo for m in read_adapter_file(lora).modules.values()} == {"loha"}
    out = tmp_path / "diffusers.safetensors"
    # the tiny model's conv_out (4 channels) is changed at full rank: no smaller LoRA holds it, so --rank is needed
    with pytest.raises(UnsupportedError, match="unet.conv_out: the change has full rank"):
        convert_adapter_file(lora, out, to="diffusers", base=base)
    assert not out.exists()
    result = convert_adapter_file(lora, out, to="diffusers", base=base, rank=16)  # LoHa rank 4: rank(ΔW) <= 16
    assert result.modules and result.max_error < 1e-6 and result.notes
    status, _, err = run_cli(["merge", base, lora, tmp_path / "m.safetensors", "-q"], capsys)
    assert status == 0, err
    from test_families import build

    ours = build("sd1")[2]["unet"](load_file(str(tmp_path / "m.safetensors")))
    fused = _diffusers_fused_unet(unet, out)
    changed = [k for k in fused if not torch.equal(fused[k], comps["unet"][k])]
    assert len(changed) > 10
    for k, want in ours.items():
        _close(fused[k], want, 1e-5)
    low = convert_adapter_file(lora, tmp_path / "low.safetensors", to="diffusers", base=base, rank=1)
    assert all(m.rank == 1 for m in low.modules) and 0.05 < low.max_error < 1


def test_diffusers_to_peft_folder_equals_diffusers_loading(tmp_path):
    """A diffusers-style UNet LoRA file -> PEFT folder: PEFT's own merge into the UNet equals diffusers' fuse of
    the file."""
    import copy

    from peft import PeftModel

    from wsurgery.convert.diffusion import convert_adapter_file

    unet, comps, lora, base = _sd1_unet_and_kohya(tmp_path)
    dfile = tmp_path / "d.safetensors"
    convert_adapter_file(lora, dfile, to="diffusers", base=base)
    folder = tmp_path / "peft"
    result = convert_adapter_file(dfile, folder, to="peft", base=base)
    assert result.max_error < 1e-6
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    merged = PeftModel.from_pretrained(copy.deepcopy(unet), folder).merge_and_unload().state_dict()
    want = _diffusers_fused_unet(unet, dfile)
    for k, w in want.items():
        _close(merged[k], w)
    with pytest.raises(InputError, match="needs --base"):
        convert_adapter_file(lora, tmp_path / "x.safetensors", to="diffusers")
    with pytest.raises(InputError, match="already a kohya"):
        convert_adapter_file(lora, tmp_path / "x.safetensors", to="kohya", base=base)
    assert not (tmp_path / "x.safetensors").exists()


# --- extract: kohya sd-scripts networks/extract_lora_from_models.py @ 06e8980044a209ebdcce8c78cdd0a7519ef2a965 ----
def kohya_extract_module(diff, dim, conv_dim, clamp_quantile=0.99):
    """The body of its ``svd`` loop for one module (copied; ``device`` dropped)."""
    mat = diff
    conv2d = len(mat.size()) == 4
    kernel_size = None if not conv2d else mat.size()[2:4]
    conv2d_3x3 = conv2d and kernel_size != (1, 1)
    rank = dim if not conv2d_3x3 or conv_dim is None else conv_dim
    out_dim, in_dim = mat.size()[0:2]
    rank = min(rank, in_dim, out_dim)
    if conv2d:
        if conv2d_3x3:
            mat = mat.flatten(start_dim=1)
        else:
            mat = mat.squeeze()
    U, S, Vh = torch.linalg.svd(mat)
    U = U[:, :rank]
    S = S[:rank]
    U = U @ torch.diag(S)
    Vh = Vh[:rank, :]
    dist = torch.cat([U.flatten(), Vh.flatten()])
    hi_val = torch.quantile(dist, clamp_quantile)
    low_val = -hi_val
    U = U.clamp(low_val, hi_val)
    Vh = Vh.clamp(low_val, hi_val)
    if conv2d:
        U = U.reshape(out_dim, rank, 1, 1)
        Vh = Vh.reshape(rank, in_dim, kernel_size[0], kernel_size[1])
    return U, Vh


def kohya_lora_modules(unet, text_encoder, conv_dim):
    """sd-scripts networks/lora.py ``create_modules``' choice of modules and names: Linear and Conv2d children of
    Transformer2DModel (plus ResnetBlock2D/Downsample2D/Upsample2D with a conv dim; 3x3 convs only then), of
    CLIPAttention/CLIPMLP in the text encoder. (transformers 5 names CLIPTextModel's modules without the
    ``text_model.`` its files and transformers 4 have: put back.)"""
    out = {}
    for prefix, root, targets in (("lora_unet", unet, ["Transformer2DModel"] + (
            ["ResnetBlock2D", "Downsample2D", "Upsample2D"] if conv_dim else [])),
            ("lora_te", text_encoder, ["CLIPAttention", "CLIPMLP"])):
        for name, module in root.named_modules():
            if module.__class__.__name__ not in targets:
                continue
            for child_name, child in module.named_modules():
                is_linear = child.__class__.__name__ == "Linear"
                is_conv2d = child.__class__.__name__ == "Conv2d"
                if not (is_linear or is_conv2d):
                    continue
                if is_conv2d and child.kernel_size != (1, 1) and not conv_dim:
                    continue
                full = (f"text_model.{name}" if prefix == "lora_te" and not name.startswith("text_model") else name)
                out[(prefix + "." + full + "." + child_name).replace(".", "_")] = (prefix, full + "." + child_name)
    return out
# --- end of the copied oracle -------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv_dim, text_delta", [(2, 0.05), (None, 0.001)])
def test_extract_sd1_matches_kohya(tmp_path, conv_dim, text_delta):
    """extract from two tiny SD 1.x single files = kohya's extract_lora_from_models.py on the same models: the same
    module names (LoCon with a conv rank; text encoder only where it differs by > min_diff) and tensors."""
    from diffusers import UNet2DConditionModel
    from test_diffusion_merge import _single_file, _unet_config
    from test_families import build
    from transformers import CLIPTextConfig, CLIPTextModel

    from wsurgery.convert.diffusion import extract_diffusion

    comps, _, _ = build("sd1")
    g = torch.Generator().manual_seed(3)
    tuned = {c: {k: v + (text_delta if c == "text_encoder" else 0.05) * torch.randn(v.shape, generator=g)
                 for k, v in d.items()} if c != "vae" else d for c, d in comps.items()}
    (tmp_path / "b").mkdir()
    (tmp_path / "t").mkdir()
    base, tuned_file = _single_file("sd1", tmp_path / "b", comps), _single_file("sd1", tmp_path / "t", tuned)
    out = tmp_path / "extracted.safetensors"
    result = extract_diffusion(base, tuned_file, out, rank=4, conv_rank=conv_dim)
    _, ucfg = _unet_config()
    unet = UNet2DConditionModel(**ucfg)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=50, max_position_embeddings=8, projection_dim=12))
    modules = kohya_lora_modules(unet, te, conv_dim)
    if text_delta * 4 < 0.01:  # |noise| stays under kohya's min_diff: the UNet only
        modules = {k: v for k, v in modules.items() if v[0] == "lora_unet"}
    written = load_file(str(out))
    assert {k.split(".")[0] for k in written} == set(modules)
    assert result.text_encoders == (text_delta * 4 >= 0.01)
    for name, (prefix, path) in modules.items():
        comp = "unet" if prefix == "lora_unet" else "text_encoder"
        diff = tuned[comp][path + ".weight"] - comps[comp][path + ".weight"]
        up, down = kohya_extract_module(diff.float(), 4, conv_dim)
        torch.testing.assert_close(written[f"{name}.lora_up.weight"], up, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(written[f"{name}.lora_down.weight"], down, rtol=1e-6, atol=1e-7)
        assert float(written[f"{name}.alpha"]) == down.shape[0]
    if conv_dim:
        assert any(written[k].dim() == 4 and written[k].shape[-1] == 3 for k in written)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert all(0 <= m.error < 1 for m in result.modules)


def test_peft_folder_to_diffusers_and_kohya_equals_peft_merge(tmp_path):
    """A PEFT LoRA folder on the UNet (rsLoRA scaling, Linear and 3x3 Conv2d targets) -> diffusers file and kohya
    file: diffusers fuses each to what PEFT's own merge_and_unload gives."""
    import copy

    from peft import LoraConfig, get_peft_model

    from wsurgery.convert.diffusion import convert_adapter_file

    unet, comps, _, base = _sd1_unet_and_kohya(tmp_path)
    model = get_peft_model(copy.deepcopy(unet), LoraConfig(r=3, lora_alpha=5, use_rslora=True,
                                                           target_modules=["to_q", "to_v", "conv1", "proj_in"]))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    folder = tmp_path / "peft"
    model.save_pretrained(folder)
    want = model.merge_and_unload().state_dict()
    for to in ("diffusers", "kohya"):
        out = tmp_path / f"{to}.safetensors"
        result = convert_adapter_file(folder, out, to=to, base=base)
        assert result.max_error < 1e-6 and len(result.modules) > 10
        got = _diffusers_fused_unet(unet, out)
        changed = [k for k in want if not torch.equal(want[k], comps["unet"][k])]
        assert any("conv1" in k for k in changed)
        for k, w in want.items():
            _close(got[k], w)
    with pytest.raises(InputError, match="already a PEFT"):
        convert_adapter_file(folder, tmp_path / "p2", to="peft", base=base)


# --- through the CLI (the commands live in wsurgery/commands.py; skipped until they are wired there) ------------
def _wired(command: str, option: str | None = None) -> None:
    from wsurgery.commands import cli

    cmd = cli.commands.get(command)
    if cmd is None or (option is not None and not any(option in p.opts for p in cmd.params)):
        pytest.skip(f"wsurgery {command} {option or ''} is not wired into commands.py yet (the integrator's file)")


def test_cli_resize_convert_extract(tmp_path, capsys):
    """The commands report what the API returns and refuse bad input with one line, writing nothing."""
    from oracle import run_cli

    _wired("resize")
    _wired("convert", "--component")
    _wired("extract", "--conv-rank")
    src = tmp_path / "lora.safetensors"
    kohya_file(src)
    status, out, err = run_cli(["resize", src, tmp_path / "r.safetensors", "--fro", "0.9"], capsys)
    assert status == 0, err
    assert "dynamic | dim:" in out and "Average Frobenius norm retention" in out
    status, _, err = run_cli(["resize", src, tmp_path / "bad.safetensors", "--fro", "0.9", "--ratio", "3"], capsys)
    assert status != 0 and "not several" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad.safetensors").exists()
    unet, comps, lora, base = _sd1_unet_and_kohya(tmp_path)
    status, out, err = run_cli(["convert", lora, tmp_path / "d.safetensors", "--to", "diffusers", "--base", base],
                               capsys)
    assert status == 0, err
    assert "(exact)" in out and "unet.down_blocks.0.attentions.0" in out
    status, _, err = run_cli(["convert", lora, tmp_path / "x.safetensors", "--to", "diffusers"], capsys)
    assert status != 0 and "needs --base" in err
    status, out, err = run_cli(["extract", base, base, tmp_path / "e.safetensors", "--format", "kohya",
                                "--conv-rank", "2"], capsys)
    assert status == 0, err  # BASE against itself: zero factors, as kohya writes them
    assert not (tmp_path / "x.safetensors").exists()


def test_peft_loha_folder_to_kohya_is_kept_as_loha(tmp_path, capsys):
    """A PEFT LoHa folder (Linear and 3x3 Conv2d) -> kohya: LyCORIS LoHa modules with the same tensors, and
    wsurgery's merge of the kohya file (LoHa merge checked against LyCORIS in test_kohya_lycoris) equals PEFT's own
    merge_and_unload."""
    import copy

    from oracle import run_cli
    from peft import LoHaConfig, get_peft_model
    from test_families import build

    from wsurgery.convert.diffusion import convert_adapter_file

    unet, comps, _, base = _sd1_unet_and_kohya(tmp_path)
    model = get_peft_model(copy.deepcopy(unet), LoHaConfig(r=2, alpha=3, target_modules=["to_k", "conv2"]))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hada_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp_path / "loha"
    model.save_pretrained(folder)
    want = model.merge_and_unload().state_dict()
    out = tmp_path / "kohya.safetensors"
    result = convert_adapter_file(folder, out, to="kohya", base=base)
    assert result.max_error == 0.0
    assert {m.algo for m in read_adapter_file(out).modules.values()} == {"loha"}
    status, _, err = run_cli(["merge", base, out, tmp_path / "m.safetensors", "-q"], capsys)
    assert status == 0, err
    ours = build("sd1")[2]["unet"](load_file(str(tmp_path / "m.safetensors")))
    changed = [k for k in want if not torch.equal(want[k], comps["unet"][k])]
    assert any("conv2" in k for k in changed) and any("to_k" in k for k in changed)
    for k, w in want.items():
        _close(ours[k], w, 1e-5)
