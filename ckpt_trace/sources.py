"""Where checkpoints come from: a model directory, or a directory of revision subdirectories."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import SourceError
from .revisions import Revision, parse_revision, training_order

EVAL_FILE = "ckpt_trace_eval.json"
"""A checkpoint's own evaluation record, written beside its weights by the micro suite."""


@dataclass(frozen=True)
class Checkpoint:
    """One revision of one model, ready to load from `path`."""

    model: str
    revision: Revision
    path: Path

    def record(self) -> dict:
        """The evaluation record kept beside the weights (validation loss, tokens), or {}."""
        file = self.path / EVAL_FILE
        try:
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (OSError, ValueError) as err:
            raise SourceError(f"cannot read {file}: {err}") from err

    def val_loss(self) -> float | None:
        """The validation loss recorded beside the weights, if any."""
        value = self.record().get("val_loss")
        return float(value) if value is not None else None


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def local_checkpoints(source: str | os.PathLike) -> list[Checkpoint]:
    """The checkpoints of a local source, in training order.

    A directory with a config.json is one checkpoint, revision ``main``; a directory
    whose subdirectories hold config.json files is a suite, one revision per
    subdirectory, named after it (a symbolic link to a sibling, like ``main``, is not
    scanned twice). `model` is the source directory's name.
    """
    root = Path(source)
    if not root.is_dir():
        raise SourceError(f"source {str(source)!r} is not a directory")
    model = root.resolve().name
    if _is_model_dir(root):
        return [Checkpoint(model, Revision("main"), root)]
    subdirs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and _is_model_dir(p)}
    # A link to a sibling revision (``main -> step1000``) is an alias, not another checkpoint.
    real = {p.resolve() for p in subdirs.values() if not p.is_symlink()}
    subdirs = {n: p for n, p in subdirs.items() if not (p.is_symlink() and p.resolve() in real)}
    if not subdirs:
        raise SourceError(
            f"{str(source)!r} is no model: it has no config.json and no subdirectories with one"
        )
    checkpoints = []
    for rev in training_order([parse_revision(n) for n in subdirs]):
        checkpoint = Checkpoint(model, rev, subdirs[rev.name])
        if rev.tokens is None and isinstance(checkpoint.record().get("tokens"), int):
            checkpoint = replace(checkpoint, revision=replace(rev, tokens=checkpoint.record()["tokens"]))
        checkpoints.append(checkpoint)
    return checkpoints
