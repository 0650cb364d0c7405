"""Hugging Face -> GGUF, judged by llama.cpp's own converter and by llama.cpp itself.

The reference is ``convert_hf_to_gguf.py`` from llama.cpp's source tree. CI runs Llama 3 at f16 (and the
llama.cpp logits check and the hash table check), fetching the tree with ``scripts/fetch_llama_cpp_src.sh``
where ``LLAMA_CPP_SRC`` is unset and pip reaches PyPI; the other comparisons (each runs the converter,
tens of seconds) need ``LLAMA_CPP_SRC`` and skip without it.

The converter names the pre-tokenizer by hashing the token ids of a fixed text, so a made-up tokenizer
is refused by it; the tests' tokenizers are therefore rebuilt, with ``tokenizers``, from the vocabularies
llama.cpp ships for its own tokenizer tests (``models/ggml-vocab-*.gguf``:
Llama 3's and Qwen2's tokens and merges), which the converter recognizes as ``llama-bpe`` and ``qwen2``.
The models are tiny transformers models saved with those tokenizers.

Oracles: the converter's output file, byte for byte; ``tokenizers``' encoding of llama.cpp's tokenizer
test texts (our encoder that redoes the pre-tokenizer hash); llama.cpp (xllamacpp) running our f32 file
against transformers running the model; the converter's own hash table; and the converter refusing
what we refuse.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from oracle import run_cli

from wsurgery.convert import gguf_vocab
from wsurgery.convert.hf_to_gguf import hf_to_gguf
from wsurgery.errors import InputError, UnsupportedError

REPO = Path(__file__).resolve().parent.parent
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _checked(src: str) -> Path:
    path = Path(src)
    if not (path / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"LLAMA_CPP_SRC={src} has no convert_hf_to_gguf.py")
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports sentencepiece")
    return path


@pytest.fixture(scope="session")
def llama_cpp_src() -> Path:
    """llama.cpp's source tree, for the comparisons beyond the one CI runs (each runs the converter, tens of
    seconds): ``LLAMA_CPP_SRC`` only."""
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src:
        pytest.skip("LLAMA_CPP_SRC (a llama.cpp source tree, scripts/fetch_llama_cpp_src.sh) is not set")
    return _checked(src)


@pytest.fixture(scope="session")
def fetched_llama_cpp_src() -> Path:
    """llama.cpp's source tree: ``LLAMA_CPP_SRC``, else fetched as CI does (the converter is plain Python)."""
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src:
        try:
            done = subprocess.run(["bash", str(REPO / "scripts" / "fetch_llama_cpp_src.sh")], capture_output=True,
                                  text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip("LLAMA_CPP_SRC is unset and fetching llama.cpp's source timed out")
        found = re.search(r"export LLAMA_CPP_SRC=(\S+)", done.stdout)
        if done.returncode or not found:
            pytest.skip("LLAMA_CPP_SRC is unset and pip could not fetch llama.cpp's source (no PyPI here)")
        src = found.group(1)
    return _checked(src)


def _vocab(src: Path, name: str) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of llama.cpp's test vocabulary ``name`` (a GGUF file of key/values
    only), parsed directly: gguf's reader takes half a minute over 400k strings."""
    data = (src / "models" / f"ggml-vocab-{name}.gguf").read_bytes()
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    pos, found = 24, {}

    def string() -> str:
        nonlocal pos
        n = struct.unpack_from("<Q", data, pos)[0]
        pos += 8 + n
        return data[pos - n:pos].decode("utf-8")

    for _ in range(n_kv):
        key = string()
        kind = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if kind == 8:
            found[key] = string()
        elif kind == 9:
            item, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item == 8:
                found[key] = [string() for _ in range(count)]
            else:
                found[key] = np.frombuffer(data, "<i4" if item == 5 else f"u{sizes[item]}", count, pos).tolist()
                pos += sizes[item] * count
        else:
            pos += sizes[kind]
    return found["tokenizer.ggml.tokens"], found["tokenizer.ggml.token_type"], found["tokenizer.ggml.merges"]


def _tokenizer(src: Path, name: str):
    """Llama 3's (``llama-bpe``) or Qwen2's (``qwen2``) tokenizer, as their tokenizer.json describe it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens, types, merges = _vocab(src, name)
    llama = name == "llama-bpe"
    normal = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == gguf.TokenType.NORMAL}
    tok = Tokenizer(models.BPE(normal, [tuple(m.split(" ")) for m in merges], ignore_merges=llama))
    if not llama:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT if llama else QWEN2_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k != gguf.TokenType.NORMAL])
    if llama:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", 128000)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                       eos_token="<|end_of_text|>",
                                       chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template="{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>"
                                                 "{% endfor %}")


_CARD = """---
license: apache-2.0
base_model: meta-llama/Llama-3.2-1B
tags:
- tiny
- test
language:
- en
---
# A tiny test model
"""


def _save(model, tokenizer, folder: Path, card: bool = False) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if card:
        (folder / "README.md").write_text(_CARD)
    return folder


@pytest.fixture(scope="module")
def llama_dir(fetched_llama_cpp_src, tmp_path_factory) -> Path:
    """A tiny Llama 3 (bf16 weights, untied head, sampling defaults and a model card)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=128000,
                                   eos_token_id=128001, rms_norm_eps=1e-5, rope_theta=500000.0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.generation_config.update(temperature=0.6, top_p=0.9, repetition_penalty=1.1, do_sample=True)
    folder = tmp_path_factory.mktemp("hf") / "Tiny-Llama-3-8B"
    return _save(model, _tokenizer(fetched_llama_cpp_src, "llama-bpe"), folder, card=True)


@pytest.fixture(scope="module")
def qwen2_dir(llama_cpp_src, tmp_path_factory) -> Path:
    """A tiny Qwen2 (f32 weights, Q/K/V biases, tied head)."""
    import transformers

    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, eos_token_id=151643,
                                   tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    return _save(model, _tokenizer(llama_cpp_src, "qwen2"), tmp_path_factory.mktemp("hf") / "qwen2-tiny")


@pytest.fixture(scope="module")
def qwen3_dir(qwen2_dir, tmp_path_factory) -> Path:
    """A tiny Qwen3 (Q/K norms, explicit head_dim) with Qwen2's tokenizer, as Qwen3 ships it."""
    import shutil

    import transformers

    torch.manual_seed(2)
    cfg = transformers.Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, eos_token_id=151643,
                                   tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("hf") / "qwen3-tiny"
    transformers.Qwen3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    for f in qwen2_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


def _reference(src: Path, folder: Path, out: Path, outtype: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
                           "--outtype", outtype], capture_output=True, text=True, timeout=600)


def _same_file(ours: Path, theirs: Path) -> None:
    a, b = ours.read_bytes(), theirs.read_bytes()
    if a == b:
        return
    ra, rb = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)  # say where they differ
    assert list(ra.fields) == list(rb.fields), "key/values differ"
    for key in ra.fields:
        assert ra.fields[key].contents() == rb.fields[key].contents(), key
    assert [(t.name, t.tensor_type, list(t.shape)) for t in ra.tensors] == \
           [(t.name, t.tensor_type, list(t.shape)) for t in rb.tensors], "tensor list differs"
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert ta.data.tobytes() == tb.data.tobytes(), ta.name
    raise AssertionError(f"{ours} and {theirs} differ ({len(a)} vs {len(b)} bytes)")


def test_llama_f16_is_byte_identical_to_convert_hf_to_gguf(fetched_llama_cpp_src, llama_dir, tmp_path, capsys):
    """The family CI runs: every key/value (general.* from the card and generation config, hyperparameters,
    Llama 3's tokenizer), the permuted Q/K, the tensor order, the alignment."""
    done = _reference(fetched_llama_cpp_src, llama_dir, tmp_path / "theirs.gguf", "f16")
    assert done.returncode == 0, done.stderr[-2000:]
    hf_to_gguf(llama_dir, tmp_path / "ours.gguf", "f16", progress=False)
    _same_file(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")
    status, _, err = run_cli(["quantize", llama_dir, tmp_path / "cli.gguf", "--gguf-type", "f16", "-q"], capsys)
    assert status == 0, err
    _same_file(tmp_path / "cli.gguf", tmp_path / "theirs.gguf")


@pytest.mark.parametrize("family, outtype", [("llama", "bf16"), ("qwen2", "f32"), ("qwen2", "q8_0"),
                                             ("qwen3", "f16")])
def test_other_families_and_types_are_byte_identical(llama_cpp_src, llama_dir, qwen2_dir, qwen3_dir, tmp_path,
                                                     family, outtype):
    folder = {"llama": llama_dir, "qwen2": qwen2_dir, "qwen3": qwen3_dir}[family]
    done = _reference(llama_cpp_src, folder, tmp_path / "theirs.gguf", outtype)
    assert done.returncode == 0, done.stderr[-2000:]
    hf_to_gguf(folder, tmp_path / "ours.gguf", outtype, progress=False, workers=2)
    _same_file(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")


def _sentencepiece_folder(folder: Path, architecture: str = "llama", hidden: int = 64) -> Path:
    """A tiny model with a SentencePiece tokenizer trained here (byte fallback, a user-defined and a control
    piece), and added tokens in both places the converter reads them (added_tokens.json, and
    tokenizer_config.json's added_tokens_decoder) past the SentencePiece vocabulary."""
    import io
    import random

    import sentencepiece
    import transformers

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog hello world llama model weights merge tensor".split()
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]),
        model_writer=model_file, vocab_size=320, hard_vocab_limit=False, model_type="bpe", byte_fallback=True,
        user_defined_symbols=["<tool>"], control_symbols=["<ctl>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    torch.manual_seed(0)
    common = dict(vocab_size=336, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    plain = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
             "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig),
             "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
             "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config)}
    if architecture in plain:
        model_class, config_class = plain[architecture]
        model = model_class(config_class(**common))
    else:
        gemma = dict(common, head_dim=16, sliding_window=64)
        model_class, config_class = {"gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig),
                                     "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config),
                                     "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig)
                                     }[architecture]
        if architecture == "gemma":
            del gemma["sliding_window"]
        model = model_class(config_class(**gemma))
        with torch.no_grad():  # norms away from 0, so that a missing +1 shows
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(0.1 * torch.randn(p.shape))
    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {"0": {"content": "<unk>", "special": True}, "1": {"content": "<s>", "special": True},
                                 "2": {"content": "</s>", "special": True},
                                 "330": {"content": "<|im_start|>", "special": False},
                                 "331": {"content": "\u2581user", "special": False}},
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    (folder / "added_tokens.json").write_text(json.dumps({"<extra>": 332}))
    return folder


@pytest.mark.parametrize("architecture", ["llama", "gemma", "gemma2", "gemma3"])
def test_sentencepiece_models_are_byte_identical(llama_cpp_src, tmp_path, architecture):
    """The converter's SentencePiece path (tokenizer.model read without sentencepiece here); for Gemma and
    Gemma 2 also their own hyperparameters, norms stored + 1, the tied head dropped (and Gemma's CodeGemma
    infill ids); for Gemma 3 TextModel's rules with its own over them (q/k norms + 1 too)."""
    folder = _sentencepiece_folder(tmp_path / f"tiny-{architecture}", architecture)
    done = _reference(llama_cpp_src, folder, tmp_path / "theirs.gguf", "f16")
    assert done.returncode == 0, done.stderr[-2000:]
    hf_to_gguf(folder, tmp_path / "ours.gguf", "f16", progress=False)
    _same_file(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_minimal_config_gets_transformers_defaults(llama_cpp_src, tmp_path, architecture):
    """The converter reads ``AutoConfig(...).to_dict()``: a config.json of older transformers without
    head_dim, rope_parameters, max_position_embeddings, rms_norm_eps or num_key_value_heads must give what
    transformers fills in. Llama with Llama 3's rope scaling (the converter computes a rope_freqs tensor),
    the others with a linear one."""
    folder = _sentencepiece_folder(tmp_path / f"old-{architecture}", architecture)
    config = json.loads((folder / "config.json").read_text())
    minimal = {k: config[k] for k in ("architectures", "model_type", "hidden_size", "intermediate_size",
                                      "num_hidden_layers", "num_attention_heads", "vocab_size", "bos_token_id",
                                      "eos_token_id", "tie_word_embeddings")}
    minimal.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    if architecture == "llama":
        minimal["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (folder / "config.json").write_text(json.dumps(minimal))
    done = _reference(llama_cpp_src, folder, tmp_path / "theirs.gguf", "f16")
    assert done.returncode == 0, done.stderr[-2000:]
    hf_to_gguf(folder, tmp_path / "ours.gguf", "f16", progress=False)
    _same_file(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")
    names = [t.name for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors]
    assert ("rope_freqs.weight" in names) == (architecture == "llama")


def test_a_llama_quantize_mix_in_one_pass(llama_cpp_src, tmp_path):
    """HF -> Q4_K_M in one pass is the converter's f16 file requantized as llama-quantize does
    (``quantize_gguf``, whose types and bytes tests/test_gguf_mixes.py and the K-quant tests check against
    llama.cpp): rows of 256 and 512 values, so that Q4_K, Q6_K and the promoted layers all occur."""
    import wsurgery.api

    folder = _sentencepiece_folder(tmp_path / "tiny-llama", hidden=256)
    done = _reference(llama_cpp_src, folder, tmp_path / "theirs-f16.gguf", "f16")
    assert done.returncode == 0, done.stderr[-2000:]
    wsurgery.api.quantize_gguf(tmp_path / "theirs-f16.gguf", tmp_path / "theirs-q4_k_m.gguf", "q4_k_m",
                               progress=False)
    hf_to_gguf(folder, tmp_path / "ours.gguf", "q4_k_m", progress=False)
    types = {t.tensor_type for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors}
    assert {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K} <= types
    _same_file(tmp_path / "ours.gguf", tmp_path / "theirs-q4_k_m.gguf")


def test_pre_tokenizer_hashes_and_text_are_the_converters(fetched_llama_cpp_src):
    """Our copy of ``get_vocab_base_pre``'s table and check text, against the converter's source."""
    source = (fetched_llama_cpp_src / "conversion" / "base.py").read_text(encoding="utf-8")
    body = source[source.index("Marker: Start get_vocab_base_pre"):source.index("Marker: End get_vocab_base_pre")]
    table: dict[str, str] = {}
    for chkhsh, name in re.findall(r'if chkhsh == "([0-9a-f]{64})":\n(?:\s*#.*\n)*\s*res = "([^"]+)"', body):
        table[chkhsh] = name  # no elif: a later match wins
    assert len(table) > 50 and table == gguf_vocab._PRE_TOKENIZERS
    chktxt = re.search(r"chktxt = ('.*')\n", body)
    assert chktxt is not None and eval(chktxt.group(1)) == gguf_vocab.CHECK_TEXT


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_our_encoder_encodes_as_tokenizers_does(llama_cpp_src, llama_dir, qwen2_dir, family):
    """The encoder behind the pre-tokenizer hash, on llama.cpp's own tokenizer test texts, against
    ``tokenizers`` reading the same tokenizer.json."""
    from tokenizers import Tokenizer

    folder, name = (llama_dir, "llama-bpe") if family == "llama" else (qwen2_dir, "qwen2")
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    theirs = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ours = gguf_vocab.encoder(spec)
    inp = (llama_cpp_src / "models" / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    texts = [t for t in inp.split("\n__ggml_vocab_test__\n") if t and not any(
        a["content"] in t for a in spec["added_tokens"])]
    assert len(texts) > 20
    for text in [*texts, gguf_vocab.CHECK_TEXT]:
        assert ours(text) == theirs.encode(text).ids, repr(text)
    assert gguf_vocab.pre_tokenizer_name(spec, folder) == name


def test_llama_cpp_runs_our_f32_file_as_transformers_runs_the_model(llama_dir, tmp_path):
    """Our f32 conversion in llama.cpp: the log-probabilities of its top tokens are transformers' (f32
    tolerance of tests/test_gguf_llamacpp.py)."""
    xllamacpp = pytest.importorskip("xllamacpp")
    import transformers

    out = hf_to_gguf(llama_dir, tmp_path / "model-f32.gguf", "f32", progress=False)
    tokens = [128000, 791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679]
    params = xllamacpp.CommonParams()
    params.model.path = str(out)
    params.n_ctx = params.n_batch = 32
    params.cpuparams.n_threads = 2
    params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
    params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.warmup = False
    server = xllamacpp.Server(params)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), -1).numpy()
    worst = 0.0
    for n in range(1, len(tokens) + 1):
        answer = server.handle_completions({"prompt": tokens[:n], "max_tokens": 1, "n_probs": 40,
                                            "temperature": 0, "cache_prompt": False})
        top = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        assert len(top) == 40
        got = np.array([e["logprob"] for e in top])
        ids = [e["id"] for e in top]
        worst = max(worst, float(np.abs(got - want[n - 1, ids]).max() / np.abs(want[n - 1]).max()))
    assert worst <= 1e-5, f"llama.cpp vs transformers: max error {worst:.3g} of the log-probabilities' scale"


def _tiny_bpe_folder(folder: Path) -> Path:
    """A model folder whose tokenizer no converter knows (a 300-token BPE trained here)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg)
    return _save(model, transformers.PreTrainedTokenizerFast(tokenizer_object=tok), folder)


def test_an_unknown_tokenizer_is_refused_as_the_converter_refuses_it(llama_cpp_src, tmp_path):
    folder = _tiny_bpe_folder(tmp_path / "hf")
    with pytest.raises(UnsupportedError, match="pre-tokenizer not recognized"):
        hf_to_gguf(folder, tmp_path / "ours.gguf", progress=False)
    assert not (tmp_path / "ours.gguf").exists()
    done = _reference(llama_cpp_src, folder, tmp_path / "theirs.gguf", "f16")
    assert done.returncode != 0 and "BPE pre-tokenizer was not recognized" in done.stderr


def test_what_is_not_converted_is_refused_by_name(tmp_path):
    """No llama.cpp needed: each refusal is one line, before anything is written."""
    folder = _tiny_bpe_folder(tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    cases = {
        "GPT2LMHeadModel": ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel'"),
        "Mixtral": ({"architectures": ["MixtralForCausalLM"]}, "stacked experts"),
        "longrope": ({"rope_parameters": {"rope_type": "longrope", "factor": 8.0, "rope_theta": 5e5}},
                     "rope type 'longrope'"),
        "quantized": ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
                      "quantized checkpoint"),
    }
    for what, (change, message) in cases.items():
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UnsupportedError, match=re.escape(message)) as e:
            hf_to_gguf(folder, tmp_path / "out.gguf", progress=False)
        assert "\n" not in str(e.value), what
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.model").write_bytes(b"\x0a")
    with pytest.raises(InputError, match="not a SentencePiece model"):
        hf_to_gguf(folder, tmp_path / "out.gguf", progress=False)
    (folder / "tokenizer.model").unlink()
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True  # llama.cpp's converter reads this one through transformers
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UnsupportedError, match="byte_fallback"):
        hf_to_gguf(folder, tmp_path / "out.gguf", progress=False)
    with pytest.raises(InputError, match="unknown --gguf-type"):
        hf_to_gguf(folder, tmp_path / "out.gguf", "q9_z", progress=False)
    assert not (tmp_path / "out.gguf").exists()
