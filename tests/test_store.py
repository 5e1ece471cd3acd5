"""The Parquet store: atomic writes, schema, and reading back."""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import unquote

import polars as pl
import pytest

from ckpt_trace.errors import StoreError
from ckpt_trace.store import SCORES_SCHEMA, ScoreKey, Store, load_scores, path_part, write_parquet


def rows(model="org/m", revision="step1", calibration="abc", value=0.5, weights="w1", dtype="float32", layers=2):
    """Whole scores of one key: every layer, module and metric once; values value, value + 1, ... by row."""
    grid = [(layer, module, metric) for layer in range(layers) for module in ("block", "attention", "mlp")
            for metric in ("importance", "update_ratio")]
    n = len(grid)
    return pl.DataFrame(
        {
            "model": [model] * n, "revision": [revision] * n, "commit": [None] * n, "weights": [weights] * n,
            "step": [1] * n, "tokens": [None] * n, "branch": [None] * n, "layer": [g[0] for g in grid],
            "module": [g[1] for g in grid], "metric": [g[2] for g in grid], "value": [value + i for i in range(n)],
            "n_tokens": [10] * n, "calibration": [calibration] * n, "dtype": [dtype] * n, "scorer": [2] * n,
            "version": ["0"] * n, "created": [datetime(2026, 1, 1, tzinfo=timezone.utc)] * n,
        }
    )


KEY = ScoreKey("org/m", "step1", "w1", "float32", "abc", 2)


def test_write_and_read_back(tmp_path):
    store = Store(tmp_path)
    path = store.write_scores(rows())
    assert path == tmp_path / "scores" / "org%2Fm" / "step1" / "abc_float32_w1_s2.parquet"
    assert store.has_scores(KEY)
    store.write_scores(rows(revision="step2", value=0.25))
    frame = load_scores(tmp_path)
    assert frame.schema == pl.Schema(SCORES_SCHEMA)
    assert frame.filter(pl.col("layer") == 0, pl.col("module") == "block").sort("revision", "metric")["value"].to_list() == [
        0.5, 1.5, 0.25, 1.25]
    # Plain polars reads the store with no help from ckpt-trace.
    direct = pl.scan_parquet(str(tmp_path / "scores/**/*.parquet")).collect()
    assert direct.height == 24 and set(direct["model"]) == {"org/m"}


def test_empty_store_gives_empty_frame_with_schema(tmp_path):
    frame = Store(tmp_path / "new").scores()
    assert frame.height == 0 and frame.schema == pl.Schema(SCORES_SCHEMA)


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    store = Store(tmp_path)
    path = store.write_scores(rows(value=0.5))
    before = path.read_bytes()

    def broken(self, file, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        store.write_scores(rows(value=9.0))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["abc_float32_w1_s2.parquet"]


def test_store_that_is_a_file(tmp_path):
    file = tmp_path / "store"
    file.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        Store(file)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "scores").write_text("x")
    with pytest.raises(StoreError, match="not a ckpt-trace store"):
        Store(tmp_path / "s")


def test_path_part_is_safe_and_reversible():
    names = ["EleutherAI/pythia-160m", "a/b", "a--b", "a%2Fb", "..", ".", "stage2-ingredient1-step11931-tokens50B"]
    parts = [path_part(n) for n in names]
    assert parts[0] == "EleutherAI%2Fpythia-160m" and len(set(parts)) == len(names)
    assert [unquote(p) for p in parts] == names
    assert all("/" not in p and p not in (".", "..") for p in parts)


def test_other_weights_dtype_or_calibration_are_stored_beside_and_kept_apart(tmp_path):
    store = Store(tmp_path)
    store.write_scores(rows())
    store.write_scores(rows(weights="w2", value=7.0))
    store.write_scores(rows(dtype="bfloat16", value=8.0))
    store.write_scores(rows(calibration="def", value=9.0))
    assert len(list((tmp_path / "scores" / "org%2Fm" / "step1").iterdir())) == 4
    assert sorted(k.differences(KEY) for k in store.stored_keys("org/m", "step1")) == [[], ["calibration"], ["dtype"], ["weights"]]
    kept = store.scores().filter(pl.col("weights") == "w1", pl.col("dtype") == "float32", pl.col("calibration") == "abc")
    assert kept["value"].to_list() == rows()["value"].to_list()


DAMAGE = {
    "short": lambda f: f.filter(pl.col("layer") != 0),  # layer 0 of two is missing
    "no block rows": lambda f: f.filter(pl.col("module") != "block"),
    "a null value": lambda f: f.with_columns(value=pl.when(pl.col("layer") == 1).then(None).otherwise("value")),
    "a row twice, one missing": lambda f: pl.concat([f.head(1), f.head(1), f.slice(2)]),
    "layer as text": lambda f: f.with_columns(pl.col("layer").cast(pl.String)),
    "foreign": lambda f: rows(weights="w2"),  # whole scores, but of other weights, under this key's name
}


@pytest.mark.parametrize("damage", ["cut", "garbage", *DAMAGE])
def test_a_damaged_or_foreign_file_is_not_stored_scores(tmp_path, damage):
    store = Store(tmp_path)
    path = store.write_scores(rows())
    if damage == "cut":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not parquet")
    else:
        write_parquet(DAMAGE[damage](rows()), path)
    assert not store.has_scores(KEY)
    assert store.stored_keys("org/m", "step1") == ([ScoreKey("org/m", "step1", "w2", "float32", "abc", 2)]
                                                   if damage == "foreign" else [])


def test_metrics_beyond_the_scans_own_do_not_spoil_whole_scores(tmp_path):
    extra = rows().filter(pl.col("module") == "block", pl.col("metric") == "importance").with_columns(
        metric=pl.lit("ablation_loss"))
    store = Store(tmp_path)
    store.write_scores(pl.concat([rows(), extra]))
    assert store.has_scores(KEY)


def test_spans_are_whole_when_every_start_is_there(tmp_path):
    base = rows(layers=3).filter(pl.col("module") == "block", pl.col("metric") == "importance")
    # Spans of 1, 2 and 3 blocks in a 3-layer model start at layers 0-2, 0-1 and 0.
    spans = pl.concat([base.filter(pl.col("layer") <= 3 - n).with_columns(module=pl.lit(f"span{n}"))
                       for n in (1, 2, 3)]).with_columns(metric=pl.lit("span_distance"))
    store = Store(tmp_path)
    store.write_scores(pl.concat([rows(layers=3), spans]))
    assert store.has_scores(KEY, ("importance", "span_distance"))
    broken = {
        "a start missing": spans.filter(~((pl.col("module") == "span2") & (pl.col("layer") == 1))),
        "starts shifted": spans.with_columns(layer=pl.when(pl.col("module") == "span2").then(pl.col("layer") + 1)
                                             .otherwise(pl.col("layer"))),
        "a length missing": spans.filter(pl.col("module") != "span2"),
    }
    for why, part in broken.items():
        store.write_scores(pl.concat([rows(layers=3), part]))
        assert not store.has_scores(KEY), why


def test_file_names_of_keys_are_distinct_and_safe(tmp_path):
    store = Store(tmp_path)
    keys = [ScoreKey("m", "r", "w", "a-b", "c", 2), ScoreKey("m", "r", "w", "a", "b-c", 2),
            ScoreKey("m", "r", None, "x", "c", 2), ScoreKey("m", "r", "none", "x", "c", 2),
            ScoreKey("m", "r", "w", "x_y", "c", 2), ScoreKey("m", "r", "w", "x", "y_c", 2), ScoreKey("m", "r", "w", "x", "../c", 2)]
    paths = [store.scores_path(k) for k in keys]
    assert len(set(paths)) == len(keys) and all(p.parent == tmp_path / "scores" / "m" / "r" for p in paths)


def test_write_parquet_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "c.parquet"
    write_parquet(pl.DataFrame({"x": [1]}), target)
    assert pl.read_parquet(target)["x"].to_list() == [1]


@pytest.mark.parametrize("error", [RuntimeError("a bug in a reader"), PermissionError(13, "Permission denied")])
def test_a_read_error_other_than_a_damaged_file_is_raised_not_taken_for_missing_scores(tmp_path, monkeypatch, error):
    """Only a damaged or foreign file reads as "not stored" (or is skipped with a warning): a bug, or a file that
    cannot be opened, is raised, so that no scan scores again in silence and no reader drops rows unseen."""
    store = Store(tmp_path)
    store.write_scores(rows())
    assert store.has_scores(KEY) and store.scores().height == rows().height

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(pl, "read_parquet", fails)
    with pytest.raises(type(error)):
        store.has_scores(KEY)
    with pytest.raises(type(error)):
        store.stored_keys("org/m", "step1")
    monkeypatch.setattr(pl, "read_parquet_schema", fails)
    with pytest.raises(type(error)):
        store.scores()


def test_stray_files_in_every_table_are_named_and_left_out(tmp_path, capsys):
    """A Parquet file of other columns in any table, and a backup copy of a scores file, are each skipped by every
    reader with one warning naming it: the report draws the store's own rows and exits 0."""
    import shutil

    from ckpt_trace.cli import main

    store = Store(tmp_path / "store")
    path = store.write_scores(rows())
    copy = path.with_name("backup copy.parquet")
    shutil.copy(path, copy)
    foreign = {table: tmp_path / "store" / table / "stray.parquet" for table in ("scores", "revisions", "runs", "evals",
                                                                                 "curves")}
    for file in foreign.values():
        file.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"a": [1], "model": ["someone else's"]}).write_parquet(file)
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"skipping {copy}: a copy of {path}, the file its scores' key names" in err
    for table, file in foreign.items():
        if table != "runs":  # the report reads every table but runs
            assert f"skipping {file}: it lacks the {table} table's columns" in err
    assert store.scores().equals(store.read_scores(KEY).select(store.scores().columns))  # once, not twice
    for table in ("revisions", "runs", "evals", "curves"):
        assert getattr(store, table)().height == 0
