"""Where checkpoints come from: a model directory, or a directory of revision subdirectories."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError
from .revisions import Revision, parse_revision, training_order


@dataclass(frozen=True)
class Checkpoint:
    """One revision of one model, ready to load from `path`."""

    model: str
    revision: Revision
    path: Path


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def local_checkpoints(source: str | os.PathLike) -> list[Checkpoint]:
    """The checkpoints of a local source, in training order.

    A directory with a config.json is one checkpoint, revision ``main``; a directory
    whose subdirectories hold config.json files is a suite, one revision per
    subdirectory, named after it. `model` is the source directory's name.
    """
    root = Path(source)
    if not root.is_dir():
        raise SourceError(f"source {str(source)!r} is not a directory")
    model = root.resolve().name
    if _is_model_dir(root):
        return [Checkpoint(model, Revision("main"), root)]
    subdirs = {p.name: p for p in root.iterdir() if p.is_dir() and _is_model_dir(p)}
    if not subdirs:
        raise SourceError(
            f"{str(source)!r} is no model: it has no config.json and no subdirectories with one"
        )
    return [Checkpoint(model, rev, subdirs[rev.name]) for rev in training_order([parse_revision(n) for n in subdirs])]
