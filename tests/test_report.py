"""Analysis numbers on synthetic stores with known answers, and the report around them."""

from __future__ import annotations

import itertools
import uuid

import numpy as np
import polars as pl
import pytest

from ckpt_trace.analysis import plots
from ckpt_trace.analysis.statistics import (
    drop_count,
    drop_set_overlap,
    drop_set_settled,
    layer_matrix,
    model_scores,
    rank_consistency,
)
from ckpt_trace.cli import main
from ckpt_trace.store import REVISIONS_SCHEMA, SCORES_SCHEMA, Store, write_parquet

STEPS = [0, 1, 2, 4, 1000, 2000]
FINAL = [0.9, 0.1, 0.5, 0.3]  # attention importance of layers 0..3 at the end: ranking 1 < 3 < 2 < 0
# Before step 4 the attention ranking is another one; from step 4 on it is the final one.
EARLY = {0: [0.1, 0.9, 0.3, 0.5], 1: [0.2, 0.8, 0.4, 0.6], 2: [0.3, 0.7, 0.6, 0.5]}


def attention_values(step: int) -> list[float]:
    if step in EARLY:
        return EARLY[step]
    return [v + 0.001 * step / 1000 for v in FINAL]  # same order, values still moving


def synthetic_rows(model="m", steps=STEPS, metrics=("importance", "update_ratio"), calibration="cal") -> pl.DataFrame:
    rows = []
    for step, layer, metric, module in itertools.product(steps, range(4), metrics, ("attention", "mlp", "block")):
        if module == "attention":
            value = attention_values(step)[layer]
        else:
            value = 0.2 + 0.1 * layer + (0.01 if module == "mlp" else 0.02) * (step > 2)
        if metric == "update_ratio":
            value *= 2
        rows.append({"model": model, "revision": f"step{step}", "commit": None, "step": step, "tokens": None,
                     "layer": layer, "module": module, "metric": metric, "value": value, "n_tokens": 10,
                     "calibration": calibration, "dtype": "float32", "version": "test"})
    return pl.DataFrame(rows, schema=SCORES_SCHEMA)


def store_with(tmp_path, frame: pl.DataFrame, losses: dict | None = None) -> Store:
    store = Store(tmp_path / "store")
    for _, part in frame.group_by("model", "revision", "calibration"):
        store.write_scores(part)
    for (model, revision, step), loss in (losses or {}).items():
        row = dict.fromkeys(REVISIONS_SCHEMA) | {"model": model, "revision": revision, "step": step, "val_loss": loss}
        store.write_revision(pl.DataFrame([row], schema=REVISIONS_SCHEMA))
    return store


def spearman(a: list[float], b: list[float]) -> float:
    """The textbook formula, for rankings without ties."""
    rank = lambda xs: {i: r for r, i in enumerate(sorted(range(len(xs)), key=xs.__getitem__))}
    ra, rb = rank(a), rank(b)
    n = len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of every row of every Markdown table in the text."""
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")]
            for line in markdown.splitlines() if line.startswith("| ")]


def test_training_order_and_matrix():
    frame = model_scores(synthetic_rows(), "m")
    matrix = layer_matrix(frame, "attention", "importance")
    assert matrix.columns == ["layer"] + [f"step{s}" for s in STEPS]
    assert matrix["step0"].to_list() == EARLY[0]
    assert matrix["step2000"].to_list() == pytest.approx([v + 0.002 for v in FINAL])


def test_rank_consistency_exact():
    frame = model_scores(synthetic_rows(), "m")
    table = rank_consistency(frame).filter(pl.col("module") == "attention").sort("order")
    expected = [spearman(attention_values(s), attention_values(2000)) for s in STEPS]
    assert table["spearman"].to_list() == pytest.approx(expected)
    assert expected[:3] == pytest.approx([-1.0, -1.0, -0.8])  # the reference is not trivially 1
    assert table["spearman"].to_list()[3:] == pytest.approx([1.0, 1.0, 1.0])


def test_drop_set_overlap_and_settling():
    frame = model_scores(synthetic_rows(), "m")
    overlap = drop_set_overlap(frame)
    attention = overlap.filter(pl.col("module") == "attention")
    # 25% of 4 layers: k=1, final set {1}; 50%: k=2, final set {1, 3}.
    quarter = attention.filter(pl.col("fraction") == 0.25).sort("order")
    assert quarter["k"].unique().to_list() == [1]
    assert quarter["layers"].to_list() == [[0], [0], [0], [1], [1], [1]]
    assert quarter["jaccard"].to_list() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    half = attention.filter(pl.col("fraction") == 0.5).sort("order")
    assert half["layers"].to_list() == [[0, 2], [0, 2], [0, 3], [1, 3], [1, 3], [1, 3]]
    assert half["jaccard"].to_list() == pytest.approx([0.0, 0.0, 1 / 3, 1.0, 1.0, 1.0])
    settled = drop_set_settled(overlap).filter(pl.col("module") == "attention")
    assert settled["settled_revision"].to_list() == ["step4", "step4"]
    assert settled["settled_step"].to_list() == [4, 4]


def test_a_set_that_matches_early_but_not_for_good_settles_later(tmp_path):
    frame = model_scores(synthetic_rows(), "m")
    # Make step1 agree with the final drop set once; it must not count as settled.
    frame = frame.with_columns(
        value=pl.when((pl.col("revision") == "step1") & (pl.col("module") == "attention") & (pl.col("layer") == 1))
        .then(0.0).otherwise(pl.col("value"))
    )
    overlap = drop_set_overlap(frame, fractions=(0.25,))
    assert overlap.filter(pl.col("module") == "attention").sort("order")["jaccard"].to_list() == [0, 1, 0, 1, 1, 1]
    assert drop_set_settled(overlap).filter(pl.col("module") == "attention")["settled_revision"].to_list() == ["step4"]


@pytest.mark.parametrize("n, fraction, k", [(4, 0.25, 1), (6, 0.25, 2), (32, 0.5, 16), (2, 0.25, 1), (10, 0.25, 3)])
def test_drop_count(n, fraction, k):
    assert drop_count(n, fraction) == k


def test_figures_have_content():
    frame = model_scores(synthetic_rows(), "m")
    heat = plots.heatmaps(frame)
    panels = [ax for ax in heat.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["Attention", "MLP", "Block"]
    assert all(len(ax.collections) == 1 for ax in panels)
    for ax, module in zip(panels, ("attention", "mlp", "block")):  # each module on its own scale, layer 0 aside
        values = layer_matrix(frame, module, "importance").drop("layer").to_numpy()[1:].ravel()
        assert ax.collections[0].get_clim() == pytest.approx(tuple(np.percentile(values, [2, 98])))
    lines = plots.layer_lines(frame)
    assert sum(len(ax.lines) for ax in lines.axes) == 3 * 4
    assert lines.axes[0].get_xscale() == "symlog"


def test_report_writes_figures_tables_and_html(tmp_path, capsys):
    store = store_with(tmp_path, synthetic_rows(), {("m", f"step{s}", s): 5.0 - s / 1000 for s in STEPS})
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / "m"
    names = sorted(p.name for p in folder.iterdir())
    figures = ["consistency", "drop_set", "importance_heatmaps", "importance_lines", "update_ratio_heatmaps",
               "validation_loss"]
    assert names == sorted(f"{f}.{kind}" for f in figures for kind in ("png", "svg"))
    assert all((folder / n).stat().st_size > 10_000 for n in names)
    assert (folder / "consistency.svg").read_text().startswith("<?xml")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Not drawn" not in md and "[![" in md and "(m/consistency.svg)" in md
    assert ["step4", "4", "1", "1", "1"] in table_rows(md)  # consistency row: attention, mlp, block
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "src='m/" not in html
    assert "calibration set" in html and "ckpt-trace test" not in html


def test_report_says_what_it_could_not_draw(tmp_path):
    rows = pl.concat([
        synthetic_rows("single", steps=[1000]),
        synthetic_rows("importance-only", metrics=("importance",)),
        synthetic_rows("two-calibrations", calibration="a"),
        synthetic_rows("two-calibrations", steps=[0], calibration="b"),
    ])
    store = store_with(tmp_path, rows)
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    single = md.split("## single")[1]
    assert "only one checkpoint is stored" in single and "importance_heatmaps.png" in single
    only = md.split("## importance-only")[1].split("## single")[0]
    assert "no update_ratio scores" in only and "consistency.png" in only
    assert "scores of other calibration sets (`b`) are left out; this report uses `a`: it covers the most revisions (6)" in md
    assert md.count("the store has no validation loss") == 3
    assert not (tmp_path / "out" / "single" / "consistency.png").exists()


def test_report_bad_input(tmp_path, capsys):
    assert main(["report", "--store", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no scores" in capsys.readouterr().err
    store = store_with(tmp_path, synthetic_rows())
    assert main(["report", "--store", str(store.root), "--model", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "no scores for model 'nope'" in capsys.readouterr().err


def synthetic_evals() -> pl.DataFrame:
    from datetime import datetime, timezone

    from ckpt_trace.store import EVALS_SCHEMA

    results = {  # model -> (pruning, perplexity, acc, decode tokens/s, prefill s, kv bytes)
        "step2000": (None, 10.0, 0.50, 100.0, 0.20, 1000.0),
        "attention-2": ("attention [1, 3] (similarity)", 12.5, 0.45, 150.0, 0.16, 500.0),
        "block-1": ("block [2] (last)", 20.0, 0.25, 125.0, 0.10, 750.0),
    }
    rows = []
    for model, (pruning, ppl, acc, decode, prefill, kv) in results.items():
        for task, metric, value in [("perplexity", "perplexity", ppl), ("mc", "acc", acc), ("speed", "decode_tokens_per_s", decode),
                                    ("speed", "prefill_latency_s", prefill), ("speed", "kv_cache_bytes", kv)]:
            rows.append({"model": model, "path": f"/x/{model}", "source_model": "m", "revision": "step2000",
                         "pruning": pruning, "task": task, "metric": metric, "value": value,
                         "dtype": "float32", "device": "cpu", "created": datetime(2026, 1, 1, tzinfo=timezone.utc)})
    return pl.DataFrame([dict.fromkeys(EVALS_SCHEMA) | r for r in rows], schema=EVALS_SCHEMA)


def test_pruned_models_relative_to_the_original():
    from ckpt_trace.analysis.statistics import pruned_vs_original, tradeoff

    comparison = pruned_vs_original(synthetic_evals())
    relative = {(m, k): v for m, k, v in comparison.select("model", "metric", "relative").rows()}
    assert relative[("attention-2", "perplexity")] == pytest.approx(0.8)  # 10 / 12.5
    assert relative[("attention-2", "acc")] == pytest.approx(0.9)
    assert relative[("attention-2", "decode_tokens_per_s")] == pytest.approx(1.5)
    assert relative[("block-1", "prefill_latency_s")] == pytest.approx(2.0)
    assert relative[("attention-2", "kv_cache_bytes")] == pytest.approx(2.0)  # half the cache
    points = tradeoff(comparison)
    assert sorted(points.select("model", "metric", "quality_kept", "speedup").rows()) == [
        ("attention-2", "acc", pytest.approx(0.9), pytest.approx(1.5)),
        ("attention-2", "perplexity", pytest.approx(0.8), pytest.approx(1.5)),
        ("block-1", "acc", pytest.approx(0.5), pytest.approx(1.25)),
        ("block-1", "perplexity", pytest.approx(0.5), pytest.approx(1.25)),
    ]


def test_pruned_models_are_compared_only_on_the_same_dtype_device_and_items():
    from ckpt_trace.analysis.statistics import pruned_vs_original

    evals = synthetic_evals()
    # The original again in bfloat16 on a GPU, slower there; the attention-pruned model again in bfloat16 too,
    # and the block-pruned one on fewer items of the task.
    bf16 = evals.filter(pl.col("model").is_in(["step2000", "attention-2"])).with_columns(
        dtype=pl.lit("bfloat16"), device=pl.lit("cuda:0"), value=pl.col("value") * 2)
    fewer = evals.filter((pl.col("model") == "block-1") & (pl.col("task") == "mc")).with_columns(n=pl.lit(10, pl.Int64))
    comparison = pruned_vs_original(pl.concat([evals.filter(~((pl.col("model") == "block-1") & (pl.col("task") == "mc"))),
                                               bf16, fewer]))
    rows = {(m, d, k): (v, o) for m, d, k, v, o in comparison.select("model", "dtype", "metric", "value", "original").rows()}
    assert rows[("attention-2", "float32", "perplexity")] == (12.5, 10.0)
    assert rows[("attention-2", "bfloat16", "perplexity")] == (25.0, 20.0)
    assert ("block-1", "float32", "acc") not in rows  # 10 items against the original's full task
    assert ("block-1", "bfloat16", "perplexity") not in rows and comparison.height == 5 + 5 + 4
    # A later run of the original on fewer items does not hide its full run from the pruned model's full run.
    later = evals.filter((pl.col("model") == "step2000") & (pl.col("task") == "mc")).with_columns(
        n=pl.lit(10, pl.Int64), value=pl.lit(0.3), created=pl.col("created") + pl.duration(days=1))
    rows = pruned_vs_original(pl.concat([evals, later])).filter(pl.col("metric") == "acc").select("model", "original").rows()
    assert sorted(rows) == [("attention-2", 0.5), ("block-1", 0.5)]


def test_pruned_models_are_compared_with_the_weights_they_came_from_on_the_same_text():
    from ckpt_trace.analysis.statistics import pruned_vs_original

    day = pl.duration(days=1)
    evals = synthetic_evals().with_columns(
        weights=pl.when(pl.col("pruning").is_null()).then(pl.lit("old")).otherwise("model"), source_weights=pl.lit("old"),
        data=pl.when(pl.col("task") == "perplexity").then(pl.lit("text-a")))
    original = (pl.col("model") == "step2000")
    # step2000 re-published with other weights and evaluated later; then evaluated on another text: neither is the
    # original the pruned models are compared with.
    republished = evals.filter(original).with_columns(weights=pl.lit("new"), source_weights=pl.lit("new"),
                                                      value=pl.col("value") * 3, created=pl.col("created") + day)
    other_text = evals.filter(original & (pl.col("task") == "perplexity")).with_columns(
        data=pl.lit("text-b"), value=pl.lit(99.0), created=pl.col("created") + 2 * day)
    comparison = pruned_vs_original(pl.concat([evals, republished, other_text]))
    assert dict(comparison.filter(pl.col("model") == "attention-2").select("metric", "original").rows()) == {
        "perplexity": 10.0, "acc": 0.5, "decode_tokens_per_s": 100.0, "prefill_latency_s": 0.2, "kv_cache_bytes": 1000.0}
    # A pruned model measured on the other text is compared with the original on that text.
    pruned_b = evals.filter((pl.col("model") == "attention-2") & (pl.col("task") == "perplexity")).with_columns(
        data=pl.lit("text-b"), value=pl.lit(110.0), created=pl.col("created") + 3 * day)
    comparison = pruned_vs_original(pl.concat([evals, republished, other_text, pruned_b]))
    assert sorted(comparison.filter((pl.col("model") == "attention-2") & (pl.col("metric") == "perplexity")).select(
        "original", "value").rows()) == [(10.0, 12.5), (99.0, 110.0)]


def test_report_has_a_pruning_section(tmp_path):
    store = store_with(tmp_path, synthetic_rows(steps=[0, 1000, 2000]))
    store.write_evals(synthetic_evals())
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## m: pruned models" in md and "m-pruned/tradeoff.png" in md
    assert (tmp_path / "out" / "m-pruned" / "tradeoff.png").stat().st_size > 10_000
    row = ["step2000", "", "attention-2", "attention [1, 3] (similarity)", "float32", "cpu", "mc", "acc", "", "0.45", "",
           "0.5", "", "0.9"]
    assert row in table_rows(md)


def test_the_report_takes_one_scorer_and_the_trunk_and_says_what_it_left_out(tmp_path):
    old = synthetic_rows(steps=[0, 1000]).with_columns(scorer=pl.lit(None, pl.Int32))  # written before scorer versions
    new = synthetic_rows(steps=[1000, 2000]).with_columns(scorer=pl.lit(2, pl.Int32), value=pl.col("value") + 5)
    ingredient = synthetic_rows(steps=[3000]).with_columns(revision=pl.lit("stage2-ingredient1-step3000-tokens1B"),
                                                          scorer=pl.lit(2, pl.Int32))
    frame = model_scores(pl.concat([old, new, ingredient]), "m")
    assert frame["revision"].unique(maintain_order=True).to_list() == ["step1000", "step2000"]
    assert set(frame["scorer"]) == {2} and frame["value"].min() >= 5  # never a mix of scorer 1 and 2
    store = Store(tmp_path / "store")
    for part in (old, new, ingredient):
        for _, rows in part.group_by("revision"):
            write_parquet(rows.select(list(SCORES_SCHEMA)), tmp_path / "store" / "scores" / f"{uuid.uuid4().hex}.parquet")
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "2 checkpoints, calibration set `cal`, dtype float32, scorer 2" in md
    assert "scores of other scorer versions (1) are left out" in md
    # The side line is drawn in a section of its own, from the checkpoint it forks from, not left out of the trunk's.
    trunk, side = md.split("\n## m\n")[1].split("\n## m (ingredient1)\n")
    assert "left out: stage2" not in trunk and "stage2-ingredient1-step3000-tokens1B" in side


def test_the_report_opens_with_findings_for_every_model(tmp_path):
    store = store_with(tmp_path, pl.concat([synthetic_rows(), synthetic_rows(model="n")]))
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    findings = md.split("## Findings")[1].split("\n## ")[0]
    assert md.index("## Findings") < md.index("## m\n")
    for model in ("m", "n"):
        part = findings.split(f"**{model}**")[1].split("**n**")[0]
        assert [line[:4] for line in part.strip().splitlines()] == ["- (a", "- (b", "- (c", "- (d", "- (f"]
    # Layers 1 and 3 are the least important attention layers from step 4 on, of steps 0 .. 2000 by step.
    assert "[1, 3] are the least important from step4 on (0% of training by step)" in findings
    assert "(d) importance picks the modules that matter: it ranks them as ablation_loss does: **inconclusive**" in findings
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.index("<h2>Findings</h2>") < html.index("<h2>m</h2>")


def test_colour_range_sets_layer_0_aside_and_says_what_it_clips():
    matrix = np.array([[50.0, 60.0, 70.0], [0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.0, 0.7, 0.8]])
    rest = matrix[1:].ravel()
    vmin, vmax, extend = plots.colour_range(matrix)
    assert (vmin, vmax) == pytest.approx(tuple(np.percentile(rest, [2, 98]))) and extend == "both"
    vmin, vmax, extend = plots.colour_range(matrix, "log")  # only positive values count
    assert (vmin, vmax) == pytest.approx(tuple(np.percentile(rest[rest > 0], [2, 98]))) and extend == "both"
    two = matrix[:2]  # too few layers to set one aside
    assert plots.colour_range(two)[:2] == pytest.approx(tuple(np.percentile(two.ravel(), [2, 98])))
    assert plots.colour_range(np.full((4, 3), 0.25)) == (-0.25, 0.75, "neither")


def test_log_colour_scale_and_token_axis(tmp_path, capsys):
    from matplotlib.colors import LogNorm

    frame = model_scores(synthetic_rows().with_columns(tokens=pl.col("step") * 2048), "m")
    heat = plots.heatmaps(frame, scale="log")
    panels = [ax for ax in heat.axes if ax.get_title()]
    assert all(isinstance(ax.collections[0].norm, LogNorm) for ax in panels)
    assert panels[0].get_xlabel() == "tokens seen" and panels[0].get_xticklabels()[-1].get_text() == "4.1M"
    lines = plots.layer_lines(frame)
    assert lines.axes[0].get_xlabel() == "tokens seen"
    assert max(lines.axes[0].lines[0].get_xdata()) == 2000 * 2048
    # Without tokens for every checkpoint, the axis is the step.
    assert plots.layer_lines(model_scores(synthetic_rows(), "m")).axes[0].get_xlabel() == "training step"
    store = store_with(tmp_path, synthetic_rows())
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "out"), "--color-scale", "log"]) == 0
    assert "own log colour scale" in (tmp_path / "out" / "report.md").read_text()
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "o2"), "--color-scale", "cubic"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cubic" in err and "linear" in err and "log" in err


def test_models_side_by_side_by_fraction_of_training(tmp_path):
    # A second suite, trained twice as long, whose attention ranking matches the final one only from half-way.
    second = synthetic_rows("n", steps=[0, 2000, 4000]).with_columns(
        step=pl.col("step") * 2, revision=pl.format("step{}", pl.col("step") * 2))
    store = store_with(tmp_path, pl.concat([synthetic_rows(), second]))
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.index("## Across models") < md.index("## m\n") and "across-models/across_models.png" in md
    rows = {(r[0], r[1]): r for r in table_rows(md) if r[0] in ("m", "n") and len(r) == 6}
    assert rows[("m", "step1000")][4] == "0.5" and rows[("n", "step4000")][4] == "0.5"  # the fraction of training
    assert rows[("n", "step8000")][4] == "1" and rows[("n", "step8000")][5] == "1"  # consistency with itself
    one = store_with(tmp_path / "one", synthetic_rows())
    assert main(["report", "--store", str(one.root), "--out", str(tmp_path / "single")]) == 0
    assert "Across models" not in (tmp_path / "single" / "report.md").read_text()


def test_angular_and_span_distances_are_drawn_with_the_run_to_remove(tmp_path):
    rows = synthetic_rows(metrics=("importance", "update_ratio", "angular_distance"))
    spans = []
    for step in STEPS:
        for n in (1, 2, 3):
            for layer in range(4 - n + 1):
                # The least distance of each n: at layer 2 - n + 1 early on, at layer 0 from step 1000.
                best = 0 if step >= 1000 else 3 - n
                value = 0.1 * n + (0.0 if layer == best else 0.05 + 0.01 * layer)
                spans.append(rows.row(0, named=True) | {"revision": f"step{step}", "step": step, "layer": layer,
                                                        "module": f"span{n}", "metric": "span_distance", "value": value})
    store = store_with(tmp_path, pl.concat([rows, pl.DataFrame(spans, schema=SCORES_SCHEMA)]))
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "m/angular_distance_heatmaps.png" in md and "m/span_distance.png" in md
    best = {(r[0], r[3]): r[4:] for r in table_rows(md) if len(r) == 7 and r[0].startswith("step")}
    assert best[("step0", "2")] == ["1", "2", "0.2"] and best[("step2000", "3")] == ["0", "2", "0.3"]


def test_links_to_figures_of_a_hub_model_survive_a_markdown_viewer(tmp_path):
    store = store_with(tmp_path, synthetic_rows("EleutherAI/pythia-160m"))
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "EleutherAI%2Fpythia-160m" / "consistency.png").is_file()
    # The viewer decodes the link once, to the folder's name on disk.
    assert "(EleutherAI%252Fpythia-160m/consistency.png)" in md and "(EleutherAI%252Fpythia-160m/consistency.svg)" in md


OLMO2 = {  # an OLMo-2-style run: a stage-1 trunk, and two stage-2 anneals (ingredients) from its last checkpoint
    "stage1-step100-tokens1B": 100, "stage1-step200-tokens2B": 200, "stage1-step300-tokens3B": 300,
    "stage2-ingredient1-step10-tokens1B": 1000, "stage2-ingredient1-step20-tokens2B": 2000,
    "stage2-ingredient2-step10-tokens1B": 4,
}


def test_report_draws_a_side_line_with_the_trunk_into_it(tmp_path, capsys):
    rows = pl.concat(synthetic_rows("olmo", steps=[step]).with_columns(revision=pl.lit(name))
                     for name, step in OLMO2.items())
    store = store_with(tmp_path, pl.concat([rows, synthetic_rows("pythia")]))

    def drawn(*args: str) -> list[str]:
        out = tmp_path / "-".join(args or ("trunk",))
        assert main(["report", "--store", str(store.root), "--out", str(out), "--model", "olmo", *args]) == 0
        section = (out / "report.md").read_text().split("## olmo")[1]
        return [row[0] for row in table_rows(section) if row[0] in OLMO2]

    trunk = ["stage1-step100-tokens1B", "stage1-step200-tokens2B", "stage1-step300-tokens3B"]
    assert drawn()[:3] == trunk and set(drawn()) == set(trunk)
    # By default every line is drawn: the trunk, then each side line from the checkpoint it forks from.
    md = (tmp_path / "trunk" / "report.md").read_text()
    sections = {title: body for title, body in (s.split("\n", 1) for s in md.split("\n## ")[1:])}
    assert [title for title in sections if title.startswith("olmo")] == ["olmo", "olmo (ingredient1)",
                                                                          "olmo (ingredient2)"]
    for side, own in (("ingredient1", ["stage2-ingredient1-step10-tokens1B", "stage2-ingredient1-step20-tokens2B"]),
                      ("ingredient2", ["stage2-ingredient2-step10-tokens1B"])):
        rows = [row[0] for row in table_rows(sections[f"olmo ({side})"]) if row[0] in OLMO2]
        assert rows[:1 + len(own)] == ["stage1-step300-tokens3B", *own] and set(rows) == {rows[0], *own}
    findings = sections["Findings"]
    assert all(f"**{line}**" in findings for line in ("olmo", "olmo (ingredient1)", "olmo (ingredient2)"))
    assert "left out" not in sections["olmo"]  # the side lines are drawn, each in its own section
    line = drawn("--branch", "ingredient1")
    assert line[:5] == [*trunk, "stage2-ingredient1-step10-tokens1B", "stage2-ingredient1-step20-tokens2B"]
    assert set(line) == set(line[:5])
    capsys.readouterr()
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "x"), "--branch", "ingredient3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ckpt-trace: error: no model in '{store.root}' has a side line 'ingredient3'; their side lines: olmo: "
        "ingredient1, ingredient2; pythia: none"]
