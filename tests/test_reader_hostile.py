"""Hostile checkpoints: every one is read exactly as the formats define it, or refused in one line.

One test (or a few) per finding of a hostile-input campaign against the CLI. Refusals go through the
real command line and check the whole contract: exit 1, exactly one stderr line ``wsurgery: error:``,
no traceback, no OUT and no ``.OUT.wsurgery-*`` sibling, inputs byte-identical. Where the safetensors
library can judge a file, the test asserts that it refuses it too: we are not stricter or looser by
accident. Inputs that must work are judged by the merge of an intact copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from oracle import make_adapter, run_cli, save_base, tiny_llama

TENSOR = "model.norm.weight"  # a small float32 tensor of the tiny Llama


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model = tiny_llama()
    return SimpleNamespace(base=save_base(model, root / "base"),
                           sharded=save_base(model, root / "sharded", max_shard_size="30KB"),
                           lora=make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                                             root / "lora"))


@pytest.fixture
def work(assets, tmp_path):
    """Private copies of the bases and the adapter, an OUT that does not exist, and the intact merge."""
    w = SimpleNamespace(base=tmp_path / "base", sharded=tmp_path / "sharded", adapter=tmp_path / "adapter",
                        out=tmp_path / "out", tmp=tmp_path)
    for src, dst in ((assets.base, w.base), (assets.sharded, w.sharded), (assets.lora, w.adapter)):
        shutil.copytree(src, dst)
    w.index = w.sharded / "model.safetensors.index.json"
    w.shards = sorted(p.name for p in w.sharded.glob("*.safetensors"))
    assert len(w.shards) > 1, "the sharded base should have several shards"
    return w


def snapshot(*paths: Path) -> dict[str, str]:
    """What every entry under ``paths`` is, without following links or opening FIFOs."""
    state = {}
    for p in paths:
        for f in [p, *sorted(p.rglob("*"))] if p.is_dir() and not p.is_symlink() else [p]:
            if f.is_symlink():
                state[str(f)] = "-> " + os.readlink(f)
            elif f.is_fifo():
                state[str(f)] = "fifo"
            elif f.is_file():
                state[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return state


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("wsurgery: error:"), stderr
    assert "internal error" not in lines[0], lines[0]
    return lines[0]


def assert_refused(capsys, work, base: Path, names: list[object], *, extra: list[Path] = ()) -> str:
    """Merge ``base`` with the adapter; check the failure contract; return the error line."""
    before = snapshot(base, work.adapter, *extra)
    status, stdout, stderr = run_cli(["merge", base, work.adapter, work.out], capsys)
    assert status == 1, stderr
    line = one_error_line(stderr)
    for name in names:
        assert str(name) in line, f"the message does not name {name!r}: {line}"
    assert stdout == ""
    assert not work.out.exists() and not list(work.tmp.glob(".out.wsurgery-*"))
    assert snapshot(base, work.adapter, *extra) == before, "an input changed"
    return line


def merged(capsys, work, base: Path) -> dict[str, torch.Tensor]:
    status, _, stderr = run_cli(["merge", base, work.adapter, work.out, "--quiet"], capsys)
    assert status == 0, stderr
    tensors = {}
    for f in sorted(work.out.glob("*.safetensors")):
        tensors.update(load_file(f))
    shutil.rmtree(work.out)
    return tensors


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header_text: str, data: bytes) -> None:
    blob = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def library_refuses(path: Path) -> bool:
    try:
        with safetensors.safe_open(path, "pt") as f:
            f.metadata()
    except Exception:  # the library's errors have no common type
        return True
    return False


def with_entry(path: Path, name: str, text: str) -> None:
    """Replace tensor ``name``'s header entry by the JSON ``text``, as written (not re-encoded by json)."""
    header, data = split(path)
    parts = [f"{json.dumps(k)}:{text if k == name else json.dumps(v)}" for k, v in header.items()]
    write_raw(path, "{" + ",".join(parts) + "}", data)


# ---------------------------------------------------------------------------------------------
# 1. the safetensors header
# ---------------------------------------------------------------------------------------------

def test_header_nested_deeper_than_any_parser_goes(work, capsys):
    f = work.base / "model.safetensors"
    _, data = split(f)
    write_raw(f, "[" * 100_000, data)
    assert library_refuses(f)
    assert "JSON" in assert_refused(capsys, work, work.base, [f])


@pytest.mark.parametrize("number", ["Infinity", "1e400", "-Infinity", "NaN", "1" * 5000],
                         ids=["Infinity", "1e400", "-Infinity", "NaN", "5000 digits"])
def test_header_numbers_no_integer_can_hold(work, capsys, number):
    f = work.base / "model.safetensors"
    entry = split(f)[0][TENSOR]
    begin, _ = entry["data_offsets"]
    with_entry(f, TENSOR, json.dumps({**entry, "data_offsets": [begin, 0]}).replace(", 0]", f", {number}]"))
    assert library_refuses(f)
    assert_refused(capsys, work, work.base, [f])


def _first(header: dict) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


@pytest.mark.parametrize("case", ["shape 64.0", "shape '64'", "shape [true, 64]", "offset 0.0", "offset '0'",
                                  "offset -0"])
def test_header_integers_written_otherwise(work, capsys, case):
    """``int()`` used to coerce 64.0 and "64" (and True is 1 to Python); the format says unsigned integers."""
    f = work.base / "model.safetensors"
    header, _ = split(f)
    name = _first(header)  # its data begins at 0
    entry = header[name]
    (n, *rest), (_, end) = entry["shape"], entry["data_offsets"]
    rest = "".join(f", {d}" for d in rest)
    field, text = {"shape 64.0": ("shape", f"[{n}.0{rest}]"), "shape '64'": ("shape", f'["{n}"{rest}]'),
                   "shape [true, 64]": ("shape", f"[true, {n}{rest}]"), "offset 0.0": ("data_offsets", f"[0.0, {end}]"),
                   "offset '0'": ("data_offsets", f'["0", {end}]'), "offset -0": ("data_offsets", f"[-0, {end}]")}[case]
    with_entry(f, name, json.dumps({**entry, field: "@"}).replace('"@"', text))
    assert library_refuses(f)
    assert_refused(capsys, work, work.base, [f, name])


def test_header_metadata_values_not_strings(work, capsys):
    f = work.base / "model.safetensors"
    header, data = split(f)
    header["__metadata__"] = {"format": "pt", "step": 3}
    write_raw(f, json.dumps(header), data)
    assert library_refuses(f)
    assert "__metadata__" in assert_refused(capsys, work, work.base, [f])


def test_header_gap_between_tensors(work, capsys):
    """Every tensor after the first moved 8 bytes on, and 8 bytes added: in bounds, but a gap."""
    f = work.base / "model.safetensors"
    header, data = split(f)
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    for name, entry in header.items():
        if name not in ("__metadata__", first):
            entry["data_offsets"] = [o + 8 for o in entry["data_offsets"]]
    write_raw(f, json.dumps(header), data + bytes(8))
    assert library_refuses(f)
    assert "gap" in assert_refused(capsys, work, work.base, [f])


def test_header_trailing_bytes_after_the_last_tensor(work, capsys):
    f = work.base / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"appended")
    assert library_refuses(f)
    assert_refused(capsys, work, work.base, [f])


def test_header_tensor_named_twice(work, capsys):
    """The library keeps the last entry; other readers may keep the first: one file, two models. Refused."""
    f = work.base / "model.safetensors"
    header, data = split(f)
    text = json.dumps(header)
    write_raw(f, text[:-1] + f", {json.dumps(TENSOR)}: {json.dumps(header[TENSOR])}}}", data)
    assert not library_refuses(f)  # a deliberate difference
    assert "twice" in assert_refused(capsys, work, work.base, [f, TENSOR])


def test_header_length_message_shows_no_bytes_of_the_file(work, capsys):
    """A file that is not safetensors (here: a passwd line): its first 8 bytes read as a length are not shown."""
    f = work.base / "model.safetensors"
    text = b"root:x:0:0:root:/root:/bin/bash\n"
    f.write_bytes(text)
    line = assert_refused(capsys, work, work.base, [f])
    assert str(struct.unpack("<Q", text[:8])[0]) not in line and "root:" not in line and "/bin/bash" not in line


# ---------------------------------------------------------------------------------------------
# 2. FIFOs and other non-regular files
# ---------------------------------------------------------------------------------------------

def _cli_subprocess(*args) -> subprocess.CompletedProcess:
    """A real process with a deadline: a regression (a blocking open) fails the test instead of hanging it."""
    return subprocess.run([sys.executable, "-m", "wsurgery.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("name", ["model.safetensors", "model.safetensors.index.json"])
def test_fifo_in_the_folder_is_refused_without_blocking(work, name):
    (work.base / "model.safetensors").unlink()
    fifo = work.base / name
    os.mkfifo(fifo)
    before = snapshot(work.base, work.adapter)
    r = _cli_subprocess("merge", work.base, work.adapter, work.out)
    assert r.returncode == 1, r.stderr
    line = one_error_line(r.stderr)
    assert str(fifo) in line and "regular file" in line
    assert not work.out.exists() and snapshot(work.base, work.adapter) == before


def test_fifo_named_directly_is_refused(work, capsys):
    fifo = work.tmp / "direct.safetensors"
    os.mkfifo(fifo)
    status, _, stderr = run_cli(["inspect", fifo], capsys)
    line = one_error_line(stderr)
    assert status == 1 and str(fifo) in line and "regular file" in line


# ---------------------------------------------------------------------------------------------
# 3. the index: shard names spelled otherwise, folders, garbage
# ---------------------------------------------------------------------------------------------

def _rewrite_index(work, rename) -> None:
    index = json.loads(work.index.read_text())
    index["weight_map"] = {t: rename(t, s) for t, s in index["weight_map"].items()}
    work.index.write_text(json.dumps(index))


def test_index_shards_named_with_dot_slash_and_in_a_subfolder(work, capsys):
    expected = merged(capsys, work, work.sharded)
    last = work.shards[-1]
    (work.sharded / "sub").mkdir()
    (work.sharded / last).rename(work.sharded / "sub" / last)
    _rewrite_index(work, lambda t, s: f"sub/{s}" if s == last else f"./{s}")
    assert_same(merged(capsys, work, work.sharded), expected)


def test_index_one_shard_named_two_ways_is_one_shard(work, capsys):
    expected = merged(capsys, work, work.sharded)
    tensors = sorted(json.loads(work.index.read_text())["weight_map"])
    _rewrite_index(work, lambda t, s: f"./{s}" if tensors.index(t) % 2 else s)
    spellings = set(json.loads(work.index.read_text())["weight_map"].values())
    assert any({s, f"./{s}"} <= spellings for s in work.shards), "no shard is named both ways"
    assert_same(merged(capsys, work, work.sharded), expected)


@pytest.mark.parametrize("value", [".", "./", "sub", "sub/..", ""])
def test_index_shard_that_is_not_a_file(work, capsys, value):
    (work.sharded / "sub").mkdir()
    _rewrite_index(work, lambda t, s: value if t == TENSOR else s)
    assert_refused(capsys, work, work.sharded, [work.index])


@pytest.mark.parametrize("text", ["[" * 100_000, "[]", '"weight_map"', '{"weight_map": []}', '{"weight_map": {}}',
                                  '{"weight_map": {"a": 1}}', '{"weight_map": {"a": "x\\u0000y"}}',
                                  '{"weight_map": {"a": "x"}, "weight_map": {"a": "y"}}', "\xff\xfe{}"],
                         ids=["nested 100000 deep", "a list", "a string", "weight_map a list", "weight_map empty",
                              "shard a number", "shard with a NUL", "weight_map twice", "not UTF-8"])
def test_index_garbage(work, capsys, text):
    work.index.write_bytes(text.encode("latin-1"))
    assert_refused(capsys, work, work.sharded, [work.index])


# ---------------------------------------------------------------------------------------------
# 4. links out of the checkpoint folder
# ---------------------------------------------------------------------------------------------

def test_index_shard_linked_outside_the_folder(work, capsys):
    shard = work.sharded / work.shards[0]
    outside = work.tmp / "private.safetensors"
    shard.rename(outside)  # a valid safetensors file: only the link is wrong
    shard.symlink_to(outside)
    line = assert_refused(capsys, work, work.sharded, [work.index, work.shards[0]], extra=[outside])
    assert "outside" in line


def test_single_file_linked_outside_the_folder(work, capsys):
    f = work.base / "model.safetensors"
    outside = work.tmp / "private.safetensors"
    f.rename(outside)
    f.symlink_to(outside)
    line = assert_refused(capsys, work, work.base, [f], extra=[outside])
    assert "outside" in line
    status, _, stderr = run_cli(["inspect", f], capsys)  # named directly: the same rule
    assert status == 1 and "outside" in one_error_line(stderr)


def test_adapter_weights_linked_outside_the_folder(work, capsys):
    f = work.adapter / "adapter_model.safetensors"
    outside = work.tmp / "private-adapter.safetensors"
    f.rename(outside)
    f.symlink_to(outside)
    line = assert_refused(capsys, work, work.base, [f], extra=[outside])
    assert "outside" in line


def test_link_inside_the_folder_is_fine(work, capsys):
    expected = merged(capsys, work, work.base)
    f = work.base / "model.safetensors"
    (work.base / "weights").mkdir()
    f.rename(work.base / "weights" / "real.safetensors")
    f.symlink_to(Path("weights") / "real.safetensors")
    assert_same(merged(capsys, work, work.base), expected)


def _hub_cache(work, blobs_of: str = "repo") -> Path:
    """The base laid out as huggingface_hub's cache does: snapshots/<rev>/<file> -> ../../blobs/<sha256>."""
    repo = work.tmp / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    blobs = work.tmp / "hub" / blobs_of / "blobs" if blobs_of != "repo" else repo / "blobs"
    blobs.mkdir(parents=True)
    for f in work.base.iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_hub_cache_layout_is_recognised(work, capsys):
    expected = merged(capsys, work, work.base)
    assert_same(merged(capsys, work, _hub_cache(work)), expected)


def test_hub_cache_lookalike_pointing_at_another_folders_blobs(work, capsys):
    snap = _hub_cache(work, blobs_of="models--other--repo")
    line = assert_refused(capsys, work, snap, [snap / "model.safetensors"], extra=[work.tmp / "hub"])
    assert "outside" in line


# ---------------------------------------------------------------------------------------------
# 5. GGUF headers (the fuzz tests in test_fuzz_parsers.py cover many more)
# ---------------------------------------------------------------------------------------------

def _gguf(kvs: bytes, n_kv: int, infos: bytes = b"", n_tensors: int = 0, data: bytes = b"") -> bytes:
    """A GGUF file packed by hand from the spec (magic, version 3, counts, key/values, tensor infos)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + infos
    return head + bytes(-len(head) % 32) + data


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


def _kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<II", 4, value)


def _info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return _s(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims) + struct.pack("<IQ", ggml_type, offset)


ARCH = _kv_str("general.architecture", "llama")
GGUF_CASES = {
    "key/value count past the file": _gguf(ARCH, 2**63),
    "tensor count past the file": _gguf(ARCH, 1, n_tensors=2**62),
    "string length past the file": _gguf(_s("general.architecture") + struct.pack("<IQ", 8, 2**64 - 1), 1),
    "unknown value type": _gguf(_s("general.architecture") + struct.pack("<I", 99), 1),
    "arrays nested 10000 deep": _gguf(ARCH + _s("x") + struct.pack("<I", 9)
                                      + struct.pack("<IQ", 9, 1) * 10_000 + struct.pack("<IQ", 4, 0), 2),
    "array of 2^60 strings": _gguf(ARCH + _s("x") + struct.pack("<IIQ", 9, 8, 2**60), 2),
    "nine dimensions": _gguf(ARCH, 1, _info("output_norm.weight", [1] * 9), 1),
    "dimensions of 2^63": _gguf(ARCH, 1, _info("output_norm.weight", [2**63, 2**63]), 1, bytes(32)),
    "offset past the end": _gguf(ARCH, 1, _info("output_norm.weight", [4], offset=2**40), 1, bytes(32)),
    "offset not aligned": _gguf(ARCH, 1, _info("output_norm.weight", [4], offset=4), 1, bytes(64)),
    "alignment not a power of two": _gguf(ARCH + _kv_u32("general.alignment", 24), 2),
    "block_count above the tensor count": _gguf(ARCH + _kv_u32("llama.block_count", 5000), 2,
                                                _info("output_norm.weight", [4]), 1, bytes(32)),
    "head count 0 for a Q weight": _gguf(ARCH + _kv_u32("llama.block_count", 1)
                                         + _kv_u32("llama.attention.head_count", 0),
                                         3, _info("blk.0.attn_q.weight", [4, 4]), 1, bytes(64)),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_garbage_is_one_line(work, capsys, case):
    f = work.tmp / "hostile.gguf"
    f.write_bytes(GGUF_CASES[case])
    before = snapshot(f)
    status, stdout, stderr = run_cli(["dequantize", f, work.out], capsys)  # reads every tensor
    assert status == 1 and stdout == "" and str(f) in one_error_line(stderr)
    assert not work.out.exists() and snapshot(f) == before


# ---------------------------------------------------------------------------------------------
# the reader's own neighbours: config.json and the side files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["[" * 100_000, "[1, 2]", "1" * 5000], ids=["nested 100000 deep", "a list",
                                                                         "5000 digits"])
def test_config_garbage_is_one_line(work, capsys, text):
    config = work.base / "config.json"
    config.write_text(text)
    assert_refused(capsys, work, work.base, [config])


def test_side_files_copied_for_a_checkpoint_without_metadata(work, capsys):
    """A header without ``__metadata__`` (safetensors' own save_file writes none) is still a model folder."""
    f = work.base / "model.safetensors"
    header, data = split(f)
    del header["__metadata__"]
    write_raw(f, json.dumps(header), data)
    status, _, stderr = run_cli(["merge", work.base, work.adapter, work.out, "--quiet"], capsys)
    assert status == 0, stderr
    base_config = json.loads((work.base / "config.json").read_text())
    out_config = json.loads((work.out / "config.json").read_text())  # the copy may record more (provenance)
    assert base_config.items() <= out_config.items()
