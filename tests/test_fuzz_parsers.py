"""Property-based tests of the parsers that read untrusted files: each input parses or is refused with
``WsurgeryError`` (one line), never another exception.

Inputs are generated (headers built from random tensors, layouts and spellings) and mutated (valid
files with bytes flipped, cut, inserted, or JSON tokens replaced). The safetensors header parser is
also judged against the safetensors library itself: it refuses exactly what the library refuses,
apart from the deliberate differences listed in ``deliberately_refused``; where both accept, both
read the same tensors. The GGUF header parser is judged against gguf's ``GGUFReader`` on generated
valid files. Deterministic (``derandomize``) and bounded to a few seconds each; run with ``-s`` to
see how many inputs were tried.
"""

from __future__ import annotations

import json
import re
import struct
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from wsurgery.checkpoint import open_checkpoint, read_header
from wsurgery.checkpoint.dtypes import SAFETENSORS_TO_TORCH
from wsurgery.checkpoint.gguf_header import read_header as read_gguf_header
from wsurgery.errors import WsurgeryError

TRIED: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()  # safetensors: how the library and we judged


def fuzz(n: int):
    return settings(derandomize=True, deadline=None, max_examples=n, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print(f"\nfuzz inputs tried: {dict(TRIED)}, total {sum(TRIED.values())}; safetensors: {dict(OUTCOMES)}")


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# ---------------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------------

#: The dtype names the safetensors crate knows (its error message lists them), and its element sizes.
LIB_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
              "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8}
NAMES = st.sampled_from(["a", "b", "w.weight", "__metadata__", "", "é", "x" * 40])
LIB_DTYPE = st.sampled_from(sorted(LIB_DTYPES))
DTYPES = st.sampled_from(sorted(LIB_DTYPES) * 3 + ["f32", "F33", "F4", "", "I128"])
SHAPES = st.lists(st.integers(0, 5), max_size=3)


@st.composite
def safetensors_files(draw, exact: bool = False) -> bytes:
    """A file from random tensors: laid out exactly, or with one thing wrong; spelled in varied JSON.
    ``exact``: every tensor of a dtype the library knows, laid out exactly, a valid __metadata__."""
    tensors = draw(st.lists(st.tuples(NAMES, LIB_DTYPE if exact else DTYPES, SHAPES), max_size=5,
                            unique_by=(lambda t: t[0]) if exact else None))
    order = draw(st.permutations(range(len(tensors))))
    entries, pos = [], 0
    offsets = {}
    for i in order:
        _, dtype, shape = tensors[i]
        n = int(np.prod(shape)) * LIB_DTYPES.get(dtype, 4)
        offsets[i] = [pos, pos + n]
        pos += n
    defect = "none" if exact else draw(st.sampled_from(["none"] * 12 + ["shift", "shrink", "grow", "swap",
                                                                        "trailing", "short", "negative", "huge"]))
    if tensors and defect in ("shift", "shrink", "grow", "negative", "huge"):
        i, k = draw(st.integers(0, len(tensors) - 1)), draw(st.integers(0, 1))
        offsets[i][k] = {"shift": offsets[i][k] + draw(st.integers(1, 9)), "shrink": offsets[i][k] - 1,
                         "grow": offsets[i][k] + 1, "negative": -1, "huge": 2**64}[defect]
    if len(tensors) > 1 and defect == "swap":
        offsets[0], offsets[1] = offsets[1], offsets[0]
    data_len = pos + {"trailing": 3, "short": -1}.get(defect, 0)
    for i, (name, dtype, shape) in enumerate(tensors):
        entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets[i]}
        if draw(st.integers(0, 9)) == 0:
            entry["extra"] = draw(st.sampled_from([1, "x", [1, [2]], {"k": None}, -5]))
        entries.append((name, entry))
    metas = [None, "absent", {"format": "pt"}, {}] + ([] if exact else [{"k": 1}, [], "x"])
    meta = draw(st.sampled_from(metas))
    if meta != "absent" and (exact or draw(st.booleans())):
        entries.insert(draw(st.integers(0, len(entries))), ("__metadata__", meta))
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (",\n", " :\t")]))
    text = "{" + sep[0].join(json.dumps(k) + sep[1] + json.dumps(v, separators=sep) for k, v in entries) + "}"
    text += " " * draw(st.integers(0, 7))
    blob = text.encode()
    n = len(blob) + (0 if exact else draw(st.sampled_from([0] * 16 + [-1, 1, 2**40])))
    data = bytes([draw(st.integers(0, 255))]) * max(data_len, 0)
    return struct.pack("<Q", max(n, 0)) + blob + data


#: JSON tokens a mutation may put in place of a number, a string or a bracket.
TOKENS = ["1.0", "-1", "-0", "1e400", "NaN", "Infinity", '"1"', "true", "null", "[", "]", "{", "}", ",", '"\\ud800"',
          "[" * 200, "18446744073709551616", "18446744073709551615", '"a"', '"__metadata__"', "9" * 400, ""]


@st.composite
def mutated_safetensors(draw) -> bytes:
    """A valid file (from the generator above, laid out exactly) with its header text or bytes damaged."""
    raw = draw(safetensors_files(exact=True))
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8:8 + n], raw[8 + n:]
    kind = draw(st.sampled_from(["token", "token", "token", "flip", "cut", "insert", "length"]))
    if kind == "token" and header:
        spans = [m.span() for m in re.finditer(rb'-?\d+|"[^"]*"|[\[\]{},:]', header)]
        if spans:
            a, b = draw(st.sampled_from(spans))
            header = header[:a] + draw(st.sampled_from(TOKENS)).encode() + header[b:]
        return struct.pack("<Q", len(header)) + header + data
    raw = bytearray(raw)
    if kind == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "cut":
        del raw[draw(st.integers(0, len(raw))):]
    elif kind == "insert":
        i = draw(st.integers(0, len(raw)))
        raw[i:i] = draw(st.binary(min_size=1, max_size=4))
    elif kind == "length":
        raw[0:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(raw)


def library_judges(raw: bytes) -> list | None:
    """The safetensors library's reading of a whole file: [(name, dtype, shape, bytes)], or None if it refuses."""
    try:
        return sorted((name, t["dtype"], t["shape"], bytes(t["data"])) for name, t in safetensors.deserialize(raw))
    except Exception:
        return None


def deliberately_refused(raw: bytes) -> bool:
    """What we refuse on purpose though the library reads it (read_header's docstring says why): a key
    repeated in one JSON object; a tensor entry that is not an object or whose dtype is not a string;
    a dtype torch has no equivalent for."""
    (n,) = struct.unpack("<Q", raw[:8])
    repeated = []

    def pairs(items):
        if len({k for k, _ in items}) != len(items):
            repeated.append(True)
        return dict(items)

    header = json.loads(raw[8:8 + n].decode(), object_pairs_hook=pairs)
    entries = [v for k, v in header.items() if k != "__metadata__"]
    return bool(repeated) or any(not isinstance(e, dict) or not isinstance(e.get("dtype"), str)
                                 or e["dtype"] not in SAFETENSORS_TO_TORCH for e in entries)


def ours_judges(raw: bytes, path: Path) -> list | None:
    path.write_bytes(raw)
    try:
        infos, _ = read_header(path)
    except WsurgeryError as e:
        assert "\n" not in str(e)
        return None
    with open(path, "rb") as f:
        out = []
        for name, info in infos.items():
            f.seek(info.offset)
            out.append((name, next(k for k, v in SAFETENSORS_TO_TORCH.items() if v == info.dtype), list(info.shape),
                        f.read(info.nbytes)))
    return sorted(out)


def _judge_safetensors(raw: bytes, path: Path, what: str) -> None:
    TRIED[what] += 1
    ours, lib = ours_judges(raw, path), library_judges(raw)
    if lib is None:
        assert ours is None, "the library refuses this file but we read it"
        OUTCOMES[f"{what}: both refuse"] += 1
    elif ours is None:
        assert deliberately_refused(raw), "we refuse a file the library reads"
        OUTCOMES[f"{what}: refused on purpose, read by the library"] += 1
    else:
        assert ours == lib, "we read other tensors than the library"
        OUTCOMES[f"{what}: both read, the same tensors"] += 1


@fuzz(400)
@given(raw=safetensors_files())
def test_safetensors_generated_headers_match_the_library(raw, scratch):
    _judge_safetensors(raw, scratch / "g.safetensors", "safetensors generated")


@fuzz(600)
@given(raw=mutated_safetensors())
def test_safetensors_mutated_headers_match_the_library(raw, scratch):
    _judge_safetensors(raw, scratch / "m.safetensors", "safetensors mutated")


@fuzz(60)
@given(depth=st.integers(100, 140), where=st.sampled_from(["extra", "metadata", "top"]))
def test_safetensors_nesting_limit_matches_the_library(depth, where, scratch):
    """serde_json stops at 128 levels; so do we, wherever the nesting is."""
    nest = "[" * depth + "]" * depth
    tensor = '"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]'
    text = {"extra": "{" + tensor + ',"x":' + nest + "}}",
            "metadata": '{"__metadata__":{"k":' + nest + "}," + tensor + "}}",
            "top": nest}[where]
    _judge_safetensors(struct.pack("<Q", len(text)) + text.encode() + b"\0", scratch / "d.safetensors",
                       "safetensors nesting")


# ---------------------------------------------------------------------------------------------
# the index reader
# ---------------------------------------------------------------------------------------------

SHARDS = {"model-00001-of-00002.safetensors": ["a", "b"], "model-00002-of-00002.safetensors": ["c"]}


@pytest.fixture(scope="module")
def sharded(scratch):
    import torch

    folder = scratch / "sharded"
    (folder / "sub").mkdir(parents=True)
    for shard, names in SHARDS.items():
        save_file({n: torch.full((2,), float(i)) for i, n in enumerate(names)}, folder / shard)
    return folder


def _spellings(shard: str) -> st.SearchStrategy[str]:
    return st.sampled_from([shard, "./" + shard, "sub/../" + shard, ".//" + shard, "./sub/../" + shard])


@st.composite
def good_indexes(draw) -> dict:
    """Every tensor mapped to its own shard, spelled any legal way."""
    return {"metadata": {"total_size": 24}, "weight_map": {t: draw(_spellings(s)) for s, ts in SHARDS.items()
                                                          for t in ts}}


SHARD_VALUES = st.one_of(st.sampled_from(sorted(SHARDS)).flatmap(_spellings),
                         st.sampled_from([".", "..", "/", "", "sub", "sub/", "../x.safetensors", "/etc/passwd",
                                          "a\u0000b", "missing.safetensors", "x" * 300,
                                          "model-00001-of-00002.safetensors/x"]),
                         st.integers(), st.none(), st.lists(st.integers(), max_size=2))


@st.composite
def bad_indexes(draw) -> str:
    kind = draw(st.sampled_from(["values", "shape", "text"]))
    if kind == "values":
        wm = draw(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), SHARD_VALUES, max_size=4))
        return json.dumps({"weight_map": wm})
    if kind == "shape":
        return json.dumps(draw(st.sampled_from([[], {}, {"weight_map": []}, {"weight_map": None}, "x", 1,
                                                {"weight_map": {"a": {"b": 1}}}])))
    text = json.dumps(draw(good_indexes()))
    i = draw(st.integers(0, len(text)))
    return text[:i] + draw(st.sampled_from(TOKENS + ["\x00", "[" * 5000])) + text[i + draw(st.integers(0, 3)):]


@fuzz(150)
@given(index=good_indexes())
def test_index_shard_spellings_all_read_the_same(index, sharded):
    TRIED["index generated"] += 1
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = open_checkpoint(sharded)
    expected = {t: sharded / s for s, ts in SHARDS.items() for t in ts}
    assert {n: info.file for n, info in ckpt.tensors.items()} == expected
    assert ckpt.shards == [sharded / s for s in SHARDS]  # in order of first mention


@fuzz(300)
@given(text=bad_indexes())
def test_index_garbage_is_read_or_refused(text, sharded):
    TRIED["index mutated"] += 1
    (sharded / "model.safetensors.index.json").write_text(text, errors="surrogatepass")
    try:
        open_checkpoint(sharded)
    except WsurgeryError as e:
        assert "\n" not in str(e)


# ---------------------------------------------------------------------------------------------
# GGUF headers
# ---------------------------------------------------------------------------------------------

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


@st.composite
def gguf_values(draw, depth: int = 0) -> tuple[int, bytes, object]:
    """(type, packed value, python value) of one GGUF value; arrays may nest."""
    vtype = draw(st.sampled_from(sorted(_SCALAR) + [8, 9] if depth < 2 else sorted(_SCALAR) + [8]))
    if vtype == 8:
        text = draw(st.text(max_size=6))
        return vtype, _s(text), text
    if vtype == 9:
        item = draw(st.sampled_from([4, 8, 9] if depth < 1 else [4, 8]))
        count = draw(st.integers(0, 3))
        values = [draw(gguf_values(depth + 1).filter(lambda v, t=item: v[0] == t)) for _ in range(count)]
        return vtype, struct.pack("<IQ", item, len(values)) + b"".join(v[1] for v in values), None
    fmt = _SCALAR[vtype]
    value = {"<?": st.booleans(), "<f": st.just(1.5), "<d": st.just(-2.0)}.get(fmt, st.integers(0, 100))
    v = draw(value)
    return vtype, struct.pack(fmt, v), v


@st.composite
def gguf_files(draw) -> bytes:
    """A valid GGUF file: llama key/values, random extra ones, F32 tensors laid out aligned."""
    names = draw(st.lists(st.sampled_from(["output_norm.weight", "token_embd.weight", "blk.0.ffn_up.weight",
                                           "output.weight"]), unique=True, max_size=3))
    blocks = int("blk.0.ffn_up.weight" in names)
    kvs = [("general.architecture", 8, _s("llama")), ("llama.block_count", 4, struct.pack("<I", blocks))]
    for i in range(draw(st.integers(0, 4))):
        vtype, packed, _ = draw(gguf_values())
        kvs.append((f"k{i}", vtype, packed))
    infos, data = b"", b""
    for name in names:
        dims = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
        infos += _s(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims) + struct.pack("<IQ", 0, len(data))
        data += bytes(4 * int(np.prod(dims)))
        data += bytes(-len(data) % 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(names), len(kvs))
    head += b"".join(_s(k) + struct.pack("<I", t) + v for k, t, v in kvs) + infos
    return head + bytes(-len(head) % 32) + data


@st.composite
def mutated_gguf(draw) -> bytes:
    raw = bytearray(draw(gguf_files()))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "u64", "u32", "insert"]))
        i = draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del raw[i:]
        elif kind == "u64":
            raw[i:i + 8] = struct.pack("<Q", draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1])))
        elif kind == "u32":
            raw[i:i + 4] = struct.pack("<I", draw(st.sampled_from([0, 7, 9, 13, 99, 2**32 - 1])))
        else:
            raw[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


def _open_or_refuse(raw: bytes, path: Path) -> None:
    path.write_bytes(raw)
    for reader in (read_gguf_header, open_checkpoint):
        try:
            reader(path)
        except WsurgeryError as e:
            assert "\n" not in str(e)


@fuzz(150)
@given(raw=gguf_files())
def test_gguf_generated_headers_read_as_gguf_reads_them(raw, scratch):
    TRIED["gguf generated"] += 1
    path = scratch / "g.gguf"
    path.write_bytes(raw)
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(path)
    assert [e.key for e in header.key_values] == [k for k in reader.fields if not k.startswith("GGUF.")]
    for e in header.key_values:
        if e.value is not None:
            assert e.value == reader.fields[e.key].contents()
    assert [(t.name, t.shape, t.offset) for t in header.tensors] == \
        [(t.name, tuple(int(d) for d in reversed(t.shape)), int(t.data_offset)) for t in reader.tensors]
    open_checkpoint(path)


@fuzz(700)
@given(raw=mutated_gguf())
def test_gguf_mutated_headers_are_read_or_refused(raw, scratch):
    TRIED["gguf mutated"] += 1
    _open_or_refuse(raw, scratch / "m.gguf")


@fuzz(50)
@given(raw=st.binary(max_size=64), prefix=st.booleans())
def test_gguf_random_bytes_are_refused(raw, prefix, scratch):
    TRIED["gguf random"] += 1
    _open_or_refuse((b"GGUF\x03\x00\x00\x00" if prefix else b"") + raw, scratch / "r.gguf")
