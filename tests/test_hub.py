"""Hub inputs and `wsurgery push`, against a local fake Hub (tests/fake_hub.py): no network.

huggingface_hub itself makes every request; the fake server only answers and records. What arrives
is checked against the local files (bytes and sha256), the model card is read back with
huggingface_hub's own card parser, and failures must be one line on stderr without the token.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import wsurgery
from fake_hub import FakeHub, folder_files
from wsurgery.checkpoint import open_checkpoint
from wsurgery.cli import main
from wsurgery.errors import InputError
from wsurgery.hub_inputs import needed_files

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TOKEN = "hf_alice_write_token"  # alice's write token on the fake Hub
# huggingface_hub's own LFS upload call, not ours
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
BASE, LORA = FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-lora"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake Hub, with huggingface_hub pointed at it, plain HTTP uploads (no Xet) and a fresh HF_HOME."""
    import huggingface_hub.constants as hc

    with FakeHub() as server:
        home = tmp_path / "hf-home"
        settings = {"ENDPOINT": server.url, "HF_HUB_DISABLE_XET": True, "HF_HUB_OFFLINE": False,
                    "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
                    "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN_PATH": str(home / "token"),
                    "HF_STORED_TOKENS_PATH": str(home / "stored_tokens")}
        for name, value in settings.items():
            monkeypatch.setattr(hc, name, value)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.chdir(tmp_path)  # repo ids must not also be local paths
        yield server


def cli(capfd, *args: str) -> tuple[int, str]:
    """Run the CLI in-process; return its exit code and everything it wrote (stdout + stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return code, out + err


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    return {name: ckpt.read(name) for name in ckpt.tensors}


def card_of(text: bytes) -> ModelCard:
    return ModelCard(text.decode())


def test_push_uploads_every_file_with_its_hash_and_a_generated_card(hub, tmp_path, capfd):
    before = folder_files(BASE)
    code, output = cli(capfd, "push", str(BASE), "alice/tiny-llama", "--token", TOKEN, "-q")
    assert code == 0, output
    assert folder_files(BASE) == before  # the input folder is not touched: no README.md written there
    remote = hub.repos["alice/tiny-llama"].files("main")
    assert {k: v for k, v in remote.items() if k not in ("README.md", ".gitattributes")} == before
    shards = [name for name in before if name.endswith(".safetensors")]
    assert sorted(hub.lfs) == sorted(hashlib.sha256(before[name]).hexdigest() for name in shards)
    assert not hub.repos["alice/tiny-llama"].private
    card = card_of(remote["README.md"])
    assert card.data.library_name == "transformers" and "wsurgery" in card.data.tags
    assert card.data.base_model is None  # nothing tells what these weights came from
    assert "pushed 10 file(s) with a generated model card to alice/tiny-llama" in output


def test_adapter_card_names_its_base_and_method(hub, tmp_path, capfd):
    adapter = tmp_path / "lora"
    shutil.copytree(LORA, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/tiny-llama"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, output = cli(capfd, "push", str(adapter), "alice/lora", "--token", TOKEN, "-q")
    assert code == 0, output
    card = card_of(hub.repos["alice/lora"].files("main")["README.md"])
    assert card.data.base_model == "org/tiny-llama"
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "peft"
    assert config["peft_type"].lower() in card.data.tags


def test_merge_from_repo_ids_fetches_only_what_it_reads_and_pushes_a_pr_with_the_merge_card(hub, tmp_path, capfd):
    """Repo-id inputs: weights the reader picks, index, configs, tokenizer; not the .bin copy, the
    consolidated copy, sub-folders, README, or training leftovers. The result goes to a pull request."""
    hub.add_repo("org/tiny-llama", {**folder_files(BASE), "README.md": b"# base", "pytorch_model.bin": b"0" * 64,
                                    "pytorch_model.bin.index.json": b"{}", "consolidated.safetensors": b"0" * 64,
                                    "original/params.json": b"{}", "onnx/model.onnx": b"0", "flax_model.msgpack": b"0"})
    hub.add_repo("org/tiny-llama-lora", {**folder_files(LORA), "README.md": b"# lora", "training_args.bin": b"0",
                                         "checkpoint-10/adapter_model.safetensors": b"0"})
    out = tmp_path / "merged"
    code, output = cli(capfd, "merge", "org/tiny-llama", "org/tiny-llama-lora", str(out), "-q",
                       "--push-to", "alice/merged", "--create-pr", "--token", TOKEN)
    assert code == 0, output

    fetched = {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requested("GET", "/resolve/")}
    assert fetched == set(folder_files(BASE)) | {"adapter_config.json", "adapter_model.safetensors"}
    wsurgery.merge(BASE, LORA, tmp_path / "local", progress=False)
    a, b = load_all(out), load_all(tmp_path / "local")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    [commit] = hub.commits
    assert commit["create_pr"] and commit["revision"] == "refs/pr/1"
    assert hub.requested("POST", "/commit/main")[0].query == {"create_pr": "1"}
    assert "alice/merged/discussions/1" in output
    assert {k: v for k, v in commit["files"].items() if k != "README.md"} == folder_files(out)
    card = card_of(commit["files"]["README.md"])
    assert card.data.base_model == "org/tiny-llama"
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert {"wsurgery", "merge", "lora"} <= set(card.data.tags)
    assert f"wsurgery {wsurgery.__version__}: `wsurgery merge org/tiny-llama org/tiny-llama-lora" in card.text
    assert "org/tiny-llama-lora` (LORA, weight 1.0)" in card.text
    assert TOKEN not in card.text and "--token ***" in card.text


def test_private_revision_and_commit_message_reach_the_server(hub, capfd):
    code, output = cli(capfd, "push", str(LORA), "alice/private-lora", "--private", "--revision", "dev",
                       "--commit-message", "first adapter", "--token", TOKEN, "-q")
    assert code == 0, output
    [create] = hub.requested("POST", "/api/repos/create")
    assert json.loads(create.body)["visibility"] == "private"
    assert hub.repos["alice/private-lora"].private
    assert hub.requested("POST", "/api/models/alice/private-lora/branch/dev")
    [commit] = hub.commits
    assert commit["revision"] == "dev" and commit["summary"] == "first adapter" and not commit["create_pr"]
    repo = hub.repos["alice/private-lora"]
    assert "adapter_model.safetensors" in repo.files("dev") and "adapter_model.safetensors" not in repo.files("main")
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requested("POST", "/api/"))


def test_a_readme_in_the_folder_or_on_the_hub_is_kept(hub, tmp_path, capfd):
    adapter = tmp_path / "lora"
    shutil.copytree(LORA, adapter)
    (adapter / "README.md").write_text("# my own card\n")
    assert cli(capfd, "push", str(adapter), "alice/a", "--token", TOKEN, "-q")[0] == 0
    assert hub.repos["alice/a"].files("main")["README.md"] == b"# my own card\n"

    hub.add_repo("alice/b", {"README.md": b"# edited on the Hub\n"})
    code, output = cli(capfd, "push", str(LORA), "alice/b", "--token", TOKEN, "-q")
    assert code == 0 and "model card already on the Hub" in output
    assert hub.repos["alice/b"].files("main")["README.md"] == b"# edited on the Hub\n"


@pytest.mark.parametrize("source", ["HF_TOKEN", "stored login"])
def test_token_from_the_environment_or_the_stored_login(hub, monkeypatch, capfd, source):
    import huggingface_hub.constants as hc

    if source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:
        Path(hc.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
        Path(hc.HF_TOKEN_PATH).write_text(TOKEN)
    code, output = cli(capfd, "push", str(LORA), "alice/lora", "-q")
    assert code == 0, output
    assert hub.requested("POST", "/commit/")[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_rejected_token_is_one_line_without_the_token(hub, tmp_path, capfd):
    secret = "hf_not_a_valid_token_0123456789"
    code, output = cli(capfd, "push", str(LORA), "alice/lora", "--token", secret)
    assert code == 1
    assert output.count("\n") == 1 and "401" in output and "token" in output and "Traceback" not in output
    assert secret not in output
    assert "alice/lora" not in hub.repos

    # --push-to checks the token before the merge: nothing is written
    code, output = cli(capfd, "merge", str(BASE), str(LORA), str(tmp_path / "out"), "--push-to", "alice/m",
                       "--token", secret)
    assert code == 1 and "401" in output and secret not in output
    assert not (tmp_path / "out").exists()


def test_no_token_for_push_to_is_refused_before_the_merge(hub, tmp_path, capfd):
    code, output = cli(capfd, "merge", str(BASE), str(LORA), str(tmp_path / "out"), "--push-to", "alice/m")
    assert code == 1 and "needs a Hub token" in output and output.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_no_write_access_is_one_line(hub, capfd):
    code, output = cli(capfd, "push", str(LORA), "bob/lora", "--token", TOKEN)
    assert code == 1 and output.count("\n") == 1
    assert "bob/lora" in output and "403" in output and "write access" in output


def test_dropped_connection_says_what_arrived_and_a_rerun_resumes(hub, capfd):
    """The server closes the socket on the commit: the LFS data arrived, no commit was made."""
    index_and_config = {k: v for k, v in folder_files(BASE).items()
                        if k in ("config.json", "model.safetensors.index.json")}
    hub.add_repo("alice/tiny", index_and_config)
    hub.drop = "/commit/"
    code, output = cli(capfd, "push", str(BASE), "alice/tiny", "--token", TOKEN, "-q")
    assert code == 1 and output.count("\n") == 1 and "Traceback" not in output
    assert "connection to the Hub failed" in output
    assert "2 of 10 files are in it (config.json, model.safetensors.index.json)" in output
    assert "not uploaded: README.md, generation_config.json, model-00001-of-00004.safetensors" in output
    assert "re-running the push resumes it" in output
    puts = len(hub.requested("PUT", "/lfs/"))
    assert puts == 4

    hub.drop = None
    code, output = cli(capfd, "push", str(BASE), "alice/tiny", "--token", TOKEN, "-q")
    assert code == 0, output
    assert len(hub.requested("PUT", "/lfs/")) == puts  # resumed: the shards were not sent again
    assert {k: v for k, v in hub.repos["alice/tiny"].files("main").items() if k != "README.md"} == folder_files(BASE)


def test_failed_push_after_merge_says_how_to_push_the_written_folder(hub, tmp_path, capfd):
    hub.drop = "/commit/"
    out = tmp_path / "out"
    code, output = cli(capfd, "merge", str(BASE), str(LORA), str(out), "-q", "--push-to", "alice/m", "--token", TOKEN)
    assert code == 1 and output.count("\n") == 1
    assert f"{out} is written: push it again with `wsurgery push {out} alice/m`" in output
    assert (out / "config.json").is_file()


def test_missing_or_gated_input_repo_is_one_line(hub, tmp_path, capfd):
    code, output = cli(capfd, "merge", "org/absent", str(LORA), str(tmp_path / "out"))
    assert code == 1 and output.count("\n") == 1
    assert "org/absent: no such local path, and no such Hub repository" in output
    hub.add_repo("org/gated", folder_files(BASE), gated=True)
    code, output = cli(capfd, "merge", "org/gated", str(LORA), str(tmp_path / "out"))
    assert code == 1 and output.count("\n") == 1 and "org/gated: a gated Hub repository" in output
    hub.add_repo("org/gguf-only", {"model.gguf": b"0", "README.md": b"#"})
    code, output = cli(capfd, "merge", "org/gguf-only", str(LORA), str(tmp_path / "out"))
    assert code == 1 and "org/gguf-only: the Hub repository has none of the files wsurgery reads" in output
    assert not hub.requested("GET", "/resolve/")


def _break(folder: Path, how: str) -> str:
    """Damage a copy of the tiny model in one way; return what the refusal must mention."""
    if how == "missing shard":
        (folder / "model-00002-of-00004.safetensors").unlink()
        return "shard 'model-00002-of-00004.safetensors'"
    if how == "corrupt header":
        (folder / "model-00003-of-00004.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
        return "header is not valid JSON"
    if how == "shard not in the index":
        shutil.copy(folder / "model-00004-of-00004.safetensors", folder / "model-00005-of-00005.safetensors")
        return "model-00005-of-00005.safetensors: a shard that no index names"
    if how == "temporary file":
        (folder / "model-00001-of-00004.safetensors.tmp").write_bytes(b"")
        return "unfinished temporary files (model-00001-of-00004.safetensors.tmp)"
    if how == "partial download":
        (folder / "sub").mkdir()
        (folder / "sub" / "blob.incomplete").write_bytes(b"")
        return "unfinished temporary files (sub/blob.incomplete)"
    if how == "no weights":
        for shard in folder.glob("model*"):
            shard.unlink()
        return "no model weights or adapter to push"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing shard", "corrupt header", "shard not in the index", "temporary file",
                                 "partial download", "no weights"])
def test_inconsistent_folder_is_refused_before_any_request(hub, tmp_path, how):
    folder = tmp_path / "model"
    shutil.copytree(BASE, folder)
    expected = _break(folder, how)
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        wsurgery.push(folder, "alice/model", token=TOKEN, progress=False)
    assert hub.requests == []


def test_unfinished_output_folder_and_bad_targets_are_refused(hub, tmp_path, monkeypatch):
    tmp_out = tmp_path / ".out.wsurgery-tmp-123"
    shutil.copytree(LORA, tmp_out)
    with pytest.raises(InputError, match="unfinished temporary output folder"):
        wsurgery.push(tmp_out, "alice/x", token=TOKEN)
    with pytest.raises(InputError, match="not a Hub repo id"):
        wsurgery.push(LORA, "no-namespace", token=TOKEN)
    with pytest.raises(InputError, match="drop --revision dev"):
        wsurgery.push(LORA, "alice/x", revision="dev", create_pr=True, token=TOKEN)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="HF_HUB_OFFLINE is set"):
        wsurgery.push(LORA, "alice/x", token=TOKEN)
    assert hub.requests == []


@pytest.mark.parametrize("files, kind, expected", [
    (["pytorch_model.bin", "config.json", "README.md", "tf_model.h5"], "model", ["config.json", "pytorch_model.bin"]),
    (["model.safetensors", "pytorch_model.bin", "vocab.txt", "merges.txt", "onnx/model.onnx"], "model",
     ["merges.txt", "model.safetensors", "vocab.txt"]),
    (["adapter_model.bin", "adapter_config.json", "adapter_model.safetensors", "training_args.bin"], "adapter",
     ["adapter_config.json", "adapter_model.safetensors"]),
    (["README.md", "config.json"], "model", []),
    (["model.safetensors.index.json", "model.fp16.safetensors.index.json", "config.json"], "model",
     ["config.json", "model.safetensors.index.json"]),
])
def test_needed_files_follow_the_readers_choice(files, kind, expected):
    index = "model.safetensors.index.json" if "model.safetensors.index.json" in expected else None
    assert needed_files(files, kind) == (expected, index)


def test_cli_process_with_hf_token_env_never_prints_it(hub, tmp_path):
    """End to end in a fresh process: HF_ENDPOINT, HF_HUB_DISABLE_XET and HF_TOKEN from the environment."""
    secret = "hf_env_secret_token_9876543210"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "home"),
           "HF_TOKEN": secret, "PYTHONPATH": str(Path(wsurgery.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "wsurgery.cli", "push", str(LORA), "alice/lora"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "401" in r.stderr
    assert secret not in r.stderr + r.stdout
    [create] = hub.requested("POST", "/api/repos/create")
    assert create.headers["authorization"] == f"Bearer {secret}"  # HF_TOKEN was the token used


@pytest.mark.parametrize("record", [True, False])
def test_card_of_a_quantized_model_from_the_record_or_the_quantization_config(tmp_path, record):
    from wsurgery.model_card import model_card

    folder = tmp_path / "q"
    shutil.copytree(BASE, folder)
    config = json.loads((folder / "config.json").read_text())
    if record:  # as the engine writes it
        config["wsurgery"] = {"version": "0.1.0", "operation": "quantize", "command": "wsurgery quantize org/base q",
                              "base": "org/base", "adapters": [],
                              "quantization": {"quant_type": "nf4", "blocksize": 64, "double_quant": True}}
    else:  # as transformers + bitsandbytes write it
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                         "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}
    (folder / "config.json").write_text(json.dumps(config))
    card = ModelCard(model_card(folder, "alice/q"))
    assert card.data.base_model_relation == "quantized" and card.data.library_name == "transformers"
    assert ("nf4" if record else "fp4") in card.data.tags
    assert card.data.base_model == ("org/base" if record else None)
    if record:
        assert "nf4, block size 64, double quantization" in card.text and "`wsurgery quantize org/base q`" in card.text


@pytest.mark.parametrize("command", ["quantize", "dequantize", "extract", "convert", "combine"])
def test_every_command_that_writes_a_folder_pushes_it(hub, tmp_path, capfd, command):
    """--push-to on the other commands: the folder they wrote, as written, plus a generated card."""
    out = tmp_path / "out"
    wsurgery.merge(BASE, LORA, tmp_path / "tuned", progress=False)
    args = {"quantize": ["quantize", str(BASE), str(out), "--nf4"],
            "dequantize": ["dequantize", str(tmp_path / "q"), str(out)],
            "extract": ["extract", str(BASE), str(tmp_path / "tuned"), str(out), "--rank", "8"],
            "convert": ["convert", str(LORA), str(out), "--to", "lokr"],
            "combine": ["combine", str(out), f"{LORA}:0.5", str(LORA)]}[command]
    if command == "dequantize":
        wsurgery.api.quantize(BASE, tmp_path / "q", progress=False)
    code, output = cli(capfd, *args, "-q", "--push-to", "alice/out", "--token", TOKEN)
    assert code == 0, output
    [commit] = hub.commits
    assert {k: v for k, v in commit["files"].items() if k != "README.md"} == folder_files(out)
    assert "README.md" in commit["files"]


def test_push_to_with_a_gguf_output_is_refused_before_any_work(hub, tmp_path, capfd):
    code, output = cli(capfd, "merge", str(BASE), str(LORA), str(tmp_path / "m.gguf"), "--push-to", "alice/m",
                       "--token", TOKEN)
    assert code == 2 and "uploads a folder" in output and not (tmp_path / "m.gguf").exists()
    assert not hub.commits


def test_card_of_a_folder_not_written_by_wsurgery_takes_the_base_from_name_or_path(hub, tmp_path, capfd):
    """transformers' save_pretrained records the model's origin in config.json's _name_or_path: a repo id
    there is the base; a local path is neither the base nor published in the card."""
    for repo, name_or_path, expected in [("alice/a", "org/tiny-llama", "org/tiny-llama"),
                                         ("alice/b", "/home/alice/models/tiny-llama", None)]:
        folder = tmp_path / repo
        shutil.copytree(BASE, folder)
        config = json.loads((folder / "config.json").read_text())
        config["_name_or_path"] = name_or_path
        (folder / "config.json").write_text(json.dumps(config))
        code, output = cli(capfd, "push", str(folder), repo, "--token", TOKEN, "-q")
        assert code == 0, output
        card = card_of(hub.repos[repo].files("main")["README.md"])
        assert card.data.base_model == expected
        assert "/home/alice" not in card.text


def _leftover_temporary_folder(folder: Path) -> str:
    """An interrupted wsurgery write inside the folder: its temporary sibling with a truncated shard."""
    leftover = folder / "sub" / ".out.wsurgery-tmp-4242"
    leftover.mkdir(parents=True)
    shard = (folder / "model-00001-of-00004.safetensors").read_bytes()
    (leftover / "model.safetensors").write_bytes(shard[: len(shard) // 2])
    return "sub/.out.wsurgery-tmp-4242"


def _appended_bytes(folder: Path) -> str:
    with open(folder / "model-00002-of-00004.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    return "model-00002-of-00004.safetensors"


def _short_data(folder: Path) -> str:
    """The last tensor's bytes end before the file does not: the header's offsets stop short of the end."""
    path = folder / "model-00003-of-00004.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["shape"], header[last]["dtype"] = [(end - begin) // 2 // 4], "F32"
    header[last]["data_offsets"] = [begin, begin + (end - begin) // 2 // 4 * 4]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
    return "model-00003-of-00004.safetensors"


@pytest.mark.parametrize("damage", [_leftover_temporary_folder, _appended_bytes, _short_data])
def test_push_refuses_temporaries_at_any_depth_and_shards_whose_data_does_not_end_at_the_end(hub, tmp_path, capfd,
                                                                                            damage):
    folder = tmp_path / "model"
    shutil.copytree(BASE, folder)
    expected = damage(folder)
    before = folder_files(folder)
    code, output = cli(capfd, "push", str(folder), "alice/model", "--token", TOKEN)
    assert code == 1 and output.count("\n") == 1 and "Traceback" not in output, output
    assert output.startswith("wsurgery: error:") and expected in output, output
    assert hub.requests == [] and folder_files(folder) == before


def test_repo_whose_index_names_shards_in_a_subfolder_or_with_dot_slash(hub, tmp_path, capfd):
    """`./x` and `sub/x` are legal shard names (the reader takes them): a repo-id input fetches those shards."""
    files = folder_files(BASE)
    index = json.loads(files["model.safetensors.index.json"])
    shards = sorted(set(index["weight_map"].values()))
    moved = {name: (f"sub/{name}" if i % 2 else f"./{name}") for i, name in enumerate(shards)}
    index["weight_map"] = {t: moved[s] for t, s in index["weight_map"].items()}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    for i, name in enumerate(shards):
        if i % 2:
            files[f"sub/{name}"] = files.pop(name)
    hub.add_repo("org/odd-index", files)
    out = tmp_path / "merged"
    code, output = cli(capfd, "merge", "org/odd-index", str(LORA), str(out), "-q")
    assert code == 0, output
    wsurgery.merge(BASE, LORA, tmp_path / "local", progress=False)
    a, b = load_all(out), load_all(tmp_path / "local")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where", ["tokenizer.json", "extra/notes.txt"])
def test_push_refuses_links_to_files_outside_the_folder(hub, tmp_path, where):
    """A link inside the folder to a private file elsewhere would publish it: refused before any request;
    a link that stays inside the folder is fine."""
    folder = tmp_path / "model"
    shutil.copytree(BASE, folder)
    secret = tmp_path / "private.txt"
    secret.write_text("not for the Hub")
    link = folder / where
    link.parent.mkdir(exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    with pytest.raises(InputError, match="links to files outside"):
        wsurgery.push(folder, "alice/model", token=TOKEN, progress=False)
    assert hub.requests == []
    link.unlink()
    shutil.copy(secret, folder / "copied.txt")
    link.symlink_to(folder / "copied.txt")
    wsurgery.push(folder, "alice/model", token=TOKEN, progress=False)
