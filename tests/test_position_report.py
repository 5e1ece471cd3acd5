"""Loss by position and healed models in the report: the excess loss of each pruned model over its original by
position bucket, finding (f) by its stated rule, healed models quoted beside (never instead of) the models they were
healed from, on synthetic stores whose numbers are computed here by hand."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from ckpt_trace.analysis import plots
from ckpt_trace.analysis.findings import FAILS, HOLDS, OPEN, long_range_cost, pruning_payoff
from ckpt_trace.analysis.positions import excess_table, position_excess
from ckpt_trace.analysis.render import save_figure
from ckpt_trace.analysis.statistics import pruned_vs_original, pruning_target, tradeoff
from ckpt_trace.cli import main
from ckpt_trace.pruning.curves import summary
from ckpt_trace.store import CURVES_SCHEMA, EVALS_SCHEMA, SCORES_SCHEMA, Store

DAY = datetime(2026, 1, 1, tzinfo=UTC)
BUCKETS = [(1, 1), (2, 4), (5, 16), (17, 63)]
"""The position buckets of sequences of 64 tokens (`ckpt_trace.scoring.loss.position_buckets(64)`)."""
HEALING = "LoRA rank 8, 200 steps, lr 0.001, seed 0, on text"
ATTENTION = "attention [2, 3] (similarity)"

ORIGINAL = [5.0, 4.0, 3.5, 3.0]
LOSSES = {  # model -> (pruning, healed, loss per bucket)
    "attn-2": (ATTENTION, None, [5.1, 4.2, 3.9, 3.6]),
    "attn-2-healed": (ATTENTION, HEALING, [5.05, 4.1, 3.7, 3.2]),
    "mlp-1": ("mlp [1] (similarity)", None, [5.5, 4.4, 3.8, 3.2]),
    "block-1": ("block [3] (similarity)", None, [5.3, 4.3, 3.7, 3.25]),
    "joint-2": ("attention [1], mlp [2] (similarity)", None, [5.2, 4.1, 3.6, 3.1]),
}


def row(model: str, pruning: str | None, healed: str | None, task: str, metric: str, value: float, day: int = 0,
        **more) -> dict:
    """One evals row of a model evaluated from step2000 (weights w2000), float32 on the CPU, text `text`."""
    return dict.fromkeys(EVALS_SCHEMA) | {
        "model": model, "path": f"/x/{model}", "source_model": "m", "revision": "step2000", "pruning": pruning,
        "healed": healed, "weights": "w2000" if pruning is None else f"w-{model}", "source_weights": "w2000",
        "task": task, "metric": metric, "value": value, "data": "text" if task != "speed" else None,
        "dtype": "float32", "device": "cpu", "created": DAY + timedelta(days=day)} | more


def positions(model: str, pruning: str | None, healed: str | None, losses: list[float], **more) -> list[dict]:
    """The rows `ckpt-trace eval --position-loss` writes: one per bucket, n the tokens predicted there."""
    return [row(model, pruning, healed, "position_loss", f"positions {first}-{last}", loss, n=8 * (last - first + 1),
                **more) for (first, last), loss in zip(BUCKETS, losses)]


def frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=EVALS_SCHEMA)


def store_rows(models=tuple(LOSSES)) -> list[dict]:
    """The original and `models` with their position losses, perplexity and decode speed."""
    quality = {"step2000": (10.0, 100.0), "attn-2": (14.0, 150.0), "attn-2-healed": (10.75, 148.0),
               "mlp-1": (12.0, 110.0), "block-1": (30.0, 125.0), "joint-2": (20.0, 130.0)}
    rows = positions("step2000", None, None, ORIGINAL)
    for model in ("step2000", *models):
        pruning, healed, losses = LOSSES.get(model, (None, None, ORIGINAL))
        day = 1 if healed else 0  # the healed model is the most recently evaluated
        if model != "step2000":
            rows += positions(model, pruning, healed, losses, created=DAY + timedelta(days=day))
        rows += [row(model, pruning, healed, "perplexity", "perplexity", quality[model][0], day),
                 row(model, pruning, healed, "speed", "decode_tokens_per_s", quality[model][1], day)]
    return rows


def excess_of(model: str) -> list[float]:
    return [loss - original for loss, original in zip(LOSSES[model][2], ORIGINAL)]


@pytest.mark.parametrize("label, target", [
    ("attention [3, 4, 5] (similarity)", "attention"), ("mlp [0] (last)", "mlp"),
    ("block [2, 3] (similarity)", "block"),
    ("attention [1], mlp [4] (similarity)", "joint"), ("attention [10, 11] (similarity then last)", "attention"),
    (None, None)])
def test_pruning_labels_name_what_was_dropped(label, target):
    assert pl.select(pruning_target(pl.lit(label, pl.String))).item() == target


def test_excess_loss_is_the_pruned_loss_minus_the_original_per_bucket():
    other_text = positions("attn-2", ATTENTION, None, [9.0] * 4, data="other")  # no original on that text
    bf16 = positions("mlp-1", "mlp [1] (similarity)", None, [9.0] * 4, dtype="bfloat16")  # nor in bfloat16
    excess = position_excess(frame(store_rows() + other_text + bf16))
    assert set(excess["data"]) == {"text"} and set(excess["dtype"]) == {"float32"}
    for model, (pruning, healed, _) in LOSSES.items():
        mine = excess.filter(pl.col("model") == model).sort("first")
        assert mine["excess"].to_list() == pytest.approx(excess_of(model))
        assert mine["bucket"].to_list() == ["1", "2-4", "5-16", "17-63"]
        assert set(mine["healed"]) == {healed}
    assert dict(excess.unique("model").select("model", "target").rows()) == {
        "attn-2": "attention", "attn-2-healed": "attention", "mlp-1": "mlp", "block-1": "block", "joint-2": "joint"}
    table = excess_table(excess)
    assert table.filter(pl.col("model") == "attn-2").select("1", "2-4", "5-16", "17-63").row(0) == pytest.approx(
        tuple(excess_of("attn-2")))
    # The loss is lower-is-better: a pruned model that loses more keeps less than all of the original.
    relative = pruned_vs_original(frame(store_rows())).filter(
        (pl.col("model") == "attn-2") & (pl.col("metric") == "positions 17-63"))["relative"].item()
    assert relative == pytest.approx(3.0 / 3.6)


def finding(models, losses: dict | None = None, scanned=None):
    rows = positions("step2000", None, None, ORIGINAL)
    for model in models:
        pruning, healed, mine = LOSSES[model] if model in LOSSES else (ATTENTION, None, None)
        rows += positions(model, pruning, healed, (losses or {}).get(model, mine))
    return long_range_cost(frame(rows), "m", scanned)


def quoted(model: str, excess: list[float] | None = None) -> str:
    excess = excess or excess_of(model)
    return (f"{model} ({LOSSES.get(model, (ATTENTION,))[0]}) of step2000: {excess[0]:+.3f} nats at position 1, "
            f"{excess[-1]:+.3f} at positions 17-63")


def test_long_range_finding_holds_when_the_last_bucket_costs_more_for_every_attention_model():
    f = finding(["attn-2", "attn-2-healed", "mlp-1", "block-1", "joint-2"])
    assert f.verdict == HOLDS
    assert f.evidence == (f"excess loss over the original, {quoted('attn-2')}; for contrast (not judged), "
                          f"{quoted('block-1')}; {quoted('mlp-1')}")
    assert "+0.100 nats at position 1, +0.600 at positions 17-63" in f.evidence  # 5.1 - 5.0 and 3.6 - 3.0
    assert "attn-2-healed" not in f.evidence and "joint-2" not in f.evidence
    assert f.basis.startswith("next-token loss by position against the original's on text `text`, float32, cpu, "
                              "1 model with only attention layers dropped; holds when")


def test_long_range_finding_fails_when_no_attention_model_costs_more_at_long_range():
    flat = [5.3, 4.25, 3.7, 3.1]  # excess 0.3, 0.25, 0.2, 0.1: less at long range
    healed_rising = [5.0, 4.1, 3.8, 3.9]  # the healed model's excess rises: not judged
    f = finding(["attn-2", "attn-2-healed"], {"attn-2": flat, "attn-2-healed": healed_rising})
    assert f.verdict == FAILS
    assert f.evidence == f"excess loss over the original, {quoted('attn-2', [0.3, 0.25, 0.2, 0.1])}"


def test_long_range_finding_is_inconclusive_when_mixed_and_open_when_nothing_is_stored():
    falling = [5.3, 4.25, 3.7, 3.1]
    mixed = finding(["attn-2", "attn-b"], {"attn-b": falling})
    assert mixed.verdict == OPEN
    assert mixed.evidence == (f"excess loss over the original, {quoted('attn-2')}; "
                              f"{quoted('attn-b', [x - o for x, o in zip(falling, ORIGINAL)])}; "
                              "greater at long range for 1 of 2 models: mixed")
    for models in ([], ["mlp-1", "block-1"], ["attn-2-healed"]):  # nothing judged: no attention-only model as pruned
        none = finding(models)
        assert none.verdict == OPEN and none.evidence == (
            "no position losses of a model pruned from m with only attention layers dropped are stored beside its "
            "original's: run `ckpt-trace eval ORIGINAL PRUNED --position-loss`")
    # Only evaluations of the weights the scores are of count, as for (c).
    elsewhere = finding(["attn-2"], scanned={"step2000": "w-other"})
    assert elsewhere.verdict == OPEN and "left out: 2 evaluations of other weights than the checkpoint's scores " \
                                         "here" in elsewhere.evidence


def test_the_position_figure_has_a_panel_per_target_and_a_dashed_healed_line(tmp_path):
    excess = position_excess(frame(store_rows()))
    figure = plots.position_excess(excess)
    axes = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["Attention dropped", "MLP dropped", "Blocks dropped",
                                               "Several kinds dropped (joint)"]
    lines = {line.get_label(): line for line in axes[0].get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"attn-2", "attn-2-healed, healed"}
    pruned, healed = lines["attn-2"], lines["attn-2-healed, healed"]
    assert pruned.get_linestyle() == "-" and healed.get_linestyle() == "--" and pruned.get_color() == healed.get_color()
    assert list(healed.get_xdata()) == [1, 4, 16, 63]
    assert list(healed.get_ydata()) == pytest.approx(excess_of("attn-2-healed"))
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["1", "2-4", "5-16", "17-63"]
    # The same frame, the same files.
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        save_figure(plots.position_excess(excess), tmp_path / folder, "position_excess")
    svg = [(tmp_path / folder / "position_excess.svg").read_bytes() for folder in ("a", "b")]
    assert svg[0] == svg[1] and svg[0].startswith(b"<?xml")


def test_a_healed_model_is_another_model_than_the_one_it_was_healed_from():
    # Healed into a folder of the same name: one model name, two models.
    healed = [r | {"model": "attn-2", "path": "/y/attn-2"} for r in store_rows(("attn-2-healed",)) if r["healed"]]
    rows = store_rows(("attn-2",)) + healed
    comparison = pruned_vs_original(frame(rows)).filter(pl.col("metric") == "perplexity")
    assert sorted(comparison.select("model", "healed", "relative").rows(), key=str) == [
        ("attn-2", HEALING, pytest.approx(10.0 / 10.75)), ("attn-2", None, pytest.approx(10.0 / 14.0))]
    points = tradeoff(pruned_vs_original(frame(rows)))  # each quality with its own speed, never crossed
    assert sorted(points.select("healed", "quality_kept", "speedup").rows(), key=str) == [
        (HEALING, pytest.approx(10.0 / 10.75), pytest.approx(1.48)),
        (None, pytest.approx(10.0 / 14.0), pytest.approx(1.5))]
    figure = plots.quality_speed(points)
    assert figure.axes[0].get_legend_handles_labels()[1] == ["perplexity", "perplexity, healed"]


def test_finding_c_quotes_the_healed_model_beside_the_pruned_one_and_judges_the_pruned_one():
    c = pruning_payoff(frame(store_rows(("attn-2", "attn-2-healed"))), "m", 4, scanned={"step2000": "w2000"})
    # 10 / 14 = 71% kept fails, although the healed model keeps 10 / 10.75 = 93% and is the most recently evaluated.
    assert c.verdict == FAILS
    assert c.evidence == (
        "pruned model attn-2 (attention [2, 3] (similarity)) of step2000, evaluated 2026-01-01: perplexity 10.00 -> "
        f"14.00 (71% of the original's quality kept); decode 1.50x as fast; healed ({HEALING}), model attn-2-healed: "
        "perplexity 10.00 -> 10.75 (93% of the original's quality kept)")
    assert "the most recent of 1 evaluated pruned model" in c.basis
    assert "by the model as pruned (a healed model's quality is quoted beside it, not judged)" in c.basis
    # A healed model of another drop set is not quoted.
    other = [r | {"pruning": "attention [0, 1] (similarity)"} if r["healed"] else r
             for r in store_rows(("attn-2", "attn-2-healed"))]
    assert "healed" not in pruning_payoff(frame(other), "m", 4, scanned={"step2000": "w2000"}).evidence


def curves_rows() -> pl.DataFrame:
    """Pruning curves of step2000 (weights w2000): attention, k = 1 and 2, the similarity drop sets healed too."""
    perplexity = {("intact", 0): 10.0, ("similarity", 1): 11.0, ("similarity", 2): 14.0, ("healed", 1): 10.2,
                  ("healed", 2): 10.75, ("oracle", 1): 10.8, ("oracle", 2): 13.0, ("last", 1): 12.0, ("last", 2): 20.0}
    rows = [dict.fromkeys(CURVES_SCHEMA) | {
        "model": "m", "revision": "step2000", "weights": "w2000", "target": "attention", "k": k, "strategy": strategy,
        "healed": HEALING if strategy == "healed" else None, "perplexity": value, "n_tokens": 4096, "data": "text",
        "calibration": "cal", "dtype": "float32", "created": DAY} for (strategy, k), value in perplexity.items()]
    random = [rows[1] | {"strategy": "random", "k": k, "seed": seed, "perplexity": value}
              for k, seed, value in ((1, 0, 12.0), (1, 1, 13.0), (2, 0, 25.0), (2, 1, 16.0))]
    return pl.DataFrame(rows + random, schema=CURVES_SCHEMA)


def test_the_healed_curve_is_its_own_line_and_quoted_in_c():
    table = summary(curves_rows())
    assert table.columns == ["target", "k", "original", "similarity", "healed", "oracle", "last", "random",
                             "random_min", "random_max", "seeds"]
    assert table.select("k", "similarity", "healed", "random").rows() == [
        (1, 11.0, 10.2, pytest.approx((12.0 * 13.0) ** 0.5)), (2, 14.0, 10.75, pytest.approx(20.0))]
    figure = plots.pruning_curve(table, "attention")
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert list(lines["similarity, healed"].get_ydata()) == [10.2, 10.75]
    assert list(lines["similarity"].get_ydata()) == [11.0, 14.0]
    named = table.with_columns(healing=pl.lit(HEALING))
    c = pruning_payoff(frame([]), "m", 4, named, ("step2000", "w2000"), {"step2000": "w2000"})
    assert c.verdict == FAILS  # 71% kept by the similarity drop set as dropped
    assert ("perplexity 10.00 -> 14.00 (71% of the original's quality kept; healed (LoRA rank 8, 200 steps, lr 0.001, "
            "seed 0, on text) 93%; oracle 77%, last 50%, random 50% (geometric mean of 2 seeds))") in c.evidence


def scores_rows() -> pl.DataFrame:
    """Scores of model m at steps 0, 1000, 2000 (weights w<step>), 4 layers, attention the least important."""
    rows = []
    for step, layer, module, metric in itertools.product((0, 1000, 2000), range(4), ("attention", "mlp", "block"),
                                                        ("importance", "update_ratio")):
        value = (0.1 if module == "attention" else 0.3) + 0.01 * layer * (1 if module == "attention" else -1)
        rows.append(dict.fromkeys(SCORES_SCHEMA) | {
            "model": "m", "revision": f"step{step}", "weights": f"w{step}", "step": step, "layer": layer,
            "module": module, "metric": metric, "value": value, "n_tokens": 10, "calibration": "cal",
            "dtype": "float32", "scorer": 2, "version": "test", "created": DAY})
    return pl.DataFrame(rows, schema=SCORES_SCHEMA)


def test_the_report_draws_excess_loss_by_position_and_states_finding_f(tmp_path):
    store = Store(tmp_path / "store")
    for _, part in scores_rows().group_by("revision"):
        store.write_scores(part)
    evals = frame(store_rows())
    for _, part in evals.group_by("model"):
        store.write_evals(part)
    store.write_curves(curves_rows())
    for out in ("out", "again"):
        assert main(["report", "--store", str(store.root), "--out", str(tmp_path / out)]) == 0
    folder = tmp_path / "out" / "m-pruned"
    for name in ("position_excess", "tradeoff"):
        assert (folder / f"{name}.png").stat().st_size > 10_000 and (folder / f"{name}.svg").is_file()
    assert (folder / "position_excess.svg").read_bytes() == \
        (tmp_path / "again" / "m-pruned" / "position_excess.svg").read_bytes()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "(m-pruned/position_excess.svg)" in md
    assert (f"- (f) dropping attention costs more at long range: **holds**. Excess loss over the original, "
            f"{quoted('attn-2')}; for contrast (not judged), {quoted('block-1')}; {quoted('mlp-1')} (next-token loss "
            "by position against the original's on text `text`, float32, cpu") in md
    # The table of excess losses: one row per model, a column per bucket.
    cells = [[c.strip() for c in line.strip("| ").split(" | ")] for line in md.splitlines() if line.startswith("| ")]
    expected = ["attn-2-healed", ATTENTION, HEALING, "attention", "step2000",
                *(f"{x:.4g}" for x in excess_of("attn-2-healed"))]
    assert expected in cells
    # (c) from the curve, healed beside it; the curve table's healed column.
    assert "(71% of the original's quality kept; healed (LoRA rank 8, 200 steps, lr 0.001, seed 0, on text) 93%" in md
    assert f"healed ({HEALING}), model attn-2-healed: perplexity 10.00 -> 10.75" in md
    assert ["attention", "2", "10", "14", "10.75", "13", "20", "20", "16", "25", "2"] in cells
    assert "m/pruning_curve_attention.png" in md and "healed: the similarity drop sets after healing" in md
    html = (tmp_path / "out" / "report.html").read_text()
    assert "(f) dropping attention costs more at long range: <b>holds</b>" in html and "17-63" in html
