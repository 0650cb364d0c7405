"""Bad input must fail cleanly: one line on stderr, non-zero exit, nothing written, inputs untouched.

Every refusal goes through the real command line (``wsurgery.cli.main``, in-process, and once as a
real subprocess) and checks the same contract:

* exit status non-zero;
* stderr is exactly one line, ``wsurgery: error: ...``, naming the offending file or tensor;
* no Python traceback;
* OUT does not exist and no ``.OUT.wsurgery-*`` temporary sibling is left behind;
* every input file is byte-for-byte unchanged.

The end of the file checks the other side: the base/adapter dtype combinations PEFT supports all
merge, and match PEFT's own ``merge_and_unload``.
"""

from __future__ import annotations

import errno
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
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from oracle import run_cli
from oracle import assert_close_to, load_all, make_adapter, oracle_merge, save_base, tiny_llama

import wsurgery.checkpoint.safetensors_file as st_file
from wsurgery.errors import InputError

import wsurgery.engine as engine

TARGETS = ["q_proj", "v_proj"]
LAYERS = 2


# ---------------------------------------------------------------------------------------------
# fixtures: one tiny Llama, saved whole and sharded, and a few adapters; each test copies what it
# needs into its own tmp_path before damaging it
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("assets")
    model = tiny_llama()
    base = save_base(model, root / "base")
    sharded = save_base(model, root / "sharded", max_shard_size="30KB")
    lora = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), root / "lora")
    dora = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
                        root / "dora")
    mts = make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                       root / "mts")
    assert len(list(sharded.glob("*.safetensors"))) > 1, "the sharded base should have several shards"
    return SimpleNamespace(base=base, sharded=sharded, lora=lora, dora=dora, mts=mts)


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def work(assets, tmp_path):
    """Private copies of the base and the LoRA adapter, and an OUT path that does not exist."""
    return SimpleNamespace(base=copy_of(assets.base, tmp_path / "base"),
                           adapter=copy_of(assets.lora, tmp_path / "adapter"),
                           out=tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------



def screen_lines(text: str) -> list[str]:
    """The non-blank lines a terminal would show: within a line, a carriage return goes back to the
    start of the line, so only what is written after the last one remains visible (progress bars)."""
    shown = []
    for line in text.split("\n"):
        visible = line.rsplit("\r", 1)[-1].rstrip()
        if visible:
            shown.append(visible)
    return shown


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders), by path."""
    digests = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            digests[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    assert digests, f"nothing to snapshot under {paths}"
    return digests


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.wsurgery-*"))


def assert_refused(capsys, args, out: Path, inputs: list[Path], names: list[str], *,
                   code: int = 1, prefix: str = "wsurgery: error:") -> str:
    """Run ``args`` and check the whole failure contract; return the error line."""
    before = snapshot(*inputs)
    status, stdout, stderr = run_cli(args, capsys)
    assert status == code, f"exit status {status}, expected {code}; stderr: {stderr!r}"
    assert "Traceback" not in stderr, stderr
    lines = screen_lines(stderr)
    assert len(lines) == 1, f"expected exactly one line on stderr, got {lines!r}"
    line = lines[0]
    assert line.startswith(prefix), line
    for name in names:
        assert str(name) in line, f"the message does not name {name!r}: {line}"
    assert stdout == "", stdout
    assert not out.exists(), f"{out} was created"
    assert leftovers(out) == [], f"temporary folders left behind: {leftovers(out)}"
    assert snapshot(*inputs) == before, "an input file was modified"
    return line


def merge_args(base, adapter, out, *extra):
    return ["merge", base, adapter, out, *extra]


def rewrite_safetensors_header(path: Path, edit) -> None:
    """Replace the JSON header of a safetensors file by ``edit(header)``, keeping the data section."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    blob = json.dumps(edit(header)).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def save_adapter_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors",
              metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    path.write_text(json.dumps(config))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


# ---------------------------------------------------------------------------------------------
# the adapter folder
# ---------------------------------------------------------------------------------------------

def test_missing_adapter_config(work, capsys):
    (work.adapter / "adapter_config.json").unlink()
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   [work.adapter, "adapter_config.json"])


def test_malformed_adapter_config(work, capsys):
    (work.adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,, garbage\n]]')
    line = assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out,
                          [work.base, work.adapter], [work.adapter / "adapter_config.json"])
    assert "JSON" in line


def test_adapter_config_not_an_object(work, capsys):
    (work.adapter / "adapter_config.json").write_text('["LORA"]')
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   [work.adapter / "adapter_config.json"])


def test_adapter_config_without_peft_type(work, capsys):
    edit_config(work.adapter, peft_type=None)
    line = assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out,
                          [work.base, work.adapter], [work.adapter / "adapter_config.json"])
    assert "peft_type" in line


def test_unknown_peft_type(work, capsys):
    edit_config(work.adapter, peft_type="FOO")
    line = assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out,
                          [work.base, work.adapter], [work.adapter / "adapter_config.json", "FOO"])
    assert "LORA" in line  # says what is supported


def test_non_mergeable_peft_type(work, capsys):
    edit_config(work.adapter, peft_type="PROMPT_TUNING")
    line = assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out,
                          [work.base, work.adapter], [work.adapter / "adapter_config.json", "PROMPT_TUNING"])
    assert "virtual tokens" in line  # the reason, not just a refusal


def test_missing_adapter_weights(work, capsys):
    (work.adapter / "adapter_model.safetensors").unlink()
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   [work.adapter, "adapter_model.safetensors"])


def test_truncated_adapter_weights(work, capsys):
    f = work.adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter], [f])


def test_adapter_targets_module_not_in_base(work, capsys):
    tensors = adapter_tensors(work.adapter)
    for suffix in ("lora_A.weight", "lora_B.weight"):
        tensors[f"base_model.model.model.layers.0.self_attn.nonexistent_proj.{suffix}"] = tensors.pop(f"{Q0}.{suffix}")
    save_adapter_tensors(work.adapter, tensors)
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   ["model.layers.0.self_attn.nonexistent_proj", work.adapter])


def test_shape_mismatch(work, capsys):
    tensors = adapter_tensors(work.adapter)
    b = tensors[f"{Q0}.lora_B.weight"]
    tensors[f"{Q0}.lora_B.weight"] = torch.randn(b.shape[0] + 8, b.shape[1])  # wrong out dim
    save_adapter_tensors(work.adapter, tensors)
    line = assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out,
                          [work.base, work.adapter], ["model.layers.0.self_attn.q_proj"])
    assert "[40, 32]" in line and "[32, 32]" in line  # both shapes are shown


def test_rank_mismatch_inside_adapter(work, capsys):
    tensors = adapter_tensors(work.adapter)
    a = tensors[f"{Q0}.lora_A.weight"]
    tensors[f"{Q0}.lora_A.weight"] = torch.randn(a.shape[0] + 1, a.shape[1])
    save_adapter_tensors(work.adapter, tensors)
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   ["model.layers.0.self_attn.q_proj", work.adapter])


def test_adapter_missing_half_of_a_pair(work, capsys):
    tensors = adapter_tensors(work.adapter)
    del tensors[f"{Q0}.lora_B.weight"]
    save_adapter_tensors(work.adapter, tensors)
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   ["model.layers.0.self_attn.q_proj", "lora_B.weight"])


@pytest.mark.parametrize("junk_key, named", [
    # a full tensor for a module the base lacks
    ("base_model.model.junk_module.weight", "junk_module"),
    # a parameter of a module the base has, but one the base module lacks
    (f"{Q0}.junk_param", "q_proj.junk_param"),
    # a parameter of a LoRA pair that no method uses
    (f"{Q0}.lora_A.junk", "lora_A.junk"),
    # a LoRA-like name that is not one
    (f"{Q0}.lora_C.weight", "lora_C"),
])
def test_adapter_tensor_mapping_to_nothing_is_an_error(work, capsys, junk_key, named):
    tensors = adapter_tensors(work.adapter)
    tensors[junk_key] = torch.randn(4, 32)
    save_adapter_tensors(work.adapter, tensors)
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   [named])


# ---------------------------------------------------------------------------------------------
# the base checkpoint: safetensors files
# ---------------------------------------------------------------------------------------------

def test_truncated_base(work, capsys):
    f = work.base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    line = assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out,
                          [work.base, work.adapter], [f])
    assert "truncated" in line


def test_base_shorter_than_header_length(work, capsys):
    f = work.base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5])
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter], [f])


def test_huge_header_length(work, capsys):
    f = work.base / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter], [f])


def test_header_json_garbage(work, capsys):
    f = work.base / "model.safetensors"
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8:8 + n] = (b"\xff{not json at all" * n)[:n]
    f.write_bytes(bytes(raw))
    line = assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out,
                          [work.base, work.adapter], [f])
    assert "JSON" in line


def test_header_not_an_object(work, capsys):
    f = work.base / "model.safetensors"
    rewrite_safetensors_header(f, lambda h: [1, 2, 3])
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter], [f])


def test_header_entry_malformed(work, capsys):
    f = work.base / "model.safetensors"

    def edit(h):
        del h["model.norm.weight"]["data_offsets"]
        return h
    rewrite_safetensors_header(f, edit)
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   [f, "model.norm.weight"])


def test_header_unknown_dtype(work, capsys):
    f = work.base / "model.safetensors"

    def edit(h):
        h["model.norm.weight"]["dtype"] = "F33"
        return h
    rewrite_safetensors_header(f, edit)
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   [f, "model.norm.weight", "F33"])


def test_offsets_past_end_of_file(work, capsys):
    f = work.base / "model.safetensors"

    def edit(h):
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        b, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [b + 4096, e + 4096]  # consistent with the shape, but past the end
        edit.name = last
        return h
    rewrite_safetensors_header(f, edit)
    line = assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out,
                          [work.base, work.adapter], [f, edit.name])
    assert "truncated" in line or "end" in line


def test_offsets_inconsistent_with_shape(work, capsys):
    f = work.base / "model.safetensors"
    name = "model.layers.0.self_attn.q_proj.weight"

    def edit(h):
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b, e - 4]  # one float32 short of 32x32
        return h
    rewrite_safetensors_header(f, edit)
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   [f, name])


def test_wrong_shape_in_header(work, capsys):
    f = work.base / "model.safetensors"
    name = "model.layers.1.mlp.up_proj.weight"

    def edit(h):
        h[name]["shape"] = [48, 33]
        return h
    rewrite_safetensors_header(f, edit)
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   [f, name])


def test_overlapping_tensors(work, capsys):
    f = work.base / "model.safetensors"
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"

    def edit(h):
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
        return h
    rewrite_safetensors_header(f, edit)
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   [f, a, b])


# ---------------------------------------------------------------------------------------------
# the base checkpoint: sharded layout and index
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def sharded(assets, tmp_path):
    folder = copy_of(assets.sharded, tmp_path / "sharded")
    index = folder / "model.safetensors.index.json"
    return SimpleNamespace(folder=folder, index=index, data=json.loads(index.read_text()),
                           adapter=copy_of(assets.lora, tmp_path / "adapter"), out=tmp_path / "out")


def test_sharded_base_merges(sharded, capsys):
    """The control for the index tests below: the intact sharded base merges fine."""
    code, _, err = run_cli(merge_args(sharded.folder, sharded.adapter, sharded.out, "--quiet"), capsys)
    assert code == 0, err
    assert sorted(p.name for p in sharded.out.glob("*.safetensors")) == \
        sorted(p.name for p in sharded.folder.glob("*.safetensors"))


def test_index_names_missing_shard(sharded, capsys):
    name = next(iter(sharded.data["weight_map"]))
    sharded.data["weight_map"][name] = "model-00009-of-00009.safetensors"
    sharded.index.write_text(json.dumps(sharded.data))
    assert_refused(capsys, merge_args(sharded.folder, sharded.adapter, sharded.out), sharded.out,
                   [sharded.folder, sharded.adapter], [sharded.index, "model-00009-of-00009.safetensors"])


def test_index_names_shard_outside_folder(sharded, capsys):
    outside = sharded.folder.parent / "x.safetensors"
    shutil.copy(next(sharded.folder.glob("model-00001-*.safetensors")), outside)  # it exists: still refused
    name = next(iter(sharded.data["weight_map"]))
    sharded.data["weight_map"][name] = "../x.safetensors"
    sharded.index.write_text(json.dumps(sharded.data))
    line = assert_refused(capsys, merge_args(sharded.folder, sharded.adapter, sharded.out), sharded.out,
                          [sharded.folder, sharded.adapter, outside], [sharded.index, "../x.safetensors"])
    assert "outside" in line


def test_index_names_absolute_shard(sharded, capsys):
    outside = sharded.folder.parent / "x.safetensors"
    shutil.copy(next(sharded.folder.glob("model-00001-*.safetensors")), outside)
    name = next(iter(sharded.data["weight_map"]))
    sharded.data["weight_map"][name] = str(outside)
    sharded.index.write_text(json.dumps(sharded.data))
    assert_refused(capsys, merge_args(sharded.folder, sharded.adapter, sharded.out), sharded.out,
                   [sharded.folder, sharded.adapter, outside], [sharded.index, outside])


def test_index_names_tensor_the_shard_lacks(sharded, capsys):
    shard = next(iter(sharded.data["weight_map"].values()))
    sharded.data["weight_map"]["model.layers.7.ghost.weight"] = shard
    sharded.index.write_text(json.dumps(sharded.data))
    assert_refused(capsys, merge_args(sharded.folder, sharded.adapter, sharded.out), sharded.out,
                   [sharded.folder, sharded.adapter], [sharded.index, "model.layers.7.ghost.weight", shard])


def test_index_not_json(sharded, capsys):
    sharded.index.write_text("{weight_map: oops")
    assert_refused(capsys, merge_args(sharded.folder, sharded.adapter, sharded.out), sharded.out,
                   [sharded.folder, sharded.adapter], [sharded.index])


def test_corrupt_second_shard(sharded, capsys):
    shard = sharded.folder / "model-00002-of-00004.safetensors"
    assert shard.is_file()
    shard.write_bytes(shard.read_bytes()[:-7])
    assert_refused(capsys, merge_args(sharded.folder, sharded.adapter, sharded.out), sharded.out,
                   [sharded.folder, sharded.adapter], [shard])


# ---------------------------------------------------------------------------------------------
# the base checkpoint: legacy pytorch_model.bin
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def bin_base(assets, tmp_path):
    folder = tmp_path / "binbase"
    folder.mkdir()
    shutil.copy(assets.base / "config.json", folder / "config.json")
    torch.save(load_file(assets.base / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_bin_base_merges(bin_base, work, capsys):
    """The control for the .bin tests below."""
    code, _, err = run_cli(merge_args(bin_base, work.adapter, work.out, "-q"), capsys)
    assert code == 0, err
    assert set(load_all(work.out)) == set(load_all(work.base))


@pytest.mark.parametrize("cut", ["tail", "half"])
def test_truncated_bin_base(bin_base, work, capsys, cut):
    f = bin_base / "pytorch_model.bin"
    raw = f.read_bytes()
    f.write_bytes(raw[:-100] if cut == "tail" else raw[:len(raw) // 2])
    assert_refused(capsys, merge_args(bin_base, work.adapter, work.out), work.out, [bin_base, work.adapter], [f])


def test_garbage_bin_base(bin_base, work, capsys):
    f = bin_base / "pytorch_model.bin"
    f.write_bytes(b"this is not a pickle\n" * 10)
    assert_refused(capsys, merge_args(bin_base, work.adapter, work.out), work.out, [bin_base, work.adapter], [f])


def test_bin_base_not_a_state_dict(bin_base, work, capsys):
    f = bin_base / "pytorch_model.bin"
    torch.save({"model.norm.weight": torch.ones(32), "step": 3}, f)
    assert_refused(capsys, merge_args(bin_base, work.adapter, work.out), work.out, [bin_base, work.adapter], [f])


def test_truncated_adapter_bin(work, capsys):
    st = work.adapter / "adapter_model.safetensors"
    f = work.adapter / "adapter_model.bin"
    torch.save(load_file(st), f)
    st.unlink()
    f.write_bytes(f.read_bytes()[:-50])
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter], [f])


# ---------------------------------------------------------------------------------------------
# paths: BASE, ADAPTER and OUT
# ---------------------------------------------------------------------------------------------

def test_nonexistent_base(work, capsys):
    missing = work.base.parent / "no-such-base"
    assert_refused(capsys, merge_args(missing, work.adapter, work.out), work.out, [work.adapter], [missing])


def test_nonexistent_adapter(work, capsys):
    missing = work.base.parent / "no-such-adapter"
    assert_refused(capsys, merge_args(work.base, missing, work.out), work.out, [work.base], [missing])


def test_adapter_folder_as_base(work, capsys):
    line = assert_refused(capsys, merge_args(work.adapter, work.adapter, work.out), work.out, [work.adapter],
                          [work.adapter])
    assert "adapter" in line


def test_base_folder_as_adapter(work, capsys):
    assert_refused(capsys, merge_args(work.base, work.base, work.out), work.out, [work.base],
                   [work.base, "adapter_config.json"])


def test_empty_folder_as_base(work, capsys):
    empty = work.base.parent / "empty"
    empty.mkdir()
    assert_refused(capsys, merge_args(empty, work.adapter, work.out), work.out, [work.adapter], [empty])


def test_out_already_exists(work, capsys):
    work.out.mkdir()
    (work.out / "model.safetensors").write_text("an earlier result")
    before = snapshot(work.base, work.adapter, work.out)
    code, _, err = run_cli(merge_args(work.base, work.adapter, work.out), capsys)
    assert code == 1
    lines = screen_lines(err)
    assert len(lines) == 1 and lines[0].startswith("wsurgery: error:") and str(work.out) in lines[0], lines
    assert "--overwrite" in lines[0]
    assert "Traceback" not in err
    assert snapshot(work.base, work.adapter, work.out) == before  # OUT left exactly as it was
    assert leftovers(work.out) == []

    code, _, err = run_cli(merge_args(work.base, work.adapter, work.out, "--overwrite", "--quiet"), capsys)
    assert code == 0, err
    assert (work.out / "model.safetensors").read_bytes() != b"an earlier result"
    assert load_all(work.out)
    assert leftovers(work.out) == []
    assert snapshot(work.base, work.adapter) == {k: v for k, v in before.items() if not k.startswith(str(work.out))}


def test_out_is_a_file(work, capsys):
    work.out.write_text("not a folder")
    code, _, err = run_cli(merge_args(work.base, work.adapter, work.out, "--overwrite"), capsys)
    assert code == 1
    lines = screen_lines(err)
    assert len(lines) == 1 and lines[0].startswith("wsurgery: error:") and str(work.out) in lines[0], lines
    assert work.out.read_text() == "not a folder"
    assert leftovers(work.out) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_is_the_base_folder(work, capsys, overwrite):
    extra = ["--overwrite"] if overwrite else []
    before = snapshot(work.base, work.adapter)
    code, _, err = run_cli(merge_args(work.base, work.adapter, work.base, *extra), capsys)
    assert code == 1
    lines = screen_lines(err)
    assert len(lines) == 1 and lines[0].startswith("wsurgery: error:") and str(work.base) in lines[0], lines
    assert "Traceback" not in err
    assert snapshot(work.base, work.adapter) == before
    assert leftovers(work.base) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_is_another_input_or_holds_one(work, capsys, overwrite):
    extra = ["--overwrite"] if overwrite else []
    before = snapshot(work.base, work.adapter)
    # the adapter folder, the base's weight file, a folder holding the base
    for out in (work.adapter, work.base / "model.safetensors", work.base.parent):
        code, _, err = run_cli(merge_args(work.base, work.adapter, out, *extra), capsys)
        assert code == 1
        lines = screen_lines(err)
        assert len(lines) == 1 and lines[0].startswith("wsurgery: error:") and str(out) in lines[0], lines
        assert snapshot(work.base, work.adapter) == before
        assert leftovers(out) == []


def test_out_parent_missing(work, capsys):
    out = work.out / "deeper" / "still"
    assert_refused(capsys, merge_args(work.base, work.adapter, out), out, [work.base, work.adapter],
                   [out.parent])


def test_bad_dtype_option(work, capsys):
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out, "--dtype", "float7"), work.out,
                   [work.base, work.adapter], ["float7"])


def test_bad_max_shard_size_option(work, capsys):
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out, "--max-shard-size", "lots"), work.out,
                   [work.base, work.adapter], ["lots"])


def test_inspect_corrupt_checkpoint(work, capsys):
    f = work.base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_refused(capsys, ["inspect", work.base], work.out, [work.base], [f])


def test_inspect_bad_adapter(work, capsys):
    edit_config(work.adapter, peft_type="FOO")
    assert_refused(capsys, ["inspect", work.adapter], work.out, [work.adapter], ["FOO"])


# ---------------------------------------------------------------------------------------------
# unmerge refusals: decided before anything is written
# ---------------------------------------------------------------------------------------------

def _no_write(monkeypatch):
    """Make any attempt to create the output fail the test loudly (a refusal must come first)."""
    def boom(*a, **k):
        raise AssertionError("the output was started before the refusal")
    monkeypatch.setattr(engine, "atomic_output_dir", boom)


def test_unmerge_dora_refused(assets, tmp_path, capsys, monkeypatch):
    base, dora, out = copy_of(assets.base, tmp_path / "b"), copy_of(assets.dora, tmp_path / "d"), tmp_path / "out"
    _no_write(monkeypatch)
    line = assert_refused(capsys, ["unmerge", base, dora, out], out, [base, dora],
                          [dora, "model.layers.0.self_attn.q_proj"])
    assert "DoRA" in line and "magnitude" in line


def test_unmerge_modules_to_save_refused(assets, tmp_path, capsys, monkeypatch):
    base, mts, out = copy_of(assets.base, tmp_path / "b"), copy_of(assets.mts, tmp_path / "m"), tmp_path / "out"
    _no_write(monkeypatch)
    line = assert_refused(capsys, ["unmerge", base, mts, out], out, [base, mts], [mts, "lm_head"])
    assert "modules_to_save" in line


def test_merge_dora_and_modules_to_save_still_fine(assets, tmp_path, capsys):
    """The control for the two refusals above: the same adapters merge."""
    for adapter in (assets.dora, assets.mts):
        out = tmp_path / f"out-{adapter.name}"
        code, _, err = run_cli(merge_args(assets.base, adapter, out, "--quiet"), capsys)
        assert code == 0, err
        assert (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# failures while writing: nothing may be left behind
# ---------------------------------------------------------------------------------------------

def _fail_on_second_call(monkeypatch, owner, attr, exc):
    real = getattr(owner, attr)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise exc
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, attr, wrapper)
    return calls


@pytest.mark.parametrize("quiet", [True, False])
def test_error_in_the_middle_of_writing(work, capsys, monkeypatch, quiet):
    calls = _fail_on_second_call(monkeypatch, engine, "_run_job",
                                 InputError("model.layers.0.self_attn.v_proj: injected failure"))
    extra = ["--quiet"] if quiet else []
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out, *extra), work.out,
                   [work.base, work.adapter], ["model.layers.0.self_attn.v_proj", "injected failure"])
    assert calls["n"] == 2  # the first module was merged and written before the failure


def test_disk_full_in_the_middle_of_writing(work, capsys, monkeypatch):
    calls = _fail_on_second_call(monkeypatch, st_file.os, "pwrite",
                                 OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    line = assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out,
                          [work.base, work.adapter], ["model.safetensors", os.strerror(errno.ENOSPC)])
    assert calls["n"] == 2
    assert "internal" not in line


def test_unexpected_exception_in_the_middle_of_writing(work, capsys, monkeypatch):
    """A bug (not a user error) is still one line, with a pointer to --debug, and leaves nothing."""
    _fail_on_second_call(monkeypatch, engine.CheckpointWriter, "write", RuntimeError("kaboom"))
    line = assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out,
                          [work.base, work.adapter], ["kaboom", "--debug"], prefix="wsurgery: internal error:")
    assert "RuntimeError" in line


def test_keyboard_interrupt_in_the_middle_of_writing(work, capsys, monkeypatch):
    calls = _fail_on_second_call(monkeypatch, engine.CheckpointWriter, "write", KeyboardInterrupt())
    assert_refused(capsys, merge_args(work.base, work.adapter, work.out), work.out, [work.base, work.adapter],
                   ["interrupted"], code=130, prefix="wsurgery: interrupted")
    assert calls["n"] == 2


def test_error_while_replacing_with_overwrite_keeps_old_out(work, capsys, monkeypatch):
    """With --overwrite, a failure part-way leaves the old OUT as it was."""
    work.out.mkdir()
    (work.out / "config.json").write_text("old result")
    calls = _fail_on_second_call(monkeypatch, engine, "_run_job", InputError("injected failure"))
    code, _, err = run_cli(merge_args(work.base, work.adapter, work.out, "--overwrite"), capsys)
    assert code == 1 and calls["n"] == 2
    lines = screen_lines(err)
    assert len(lines) == 1 and lines[0].startswith("wsurgery: error:"), lines
    assert sorted(p.name for p in work.out.iterdir()) == ["config.json"]
    assert (work.out / "config.json").read_text() == "old result"
    assert leftovers(work.out) == []


# ---------------------------------------------------------------------------------------------
# for real: a subprocess, so nothing in-process (pytest, capsys) can hide a traceback
# ---------------------------------------------------------------------------------------------

def _subprocess(*args):
    return subprocess.run([sys.executable, "-m", "wsurgery.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


def test_subprocess_error_is_one_line_without_traceback(work):
    f = work.base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    before = snapshot(work.base, work.adapter)
    r = _subprocess("merge", work.base, work.adapter, work.out)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = screen_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("wsurgery: error:") and str(f) in lines[0], r.stderr
    assert r.stdout == ""
    assert not work.out.exists() and leftovers(work.out) == []
    assert snapshot(work.base, work.adapter) == before

    # --debug is the way to get the traceback
    r = _subprocess("--debug", "merge", work.base, work.adapter, work.out)
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "InputError" in r.stderr
    assert not work.out.exists() and leftovers(work.out) == []


def test_subprocess_pickle_of_objects_is_one_line(bin_base, work):
    """torch.load warns on stderr about some pickles; those warnings must not reach the user either."""
    import pickle

    f = bin_base / "pytorch_model.bin"
    with open(f, "wb") as fh:
        pickle.dump({"model.norm.weight": [1.0] * 32}, fh, protocol=4)
    before = snapshot(bin_base, work.adapter)
    r = _subprocess("merge", bin_base, work.adapter, work.out)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = screen_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("wsurgery: error:") and str(f) in lines[0], r.stderr
    assert not work.out.exists() and leftovers(work.out) == []
    assert snapshot(bin_base, work.adapter) == before


def test_usage_error(work, capsys):
    code, out, err = run_cli(["merge", work.base], capsys)
    assert code == 2
    assert "Traceback" not in err
    assert "Missing argument" in err
    assert out == ""


# ---------------------------------------------------------------------------------------------
# the dtype combinations PEFT supports all merge, and match PEFT
# ---------------------------------------------------------------------------------------------

DTYPE_CASES = [
    # (base dtype, adapter dtype, tolerance)
    (torch.float32, torch.float32, {"rel": 1e-5}),
    (torch.bfloat16, torch.bfloat16, {"ulps": 1}),
    (torch.bfloat16, torch.float32, {"ulps": 1}),
    (torch.float16, torch.float32, {"ulps": 1}),
    (torch.float32, torch.bfloat16, {"rel": 1e-5}),
]


@pytest.mark.parametrize("base_dtype, adapter_dtype, tol", DTYPE_CASES,
                         ids=[f"{str(b)[6:]}-base-{str(a)[6:]}-adapter" for b, a, _ in DTYPE_CASES])
def test_dtype_combinations_match_peft(tmp_path, capsys, base_dtype, adapter_dtype, tol):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    model = tiny_llama(dtype=base_dtype, seed=3)
    base = save_base(model, tmp_path / "base")
    adapter = make_adapter(model, LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS + ["down_proj"]),
                           tmp_path / "adapter", seed=5, adapter_dtype=adapter_dtype)
    with safe_open(base / "model.safetensors", "pt") as f:  # the files really hold the dtypes under test
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {
            {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[base_dtype]}
    saved = adapter_tensors(adapter)
    assert {t.dtype for t in saved.values()} == {adapter_dtype}
    assert len(saved) == 2 * 3 * LAYERS

    out = tmp_path / "out"
    code, _, err = run_cli(merge_args(base, adapter, out, "--quiet"), capsys)
    assert code == 0, err
    ours = load_all(out)
    fresh = AutoModelForCausalLM.from_pretrained(base, dtype=base_dtype)
    expected = oracle_merge(fresh, adapter)
    assert set(ours) == set(expected)
    assert_close_to(ours, expected, **tol)
    # and the merge did change what the adapter targets (the comparison is not trivially true)
    original = load_all(base)
    changed = {n for n in ours if not torch.equal(ours[n], original[n])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(LAYERS)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
