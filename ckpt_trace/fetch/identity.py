"""What was scored: the weight files of a checkpoint, and a fingerprint of their contents.

A checkpoint's identity is not its name: two directories named ``ckpt`` may hold other
models, and new weights may be saved over a scanned one. The fingerprint is a short hash of
each weight file's name and content sha256. On the Hub the tree listing gives the sha256 of
every LFS file before any download; for local files it is computed once and kept in a small
cache keyed by path, size and modification time, so a later scan reads no weights to know
that they did not change. The same bytes give the same fingerprint locally and on the Hub.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable
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


def fingerprint(shas: dict[str, str]) -> str | None:
    """A short identity of a set of weight files, from {file name: content sha256}; None for no files."""
    if not shas:
        return None
    text = "\n".join(f"{name} {sha}" for name, sha in sorted(shas.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def local_weights(directory: str | os.PathLike, cache: HashCache | None = None) -> tuple[str | None, int]:
    """The fingerprint and total bytes of the weight files in a model directory."""
    directory = Path(directory)
    _, names = weight_files(p.name for p in directory.iterdir() if p.is_file())
    files = [directory / n for n in names if not n.endswith(".json")]
    shas = (cache or HashCache()).sha256s(files)
    return fingerprint({f.name: shas[f.resolve()] for f in files}), sum(f.stat().st_size for f in files)
