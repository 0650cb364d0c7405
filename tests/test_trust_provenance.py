"""Provenance without private paths (issue 15): what wsurgery records about a folder it wrote is
published with it by --push-to, so it names Hub inputs by repo id and local inputs only by their
folder name and the sha256 of their weights (an adapter's weights file, a checkpoint's index or single
weights file); the command line keeps no path. extract, combine and convert record it too, in the
adapter's safetensors metadata, where PEFT still loads the adapter without a word.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from safetensors import safe_open

import wsurgery
from oracle import run_cli
from wsurgery.model_card import model_card, public_command

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BASE, LORA = FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-lora"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def private(tmp_path):
    """The fixtures copied under a folder whose name must never be published."""
    home = tmp_path / "home-alice-secret-project"
    shutil.copytree(BASE, home / "base")
    shutil.copytree(LORA, home / "lora")
    return home


def adapter_record(folder: Path) -> dict:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return json.loads(f.metadata()["wsurgery"])


def test_merge_record_names_local_inputs_by_folder_name_and_sha256(private, capsys):
    out = private / "merged"
    code, _, err = run_cli(["merge", private / "base", f"{private / 'lora'}:0.5", out, "-q", "--scale", "2"],
                           capsys)
    assert code == 0, err
    record = json.loads((out / "config.json").read_text())["wsurgery"]
    assert "secret" not in json.dumps(record)
    assert record["base"] == "base"
    assert record["base_sha256"] == sha256(private / "base" / "model.safetensors.index.json")
    [adapter] = record["adapters"]
    assert adapter["source"] == "lora" and adapter["weight"] == 1.0 and adapter["peft_type"] == "LORA"
    assert adapter["sha256"] == sha256(private / "lora" / "adapter_model.safetensors")
    assert record["command"] == "wsurgery merge base lora:0.5 merged -q --scale 2"
    card = ModelCard(model_card(out, "alice/merged"))
    assert "secret" not in card.text and record["base_sha256"] in card.text


def test_published_command_keeps_repo_ids_numbers_and_tokens_hidden(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    command = ("wsurgery merge /home/alice/base org/lora:0.5 models/out --scale 0.5 --token *** "
               "--report=/home/alice/r.json --push-to alice/merged")
    assert public_command(command) == ("wsurgery merge base org/lora:0.5 out --scale 0.5 --token *** "
                                       "--report=r.json --push-to alice/merged")


def _written_adapters(private: Path) -> dict[str, Path]:
    tuned = private / "tuned"
    wsurgery.merge(private / "base", private / "lora", tuned, progress=False)
    outs = {name: private / name for name in ("extracted", "combined", "converted")}
    wsurgery.api.extract(private / "base", tuned, outs["extracted"], rank=4, progress=False,
                         command=f"wsurgery extract {private / 'base'} {tuned} {outs['extracted']} --rank 4")
    wsurgery.api.combine(outs["combined"], [(private / "lora", 0.5), private / "lora"], progress=False,
                         command=f"wsurgery combine {outs['combined']} {private / 'lora'}:0.5 {private / 'lora'}")
    wsurgery.api.convert(private / "lora", outs["converted"], to="loha", progress=False,
                         command=f"wsurgery convert {private / 'lora'} {outs['converted']} --to loha")
    return outs


def test_extract_combine_convert_record_their_inputs_and_peft_loads_them_silently(private):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    outs = _written_adapters(private)
    lora_sha = sha256(private / "lora" / "adapter_model.safetensors")

    extracted = adapter_record(outs["extracted"])
    assert extracted["operation"] == "extract" and extracted["base"] == "base" and extracted["tuned"] == "tuned"
    assert extracted["base_sha256"] == sha256(private / "base" / "model.safetensors.index.json")
    assert extracted["tuned_sha256"] == sha256(private / "tuned" / "model.safetensors.index.json")
    assert extracted["command"] == "wsurgery extract base tuned extracted --rank 4"

    combined = adapter_record(outs["combined"])
    assert combined["operation"] == "combine"
    assert [(a["source"], a["weight"], a["sha256"]) for a in combined["adapters"]] == \
        [("lora", 0.5, lora_sha), ("lora", 1.0, lora_sha)]

    converted = adapter_record(outs["converted"])
    assert converted["operation"] == "convert" and converted["adapters"][0]["sha256"] == lora_sha
    assert converted["adapters"][0]["peft_type"] == "LORA"

    for name, out in outs.items():
        record = adapter_record(out)
        assert "secret" not in json.dumps(record), name
        card = ModelCard(model_card(out, f"alice/{name}"))
        assert card.data.base_model_relation == "adapter" and "secret" not in card.text
        assert f"`wsurgery {record['operation']}" in card.text  # the card reads the record back
        assert wsurgery.inspect(out)["made_by"] == record  # and so does inspect
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = AutoModelForCausalLM.from_pretrained(private / "base")
            PeftModel.from_pretrained(model, out)
        assert not [w for w in caught if "nexpected" in str(w.message)], name
    assert "loha" in ModelCard(model_card(outs["converted"], "alice/c")).data.tags


def test_every_command_line_records_its_command_without_paths(private, capsys):
    """unmerge, extract, combine and convert run from the command line record what was run, paths cut to names."""
    merged, unmerged = private / "merged", private / "unmerged"
    assert run_cli(["merge", private / "base", private / "lora", merged, "-q"], capsys)[0] == 0
    runs = {
        "unmerge": (["unmerge", merged, private / "lora", unmerged, "-q"],
                    lambda: json.loads((unmerged / "config.json").read_text())["wsurgery"]),
        "extract": (["extract", private / "base", merged, private / "ex", "--rank", "8", "-q"],
                    lambda: adapter_record(private / "ex")),
        "combine": (["combine", private / "co", f"{private / 'lora'}:0.5", "-q"],
                    lambda: adapter_record(private / "co")),
        "convert": (["convert", private / "lora", private / "cv", "--to", "loha", "-q"],
                    lambda: adapter_record(private / "cv")),
    }
    for operation, (argv, record) in runs.items():
        code, _, err = run_cli(argv, capsys)
        assert code == 0, (operation, err)
        got = record()
        assert got["operation"] == operation
        assert got["command"].startswith(f"wsurgery {operation} "), got
        assert "secret" not in json.dumps(got) and "/" not in got["command"], got
