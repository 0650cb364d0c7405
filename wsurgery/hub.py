"""The Hugging Face Hub: repo ids as inputs, and pushing output folders.

Inputs: a repo id where a path is expected resolves to a local snapshot (``resolve``). Only what a
job reads is fetched: the weights the folder reader would pick (the shards a safetensors index
names, else ``model.safetensors``, else ``pytorch_model.bin`` and its shards; never duplicate
``.bin`` or ``consolidated`` copies), configs and tokenizer files, all from the repo's top level.
``HF_HOME`` and ``HF_HUB_OFFLINE`` are honoured by huggingface_hub; offline, the local cache is used.

Pushing (``push``): the folder is checked first (index against shards, every header parses, no
unfinished temporary files), a model card is generated where the folder has none (never written into
the folder), and huggingface_hub's folder upload sends it (resumable: a re-run skips what arrived).
The token comes from ``--token``, ``HF_TOKEN`` or the stored login and never appears in messages.

For commands that write a folder, two helpers give them ``--push-to``; reuse them::

    @push_options                     # adds --push-to/--private/--revision/--create-pr/--token and
    def command(..., push): ...       # hands the command one `push` argument: a PushTarget or None
        ...write OUT...
        push_after(OUT, push, provenance)   # pushes OUT when --push-to was given; no-op otherwise
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import json
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .checkpoint import open_checkpoint, read_header
from .checkpoint.output import is_temporary_name
from .checkpoint.reader import resolves_inside
from .errors import InputError, WsurgeryError
from .model_card import model_card

if TYPE_CHECKING:
    from huggingface_hub import HfApi

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SIDE = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja"]
_MODEL_ST = ["*.safetensors", "*.safetensors.index.json", *_SIDE]
_MODEL_BIN = ["*.bin", "*.bin.index.json", *_SIDE]
_ADAPTER = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json"]
# Left behind by an interrupted write or download (besides wsurgery's own temporary siblings, which
# ``is_temporary_name`` tells): pushing them would publish a broken repo.
_STRAY = ["*.tmp", "*.incomplete", "*.part", "*.partial"]
_NOT_UPLOADED = (".git", ".cache")  # folders huggingface_hub's folder upload skips too
_MAX_LISTED = 5


class HubError(WsurgeryError):
    """The Hub refused a request or could not be reached."""


def looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and not Path(spec).exists()


# -- inputs


def resolve(spec: str | Path, kind: str = "model", revision: str | None = None) -> Path:
    """Return a local path for ``spec``: the path itself if it exists, else a Hub snapshot."""
    path = Path(spec)
    if path.exists() or not looks_like_repo_id(str(spec)):
        return path
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    try:
        try:
            return _download(str(spec), kind, revision)
        except (OfflineModeIsEnabled, *_network_errors()):
            return _from_cache(str(spec), kind, revision)
    except GatedRepoError:
        raise InputError(f"{spec}: a gated Hub repository; accept its conditions on its page, then pass a token "
                         "(--token, HF_TOKEN or `hf auth login`) of the account that did") from None
    except RepositoryNotFoundError:
        raise InputError(f"{spec}: no such local path, and no such Hub repository (or no access to it)") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{spec}: no such local path, and the Hub repository is not in the local cache "
                         "(offline or unreachable); download it first or pass a local path") from None
    except Exception as e:  # noqa: BLE001 -- HTTP and network failures of any kind become one line
        if isinstance(e, WsurgeryError):
            raise
        raise _hub_error(e, str(spec), doing="could not fetch it from the Hub") from None


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
        weights = [w for w in ("adapter_model.safetensors", "adapter_model.bin") if w in top][:1]
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


# -- pushing


@dataclass(frozen=True)
class PushTarget:
    """Where and how to push: the CLI's --push-to options, or ``wsurgery.push``'s arguments."""

    repo_id: str
    private: bool = False
    revision: str | None = None  # a branch (created if missing) or refs/pr/N
    create_pr: bool = False
    commit_message: str | None = None
    token: str | None = None  # else HF_TOKEN, else the stored login


@dataclass
class PushResult:
    repo_id: str
    commit_url: str
    pr_url: str | None
    files: list[str]  # as uploaded, README.md included
    card: str  # "generated", "kept" (the folder's own), or "on the Hub" (the repo's own, left alone)


def check_target(target: PushTarget) -> None:
    """Refuse a push that cannot work, before any work or any request."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise InputError(f"{target.repo_id}: HF_HUB_OFFLINE is set, and pushing needs the Hub; unset it to push")
    if not _REPO_ID.match(target.repo_id):
        raise InputError(f"{target.repo_id}: not a Hub repo id; push to NAMESPACE/NAME (your user or organization)")
    if target.create_pr and target.revision and target.revision != "main":
        raise InputError(f"--create-pr opens a pull request against main; drop --revision {target.revision} "
                         "(to add to a pull request already opened, pass --revision refs/pr/N without --create-pr)")


def check_login(target: PushTarget) -> None:
    """Refuse a missing or rejected token before a long job, not after it (one whoami request)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalTokenNotFoundError

    try:
        HfApi(token=target.token).whoami()
    except LocalTokenNotFoundError:
        raise InputError(f"{target.repo_id}: pushing needs a Hub token; pass --token, set HF_TOKEN, "
                         "or log in with `hf auth login`") from None
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, target.repo_id, target.token) from None


def check_folder(folder: Path) -> list[str]:
    """Check that ``folder`` is a whole checkpoint or adapter folder; return the files to upload.

    Every safetensors header must parse and its data end exactly at the file's end, every index must
    name only existing shards, no shard may be missing from its index, and no unfinished temporary
    file or folder may lie anywhere inside.
    """
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    if _is_stray(folder.resolve().name):
        raise InputError(f"{folder}: an unfinished temporary output folder; push the finished one")
    inside = [p.relative_to(folder) for p in folder.rglob("*")]
    inside = [p for p in inside if p.parts[0] not in _NOT_UPLOADED]
    stray = sorted({Path(*p.parts[:i + 1]).as_posix() for p in inside for i, part in enumerate(p.parts)
                    if _is_stray(part)})
    if stray:
        raise InputError(f"{folder}: holds unfinished temporary files ({_listing(stray)}); "
                         "remove them or re-run the command that wrote the folder")
    files = sorted(p.as_posix() for p in inside if (folder / p).is_file())
    outside = [f for f in files if not resolves_inside(folder / f, folder)]
    if outside:  # a link out of the folder would publish a file its owner never meant to push
        raise InputError(f"{folder}: holds links to files outside it ({_listing(outside)}); copy what should be "
                         "published into the folder, or remove the links")
    if (folder / "adapter_config.json").is_file():
        _check_adapter(folder)
    else:
        _check_weights(folder, [f for f in files if "/" not in f])
    for name in files:  # at any depth; the reader holds the data section to end exactly at the file's end
        if name.endswith(".safetensors"):
            read_header(folder / name)
    return files


def _is_stray(name: str) -> bool:
    return is_temporary_name(name) or any(fnmatch.fnmatch(name, p) for p in _STRAY)


def _check_adapter(folder: Path) -> None:
    from .adapters import load_config

    load_config(folder)
    if (folder / "adapter_model.safetensors").is_file():
        read_header(folder / "adapter_model.safetensors")
    elif (folder / "adapter_model.bin").is_file():
        open_checkpoint(folder / "adapter_model.bin")
    else:
        raise InputError(f"{folder}: adapter_config.json without adapter_model.safetensors or adapter_model.bin")


def _check_weights(folder: Path, top: list[str]) -> None:
    indexed: set[str] = set()
    for index in (f for f in top if f.endswith(".index.json")):
        indexed |= {p.name for p in open_checkpoint(folder / index).shards}
    weights = [f for f in top if f.endswith(".safetensors") or fnmatch.fnmatch(f, "pytorch_model*.bin")]
    for name in weights:
        if name in indexed:
            continue
        if any(name.endswith(suffix) and name.startswith(prefix) for prefix, suffix in _shard_families(indexed)):
            raise InputError(f"{folder / name}: a shard that no index names; remove it, or fix the index")
        open_checkpoint(folder / name)
    ggufs = [f for f in top if f.endswith(".gguf")]
    for name in ggufs:
        _check_gguf(folder / name)
    if not weights and not ggufs:
        raise InputError(f"{folder}: no model weights or adapter to push (expected .safetensors, .bin, .gguf "
                         "or adapter_config.json)")


def _shard_families(shards: set[str]) -> set[tuple[str, str]]:
    """(prefix, suffix) of indexed shard names such as ``model-00001-of-00004.safetensors``."""
    families = set()
    for name in shards:
        m = re.match(r"^(.*?)-\d+-of-\d+(\.\w+)$", name)
        if m:
            families.add((m.group(1) + "-", m.group(2)))
    return families


def _check_gguf(path: Path) -> None:
    import gguf

    try:
        gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 -- the reader fails on a broken file in many ways
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a readable GGUF file ({first}); the file is corrupt or truncated") from None


def push(folder: str | Path, target: PushTarget, provenance: dict[str, Any] | None = None,
         progress: bool = True) -> PushResult:
    """Check ``folder``, then upload it (with a generated model card where it has none) to the Hub."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    check_target(target)
    files = check_folder(folder)
    api = HfApi(token=target.token)
    try:
        api.create_repo(target.repo_id, private=target.private or None, exist_ok=True)
        if target.revision and not target.revision.startswith("refs/"):
            api.create_branch(target.repo_id, branch=target.revision, exist_ok=True)
        card = "kept" if "README.md" in files else "on the Hub" if api.file_exists(
            target.repo_id, "README.md", revision=None if target.create_pr else target.revision) else "generated"
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, target.repo_id, target.token) from None
    readme = model_card(folder, target.repo_id, provenance) if card == "generated" else None
    with _staged(folder, files, readme) as staged, _progress_bars(progress):
        try:
            info = api.upload_folder(repo_id=target.repo_id, folder_path=staged, revision=target.revision,
                                     create_pr=target.create_pr,
                                     commit_message=target.commit_message or "Upload with wsurgery")
        except Exception as e:  # noqa: BLE001
            raise _hub_error(e, target.repo_id, target.token, doing=_upload_state(api, target, staged)) from None
    uploaded = files + (["README.md"] if readme else [])
    return PushResult(target.repo_id, str(info.commit_url), info.pr_url, sorted(uploaded), card)


@contextmanager
def _staged(folder: Path, files: list[str], readme: str | None) -> Iterator[Path]:
    """A temporary mirror of ``folder`` made of symlinks, plus the generated card: the folder itself
    is never written to, and the upload still reads each file straight from where it lies."""
    with tempfile.TemporaryDirectory(prefix="wsurgery-push-") as tmp:
        root = Path(tmp)
        for name in files:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).symlink_to((folder / name).resolve())
        if readme is not None:
            (root / "README.md").write_text(readme)
        yield root


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def _upload_state(api: HfApi, target: PushTarget, staged: Path) -> str:
    """After a failed upload: which files are in the repo (same path and size), which are not, and
    that a re-run resumes."""
    resume = ("re-running the push resumes it: files already there are skipped and data already sent "
              "is not sent again")
    local = {p.relative_to(staged).as_posix(): p.stat().st_size for p in staged.rglob("*") if p.is_file()}
    if target.create_pr:
        return (f"the upload of {len(local)} files failed and no pull request can be confirmed; {resume} "
                "(with --revision refs/pr/N if a pull request was opened)")
    try:
        remote = {f.path: f.size for f in api.list_repo_tree(target.repo_id, revision=target.revision,
                                                             recursive=True) if hasattr(f, "size")}
    except Exception:  # noqa: BLE001 -- the Hub is still unreachable: say so rather than guess
        return f"the upload failed and which of the {len(local)} files reached it could not be checked; {resume}"
    done = sorted(f for f, size in local.items() if remote.get(f) == size)
    missing = sorted(set(local) - set(done))
    if not missing:
        return f"all {len(local)} files are in it already; {resume}"
    there = f"{len(done)} of {len(local)} files are in it ({_listing(done)})" if done else \
        f"none of the {len(local)} files is in it yet"
    return f"the upload failed: {there}, not uploaded: {_listing(missing)}; {resume}"


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


# -- errors


def _hub_error(e: BaseException, repo_id: str, token: str | None = None, doing: str | None = None) -> WsurgeryError:
    """One line for any Hub failure: what went wrong, with which repo, and what to do; never the token."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    cause = _root_cause(e)
    status = _status(cause)
    if isinstance(cause, WsurgeryError):
        return cause
    if status == 401:
        message = (f"{repo_id}: the Hub rejected the token (401 Unauthorized); pass a valid token with --token, "
                   "set HF_TOKEN, or log in with `hf auth login`" if token or _token() else
                   f"{repo_id}: the Hub needs a login for this (401 Unauthorized); pass --token, set HF_TOKEN, "
                   "or log in with `hf auth login`")
    elif status == 403:
        message = (f"{repo_id}: the token may not write there (403 Forbidden); use a token with write access "
                   "to that namespace")
    elif isinstance(cause, RevisionNotFoundError):
        message = f"{repo_id}: no such revision on the Hub"
    elif isinstance(cause, RepositoryNotFoundError):
        message = f"{repo_id}: no such Hub repository, or no access to it"
    elif status is not None:
        message = f"{repo_id}: the Hub answered {status}: {_first_line(cause)}"
    elif isinstance(cause, _network_errors()):
        message = f"{repo_id}: the connection to the Hub failed ({type(cause).__name__}: {_first_line(cause)})"
    else:
        message = f"{repo_id}: {type(cause).__name__}: {_first_line(cause)}"
    if doing:
        message += f"; {doing}"
    return HubError(_redact(message, token))


def _root_cause(e: BaseException) -> BaseException:
    """The HTTP or network error behind wrappers (huggingface_hub wraps upload failures)."""
    from huggingface_hub.errors import HfHubHTTPError

    seen = e
    while seen is not None:
        if isinstance(seen, (HfHubHTTPError, WsurgeryError, *_network_errors())):
            return seen
        seen = seen.__cause__ or seen.__context__
    return e


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


@functools.cache
def _network_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's transport errors (connection refused, reset, dropped, timed out)."""
    try:
        import httpx2 as http
    except ImportError:
        try:
            import httpx as http
        except ImportError:
            return (ConnectionError, TimeoutError)
    return (http.TransportError, ConnectionError, TimeoutError)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _redact(text: str, token: str | None) -> str:
    for secret in {token, os.environ.get("HF_TOKEN"), _token()} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def redacted_command(argv: list[str]) -> str:
    """The command line as it may be recorded (config, model card): with any --token value hidden."""
    out, hide = [], False
    for arg in argv:
        out.append("***" if hide else re.sub(r"^(--token=).+", r"\1***", arg))
        hide = arg == "--token"
    return " ".join(out)


# -- the CLI's --push-to, for any command that writes a folder


def push_options(command: Callable) -> Callable:
    """Click decorator: adds --push-to/--private/--revision/--create-pr/--token to ``command`` and
    passes them as one ``push`` argument (a PushTarget, or None without --push-to). The repo id and
    the token are checked before the command runs, so that they fail before a long job."""

    @functools.wraps(command)
    def wrapper(*args, push_to: str | None, private: bool, revision: str | None, create_pr: bool,
                token: str | None, **kwargs):
        target = None
        if push_to:
            target = PushTarget(push_to, private, revision, create_pr, None, token)
            check_target(target)
            check_login(target)
        elif private or revision or create_pr or token:
            raise click.UsageError("--private, --revision, --create-pr and --token apply only with --push-to")
        return command(*args, push=target, **kwargs)

    for option in reversed(_PUSH_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def push_after(out: str | Path, push_target: PushTarget | None, provenance: dict[str, Any] | None = None,
               progress: bool = True) -> PushResult | None:
    """Push the folder a command just wrote, when --push-to was given; report it on stderr."""
    if push_target is None:
        return None
    try:
        result = push(out, push_target, provenance, progress)
    except WsurgeryError as e:
        raise type(e)(f"{e}; {out} is written: push it again with `wsurgery push {out} {push_target.repo_id}`") from None
    report_push(result)
    return result


def report_push(result: PushResult) -> None:
    card = {"generated": "a generated model card", "kept": "the folder's README.md",
            "on the Hub": "the model card already on the Hub left as it is"}[result.card]
    click.echo(f"pushed {len(result.files)} file(s) with {card} to {result.repo_id}: {result.commit_url}", err=True)
    if result.pr_url:
        click.echo(f"pull request: {result.pr_url}", err=True)


_PUSH_OPTIONS = [
    click.option("--push-to", metavar="REPO_ID", default=None,
                 help="Then push OUT to this Hub repo (created if missing), with a model card if OUT has none."),
    click.option("--private", is_flag=True, help="With --push-to: create the repo private."),
    click.option("--revision", metavar="BRANCH", default=None,
                 help="With --push-to: push to this branch (created if missing) or refs/pr/N."),
    click.option("--create-pr", is_flag=True, help="With --push-to: open a pull request instead of committing to main."),
    click.option("--token", default=None, help="Hub token (default: HF_TOKEN, else the stored login). Never printed."),
]
