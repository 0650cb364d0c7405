#!/usr/bin/env python
"""Benchmark ``wsurgery merge-models`` against mergekit 0.1.5 (``mergekit-yaml --lazy-unpickle``, CPU).

It generates, once, a synthetic bf16 Llama base of a real shape (TinyLlama-1.1B: 22 layers, hidden
2048, 5632 intermediate, 32000 vocabulary, untied head; ``--quick``: a tiny one) and three fine-tunes
(the base plus a small random change everywhere), sharded as ``save_pretrained`` writes them, under
``bench-work/merge-models/<size>/``. Then, for ``ties`` and ``dare_ties`` (density 0.5, weights
0.5/0.3/0.2, seed 0), it times both tools in subprocesses under ``/usr/bin/time -v`` (wall, peak RSS),
``--repeats`` times interleaved, reports the medians and the ratios, checks that both outputs are
bit-identical, and writes the table to ``bench-work/merge-models/results-<size>.json``.

    python scripts/bench_merge_models.py --quick            # tiny models, 1 repetition
    python scripts/bench_merge_models.py --repeats 3        # the 1B-shaped models
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench-work" / "merge-models"
SIZES = {  # layers, hidden, intermediate, vocab, heads, kv heads
    "1b": (22, 2048, 5632, 32000, 32, 4),
    "quick": (2, 256, 688, 4096, 8, 2),
}
SHARD_BYTES = 2_000_000_000


def shapes(size: str) -> dict[str, tuple[int, ...]]:
    layers, hidden, inter, vocab, heads, kv = SIZES[size]
    head_dim = hidden // heads
    out = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (hidden, hidden),
                    p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
                    p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
                    p + "self_attn.o_proj.weight": (hidden, hidden),
                    p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                    p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                    p + "post_attention_layernorm.weight": (hidden,)})
    out.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return out


def config(size: str) -> dict:
    layers, hidden, inter, vocab, heads, kv = SIZES[size]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rope_theta": 10000.0}


def write_model(folder: Path, size: str, tensor_of) -> None:
    """A sharded bf16 checkpoint with its index, written tensor by tensor (memory: one shard)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = 0
    names = list(shapes(size).items())
    plan: list[list[str]] = [[]]
    for name, shape in names:
        n = torch.Size(shape).numel() * 2
        if plan[-1] and sizes + n > SHARD_BYTES:
            plan.append([])
            sizes = 0
        plan[-1].append(name)
        sizes += n
    weight_map = {}
    for k, group in enumerate(plan):
        file = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {name: tensor_of(name, shapes(size)[name]) for name in group}
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in group})
        del shard
    total = sum(torch.Size(s).numel() * 2 for s in shapes(size).values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config(size), indent=2))


def ensure_models(size: str) -> dict[str, Path]:
    root = WORK / size
    paths = {k: root / k for k in ("base", "a", "b", "c")}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    print(f"generating {size} models in {root} ...", flush=True)

    def base_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    write_model(paths["base"], size, base_tensor)
    for seed, k in enumerate("abc", 1):
        def tuned(name: str, shape: tuple[int, ...], seed: int = seed) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))
            return (base_tensor(name, shape).float() + torch.randn(shape, generator=g) * 0.002).to(torch.bfloat16)
        write_model(paths[k], size, tuned)
    return paths


_WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)")
_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``cmd`` under /usr/bin/time -v."""
    subprocess.run(["sync"], check=False)
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    wall, rss = _WALL.search(proc.stderr), _RSS.search(proc.stderr)
    assert wall is not None and rss is not None, proc.stderr[-2000:]
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    return seconds, int(rss.group(1)) / 1024


def same_output(a: Path, b: Path) -> bool:
    from wsurgery.checkpoint import open_checkpoint

    x, y = open_checkpoint(a), open_checkpoint(b)
    return set(x.tensors) <= set(y.tensors) and all(torch.equal(x.read(n), y.read(n)) for n in x.tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, one repetition")
    ap.add_argument("--repeats", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--methods", nargs="+", default=["dare_ties", "ties"])
    args = ap.parse_args()
    size = "quick" if args.quick else "1b"
    repeats = args.repeats or (1 if args.quick else 3)
    paths = ensure_models(size)
    results = {}
    for method in args.methods:
        cfg = {"merge_method": method, "base_model": str(paths["base"]), "dtype": "bfloat16",
               "parameters": {"density": 0.5},
               "models": [{"model": str(paths[k]), "parameters": {"weight": w}}
                          for k, w in zip("abc", (0.5, 0.3, 0.2))]}
        yml = WORK / size / f"{method}.yml"
        yml.write_text(json.dumps(cfg))
        outs = {"mergekit": WORK / size / f"out-{method}-mergekit", "wsurgery": WORK / size / f"out-{method}-wsurgery"}
        cmds = {"mergekit": ["mergekit-yaml", str(yml), str(outs["mergekit"]), "--lazy-unpickle", "--random-seed", "0",
                             "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                "wsurgery": [sys.executable, "-c",
                             "from wsurgery.merging.command import merge_models_command as c; c()",
                             "--config", str(yml), str(outs["wsurgery"]), "--seed", "0", "--quiet"]}
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
        for rep in range(repeats):
            for tool, cmd in cmds.items():
                shutil.rmtree(outs[tool], ignore_errors=True)
                runs[tool].append(timed(cmd))
                print(f"[{size} {method}] rep {rep + 1} {tool:8s} {runs[tool][-1][0]:7.1f} s "
                      f"{runs[tool][-1][1]:8.0f} MB", flush=True)
        identical = same_output(outs["mergekit"], outs["wsurgery"])
        row = {tool: {"wall_s": statistics.median(r[0] for r in rs), "peak_rss_mb": statistics.median(r[1] for r in rs)}
               for tool, rs in runs.items()}
        row["speedup"] = row["mergekit"]["wall_s"] / row["wsurgery"]["wall_s"]
        row["rss_ratio"] = row["mergekit"]["peak_rss_mb"] / row["wsurgery"]["peak_rss_mb"]
        row["bit_identical"] = identical
        results[method] = row
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        record = {"size": size, "repeats": repeats, "models": 3, "torch_threads": torch.get_num_threads(),
                  "when": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
        (WORK / f"results-{size}.json").write_text(json.dumps(record, indent=2) + "\n")  # after each method
    print(f"{'method':10s} {'mergekit s':>10s} {'ours s':>8s} {'speedup':>8s} {'mergekit MB':>12s} {'ours MB':>8s} "
          "identical")
    for method, r in results.items():
        print(f"{method:10s} {r['mergekit']['wall_s']:10.1f} {r['wsurgery']['wall_s']:8.1f} {r['speedup']:7.2f}x "
              f"{r['mergekit']['peak_rss_mb']:12.0f} {r['wsurgery']['peak_rss_mb']:8.0f} {r['bit_identical']}")


if __name__ == "__main__":
    main()
