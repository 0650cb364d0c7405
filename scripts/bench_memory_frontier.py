#!/usr/bin/env python
"""Peak memory of merges into frontier-shaped quantized layers: bounded by a chunk, not by the model.

Two synthetic one-layer checkpoints with the real shapes and on-disk layouts, generated once under
``bench-work/frontier/`` (random codes and scales: the numbers do not matter, their sizes do):

  gpt-oss   gpt-oss-120b's MoE layer in MXFP4: 128 experts, hidden 2880, intermediate 2880
            (``mlp.experts.gate_up_proj_blocks`` (128, 5760, 90, 16) + scales, ``down_proj`` likewise,
            biases, router, attention in bf16); a PEFT LoRA (r=16) with ``target_parameters`` on both
            expert stacks and ``target_modules`` on the attention projections. Decoded, one expert stack
            is 128x2880x5760 = 2.1 G elements: 8.5 GB in float32.
  deepseek  a DeepSeek-V3 MoE layer in FP8 128x128 blocks: the embedding (129280x7168, bf16), MLA
            attention, 256 routed experts + 1 shared of 2048x7168 (gate/up) and 7168x2048 (down) in
            float8_e4m3fn + ``weight_scale_inv``; a LoRA (r=16) on the attention and on every expert.

Each merge runs as ``wsurgery merge`` in a subprocess, with and without ``--requantize``; the peak
RSS (``ru_maxrss`` of the child) and wall time are reported. Target: at most 1.5 GB each.

Usage (from the repository root; needs ~50 GB of disk, the dev extra for PEFT's adapter layout):

    python scripts/bench_memory_frontier.py                 # both layers, both modes
    python scripts/bench_memory_frontier.py --layers gpt-oss --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

WORK = Path("bench-work/frontier")
RANK = 16


def _random_bytes(shape: tuple[int, ...], gen: torch.Generator, low: int = 0, high: int = 256) -> torch.Tensor:
    return torch.randint(low, high, shape, dtype=torch.uint8, generator=gen)


def _bf16(shape: tuple[int, ...], gen: torch.Generator, std: float = 0.02) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def _fp8(shape: tuple[int, ...], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A float8_e4m3fn weight with its 128x128 block scale_inv (random finite codes: no 0x7f/0xff NaNs)."""
    codes = _random_bytes(shape, gen, 0, 0x7E)
    codes |= (_random_bytes(shape, gen, 0, 2) << 7)
    scale = torch.rand(((shape[0] + 127) // 128, (shape[1] + 127) // 128), generator=gen) * 1e-4 + 1e-5
    return {"": codes.view(torch.float8_e4m3fn), "_scale_inv": scale}


def _adapter(folder: Path, modules: dict[str, tuple[int, int]], config: dict, gen: torch.Generator,
             stacks: list[tuple[str, int, int, int]] = ()) -> None:
    """A PEFT LoRA adapter folder. ``modules`` maps a module path to its (in, out) features; ``stacks`` are
    ParamWrapper LoRAs on (E, in, out) expert stacks as (saved key, E, in, out): lora_A (E·r, in),
    lora_B (out, E·r)."""
    tensors = {}
    for key, (fan_in, fan_out) in modules.items():
        tensors[f"base_model.model.{key}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=gen) * 0.01
        tensors[f"base_model.model.{key}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=gen) * 0.01
    for key, experts, fan_in, fan_out in stacks:
        tensors[f"base_model.model.{key}.lora_A.weight"] = torch.randn(experts * RANK, fan_in, generator=gen) * 0.01
        tensors[f"base_model.model.{key}.lora_B.weight"] = torch.randn(fan_out, experts * RANK, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def _lora_config(**fields) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": None, **fields}


def make_gpt_oss(folder: Path) -> tuple[Path, Path, list[str]]:
    """gpt-oss-120b's layer 0 in MXFP4, and a LoRA on its experts (target_parameters) and attention."""
    base, adapter = folder / "base", folder / "adapter"
    if (base / "model.safetensors").is_file() and (adapter / "adapter_model.safetensors").is_file():
        return base, adapter, ["--experts-transposed"]
    gen = torch.Generator().manual_seed(0)
    E, H, inter, heads, kv_heads, head_dim = 128, 2880, 2880, 64, 8, 64
    p = "model.layers.0"
    t: dict[str, torch.Tensor] = {
        f"{p}.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        f"{p}.post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        f"{p}.self_attn.q_proj.weight": _bf16((heads * head_dim, H), gen),
        f"{p}.self_attn.q_proj.bias": _bf16((heads * head_dim,), gen),
        f"{p}.self_attn.k_proj.weight": _bf16((kv_heads * head_dim, H), gen),
        f"{p}.self_attn.k_proj.bias": _bf16((kv_heads * head_dim,), gen),
        f"{p}.self_attn.v_proj.weight": _bf16((kv_heads * head_dim, H), gen),
        f"{p}.self_attn.v_proj.bias": _bf16((kv_heads * head_dim,), gen),
        f"{p}.self_attn.o_proj.weight": _bf16((H, heads * head_dim), gen),
        f"{p}.self_attn.o_proj.bias": _bf16((H,), gen),
        f"{p}.self_attn.sinks": _bf16((heads,), gen),
        f"{p}.mlp.router.weight": _bf16((E, H), gen),
        f"{p}.mlp.router.bias": _bf16((E,), gen),
        f"{p}.mlp.experts.gate_up_proj_bias": _bf16((E, 2 * inter), gen),
        f"{p}.mlp.experts.down_proj_bias": _bf16((E, H), gen),
    }
    # (E, N, K/32, 16) codes and (E, N, K/32) e8m0 scales near 2**-8: N outputs, K inputs.
    for name, n_out, k_in in (("gate_up_proj", 2 * inter, H), ("down_proj", H, inter)):
        t[f"{p}.mlp.experts.{name}_blocks"] = _random_bytes((E, n_out, k_in // 32, 16), gen)
        t[f"{p}.mlp.experts.{name}_scales"] = _random_bytes((E, n_out, k_in // 32), gen, 116, 122)
    base.mkdir(parents=True, exist_ok=True)
    save_file(t, base / "model.safetensors", metadata={"format": "pt"})
    del t
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": H,
              "intermediate_size": inter, "num_local_experts": E, "num_hidden_layers": 1,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "vocab_size": 201088, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
              "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                  "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    # One ParamWrapper per stack, nested in registration order (gate_up_proj outermost).
    q = heads * head_dim
    stacks = [(f"{p}.mlp.experts", E, H, 2 * inter), (f"{p}.mlp.experts.base_layer", E, inter, H)]
    _adapter(adapter, {f"{p}.self_attn.q_proj": (H, q), f"{p}.self_attn.o_proj": (q, H)},
             _lora_config(target_modules=["q_proj", "o_proj"], peft_version="0.21.2",
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), gen, stacks)
    return base, adapter, ["--experts-transposed"]


def make_deepseek(folder: Path) -> tuple[Path, Path, list[str]]:
    """A DeepSeek-V3 MoE layer in FP8 blocks, with the embedding, and a LoRA on attention and experts."""
    base, adapter = folder / "base", folder / "adapter"
    if (base / "model.safetensors.index.json").is_file() and (adapter / "adapter_model.safetensors").is_file():
        return base, adapter, []
    gen = torch.Generator().manual_seed(1)
    H, moe_inter, experts, vocab = 7168, 2048, 256, 129280
    p = "model.layers.3"
    attention = {"q_a_proj": (1536, H), "q_b_proj": (128 * 192, 1536), "kv_a_proj_with_mqa": (576, H),
                 "kv_b_proj": (128 * 256, 512), "o_proj": (H, 128 * 128)}
    base.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, base / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    shard("model-embed.safetensors", {"model.embed_tokens.weight": _bf16((vocab, H), gen)})
    small: dict[str, torch.Tensor] = {
        f"{p}.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        f"{p}.post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        f"{p}.self_attn.q_a_layernorm.weight": torch.ones(1536, dtype=torch.bfloat16),
        f"{p}.self_attn.kv_a_layernorm.weight": torch.ones(512, dtype=torch.bfloat16),
        f"{p}.mlp.gate.weight": _bf16((experts, H), gen),
        f"{p}.mlp.gate.e_score_correction_bias": torch.zeros(experts, dtype=torch.float32),
    }
    for m, shape in attention.items():
        for suffix, t in _fp8(shape, gen).items():
            small[f"{p}.self_attn.{m}.weight{suffix}"] = t
    shard("model-attn.safetensors", small)
    per_shard = 32
    names = [f"experts.{i}" for i in range(experts)] + ["shared_experts"]
    for start in range(0, len(names), per_shard):
        tensors = {}
        for e in names[start:start + per_shard]:
            for m, shape in (("gate_proj", (moe_inter, H)), ("up_proj", (moe_inter, H)), ("down_proj", (H, moe_inter))):
                for suffix, t in _fp8(shape, gen).items():
                    tensors[f"{p}.mlp.{e}.{m}.weight{suffix}"] = t
        shard(f"model-experts-{start // per_shard:03d}.safetensors", tensors)
    total = sum((base / f).stat().st_size for f in set(weight_map.values()))
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": H,
              "moe_intermediate_size": moe_inter, "n_routed_experts": experts, "vocab_size": vocab,
              "num_hidden_layers": 1, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    modules = {f"{p}.self_attn.{m}": (shape[1], shape[0]) for m, shape in attention.items()}
    for e in names:
        modules.update({f"{p}.mlp.{e}.gate_proj": (H, moe_inter), f"{p}.mlp.{e}.up_proj": (H, moe_inter),
                        f"{p}.mlp.{e}.down_proj": (moe_inter, H)})
    _adapter(adapter, modules, _lora_config(target_modules=[*attention, "gate_proj", "up_proj", "down_proj"]), gen)
    return base, adapter, []


LAYERS = {"gpt-oss": make_gpt_oss, "deepseek": make_deepseek}


def run_merge(base: Path, adapter: Path, out: Path, extra: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one ``wsurgery merge`` in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:]); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    cmd = [sys.executable, "-c", probe, sys.executable, "-m", "wsurgery.cli", "merge", str(base), str(adapter),
           str(out), "--quiet", *extra]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wall, rss_kib, code = done.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"merge failed: {done.stderr}")
    shutil.rmtree(out, ignore_errors=True)
    return float(wall), int(rss_kib) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", choices=sorted(LAYERS), default=sorted(LAYERS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = []
    for layer in args.layers:
        started = time.perf_counter()
        base, adapter, extra = LAYERS[layer](WORK / layer)
        print(f"{layer}: inputs ready ({time.perf_counter() - started:.0f} s)", flush=True)
        for mode, flags in (("plain (bf16)", []), ("--requantize", ["--requantize"])):
            runs = [run_merge(base, adapter, WORK / "out", [*extra, *flags]) for _ in range(args.repeats)]
            wall = statistics.median(r[0] for r in runs)
            rss = statistics.median(r[1] for r in runs)
            results.append({"layer": layer, "mode": mode, "wall_s": wall, "peak_rss_gb": rss / 1e9,
                            "runs": len(runs), "input_gb": sum(f.stat().st_size for f in base.iterdir()) / 1e9})
            print(f"{layer:9} {mode:14} median wall {wall:7.1f} s   median peak RSS {rss / 1e9:5.2f} GB "
                  f"({len(runs)} runs)", flush=True)
    (WORK / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
