"""The Parquet store: one file per (model, revision, calibration), written atomically.

Layout under the store root (``data/`` by default)::

    scores/<model>/<revision>/<calibration>.parquet
    revisions/<model>/<revision>.parquet
    runs/<model>/<revision>/<calibration>-<time>.parquet

Names are made path-safe (``EleutherAI/pythia-160m`` becomes ``EleutherAI--pythia-160m``),
but every column a reader needs is inside the files, so
``polars.scan_parquet("data/scores/**/*.parquet")`` works on its own.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import quote

import polars as pl

from .errors import StoreError

SCORES_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.String,
    "revision": pl.String,
    "commit": pl.String,
    "step": pl.Int64,
    "tokens": pl.Int64,
    "layer": pl.Int32,
    "module": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
    "n_tokens": pl.Int64,
    "calibration": pl.String,
    "dtype": pl.String,
    "version": pl.String,
}

RUNS_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.String,
    "revision": pl.String,
    "calibration": pl.String,
    "status": pl.String,
    "error": pl.String,
    "seconds": pl.Float64,
    "finished_at": pl.Datetime("us", "UTC"),
    "version": pl.String,
}


REVISIONS_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.String,
    "revision": pl.String,
    "commit": pl.String,
    "step": pl.Int64,
    "tokens": pl.Int64,
    "stage": pl.Int64,
    "val_loss": pl.Float64,
    "weight_bytes": pl.Int64,
    "duplicate_of": pl.String,
}

EVALS_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.String,
    "path": pl.String,
    "source_model": pl.String,
    "revision": pl.String,
    "pruning": pl.String,
    "task": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
    "n": pl.Int64,
    "num_fewshot": pl.Int64,
    "dtype": pl.String,
    "device": pl.String,
    "version": pl.String,
    "created": pl.Datetime("us", "UTC"),
}


def path_part(name: str) -> str:
    """A file-name-safe, reversible form of a model or revision name."""
    return quote(name.replace("/", "--"), safe="-_.+=@")


def _stamp(when) -> str:
    return when.strftime("%Y%m%dT%H%M%S%f")


def write_parquet(frame: pl.DataFrame, path: Path) -> None:
    """Write a frame so that `path` holds either nothing or the whole file, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Store:
    """A directory of Parquet tables."""

    def __init__(self, root: str | os.PathLike = "data"):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {str(self.root)!r} is a file, not a directory; pass --store DIR")
        for table in ("scores", "runs", "evals", "revisions"):
            sub = self.root / table
            if sub.exists() and not sub.is_dir():
                raise StoreError(f"store {str(self.root)!r} is not a ckpt-trace store: {table}/ is a file")

    def scores_path(self, model: str, revision: str, calibration: str) -> Path:
        return self.root / "scores" / path_part(model) / path_part(revision) / f"{calibration}.parquet"

    def has_scores(self, model: str, revision: str, calibration: str) -> bool:
        return self.scores_path(model, revision, calibration).is_file()

    def _write(self, frame: pl.DataFrame, schema: dict[str, pl.DataType], path_of) -> Path:
        """Cast a frame to a table's schema and write it atomically where `path_of(first row)` says."""
        frame = frame.select([pl.col(c).cast(t) for c, t in schema.items()])
        path = path_of(frame.row(0, named=True))
        write_parquet(frame, path)
        return path

    def write_scores(self, frame: pl.DataFrame) -> Path:
        """Store one revision's scores; the frame must hold exactly one (model, revision, calibration)."""
        keys = frame.select("model", "revision", "calibration").unique()
        assert keys.height == 1, f"one file holds one (model, revision, calibration), got {keys.height}"
        return self._write(frame, SCORES_SCHEMA, lambda r: self.scores_path(r["model"], r["revision"], r["calibration"]))

    def write_run(self, frame: pl.DataFrame) -> Path:
        """Record one attempt at a revision (status, error, duration) in the runs table."""
        return self._write(frame, RUNS_SCHEMA, lambda r: self.root / "runs" / path_part(r["model"])
                           / path_part(r["revision"]) / f"{r['calibration']}-{_stamp(r['finished_at'])}.parquet")

    def write_revision(self, frame: pl.DataFrame) -> Path:
        """Record what is known of one revision: step, tokens, stage, validation loss, duplicates."""
        return self._write(frame, REVISIONS_SCHEMA,
                           lambda r: self.root / "revisions" / path_part(r["model"]) / f"{path_part(r['revision'])}.parquet")

    def write_evals(self, frame: pl.DataFrame) -> Path:
        """Store one evaluation run of one model."""
        return self._write(frame, EVALS_SCHEMA,
                           lambda r: self.root / "evals" / path_part(r["model"]) / f"{_stamp(r['created'])}.parquet")

    def evals(self) -> pl.DataFrame:
        """Every stored evaluation result."""
        return self._table("evals", EVALS_SCHEMA)

    def _scan(self, table: str, schema: dict[str, pl.DataType]) -> pl.LazyFrame:
        files = sorted((self.root / table).glob("**/*.parquet"))
        if not files:
            return pl.LazyFrame(schema=schema)
        # Files written before a column existed read it as null.
        return pl.scan_parquet(files, schema=schema, missing_columns="insert", extra_columns="ignore")

    def _table(self, table: str, schema: dict[str, pl.DataType]) -> pl.DataFrame:
        return self._scan(table, schema).collect()

    def scan_scores(self) -> pl.LazyFrame:
        """Every stored score, lazily: filter before collecting to read only what is needed."""
        return self._scan("scores", SCORES_SCHEMA)

    def scores(self) -> pl.DataFrame:
        """Every stored score, one row per (model, revision, calibration, layer, module, metric)."""
        return self._table("scores", SCORES_SCHEMA)

    def revisions(self) -> pl.DataFrame:
        """Every recorded revision."""
        return self._table("revisions", REVISIONS_SCHEMA)

    def runs(self) -> pl.DataFrame:
        """Every recorded scan attempt."""
        return self._table("runs", RUNS_SCHEMA)


def load_scores(store: str | os.PathLike = "data") -> pl.DataFrame:
    """All scores in a store as one polars frame."""
    return Store(store).scores()
