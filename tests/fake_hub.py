"""A small local stand-in for the Hugging Face Hub HTTP API, so that tests need no network.

It answers just the endpoints huggingface_hub (2.4, with ``HF_HUB_DISABLE_XET=1``: plain LFS) calls
to create a repo and a branch, push a folder (preupload, LFS batch + PUT + verify, NDJSON commit,
README metadata validation), list and download files (repo info, tree, resolve), and whoami.
It keeps repos in memory and records every request, so tests can check what reached the "Hub".

Tokens: ``tokens`` maps a token to its user; a user may write to repos in its own namespace.
An unknown token gets 401, a write elsewhere 403, a missing repo 404 (``X-Error-Code: RepoNotFound``).
Set ``drop`` to a path fragment to make the server close the socket instead of answering such requests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Request:
    method: str
    path: str  # unquoted, without the query
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Repo:
    private: bool = False
    gated: bool = False  # readable with any valid token (as if its conditions were accepted)
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit sha
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> files

    def files(self, revision: str) -> dict[str, bytes] | None:
        sha = self.refs.get(revision, revision)
        return self.snapshots.get(sha)


class FakeHub:
    """The server and its state; use as a context manager (``with FakeHub() as hub: hub.url``)."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {"hf_alice_write_token": "alice"}
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[Request] = []
        self.commits: list[dict] = []  # repo, revision, create_pr, summary, files (path -> bytes)
        self.drop: str | None = None
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False, gated: bool = False) -> str:
        """Create ``repo_id`` with one commit on main holding ``files``; return the commit sha."""
        self.repos[repo_id] = Repo(private=private, gated=gated)
        return self._commit(repo_id, "main", dict(files))

    def requested(self, method: str, fragment: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and fragment in r.path]

    def _commit(self, repo_id: str, ref: str, files: dict[str, bytes]) -> str:
        repo = self.repos[repo_id]
        sha = hashlib.sha1(f"{repo_id}{ref}{len(self.commits)}{sorted(files)}".encode()).hexdigest()
        repo.snapshots[sha] = files
        repo.refs[ref] = sha
        return sha


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    ROUTES = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(/.*)?", "tree"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)", "branch"),
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("POST", r"/lfs/(?P<oid>[0-9a-f]{64})/verify", "lfs_verify"),
        ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", "resolve"),
        ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", "resolve"),
    ]

    def log_message(self, *args) -> None:  # quiet
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- plumbing

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.hub.requests.append(Request(method, unquote(url.path), query, headers, self.body))
        if self.hub.drop and self.hub.drop in unquote(url.path):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.user = self._user()
        if self.user == "":
            return self._error(401, "Invalid credentials in Authorization header")
        for verb, pattern, name in self.ROUTES:
            m = re.fullmatch(pattern, url.path)
            if verb == method and m:
                args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                return getattr(self, "_" + name)(query=query, **args)
        self._error(404, f"no route for {method} {url.path}")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _user(self) -> str | None:
        """The token's user, None without a token, "" for an unknown token."""
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        return self.hub.tokens.get(auth.removeprefix("Bearer "), "")

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        for k, v in {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
        self._json({"error": message}, status, headers)

    def _readable(self, repo_id: str) -> Repo | None:
        """The repo if this request may read it; else answer 404 (as the Hub does) and return None."""
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and self.user != repo_id.split("/")[0]):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if repo.gated and self.user is None:
            self._error(401, "Access to this model is restricted", "GatedRepo")
            return None
        return repo

    def _writable(self, repo_id: str) -> Repo | None:
        if self.user is None:
            self._error(401, "You must be authenticated to write")
            return None
        if self.user != repo_id.split("/")[0]:
            self._error(403, f"You don't have the rights to write to {repo_id}")
            return None
        return self._readable(repo_id)

    # -- endpoints

    def _whoami(self, query) -> None:
        if self.user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        self._json({"type": "user", "name": self.user, "auth": {"accessToken": {"role": "write"}}})

    def _create_repo(self, query) -> None:
        payload = json.loads(self.body)
        repo_id = f"{payload['organization']}/{payload['name']}"
        if self.user is None or self.user != payload["organization"]:
            return self._error(401 if self.user is None else 403, f"cannot create {repo_id}")
        if repo_id in self.hub.repos:  # the Hub's 409 carries the url too
            return self._json({"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"}, 409)
        self.hub.add_repo(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                          private=payload.get("visibility") == "private")
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, query) -> None:
        self._json({"errors": [], "warnings": []})

    def _repo_info(self, query, repo: str, rev: str = "main") -> None:
        if (r := self._readable(repo)) is None:
            return
        files = r.files(rev)
        if files is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        self._json({"id": repo, "sha": r.refs.get(rev, rev), "private": r.private,
                    "siblings": [{"rfilename": p} for p in sorted(files)]})

    def _tree(self, query, repo: str, rev: str) -> None:
        if (r := self._readable(repo)) is None:
            return
        files = r.files(rev)
        if files is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        self._json([_tree_entry(path, data) for path, data in sorted(files.items())])

    def _preupload(self, query, repo: str, rev: str) -> None:
        if (r := self._writable(repo)) is None:
            return
        remote = r.files("main" if query.get("create_pr") else rev) or {}
        out = []
        for f in json.loads(self.body)["files"]:
            mode = "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"
            old = remote.get(f["path"])
            oid = None if old is None else (sha256(old) if mode == "lfs" else git_blob_oid(old))
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json({"files": out})

    def _lfs_batch(self, query, repo: str) -> None:
        if self._writable(repo) is None:
            return
        objects = []
        for obj in json.loads(self.body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs:  # already stored: no actions, the client skips it
                href = f"{self.hub.url}/lfs/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href}, "verify": {"href": href + "/verify"}}
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects})

    def _lfs_put(self, query, oid: str) -> None:
        if sha256(self.body) != oid:
            return self._error(400, "content does not match its sha256")
        self.hub.lfs[oid] = self.body
        self._send(200)

    def _lfs_verify(self, query, oid: str) -> None:
        self._json({}, 200 if oid in self.hub.lfs else 404)

    def _commit(self, query, repo: str, rev: str) -> None:
        if (r := self._writable(repo)) is None:
            return
        create_pr = query.get("create_pr") == "1"
        base = r.files("main" if create_pr else rev)
        if base is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        changed: dict[str, bytes] = {}
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                changed[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    return self._error(400, f"LFS object {value['oid']} was never uploaded")
                changed[value["path"]] = self.hub.lfs[value["oid"]]
        ref = f"refs/pr/{sum(k.startswith('refs/pr/') for k in r.refs) + 1}" if create_pr else rev
        sha = self.hub._commit(repo, ref, {**base, **changed})
        self.hub.commits.append({"repo": repo, "revision": ref, "create_pr": create_pr,
                                 "summary": header["summary"], "files": changed})
        pr_url = f"{self.hub.url}/{repo}/discussions/{ref.rsplit('/', 1)[-1]}" if create_pr else None
        self._json({"commitUrl": f"{self.hub.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url})

    def _branch(self, query, repo: str, rev: str) -> None:
        if (r := self._writable(repo)) is None:
            return
        if rev in r.refs:
            return self._error(409, "Reference already exists")
        r.refs[rev] = r.refs["main"]
        self._json({})

    def _resolve(self, query, repo: str, rev: str, file: str) -> None:
        if (r := self._readable(repo)) is None:
            return
        files = r.files(rev)
        if files is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if file not in files:
            return self._error(404, "Entry not found", "EntryNotFound")
        data = files[file]
        self._send(200, data, {"X-Repo-Commit": r.refs.get(rev, rev), "ETag": f'"{git_blob_oid(data)}"'},
                   content_type="application/octet-stream")


def _tree_entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
    return entry


def folder_files(folder: Path) -> dict[str, bytes]:
    """A folder's files by relative path, to seed a fake repo."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
