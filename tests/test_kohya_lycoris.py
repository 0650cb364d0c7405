"""kohya / LyCORIS / diffusers-style adapter files (wsurgery.adapters.formats) against the reference code.

Oracles: LyCORIS 4.1.3's own modules (lycoris.modules.*) built around nn.Linear / nn.Conv2d / norms with every
parameter random and non-zero, saved the way its kohya network saves them (``<lora_name>.<param>``), and the
weight LyCORIS itself computes from them: its modules' forward builds ``W + Δ`` (captured where it calls the layer
op), and ``merge_to`` where LyCORIS' merge agrees with its forward. Plain kohya LoRA and diffusers/PEFT-style files
are checked against diffusers' own loading (kohya conversion, PEFT injection, ``fuse_lora``) on a tiny UNet.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wsurgery.adapters.formats import read_adapter_file
from wsurgery.errors import InputError, NotInvertibleError, UnsupportedError
from wsurgery.methods.lycoris_common import LycorisDoraPatch

lycoris_modules = pytest.importorskip("lycoris.modules", reason="needs lycoris-lora==4.1.3 (a test dependency)")
LoConModule, LohaModule = lycoris_modules.LoConModule, lycoris_modules.LohaModule
LokrModule = lycoris_modules.LokrModule
FullModule, NormModule = lycoris_modules.FullModule, lycoris_modules.NormModule
GLoRAModule, IA3Module = lycoris_modules.GLoRAModule, lycoris_modules.IA3Module
DiagOFTModule, ButterflyOFTModule = lycoris_modules.DiagOFTModule, lycoris_modules.ButterflyOFTModule

NAME = "lora_unet_down_blocks_0_attentions_0_proj"


def _close(ours: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    err = float((ours - want).abs().max() / want.abs().max())
    assert err <= rel, f"relative error {err:.3g} > {rel}"


def _input(layer: nn.Module) -> torch.Tensor:
    w = layer.weight
    if isinstance(layer, nn.LayerNorm):
        return torch.randn(2, w.shape[0])
    if isinstance(layer, nn.GroupNorm):
        return torch.randn(2, w.shape[0], 3, 3)
    return torch.randn(2, w.shape[1], 6, 6) if w.dim() == 4 else torch.randn(2, w.shape[1])


def lycoris_forward_weights(mod, layer: nn.Module, multiplier: float) -> dict[str, torch.Tensor]:
    """The weight (and bias) LyCORIS' module uses in its forward at ``multiplier``: its forward computes
    ``base(x) + op(x, W' − W, b' − b)``; the op's weight/bias arguments are captured."""
    seen: dict[str, torch.Tensor | None] = {}
    op = mod.op

    def capture(x, *args, **kwargs):
        seen["w"] = kwargs.get("weight", args[0] if args else None)
        seen["b"] = kwargs.get("bias", args[1] if len(args) > 1 else None)
        return op(x, *args, **kwargs)

    mod.op, mod.multiplier = capture, multiplier
    mod.apply_to()
    with torch.no_grad():
        layer(_input(layer))
    mod.restore()
    mod.op = op
    out = {"weight": layer.weight.detach() + seen["w"]}
    if seen["b"] is not None:
        out["bias"] = layer.bias.detach() + seen["b"]
    return out


def _randomize(mod) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "dora_scale":  # a magnitude: keep it near the base's norms, positive
                p.mul_(1 + 0.2 * noise.abs())
            else:
                p.copy_(noise * 0.3)


def _save_module(tmp_path: Path, state: dict[str, torch.Tensor], name: str = NAME,
                 metadata: dict[str, str] | None = None) -> Path:
    """A kohya/LyCORIS file: the module's state dict under ``<lora_name>.``, as LycorisNetworkKohya saves it."""
    path = tmp_path / "adapter.safetensors"
    save_file({f"{name}.{k}": v.detach().contiguous() for k, v in state.items()}, str(path), metadata)
    return path


def _base(layer: nn.Module, patch=None) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """The layer's tensors a patch receives, as the engine hands them over: its roles (all roles without one)."""
    tensors = {r: getattr(layer, r).detach().clone() for r in ("weight", "bias") if getattr(layer, r, None) is not None
               and (patch is None or r in patch.roles or r in patch.optional_roles)}
    return {r: tuple(t.shape) for r, t in tensors.items()}, tensors


def _random_base(layer: nn.Module) -> nn.Module:
    """No zero biases or unit norm weights in the base: they would hide a wrong bias or scale."""
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def _lin() -> nn.Linear:
    return nn.Linear(24, 32)


def _conv(cin: int = 8, cout: int = 16, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


def _check_forward(bound, base: dict[str, torch.Tensor]) -> None:
    """verify's unmerged path (Patch.forward, on activations) gives the merged layer's output; LyCORIS DoRA on a
    convolution has none and says so."""
    layer = bound.layer()
    x = layer.inputs(bound.shapes, 5, torch.Generator().manual_seed(1))
    if isinstance(bound.patch, LycorisDoraPatch) and base["weight"].dim() > 2:
        with pytest.raises(UnsupportedError, match="Linear layers only"):
            bound.forward(x, base, layer)
        return
    merged = bound.merge({k: v.clone() for k, v in base.items()}, 1.0)
    _close(bound.forward(x, base, layer), layer(x, merged), rel=1e-5)


# id, module class, layer, kwargs, the algo we report, whether LyCORIS 4.1.3's merge_to agrees with its forward
CASES = [
    ("lora-linear", LoConModule, _lin, dict(lora_dim=4, alpha=2), "lora", True),
    ("locon-conv3x3", LoConModule, _conv, dict(lora_dim=4, alpha=2), "lora", True),
    ("locon-tucker", LoConModule, _conv, dict(lora_dim=4, alpha=3, use_tucker=True), "lora/tucker", True),
    ("lora-no-alpha", LoConModule, _lin, dict(lora_dim=4, alpha=0), "lora", True),
    ("lora-rs_lora", LoConModule, _lin, dict(lora_dim=4, alpha=2, rs_lora=True), "lora", True),
    ("lora-use_scalar", LoConModule, _lin, dict(lora_dim=4, alpha=2, use_scalar=True), "lora", True),
    ("dora-out", LoConModule, _lin, dict(lora_dim=4, alpha=2, weight_decompose=True), "lora", True),
    ("dora-in", LoConModule, _lin, dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=False), "lora", True),
    ("dora-conv", LoConModule, _conv, dict(lora_dim=4, alpha=2, weight_decompose=True), "lora", True),
    ("loha-linear", LohaModule, _lin, dict(lora_dim=4, alpha=2), "loha", False),
    ("loha-conv", LohaModule, _conv, dict(lora_dim=4, alpha=2), "loha", False),
    ("loha-cp", LohaModule, _conv, dict(lora_dim=4, alpha=2, use_tucker=True), "loha", False),
    ("loha-alpha=rank", LohaModule, _lin, dict(lora_dim=4, alpha=4), "loha", True),
    ("loha-dora-in", LohaModule, _lin, dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=False), "loha",
     False),
    ("lokr-full", LokrModule, _lin, dict(lora_dim=4, alpha=2, factor=4), "lokr", True),
    ("lokr-w2-lowrank", LokrModule, lambda: nn.Linear(64, 64), dict(lora_dim=2, alpha=1, factor=4), "lokr", False),
    ("lokr-both-lowrank", LokrModule, lambda: nn.Linear(64, 64),
     dict(lora_dim=1, alpha=3, factor=8, decompose_both=True), "lokr", False),
    ("lokr-conv", LokrModule, lambda: _conv(32, 64), dict(lora_dim=2, alpha=1, factor=4), "lokr", False),
    ("lokr-conv-tucker", LokrModule, lambda: _conv(32, 64), dict(lora_dim=2, alpha=1, factor=4, use_tucker=True),
     "lokr", False),
    ("lokr-conv-full", LokrModule, _conv, dict(lora_dim=4, alpha=2, factor=4), "lokr", True),
    ("lokr-dora", LokrModule, lambda: nn.Linear(64, 64), dict(lora_dim=2, alpha=1, factor=4, weight_decompose=True),
     "lokr", False),
    ("norm-layernorm", NormModule, lambda: nn.LayerNorm(32), {}, "norm", True),
    ("norm-groupnorm", NormModule, lambda: nn.GroupNorm(4, 16), {}, "norm", True),
    ("glora", GLoRAModule, _lin, dict(lora_dim=4, alpha=2), "glora", True),
    ("glora-conv", GLoRAModule, _conv, dict(lora_dim=4, alpha=2), "glora", True),
    ("diag-oft", DiagOFTModule, _lin, dict(lora_dim=8), "diag-oft", True),
    ("diag-oft-rescale-constraint", DiagOFTModule, _conv, dict(lora_dim=4, rescaled=True, constraint=1e-3),
     "diag-oft", True),
    ("boft", ButterflyOFTModule, _lin, dict(lora_dim=4), "boft", True),
    ("boft-rescale-conv", ButterflyOFTModule, _conv, dict(lora_dim=4, rescaled=True), "boft", True),
    ("ia3-out", IA3Module, _lin, {}, "ia3", True),
    ("ia3-on-input", IA3Module, _lin, dict(train_on_input=True), "ia3", True),
    ("ia3-conv-out", IA3Module, _conv, {}, "ia3", True),
    ("ia3-conv-on-input", IA3Module, _conv, dict(train_on_input=True), "ia3", True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lycoris_algorithm_merges_as_lycoris(case, tmp_path):
    _, cls, make_layer, kwargs, algo, merge_to_agrees = case
    torch.manual_seed(0)
    layer = _random_base(make_layer())
    mod = cls(NAME, layer, 1.0, **kwargs)
    _randomize(mod)
    adapter = read_adapter_file(_save_module(tmp_path, mod.state_dict()))
    assert adapter.format == "kohya"
    module = adapter.modules[NAME]
    assert module.algo == algo
    assert module.dora == bool(kwargs.get("weight_decompose"))
    shapes, base = _base(layer, module.patch)
    bound = module.patch.bind(shapes)
    _check_forward(bound, base)
    for multiplier in (1.0, 0.7):
        merged = bound.merge({k: v.clone() for k, v in base.items()}, multiplier)
        want = lycoris_forward_weights(mod, layer, multiplier)
        for role, w in want.items():
            _close(merged[role], w)
        if merge_to_agrees:
            mod.merge_to(multiplier)
            _close(merged["weight"], layer.weight.detach())
            if "bias" in base:
                _close(merged["bias"], layer.bias.detach())
            with torch.no_grad():  # back to the base for the next multiplier
                for role, t in base.items():
                    getattr(layer, role).copy_(t)
        if module.dora:
            with pytest.raises(NotInvertibleError, match="DoRA"):
                bound.unmerge({k: v.clone() for k, v in merged.items()}, multiplier)
        else:
            back = bound.unmerge({k: v.clone() for k, v in merged.items()}, multiplier)
            for role in base:
                _close(back[role], base[role])


@pytest.mark.parametrize("with_bias", [True, False])
def test_lycoris_full_diff(with_bias, tmp_path):
    """``full`` saves diff = trained − original (after apply_to the module holds the whole weight); the oracle is
    LyCORIS' own loading path (make_module_from_state_dict) and its merge."""
    torch.manual_seed(0)
    layer = _random_base(_conv() if with_bias else nn.Linear(24, 32, bias=False))
    mod = FullModule(NAME, layer, 1.0)
    mod.apply_to()
    _randomize(mod)
    state = mod.state_dict()
    mod.restore()
    assert ("diff_b" in state) == with_bias
    module = read_adapter_file(_save_module(tmp_path, state)).modules[NAME]
    assert module.algo == "full"
    shapes, base = _base(layer)
    with torch.no_grad():  # as lycoris.utils.merge loads it
        loaded = FullModule.make_module_from_state_dict(NAME, layer, state["diff"], state.get("diff_b"))
        want_w, want_b = loaded.get_merged_weight(0.6)
    _check_forward(module.patch.bind(shapes), base)
    merged = module.patch.bind(shapes).merge({k: v.clone() for k, v in base.items()}, 0.6)
    _close(merged["weight"], want_w)
    if with_bias:
        _close(merged["bias"], want_b)
    back = module.patch.unmerge(merged, 0.6)
    _close(back["weight"], base["weight"])


def test_lycoris_merge_to_applies_loha_lokr_scale_twice(tmp_path):
    """Why LoHa/LoKr follow LyCORIS' forward, not its merge_to: in 4.1.3 ``get_diff_weight`` multiplies by α/r a
    weight ``get_weight`` already scaled, so merge_to adds (α/r)²·ΔW while training and inference use α/r.
    If a LyCORIS release fixes this, this test fails and the choice should be revisited."""
    torch.manual_seed(0)
    layer = _lin()
    mod = LohaModule(NAME, layer, 1.0, lora_dim=4, alpha=2)
    _randomize(mod)
    module = read_adapter_file(_save_module(tmp_path, mod.state_dict())).modules[NAME]
    shapes, base = _base(layer)
    ours = module.patch.bind(shapes).merge({k: v.clone() for k, v in base.items()}, 1.0)["weight"]
    W = base["weight"]
    mod.merge_to(1.0)
    _close(layer.weight.detach() - W, (ours - W) * 0.5)


# --- kohya networks: LyCORIS' kohya network on a tiny diffusers UNet ------------------------------------------------

PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1"]
text_encoder_target_module = []
text_encoder_target_name = []
"""


@pytest.fixture(scope="module")
def tiny_unet():
    diffusers = pytest.importorskip("diffusers", reason="needs diffusers==0.42.1 (a test dependency)")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)


def _kohya_network(unet, tmp_path: Path, metadata: dict[str, str], **kwargs):
    """LyCORIS' kohya network (what sd-scripts trains with ``--network_module lycoris.kohya``) on the UNet,
    random non-zero, saved with its ``save_weights``; returns (network, file)."""
    from lycoris.kohya import LycorisNetworkKohya, create_network

    preset = tmp_path / "preset.toml"
    preset.write_text(PRESET)
    saved = {k: getattr(LycorisNetworkKohya, k) for k in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                                                          "TEXT_ENCODER_TARGET_REPLACE_MODULE",
                                                          "TEXT_ENCODER_TARGET_REPLACE_NAME", "ENABLE_CONV")}
    try:
        net = create_network(1.0, 4, 2.0, None, None, unet, preset=str(preset), **kwargs)
    finally:  # the preset is class state: leave LyCORIS as found
        for k, v in saved.items():
            setattr(LycorisNetworkKohya, k, v)
    net.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)  # registers the modules by lora_name
    _randomize(net)
    path = tmp_path / "network.safetensors"
    net.save_weights(str(path), None, dict(metadata))
    for lora in net.unet_loras:
        lora.restore()
    return net, path


def test_lycoris_kohya_network_file(tiny_unet, tmp_path):
    """A LoHa network with conv layers (LyCORIS' create_network + save_weights): every module of the file is read
    under its kohya name, and each merge equals that module's LyCORIS forward weight."""
    args = {"algo": "loha", "conv_dim": "2", "conv_alpha": "1"}
    net, path = _kohya_network(tiny_unet, tmp_path, {"ss_network_module": "lycoris.kohya",
                                                     "ss_network_args": json.dumps(args),
                                                     "ss_base_model_version": "sd_v1"}, **args)
    adapter = read_adapter_file(path)
    assert adapter.format == "kohya"
    assert adapter.base_model == "sd_v1"
    assert adapter.summary["ss_network_module"] == "lycoris.kohya"
    layers = dict(tiny_unet.named_modules())
    by_name = {"lora_unet_" + n.replace(".", "_"): n for n in layers}
    assert set(adapter.modules) == {m.lora_name for m in net.unet_loras}
    # conv_dim/conv_alpha for convolutions (kernel > 1), network dim/alpha elsewhere, as create_network chose
    want = {m.lora_name: (m.lora_dim, float(m.alpha)) for m in net.unet_loras}
    assert {r["module"]: (r["rank"], r["alpha"]) for r in adapter.table()} == want
    assert set(want.values()) == {(4, 2.0), (2, 1.0)}
    convs = 0
    for m in net.unet_loras:
        layer = layers[by_name[m.lora_name]]
        ours = adapter.modules[m.lora_name]
        assert ours.algo == "loha"
        shapes, base = _base(layer)
        convs += layer.weight.dim() == 4
        merged = ours.patch.bind(shapes).merge({k: v.clone() for k, v in base.items()}, 0.8)
        _close(merged["weight"], lycoris_forward_weights(m, layer, 0.8)["weight"])
    assert convs >= 4


def test_kohya_lora_matches_diffusers_fuse(tiny_unet, tmp_path):
    """Plain kohya LoRA (lora_down/lora_up/alpha, linear and 3x3 conv layers, conv alpha ≠ linear alpha): diffusers
    converts the kohya keys (lora_state_dict), injects PEFT layers and fuses them (fuse_lora, lora_scale 0.7); our
    patches on the same base weights give the fused weights."""
    import copy

    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unet = copy.deepcopy(tiny_unet)
    net, path = _kohya_network(unet, tmp_path, {"ss_network_module": "networks.lora", "ss_network_dim": "4",
                                                "ss_network_alpha": "2.0"}, algo="lora", conv_dim="2",
                               conv_alpha="1")
    adapter = read_adapter_file(path)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="kohya")
    unet.fuse_lora(lora_scale=0.7)
    unet.unload_lora()
    fused = unet.state_dict()
    names = {"lora_unet_" + n.replace(".", "_"): n for n, _ in unet.named_modules()}
    changed = 0
    for name, module in adapter.modules.items():
        path_ = names[name]
        w = base[f"{path_}.weight"]
        merged = module.patch.bind({"weight": tuple(w.shape)}).merge({"weight": w.clone()}, 0.7)["weight"]
        _close(merged, fused[f"{path_}.weight"])
        changed += 1
    assert changed == len(net.unet_loras) > 10


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_diffusers_peft_file_matches_fuse(dora, tiny_unet, tmp_path):
    """A diffusers-format file (save_lora_weights: ``unet.<path>.lora_A/B.weight``, with DoRA
    ``lora_magnitude_vector``, and lora_adapter_metadata with lora_alpha ≠ r and an alpha_pattern), read and merged,
    equals diffusers' fuse_lora at lora_scale 0.5 (for DoRA: ΔW scaled inside the norm)."""
    import copy

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(tiny_unet)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"to_k": 2}, use_dora=dora,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    scale = 0.5
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    layers = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    adapter = read_adapter_file(path)
    assert adapter.format == "diffusers"
    assert all(m.dora == dora for m in adapter.modules.values())
    unet.fuse_lora(lora_scale=scale)
    fused = unet.state_dict()
    assert any(name.endswith("to_k") for name in adapter.modules)
    for name, module in adapter.modules.items():
        inner = name.removeprefix("unet.")
        w = base[f"{inner}.weight"]
        merged = module.patch.bind({"weight": tuple(w.shape)}).merge({"weight": w.clone()}, scale)["weight"]
        want = fused.get(f"{inner}.base_layer.weight", fused.get(f"{inner}.weight"))
        _close(merged, want)


def test_diffusers_style_alpha_and_kohya_suffixes(tmp_path):
    """Dotted paths with ``.alpha`` (kohya → diffusers converters, ai-toolkit's ``diffusion_model.`` exports with
    lora_down/up): α/r from the tensor; no α and no metadata: scale 1, as diffusers loads such a file."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 24, generator=g), torch.randn(32, 4, generator=g)
    W = torch.randn(32, 24, generator=g)
    path = tmp_path / "x.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight": A,
               "diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight": B,
               "diffusion_model.double_blocks.0.img_attn.proj.alpha": torch.tensor(2.0),
               "transformer.blocks.0.ff.lora_A.weight": A.clone(), "transformer.blocks.0.ff.lora_B.weight": B.clone()},
              str(path))
    adapter = read_adapter_file(path)
    assert adapter.format == "diffusers"
    scaled = adapter.modules["diffusion_model.double_blocks.0.img_attn.proj"].patch.bind({"weight": (32, 24)})
    plain = adapter.modules["transformer.blocks.0.ff"].patch.bind({"weight": (32, 24)})
    _close(scaled.merge({"weight": W.clone()}, 1.0)["weight"], W + 0.5 * B @ A)
    _close(plain.merge({"weight": W.clone()}, 0.3)["weight"], W + 0.3 * B @ A)


def test_format_from_keys_not_file_name(tmp_path):
    """A kohya file named like diffusers' output, and a diffusers-style file named like a kohya LoRA."""
    g = torch.Generator().manual_seed(0)
    kohya = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({f"{NAME}.lora_down.weight": torch.randn(2, 8, generator=g),
               f"{NAME}.lora_up.weight": torch.randn(8, 2, generator=g)}, str(kohya))
    diffusers = tmp_path / "lora_unet_kohya.safetensors"
    save_file({"unet.mid.lora_A.weight": torch.randn(2, 8, generator=g),
               "unet.mid.lora_B.weight": torch.randn(8, 2, generator=g)}, str(diffusers))
    assert read_adapter_file(kohya).format == "kohya"
    lycoris = tmp_path / "adapter_model.safetensors"  # LyCORIS' own wrapper names modules lycoris_<path>
    save_file({"lycoris_blocks_0_attn_to_q.lokr_w1": torch.randn(2, 2, generator=g),
               "lycoris_blocks_0_attn_to_q.lokr_w2": torch.randn(4, 4, generator=g)}, str(lycoris))
    assert read_adapter_file(lycoris).algos == {"lycoris_blocks_0_attn_to_q": "lokr"}
    assert read_adapter_file(diffusers).format == "diffusers"


# --- bad input: one line, naming the keys ---------------------------------------------------------------------------

def _lora_state(rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"lora_down.weight": torch.randn(rank, 8, generator=g), "lora_up.weight": torch.randn(8, rank, generator=g),
            "alpha": torch.tensor(1.0)}


@pytest.mark.parametrize("state, match", [
    ({"lora_down.weight": torch.zeros(2, 8), "lora_up.weight": torch.zeros(8, 2), "scale": torch.tensor(1.0)},
     r"looks like a kohya adapter but 1 of its 3 tensors are not kohya adapter tensors: lora_unet_\w+\.scale$"),
    ({"dylora_up": torch.zeros(8, 2)}, "match no known adapter format"),
    ({"lora_down.weight": torch.zeros(2, 8), "hada_w1_a": torch.zeros(8, 2)}, "several"),
    ({"lora_down.weight": torch.zeros(2, 8), "alpha": torch.tensor(1.0)}, r"missing \['lora_up.weight'\]"),
    ({"hada_w1_a": torch.zeros(8, 2), "hada_w1_b": torch.zeros(2, 8), "hada_w2_a": torch.zeros(8, 2),
      "hada_w2_b": torch.zeros(2, 8), "hada_t1": torch.zeros(2, 2, 3, 3)}, "hada_t1 and hada_t2 together"),
    ({"lokr_w1": torch.zeros(2, 2), "lokr_w1_a": torch.zeros(2, 1), "lokr_w1_b": torch.zeros(1, 2),
      "lokr_w2": torch.zeros(4, 4)}, "exactly one"),
    ({"lora_down.weight": torch.zeros(2, 8), "lora_up.weight": torch.zeros(8, 2), "alpha": torch.ones(2)},
     "single number"),
])
def test_unknown_or_broken_modules_refused(state, match, tmp_path):
    with pytest.raises(InputError, match=match) as e:
        read_adapter_file(_save_module(tmp_path, state))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("metadata, error, match", [
    ({"ss_network_module": "networks.lora"}, InputError, r"\['lora_unet_x'\] are \['loha'\]"),
    ({"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'}, InputError,
     "algo=lokr but no module is lokr"),
    ({"ss_network_module": "networks.oft"}, UnsupportedError, "kohya's own OFT"),
    ({"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "dylora"}'}, UnsupportedError, "dylora"),
])
def test_metadata_that_contradicts_the_tensors(metadata, error, match, tmp_path):
    g = torch.Generator().manual_seed(0)
    loha = {"hada_w1_a": torch.randn(8, 2, generator=g), "hada_w1_b": torch.randn(2, 8, generator=g),
            "hada_w2_a": torch.randn(8, 2, generator=g), "hada_w2_b": torch.randn(2, 8, generator=g)}
    with pytest.raises(error, match=match):
        read_adapter_file(_save_module(tmp_path, loha, name="lora_unet_x", metadata=metadata))


def test_network_dim_contradiction(tmp_path):
    path = _save_module(tmp_path, _lora_state(rank=2), metadata={"ss_network_module": "networks.lora",
                                                                 "ss_network_dim": "8"})
    with pytest.raises(InputError, match=r"ss_network_dim=8 but the Linear modules have ranks \[2\]"):
        read_adapter_file(path)
    ok = _save_module(tmp_path, _lora_state(rank=2), metadata={"ss_network_module": "networks.lora",
                                                               "ss_network_dim": "2"})
    assert read_adapter_file(ok).modules[NAME].rank == 2


def test_shapes_that_do_not_fit_the_base(tmp_path):
    adapter = read_adapter_file(_save_module(tmp_path, _lora_state()))
    with pytest.raises(InputError, match="another model"):
        adapter.modules[NAME].patch.bind({"weight": (16, 8)})


BIND_ERRORS = [  # a module made for one layer, bound to a base of another shape
    ("locon-tucker", LoConModule, _conv, dict(lora_dim=4, use_tucker=True), (16, 8, 5, 5), "another model"),
    ("loha", LohaModule, _lin, dict(lora_dim=4), (32, 25), "another model"),
    ("lokr", LokrModule, lambda: nn.Linear(64, 64), dict(lora_dim=2, factor=4), (64, 32), "give a 64x64 change"),
    ("dora", LoConModule, _lin, dict(lora_dim=4, weight_decompose=True), (24, 24), "another model"),
    ("glora", GLoRAModule, _lin, dict(lora_dim=4), (32, 20), "do not fit the base weight"),
    ("diag-oft", DiagOFTModule, _lin, dict(lora_dim=8), (24, 24), "do not tile"),
    ("boft", ButterflyOFTModule, _lin, dict(lora_dim=4), (48, 24), "do not tile"),
    ("ia3", IA3Module, _lin, {}, (16, 24), "has 32 entries"),
    ("norm", NormModule, lambda: nn.LayerNorm(32), {}, (16,), "w_norm is"),
]


@pytest.mark.parametrize("case", BIND_ERRORS, ids=[c[0] for c in BIND_ERRORS])
def test_module_for_another_layer_refused_at_bind(case, tmp_path):
    _, cls, make_layer, kwargs, wrong, match = case
    mod = cls(NAME, _random_base(make_layer()), 1.0, **kwargs)
    _randomize(mod)
    patch = read_adapter_file(_save_module(tmp_path, mod.state_dict())).modules[NAME].patch
    shapes = {"weight": wrong} if not isinstance(mod, NormModule) else {"weight": wrong, "bias": wrong}
    with pytest.raises(InputError, match=match) as e:
        patch.bind(shapes)
    assert "\n" not in str(e.value)


def test_bias_change_on_a_base_without_bias(tmp_path):
    """LyCORIS' merge drops diff_b where the base has no bias; wsurgery refuses instead of losing it silently."""
    g = torch.Generator().manual_seed(0)
    path = _save_module(tmp_path, {"diff": torch.randn(8, 4, generator=g), "diff_b": torch.randn(8, generator=g)})
    with pytest.raises(InputError, match="saves diff_b but the base module has no bias"):
        read_adapter_file(path).modules[NAME].patch.bind({"weight": (8, 4)})


def test_not_safetensors(tmp_path):
    path = tmp_path / "lora.safetensors"
    torch.save(_lora_state(), path)
    with pytest.raises(InputError, match="not a readable .safetensors"):
        read_adapter_file(path)


def test_kohya_file_round_trips_through_load_file(tmp_path):
    """The reader keeps every tensor of the file in exactly one module (nothing silently dropped)."""
    path = _save_module(tmp_path, _lora_state())
    adapter = read_adapter_file(path)
    assert sorted(k for m in adapter.modules.values() for k in m.keys) == sorted(load_file(str(path)))
