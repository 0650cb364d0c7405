"""Hugging Face Hub inputs: a repo id where a path is expected resolves to a local snapshot.

Only what a job needs is fetched: safetensors weights (``.bin`` only when a repo has no
safetensors), the index, configs and tokenizer files. ``HF_HOME`` and ``HF_HUB_OFFLINE`` are
honoured by huggingface_hub itself; offline, only what is already cached is used.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SIDE = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja"]
_MODEL_ST = ["*.safetensors", "*.safetensors.index.json", *_SIDE]
_MODEL_BIN = ["*.bin", "*.bin.index.json", *_SIDE]
_ADAPTER = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json"]


def looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and not Path(spec).exists()


def resolve(spec: str | Path, kind: str = "model", revision: str | None = None) -> Path:
    """Return a local path for ``spec``: the path itself if it exists, else a Hub snapshot."""
    path = Path(spec)
    if path.exists() or not looks_like_repo_id(str(spec)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = _ADAPTER if kind == "adapter" else _MODEL_ST
    try:
        folder = Path(snapshot_download(str(spec), revision=revision, allow_patterns=patterns))
        if kind == "model" and not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(str(spec), revision=revision, allow_patterns=_MODEL_BIN))
    except RepositoryNotFoundError:
        raise InputError(f"{spec}: no such local path, and no such Hub repository (or no access to it)") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{spec}: no such local path, and the Hub repository is not in the local cache "
                         "(offline or unreachable); download it first or pass a local path") from None
    except (HfHubHTTPError, OSError) as e:
        raise InputError(f"{spec}: could not fetch from the Hub: {str(e).splitlines()[0]}") from None
    return folder
