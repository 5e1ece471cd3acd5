"""What was scored: the files of a checkpoint that decide what it computes, and a fingerprint of their contents.

A checkpoint's identity is not its name: two directories named ``ckpt`` may hold other
models, new weights may be saved over a scanned one, and a config may change what the same
weights compute (``use_parallel_residual``, ``hidden_act``). The fingerprint is a short hash
of the name and content hash of each file that decides the computation: the weight files
(content sha256), and ``config.json`` and the checkpoint's own modeling code (``*.py``, git
blob id). On the Hub the tree listing gives both hashes of every file before any download;
for local weight files the sha256 is computed once and kept in a small cache keyed by path,
size, times and inode, so a later scan reads no weights to know that they did not change.
The same bytes give the same fingerprint locally and on the Hub.

A local checkpoint also keeps the `stamps` of those files (size, times, inode) from the moment
its identity was taken: a scan or an evaluation takes it right before loading, and compares
the stamps again once it is done, so that nothing is stored under a fingerprint of other
bytes than those loaded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..paths import atomic_write_bytes, home, json_object

WEIGHT_FORMATS = {
    "safetensors": ("*.safetensors", "*.safetensors.index.json"),
    "bin": ("pytorch_model*.bin", "pytorch_model*.bin.index.json"),
}
"""Weight formats in order of preference, with the file patterns of each (weights and shard index)."""


def weight_files(names: Iterable[str]) -> tuple[str | None, list[str]]:
    """The preferred weight format among file names, and its files (shard indexes included); (None, []) if none."""
    names = list(names)
    for fmt, patterns in WEIGHT_FORMATS.items():
        files = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
        if any(not f.endswith(".json") for f in files):
            return fmt, sorted(files)
    return None, []


def computes(name: str) -> bool:
    """Whether a file beside the weights decides what a checkpoint computes: its config and its own modeling code
    (top-level ``*.py``, which `trust_remote_code` runs)."""
    return name == "config.json" or (name.endswith(".py") and "/" not in name)


def fingerprint(shas: dict[str, str], side: dict[str, str] | None = None) -> str | None:
    """A short identity of a checkpoint, from its weight files' {name: content sha256} and the {name: git blob id}
    of the files beside them that decide the computation (see `computes`); None for no weight files."""
    if not shas:
        return None
    text = "\n".join(f"{name} {sha}" for name, sha in sorted({**(side or {}), **shas}.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_blob_id(data: bytes) -> str:
    """The id git, and so the Hub's tree listing, gives a file of these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


class HashCache:
    """Content sha256s of local files, valid while a file's size, modification time, inode and change time are all
    unchanged: new contents given an old modification time (`cp -p`, `touch -r`, an archive's fixed times) change
    the change time, which no one can set back, and a file replaced by another has a new inode."""

    def __init__(self, path: Path | None = None):
        self.path = path or home() / "file-hashes.json"

    def sha256s(self, files: Iterable[Path]) -> dict[Path, str]:
        """The sha256 of each file, computed only for files that are new or changed since they were last hashed."""
        from filelock import FileLock

        files = [Path(f).resolve() for f in files]
        known = self._read()
        result, fresh = {}, {}
        for file in files:
            stat = file.stat()
            stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]
            entry = known.get(str(file))
            if entry and entry[:-1] == stamp:
                result[file] = entry[-1]
            else:
                result[file] = _sha256(file)
                fresh[str(file)] = [*stamp, result[file]]
        if fresh:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{self.path}.lock"):  # other scans may add theirs at the same time
                merged = {**self._read(), **fresh}
                atomic_write_bytes(self.path, json.dumps(merged, sort_keys=True).encode())
        return result

    def _read(self) -> dict[str, list]:
        try:
            return json_object(self.path)
        except (OSError, ValueError):
            return {}


def _identity_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """The weight files of a model directory (shard indexes left out), and the files beside them that decide the
    computation."""
    names = [p.name for p in directory.iterdir() if p.is_file()]
    _, weights = weight_files(names)
    return [directory / n for n in weights if not n.endswith(".json")], [directory / n for n in sorted(names) if computes(n)]


def file_stamps(directory: str | os.PathLike) -> tuple:
    """(name, size, modification time, inode, change time) of each file that makes a local checkpoint's identity, as
    they are now: new contents change the change time, which no one can set back, and a file replaced by another
    has a new inode."""
    weights, side = _identity_files(Path(directory))
    return _stamps(weights + side)


def _stamps(files: list[Path]) -> tuple:
    stamps = []
    for file in sorted(files):
        try:
            stat = file.stat()
        except FileNotFoundError:  # removed since it was listed
            continue
        stamps.append((file.name, stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns))
    return tuple(stamps)


@dataclass(frozen=True)
class Identity:
    """What a local checkpoint is, as of one moment: the fingerprint, the weight bytes, and the files' stamps."""

    fingerprint: str | None
    weight_bytes: int
    stamps: tuple
    """`file_stamps`, taken before the files were hashed: if they still hold, the fingerprint is of the files as
    they are."""


def local_identity(directory: str | os.PathLike, cache: HashCache | None = None) -> Identity:
    """The identity of the checkpoint in a model directory (weights hashed only where they changed since last time)."""
    weights, side = _identity_files(Path(directory))
    stamps = _stamps(weights + side)
    shas = (cache or HashCache()).sha256s(weights)
    blobs = {f.name: git_blob_id(f.read_bytes()) for f in side}
    return Identity(fingerprint({f.name: shas[f.resolve()] for f in weights}, blobs),
                    sum(f.stat().st_size for f in weights), stamps)


def local_weights(directory: str | os.PathLike, cache: HashCache | None = None) -> tuple[str | None, int]:
    """The fingerprint and total weight bytes of the checkpoint in a model directory."""
    identity = local_identity(directory, cache)
    return identity.fingerprint, identity.weight_bytes
