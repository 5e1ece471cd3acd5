"""The Parquet store: atomic writes, schema, and reading back."""

from __future__ import annotations

import polars as pl
import pytest

from ckpt_trace.errors import StoreError
from ckpt_trace.store import SCORES_SCHEMA, Store, load_scores, path_part, write_parquet


def rows(model="org/m", revision="step1", calibration="abc", value=0.5):
    return pl.DataFrame(
        {
            "model": [model] * 2, "revision": [revision] * 2, "commit": [None] * 2, "step": [1] * 2,
            "tokens": [None] * 2, "layer": [0, 1], "module": ["attention"] * 2, "metric": ["importance"] * 2,
            "value": [value, value + 1], "n_tokens": [10] * 2, "calibration": [calibration] * 2,
            "dtype": ["float32"] * 2, "version": ["0"] * 2,
        }
    )


def test_write_and_read_back(tmp_path):
    store = Store(tmp_path)
    path = store.write_scores(rows())
    assert path == tmp_path / "scores" / "org--m" / "step1" / "abc.parquet"
    assert store.has_scores("org/m", "step1", "abc")
    store.write_scores(rows(revision="step2", value=0.25))
    frame = load_scores(tmp_path)
    assert frame.schema == pl.Schema(SCORES_SCHEMA)
    assert frame.sort("revision", "layer")["value"].to_list() == [0.5, 1.5, 0.25, 1.25]
    # Plain polars reads the store with no help from ckpt-trace.
    direct = pl.scan_parquet(str(tmp_path / "scores/**/*.parquet")).collect()
    assert direct.height == 4 and set(direct["model"]) == {"org/m"}


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
    assert [p.name for p in path.parent.iterdir()] == ["abc.parquet"]


def test_store_that_is_a_file(tmp_path):
    file = tmp_path / "store"
    file.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        Store(file)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "scores").write_text("x")
    with pytest.raises(StoreError, match="not a ckpt-trace store"):
        Store(tmp_path / "s")


def test_path_part_is_safe():
    assert path_part("EleutherAI/pythia-160m") == "EleutherAI--pythia-160m"
    assert "/" not in path_part("a/b/../c") and ".." not in path_part("../x").split("/")


def test_write_parquet_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "c.parquet"
    write_parquet(pl.DataFrame({"x": [1]}), target)
    assert pl.read_parquet(target)["x"].to_list() == [1]
