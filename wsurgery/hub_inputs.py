"""Hub repo ids as inputs: a repo id where a path is expected resolves to a local snapshot (``resolve``).

Only what a job reads is fetched: the weights the folder reader would pick (the shards a safetensors
index names, else ``model.safetensors``, else ``pytorch_model.bin`` and its shards; never duplicate
``.bin`` or ``consolidated`` copies), configs and tokenizer files, all from the repo's top level.
``HF_HOME`` and ``HF_HUB_OFFLINE`` are honoured by huggingface_hub; offline, the local cache is used.
A repo id is resolved once, where it enters the API (``wsurgery.api`` and the other public entry
points); everything below them takes local paths.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import posixpath
import re
from pathlib import Path

from .errors import InputError, WsurgeryError
from .hub_errors import hub_error, network_errors

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SIDE = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja"]
_MODEL_ST = ["*.safetensors", "*.safetensors.index.json", *_SIDE]
_MODEL_BIN = ["*.bin", "*.bin.index.json", *_SIDE]
_ADAPTER_WEIGHTS: tuple[str, ...] = ("adapter_model.safetensors", "adapter_model.bin")  # the reader's preference
_ADAPTER = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json"]


def looks_like_repo_id(spec: str) -> bool:
    return bool(REPO_ID.match(spec)) and not Path(spec).exists()


def cached_repo_id(path: Path) -> str | None:
    """The repo id of a Hub cache snapshot (``models--<org>--<name>/snapshots/<revision>``, what
    ``resolve`` returns for a repo id), or of a file in one; None for any other path."""
    folder = path if path.is_dir() else path.parent
    repo = folder.parent.parent
    if folder.parent.name != "snapshots" or not repo.name.startswith("models--"):
        return None
    org, sep, name = repo.name.removeprefix("models--").partition("--")
    return f"{org}/{name}" if sep and org and name else None


def resolve(spec: str | Path, kind: str = "model", revision: str | None = None) -> Path:
    """Return a local path for ``spec``: the path itself if it exists, else a Hub snapshot."""
    path = Path(spec)
    if path.exists() or not looks_like_repo_id(str(spec)):
        return path
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    unreachable: tuple[type[BaseException], ...] = (OfflineModeIsEnabled, *network_errors())
    try:
        try:
            return _download(str(spec), kind, revision)
        except unreachable:
            return _from_cache(str(spec), kind, revision)
    except GatedRepoError:
        raise InputError(f"{spec}: a gated Hub repository; accept its conditions on its page, then pass a token "
                         "(--token, HF_TOKEN or `hf auth login`) of the account that did") from None
    except RepositoryNotFoundError:
        raise InputError(f"{spec}: no such local path, and no such Hub repository (or no access to it)") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{spec}: no such local path, and the Hub repository is not in the local cache "
                         "(offline or unreachable); download it first or pass a local path") from None
    except Exception as e:
        if isinstance(e, WsurgeryError):
            raise
        raise hub_error(e, str(spec), doing="could not fetch it from the Hub") from None


def _download(repo_id: str, kind: str, revision: str | None) -> Path:
    """Fetch the files a job reads: listed first, so that nothing else is downloaded."""
    from huggingface_hub import HfApi, snapshot_download

    files = [s.rfilename for s in HfApi().model_info(repo_id, revision=revision).siblings or []]
    wanted, index = needed_files(files, kind)
    if not wanted:
        expected = ("adapter_config.json with adapter_model.safetensors or adapter_model.bin" if kind == "adapter"
                    else "model.safetensors, a safetensors index with its shards, or pytorch_model.bin")
        raise InputError(f"{repo_id}: the Hub repository has none of the files wsurgery reads at its top level "
                         f"({expected})")
    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[glob.escape(f) for f in wanted]))
    shards = _shards_named_by(folder / index) if index else []
    if shards:
        commit = folder.name  # the snapshot folder is named by its commit: no second lookup of the revision
        folder = Path(snapshot_download(repo_id, revision=commit, allow_patterns=[glob.escape(s) for s in shards]))
    return folder


def needed_files(files: list[str], kind: str) -> tuple[list[str], str | None]:
    """The top-level files a job reads, and the index whose shards are still to fetch (if any).

    The weights are the ones the folder reader would pick, in its order of preference.
    """
    top = [f for f in files if "/" not in f]
    if kind == "adapter":
        weights = [w for w in _ADAPTER_WEIGHTS if w in top][:1]
        return ([f for f in ("adapter_config.json", *weights) if f in top] if weights else []), None
    st_indexes = [f for f in top if f.endswith(".safetensors.index.json") and not f.startswith("adapter")]
    singles = [f for f in top if f.endswith(".safetensors") and not f.startswith("adapter_model")]
    if st_indexes:  # the standard one alone; several others are left for the reader to refuse
        index = "model.safetensors.index.json" if "model.safetensors.index.json" in st_indexes else st_indexes[0]
        weights = [index] if index == "model.safetensors.index.json" else st_indexes
    elif singles:
        weights, index = ["model.safetensors"] if "model.safetensors" in singles else singles, None
    elif "pytorch_model.bin.index.json" in top:
        weights, index = ["pytorch_model.bin.index.json"], "pytorch_model.bin.index.json"
    elif "pytorch_model.bin" in top:
        weights, index = ["pytorch_model.bin"], None
    else:
        return [], None
    side = [f for f in top if any(fnmatch.fnmatch(f, p) for p in _SIDE) and not f.endswith(".index.json")]
    return sorted({*weights, *side}), index


def _shards_named_by(index: Path) -> list[str]:
    """The shard files an index names; [] for a broken index (opening the checkpoint reports it)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = {posixpath.normpath(s) for s in weight_map.values() if isinstance(s, str) and s}
        # As the reader takes them: `./x` and `sub/x` are shards inside the repo; what leaves it is not fetched.
        return sorted(n for n in names if n not in (".", "..") and not n.startswith(("/", "../")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _from_cache(repo_id: str, kind: str, revision: str | None) -> Path:
    """Offline or unreachable Hub: what the local cache holds (the listing is not available)."""
    from huggingface_hub import snapshot_download

    patterns = _ADAPTER if kind == "adapter" else _MODEL_ST
    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    if kind == "model" and not any(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_MODEL_BIN))
    return folder
