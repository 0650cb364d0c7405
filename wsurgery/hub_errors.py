"""Hub failures as one line each, for both directions (inputs and pushing): what went wrong, with which
repo, and what to do; never the token."""

from __future__ import annotations

import functools
import importlib
import os

from .errors import WsurgeryError


class HubError(WsurgeryError):
    """The Hub refused a request or could not be reached."""


def hub_error(e: BaseException, repo_id: str, token: str | None = None, doing: str | None = None) -> WsurgeryError:
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
        message = f"{repo_id}: the Hub answered {status}: {first_line(cause)}"
    elif isinstance(cause, network_errors()):
        message = f"{repo_id}: the connection to the Hub failed ({type(cause).__name__}: {first_line(cause)})"
    else:
        message = f"{repo_id}: {type(cause).__name__}: {first_line(cause)}"
    if doing:
        message += f"; {doing}"
    return HubError(_redact(message, token))


def _root_cause(e: BaseException) -> BaseException:
    """The HTTP or network error behind wrappers (huggingface_hub wraps upload failures)."""
    from huggingface_hub.errors import HfHubHTTPError

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, (HfHubHTTPError, WsurgeryError, *network_errors())):
            return seen
        seen = seen.__cause__ or seen.__context__
    return e


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


@functools.cache
def network_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's transport errors (connection refused, reset, dropped, timed out)."""
    for name in ("httpx2", "httpx"):
        try:
            http = importlib.import_module(name)
        except ImportError:
            continue
        return (http.TransportError, ConnectionError, TimeoutError)
    return (ConnectionError, TimeoutError)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _redact(text: str, token: str | None) -> str:
    for secret in {s for s in (token, os.environ.get("HF_TOKEN"), _token()) if s}:
        text = text.replace(secret, "***")
    return text
