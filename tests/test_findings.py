"""The findings: each claim's verdict follows its stated rule, and its numbers are those of a direct computation."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from ckpt_trace.analysis.findings import (
    FAILS,
    HOLDS,
    OPEN,
    agreement,
    cheap_versus_truth,
    persistence,
    pruning_payoff,
    redundancy,
)
from ckpt_trace.store import EVALS_SCHEMA

LAYERS = 4


CALIBRATION = "0123456789ab"
SCANNED = {"step1000": "w1000"}
"""The weights the scores of `evals`' checkpoint are of."""


def scores(values: dict[int, dict[tuple[str, str], list[float]]]) -> pl.DataFrame:
    """{step: {(module, metric): value per layer}} -> the frame `analysis.model_scores` gives (tokens = 10 per step,
    weights w<step>, float32 on calibration set CALIBRATION)."""
    rows = []
    for order, (step, cells) in enumerate(sorted(values.items())):
        for (module, metric), per_layer in cells.items():
            rows += [{"revision": f"step{step}", "weights": f"w{step}", "order": order, "step": step, "tokens": 10 * step,
                      "layer": layer, "module": module, "metric": metric, "value": value, "dtype": "float32",
                      "calibration": CALIBRATION} for layer, value in enumerate(per_layer)]
    return pl.DataFrame(rows)


def spearman(a: list[float], b: list[float]) -> float:
    """The textbook formula, for rankings without ties."""
    rank = lambda xs: {i: r for r, i in enumerate(sorted(range(len(xs)), key=xs.__getitem__))}
    ra, rb = rank(a), rank(b)
    n = len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


MLP = [0.5, 0.45, 0.55, 0.6]


@pytest.mark.parametrize(
    "attention, verdict",
    [([0.4, 0.3, 0.2, 0.1], HOLDS), ([0.6, 0.7, 0.8, 0.9], FAILS), ([0.1, 0.2, 0.3, 0.4], OPEN)],
)
def test_redundancy(attention, verdict):
    frame = scores({1000: {("attention", "importance"): attention, ("mlp", "importance"): MLP,
                           ("attention", "ablation_loss"): [0.3] * 4, ("mlp", "ablation_loss"): [0.9] * 4}})
    finding = redundancy(frame)
    assert finding.verdict == verdict
    depth = spearman(list(range(LAYERS)), attention)
    assert (f"mean importance of attention layers {sum(attention) / 4:.4f} against MLP layers {sum(MLP) / 4:.4f}; "
            f"Spearman ρ of attention importance with depth {depth:+.2f}") in finding.evidence
    assert "removing one attention layer costs 0.3000 nats of loss on average, one MLP 0.9000" in finding.evidence


def drifting(settle_at: int) -> pl.DataFrame:
    """Attention importance whose two least important layers are {2, 3} from `settle_at` on and {0, 1} before."""
    early, late = [0.1, 0.2, 0.8, 0.9], [0.9, 0.8, 0.2, 0.1]
    return scores({s: {("attention", "importance"): late if s >= settle_at else early, ("mlp", "importance"): MLP}
                   for s in (0, 100, 400, 1000)})


@pytest.mark.parametrize("settle_at, verdict, share", [(100, HOLDS, "10%"), (400, OPEN, "40%"), (1000, FAILS, "100%")])
def test_persistence(settle_at, verdict, share):
    frame = drifting(settle_at)
    finding = persistence(frame)
    assert finding.verdict == verdict
    assert f"[2, 3] are the least important from step{settle_at} on ({10 * settle_at:,} tokens seen, {share} of " \
           "training by tokens)" in finding.evidence
    # Rank agreement with the final checkpoint over the second half of training: steps 400 and 1000 (orders 2, 3).
    late = [spearman(frame.filter(pl.col("step") == s, pl.col("module") == "attention").sort("layer")["value"].to_list(),
                     [0.9, 0.8, 0.2, 0.1]) for s in (400, 1000)]
    assert f"mean {sum(late) / 2:.2f}, lowest {min(late):.2f}" in finding.evidence


def evals(pruned_perplexity: float, pruned_decode: float, pruning: str = "attention [2, 3] (similarity)") -> pl.DataFrame:
    """step1000 (weights w1000) and a model pruned from it, each evaluated for perplexity and decode speed."""
    rows = []
    for model, label, ppl, decode in (("orig", None, 10.0, 100.0), ("half", pruning, pruned_perplexity, pruned_decode)):
        for task, metric, value in (("perplexity", "perplexity", ppl), ("speed", "decode_tokens_per_s", decode)):
            rows.append({"model": model, "path": f"/x/{model}", "source_model": "m", "revision": "step1000",
                         "pruning": label, "weights": "w1000" if label is None else f"w-{model}",
                         "source_weights": "w1000", "task": task, "metric": metric, "value": value, "dtype": "float32",
                         "device": "cpu", "created": datetime(2026, 1, 1, tzinfo=UTC)})
    return pl.DataFrame([dict.fromkeys(EVALS_SCHEMA) | r for r in rows], schema=EVALS_SCHEMA)


def payoff(evals: pl.DataFrame, curve: pl.DataFrame | None = None, checkpoint=None):
    return pruning_payoff(evals, "m", LAYERS, curve, checkpoint, SCANNED)


def test_pruning_payoff():
    holds = payoff(evals(10.5, 150.0))
    assert holds.verdict == HOLDS
    assert holds.evidence == ("pruned model half (attention [2, 3] (similarity)) of step1000, evaluated 2026-01-01: "
                              "perplexity 10.00 -> 10.50 (95% of the original's quality kept); decode 1.50x as fast")
    assert holds.basis.startswith("pruned model half, the most recent of 1 evaluated pruned model with half the attention "
                                  "layers dropped from weights scanned here, from step1000's w1000, in float32, cpu; "
                                  "holds when")
    assert payoff(evals(20.0, 150.0)).verdict == FAILS
    assert payoff(evals(10.1, 90.0)).verdict == FAILS  # no faster
    # Accuracies are quoted with their standard errors, beside the perplexity the verdict rests on.
    acc = evals(10.5, 150.0).filter(pl.col("metric") == "perplexity").with_columns(
        task=pl.lit("mc"), metric=pl.lit("acc"), n=pl.lit(300, pl.Int64),
        value=pl.when(pl.col("model") == "orig").then(0.5).otherwise(0.45),
        stderr=pl.when(pl.col("model") == "orig").then(0.0289).otherwise(0.0287))
    quoted = payoff(pl.concat([evals(10.5, 150.0), acc]))
    assert quoted.verdict == HOLDS
    assert "; mc accuracy 0.500 ± 0.029 -> 0.450 ± 0.029 (300 items, ± one standard error); decode" in quoted.evidence
    missing = payoff(evals(10.5, 150.0, "attention [3] (last)"))  # a quarter, not half
    assert missing.verdict == OPEN and "with 2 of its 4 attention layers dropped" in missing.evidence
    # Nothing scanned: no evaluation can be told to be of the scores' weights.
    unscanned = pruning_payoff(evals(10.5, 150.0), "m", LAYERS)
    assert unscanned.verdict == OPEN and "left out: 2 evaluations of a checkpoint not scanned here" in unscanned.evidence


def curve(similarity: float) -> pl.DataFrame:
    """A pruning-curve summary (as `curves.summary` gives it) with 2 of 4 attention layers dropped."""
    return pl.DataFrame({"target": ["attention"], "k": [2], "original": [10.0], "similarity": [similarity],
                         "oracle": [10.2], "last": [12.5], "random": [20.0], "random_min": [11.0],
                         "random_max": [40.0], "seeds": [5]})


HERE = ("step1000", "w1000")
"""The checkpoint the curves are of: the scanned weights of step1000."""


def test_pruning_payoff_reads_quality_off_the_curve():
    # The curve's quality (similarity at k = 2) wins over an evaluated model's; speed comes from the evaluated model.
    holds = payoff(evals(20.0, 150.0), curve(10.5), HERE)
    assert holds.verdict == HOLDS
    assert holds.evidence == (
        "at step1000, with 2 of 4 attention layers dropped by similarity, perplexity 10.00 -> 10.50 (95% of the "
        "original's quality kept; oracle 98%, last 80%, random 50% (geometric mean of 5 seeds)); pruned model half "
        "(attention [2, 3] (similarity)) of step1000, evaluated 2026-01-01: decode 1.50x as fast")
    assert holds.basis.startswith("the pruning curve of step1000 and pruned model half, the most recent")
    assert payoff(evals(10.0, 150.0), curve(12.0), HERE).verdict == FAILS  # 83% kept
    # Quality alone: too low fails, enough is inconclusive without a speed.
    assert payoff(evals(10.0, 100.0)[:0], curve(12.0), HERE).verdict == FAILS
    open_ = payoff(evals(10.0, 100.0)[:0], curve(10.5), HERE)
    assert open_.verdict == OPEN and "no decode speed of such a model is stored" in open_.evidence
    # The speed is of a model pruned from the curve's checkpoint: not of another revision, nor of other weights, nor
    # of weights not recorded.
    # (An original's source weights are its own.)
    for other, why in ((evals(20.0, 150.0).with_columns(revision=pl.lit("step500")), ""),
                       (evals(20.0, 150.0).with_columns(source_weights=pl.lit("w0")),
                        "; left out: 1 evaluation of other weights than the checkpoint's scores here"),
                       (evals(20.0, 150.0).with_columns(source_weights=pl.lit(None), weights=pl.lit(None)),
                        "; left out: 2 evaluations of unknown weights (stored before evaluations recorded them)")):
        elsewhere = payoff(other, curve(10.5), HERE)
        assert elsewhere.verdict == OPEN and "no decode speed of such a model is stored" in elsewhere.evidence
        assert why in elsewhere.evidence and ("left out" in elsewhere.evidence) == bool(why)
    # Accuracies of a model pruned from another revision are not quoted beside the curve either.
    acc = evals(20.0, 150.0).filter(pl.col("metric") == "perplexity").with_columns(
        task=pl.lit("mc"), metric=pl.lit("acc"), n=pl.lit(300, pl.Int64), revision=pl.lit("step500"))
    quoted = pruning_payoff(pl.concat([evals(20.0, 150.0), acc]), "m", LAYERS, curve(10.5), HERE,
                            SCANNED | {"step500": "w1000"})
    assert quoted.verdict == HOLDS and "accuracy" not in quoted.evidence
    # A curve of other weights than the scores' is left out, and the evaluations speak for themselves.
    republished = payoff(evals(20.0, 150.0), curve(10.5), ("step1000", "w0"))
    assert republished.verdict == FAILS and republished.evidence.startswith("pruned model half") and (
        "the pruning curve of step1000 is left out: it is of other weights (w0), its scores of w1000") in republished.evidence


def test_pruning_payoff_takes_quality_and_speed_of_one_pruned_model():
    # "half" keeps 95% but its speed was never measured, evaluated a day after "half-b", which keeps 50% and decodes
    # 1.5x as fast: the most recent is the evidence, its missing speed said, never "half-b"'s borrowed.
    unmeasured = evals(10.5, 150.0).filter(~((pl.col("model") == "half") & (pl.col("task") == "speed"))).with_columns(
        created=pl.col("created") + pl.duration(days=1))
    measured = evals(20.0, 150.0).filter(pl.col("model") == "half").with_columns(model=pl.lit("half-b"),
                                                                               path=pl.lit("/x/half-b"))
    finding = payoff(pl.concat([unmeasured, measured]))
    assert finding.verdict == OPEN and "half (attention [2, 3] (similarity)) of step1000, evaluated 2026-01-02: " \
        "perplexity 10.00 -> 10.50" in finding.evidence
    assert "no decode speed of half beside its original's is stored" in finding.evidence
    assert "half-b" not in finding.evidence and "1.50x" not in finding.evidence
    assert "the most recent of 2 evaluated pruned models" in finding.basis


def test_cheap_versus_truth():
    truth = {"attention": [0.1, 0.2, 0.3, 0.4], "mlp": [0.5, 0.6, 0.7, 0.8], "block": [0.9, 1.0, 1.1, 1.2]}
    cells = lambda importance: {**{(m, "ablation_loss"): v for m, v in truth.items()},
                                **{(m, "importance"): importance(v) for m, v in truth.items()}}
    frame = scores({0: cells(lambda v: [-x for x in v]), 100: cells(lambda v: [x * 2 for x in v]),
                    1000: cells(lambda v: [x + 0.01 for x in v])})
    table = agreement(frame).filter(pl.col("score") == "importance")
    assert table["spearman"].to_list() == pytest.approx([-1.0, 1.0, 1.0])
    finding = cheap_versus_truth(frame)
    assert finding.verdict == HOLDS and "+1.00; at least 0.5 from step100 on" in finding.evidence
    assert cheap_versus_truth(frame.filter(pl.col("step") == 0)).verdict == FAILS
    assert cheap_versus_truth(frame.filter(pl.col("metric") != "ablation_loss")).verdict == OPEN
