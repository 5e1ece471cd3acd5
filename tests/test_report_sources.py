"""One source per figure: the report draws the scan of the weights on disk, as prune and curves use them; folders
that share a name are two models; a revision that became a copy of another is drawn as that copy."""

from __future__ import annotations

import shutil

import polars as pl
import pytest
from conftest import save_checkpoint

from ckpt_trace.analysis.statistics import model_scores, source_rows
from ckpt_trace.calibration.sets import CalibrationSpec
from ckpt_trace.cli import main
from ckpt_trace.fetch.identity import local_weights
from ckpt_trace.fetch.sources import weights_on_disk
from ckpt_trace.pruning.run import PruneConfig, manifest, prune
from ckpt_trace.store import Store

SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--dtype", "float32"]
NAMES = ("step1", "step2", "step3")


@pytest.fixture
def suite(tmp_path, tokenizer_dir):
    root = tmp_path / "x" / "suite"
    for seed, name in enumerate(NAMES):
        save_checkpoint(root / name, "gpt_neox", seed, tokenizer_dir)
    return root


def scan(suite, store, *extra) -> None:
    assert main(["scan", str(suite), "--store", str(store), "--metrics", "importance,update_ratio", *SMALL, *extra]) == 0


def drawn(store, suite) -> pl.DataFrame:
    """The report's rows of the suite: those `build_model_report` draws."""
    db = Store(store)
    source = str(suite.resolve())
    rows = source_rows(db.scores(), db.revisions(), "suite", source)
    return model_scores(rows, "suite", on_disk=weights_on_disk(source))


def weights_file(folder):
    return folder / "model.safetensors"


def test_report_prune_and_store_agree_after_other_weights_were_scanned_and_the_original_put_back(suite, tmp_path):
    store = tmp_path / "store"
    scan(suite, store)
    original = tmp_path / "original.safetensors"
    shutil.copy2(weights_file(suite / "step3"), original)
    shutil.copyfile(weights_file(suite / "step1"), weights_file(suite / "step3"))
    scan(suite, store)  # the latest scan of step3 is now of step1's weights
    shutil.copy2(original, weights_file(suite / "step3"))  # cp -p: the original, with its old modification time
    scan(suite, store)

    frame = drawn(store, suite)
    step3 = frame.filter(pl.col("revision") == "step3")
    assert set(step3["weights"]) == {local_weights(suite / "step3")[0]} and set(step3["drawn"]) == {"disk"}

    out = tmp_path / "pruned"
    prune(PruneConfig(source=suite, target="attention", drop=1, out=out, store=store, device="cpu", dtype="float32",
                      calibration=CalibrationSpec(samples=4, seq_len=16), progress=False))
    record = manifest(out)
    assert record["scores_from"] == "store" and record["weights"] == step3["weights"][0]
    used = pl.DataFrame(record["scores"]).filter(pl.col("metric") == "importance").sort("module", "layer")
    shown = step3.filter(pl.col("metric") == "importance").sort("module", "layer")
    assert used["value"].to_list() == shown["value"].to_list()

    assert main(["report", "--store", str(store), "--out", str(tmp_path / "figures")]) == 0
    md = (tmp_path / "figures" / "report.md").read_text()
    assert "scores drawn from the weights on disk: step1, step2, step3" in md


def test_folders_of_one_name_are_two_models_named_by_their_paths(suite, tmp_path, tokenizer_dir):
    other = tmp_path / "y" / "suite"
    for seed, name in zip((7, 8), ("step1", "step5")):
        save_checkpoint(other / name, "gpt_neox", seed, tokenizer_dir)
    store = tmp_path / "store"
    scan(suite, store)
    scan(other, store)
    db = Store(store)
    x = model_scores(source_rows(db.scores(), db.revisions(), "suite", str(suite.resolve())), "suite")
    y = model_scores(source_rows(db.scores(), db.revisions(), "suite", str(other.resolve())), "suite")
    assert x["revision"].unique(maintain_order=True).to_list() == ["step1", "step2", "step3"]
    assert y["revision"].unique(maintain_order=True).to_list() == ["step1", "step5"]
    assert set(x.filter(pl.col("revision") == "step1")["weights"]) == {local_weights(suite / "step1")[0]}
    assert set(y.filter(pl.col("revision") == "step1")["weights"]) == {local_weights(other / "step1")[0]}

    assert main(["report", "--store", str(store), "--out", str(tmp_path / "figures")]) == 0
    md = (tmp_path / "figures" / "report.md").read_text()
    assert f"## suite ({suite.resolve()})" in md and f"## suite ({other.resolve()})" in md


def test_same_weights_in_two_folders_are_scored_once_and_drawn_in_both(suite, tmp_path):
    other = tmp_path / "y" / "suite"
    shutil.copytree(suite, other)
    store = tmp_path / "store"
    scan(suite, store)
    scan(other, store)
    assert len(list((store / "scores").rglob("*.parquet"))) == 3  # scores are stored by content, once
    db = Store(store)
    for folder in (suite, other):
        frame = model_scores(source_rows(db.scores(), db.revisions(), "suite", str(folder.resolve())), "suite",
                             on_disk=weights_on_disk(str(folder.resolve())))
        assert frame["revision"].unique(maintain_order=True).to_list() == list(NAMES)
        assert set(frame["drawn"]) == {"disk"}


def test_a_revision_that_became_a_copy_of_another_is_drawn_as_that_copy(suite, tmp_path):
    store = tmp_path / "store"
    scan(suite, store)
    shutil.copyfile(weights_file(suite / "step1"), weights_file(suite / "step3"))  # same config: the same identity
    frame = drawn(store, suite)
    step1 = frame.filter(pl.col("revision") == "step1").sort("module", "layer", "metric")
    step3 = frame.filter(pl.col("revision") == "step3").sort("module", "layer", "metric")
    assert step3["value"].to_list() == step1["value"].to_list()
    assert step3["step"].unique().to_list() == [3] and set(step3["drawn"]) == {"copy"}
    assert set(step3["copied_from"]) == {"step1"}


def test_a_source_no_longer_on_disk_is_drawn_from_its_latest_scans_and_said_so(suite, tmp_path):
    store = tmp_path / "store"
    scan(suite, store)
    shutil.rmtree(suite)
    assert weights_on_disk(str(suite.resolve())) is None
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "figures")]) == 0
    md = (tmp_path / "figures" / "report.md").read_text()
    assert f"scores drawn from the latest scan: step1, step2, step3 (`{suite.resolve()}` is not on this machine)" in md


def test_a_micro_suite_built_elsewhere_is_the_same_source_and_the_weights_here_are_drawn(tmp_path, tokenizer_dir,
                                                                                         monkeypatch):
    """The committed scores of a micro suite come from another machine's build: the suite built here from the same
    recipe is the same model (one section), drawn from the scans of the weights built here."""
    store = tmp_path / "store"
    for seed, home in ((0, tmp_path / "elsewhere"), (5, tmp_path / "here")):
        suite = home / "micro-suite" / "recipe1" / "micro-x"
        for offset, name in enumerate(("step1", "step2")):
            save_checkpoint(suite / name, "gpt_neox", seed + offset, tokenizer_dir)
        (suite / "suite.json").write_text("{}")
        monkeypatch.setenv("CKPT_TRACE_HOME", str(home))
        scan(suite, store)
    db = Store(store)
    assert set(db.scores()["source"]) == {"micro-suite:recipe1/micro-x"}
    assert weights_on_disk("micro-suite:recipe1/micro-x") == {name: local_weights(suite / name)[0]
                                                              for name in ("step1", "step2")}
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "figures")]) == 0
    md = (tmp_path / "figures" / "report.md").read_text()
    assert md.count("## micro-x") == 1 and "scores drawn from the weights on disk: step1, step2" in md
