"""The built-in micro suite: it learns, it is deterministic, it is built once, and scan uses it."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from ckpt_trace.cli import main
from ckpt_trace.microsuite import suite as microsuite
from ckpt_trace.microsuite.suite import MicroSuiteConfig, build, schedule
from ckpt_trace.model.adapters import locate
from ckpt_trace.model.loading import load_model
from ckpt_trace.store import Store

# A reduced schedule that trains in seconds.
QUICK = dict(layers=6, hidden=64, steps=60, interval=20, batch_size=8, seq_len=64)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_TRACE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_schedule_is_log_spaced_then_even():
    assert schedule(1000, 200) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 200, 400, 600, 800, 1000]
    assert schedule(60, 20) == [0, 1, 2, 4, 8, 16, 20, 40, 60]
    assert schedule(50, 20) == [0, 1, 2, 4, 8, 16, 20, 40, 50]
    default = MicroSuiteConfig()
    assert len(schedule(default.steps, default.interval)) >= 12 and default.layers >= 6


def test_the_model_learns(home):
    path = build(MicroSuiteConfig(**QUICK), progress=False)
    meta = json.loads((path / "suite.json").read_text())
    losses = [r["val_loss"] for r in meta["revisions"]]
    assert [r["revision"] for r in meta["revisions"]] == [f"step{s}" for s in schedule(60, 20)]
    assert losses[0] > 7.0  # about ln(2048) before training
    assert losses[-1] < losses[0] - 1.0  # 60 small steps, on documents never trained on
    assert (path / "main").resolve() == (path / "step60").resolve()
    model = load_model(path / "step60", torch.device("cpu"), torch.float32)
    assert locate(model).style == "parallel" and len(locate(model).layers) == 6
    assert (path / "step60" / "tokenizer.json").is_file()


def test_same_seed_gives_bit_identical_checkpoints(tmp_path, monkeypatch):
    config = MicroSuiteConfig(**{**QUICK, "steps": 6, "interval": 3})
    built = []
    for name in ("a", "b"):
        monkeypatch.setenv("CKPT_TRACE_HOME", str(tmp_path / name))
        built.append(build(config, progress=False))
    a, b = built
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "suite.json")
    assert any(f.name == "model.safetensors" for f in files)
    for file in files:
        assert (a / file).read_bytes() == (b / file).read_bytes(), file
    other = build(MicroSuiteConfig(**{**QUICK, "steps": 6, "interval": 3, "seed": 1}), progress=False)
    assert (other / "step6" / "model.safetensors").read_bytes() != (a / "step6" / "model.safetensors").read_bytes()


def test_second_use_finds_the_suite_and_force_rebuilds(home, monkeypatch):
    config = MicroSuiteConfig(**{**QUICK, "steps": 2, "interval": 2})
    first = build(config, progress=False)
    monkeypatch.setattr(microsuite, "train_suite", lambda *a, **k: pytest.fail("trained again"))
    assert build(config, progress=False) == first
    with pytest.raises(pytest.fail.Exception):
        build(config, force=True, progress=False)
    assert (first / "suite.json").is_file()  # a failed rebuild leaves the old suite in place


def test_llama_variant_is_sequential(home):
    path = build(MicroSuiteConfig(arch="llama", **{**QUICK, "steps": 2, "interval": 2}), progress=False)
    assert path.name == "micro-llama"
    assert locate(load_model(path / "step2", torch.device("cpu"), torch.float32)).style == "sequential"


def test_scan_without_source_scans_the_micro_suite(home, tmp_path, monkeypatch, capsys):
    config = MicroSuiteConfig(**{**QUICK, "steps": 4, "interval": 2})
    monkeypatch.setattr(microsuite, "build", lambda progress=True: build(config, progress=progress))
    code = main(["scan", "--store", str(tmp_path / "store"), "--samples", "4", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    store = Store(tmp_path / "store")
    scores = store.scores()
    steps = schedule(4, 2)
    assert set(scores["model"]) == {"micro-pythia"}
    assert sorted(set(scores["step"])) == steps
    # The main job measures every metric but the last-token variants: 4 per layer and module, the 5 training
    # dynamics (the first checkpoint has no _prev ones), and 6 + 5 + ... + 1 spans of the 6 layers.
    dynamics = {"weight_norm", "weight_change_final", "weight_change_prev", "cka_final", "cka_prev"}
    assert set(scores["metric"]) == {"importance", "update_ratio", "angular_distance", "span_distance", "ablation_loss",
                                     *dynamics}
    assert scores.height == len(steps) * (6 * 3 * 9 + 21) - 6 * 3 * 2
    assert set(scores.filter(pl.col("metric").str.starts_with("weight"))["n_tokens"]) == {None}
    measured = scores.filter(~pl.col("metric").is_in(["ablation_loss", "weight_norm", "weight_change_final",
                                                      "weight_change_prev"]))
    assert set(measured["n_tokens"]) == {4 * 64}  # the model's 64 positions: CKA over all of them too
    assert set(scores.filter(pl.col("metric") == "ablation_loss")["n_tokens"]) == {4 * 63}  # predicted tokens
    revisions = store.revisions().sort("step")
    assert revisions["step"].to_list() == steps
    assert revisions["tokens"].to_list() == [s * 8 * 64 for s in steps]
    meta = json.loads((build(config) / "suite.json").read_text())
    assert revisions["val_loss"].to_list() == [r["val_loss"] for r in meta["revisions"]]
    assert revisions.filter(pl.col("val_loss").is_null()).height == 0


def test_micro_suite_build_command(home, monkeypatch, capsys):
    config = MicroSuiteConfig(**{**QUICK, "steps": 2, "interval": 2})
    monkeypatch.setattr(microsuite, "MicroSuiteConfig", lambda arch: MicroSuiteConfig(arch=arch, **{**QUICK, "steps": 2, "interval": 2}))
    assert main(["micro-suite", "build", "--arch", "pythia"]) == 0
    assert capsys.readouterr().out.strip() == str(build(config))
    assert main(["micro-suite", "build", "--arch", "gpt5"]) == 2
    assert "unknown micro-suite architecture 'gpt5'; use one of: pythia, llama" in capsys.readouterr().err


def test_held_out_perplexity_is_the_suites_validation_loss(home, tmp_path, capsys):
    import math
    from pydoc_data.topics import topics

    path = build(MicroSuiteConfig(**QUICK), progress=False)
    meta = json.loads((path / "suite.json").read_text())
    heldout = meta["heldout_topics"]
    train, val = microsuite.split_documents(0, 0.1)
    assert len(heldout) == len(val) and [topics[k] for k in heldout] == val and not set(val) & set(train)
    assert len(train) + len(val) == len(set(topics.values()))  # every distinct text, once
    out = tmp_path / "pruned"
    assert main(["prune", str(path), "--target", "attention", "--drop", "2", "--strategy", "last", "--out", str(out),
                 "--store", str(tmp_path / "s"), "--device", "cpu"]) == 0
    code = main(["eval", str(path / "step60"), str(out), "--perplexity", "--store", str(tmp_path / "s"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    evals = Store(tmp_path / "s").evals()
    ppl = dict(evals.select("model", "value").rows())
    assert ppl["step60"] == pytest.approx(math.exp(meta["revisions"][-1]["val_loss"]), rel=1e-4)
    assert ppl["pruned"] > ppl["step60"]
    assert evals["n"].n_unique() == 1  # both on the same held-out tokens


def test_held_out_documents_are_those_the_suite_recorded(home, monkeypatch):
    from transformers import AutoTokenizer

    path = build(MicroSuiteConfig(**QUICK), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path / "step60")
    expected = microsuite.heldout_set(path / "step60", tokenizer)
    # Another Python's documentation would split differently; the recorded topics are what was held out.
    monkeypatch.setattr(microsuite, "split_documents", lambda *a: pytest.fail("the split was computed again"))
    again = microsuite.heldout_set(path / "step60", tokenizer)
    assert again.id == expected.id and len(again.sequences) > 0


def test_builtin_task_is_held_out_documentation_with_the_true_continuation():
    from pydoc_data.topics import topics as texts

    from ckpt_trace.evaluation.harness import TASK_DATA

    config = MicroSuiteConfig()
    heldout = set(microsuite.heldout_topics(config.seed, config.holdout))
    items = microsuite.builtin_task_items(config)
    assert len(items) >= 200
    shipped = [json.loads(line) for line in TASK_DATA.read_text().splitlines()]
    # The shipped file is what this Python's documentation gives, where it is the documentation it was built from.
    same_docs = all(f"{i['context']} {i['choices'][i['answer']]}" in " ".join(texts.get(i["topic"], "").split())
                    for i in shipped)
    assert items == shipped or not same_docs
    positions = [0, 0, 0, 0]
    for item in items:
        assert item["topic"] in heldout
        choices = item["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4 and all(len(c.split()) == 3 for c in choices)
        assert 1 <= len(item["context"].split()) <= 16
        words = " ".join(texts[item["topic"]].split())
        assert f"{item['context']} {choices[item['answer']]}" in words  # the true continuation follows the passage
        positions[item["answer"]] += 1
    assert min(positions) > len(items) / 8  # the answer is not always in one place
    assert microsuite.python_mc_items(sorted(heldout)[:1], seed=1) != microsuite.python_mc_items(sorted(heldout)[:1])
