#!/usr/bin/env python
"""A kohya LoRA merged into a real-shape SDXL single file: ``wsurgery merge`` against diffusers and a floor.

The base is synthetic: the real SDXL shapes (the UNet of stabilityai/stable-diffusion-xl-base-1.0, its CLIP ViT-L
and OpenCLIP bigG text encoders and its VAE, configs typed below, models built on the meta device for the shapes
only), written as the original single file through wsurgery's SDXL family tables (SGM/OpenCLIP names, fused
``in_proj_weight``), random fp16 values generated and written tensor by tensor (never the whole model in memory)
under ``bench-work/diffusion/`` (gitignored). The adapter is a rank-32 kohya LoRA (lora_down/lora_up/alpha, alpha
16) on every attention linear and every convolution of the UNet's blocks and on the text encoders' attention.

Each variant runs in a fresh process, interleaved, ``--repeats`` times (median reported: wall, CPU, peak RSS):

  safetensors  the read+write floor: every tensor read with ``safe_open`` and written to a copy, one at a time
  wsurgery     ``wsurgery merge BASE LORA OUT.safetensors`` (one single file out, streaming)
  diffusers    the practical alternative offline: diffusers' own single-file converters read the base into
               UNet2DConditionModel / CLIPTextModel / CLIPTextModelWithProjection (built on meta, weights
               assigned), ``lora_state_dict`` + ``load_lora_into_unet``/``load_lora_into_text_encoder``,
               ``fuse_lora``, ``unload_lora``, ``save_pretrained`` of the three components (fp16 safetensors);
               the VAE, which the LoRA does not touch, is neither loaded nor saved (in its favour)

Sampled check: a few changed weights of our output (read through the family's Locations) against diffusers'.

Measured 2026-12-03 (2 shared cores, 23 GB; medians of 3; base 6.94 GB, 2513 tensors; LoRA 221 MB, 947 modules):
safetensors 21.7 s / 7.2 GB (the mapped file's pages), wsurgery 65.0 s / 17.2 GB, diffusers 126.1 s / 8.4 GB;
agreement within 2 fp16 ulps. wsurgery's RSS is an engine defect (scratch buffers named per stored tensor in
``_run_job``): with the one-line fix of the H18d report the same merge takes 46 s and 0.9 GB, byte-identical.

    python scripts/bench_diffusion_merge.py            # real SDXL shapes (~6.9 GB base; needs ~25 GB of disk)
    python scripts/bench_diffusion_merge.py --quick    # tiny shapes, one repeat: checks that it all runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

WORK = Path(__file__).resolve().parent.parent / "bench-work" / "diffusion"

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, text_encoder(_2)/config.json, vae/config.json
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SDXL_TE1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
SDXL_TE2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                vocab_size=49408, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
# --quick: the same structure at toy widths
QUICK_UNET = {**SDXL_UNET, "sample_size": 8, "block_out_channels": (8, 16, 16),
              "transformer_layers_per_block": (1, 1, 2), "attention_head_dim": 2, "cross_attention_dim": 16,
              "norm_num_groups": 4, "addition_time_embed_dim": 4,
              "projection_class_embeddings_input_dim": 12 + 6 * 4}
QUICK_TE = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=50,
                max_position_embeddings=8, projection_dim=12)
QUICK_VAE = {**SDXL_VAE, "block_out_channels": (8, 16), "norm_num_groups": 4,
             "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}
RANK, ALPHA = 32, 16.0

_PROBE = ("import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
          "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
          "print(time.perf_counter() - t, u.ru_utime + u.ru_stime, u.ru_maxrss, r.returncode)")


def _configs(quick: bool) -> tuple[dict, dict, dict, dict]:
    return (QUICK_UNET, QUICK_TE, {**QUICK_TE}, QUICK_VAE) if quick else (SDXL_UNET, SDXL_TE1, SDXL_TE2, SDXL_VAE)


def _models(quick: bool, device: str = "meta"):
    """The UNet, the two text encoders and the VAE, on ``device`` (meta: shapes only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    u, t1, t2, v = _configs(quick)
    with torch.device(device):
        return (UNet2DConditionModel(**u), CLIPTextModel(CLIPTextConfig(**t1)),
                CLIPTextModelWithProjection(CLIPTextConfig(**t2)), AutoencoderKL(**v))


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, std: float = 0.02) -> None:
    """A fp16 safetensors file with random values, written tensor by tensor (the header first, from shapes)."""
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            t = (torch.randn(shape, generator=g) * std).to(torch.float16)
            f.write(t.numpy().tobytes())


def _lora_modules(unet, te1, te2) -> dict[str, tuple[int, ...]]:
    """kohya name -> weight shape: every attention linear and convolution of the UNet's blocks (diffusers-flattened
    names, which diffusers' SDXL loader and sd-scripts-compatible tools read) and the text encoders' attention."""
    out = {}
    for n, m in unet.named_modules():
        if n.startswith(("down_blocks", "mid_block", "up_blocks")) and (
                isinstance(m, torch.nn.Conv2d) or (isinstance(m, torch.nn.Linear) and ".attentions." in n)):
            out["lora_unet_" + n.replace(".", "_")] = tuple(m.weight.shape)
    for prefix, te, text_model in (("lora_te1_", te1, "text_model_"), ("lora_te2_", te2, "")):
        for n, m in te.named_modules():
            if isinstance(m, torch.nn.Linear) and ".self_attn." in n:
                out[prefix + text_model + n.replace(".", "_")] = tuple(m.weight.shape)
    return out


def ensure_data(quick: bool) -> tuple[Path, Path]:
    """The base single file and the LoRA (generated once per size)."""
    from wsurgery.families import detect_folder

    work = WORK / ("quick" if quick else "sdxl")
    base, lora = work / "sdxl_base.safetensors", work / "lora_r32.safetensors"
    if base.is_file() and lora.is_file():
        return base, lora
    work.mkdir(parents=True, exist_ok=True)
    unet, te1, te2, vae = _models(quick)
    comps = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder_2": te2.state_dict(),
             # transformers 5's CLIPTextModel has no ``text_model.`` in its names; files keep it
             "text_encoder": {f"text_model.{k}": v for k, v in te1.state_dict().items()}}
    family = detect_folder({c: {k: tuple(v.shape) for k, v in d.items()} for c, d in comps.items()}, "SDXL shapes")
    assert family is not None and family.name == "sdxl"
    single = family.to_single_file({f"{c}.{k}": v for c, d in comps.items() for k, v in d.items()})  # meta tensors
    t = time.perf_counter()
    _write_safetensors(base, {k: tuple(v.shape) for k, v in single.items()}, seed=0)
    print(f"base: {base} ({base.stat().st_size / 1e9:.2f} GB, {len(single)} tensors) in "
          f"{time.perf_counter() - t:.0f} s")
    g = torch.Generator().manual_seed(1)
    state: dict[str, torch.Tensor] = {}
    for name, shape in _lora_modules(unet, te1, te2).items():
        conv = len(shape) == 4
        state[f"{name}.lora_down.weight"] = (torch.randn((RANK, *shape[1:]) if conv else (RANK, shape[1]),
                                                         generator=g) * 0.02).half()
        state[f"{name}.lora_up.weight"] = (torch.randn((shape[0], RANK, 1, 1) if conv else (shape[0], RANK),
                                                       generator=g) * 0.02).half()
        state[f"{name}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    from safetensors.torch import save_file

    save_file(state, str(lora), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(RANK),
                                          "ss_network_alpha": str(ALPHA), "ss_base_model_version": "sdxl_base_v1-0"})
    print(f"lora: {lora} ({lora.stat().st_size / 1e6:.0f} MB, {len(state) // 3} modules)")
    return base, lora


def run_floor(base: Path, out: Path) -> None:
    """Every tensor read with safe_open and written to a new file under the same header, one at a time: what
    rewriting the file costs at least (``load_file`` + ``save_file`` would hold it twice in memory, 14 GB)."""
    from safetensors import safe_open

    with base.open("rb") as f:
        size = f.read(8)
        header = f.read(struct.unpack("<Q", size)[0])
    entries = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
    names = sorted(entries, key=lambda k: entries[k]["data_offsets"][0])
    with safe_open(str(base), "pt") as src, out.open("wb") as dst:
        dst.write(size + header)
        for name in names:
            dst.write(src.get_tensor(name).numpy().tobytes())


def run_diffusers(base: Path, lora: Path, out: Path, quick: bool) -> None:
    """diffusers' way, offline: single-file converters -> models (weights assigned to meta-built modules) ->
    LoRA loaded, fused, unloaded -> each component saved."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as Mixin
    from diffusers.loaders import single_file_utils as sfu
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    unet, te1, te2, _ = _models(quick)
    sf = load_file(str(base))
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sf, dict(unet.config)), assign=True)
    te1_sd = sfu.convert_ldm_clip_checkpoint(sf)
    te1.load_state_dict({k.removeprefix("text_model."): v for k, v in te1_sd.items()}, assign=True)
    te2.load_state_dict(sfu.convert_open_clip_checkpoint(te2, sf, prefix="conditioner.embedders.1.model."),
                        strict=False, assign=True)
    del sf, te1_sd
    for te in (te1, te2):  # buffers no file holds (position ids) are still on meta
        for name, buf in list(te.named_buffers()):
            if buf.is_meta:
                assert name.endswith("position_ids"), name
                module = te.get_submodule(name.rsplit(".", 1)[0])
                module.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape),
                                       persistent=False)
    state, alphas = Mixin.lora_state_dict(str(lora), unet_config=unet.config)
    Mixin.load_lora_into_unet(state, alphas, unet, adapter_name="k")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    for prefix, te in (("text_encoder", te1), ("text_encoder_2", te2)):
        # what the pipeline's fuse_lora does to a transformers text encoder: PEFT's merge of each LoRA layer
        Mixin.load_lora_into_text_encoder(state, alphas, te, prefix=prefix, adapter_name="k")
        for m in te.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()
        recurse_remove_peft_layers(te)  # as the pipeline's unload_lora_weights does
        del te.peft_config
        te._hf_peft_config_loaded = None
    out.mkdir(parents=True)
    unet.save_pretrained(out / "unet")
    te1.save_pretrained(out / "text_encoder")
    te2.save_pretrained(out / "text_encoder_2")


def _run(cmd: list[str], out: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, peak RSS bytes) of ``cmd`` in a fresh process; ``out`` removed first."""
    if out.is_dir():
        shutil.rmtree(out)
    out.unlink(missing_ok=True)
    subprocess.run(["sync"], check=False)
    done = subprocess.run([sys.executable, "-c", _PROBE, *cmd], check=False, capture_output=True, text=True)
    wall, cpu, rss_kib, code = done.stdout.split()[-4:]
    if int(code) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr[-3000:]}")
    return float(wall), float(cpu), int(rss_kib) * 1024


def _check(base: Path, ours: Path, theirs: Path) -> dict[str, float]:
    """Max |ours − diffusers| over a few changed weights (ours read through the family's Locations), per element
    in fp16 ulps of the larger operand (|W| or |ΔW|): diffusers rounds ΔW to fp16 before adding it (≤ 1/2 ulp)
    and then the sum (≤ 1 ulp: the sum may be twice the larger operand), wsurgery rounds once (≤ 1 ulp), so they
    may differ by up to 2.5 such ulps; a wrong scale or a misplaced slice is far more."""
    from safetensors import safe_open

    from wsurgery.checkpoint.safetensors_file import read_header
    from wsurgery.families import detect

    fam = detect({k: v.shape for k, v in read_header(base)[0].items()})
    assert fam is not None
    params = fam.parameters()
    picks = [p for p in params if not p.startswith("vae.") and p.endswith(
        ("attn1.to_q.weight", "attn2.to_k.weight", "resnets.0.conv1.weight", "self_attn.q_proj.weight"))][::7]
    out: dict[str, float] = {}
    with safe_open(str(base), "pt") as b, safe_open(str(ours), "pt") as o:
        for p in picks:
            loc = params[p]
            comp, _, inner = p.partition(".")
            with safe_open(str(next((theirs / comp).glob("*.safetensors"))), "pt") as d:
                key = inner.removeprefix("text_model.") if inner.removeprefix("text_model.") in d.keys() else inner
                want = d.get_tensor(key)
            got = loc.take(o.get_tensor(loc.weight)).double()
            before = loc.take(b.get_tensor(loc.weight)).double()
            assert not torch.equal(want.double(), before), p  # a changed weight
            larger = torch.maximum(before.abs(), (want.double() - before).abs()).clamp_min(2.0 ** -14)
            ulp = torch.exp2(torch.floor(torch.log2(larger)) - 10)
            out[p] = float(((got - want.double()).abs() / ulp).max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="runs per variant (default 3; --quick: 1)")
    parser.add_argument("--floor-only", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--diffusers-only", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_only:
        return run_floor(*args.floor_only)
    if args.diffusers_only:
        base, lora, out = args.diffusers_only
        return run_diffusers(base, lora, out, args.quick)
    repeats = args.repeats or (1 if args.quick else 3)
    base, lora = ensure_data(args.quick)
    work = base.parent
    wsurgery = shutil.which("wsurgery") or sys.exit("the wsurgery command is not on PATH")
    quick = ["--quick"] if args.quick else []
    outs = {"safetensors": work / "floor.safetensors", "wsurgery": work / "merged.safetensors",
            "diffusers": work / "diffusers-out"}
    commands = {"safetensors": [sys.executable, __file__, "--floor-only", str(base), str(outs["safetensors"])],
                "wsurgery": [wsurgery, "merge", str(base), str(lora), str(outs["wsurgery"]), "--quiet"],
                "diffusers": [sys.executable, __file__, *quick, "--diffusers-only", str(base), str(lora),
                              str(outs["diffusers"])]}
    subprocess.run(["cat", str(base)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    runs: dict[str, list[tuple[float, float, int]]] = {v: [] for v in commands}
    for rep in range(repeats):
        for variant, cmd in commands.items():
            out = outs[variant]
            runs[variant].append(_run(cmd, out))
            wall, cpu, rss = runs[variant][-1]
            print(f"rep {rep + 1} {variant:12s} {wall:7.1f} s  cpu {cpu:7.1f} s  peak RSS {rss / 1e6:7.0f} MB",
                  flush=True)
    errors = _check(base, outs["wsurgery"], outs["diffusers"])
    for out in outs.values():
        if out.is_dir():
            shutil.rmtree(out)
        out.unlink(missing_ok=True)
    med = {v: {"wall_s": statistics.median(r[0] for r in rs), "cpu_s": statistics.median(r[1] for r in rs),
               "peak_rss_mb": statistics.median(r[2] for r in rs) / 1e6} for v, rs in runs.items()}
    size = base.stat().st_size
    print(f"\nbase {size / 1e9:.2f} GB; LoRA {lora.stat().st_size / 1e6:.0f} MB; medians of {repeats}")
    print(f"{'variant':12s} {'wall s':>8s} {'cpu s':>8s} {'RSS MB':>8s} {'x floor':>8s}")
    for v, m in med.items():
        print(f"{v:12s} {m['wall_s']:8.1f} {m['cpu_s']:8.1f} {m['peak_rss_mb']:8.0f} "
              f"{m['wall_s'] / med['safetensors']['wall_s']:8.2f}")
    worst = max(errors.values())
    print(f"wsurgery vs diffusers on {len(errors)} changed weights: at most {worst:.2f} fp16 ulp of the operands")
    (work / "results.json").write_text(json.dumps({"medians": med, "repeats": repeats, "base_bytes": size,
                                                    "check": errors}, indent=2))
    if worst > 2.5:
        sys.exit("wsurgery's merge and diffusers' disagree")


if __name__ == "__main__":
    main()
