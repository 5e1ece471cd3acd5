"""Where ckpt-trace keeps its own files."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """ckpt-trace's cache directory: $CKPT_TRACE_HOME, else $XDG_CACHE_HOME/ckpt-trace, else ~/.cache/ckpt-trace."""
    if os.environ.get("CKPT_TRACE_HOME"):
        return Path(os.environ["CKPT_TRACE_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ckpt-trace"
