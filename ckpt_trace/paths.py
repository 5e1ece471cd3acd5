"""Where ckpt-trace keeps its own files, and how every file it writes gets there whole."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def home() -> Path:
    """ckpt-trace's cache directory: $CKPT_TRACE_HOME, else $XDG_CACHE_HOME/ckpt-trace, else ~/.cache/ckpt-trace."""
    if os.environ.get("CKPT_TRACE_HOME"):
        return Path(os.environ["CKPT_TRACE_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ckpt-trace"


def process_id() -> str:
    """This process, as host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def alive(process: str) -> bool:
    """Whether a process named by `process_id` still runs; one on another machine is taken to run."""
    host, _, pid = process.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        pass
    return True


_TEMPORARY = re.compile(r"^\..+\.(?P<host>[^.]+?)@(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Have `write` fill a temporary file beside `path`, flush it to disk, and move it into place in one step,
    so that `path` holds either what it held before or the whole new file, also after a crash or power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace(".", "_")
    tmp = path.with_name(f".{path.name}.{host}@{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # the rename itself, on systems that can flush a folder
            folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """A temporary folder's path beside `target` for the caller to make and fill; on a clean exit it takes
    `target`'s place in one step, and on any exit nothing of it is left. A folder at `target` must be empty, or is
    deleted first with `replace`."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target) if replace else target.rmdir()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write` of bytes."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete the temporary files under `root` that a process on this machine left when it was killed."""
    host = socket.gethostname().replace(".", "_")
    stale = []
    for file in root.rglob(".*.tmp") if root.is_dir() else ():
        match = _TEMPORARY.match(file.name)
        if match and match["host"] == host and not alive(f"{socket.gethostname()}:{match['pid']}"):
            file.unlink(missing_ok=True)
            stale.append(file)
    return stale


def unmakeable(folder: Path) -> Path | None:
    """The file in the way, when `folder` does not exist and cannot be made because a path above it is a file."""
    if folder.exists():
        return None
    existing = next((p for p in folder.absolute().parents if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def json_object(file: Path) -> dict:
    """The JSON object a file holds. Raises OSError where it cannot be read, ValueError where it holds no JSON, or
    JSON other than an object."""
    data = json.loads(Path(file).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
    return data
