"""Where ckpt-trace keeps its own files, and how every file it writes gets there whole."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def home() -> Path:
    """ckpt-trace's cache directory: $CKPT_TRACE_HOME, else $XDG_CACHE_HOME/ckpt-trace, else ~/.cache/ckpt-trace."""
    if os.environ.get("CKPT_TRACE_HOME"):
        return Path(os.environ["CKPT_TRACE_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ckpt-trace"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Have `write` fill a temporary file beside `path`, flush it to disk, and move it into place in one step,
    so that `path` holds either what it held before or the whole new file, also after a crash or power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write` of bytes."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
