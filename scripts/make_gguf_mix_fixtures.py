"""Records which ggml type llama.cpp's own ``llama-quantize`` gives each tensor for each file type (q4_k_m...).

Writes tiny synthetic GGUF files (random F16 weights, F32 norms and biases; only what llama-quantize reads:
hyperparameters and tensors, no tokenizer), quantizes each to every file type of ``wsurgery.quant.gguf_mixes``
with ``llama-quantize`` (built by ``scripts/build_llama_quantize.sh`` from llama.cpp as vendored in
llama-cpp-python 0.3.36) and records, per model, the tensors (name, shape, source type) and per file type the
type of each output tensor and the ``general.file_type`` it recorded, in ``fixtures/gguf_mixes/<model>.json``.
``tests/test_gguf_mixes.py`` checks ``gguf_mixes.mix_types`` against these, and regenerates them live with
``LLAMA_QUANTIZE`` set.

The models make the rules bite: llama of 16 layers (use_more_bits, n/8, n/16, untied output, GQA 4), llama of
12 layers without GQA and with a tied embedding, qwen2 whose rows divide into 32 but not 256 (K -> 32-block
fallbacks, output -> Q8_0) and into neither (-> F16), an 8-expert llama (Mixtral: attention at Q8_0, experts
3-D), falcon (its own ffn_down and output rules), and an 80-layer llama with GQA (the 70B attn_v rule).

Usage: python scripts/make_gguf_mix_fixtures.py [--llama-quantize PATH] [--out fixtures/gguf_mixes]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "gguf_mixes"

#: name -> (arch, layers, hidden, heads, kv heads, ffn, vocab, tied, experts, which blocks tensors to write)
MODELS: dict[str, dict] = {
    "llama16": dict(arch="llama", layers=16, hidden=256, heads=8, kv=2, ffn=512, vocab=64, tied=False),
    "llama12_tied": dict(arch="llama", layers=12, hidden=256, heads=4, kv=4, ffn=256, vocab=48, tied=True),
    "qwen2_odd_rows": dict(arch="qwen2", layers=10, hidden=160, heads=5, kv=1, ffn=200, vocab=40, tied=True,
                           bias=True),
    "llama_moe8": dict(arch="llama", layers=8, hidden=256, heads=8, kv=2, ffn=256, vocab=32, tied=False, experts=8),
    "falcon8": dict(arch="falcon", layers=8, hidden=256, heads=4, kv=1, ffn=512, vocab=32, tied=False),
    "llama80_attn_v": dict(arch="llama", layers=80, hidden=256, heads=8, kv=1, ffn=256, vocab=32, tied=False,
                           only=("attn_v",)),
}


def tensor_shapes(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF names and shapes (row length last) of a model of ``spec``, as llama.cpp's converter names them."""
    h, ffn, head_dim = spec["hidden"], spec["ffn"], spec["hidden"] // spec["heads"]
    kv_rows = spec["kv"] * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (spec["vocab"], h)), ("output_norm.weight", (h,))]
    if not spec["tied"]:
        out.append(("output.weight", (spec["vocab"], h)))
    experts = spec.get("experts", 0)
    for i in range(spec["layers"]):
        b = f"blk.{i}."
        if spec["arch"] == "falcon":
            layer = [("attn_norm.weight", (h,)), ("attn_norm.bias", (h,)),
                     ("attn_qkv.weight", (h + 2 * kv_rows, h)), ("attn_output.weight", (h, h)),
                     ("ffn_up.weight", (ffn, h)), ("ffn_down.weight", (h, ffn))]
        else:
            layer = [("attn_norm.weight", (h,)), ("attn_q.weight", (h, h)), ("attn_k.weight", (kv_rows, h)),
                     ("attn_v.weight", (kv_rows, h)), ("attn_output.weight", (h, h)), ("ffn_norm.weight", (h,))]
            if spec.get("bias"):
                layer += [("attn_q.bias", (h,)), ("attn_k.bias", (kv_rows,)), ("attn_v.bias", (kv_rows,))]
            if experts:
                layer += [("ffn_gate_inp.weight", (experts, h)), ("ffn_gate_exps.weight", (experts, ffn, h)),
                          ("ffn_up_exps.weight", (experts, ffn, h)), ("ffn_down_exps.weight", (experts, h, ffn))]
            else:
                layer += [("ffn_gate.weight", (ffn, h)), ("ffn_up.weight", (ffn, h)), ("ffn_down.weight", (h, ffn))]
        only = spec.get("only")
        out += [(b + n, s) for n, s in layer if only is None or n.split(".")[0] in only]
    return out


def write_model(spec: dict, path: Path, seed: int = 0) -> None:
    """A GGUF file llama-quantize loads: the hyperparameters its loader reads, F16 matrices, F32 vectors."""
    arch = spec["arch"]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(256)
    w.add_embedding_length(spec["hidden"])
    w.add_block_count(spec["layers"])
    w.add_feed_forward_length(spec["ffn"])
    w.add_head_count(spec["heads"])
    w.add_head_count_kv(spec["kv"])
    w.add_rope_dimension_count(spec["hidden"] // spec["heads"])
    w.add_vocab_size(spec["vocab"])
    if arch == "falcon":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_layer_norm_rms_eps(1e-5)
    if spec.get("experts"):
        w.add_expert_count(spec["experts"])
        w.add_expert_used_count(2)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    rng = np.random.default_rng(seed)
    for name, shape in tensor_shapes(spec):
        data = rng.standard_normal(shape).astype(np.float32) * 0.05
        w.add_tensor(name, data if len(shape) == 1 else data.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_llama_quantize(binary: str, src: Path, out: Path, ftype_name: str) -> dict:
    """``llama-quantize src out FTYPE``; the output's types (in our tensor order) and recorded key/values."""
    subprocess.run([binary, str(src), str(out), ftype_name.upper(), "2"], check=True, capture_output=True)
    reader = gguf.GGUFReader(out)
    types = {t.name: T(t.tensor_type).name for t in reader.tensors}
    fields = {k: int(reader.fields[k].contents()) for k in ("general.file_type", "general.quantization_version")}
    return {"types": types, **fields}


def record(name: str, spec: dict, binary: str, work: Path) -> dict:
    """The fixture of one model: its tensors and, per file type, what llama-quantize made of them."""
    from wsurgery.quant.gguf_mixes import DEFAULT_TYPE

    src = work / f"{name}.gguf"
    write_model(spec, src)
    shapes = tensor_shapes(spec)
    source = {t.name: T(t.tensor_type).name for t in gguf.GGUFReader(src).tensors}
    results = {}
    for ftype in DEFAULT_TYPE:
        ftype_name = ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()  # llama-quantize's name
        got = run_llama_quantize(binary, src, work / f"{name}-{ftype_name}.gguf", ftype_name)
        results[ftype_name] = {"file_type": got["general.file_type"],
                               "quantization_version": got["general.quantization_version"],
                               "types": [got["types"][n] for n, _ in shapes]}
        (work / f"{name}-{ftype_name}.gguf").unlink()
    hparams = {k: spec.get(k, 0) for k in ("layers", "heads", "kv", "experts")}
    return {"arch": spec["arch"], "hparams": hparams,
            "tensors": [[n, list(s), source[n]] for n, s in shapes], "file_types": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-quantize", default=os.environ.get("LLAMA_QUANTIZE"))
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args()
    if not args.llama_quantize:
        parser.error("no llama-quantize: run scripts/build_llama_quantize.sh and pass --llama-quantize or set "
                     "LLAMA_QUANTIZE")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in MODELS.items():
            fixture = record(name, spec, args.llama_quantize, Path(tmp))
            (args.out / f"{name}.json").write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
            print(f"{name}: {len(fixture['tensors'])} tensors, {len(fixture['file_types'])} file types")


if __name__ == "__main__":
    main()
