"""llama-quantize's mixes (q4_k_m, q5_k_m, q3_k_m, q2_k, q6_k...): each tensor's type as llama.cpp chooses it.

The oracle is llama.cpp's own ``llama-quantize`` (llama-cpp-python 0.3.36's vendored llama.cpp, built by
``scripts/build_llama_quantize.sh``): ``fixtures/gguf_mixes/*.json`` record the type it gave every tensor of
tiny synthetic models for each file type (``scripts/make_gguf_mix_fixtures.py``). These tests always compare
``gguf_mixes.mix_types`` with them; with ``LLAMA_QUANTIZE`` set they also rerun the tool live, and compare a
``wsurgery quantize --gguf-type`` output with llama-quantize's tensor for tensor.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from oracle import run_cli
from wsurgery.errors import InputError, UnsupportedError
from wsurgery.quant.encodings.ggml import can_encode
from wsurgery.quant.gguf_mixes import FILE_TYPES, MixModel, file_type, mix_types

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = sorted((ROOT / "fixtures" / "gguf_mixes").glob("*.json"))
LLAMA_QUANTIZE = os.environ.get("LLAMA_QUANTIZE")
needs_llama_quantize = pytest.mark.skipif(not LLAMA_QUANTIZE, reason="needs LLAMA_QUANTIZE "
                                          "(scripts/build_llama_quantize.sh builds llama.cpp's llama-quantize)")


def _script():
    """scripts/make_gguf_mix_fixtures.py, which writes the models and runs llama-quantize."""
    path = ROOT / "scripts" / "make_gguf_mix_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_gguf_mix_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(fixture: dict) -> MixModel:
    h = fixture["hparams"]
    return MixModel(fixture["arch"], h["layers"], h["heads"], h["kv"], h["experts"])


def _ours(fixture: dict, ftype: str) -> tuple[list[str], int]:
    """Our type of every tensor of the fixture (those not quantized keep their source type)."""
    tensors = [(name, tuple(shape)) for name, shape, _ in fixture["tensors"]]
    types, recorded = mix_types(_model(fixture), tensors, ftype)
    return [types[name].name if name in types else source for name, _, source in fixture["tensors"]], int(recorded)


def test_fixtures_cover_the_rules():
    """The fixtures are there, cover every file type, and exercise what the rules depend on."""
    fixtures = {p.stem: json.loads(p.read_text()) for p in FIXTURES}
    assert {"llama16", "llama12_tied", "qwen2_odd_rows", "llama_moe8", "falcon8", "llama80_attn_v"} <= set(fixtures)
    for fixture in fixtures.values():
        assert {FILE_TYPES[n] for n in fixture["file_types"]} == set(FILE_TYPES.values())
    q4_k_m = fixtures["llama16"]["file_types"]["q4_k_m"]["types"]
    assert {"Q4_K", "Q6_K"} <= set(q4_k_m)  # mixed, not one type
    odd = fixtures["qwen2_odd_rows"]["file_types"]["q4_k_m"]["types"]
    assert {"Q5_0", "Q8_0", "F16"} <= set(odd)  # fallbacks: 32-block types and F16


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_mix_types_equal_llama_quantize(path):
    """Every tensor's type and the recorded general.file_type, for every file type, as llama-quantize chose."""
    fixture = json.loads(path.read_text())
    names = [name for name, _, _ in fixture["tensors"]]
    for ftype, expected in fixture["file_types"].items():
        ours, recorded = _ours(fixture, ftype)
        wrong = {n: (o, e) for n, o, e in zip(names, ours, expected["types"]) if o != e}
        assert not wrong, f"{path.stem} {ftype}: (ours, llama-quantize) {wrong}"
        assert recorded == expected["file_type"], ftype
        assert expected["quantization_version"] == gguf.GGML_QUANT_VERSION


def test_order_of_tensors_does_not_matter():
    """llama-quantize numbers attn_v and ffn_down in block order whatever the file's order: so do we."""
    fixture = json.loads((ROOT / "fixtures" / "gguf_mixes" / "llama16.json").read_text())
    tensors = [(name, tuple(shape)) for name, shape, _ in fixture["tensors"]]
    forward, _ = mix_types(_model(fixture), tensors, "q4_k_m")
    backward, _ = mix_types(_model(fixture), tensors[::-1], "q4_k_m")
    assert forward == backward


def test_aliases_and_unknown_names():
    assert file_type("Q4_K") == file_type("q4_k_m") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    with pytest.raises(InputError, match="q4_k_s, q4_k_m"):
        file_type("q4_k_x")
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):  # needs an importance matrix
        mix_types(MixModel("llama", 1, 1, 1), [("blk.0.attn_v.weight", (8, 256))], gguf.LlamaFileType.MOSTLY_IQ2_XXS)


@needs_llama_quantize
@pytest.mark.parametrize("model", ["llama16", "qwen2_odd_rows"])
def test_fixture_is_what_llama_quantize_writes_now(model, tmp_path):
    """The committed fixture is what the built llama-quantize chooses (the fixture is not stale)."""
    script = _script()
    live = script.record(model, script.MODELS[model], LLAMA_QUANTIZE, tmp_path)
    assert live == json.loads((ROOT / "fixtures" / "gguf_mixes" / f"{model}.json").read_text())


# -- wsurgery quantize --gguf-type MIX --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The fixtures' source models as GGUF files, written once: name -> path."""
    folder, script, paths = tmp_path_factory.mktemp("mix"), _script(), {}

    def get(name: str) -> Path:
        if name not in paths:
            paths[name] = folder / f"{name}.gguf"
            script.write_model(script.MODELS[name], paths[name])
        return paths[name]
    return get


def test_unknown_gguf_type_is_one_line_listing_valid_names(models, tmp_path, capsys):
    code, _, err = run_cli(["quantize", models("llama16"), tmp_path / "out.gguf", "--gguf-type", "q4_k_x"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "q4_k_m" in err and "q8_0" in err
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("model, ftype", [("llama16", "q4_k_m"), ("qwen2_odd_rows", "q3_k_m")])
def test_quantize_to_a_mix(models, tmp_path, capsys, model, ftype):
    """Each tensor in the type llama-quantize gives it (the layer rules; the fallbacks of rows that do not
    divide into 256), file_type and quantization_version as it records them, and with LLAMA_QUANTIZE the same
    bytes as its output; refused in one line, nothing written, while a K type cannot be encoded."""
    out = tmp_path / f"{ftype}.gguf"
    fixture = json.loads((ROOT / "fixtures" / "gguf_mixes" / f"{model}.json").read_text())
    expected = dict(zip([n for n, _, _ in fixture["tensors"]], fixture["file_types"][ftype]["types"]))
    code, _, err = run_cli(["quantize", models(model), out, "--gguf-type", ftype, "--quiet"], capsys)
    if not all(can_encode(T[t]) for t in expected.values()):
        assert code != 0 and "cannot quantize" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
        pytest.skip("the K-quant encoders (H19a) are not in yet: only the refusal is checked")
    assert code == 0, err
    reader = gguf.GGUFReader(out)
    assert {t.name: T(t.tensor_type).name for t in reader.tensors} == expected
    assert int(reader.fields["general.file_type"].contents()) == fixture["file_types"][ftype]["file_type"]
    assert int(reader.fields["general.quantization_version"].contents()) == gguf.GGML_QUANT_VERSION
    if LLAMA_QUANTIZE:  # bytes: llama-quantize without an imatrix runs ggml's reference quantizers
        import subprocess

        theirs = tmp_path / "theirs.gguf"
        subprocess.run([LLAMA_QUANTIZE, str(models(model)), str(theirs), ftype.upper(), "2"], check=True,
                       capture_output=True)
        ref = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
        assert set(ref) == set(expected)
        for t in reader.tensors:
            assert t.tensor_type == ref[t.name].tensor_type, t.name
            assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(ref[t.name].data).view(np.uint8)), \
                t.name
