"""The Parquet store: one file per scored input, written atomically.

A score is stored under what was scored (a `ScoreKey`: model, revision, weights
fingerprint, dtype, calibration set and scorer version), never under a name alone, so
other weights under the same name, another dtype or another calibration are stored
beside it, and a reader picks rows by those columns. Layout under the store root
(``data/`` by default)::

    scores/<model>/<revision>/<calibration>-<dtype>-<weights>-s<scorer>.parquet
    revisions/<model>/<revision>/<weights>_<source hash>.parquet
    runs/<model>/<revision>/<calibration>-<time>.parquet
    evals/<model>/<time>.parquet
    curves/<model>/<revision>/<perplexity set>-<dtype>-<weights>.parquet

Names are made path-safe and reversible (``EleutherAI/pythia-160m`` becomes
``EleutherAI%2Fpythia-160m``), but every column a reader needs is inside the files, so
``polars.scan_parquet("data/scores/**/*.parquet")`` works on its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import quote

import polars as pl

from .errors import StoreError, one_line
from .paths import atomic_write, unmakeable

log = logging.getLogger(__name__)

try:
    VERSION = version("ckpt-trace")
except PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "0.0.0+unknown"
"""The ckpt-trace version, stamped on every row written."""

MODULES = ("block", "attention", "mlp")
"""The modules a score is of, at every layer; a run of n blocks from a layer is module `span<n>` (`span_module`)."""
METRICS = ("importance", "update_ratio")
"""Stored by every scan: what a file of scores must hold whole."""


def span_module(n: int) -> str:
    """The module name of a span of n blocks."""
    return f"span{n}"


def span_length(module: str) -> int | None:
    """n of a `span<n>` module, else None."""
    return int(module[4:]) if module.startswith("span") and module[4:].isdigit() else None


CHECKPOINT_COLUMNS: dict[str, pl.DataType] = {
    "model": pl.String,
    "revision": pl.String,
    "commit": pl.String,
    "weights": pl.String,
    "step": pl.Int64,
    "tokens": pl.Int64,
    "source": pl.String,
}
"""Which checkpoint a row is of, leading the scores and revisions tables. `source` is where it was read: the
absolute path of a local folder, or a Hub repo id; null in files written before it was recorded."""

SCORES_SCHEMA: dict[str, pl.DataType] = {
    **CHECKPOINT_COLUMNS,
    "branch": pl.String,
    "layer": pl.Int32,
    "module": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
    "n_tokens": pl.Int64,
    "calibration": pl.String,
    "calibration_source": pl.String,  # what the calibration set is: its text and size, for people
    "reference": pl.String,  # the revision a training-dynamics metric is measured against; null for the others
    "reference_weights": pl.String,  # and its fingerprint: a reader never mixes references
    "dtype": pl.String,
    "scorer": pl.Int32,
    "version": pl.String,
    "created": pl.Datetime("us", "UTC"),
}

RUNS_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.String,
    "revision": pl.String,
    "source": pl.String,
    "weights": pl.String,
    "dtype": pl.String,
    "calibration": pl.String,
    "status": pl.String,
    "error": pl.String,
    "seconds": pl.Float64,
    "finished_at": pl.Datetime("us", "UTC"),
    "version": pl.String,
}


REVISIONS_SCHEMA: dict[str, pl.DataType] = {
    **CHECKPOINT_COLUMNS,
    "stage": pl.Int64,
    "branch": pl.String,
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
    "healed": pl.String,  # how a pruned model was healed (`ckpt-trace heal`); null for a model not healed
    "weights": pl.String,  # fingerprint of the evaluated model's weight files
    "source_weights": pl.String,  # of the unpruned model's: an original's own, a pruned model's manifest's
    "task": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
    "stderr": pl.Float64,
    "n": pl.Int64,
    "num_fewshot": pl.Int64,
    "data": pl.String,  # the id of the text perplexity was measured on; null for other tasks
    "dtype": pl.String,
    "device": pl.String,
    "version": pl.String,
    "created": pl.Datetime("us", "UTC"),
}

CURVES_SCHEMA: dict[str, pl.DataType] = {
    "model": pl.String,
    "revision": pl.String,
    "source": pl.String,
    "weights": pl.String,
    "target": pl.String,
    "k": pl.Int32,
    "strategy": pl.String,
    "healed": pl.String,  # how the `healed` strategy's drop sets were healed; null for the other strategies
    "seed": pl.Int32,
    "dropped": pl.String,
    "perplexity": pl.Float64,
    "n_tokens": pl.Int64,
    "data": pl.String,
    "calibration": pl.String,
    "dtype": pl.String,
    "version": pl.String,
    "created": pl.Datetime("us", "UTC"),
}


_skipped: set[Path] = set()


DAMAGED = pl.exceptions.PolarsError
"""What polars raises for a file that is cut short, is not Parquet, or whose data does not decode. Anything else
(a file that cannot be opened, a bug) is not a damaged file and is raised."""


def _fits(found: pl.DataType | None, wanted: pl.DataType) -> bool:
    """Whether a file's column of type `found` reads as the schema's `wanted` (an integer of another width, a column
    of nulls)."""
    return found is not None and (found == wanted or found == pl.Null or (found.is_integer() and wanted.is_integer()))


REQUIRED = {
    "scores": ("model", "revision", "layer", "module", "metric", "value"),
    "revisions": ("model", "revision"),
    "runs": ("model", "revision", "status"),
    "evals": ("model", "task", "metric", "value"),
    "curves": ("model", "revision", "target", "k", "strategy", "perplexity"),
}
"""The columns every file of a table has held since the table existed: a file that lacks one is not the table's
(columns added since read as null in older files)."""


RECORDED_SINCE = ("source", "calibration_source", "reference", "reference_weights", "healed")
"""Columns a frame written from Python may lack (null then), as older files do."""

_WHOLE_SCORES = (*REQUIRED["scores"], "commit", "weights", "step", "tokens", "branch", "n_tokens", "calibration",
                 "dtype", "scorer", "version", "created")
"""The columns a scores file must hold to count as whole scores of its key (those added since read as null)."""


def _skip(file: Path, why: str) -> None:
    if file not in _skipped:
        _skipped.add(file)
        log.warning("skipping %s: %s; it is left as it is", file, why)


def path_part(name: str) -> str:
    """A file-name-safe, reversible form of a model or revision name (`unquote` gives it back)."""
    return quote(name, safe="-_.+=@") if name not in (".", "..") else name.replace(".", "%2E")


@dataclass(frozen=True)
class ScoreKey:
    """What a stored score is the score of; each field is also a column of the scores table."""

    model: str
    revision: str
    weights: str | None
    """Fingerprint of the weight files (`ckpt_trace.fetch.identity`)."""
    dtype: str
    calibration: str
    scorer: int
    """`ckpt_trace.scoring.metrics.SCORER_VERSION`: bumped whenever the same inputs would score differently."""

    @classmethod
    def of(cls, row: dict) -> ScoreKey:
        return cls(*(row[f.name] for f in fields(cls)))

    def differences(self, other: ScoreKey) -> list[str]:
        """The fields in which another key differs from this one."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _stamp(when) -> str:
    return when.strftime("%Y%m%dT%H%M%S%f")


def write_parquet(frame: pl.DataFrame, path: Path) -> None:
    """Write a frame so that `path` holds either nothing or the whole file, never a part."""
    atomic_write(path, frame.write_parquet)


class Store:
    """A directory of Parquet tables."""

    def __init__(self, root: str | os.PathLike = "data"):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {str(self.root)!r} is a file, not a directory; pass --store DIR")
        if (blocker := unmakeable(self.root)) is not None:
            raise StoreError(f"store {str(self.root)!r} cannot be made: {str(blocker)!r} is a file; pass --store DIR")
        for table in ("scores", "runs", "evals", "revisions"):
            sub = self.root / table
            if sub.exists() and not sub.is_dir():
                raise StoreError(f"store {str(self.root)!r} is not a ckpt-trace store: {table}/ is a file")

    def scores_path(self, key: ScoreKey) -> Path:
        parts = (key.calibration, key.dtype, key.weights or "-", f"s{key.scorer}")
        name = "_".join(path_part(str(p)).replace("_", "%5F") for p in parts)  # "_" only between the parts
        return self.root / "scores" / path_part(key.model) / path_part(key.revision) / f"{name}.parquet"

    def has_scores(self, key: ScoreKey, metrics: tuple[str, ...] = METRICS) -> bool:
        """Whether whole scores of exactly this key, with these metrics, are stored: a file that is missing,
        unreadable, of another key, or short of rows (layers 0 .. its last x modules x metrics) counts as not."""
        return self.read_scores(key, metrics) is not None

    def read_scores(self, key: ScoreKey, metrics: tuple[str, ...] = METRICS) -> pl.DataFrame | None:
        """The whole scores stored under exactly this key, holding every one of `metrics`, or None (see `has_scores`);
        a metric measured against another checkpoint may be stored against several (see `reference_weights`)."""
        frame = self._read_scores(self.scores_path(key), key)
        return frame if frame is not None and set(metrics) <= set(frame["metric"]) else None

    def _read_scores(self, path: Path, key: ScoreKey | None = None) -> pl.DataFrame | None:
        """A scores file that is whole: one key; for every layer from 0 to its last, every module and each of the
        stored-always metrics exactly once, with a value; any other metric once per layer for the modules it has
        (a span of n blocks once per layer it can start at).
        Else None (a file cut short, damaged or foreign)."""
        if not path.is_file():
            return None
        try:
            frame = pl.read_parquet(path)
        except DAMAGED:  # cut short, not Parquet
            return None
        if frame.height == 0 or not all(_fits(frame.schema.get(c), SCORES_SCHEMA[c]) for c in _WHOLE_SCORES) or \
                any(not _fits(t, SCORES_SCHEMA[c]) for c, t in frame.schema.items() if c in SCORES_SCHEMA):
            return None  # foreign: columns missing or of other kinds
        frame = frame.with_columns(pl.lit(None, SCORES_SCHEMA[c]).alias(c) for c in SCORES_SCHEMA if c not in frame.columns)
        if frame.select(*(f.name for f in fields(ScoreKey))).n_unique() != 1:
            return None
        core = frame.filter(pl.col("metric").is_in(METRICS))
        if core.height == 0 or core["layer"].null_count():
            return None
        layers = core["layer"].max() + 1
        expected = layers * len(MODULES) * len(METRICS)
        cells = core.select("layer", "module", "metric").unique()
        whole = (core.height == cells.height == expected and core["value"].null_count() == 0
                 and set(core["module"]) == set(MODULES) and set(core["layer"]) == set(range(layers)))
        for _, extra in frame.filter(~pl.col("metric").is_in(METRICS)).group_by("metric", "reference_weights"):
            # A span of n blocks starts at layers 0 .. L - n, for every n up to its longest; anything else is
            # at every layer.
            spans = sorted(n for n in map(span_length, extra["module"].unique()) if n is not None)
            whole = whole and (not spans or spans == list(range(1, spans[-1] + 1))) and extra.height == \
                extra.select("layer", "module").n_unique() and extra["value"].null_count() == 0
            for (module,), part in extra.group_by("module"):
                starts = set(range(layers - (span_length(module) or 1) + 1))
                whole = whole and set(part["layer"]) == starts
        if not whole:
            return None
        return frame if key is None or ScoreKey.of(frame.row(0, named=True)) == key else None

    def stored_keys(self, model: str, revision: str) -> list[ScoreKey]:
        """The keys of the whole scores stored for one model and revision, whatever their weights, dtype, ..."""
        folder = self.root / "scores" / path_part(model) / path_part(revision)
        frames = (self._read_scores(p) for p in sorted(folder.glob("*.parquet")))
        return [ScoreKey.of(f.row(0, named=True)) for f in frames if f is not None]

    def _write(self, frame: pl.DataFrame, schema: dict[str, pl.DataType], path_of) -> Path:
        """Cast a frame to a table's schema and write it atomically where `path_of(first row)` says."""
        frame = frame.select([pl.col(c).cast(t) if c in frame.columns or c not in RECORDED_SINCE else pl.lit(None, t).alias(c)
                              for c, t in schema.items()])
        path = path_of(frame.row(0, named=True))
        write_parquet(frame, path)
        return path

    def write_scores(self, frame: pl.DataFrame) -> Path:
        """Store one revision's scores; the frame must hold exactly one `ScoreKey`."""
        keys = frame.select(*(f.name for f in fields(ScoreKey))).unique()
        if keys.height != 1:
            raise ValueError(f"one file holds the scores of one key; this frame holds {keys.height}")
        return self._write(frame, SCORES_SCHEMA, lambda r: self.scores_path(ScoreKey.of(r)))

    def write_run(self, frame: pl.DataFrame) -> Path:
        """Record one attempt at a revision (status, error, duration) in the runs table."""
        return self._write(frame, RUNS_SCHEMA, lambda r: self.root / "runs" / path_part(r["model"])
                           / path_part(r["revision"]) / f"{r['calibration']}-{_stamp(r['finished_at'])}.parquet")

    def write_revision(self, frame: pl.DataFrame) -> Path:
        """Record what is known of one revision: step, tokens, stage, validation loss, duplicates."""
        def path_of(r: dict) -> Path:
            # One file per source too: two folders of one name are two models, each with its own record.
            where = f"_{hashlib.sha256(r['source'].encode()).hexdigest()[:8]}" if r["source"] else ""
            return self.root / "revisions" / path_part(r["model"]) / path_part(r["revision"]) / \
                f"{r['weights'] or 'none'}{where}.parquet"

        return self._write(frame, REVISIONS_SCHEMA, path_of)

    def write_evals(self, frame: pl.DataFrame) -> Path:
        """Store one evaluation run of one model."""
        return self._write(frame, EVALS_SCHEMA,
                           lambda r: self.root / "evals" / path_part(r["model"]) / f"{_stamp(r['created'])}.parquet")

    def evals(self) -> pl.DataFrame:
        """Every stored evaluation result."""
        return self._table("evals", EVALS_SCHEMA)

    def write_curves(self, frame: pl.DataFrame) -> list[Path]:
        """Store the pruning curves of one checkpoint, measured on one perplexity set in one dtype: a file per
        target, named by everything that chose and measured it, so a run for one target leaves the others'."""
        def path_of(r: dict) -> Path:
            parts = (r["data"], r["calibration"], r["dtype"], r["weights"] or "none", r["target"])
            name = "_".join(path_part(str(p)).replace("_", "%5F") for p in parts)
            return self.root / "curves" / path_part(r["model"]) / path_part(r["revision"]) / f"{name}.parquet"

        return [self._write(part, CURVES_SCHEMA, path_of) for _, part in frame.group_by("target", maintain_order=True)]

    def curves(self) -> pl.DataFrame:
        """Every stored pruning curve."""
        return self._table("curves", CURVES_SCHEMA)

    def _files(self, table: str, schema: dict[str, pl.DataType]) -> list[Path]:
        """The table's files that read as Parquet with its columns and their types (and, for scores, are not a copy
        of the file their key names); any other is named in a warning, once, and left alone, so that one foreign,
        damaged or duplicate file does not stop every reader, or count twice."""
        good = []
        for file in sorted((self.root / table).glob("**/*.parquet")):
            try:
                found = pl.read_parquet_schema(file)
            except DAMAGED as err:  # cut short, not Parquet
                _skip(file, f"not a readable Parquet file ({one_line(err, 120)})")
                continue
            clash = sorted(c for c, t in schema.items() if c in found and found[c] != t)
            if clash:
                _skip(file, f"its columns {', '.join(clash)} are not of the {table} table's types")
                continue
            if missing := [c for c in REQUIRED[table] if c not in found]:
                _skip(file, f"it lacks the {table} table's columns {', '.join(missing)}")
                continue
            if table == "scores" and (original := self._original(file, found)) is not None:
                _skip(file, f"a copy of {original}, the file its scores' key names")
                continue
            good.append(file)
        return good

    def _original(self, file: Path, columns: dict) -> Path | None:
        """The file at the path a scores file (of these `columns`) names by its key, where that is another file that
        exists: `file` is then a copy (a backup, say), whose rows would count twice."""
        names = [f.name for f in fields(ScoreKey)]
        try:
            row = pl.read_parquet(file, columns=[c for c in names if c in columns], n_rows=1)
        except DAMAGED:
            return None
        if row.height == 0 or set(names) - set(row.columns):
            return None
        canonical = self.scores_path(ScoreKey.of(row.row(0, named=True)))
        return canonical if canonical != file and canonical.is_file() else None

    def _scan(self, table: str, schema: dict[str, pl.DataType]) -> pl.LazyFrame:
        files = self._files(table, schema)
        if not files:
            return pl.LazyFrame(schema=schema)
        # Files written before a column existed read it as null.
        return pl.scan_parquet(files, schema=schema, missing_columns="insert", extra_columns="ignore")

    def _table(self, table: str, schema: dict[str, pl.DataType]) -> pl.DataFrame:
        try:
            return self._scan(table, schema).collect()
        except DAMAGED:  # a file whose footer reads but whose data does not: read file by file, skip it
            frames = []
            for file in self._files(table, schema):
                try:
                    frames.append(pl.scan_parquet(file, schema=schema, missing_columns="insert",
                                                  extra_columns="ignore").collect())
                except DAMAGED as err:
                    _skip(file, f"its data cannot be read ({one_line(err, 120)})")
            return pl.concat(frames) if frames else pl.DataFrame(schema=schema)

    def scan_scores(self) -> pl.LazyFrame:
        """Every stored score, lazily: filter before collecting to read only what is needed."""
        return self._scan("scores", SCORES_SCHEMA)

    def scores(self) -> pl.DataFrame:
        """Every stored score of every scan: one row per (model, revision, weights, dtype, calibration, scorer, layer,
        module, metric). A revision scanned with other weights, dtype, calibration set or scorer has rows of each:
        select one before comparing or averaging (`ckpt_trace.analysis.statistics.model_scores` takes each revision's latest)."""
        return self._table("scores", SCORES_SCHEMA)

    def revisions(self) -> pl.DataFrame:
        """Every recorded revision."""
        return self._table("revisions", REVISIONS_SCHEMA)

    def runs(self) -> pl.DataFrame:
        """Every recorded scan attempt."""
        return self._table("runs", RUNS_SCHEMA)


def load_scores(store: str | os.PathLike = "data") -> pl.DataFrame:
    """All scores in a store as one polars frame, every scan's (see `Store.scores`). Raises `StoreError` for a path
    that is no store; a damaged or foreign file is skipped with a warning."""
    return Store(store).scores()
