"""Training dynamics in the report: one reference per line, where layers settle, since when they are redundant, and
finding (e), on stores built by hand with answers computed by hand."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ckpt_trace.analysis import plots
from ckpt_trace.analysis.dynamics import (
    RULE,
    against_reference,
    dynamics_section,
    redundancy_after_settling,
    settling_table,
)
from ckpt_trace.analysis.findings import FAILS, HOLDS, OPEN
from ckpt_trace.analysis.statistics import model_scores
from ckpt_trace.cli import main
from ckpt_trace.store import SCORES_SCHEMA, Store

STEPS = [0, 100, 200, 400, 800]
LAYERS = 6
NAN = math.nan

# Attention importance: the three least important layers are {0, 1, 2} at step 0, {1, 2, 3} at 100, {2, 3, 4} at 200
# and {3, 4, 5} from 400 on. So in the final drop set {3, 4, 5}, layer 3 is redundant since step 100, 4 since 200 and
# 5 since 400.
ATTENTION = {0: [0.1, 0.2, 0.3, 0.9, 0.8, 0.7], 100: [0.9, 0.15, 0.25, 0.1, 0.5, 0.6],
             200: [0.9, 0.8, 0.25, 0.1, 0.2, 0.3], 400: [0.9, 0.8, 0.7, 0.1, 0.2, 0.3],
             800: [0.9, 0.8, 0.7, 0.1, 0.2, 0.3]}
# MLP importance: {0, 1, 2} the least important at every step, so redundant since step 0.
MLP = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
# cka_final against step800, per layer over STEPS. Attention: layer 3 settles at 100 (redundant at 100: same), 4 at 100
# (redundant at 200: after), 5 dips below 0.9 at 200 and settles only at 800 (redundant at 400: before).
CKA = {"attention": [[NAN, 0.95, 0.96, 0.97, 1.0], [0.5, 0.6, 0.7, 0.8, 1.0], [0.95, 0.95, 0.95, 0.95, 1.0],
                     [0.5, 0.95, 0.92, 0.97, 1.0], [0.3, 0.91, 0.93, 0.99, 1.0], [0.2, 0.95, 0.8, 0.85, 1.0]],
       # MLP: layer 0 settles at 200, 1 at 400 (both after being redundant from step 0), 2's output is constant (NaN).
       "mlp": [[0.5, 0.6, 0.9, 0.95, 1.0], [0.5, 0.6, 0.7, 0.95, 1.0], [NAN] * 5,
               [0.99] * 4 + [1.0], [0.99] * 4 + [1.0], [0.99] * 4 + [1.0]],
       "block": [[0.99] * 4 + [1.0]] * LAYERS}
EXPECTED_E = (
    "Attention: of the final drop set's 3 layers (3, 4, 5), 1 became redundant after settling, 1 at the checkpoint of "
    "settling, 1 before settling; Spearman ρ between the checkpoint where each settled and the one from which it is "
    "redundant: +0.87; so redundancy follows settling; "
    "MLP: of the final drop set's 3 layers (0, 1, 2), 0 became redundant after settling, 0 at the checkpoint of "
    "settling, 2 before settling, 1 never settled (layer 2); Spearman ρ between the checkpoint where each settled and "
    "the one from which it is redundant: n/a (2 of its layers settled, fewer than 3); so redundancy precedes settling")
# Attention ranks: settled at orders (1, 1, 4) -> (1.5, 1.5, 3), redundant since (1, 2, 3); Pearson of the ranks
# = 1.5 / sqrt(1.5 * 2) = 0.866.


def row(step: int, layer: int, module: str, metric: str, value: float, reference: str | None = None) -> dict:
    return {"model": "m", "revision": f"step{step}", "commit": None, "weights": f"w{step}", "step": step,
            "tokens": 1000 * step, "source": None, "branch": None, "layer": layer, "module": module, "metric": metric,
            "value": value, "n_tokens": 10, "calibration": "cal", "calibration_source": None,
            "reference": reference, "reference_weights": reference and "w" + reference.removeprefix("step"),
            "dtype": "float32", "scorer": 1, "version": "test",
            "created": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=step)}


def scores(cka=CKA, steps=STEPS, reference: str | None = "step800", change: float = 0.0) -> pl.DataFrame:
    """Importance and update ratio of every module, and, against `reference` (None: no dynamics), cka_final and
    weight_change_final (layer + 1) x (final step - step) / 1000 + `change`."""
    rows = []
    for i, step in enumerate(steps):
        for layer in range(LAYERS):
            for module in ("attention", "mlp", "block"):
                importance = ATTENTION[step][layer] if module == "attention" else MLP[layer]
                rows += [row(step, layer, module, "importance", importance),
                         row(step, layer, module, "update_ratio", 2 * importance)]
                if reference is not None:
                    rows += [row(step, layer, module, "cka_final", cka[module][layer][STEPS.index(step)], reference),
                             row(step, layer, module, "weight_change_final",
                                 (layer + 1) * (steps[-1] - step) / 1000 + change, reference)]
    return pl.DataFrame(rows, schema=SCORES_SCHEMA)


def store_of(tmp_path, frame: pl.DataFrame) -> Store:
    store = Store(tmp_path / "store")
    for _, part in frame.group_by("revision"):
        store.write_scores(part)
    return store


def report(tmp_path, frame: pl.DataFrame) -> str:
    store = store_of(tmp_path, frame)
    assert main(["report", "--store", str(store.root), "--out", str(tmp_path / "out")]) == 0
    return (tmp_path / "out" / "report.md").read_text()


def test_settled_at_and_redundant_since_exact():
    frame = model_scores(scores(), "m")
    rows, reference = against_reference(frame)
    assert (reference.revision, reference.weights, reference.checkpoints, reference.why) == ("step800", "w800", 5, "")
    table = settling_table(frame, rows)
    attention = table.filter(pl.col("module") == "attention").sort("layer")
    assert attention["settled_revision"].to_list() == ["step100", "step800", "step0", "step100", "step100", "step800"]
    assert attention["settled_tokens"].to_list() == [100_000, 800_000, 0, 100_000, 100_000, 800_000]
    assert attention["redundant_revision"].to_list() == [None, None, None, "step100", "step200", "step400"]
    assert attention["relation"].to_list() == [None, None, None, "same", "after", "before"]
    mlp = table.filter(pl.col("module") == "mlp").sort("layer")
    assert mlp["settled_revision"].to_list() == ["step200", "step400", None, "step0", "step0", "step0"]
    assert mlp["redundant_revision"].to_list() == ["step0", "step0", "step0", None, None, None]
    assert mlp["relation"].to_list() == ["before", "before", "never settled", None, None, None]


def test_finding_e_exact():
    frame = model_scores(scores(), "m")
    finding = redundancy_after_settling(frame, *against_reference(frame))
    assert finding.verdict == HOLDS  # two of three at or after: exactly two thirds
    assert finding.evidence == EXPECTED_E
    assert finding.basis == ("cka_final against `step800` (weights w800); the drop set of step800, over 5 checkpoints "
                             "with both importance and cka_final, 6 layers; float32 scores on calibration set `cal`; "
                             + RULE)
    assert RULE.startswith("redundancy follows settling when at least two thirds of the drop set's layers")


def with_attention(*per_layer: list[float]) -> dict:
    """CKA with attention layers 3, 4 and 5 replaced."""
    return CKA | {"attention": CKA["attention"][:3] + list(per_layer)}


@pytest.mark.parametrize("cka, verdict, said, rho", [
    # All settle at the final checkpoint, after becoming redundant: precedes.
    (with_attention([0.5] * 4 + [1.0], [0.5] * 4 + [1.0], [0.5] * 4 + [1.0]), FAILS,
     "0 became redundant after settling, 0 at the checkpoint of settling, 3 before settling;",
     "n/a (every layer settled at one checkpoint: no variance); so redundancy precedes settling"),
    # One at (3), one before (4), one never (5): mixed.
    (with_attention([0.5, 0.95, 0.92, 0.97, 1.0], [0.5] * 4 + [1.0], [NAN] * 5), OPEN,
     "0 became redundant after settling, 1 at the checkpoint of settling, 1 before settling, 1 never settled (layer 5);",
     "n/a (2 of its layers settled, fewer than 3); so the pattern is mixed"),
    # All settle at step 0, before they become redundant (100, 200, 400): follows, the ranks tie.
    (with_attention(*[[0.95] * 4 + [1.0]] * 3), HOLDS,
     "3 became redundant after settling, 0 at the checkpoint of settling, 0 before settling;",
     "n/a (every layer settled at one checkpoint: no variance); so redundancy follows settling"),
    # Settled at 0, 100 and 200, redundant since 100, 200 and 400: after, all three; ranks agree.
    (with_attention([0.95] * 4 + [1.0], [0.5, 0.95, 0.95, 0.95, 1.0], [0.5, 0.5, 0.95, 0.95, 1.0]), HOLDS,
     "3 became redundant after settling, 0 at the checkpoint of settling, 0 before settling;",
     "redundant: +1.00; so redundancy follows settling"),
])
def test_finding_e_verdicts(cka, verdict, said, rho):
    frame = model_scores(scores(cka), "m")
    finding = redundancy_after_settling(frame, *against_reference(frame))
    attention = finding.evidence.split("; MLP")[0]
    assert finding.verdict == verdict
    assert said in attention and attention.endswith(rho)


def test_two_references_in_one_store_are_never_mixed(tmp_path):
    # Against step400 for step0 .. step200 only (3 revisions; step800 covers 5), with a cka_final of 0 throughout and
    # weight changes 7 larger.
    other = scores(reference="step400", steps=[0, 100, 200], change=7.0).filter(pl.col("reference").is_not_null())
    frame = pl.concat([scores(), other.with_columns(
        value=pl.when(pl.col("metric") == "cka_final").then(0.0).otherwise(pl.col("value")))])
    drawn = model_scores(frame, "m")
    rows, reference = against_reference(drawn)
    assert reference.revision == "step800" and reference.why == "it covers the most revisions (5)"
    assert reference.others == ("`step400` (weights w400)",)
    assert set(rows["reference_weights"]) == {"w800"}
    section, finding = dynamics_section(drawn)
    assert finding.evidence == EXPECTED_E  # the other reference's cka of 0 would settle no layer before step400
    heat = section.figures["weight_change_final_heatmaps"][1]
    shown = next(ax.collections[0].get_array() for ax in heat.axes if ax.get_title() == "Attention")
    expected = [[(layer + 1) * (800 - step) / 1000 for step in STEPS] for layer in range(LAYERS)]
    assert np.asarray(shown).reshape(LAYERS, len(STEPS)) == pytest.approx(np.array(expected))
    md = report(tmp_path, frame)
    assert "Measured against `step800` (weights w800), the reference of 5 of the 5 checkpoints drawn.\n" in md
    assert ("training dynamics against other references (`step400` (weights w400)) are left out; this report uses "
            "`step800` (weights w800): it covers the most revisions (5)") in md


def test_a_tie_between_references_goes_to_the_one_scanned_last():
    # Against step400 for step0 and step100; against step800 for step200 and step400, whose files are newer.
    early = scores(steps=[0, 100], reference="step400")
    late = scores(steps=[200, 400], reference="step800")
    rows, reference = against_reference(model_scores(pl.concat([early, late]), "m"))
    assert reference.revision == "step800" and set(rows["revision"]) == {"step200", "step400"}
    assert reference.why == "it covers as many revisions (2) as 1 other and was scanned last"


def test_references_of_one_file_tie_to_the_one_scanned_last(tmp_path):
    # Every revision scanned against step800, then again against step400 a day later: one file per revision holds
    # both, and each revision's rows are drawn whole.
    later = scores(reference="step400").filter(pl.col("reference").is_not_null()).with_columns(
        pl.col("created") + timedelta(days=1), value=pl.lit(0.5))
    scores_ = Store(tmp_path / "store")
    for _, part in pl.concat([scores(), later]).group_by("revision"):
        scores_.write_scores(part)
    drawn = model_scores(scores_.scores(), "m")
    assert drawn.filter(pl.col("metric") == "cka_final")["reference"].value_counts().sort("reference").rows() == [
        ("step400", 5 * 3 * LAYERS), ("step800", 5 * 3 * LAYERS)]
    rows, reference = against_reference(drawn)
    assert reference.revision == "step400" and set(rows["value"]) == {0.5}
    assert reference.why == "it covers as many revisions (5) as 1 other and was scanned last"


def test_the_report_draws_the_dynamics(tmp_path):
    md = report(tmp_path, scores())
    folder = tmp_path / "out" / "m"
    for key in ("weight_change_final_heatmaps", "cka_final_heatmaps", "settling"):
        assert (folder / f"{key}.png").stat().st_size > 10_000 and (folder / f"{key}.svg").is_file()
    dynamics = md.split("### Training dynamics")[1]
    assert "(m/settling.svg)" in dynamics and "(m/cka_final_heatmaps.svg)" in dynamics
    assert "(e) redundancy follows settling: layers join the final drop set once their output has settled: **holds**. " \
           + EXPECTED_E[:40] in md
    assert ["attention", "5", "step800", "step400", "before"] in [
        [cell.strip() for cell in line.strip("| ").split(" | ")] for line in md.splitlines() if line.startswith("| ")]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<h3>Training dynamics</h3>" in html and html.count("data:image/png;base64,") == 5 + 3
    assert "nan" not in md.lower()


def test_the_report_leaves_the_dynamics_out_where_none_are_stored(tmp_path):
    md = report(tmp_path, scores(reference=None))
    notes = [line for line in md.splitlines() if line.startswith("> Not drawn")]
    assert notes == ["> Not drawn: the store has no validation loss for this model: its loss curve is not drawn."]
    assert "Training dynamics" not in md and "(e)" not in md and "nan" not in md.lower()
    assert not list((tmp_path / "out" / "m").glob("*cka*")) and not (tmp_path / "out" / "m" / "settling.png").exists()


def test_without_cka_final_finding_e_says_which_scan_gives_it(tmp_path):
    md = report(tmp_path, scores().filter(pl.col("metric") != "cka_final"))
    assert "m/weight_change_final_heatmaps.png" in md and "cka_final_heatmaps" not in md and "settling.png" not in md
    assert ("> Not drawn: no cka_final against `step800` (weights w800) is stored with importance: the settling figure "
            "is not drawn; `ckpt-trace scan --metrics cka_final` (or the micro suite's default scan) gives it.") in md
    assert ("(e) redundancy follows settling: layers join the final drop set once their output has settled: "
            "**inconclusive**. No cka_final is stored for this model: `ckpt-trace scan --metrics cka_final` (or the "
            "micro suite's default scan) gives it (float32 scores on calibration set `cal`).") in md
    assert "nan" not in md.lower()


def test_one_checkpoint_draws_heatmaps_and_says_why_there_is_no_settling_figure(tmp_path):
    md = report(tmp_path, scores(steps=[800]))
    assert "m/cka_final_heatmaps.png" in md and "m/settling.png" not in md
    assert ("Not drawn: the settling figure needs two or more checkpoints with both importance and cka_final against "
            "`step800` (weights w800); 1 has them.") in md
    assert "1 checkpoint with both importance and cka_final against `step800` (weights w800): this needs two or more" in md
    assert "nan" not in md.lower()


def test_the_settling_figure_degrades():
    frame = model_scores(scores(), "m")
    table = settling_table(frame, against_reference(frame)[0])
    figure = plots.settling(table, "tokens")
    assert [ax.get_title().split(" ")[0] for ax in figure.axes] == ["Attention", "MLP", "Block"]
    attention, mlp = figure.axes[:2]
    points = attention.lines[1].get_xydata()
    assert points.tolist() == [[100_000, 100_000], [100_000, 200_000], [800_000, 400_000]]
    assert [t.get_text() for t in mlp.texts if t.get_text().startswith("never")] == ["never settled: 2"]
    never = table.with_columns(settled_tokens=pl.lit(None, pl.Int64), relation=pl.when(pl.col("relation").is_not_null())
                               .then(pl.lit("never settled")))
    nowhere = plots.settling(never, "tokens").axes[0]
    assert nowhere.lines[1].get_xydata().size == 0 and nowhere.texts[0].get_text() == "never settled: 3, 4, 5"
    unplaced = plots.settling(table.with_columns(settled_step=pl.lit(None, pl.Int64)), "step").axes[0]  # no steps known
    assert unplaced.lines[1].get_xydata().size == 0 and not unplaced.texts
    first = model_scores(scores(steps=[0]), "m")
    one = settling_table(first, against_reference(first)[0])
    assert len(plots.settling(one, "step").axes) == 3  # every point at step 0, on the diagonal
    assert len(plots.settling(table.head(0), "step").axes) == 1  # no drop set: one empty panel
