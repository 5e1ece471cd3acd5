"""What ckpt-trace downloaded into a Hugging Face cache, which scans use it, and how it leaves the cache.

The ledger is shared by processes. Eviction goes through huggingface_hub's own cache API, because the cache is the
user's, shared by every repo they have: a blob is deleted only where no other cached file refers to it, and a Xet
file in the cache-wide shared store (``blobs/<2 hex>/<xet hash>``, linked from each repo's ``blobs/<etag>``) only
where its reference manifest lists no other link, in any repo.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..paths import alive, atomic_write_bytes, process_id


@dataclass
class LedgerState:
    """The cache files ckpt-trace downloaded and has not evicted yet, and which scans use which snapshot."""

    files: set[str]
    holders: dict[str, set[str]]
    """snapshot folder -> the scans (host:pid) using it."""

    def under(self, folder: Path) -> list[Path]:
        """The recorded files inside `folder`."""
        prefix = f"{folder}{os.sep}"
        return sorted(Path(e) for e in self.files if e.startswith(prefix))

    def hold(self, snapshot: Path) -> None:
        self.holders.setdefault(str(snapshot), set()).add(process_id())

    def release(self, snapshot: Path) -> set[str]:
        """Stop using a snapshot; return the scans still using it (those whose processes ended are forgotten)."""
        left = {h for h in self.holders.pop(str(snapshot), set()) if h != process_id() and alive(h)}
        if left:
            self.holders[str(snapshot)] = left
        return left


class DownloadLedger:
    """A JSON file of what ckpt-trace downloaded into a cache and who uses it (`LedgerState`).

    Several scans (threads, processes, jobs of an array) may share it: every change is a
    read-modify-write under a file lock, written atomically. A scan holds a snapshot from
    before its download until it releases it; the files ckpt-trace downloaded are evicted by
    the last scan to release the snapshot, so one scan never deletes what another still reads.
    """

    def __init__(self, path: Path):
        self.path = path

    @contextmanager
    def locked(self) -> Iterator[LedgerState]:
        """The ledger, for reading and changing, while no other scan can; written back on exit."""
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{self.path}.lock"):
            state = self._read()
            before = json.dumps(self._dump(state), sort_keys=True)
            yield state
            after = json.dumps(self._dump(state), sort_keys=True)
            if after != before:
                atomic_write_bytes(self.path, after.encode())

    @staticmethod
    def _dump(state: LedgerState) -> dict:
        return {"files": sorted(state.files), "holders": {k: sorted(v) for k, v in sorted(state.holders.items())}}

    def _read(self) -> LedgerState:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        if isinstance(data, list):  # the earlier form: files only
            data = {"files": data}
        if not isinstance(data, dict):
            data = {}
        return LedgerState(set(data.get("files", [])), {k: set(v) for k, v in data.get("holders", {}).items()})

    def under(self, folder: Path) -> list[Path]:
        """The recorded files inside `folder`."""
        return self._read().under(folder)


def delete_entries(cache_dir: Path, entries: list[Path], snapshot: Path) -> int:
    """Delete snapshot entries that ckpt-trace downloaded, and the blobs behind them that nothing else in the cache
    refers to, as `huggingface_hub.scan_cache_dir(...).delete_files` plans it; then the folders this left empty, up
    to and including `snapshot`. Return the bytes freed.

    An entry the cache scan does not list (its repo folder is damaged, say) is unlinked itself, never what it points
    to: a blob that cannot be shown unused is left in place."""
    from huggingface_hub import scan_cache_dir

    wanted = set(entries)
    info = scan_cache_dir(cache_dir)
    files = [f for repo in info.repos for revision in repo.revisions for f in revision.files if f.file_path in wanted]
    plan = info.delete_files(*files)
    plan.execute()
    freed = plan.expected_freed_size
    for entry in wanted - {f.file_path for f in files}:
        if entry.is_file() and not entry.is_symlink():
            freed += entry.stat().st_size
        entry.unlink(missing_ok=True)
    for folder in sorted({e.parent for e in entries} | {snapshot}, key=lambda p: len(p.parts), reverse=True):
        while folder != snapshot.parent and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    return freed
