"""A loopback HTTP server that answers like the Hugging Face Hub, for tests and benchmarks.

It serves repositories whose files the tests make, through the endpoints that the real
huggingface_hub client calls, and the datasets library through it: refs, repo and revision
info, tree listings (a folder level by level, or whole), paths-info, file metadata (HEAD)
and file downloads with Range; and pushes: repo creation and commits of files sent inline. LFS files (``.safetensors``
and ``.bin``) are redirected to ``localhost`` while the server listens on ``127.0.0.1``,
which takes the client's CDN path. Every request is logged. Faults can be injected: a
download cut off half-way, or server errors for the next requests matching a path.
Downloads can be throttled to a fixed bandwidth shared by all connections.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


_DIGESTS: dict[int, tuple[bytes, str, str, bytes]] = {}  # id(content) -> (content, sha256, git blob id, LFS pointer)
_DIGESTS_LOCK = threading.Lock()


def _digests(data: bytes) -> tuple[str, str, bytes]:
    """(sha256, git blob id, LFS pointer) of some content, made once per content object, as the real Hub stores
    them: a listing or a HEAD costs no hashing of a large file (which would take the CPU from a benchmark's
    scoring). The pointer is one object per content, so that its own digests are made once too."""
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(id(data))
    if known is not None and known[0] is data:
        return known[1], known[2], known[3]
    sha256 = hashlib.sha256(data).hexdigest()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
    with _DIGESTS_LOCK:
        _DIGESTS[id(data)] = (data, sha256, blob, pointer)  # the content is kept, so its id is not reused
    return sha256, blob, pointer


def sha256(data: bytes) -> str:
    return _digests(data)[0]


def git_blob_id(data: bytes) -> str:
    return _digests(data)[1]


def lfs_pointer(data: bytes) -> bytes:
    return _digests(data)[2]


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int


@dataclass
class Repo:
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit
    tags: dict[str, str] = field(default_factory=dict)  # tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> bytes


class LoopbackHub:
    """Serve repositories from memory on 127.0.0.1; use as a context manager."""

    def __init__(self, bandwidth: float | None = None, port: int = 0, per_connection: bool = False):
        self._port = port
        self.per_connection = per_connection  # the bandwidth is each connection's, not shared (a CDN's edge)
        self._connection = threading.local()
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content, for the CDN path
        self.log: list[Request] = []
        self.bandwidth = bandwidth  # bytes per second over all connections, or None
        self.cut_once: set[str] = set()  # request-path fragments whose next download stops half-way
        self.errors: dict[str, int] = {}  # path fragment -> number of 500 answers still to give
        self.hang_ups: dict[str, int] = {}  # path fragment -> number of requests still to close with no answer
        self._lock = threading.Lock()
        self._next_free = 0.0
        self._server: ThreadingHTTPServer | None = None

    # -- content ----------------------------------------------------------------------
    def add_revision(self, repo_id: str, branch: str, files: dict[str, bytes], repo_type: str = "model",
                     tag: bool = False) -> str:
        """Add (or move) a branch, or a tag, to a commit holding `files`; return the commit hash."""
        key = repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"
        repo = self.repos.setdefault(key, Repo())
        digest = hashlib.sha1(repo_id.encode() + branch.encode())
        for path in sorted(files):
            digest.update(path.encode() + sha256(files[path]).encode())
        commit = digest.hexdigest()
        repo.commits[commit] = dict(files)
        (repo.tags if tag else repo.branches)[branch] = commit
        for path, data in files.items():
            if path.endswith(LFS_SUFFIXES):
                self.blobs[sha256(data)] = data
        return commit

    def add_ref(self, repo_id: str, name: str, commit: str, tag: bool = False) -> None:
        """Point another branch (or tag) at an existing commit, as the Hub's main often is the last checkpoint."""
        repo = self.repos[repo_id]
        (repo.tags if tag else repo.branches)[name] = commit

    def add_model_dir(self, repo_id: str, branch: str, directory: Path) -> str:
        """Add a branch holding every file of a local model directory."""
        files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
        return self.add_revision(repo_id, branch, files)

    def requests(self, method: str | None = None, contains: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method) and contains in r.path]

    # -- server -----------------------------------------------------------------------
    def __enter__(self) -> LoopbackHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    CATCH_UP = 0.05  # seconds a sender may be behind its schedule and still catch up

    def throttle(self, n: int) -> None:
        """Wait until `n` more bytes fit in the bandwidth (shared by all connections, or each connection's own).

        The bytes keep to a schedule: a serving thread that wakes late (this process shares the CPU with the
        client it serves, unlike the real Hub) sends what it owes at once, if it is at most CATCH_UP seconds
        behind, so that the rate seen by the client is the bandwidth, not the bandwidth less this process's
        scheduling delays. A link that was idle longer starts afresh: idle time is no credit."""
        if not self.bandwidth:
            return
        clock = self._connection if self.per_connection else self  # each connection is served by its own thread
        with self._lock:
            now, scheduled = time.monotonic(), getattr(clock, "_next_free", 0.0)
            start = scheduled if scheduled >= now - self.CATCH_UP else now
            until = clock._next_free = start + n / self.bandwidth
        time.sleep(max(0.0, until - time.monotonic()))

    def take_cut(self, path: str) -> bool:
        with self._lock:
            for fragment in list(self.cut_once):
                if fragment in path:
                    self.cut_once.discard(fragment)
                    return True
        return False

    def take_error(self, path: str, faults: dict[str, int] | None = None) -> bool:
        faults = self.errors if faults is None else faults
        with self._lock:
            for fragment, count in faults.items():
                if fragment in path and count > 0:
                    faults[fragment] = count - 1
                    return True
        return False


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # -- plumbing ---------------------------------------------------------------------
    def _record(self, status: int) -> None:
        with self.hub._lock:
            self.hub.log.append(Request(self.command, self.path, self.headers.get("Range"), status))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj) -> None:
        self._send(200, json.dumps(obj).encode())

    def _error(self, code: str) -> None:
        self._send(404, json.dumps({"error": code}).encode(), {"X-Error-Code": code})

    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
        if self.hub.take_error(self.path):
            return self._send(500, b'{"error": "injected"}')
        if parts == ["api", "repos", "create"]:
            return self._create(json.loads(body))
        if parts == ["api", "validate-yaml"]:  # a model card's metadata: taken as it is
            return self._json({"errors": [], "warnings": []})
        if parts[:1] == ["api"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
            prefix = "" if parts[1] == "models" else f"{parts[1]}/"
            repo_id, branch = f"{prefix}{parts[2]}/{parts[3]}", "/".join(parts[5:])
            if repo_id not in self.hub.repos:
                return self._error("RepoNotFound")
            if parts[4] == "preupload":  # every file goes inline in the commit
                files = json.loads(body)["files"]
                return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                             for f in files]})
            return self._commit_files(repo_id, branch, body)
        # paths-info: the files and folders at the given paths of a revision
        form = parse_qs(body.decode())
        if parts[:1] != ["api"] or len(parts) != 6 or parts[4] != "paths-info":
            return self._error("EntryNotFound")
        prefix = "" if parts[1] == "models" else f"{parts[1]}/"
        return self._api(f"{prefix}{parts[2]}/{parts[3]}", "paths-info", [parts[5]], form.get("paths", []))

    def _create(self, payload: dict):
        """Create a repo, as `HfApi.create_repo` asks, holding what the Hub puts in a new one (a `.gitattributes` on
        main); 409 where it exists."""
        repo_id = "/".join(filter(None, (payload.get("organization"), payload["name"])))
        key = repo_id if payload.get("type", "model") == "model" else f"{payload['type']}s/{repo_id}"
        url = f"{self.hub.url}/{key}"
        if key in self.hub.repos:
            return self._send(409, json.dumps({"error": "You already created this repo", "url": url}).encode())
        self.hub.add_revision(repo_id, "main", {".gitattributes": GITATTRIBUTES},
                              repo_type=payload.get("type", "model"))
        return self._json({"url": url, "name": repo_id})

    def _commit_files(self, repo_id: str, branch: str, body: bytes):
        """Apply a commit's NDJSON (a header, then files inline in base64 and deletions) on top of the branch."""
        repo = self.hub.repos[repo_id]
        files = dict(repo.commits.get(repo.branches.get(branch, ""), {}))
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                return self._send(400, json.dumps({"error": f"{item['key']} is not supported here"}).encode())
        commit = self.hub.add_revision(repo_id, branch, files)
        return self._json({"commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit}", "commitOid": commit})

    def _route(self):
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
        if self.hub.take_error(self.path, self.hub.hang_ups):  # a network fault: the connection closes, no status line
            self._record(0)
            self.close_connection = True
            return self.connection.shutdown(2)
        if self.hub.take_error(self.path):
            return self._send(500, b'{"error": "injected"}')
        if parts[:1] == ["cdn"] and len(parts) == 2:
            data = self.hub.blobs.get(parts[1])
            return self._error("EntryNotFound") if data is None else self._bytes(data, parts[1])
        if parts[:2] in (["api", "models"], ["api", "datasets"]) and len(parts) >= 4:
            prefix = "" if parts[1] == "models" else "datasets/"
            verb, rest = (parts[4], parts[5:]) if len(parts) >= 5 else ("revision", ["main"])  # info: at main
            query = parse_qs(urlsplit(self.path).query)
            return self._api(f"{prefix}{parts[2]}/{parts[3]}", verb, rest, recursive=query.get("recursive") == ["True"]
                             or query.get("recursive") == ["true"])
        if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
            return self._resolve(f"datasets/{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:]))
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        self._error("EntryNotFound")

    def _commit(self, repo: Repo, rev: str) -> str | None:
        if rev in repo.branches or rev in repo.tags:
            return repo.branches.get(rev) or repo.tags[rev]
        return rev if rev in repo.commits else None

    # -- API --------------------------------------------------------------------------
    def _api(self, repo_id: str, verb: str, rest: list[str], paths: list[str] | None = None, recursive: bool = False):
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error("RepoNotFound")
        if verb == "refs":
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()]
            tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in repo.tags.items()]
            return self._json({"branches": branches, "converts": [], "tags": tags})
        if verb not in ("revision", "tree", "paths-info") or not rest:
            return self._error("EntryNotFound")
        commit = self._commit(repo, rest[0])
        if commit is None:
            return self._error("RevisionNotFound")
        files = repo.commits[commit]
        if verb == "revision":
            siblings = [{"rfilename": p} for p in sorted(files)]
            public_id = repo_id.removeprefix("datasets/")
            return self._json({"id": public_id, "modelId": public_id, "sha": commit, "siblings": siblings, "private": False})
        if verb == "paths-info":
            return self._json([self._entry(files, p.strip("/")) for p in paths or [] if self._entry(files, p.strip("/"))])
        folder = "/".join(rest[1:]).strip("/")
        if folder and self._entry(files, folder) is None:
            return self._error("EntryNotFound")
        under = [p for p in sorted(files) if not folder or p.startswith(f"{folder}/")]
        depth = folder.count("/") + 1 if folder else 0
        folders = sorted({"/".join(p.split("/")[:n]) for p in under for n in range(depth + 1, p.count("/") + 1)})
        if not recursive:  # a folder's own files and folders; recursive listings hold every level
            under = [p for p in under if p.count("/") == depth]
            folders = [f for f in folders if f.count("/") == depth]
        return self._json([self._entry(files, f) for f in folders] + [self._tree_entry(p, files[p]) for p in under])

    def _entry(self, files: dict[str, bytes], path: str) -> dict | None:
        """A file's tree entry, a folder's (one that holds files), or None."""
        if path in files:
            return self._tree_entry(path, files[path])
        if any(p.startswith(f"{path}/") for p in files):
            return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}
        return None

    def _tree_entry(self, path: str, data: bytes) -> dict:
        if path.endswith(LFS_SUFFIXES):
            pointer = lfs_pointer(data)
            lfs = {"oid": sha256(data), "size": len(data), "pointerSize": len(pointer)}
            return {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(pointer), "lfs": lfs}
        return {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}

    # -- files ------------------------------------------------------------------------
    def _resolve(self, repo_id: str, rev: str, path: str):
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error("RepoNotFound")
        commit = self._commit(repo, rev)
        if commit is None:
            return self._error("RevisionNotFound")
        data = repo.commits[commit].get(path)
        if data is None:
            return self._error("EntryNotFound")
        if path.endswith(LFS_SUFFIXES):
            sha = sha256(data)
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{git_blob_id(lfs_pointer(data))}"',
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "Location": f"http://localhost:{self.hub.port}/cdn/{sha}",
            }
            return self._send(302, b"", headers)
        return self._bytes(data, git_blob_id(data), {"X-Repo-Commit": commit})

    def _bytes(self, data: bytes, etag: str, headers: dict | None = None):
        headers = {"ETag": f'"{etag}"', "Accept-Ranges": "bytes", **(headers or {})}
        start = 0
        status = 200
        requested = self.headers.get("Range")
        if requested and requested.startswith("bytes="):
            first, _, last = requested[6:].partition("-")
            start = int(first or 0)
            end = int(last) if last else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start : end + 1]
            status = 206
        if self.command == "HEAD":
            return self._send(status, data, headers, "application/octet-stream")
        cut = self.hub.take_cut(self.path)
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        limit = len(data) // 2 if cut else len(data)
        chunk = 64 * 1024
        for offset in range(0, limit, chunk):
            piece = data[offset : min(offset + chunk, limit)]
            self.hub.throttle(len(piece))
            self.wfile.write(piece)
        if cut:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)


def serve_forever() -> None:
    """Serve a suite of model directories as one repo from a separate process (for benchmarks).

    ``python -m ckpt_trace.testing.loopback_hub REPO DIR [--bandwidth BYTES_PER_S] [--per-connection] [--port N]``: every subdirectory of
    DIR becomes a branch. The server prints its URL on one line, then serves until killed.
    """
    import argparse

    parser = argparse.ArgumentParser(description=serve_forever.__doc__.splitlines()[0])
    parser.add_argument("repo")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--bandwidth", type=float)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--per-connection", action="store_true", help="the bandwidth is each connection's")
    args = parser.parse_args()
    with LoopbackHub(bandwidth=args.bandwidth, port=args.port, per_connection=args.per_connection) as hub:
        for branch in sorted(p for p in args.directory.iterdir() if p.is_dir()):
            hub.add_model_dir(args.repo, branch.name, branch)
        print(hub.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    serve_forever()
