"""The Parquet store: atomic writes, schema, and reading back."""

from __future__ import annotations

import polars as pl
import pytest

from ckpt_trace.errors import StoreError
from datetime import datetime, timezone
from urllib.parse import unquote

from ckpt_trace.store import SCORES_SCHEMA, ScoreKey, Store, load_scores, path_part, write_parquet


def rows(model="org/m", revision="step1", calibration="abc", value=0.5, weights="w1", dtype="float32"):
    return pl.DataFrame(
        {
            "model": [model] * 2, "revision": [revision] * 2, "commit": [None] * 2, "weights": [weights] * 2,
            "step": [1] * 2, "tokens": [None] * 2, "branch": [None] * 2, "layer": [0, 1], "module": ["attention"] * 2,
            "metric": ["importance"] * 2, "value": [value, value + 1], "n_tokens": [10] * 2,
            "calibration": [calibration] * 2, "dtype": [dtype] * 2, "scorer": [2] * 2, "version": ["0"] * 2,
            "created": [datetime(2026, 1, 1, tzinfo=timezone.utc)] * 2,
        }
    )


KEY = ScoreKey("org/m", "step1", "w1", "float32", "abc", 2)


def test_write_and_read_back(tmp_path):
    store = Store(tmp_path)
    path = store.write_scores(rows())
    assert path == tmp_path / "scores" / "org%2Fm" / "step1" / "abc-float32-w1-s2.parquet"
    assert store.has_scores(KEY)
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
    assert [p.name for p in path.parent.iterdir()] == ["abc-float32-w1-s2.parquet"]


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
    assert store.scores().filter(pl.col("weights") == "w1", pl.col("dtype") == "float32",
                                 pl.col("calibration") == "abc")["value"].to_list() == [0.5, 1.5]


@pytest.mark.parametrize("damage", ["cut", "garbage", "short", "foreign"])
def test_a_damaged_or_foreign_file_is_not_stored_scores(tmp_path, damage):
    store = Store(tmp_path)
    path = store.write_scores(rows())
    if damage == "cut":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not parquet")
    elif damage == "short":  # layer 0 of two is missing
        write_parquet(rows().tail(1), path)
    else:  # whole scores, but of other weights, under this key's name
        write_parquet(rows(weights="w2"), path)
    assert not store.has_scores(KEY)
    assert store.stored_keys("org/m", "step1") == ([ScoreKey("org/m", "step1", "w2", "float32", "abc", 2)]
                                                   if damage == "foreign" else [])


def test_write_parquet_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "c.parquet"
    write_parquet(pl.DataFrame({"x": [1]}), target)
    assert pl.read_parquet(target)["x"].to_list() == [1]
