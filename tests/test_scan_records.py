"""What a scan records beside its scores: where each row was read, what its calibration set is, every attempt
(an interrupted one too); and which scores `prune` says it used."""

from __future__ import annotations

import importlib

import polars as pl
import pytest
from conftest import save_checkpoint

from ckpt_trace.cli import INTERRUPTED, main
from ckpt_trace.fetch.identity import local_weights
from ckpt_trace.store import Store

scan_module = importlib.import_module("ckpt_trace.scan.run")  # the package exports a function of that name
SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture
def suite(tmp_path, tokenizer_dir):
    for seed, name in enumerate(("step1", "step2", "step3")):
        save_checkpoint(tmp_path / "suite" / name, "llama", seed, tokenizer_dir)
    return tmp_path / "suite"


def test_rows_name_their_source_and_what_the_calibration_set_is(suite, tmp_path):
    assert main(["scan", str(suite), "--store", str(tmp_path / "s"), *SMALL]) == 0
    db = Store(tmp_path / "s")
    scores, revisions, runs = db.scores(), db.revisions(), db.runs()
    for table in (scores, revisions, runs):
        assert set(table["source"]) == {str(suite.resolve())}
    assert set(scores["calibration_source"]) == {"pydoc (4x16, seed 0): 4 sequences, 64 tokens"}


def test_a_ctrl_c_records_the_revision_under_way_as_interrupted(suite, tmp_path, monkeypatch):
    real = scan_module.score_checkpoint

    def score_checkpoint(checkpoint, *args, **kwargs):
        if checkpoint.revision.name == "step2":
            raise KeyboardInterrupt
        return real(checkpoint, *args, **kwargs)

    monkeypatch.setattr(scan_module, "score_checkpoint", score_checkpoint)
    assert main(["scan", str(suite), "--store", str(tmp_path / "s"), *SMALL]) == INTERRUPTED
    runs = Store(tmp_path / "s").runs().sort("revision")
    assert runs.select("revision", "status").rows() == [("step1", "scored"), ("step2", "interrupted")]
    assert runs.filter(pl.col("revision") == "step2")["weights"][0] == local_weights(suite / "step2")[0]


def test_prune_says_which_scores_it_used(suite, tmp_path, capsys):
    assert main(["scan", str(suite), "--store", str(tmp_path / "s"), *SMALL]) == 0
    key = Store(tmp_path / "s").scores().filter(pl.col("revision") == "step3").row(0, named=True)
    capsys.readouterr()
    assert main(["prune", str(suite), "--target", "attention", "--drop", "1", "--out", str(tmp_path / "p"),
                 "--store", str(tmp_path / "s"), *SMALL]) == 0
    said = capsys.readouterr().out.splitlines()[0]
    assert said.endswith(f"(similarity, scores from the store of step3, weights {key['weights']}, dtype float32, "
                         f"calibration set {key['calibration']})")
