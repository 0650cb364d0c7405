"""Pushing output folders to the Hugging Face Hub (repo ids as inputs are ``hub_inputs``).

``push``: the folder is checked first (index against shards, every header parses, no unfinished
temporary files), a model card is generated where the folder has none (never written into the
folder), and huggingface_hub's folder upload sends it (resumable: a re-run skips what arrived).
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
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .checkpoint.formats import open_checkpoint, pushed_format
from .checkpoint.output import is_temporary_name
from .checkpoint.reader import resolves_inside
from .checkpoint.safetensors_file import read_header
from .errors import InputError, WsurgeryError
from .hub_errors import hub_error
from .hub_inputs import REPO_ID
from .model_card import model_card

if TYPE_CHECKING:
    from huggingface_hub import HfApi

# Left behind by an interrupted write or download (besides wsurgery's own temporary siblings, which
# ``is_temporary_name`` tells): pushing them would publish a broken repo.
_STRAY = ["*.tmp", "*.incomplete", "*.part", "*.partial"]
_NOT_UPLOADED = (".git", ".cache")  # folders huggingface_hub's folder upload skips too
_MAX_LISTED = 5


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
    if not REPO_ID.match(target.repo_id):
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
    except Exception as e:
        raise hub_error(e, target.repo_id, target.token) from None


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
    weights = [(f, fmt) for f in top if (fmt := pushed_format(f)) is not None]
    families = _shard_families(indexed)
    for name, fmt in weights:
        if name in indexed:
            continue
        if any(name.endswith(suffix) and name.startswith(prefix) for prefix, suffix in families):
            raise InputError(f"{folder / name}: a shard that no index names; remove it, or fix the index")
        fmt.check_pushed(folder / name)
    if not weights:
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
    except Exception as e:
        raise hub_error(e, target.repo_id, target.token) from None
    readme = model_card(folder, target.repo_id, provenance) if card == "generated" else None
    with _staged(folder, files, readme) as staged, _progress_bars(progress):
        try:
            info = api.upload_folder(repo_id=target.repo_id, folder_path=staged, revision=target.revision,
                                     create_pr=target.create_pr,
                                     commit_message=target.commit_message or "Upload with wsurgery")
        except Exception as e:
            raise hub_error(e, target.repo_id, target.token, doing=_upload_state(api, target, staged)) from None
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
    except Exception:
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
        again = f"wsurgery push {out} {push_target.repo_id}"
        raise type(e)(f"{e}; {out} is written: push it again with `{again}`") from None
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
    click.option("--create-pr", is_flag=True,
                 help="With --push-to: open a pull request instead of committing to main."),
    click.option("--token", default=None, help="Hub token (default: HF_TOKEN, else the stored login). Never printed."),
]
