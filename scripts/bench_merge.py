#!/usr/bin/env python
"""Benchmark ``wsurgery merge`` against a plain streaming copy and against PEFT's merge_and_unload.

For each model size it (1) generates, once, a synthetic Llama-shaped bf16 checkpoint in the layout
``save_pretrained`` writes (``config.json``, ``model-0000k-of-0000n.safetensors``, the index) and a
rank-16 PEFT LoRA adapter on every linear layer, cached under ``bench-work/<size>/``; (2) reads every
input file once so that all timed runs are warm-cache (the OS page cache cannot be dropped here);
(3) times each variant in a subprocess under ``/usr/bin/time -v``, several repetitions, interleaved,
each after a ``sync`` so that no run pays for writing back another run's output.
Other work on a shared machine skews wall times, so each run starts once the CPUs are quiet, the CPU
time other processes took during it is recorded, a run they disturbed is redone (``--retries``), and
CPU seconds are reported next to wall seconds. The variants:

  a  copy   streaming read + write of every tensor, unchanged, with wsurgery's reader and writer
  b  merge  ``wsurgery merge BASE ADAPTER OUT --quiet``
  c  peft   transformers from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained

With ``--methods oft boft`` it also times multiplicative merges on the same base, with adapters in
PEFT's storage format on the same layers: OFT (``oft_R``, block size 32, Cayley-Neumann) and BOFT
(block size 8, 2 butterfly factors), reported against the LoRA merge (target: within 2x).

and reports median wall time and median peak RSS, the ratios b/a and c/b, the memory bound for b,
and, as a sanity check of the benchmark itself, the bf16 ulp distance between b's and c's tensors.
The table is printed and written to ``bench-work/results.json``.

Usage (from the repository root):

    python scripts/bench_merge.py                      # both sizes, 3 repetitions
    python scripts/bench_merge.py --sizes small --repeats 5
    python scripts/bench_merge.py --peft-repeats 1     # fewer repetitions of the slow PEFT variant only
    python scripts/bench_merge.py --sizes large --methods oft boft

Helper modes, run by the benchmark in subprocesses:

    python scripts/bench_merge.py --copy-only SRC OUT
    python scripts/bench_merge.py --peft-merge BASE ADAPTER OUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench-work"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
GENERATOR_VERSION = 1  # bump when the generated data changes, to invalidate the cache


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_shard_bytes: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, in the order LlamaForCausalLM's state dict lists them."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * (self.hidden // self.heads)
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                        p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                        p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                        p + "mlp.down_proj.weight": (h, i),
                        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)
        return out

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden // self.heads, "vocab_size": self.vocab, "max_position_embeddings": 2048,
            "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
            "tie_word_embeddings": False, "use_cache": True, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "bfloat16", "transformers_version": "5.23.0",
        }


SIZES = {
    # ~0.40B parameters, 0.8 GB in bf16, two shards. The same tensor shapes as "large", only fewer layers:
    # a streaming merge's peak memory should be the same for both, PEFT's grows with the model.
    "small": ModelSize(hidden=2048, intermediate=5504, layers=6, heads=32, kv_heads=4, vocab=32000,
                       max_shard_bytes=500 * 10**6),
    # ~1.1B parameters (TinyLlama-like), 2.2 GB in bf16, two shards
    "large": ModelSize(hidden=2048, intermediate=5504, layers=22, heads=32, kv_heads=4, vocab=32000,
                       max_shard_bytes=2 * 10**9),
}


# ---------------------------------------------------------------------------------------------
# Data generation
# ---------------------------------------------------------------------------------------------

def generate_base(size: ModelSize, folder: Path, gen: torch.Generator) -> None:
    """Write config.json, greedily packed shards (as transformers packs them) and the index."""
    from safetensors.torch import save_file

    shapes = size.shapes()
    chunks: list[list[str]] = [[]]
    filled = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if chunks[-1] and filled + nbytes > size.max_shard_bytes:
            chunks.append([])
            filled = 0
        chunks[-1].append(name)
        filled += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(chunks):
        file_name = f"model-{k + 1:05d}-of-{len(chunks):05d}.safetensors"
        tensors = {}
        for name in names:
            if len(shapes[name]) == 1:  # RMSNorm weights sit around 1
                t = 1.0 + 0.05 * torch.randn(shapes[name], generator=gen)
            else:
                t = 0.02 * torch.randn(shapes[name], generator=gen)
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = file_name
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        del tensors
    total = sum(math.prod(s) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(size.config(), indent=2, sort_keys=True) + "\n")


def generate_adapter(size: ModelSize, base: Path, folder: Path, gen: torch.Generator) -> None:
    """A rank-16 LoRA on every linear layer, saved with the keys and config PEFT writes."""
    from safetensors.torch import save_file

    tensors = {}
    for name, shape in size.shapes().items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in TARGET_MODULES:
            continue
        out_f, in_f = shape
        # Non-zero B (trained-like): the change s·B·A is ~10% of a base weight's scale.
        tensors[f"base_model.model.{module}.lora_A.weight"] = (0.01 * torch.randn(RANK, in_f, generator=gen)
                                                               ).to(torch.bfloat16)
        tensors[f"base_model.model.{module}.lora_B.weight"] = (0.025 * torch.randn(out_f, RANK, generator=gen)
                                                               ).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "revision": None,
        "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": sorted(TARGET_MODULES),
        "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        "auto_mapping": None, "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {},
        "layer_replication": None, "exclude_modules": None, "lora_bias": False, "target_parameters": None,
        "trainable_token_indices": None, "eva_config": None, "corda_config": None, "qalora_group_size": 16,
        "use_qalora": False, "peft_version": "0.21.2",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


OFT_BLOCK, BOFT_BLOCK, BOFT_FACTORS = 32, 8, 2


def _linear_layers(size: ModelSize) -> dict[str, tuple[int, ...]]:
    return {n.removesuffix(".weight"): s for n, s in size.shapes().items()
            if n.removesuffix(".weight").rsplit(".", 1)[-1] in TARGET_MODULES}


def generate_oft_adapter(size: ModelSize, base: Path, folder: Path, gen: torch.Generator) -> None:
    """OFT as PEFT >= 0.18 saves it: ``oft_R.weight`` (in/b, b(b-1)/2), Cayley-Neumann, 5 terms."""
    from safetensors.torch import save_file

    tri = OFT_BLOCK * (OFT_BLOCK - 1) // 2
    tensors = {f"base_model.model.{m}.oft_R.weight": 0.01 * torch.randn(s[1] // OFT_BLOCK, tri, generator=gen)
               for m, s in _linear_layers(size).items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "OFT", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": 0,
              "oft_block_size": OFT_BLOCK, "target_modules": sorted(TARGET_MODULES), "module_dropout": 0.0,
              "bias": "none", "block_share": False, "coft": False, "eps": 6e-5, "use_cayley_neumann": True,
              "num_cayley_neumann_terms": 5, "fan_in_fan_out": False, "init_weights": True,
              "modules_to_save": None, "inference_mode": True, "peft_version": "0.21.2"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def generate_boft_adapter(size: ModelSize, base: Path, folder: Path, gen: torch.Generator) -> None:
    """BOFT as PEFT saves it: ``boft_R`` (factors, in/b, b, b) and ``boft_s`` (out, 1)."""
    from safetensors.torch import save_file

    tensors = {}
    for m, (out_f, in_f) in _linear_layers(size).items():
        tensors[f"base_model.model.{m}.boft_R"] = 0.01 * torch.randn(BOFT_FACTORS, in_f // BOFT_BLOCK, BOFT_BLOCK,
                                                                     BOFT_BLOCK, generator=gen)
        tensors[f"base_model.model.{m}.boft_s"] = 1 + 0.01 * torch.randn(out_f, 1, generator=gen)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "BOFT", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
              "boft_block_size": BOFT_BLOCK, "boft_block_num": 0, "boft_n_butterfly_factor": BOFT_FACTORS,
              "target_modules": sorted(TARGET_MODULES), "boft_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "init_weights": True, "modules_to_save": None, "inference_mode": True,
              "peft_version": "0.21.2"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


EXTRA_METHODS = {"oft": generate_oft_adapter, "boft": generate_boft_adapter}


def ensure_method_adapter(name: str, size: ModelSize, method: str) -> Path:
    """The OFT or BOFT adapter for ``size``, generated once."""
    folder = WORK / name / f"adapter-{method}"
    stamp = folder / "generated.json"
    want = {"generator": GENERATOR_VERSION, "method": method, "oft_block": OFT_BLOCK, "boft_block": BOFT_BLOCK,
            "boft_factors": BOFT_FACTORS, **asdict(size)}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    EXTRA_METHODS[method](size, WORK / name / "base", folder, torch.Generator().manual_seed(1))
    stamp.write_text(json.dumps(want, indent=2) + "\n")
    return folder


def ensure_data(name: str, size: ModelSize) -> tuple[Path, Path]:
    """Generate the base and adapter for ``size`` unless an identical set is cached."""
    folder = WORK / name
    base, adapter, stamp = folder / "base", folder / "adapter", folder / "generated.json"
    want = {"generator": GENERATOR_VERSION, "rank": RANK, "alpha": ALPHA, **asdict(size)}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        print(f"[{name}] reusing cached data in {folder}")
        return base, adapter
    shutil.rmtree(folder, ignore_errors=True)
    print(f"[{name}] generating base checkpoint and adapter in {folder} ...", flush=True)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    generate_base(size, base, gen)
    generate_adapter(size, base, adapter, gen)
    stamp.write_text(json.dumps(want, indent=2) + "\n")
    print(f"[{name}] generated in {time.perf_counter() - t0:.0f} s")
    return base, adapter


# ---------------------------------------------------------------------------------------------
# Helper modes (each runs alone in a subprocess under /usr/bin/time)
# ---------------------------------------------------------------------------------------------

def copy_only(src: Path, out: Path) -> None:
    """Stream every tensor of ``src`` unchanged into ``out``, with the base's own sharding."""
    from wsurgery.checkpoint import CheckpointWriter, TensorSpec, copy_side_files, open_checkpoint, plan_shards

    ckpt = open_checkpoint(src)
    specs = [TensorSpec(n, t.dtype, t.shape) for n, t in ckpt.tensors.items()]
    shards = plan_shards(specs, {n: t.file.name for n, t in ckpt.tensors.items()}, None)
    index_name = ckpt.index_file.name if ckpt.index_file is not None and len(shards) > 1 else None
    out.mkdir()
    writer = CheckpointWriter(out, shards, index_name)
    for name in ckpt.tensors:
        writer.write(name, ckpt.read(name))
    writer.close()
    copy_side_files(ckpt.folder, out)


def peft_merge(base: Path, adapter: Path, out: Path) -> None:
    """The reference route: load the whole model, merge in memory, save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.save_pretrained(out, max_shard_size=_max_shard_bytes(base))


def _max_shard_bytes(base: Path) -> int:
    """The largest base shard, so that PEFT's output is sharded like the base."""
    return max(p.stat().st_size for p in base.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------

_WALL_RE = re.compile(r"Elapsed \(wall clock\) time.*?:\s*(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)\s*$", re.MULTILINE)
_RSS_RE = re.compile(r"Maximum resident set size \(kbytes\):\s*(\d+)")
_CPU_RE = re.compile(r"(?:User|System) time \(seconds\):\s*(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Run:
    wall_s: float
    peak_rss_bytes: int
    cpu_s: float  # user + system of the measured command
    others: float  # share of all CPUs that other processes kept busy while it ran


def busy_cpu_seconds() -> float:
    """CPU seconds spent busy (not idle, not waiting on I/O) on all CPUs since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str]) -> Run:
    """Run ``cmd`` under ``/usr/bin/time -v``; parse wall time, peak RSS and CPU time, and gauge contention."""
    busy0 = busy_cpu_seconds()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], check=False, capture_output=True, text=True)
    busy1 = busy_cpu_seconds()
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    wall, rss, cpu = _WALL_RE.search(proc.stderr), _RSS_RE.search(proc.stderr), _CPU_RE.findall(proc.stderr)
    if wall is None or rss is None or len(cpu) != 2:
        sys.exit(f"cannot parse /usr/bin/time output:\n{proc.stderr}")
    hours, minutes, seconds = wall.groups()
    wall_s = int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)
    cpu_s = sum(float(c) for c in cpu)
    others = max(busy1 - busy0 - cpu_s, 0.0) / (max(wall_s, 0.01) * (os.cpu_count() or 1))
    return Run(wall_s, int(rss.group(1)) * 1024, cpu_s, others)


def wait_quiet(threshold: float, max_wait: float) -> None:
    """Wait until other processes leave the CPUs mostly idle, or ``max_wait`` seconds pass."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0 = busy_cpu_seconds()
        time.sleep(1.0)
        if (busy_cpu_seconds() - busy0) / (os.cpu_count() or 1) <= threshold or time.monotonic() > deadline:
            return


def measure(cmd: list[str], out: Path, quiet_threshold: float, max_wait: float, retries: int) -> Run:
    """One repetition: run on quiet CPUs; rerun (up to ``retries`` times) if other work took over the CPUs."""
    attempts: list[Run] = []
    for _ in range(1 + retries):
        remove(out)
        # Flush the dirty pages earlier runs left (PEFT's kept output, say): otherwise the kernel writes
        # them back during this run and bills it for another variant's output.
        os.sync()
        wait_quiet(quiet_threshold, max_wait)
        attempts.append(timed(cmd))
        if attempts[-1].others <= quiet_threshold:
            break
    return min(attempts, key=lambda r: r.others)


def warm_up(*folders: Path) -> None:
    """Read every input file once, so that every timed run finds it in the page cache."""
    for folder in folders:
        for p in sorted(folder.iterdir()):
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place (0 == bitwise equal, -0 == +0)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return int((ordered(a) - ordered(b)).abs().max())


def compare_outputs(size: ModelSize, ours: Path, peft_out: Path) -> dict[str, int]:
    """bf16 ulp distance between wsurgery's and PEFT's merged tensors, for a few tensors."""
    from safetensors import safe_open

    def load(folder: Path, name: str) -> torch.Tensor:
        for p in folder.glob("*.safetensors"):
            with safe_open(p, "pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        sys.exit(f"{folder}: no tensor {name}")

    last = size.layers - 1
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             f"model.layers.{last}.mlp.down_proj.weight", "model.embed_tokens.weight"]
    return {n: bf16_ulps(load(ours, n), load(peft_out, n)) for n in names}


def code_state() -> dict[str, str]:
    """The commit and a hash of wsurgery's sources: others may change the code while the benchmark runs."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    digest = hashlib.sha256()
    for p in sorted((ROOT / "wsurgery").rglob("*.py")):
        digest.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    return {"commit": head, "wsurgery_sources_sha256": digest.hexdigest()[:16]}


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()  # do not let write-back of the previous output spill into the next timed run


def bench_size(name: str, size: ModelSize, repeats: int, peft_repeats: int, quiet_threshold: float,
               max_wait: float, retries: int, methods: list[str] = ()) -> dict:
    base, adapter = ensure_data(name, size)
    extra = {f"merge-{m}": ensure_method_adapter(name, size, m) for m in methods}
    warm_up(base, adapter, *extra.values())
    outs = {v: WORK / name / f"out-{v}" for v in ("copy", "merge", "peft", *extra)}
    for o in outs.values():
        remove(o)
    script = str(Path(__file__).resolve())
    wsurgery = shutil.which("wsurgery") or sys.exit("the wsurgery command is not on PATH")
    commands = {
        "copy": [sys.executable, script, "--copy-only", str(base), str(outs["copy"])],
        "merge": [wsurgery, "merge", str(base), str(adapter), str(outs["merge"]), "--quiet"],
        "peft": [sys.executable, script, "--peft-merge", str(base), str(adapter), str(outs["peft"])],
        **{v: [wsurgery, "merge", str(base), str(a), str(outs[v]), "--quiet"] for v, a in extra.items()},
    }
    runs: dict[str, list[Run]] = {v: [] for v in commands}
    for rep in range(max(repeats, peft_repeats)):
        for variant, cmd in commands.items():
            if rep >= (peft_repeats if variant == "peft" else repeats):
                continue
            run = measure(cmd, outs[variant], quiet_threshold, max_wait, retries)
            runs[variant].append(run)
            print(f"[{name}] rep {rep + 1} {variant:5s} {run.wall_s:7.1f} s  {run.peak_rss_bytes / 1e6:8.0f} MB  "
                  f"cpu {run.cpu_s:6.1f} s  (other processes: {run.others:.0%} of the CPUs)", flush=True)
            if variant not in ("merge", "peft"):
                remove(outs[variant])  # the last merge and PEFT outputs are kept for the comparison
    ulps = compare_outputs(size, outs["merge"], outs["peft"])
    remove(outs["merge"])
    remove(outs["peft"])

    shapes = size.shapes()
    changed = [s for n, s in shapes.items() if n.removesuffix(".weight").rsplit(".", 1)[-1] in TARGET_MODULES]
    largest_fp32 = max(math.prod(s) for s in shapes.values()) * 4
    variants = {v: {"wall_s": statistics.median(x.wall_s for x in r),
                    "peak_rss_mb": statistics.median(x.peak_rss_bytes for x in r) / 1e6,
                    "cpu_s": statistics.median(x.cpu_s for x in r),
                    "runs": [{"wall_s": x.wall_s, "peak_rss_mb": round(x.peak_rss_bytes / 1e6), "cpu_s": x.cpu_s,
                              "others_cpu_share": round(x.others, 2)} for x in r]}
                for v, r in runs.items()}
    merge_rss_bound_mb = (3 * largest_fp32 + 0.6e9) / 1e6
    ratios = {
        "merge_over_copy_wall": variants["merge"]["wall_s"] / variants["copy"]["wall_s"],
        "peft_over_merge_wall": variants["peft"]["wall_s"] / variants["merge"]["wall_s"],
        "peft_over_merge_rss": variants["peft"]["peak_rss_mb"] / variants["merge"]["peak_rss_mb"],
        **{f"{v}_over_merge_wall": variants[v]["wall_s"] / variants["merge"]["wall_s"] for v in extra},
    }
    return {
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "checkpoint_bytes": sum(math.prod(s) for s in shapes.values()) * 2,
        "shards": len(list(base.glob("*.safetensors"))),
        "largest_tensor_fp32_bytes": largest_fp32,
        "largest_changed_tensor_fp32_bytes": max(math.prod(s) for s in changed) * 4,
        "variants": variants,
        "ratios": ratios,
        "merge_rss_bound_mb": merge_rss_bound_mb,
        "targets": {
            "merge_over_copy_wall<=1.5": ratios["merge_over_copy_wall"] <= 1.5,
            "peft_over_merge_wall>=3": ratios["peft_over_merge_wall"] >= 3,
            "peft_over_merge_rss>=5": ratios["peft_over_merge_rss"] >= 5,
            "merge_rss<3*largest_fp32+0.6GB": variants["merge"]["peak_rss_mb"] < merge_rss_bound_mb,
            "merge_vs_peft_ulps<=1": max(ulps.values()) <= 1,
            **{f"{v}_over_merge_wall<=2": ratios[f"{v}_over_merge_wall"] <= 2 for v in extra},
        },
        "merge_vs_peft_max_ulps": ulps,
    }


def print_report(results: dict[str, dict], repeats: int, peft_repeats: int) -> None:
    print(f"\nAll runs warm-cache: inputs read once before timing (the page cache cannot be dropped here). "
          f"Medians of {repeats} runs ({peft_repeats} for peft).")
    print(f"{'size':6s} {'params':>7s} {'variant':8s} {'wall s':>8s} {'peak RSS MB':>12s} {'CPU s':>7s}")
    for name, r in results.items():
        for v, m in r["variants"].items():
            print(f"{name:6s} {r['parameters'] / 1e9:6.2f}B {v:8s} {m['wall_s']:8.1f} {m['peak_rss_mb']:12.0f} "
                  f"{m['cpu_s']:7.1f}")
    for name, r in results.items():
        q = r["ratios"]
        print(f"\n[{name}] largest tensor in fp32: {r['largest_tensor_fp32_bytes'] / 1e6:.0f} MB "
              f"(largest changed: {r['largest_changed_tensor_fp32_bytes'] / 1e6:.0f} MB)")
        print(f"  merge/copy wall  {q['merge_over_copy_wall']:6.2f}  (target <= 1.5)")
        print(f"  peft/merge wall  {q['peft_over_merge_wall']:6.2f}  (target >= 3)")
        print(f"  peft/merge RSS   {q['peft_over_merge_rss']:6.2f}  (target >= 5)")
        for key, value in q.items():
            if key.startswith("merge-"):
                print(f"  {key.removesuffix('_over_merge_wall')}/merge wall {value:6.2f}  (target <= 2)")
        print(f"  merge RSS {r['variants']['merge']['peak_rss_mb']:.0f} MB vs bound 3 x largest fp32 + 0.6 GB = "
              f"{r['merge_rss_bound_mb']:.0f} MB")
        print(f"  wsurgery vs PEFT, max bf16 ulps: {r['merge_vs_peft_max_ulps']}")
        print(f"  targets: {r['targets']}")
    if len(results) > 1:
        print("\nPeak RSS against model size (same tensor shapes, more layers):")
        for v in ("merge", "peft"):
            cells = [f"{name} {r['parameters'] / 1e9:.2f}B: {r['variants'][v]['peak_rss_mb']:.0f} MB"
                     for name, r in results.items()]
            print(f"  {v:5s} " + ", ".join(cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--copy-only", nargs=2, metavar=("SRC", "OUT"), type=Path,
                      help="helper: stream-copy checkpoint SRC to OUT with wsurgery's reader and writer")
    mode.add_argument("--peft-merge", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), type=Path,
                      help="helper: merge with transformers + PEFT and save to OUT")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "large"])
    parser.add_argument("--methods", nargs="*", choices=sorted(EXTRA_METHODS), default=[],
                        help="also time OFT and/or BOFT merges on the same base, against the LoRA merge")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per variant (default 3)")
    parser.add_argument("--peft-repeats", type=int, default=None, help="repetitions of the PEFT variant "
                        "(default: --repeats)")
    parser.add_argument("--quiet-threshold", type=float, default=0.25, help="before each timed run, wait until "
                        "at most this fraction of the CPUs is busy with other work; rerun a repetition during which "
                        "other work took more (default 0.25)")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a repetition disturbed by other work; "
                        "the least disturbed attempt counts (default 2)")
    parser.add_argument("--max-wait", type=float, default=120.0, help="longest wait for quiet CPUs, in seconds, "
                        "before running anyway (default 120)")
    args = parser.parse_args(argv)
    if args.copy_only:
        copy_only(*args.copy_only)
        return
    if args.peft_merge:
        peft_merge(*args.peft_merge)
        return
    peft_repeats = args.peft_repeats or args.repeats
    WORK.mkdir(exist_ok=True)
    code_before = code_state()
    results = {name: bench_size(name, SIZES[name], args.repeats, peft_repeats, args.quiet_threshold, args.max_wait,
                                args.retries, args.methods) for name in args.sizes}
    code_after = code_state()
    print_report(results, args.repeats, peft_repeats)
    print(f"\nwsurgery at commit {code_before['commit'][:12]}, sources {code_before['wsurgery_sources_sha256']}")
    if code_after != code_before:
        print(f"WARNING: wsurgery's sources changed during the run (now commit {code_after['commit'][:12]}, "
              f"sources {code_after['wsurgery_sources_sha256']}); the runs may mix versions")
    summary = {
        "warm_cache": True, "repeats": args.repeats, "peft_repeats": peft_repeats,
        "quiet_threshold": args.quiet_threshold, "code_before": code_before, "code_after": code_after,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "sizes": results,
    }
    (WORK / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {WORK / 'results.json'}")


if __name__ == "__main__":
    main()
