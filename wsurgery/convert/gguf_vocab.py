"""A Hugging Face tokenizer as the ``tokenizer.*`` key/values llama.cpp's ``convert_hf_to_gguf.py`` writes.

The converter reads the tokenizer with ``transformers`` (not a runtime dependency here), so its rules
are redone from the tokenizer's own files: ``tokenizer.json`` (vocabulary, added tokens, merges,
post-processor), ``tokenizer_config.json`` (special tokens, ``add_*_token``, chat template) and
``config.json`` (special token ids), in the order and with the types the converter gives them.

``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer. The converter finds it by encoding a fixed
text and hashing the token ids (``chkhsh``); the hash is redone here with a byte-level BPE encoder over
``tokenizer.json`` (the pre-tokenizers and normalizers the known models use), and looked up in the
converter's own table (``_PRE_TOKENIZERS``, copied from llama.cpp's ``get_vocab_base_pre`` of the
version the tests compare with). A tokenizer whose encoding cannot be redone, or whose hash the table
lacks (the converter refuses it too), is refused with one line.

A SentencePiece ``tokenizer.model`` is read as the protobuf it is (its pieces, scores and types), as the
converter reads it through ``sentencepiece``.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import InputError, UnsupportedError

#: The converter's ``chktxt``: its token ids, hashed, identify the pre-tokenizer.
CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple '
    'emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333'
    ' 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天'
    '～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!'
    "!!!?????? I've been 'told he's there, 'RE you sure? 'M not s"
    "ure I'll make it, 'D you like some tea? We'Ve a'lL"
)

#: GPT-2's pre-tokenizer regex (``ByteLevel`` with ``use_regex``).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

#: ``chkhsh`` -> ``tokenizer.ggml.pre``, as llama.cpp's ``get_vocab_base_pre`` (a later entry wins there too).
_PRE_TOKENIZERS: dict[str, str] = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252": "gemma4",
    "0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed": "spark2_5",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",
    "52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e": "cohere2moe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a": "jina-v2-code",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
    "62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57": "sarvam-moe",
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",
    "f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60": "granite-embed-multi-97m",
    "789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",
    "972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac": "laguna",
    "653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd": "ufakzeka",
}

#: ``gguf.TokenType`` values, as the converter writes them.
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = (int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL),
                                             int(gguf.TokenType.USER_DEFINED), int(gguf.TokenType.UNUSED))
_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as JSON ({e}); the tokenizer files are damaged") from e


@lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table (``ByteLevel``)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


class _Unsupported(Exception):
    """A part of ``tokenizer.json`` this encoder does not redo (turned into one ``UnsupportedError``)."""


def _regex() -> Any:
    try:
        import regex  # only for the pre-tokenizer hash: its \\p{L} classes
    except ImportError as e:
        raise UnsupportedError("converting a BPE tokenizer to GGUF needs the 'regex' package "
                               "(pip install regex)") from e
    return regex


def _split(pieces: list[str], pattern: str) -> list[str]:
    """``Split`` with behaviour ``Isolated``: every match and every gap between matches a piece."""
    compiled = _regex().compile(pattern)
    out = []
    for piece in pieces:
        pos = 0
        for m in compiled.finditer(piece):
            if m.start() > pos:
                out.append(piece[pos:m.start()])
            if m.end() > m.start():
                out.append(m.group())
            pos = m.end()
        if pos < len(piece):
            out.append(piece[pos:])
    return out


def _normalize(text: str, spec: dict | None) -> str:
    if spec is None:
        return text
    kind = spec.get("type")
    if kind == "Sequence":
        for sub in spec.get("normalizers", []):
            text = _normalize(text, sub)
        return text
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return unicodedata.normalize(kind, text)
    raise _Unsupported(f"normalizer {kind}")


def _pre_tokenize(pieces: list[str], spec: dict | None) -> tuple[list[str], bool]:
    """The pieces after the pre-tokenizer, and whether they were byte-level mapped."""
    if spec is None:
        return pieces, False
    kind = spec.get("type")
    if kind == "Sequence":
        mapped = False
        for sub in spec.get("pretokenizers", []):
            pieces, now = _pre_tokenize(pieces, sub)
            mapped = mapped or now
        return pieces, mapped
    if kind == "Split":
        pattern = spec.get("pattern", {})
        if spec.get("behavior") != "Isolated" or spec.get("invert") or "Regex" not in pattern:
            raise _Unsupported(f"Split pre-tokenizer {spec.get('behavior')}/{list(pattern)}")
        return _split(pieces, pattern["Regex"]), False
    if kind == "ByteLevel":
        if spec.get("add_prefix_space"):
            raise _Unsupported("ByteLevel add_prefix_space")
        if spec.get("use_regex", True):
            pieces = _split(pieces, _GPT2_REGEX)
        table = _byte_chars()
        return ["".join(table[b] for b in p.encode("utf-8")) for p in pieces], True
    raise _Unsupported(f"pre-tokenizer {kind}")


def _merge_ranks(merges: list) -> dict[tuple[str, str], int]:
    ranks: dict[tuple[str, str], int] = {}
    for i, m in enumerate(merges):
        pair = tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
        if len(pair) != 2:
            raise _Unsupported("a merge that is not a pair")
        ranks.setdefault((pair[0], pair[1]), i)
    return ranks


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """One pre-token through the BPE merges, lowest rank first (leftmost among equals)."""
    symbols = list(word)
    while len(symbols) > 1:
        best = min(((ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))
                    if (a, b) in ranks), default=None)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _post_process(ids: list[int], spec: dict | None) -> list[int]:
    """The post-processor of a single sequence (``encode`` with special tokens)."""
    if spec is None:
        return ids
    kind = spec.get("type")
    if kind == "Sequence":
        for sub in spec.get("processors", []):
            ids = _post_process(ids, sub)
        return ids
    if kind == "ByteLevel":
        return ids
    if kind == "TemplateProcessing":
        out: list[int] = []
        for item in spec.get("single", []):
            if "Sequence" in item:
                out.extend(ids)
            else:
                out.extend(spec["special_tokens"][item["SpecialToken"]["id"]]["ids"])
        return out
    if kind in ("RobertaProcessing", "BertProcessing"):
        return [spec["cls"][1], *ids, spec["sep"][1]]
    raise _Unsupported(f"post-processor {kind}")


def encoder(tokenizer: dict) -> Callable[[str], list[int]]:
    """A text's token ids as ``tokenizers`` encodes it with special tokens (byte-level BPE only); the
    merges are ranked once."""
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise _Unsupported(f"model {model.get('type')}")
    vocab: dict[str, int] = model.get("vocab", {})
    ranks = _merge_ranks(model.get("merges", []))
    added = [a["content"] for a in tokenizer.get("added_tokens", []) if a.get("content")]

    def encode(text: str) -> list[int]:
        if found := next((a for a in added if a in text), None):
            raise _Unsupported(f"added token {found!r} in the text")
        pieces, mapped = _pre_tokenize([_normalize(text, tokenizer.get("normalizer"))],
                                       tokenizer.get("pre_tokenizer"))
        if not mapped:
            raise _Unsupported("a BPE without byte-level pre-tokenizer")
        ids: list[int] = []
        for piece in pieces:
            for w in [piece] if model.get("ignore_merges") and piece in vocab else _bpe(piece, ranks):
                if w not in vocab:
                    raise _Unsupported(f"symbol {w!r} outside the vocabulary")
                ids.append(vocab[w])
        return _post_process(ids, tokenizer.get("post_processor"))

    return encode


def pre_tokenizer_name(tokenizer: dict, where: Path) -> str:
    """``tokenizer.ggml.pre`` as the converter's ``get_vocab_base_pre`` finds it."""
    try:
        ids = encoder(tokenizer)(CHECK_TEXT)
    except _Unsupported as e:
        raise UnsupportedError(f"{where}: cannot redo the converter's pre-tokenizer check for this tokenizer "
                               f"({e}); convert it with llama.cpp's convert_hf_to_gguf.py") from None
    chkhsh = hashlib.sha256(str(ids).encode()).hexdigest()
    name = _PRE_TOKENIZERS.get(chkhsh)
    if name is None:
        raise UnsupportedError(f"{where}: BPE pre-tokenizer not recognized (chkhsh {chkhsh}); llama.cpp's "
                               "converter refuses it too: it has no pre-tokenizer for this tokenizer")
    return name


def _looks_special(token: str) -> bool:
    """The converter's ``does_token_look_special``."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def bpe_vocab(tokenizer: dict, vocab_size: int | None, where: Path) -> tuple[list[str], list[int]]:
    """Tokens and token types as the converter's ``get_vocab_base``: ids the tokenizer lacks are
    ``[PAD{i}]``, added tokens CONTROL (special, or looking special) or USER_DEFINED."""
    vocab = dict(tokenizer.get("model", {}).get("vocab", {}))
    added = {int(a["id"]): a for a in tokenizer.get("added_tokens", [])}
    reverse = {i: t for t, i in vocab.items()}
    reverse.update({i: a["content"] for i, a in added.items()})
    size = len(set(vocab) | {a["content"] for a in added.values()}) if vocab_size is None else vocab_size
    if reverse and max(reverse) >= size:
        raise InputError(f"{where}: token id {max(reverse)} is not below the model's vocab_size {size}")
    tokens, types = [], []
    for i in range(size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if added[i].get("special") or _looks_special(token):
                types.append(_CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(_USER_DEFINED)
        else:
            types.append(_NORMAL)
        tokens.append(token)
    return tokens, types


class SpecialVocab:
    """The converter's ``gguf.SpecialVocab`` (merges, special token ids, ``add_*_token``, chat template),
    read from the same files with the same precedence."""

    def __init__(self, folder: Path, load_merges: bool, n_vocab: int | None = None,
                 types: tuple[str, ...] = _SPECIAL_TYPES, tokenizer: dict | None = None):
        """``tokenizer``: ``tokenizer.json`` already parsed (default: read here)."""
        self.folder, self.n_vocab, self.load_merges = folder, n_vocab, load_merges
        self._tokenizer = tokenizer
        self.merges: list[str] = []
        self.special_token_ids: dict[str, int] = {}
        self.add_special_token: dict[str, bool] = {}
        self.chat_template: str | list | None = None
        self.lowercase: bool | None = None
        self.strip_accents: bool | None = None
        self.types = types
        self._from_tokenizer_json()
        self._from_config_json()

    def add_to(self, w: gguf.GGUFWriter) -> None:
        if self.merges:
            w.add_token_merges(self.merges)
        for typ, tokid in self.special_token_ids.items():  # types the writer has no key for are skipped
            if (add_id := getattr(w, f"add_{typ}_token_id", None)) is not None:
                add_id(tokid)
        for typ, value in self.add_special_token.items():
            if (add_flag := getattr(w, f"add_add_{typ}_token", None)) is not None:
                add_flag(value)
        if self.chat_template is not None:
            w.add_chat_template(self.chat_template)
        if self.lowercase is not None:
            w.add_bool("tokenizer.ggml.normalizer.lowercase", self.lowercase)
        if self.strip_accents is not None:
            w.add_bool("tokenizer.ggml.normalizer.strip_accents", self.strip_accents)

    def set_id(self, typ: str, tid: object) -> None:
        """The converter's ``_set_special_token``: the first id found for a type stays."""
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise InputError(f"{self.folder}: special token {typ} has id {tid}; the tokenizer files are damaged")
        if (self.n_vocab is None or tid < self.n_vocab) and typ not in self.special_token_ids:
            self.special_token_ids[typ] = tid

    def _normalizer(self, spec: dict) -> None:
        kind = spec.get("type")
        if kind == "Lowercase":
            self.lowercase = True
        elif kind == "StripAccents":
            self.strip_accents = True
        elif kind == "BertNormalizer":
            if "lowercase" in spec:
                self.lowercase = spec["lowercase"]
            if "strip_accents" in spec:
                self.strip_accents = spec["strip_accents"]
        elif kind == "Sequence":
            for sub in spec.get("normalizers", []):
                self._normalizer(sub)

    def _merges(self, merges: list) -> None:
        if isinstance(merges[0], str):
            self.merges = merges
        elif isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
            # spaces inside a merge's parts as U+0120 (the converter's chr(ord(" ") + 256))
            self.merges = [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
        else:
            raise InputError(f"{self.folder / 'tokenizer.json'}: merges in an unknown format")

    def _from_tokenizer_json(self) -> None:
        path = self.folder / "tokenizer.json"
        tokenizer = self._tokenizer if self._tokenizer is not None else _load_json(path) if path.is_file() else None
        added: list = []
        if tokenizer:
            merges = tokenizer.get("model", {}).get("merges")
            if self.load_merges and isinstance(merges, list) and merges:
                self._merges(merges)
            if normalizer := tokenizer.get("normalizer"):
                self._normalizer(normalizer)
            added = tokenizer.get("added_tokens", {})
        config_path = self.folder / "tokenizer_config.json"
        config = _load_json(config_path) if config_path.is_file() else None
        if tokenizer:
            self._post_processor(tokenizer, config)
        if not config:
            return
        self._chat_template(config)
        for typ in self.types:
            add_entry = config.get(f"add_{typ}_token")
            if isinstance(add_entry, bool) and typ not in self.add_special_token:
                self.add_special_token[typ] = add_entry
            entry = config.get(f"{typ}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if not isinstance(content, str):
                continue
            self.set_id(typ, next((a.get("id") for a in added if a.get("content") == content), None))

    def _post_processor(self, tokenizer: dict, config: dict | None) -> None:
        """The converter's reading of ``post_processor``: which special tokens ``encode`` adds."""
        c = config or {}
        bos, cls, eos, sep = c.get("bos_token"), c.get("cls_token"), c.get("eos_token"), c.get("sep_token")
        if not bos and cls and config:
            config["bos_token"] = bos = cls
        if not eos and sep and config:
            config["eos_token"] = eos = sep
        post = tokenizer.get("post_processor")
        if not post:
            return
        for proc in post.get("processors", [post]):
            kind = proc.get("type")
            if kind == "ByteLevel":
                self.add_special_token.setdefault("bos", False)
                self.add_special_token.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                self.add_special_token.update(bos=True, eos=True, sep=True)
                if not cls and config:
                    config["cls_token"] = cls = proc.get("cls", [bos])[0]
                if not sep and config:
                    config["sep_token"] = sep = proc.get("sep", [eos])[0]
            elif kind == "TemplateProcessing":
                bos, cls, eos = self._template(proc, config, bos, cls, eos, sep)

    def _template(self, proc: dict, config: dict | None, bos: Any, cls: Any, eos: Any,
                  sep: Any) -> tuple[Any, Any, Any]:
        single, pair = proc.get("single", []), proc.get("pair", [])
        first = last = None
        if len(single) > 1:
            if first := single[0].get("SpecialToken", {}).get("id"):
                if not config:
                    bos = first
                elif first not in (bos, cls):
                    if not bos:
                        config["bos_token"] = bos = first
                    if not cls:
                        config["cls_token"] = cls = first
                self.add_special_token["bos"] = first in (bos, cls)
            if last := single[-1].get("SpecialToken", {}).get("id"):
                if not config:
                    eos = last
                elif last != eos:
                    if "eot" not in self.types:
                        self.types = (*self.types, "eot")
                        config["eot_token"] = eos
                    elif "eom" not in self.types:
                        self.types = (*self.types, "eom")
                        config["eom_token"] = eos
                    config["eos_token"] = eos = last
                self.add_special_token["eos"] = last == eos
        if pair:
            start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
            stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
            pair = pair[slice(start, stop)]
            if pair:
                a, b = pair[0].get("Sequence", {}).get("id"), pair[-1].get("Sequence", {}).get("id")
                if a == "A" and b == "B" and (middle := pair[1:-1]):
                    add_sep = False
                    if entry := middle[0].get("SpecialToken", {}).get("id"):
                        if entry in (sep, eos) and not last:
                            add_sep = True
                    if len(middle) == 2 and (entry := middle[1].get("SpecialToken", {}).get("id")):
                        if entry in (sep, eos):
                            add_sep = True
                    self.add_special_token["sep"] = add_sep
                    if add_sep and not sep and config:
                        config["sep_token"] = eos
        return bos, cls, eos

    def _chat_template(self, config: dict) -> None:
        alt: str | list | None = None
        jinja, as_json = self.folder / "chat_template.jinja", self.folder / "chat_template.json"
        if jinja.is_file():
            alt = jinja.read_text(encoding="utf-8")
            if more := list((self.folder / "additional_chat_templates").glob("*.jinja")):
                alt = [{"name": "default", "template": alt},
                       *({"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in more)]
        elif as_json.is_file():
            alt = _load_json(as_json).get("chat_template")
        template = config.get("chat_template", alt)
        if template is None or isinstance(template, (str, list)):
            self.chat_template = template

    def _from_config_json(self) -> None:
        path = self.folder / "config.json"
        if not path.is_file():
            return
        config = _load_json(path)
        for typ in self.types:
            tid = config.get(f"{typ}_token_id")
            if tid is None and "text_config" in config:
                tid = config["text_config"].get(f"{typ}_token_id")
            self.set_id(typ, tid)


def add_gpt2_vocab(w: gguf.GGUFWriter, folder: Path, vocab_size: int | None, tokenizer: dict) -> None:
    """The converter's ``_set_vocab_gpt2``: a byte-level BPE tokenizer from ``tokenizer.json`` (parsed)."""
    path = folder / "tokenizer.json"
    tokens, types = bpe_vocab(tokenizer, vocab_size, path)
    pre = pre_tokenizer_name(tokenizer, path)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    SpecialVocab(folder, load_merges=True, tokenizer=tokenizer).add_to(w)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """One protobuf message's fields, in order: (field number, varint value or bytes)."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, value))
        elif wire == 1:
            out.append((number, data[pos:pos + 8]))
            pos += 8
        elif wire == 2:
            n, pos = _varint(data, pos)
            out.append((number, data[pos:pos + n]))
            pos += n
        elif wire == 5:
            out.append((number, data[pos:pos + 4]))
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
    return out


def sentencepiece_pieces(path: Path) -> list[tuple[str, float, int]]:
    """``tokenizer.model``'s pieces (text, score, SentencePiece type) in id order: the ``pieces`` of its
    ``ModelProto`` (field 1; each piece=1, score=2 as float32, type=3 with NORMAL=1 by default)."""
    try:
        pieces = []
        for number, value in _fields(path.read_bytes()):
            if number != 1 or not isinstance(value, bytes):
                continue
            text, score, kind = "", 0.0, 1
            for n, v in _fields(value):
                if n == 1 and isinstance(v, bytes):
                    text = v.decode("utf-8")
                elif n == 2 and isinstance(v, bytes) and len(v) == 4:
                    score = float(np.frombuffer(v, "<f4")[0])
                elif n == 3 and isinstance(v, int):
                    kind = v
            pieces.append((text, score, kind))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a SentencePiece model ({e}); the tokenizer file is damaged") from None
    if not pieces:
        raise InputError(f"{path}: no pieces in this SentencePiece model; the tokenizer file is damaged")
    return pieces


#: SentencePiece piece types -> the token types the converter writes (USER_DEFINED pieces stay NORMAL:
#: it asks only IsUnknown/IsControl/IsUnused/IsByte).
_SPM_TYPES = {2: int(gguf.TokenType.UNKNOWN), 3: _CONTROL, 5: _UNUSED, 6: int(gguf.TokenType.BYTE)}


def add_sentencepiece_vocab(w: gguf.GGUFWriter, folder: Path, vocab_size: int | None) -> None:
    """The converter's ``_set_vocab_sentencepiece`` (``_create_vocab_sentencepiece``): pieces, scores and
    types from ``tokenizer.model``, then ``added_tokens.json`` and ``tokenizer_config.json``'s
    ``added_tokens_decoder`` over them."""
    pieces = sentencepiece_pieces(folder / "tokenizer.model")
    size = vocab_size or len(pieces)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-10000.0] * size
    types = [_UNUSED] * size
    for i, (text, score, kind) in enumerate(pieces[:size]):
        tokens[i], scores[i], types[i] = text, score, _SPM_TYPES.get(kind, _NORMAL)
    added_path = folder / "added_tokens.json"
    if added_path.is_file():
        for key, tid in _load_json(added_path).items():
            if isinstance(tid, int) and 0 <= tid < size:
                tokens[tid], scores[tid], types[tid] = key, -1000.0, _USER_DEFINED
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        for key, data in _load_json(config_path).get("added_tokens_decoder", {}).items():
            tid, token = int(key), data["content"]
            if tid >= size:
                continue
            if data.get("special") or _looks_special(token):
                types[tid] = _CONTROL
            else:
                token = token.replace("\u2581", " ")
                types[tid] = _USER_DEFINED
            scores[tid], tokens[tid] = -1000.0, token
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    SpecialVocab(folder, load_merges=False, n_vocab=len(tokens)).add_to(w)


def check_tokenizer_kind(folder: Path, sentencepiece_only: bool = False
                         ) -> Callable[[gguf.GGUFWriter, int | None], None]:
    """Which of the converter's vocab paths applies to ``folder``: a ``tokenizer.model`` first (every family
    here tries it first; Gemma's only), else ``tokenizer.json``; refuse those not redone here."""
    if (folder / "tokenizer.model").is_file():
        return lambda w, vocab_size: add_sentencepiece_vocab(w, folder, vocab_size)
    if sentencepiece_only:
        raise InputError(f"{folder}: no tokenizer.model; llama.cpp's converter reads this family's SentencePiece "
                         "tokenizer from it")
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{folder}: no tokenizer.json or tokenizer.model; a GGUF file carries the tokenizer, so "
                         "the model folder needs its tokenizer files")
    tokenizer = _load_json(path)
    model = tokenizer.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        raise UnsupportedError(f"{path}: a SentencePiece-style BPE (byte_fallback) without its tokenizer.model, "
                               "which llama.cpp's converter reads through transformers; wsurgery does not "
                               "convert it (add the model's tokenizer.model)")
    return lambda w, vocab_size: add_gpt2_vocab(w, folder, vocab_size, tokenizer)
