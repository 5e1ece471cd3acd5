"""`ckpt-trace scan` end to end on local checkpoints, and every bad input as one line with exit 2."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from conftest import LAYERS, VOCAB, save_checkpoint, write_jsonl

from ckpt_trace.calibration.blocks import load_calibration
from ckpt_trace.calibration.sets import CalibrationSpec
from ckpt_trace.cli import main
from ckpt_trace.model.loading import load_model, load_tokenizer
from ckpt_trace.scoring.metrics import score
from ckpt_trace.store import SCORES_SCHEMA, load_scores

SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("suites") / "tiny-suite"
    for seed, name in enumerate(["step1000", "step0", "step2"]):
        save_checkpoint(root / name, "gpt_neox", seed=seed, tokenizer_dir=tokenizer_dir)
    return root


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_scan_a_suite_stores_every_revision_layer_module_and_metric(suite, tmp_path, capsys):
    store = tmp_path / "store"
    code, out, err = run(capsys, "scan", suite, "--store", store, *SMALL)
    assert code == 0, err
    frame = load_scores(store)
    assert frame.schema == pl.Schema(SCORES_SCHEMA)
    assert frame.height == 3 * LAYERS * 3 * 2
    assert set(frame["model"]) == {"tiny-suite"}
    assert frame.group_by("revision").agg(pl.col("step").first()).sort("step")["revision"].to_list() == [
        "step0", "step2", "step1000"
    ]
    assert set(frame["module"]) == {"block", "attention", "mlp"}
    assert set(frame["metric"]) == {"importance", "update_ratio"}
    assert set(frame["n_tokens"]) == {64} and set(frame["dtype"]) == {"float32"}
    # The summary lists revisions in training order.
    assert out.index("step0") < out.index("step2") < out.index("step1000")

    # Stored values equal a direct call of the library on the same checkpoint and calibration.
    tokenizer = load_tokenizer(suite / "step2")
    calibration = load_calibration(CalibrationSpec("pydoc", samples=4, seq_len=16), tokenizer)
    assert set(frame["calibration"]) == {calibration.id}
    direct = score(load_model(suite / "step2", torch.device("cpu"), torch.float32), calibration, batch_size=2)
    stored = frame.filter(pl.col("revision") == "step2").select("layer", "module", "metric", "value")
    joined = direct.join(stored, on=["layer", "module", "metric"], suffix="_stored")
    assert joined.height == LAYERS * 6
    assert (joined["value"] - joined["value_stored"]).abs().max() < 1e-12

    # A second scan finds everything stored and scores nothing; --force scores again.
    def identities():  # an atomic rewrite gives the file a new inode
        return {f.parent.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in (store / "scores").rglob("*.parquet")}

    before = identities()
    code, out, _ = run(capsys, "scan", suite, "--store", store, *SMALL)
    assert code == 0 and out.count("┆ stored ") == 3
    assert identities() == before
    code, out, _ = run(capsys, "scan", suite, "--store", store, "--revisions", "step2", "--force", *SMALL)
    assert code == 0
    after = identities()
    assert after["step2"] != before["step2"]
    assert {k: v for k, v in after.items() if k != "step2"} == {k: v for k, v in before.items() if k != "step2"}
    assert load_scores(store).height == frame.height


def test_scan_a_single_model_directory(tmp_path, tokenizer_dir, capsys):
    model_dir = save_checkpoint(tmp_path / "solo", "qwen2", tokenizer_dir=tokenizer_dir)
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [7, 8]}])
    code, _, err = run(capsys, "scan", model_dir, "--store", tmp_path / "s", "--calibration", ids, "--device", "cpu")
    assert code == 0, err
    frame = load_scores(tmp_path / "s")
    assert set(frame["model"]) == {"solo"} and set(frame["revision"]) == {"main"}
    assert set(frame["n_tokens"]) == {7}


def _one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckpt-trace: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def stored(suite, tmp_path, capsys):
    """A store holding one revision, to check that bad input does not damage it."""
    store = tmp_path / "kept"
    assert run(capsys, "scan", suite, "--store", store, "--revisions", "step0", *SMALL)[0] == 0
    files = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    yield store
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == files


def test_path_that_is_no_model(tmp_path, stored, capsys):
    (tmp_path / "empty").mkdir()
    _one_line_error(*run(capsys, "scan", tmp_path / "empty", "--store", stored)[::2], "is no model", "config.json")
    _one_line_error(*run(capsys, "scan", tmp_path / "missing", "--store", stored)[::2], "is not a directory")


@pytest.mark.parametrize("model_type", ["bert", "not-a-model"])
def test_unknown_architecture(tmp_path, stored, capsys, model_type):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 10}))
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2]}])
    code, _, err = run(capsys, "scan", tmp_path / "m", "--store", stored, "--calibration", ids)
    _one_line_error(code, err, repr(model_type), "gpt_neox", "llama", "olmo2")


def test_empty_and_unreadable_calibration(suite, tmp_path, stored, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(*run(capsys, "scan", suite, "--store", stored, "--calibration", empty, *SMALL)[::2], "empty")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x81" * 9)
    _one_line_error(*run(capsys, "scan", suite, "--store", stored, "--calibration", binary, *SMALL)[::2], "cannot read")


def test_token_ids_outside_the_vocabulary(suite, tmp_path, stored, capsys):
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, VOCAB]}])
    code, _, err = run(capsys, "scan", suite, "--store", stored, "--calibration", ids, "--device", "cpu")
    _one_line_error(code, err, f"token id {VOCAB}", f"0..{VOCAB - 1}")


def test_sequence_longer_than_the_model(suite, stored, capsys):
    code, _, err = run(capsys, "scan", suite, "--store", stored, "--seq-len", "500", "--samples", "2")
    _one_line_error(code, err, "500 tokens", "128 positions")


def test_store_that_is_a_file(suite, tmp_path, capsys):
    file = tmp_path / "store.txt"
    file.write_text("mine")
    _one_line_error(*run(capsys, "scan", suite, "--store", file, *SMALL)[::2], "is a file")
    assert file.read_text() == "mine"


@pytest.mark.parametrize(
    "option, value, fragments",
    [
        ("--device", "tpu", ["'tpu'", "auto, cpu, cuda"]),
        ("--dtype", "float8", ["'float8'", "bfloat16"]),
        ("--batch-size", "0", ["batch size", "0"]),
        ("--samples", "abc", ["'abc'", "integer"]),
        ("--revisions", "step7", ["'step7'", "step0, step2, step1000"]),
    ],
)
def test_bad_options(suite, stored, capsys, option, value, fragments):
    code, _, err = run(capsys, "scan", suite, "--store", stored, option, value)
    _one_line_error(code, err, *fragments)


def test_cuda_when_there_is_none(suite, stored, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(*run(capsys, "scan", suite, "--store", stored, "--device", "cuda")[::2], "CUDA is not available")


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "scan" in capsys.readouterr().out
    assert main(["--version"]) == 0
