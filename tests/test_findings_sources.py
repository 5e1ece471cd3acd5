"""What the findings rest on: every number quoted for a checkpoint is of its own rows, (c) only of evaluations of the
weights scanned, of one named pruned model, and each finding names the dtype and calibration set it rests on."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from ckpt_trace.analysis.findings import FAILS, HOLDS, OPEN, findings
from ckpt_trace.store import EVALS_SCHEMA

STEPS = (0, 128, 1000)
ATTENTION = [0.4, 0.3, 0.2, 0.1]
MLP = [0.5, 0.45, 0.55, 0.6]
BLOCK = [0.7, 0.6, 0.8, 0.9]
COST = {"attention": [0.1, 0.2, 0.3, 0.4], "mlp": [0.5, 0.6, 0.7, 0.8], "block": [0.9, 1.0, 1.1, 1.2]}
EARLY_COST = {"attention": [0.7777] * 4, "mlp": [0.3333] * 4, "block": [0.5555] * 4}
"""step128's ablation_loss: numbers no finding may quote for another checkpoint."""


def scores(metrics_at: dict[int, tuple[str, ...]], calibration_source: str | None = None) -> pl.DataFrame:
    """The frame `model_scores` gives: each step with the metrics named, 4 layers, weights w<step>."""
    rows = []
    for order, step in enumerate(sorted(metrics_at)):
        for metric in metrics_at[step]:
            for module, base in (("attention", ATTENTION), ("mlp", MLP), ("block", BLOCK)):
                if metric == "ablation_loss":
                    values = (EARLY_COST if step == 128 else COST)[module]
                else:
                    values = [v * (2 if metric == "update_ratio" else 1) + (0.01 if metric == "angular_distance" else 0)
                              for v in base]
                rows += [{"revision": f"step{step}", "weights": f"w{step}", "order": order, "step": step,
                          "tokens": 10 * step, "layer": layer, "module": module, "metric": metric, "value": value,
                          "dtype": "float32", "calibration": "0123456789ab", "calibration_source": calibration_source}
                         for layer, value in enumerate(values)]
    return pl.DataFrame(rows)


ALL = ("importance", "update_ratio", "angular_distance", "ablation_loss")
DAY = datetime(2026, 1, 1, tzinfo=UTC)


def evaluation(model: str, day: int, *, pruning: str | None = None, weights: str | None = None,
               source_weights: str | None = None, revision: str = "step1000", perplexity: float | None = None,
               decode: float | None = None, acc: float | None = None, n: int = 300) -> list[dict]:
    """The rows one `ckpt-trace eval` run of one model writes (an original's source weights are its own)."""
    results = [("perplexity", "perplexity", perplexity, 1000), ("speed", "decode_tokens_per_s", decode, None),
               ("mc", "acc", acc, n)]
    return [{"model": model, "path": f"/x/{model}", "source_model": "m", "revision": revision, "pruning": pruning,
             "weights": weights, "source_weights": source_weights if pruning else weights, "task": task,
             "metric": metric, "value": value, "stderr": 0.02 if metric == "acc" else None, "n": items,
             "dtype": "float32", "device": "cpu", "created": DAY + timedelta(days=day)}
            for task, metric, value, items in results if value is not None]


def evals(*runs: list[dict]) -> pl.DataFrame:
    return pl.DataFrame([dict.fromkeys(EVALS_SCHEMA) | row for run in runs for row in run], schema=EVALS_SCHEMA)


HALF = "attention [2, 3] (similarity)"
COMMITTED = (evaluation("step1000", 0, perplexity=10.0, decode=100.0, acc=0.5),  # before weights were recorded
             evaluation("attention-2", 0, pruning=HALF, perplexity=12.0, decode=167.0, acc=0.49))
MINE = (evaluation("step1000", 5, weights="w1000", perplexity=10.0, decode=100.0, acc=0.5),
        evaluation("mine", 5, pruning=HALF, weights="wp", source_weights="w1000", perplexity=10.5, decode=20.0, acc=0.48))


def curve(similarity: float = 10.5) -> pl.DataFrame:
    return pl.DataFrame({"target": ["attention"], "k": [2], "original": [10.0], "similarity": [similarity],
                         "oracle": [10.2], "last": [12.5], "random": [20.0], "random_min": [11.0],
                         "random_max": [40.0], "seeds": [5]})


def text(finding) -> str:
    return f"{finding.claim} {finding.verdict} {finding.evidence} {finding.basis}"


# 1. A checkpoint's own rows.


def test_a_metric_the_final_checkpoint_lacks_is_said_not_borrowed():
    # Shards scanned with different --metrics: ablation_loss at step128 only.
    frame = scores({0: ALL[:3], 128: ALL, 1000: ALL[:3]})
    a, b, c, d = findings(frame, evals(*MINE), "m")
    assert a.verdict == HOLDS  # it rests on importance, which step1000 has
    assert "no ablation_loss is stored for step1000 (it is for step128 only), so no cost of removing a layer is " \
           "quoted" in a.evidence and a.basis.startswith("final checkpoint step1000")
    assert d.verdict == OPEN and d.evidence == (
        "no ablation_loss is stored for step1000 (it is for step128 only), the final checkpoint: scan with "
        "--metrics importance,update_ratio,ablation_loss at step1000")
    for finding in (a, b, c, d):
        assert not re.search(r"0\.7777|0\.3333|0\.5555|nan", text(finding), re.IGNORECASE), finding


@pytest.mark.parametrize("where", ["at the final checkpoint", "anywhere"])
@pytest.mark.parametrize("metric", ["ablation_loss", "angular_distance", "update_ratio"])
def test_no_finding_says_nan_whatever_metric_is_missing(metric, where):
    present = tuple(m for m in ALL if m != metric)
    frame = scores({0: ALL if where != "anywhere" else present, 128: ALL if where != "anywhere" else present,
                    1000: present})
    for finding in findings(frame, evals(*COMMITTED, *MINE), "m", curve(), ("step1000", "w1000")):
        assert "nan" not in text(finding).lower(), finding
    d = findings(frame, evals(), "m")[3]
    if metric == "ablation_loss":
        assert d.verdict == OPEN and "no ablation_loss is stored" in d.evidence
    else:  # importance agrees at step1000; the cheap score step1000 lacks is named, never taken from step128
        assert d.verdict == HOLDS and "at step1000: +0.91 (" in d.evidence
        assert (f"no {metric} at step1000" in d.evidence) == (where != "anywhere")


def test_no_finding_says_nan_of_ties_or_a_diverged_pruned_model():
    # Every attention layer alike (ρ with depth undefined), every module's cost alike (ρ with ablation_loss
    # undefined), a pruned model whose perplexity is NaN.
    frame = scores({0: ALL, 1000: ALL}).with_columns(
        value=pl.when(pl.col("metric").is_in(["ablation_loss"]) | (pl.col("module") == "attention"))
        .then(0.5).otherwise(pl.col("value")))
    diverged = evaluation("mine", 5, pruning=HALF, weights="wp", source_weights="w1000", perplexity=float("nan"),
                          decode=150.0)
    a, b, c, d = findings(frame, evals(MINE[0], diverged), "m")
    assert a.verdict == OPEN and "with depth undefined (tied or too few values)" in a.evidence
    assert c.verdict == OPEN and "perplexity 10.00 -> not a finite number" in c.evidence
    assert d.verdict == OPEN and "at step1000: undefined (tied or too few values)" in d.evidence
    for finding in (a, b, c, d):
        assert "nan" not in text(finding).lower(), finding
    curved = findings(frame, evals(), "m", curve(float("nan")), ("step1000", "w1000"))[2]
    assert curved.verdict == OPEN and "nan" not in text(curved).lower()


# 2. (c) rests on the weights scanned, and on one named pruned model.


def test_evaluations_of_unknown_weights_are_left_out_and_the_most_recent_model_is_quoted():
    # The committed evaluations (no weights recorded) decode 1.67x as fast; the user's own, of the scanned weights,
    # 0.20x: the finding quotes the user's, names it, and says what it left out.
    frame = scores({0: ALL, 1000: ALL})
    c = findings(frame, evals(*COMMITTED, *MINE), "m")[2]
    assert c.verdict == FAILS and "1.67" not in c.evidence and "attention-2" not in c.evidence
    assert c.evidence == (
        "pruned model mine (attention [2, 3] (similarity)) of step1000, evaluated 2026-01-06: perplexity 10.00 -> "
        "10.50 (95% of the original's quality kept); mc accuracy 0.500 ± 0.020 -> 0.480 ± 0.020 (300 items, ± one "
        "standard error); decode 0.20x as fast; left out: 2 evaluations of unknown weights (stored before "
        "evaluations recorded them)")
    assert "the most recent of 1 evaluated pruned model" in c.basis and "from step1000's w1000" in c.basis
    # The same beside a pruning curve of step1000's scanned weights.
    curved = findings(frame, evals(*COMMITTED, *MINE), "m", curve(), ("step1000", "w1000"))[2]
    assert curved.verdict == FAILS and "decode 0.20x as fast" in curved.evidence and "1.67" not in curved.evidence
    assert "left out: 2 evaluations of unknown weights" in curved.evidence
    # Only evaluations of unknown weights: nothing to quote beside the scores.
    none = findings(frame, evals(*COMMITTED), "m")[2]
    assert none.verdict == OPEN and "1.67" not in none.evidence and "left out: 2 evaluations of unknown weights" in none.evidence


def test_the_most_recent_pruned_model_is_the_evidence_not_the_fastest():
    frame = scores({0: ALL, 1000: ALL})
    quick = evaluation("quick", 2, pruning=HALF, weights="wf", source_weights="w1000", perplexity=10.5, decode=200.0)
    slow = evaluation("slow", 3, pruning="attention [0, 3] (last)", weights="ws", source_weights="w1000",
                      perplexity=10.5, decode=50.0)
    c = findings(frame, evals(MINE[0], quick, slow), "m")[2]
    assert c.verdict == FAILS and "pruned model slow (attention [0, 3] (last))" in c.evidence
    assert "0.50x" in c.evidence and "2.00x" not in c.evidence and "quick" not in c.evidence
    assert "the most recent of 2 evaluated pruned models" in c.basis


def test_a_model_pruned_from_a_republished_checkpoint_is_not_quoted_beside_the_new_weights():
    # step1000 was scanned again after it was re-published (w1000); the pruned model and the original's evaluation
    # are of the earlier weights (wold), and the pruned model is the more recent evaluation.
    frame = scores({0: ALL, 1000: ALL})
    old = (evaluation("step1000", 0, weights="wold", perplexity=10.0, decode=100.0),
           evaluation("old-half", 9, pruning=HALF, weights="wp0", source_weights="wold", perplexity=10.1, decode=300.0))
    c = findings(frame, evals(*old), "m")[2]
    assert c.verdict == OPEN and "3.00x" not in c.evidence and "old-half" not in c.evidence
    assert "left out: 2 evaluations of other weights than the checkpoint's scores here (re-published or retrained " \
           "since)" in c.evidence
    # With a model pruned from the new weights beside them, that one is quoted, although evaluated earlier.
    c = findings(frame, evals(*old, *MINE), "m")[2]
    assert "pruned model mine" in c.evidence and "old-half" not in c.evidence and "3.00x" not in c.evidence
    assert "left out: 2 evaluations of other weights" in c.evidence


# 3. The accuracy clause once.


def test_an_accuracy_measured_twice_is_quoted_once():
    frame = scores({0: ALL, 1000: ALL})
    # The same pruned model, evaluated before weights were recorded and again since; and once more on 10 items.
    again = (evaluation("attention-2", 0, perplexity=12.0, decode=167.0, acc=0.49, pruning=HALF),
             evaluation("step1000", 0, perplexity=10.0, decode=100.0, acc=0.5),
             evaluation("step1000", 5, weights="w1000", perplexity=10.0, decode=100.0, acc=0.5),
             evaluation("attention-2", 5, pruning=HALF, weights="wp", source_weights="w1000", perplexity=12.0,
                        decode=150.0, acc=0.47),
             evaluation("step1000", 6, weights="w1000", acc=0.6, n=10),
             evaluation("attention-2", 6, pruning=HALF, weights="wp", source_weights="w1000", acc=0.3, n=10))
    for c in (findings(frame, evals(*again), "m")[2],
              findings(frame, evals(*again), "m", curve(), ("step1000", "w1000"))[2]):
        assert c.evidence.count("accuracy") == 1 and c.evidence.count("attention-2") == 1
        assert "mc accuracy 0.600 ± 0.020 -> 0.300 ± 0.020 (10 items, ± one standard error)" in c.evidence


# 4. The dtype and calibration set.


@pytest.mark.parametrize("name, said", [(None, "calibration set `0123456789ab`"),
                                        ("pydoc", "calibration set pydoc (`0123456789ab`)")])
def test_findings_name_the_dtype_and_calibration_set_they_rest_on(name, said):
    a, b, c, d = findings(scores({0: ALL, 1000: ALL}, calibration_source=name), evals(*MINE), "m")
    for finding in (a, b, d):
        assert f"float32 scores on {said}" in finding.basis, finding
    assert ", in float32, cpu, perplexity on text" not in c.basis and c.basis.split("; ")[0].endswith("in float32, cpu")
    # A curve that carries its setting (as `report` may pass it) is named by it.
    setting = curve().with_columns(dtype=pl.lit("bfloat16"), calibration=pl.lit("0123456789ab"), data=pl.lit("text1"))
    curved = findings(scores({0: ALL, 1000: ALL}), evals(), "m", setting, ("step1000", "w1000"))[2]
    assert curved.basis.startswith("the pruning curve of step1000 (bfloat16, calibration set `0123456789ab`, perplexity "
                                   "on text `text1`); holds when")
