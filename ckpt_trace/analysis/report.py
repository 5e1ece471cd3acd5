"""The report: figures and the numbers behind them, per model, as Markdown and self-contained HTML."""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from matplotlib.figure import Figure

from ..errors import ConfigError, StoreError
from ..fetch.revisions import parse_revision
from ..fetch.sources import weights_on_disk
from ..paths import unmakeable
from ..pruning.curves import latest as latest_curves
from ..pruning.curves import summary as curve_summary
from ..store import CURVES_SCHEMA, EVALS_SCHEMA, VERSION, Store, path_part
from . import COLOR_SCALES, plots
from .dynamics import DynamicsSection, dynamics_section
from .findings import Finding, agreement, findings, long_range_cost, weights_by_revision
from .positions import excess_table, loss_table, most_measured, of_setting, position_excess
from .render import figure_entries, table_entries, templates
from .statistics import (
    DRAWN,
    best_spans,
    drop_set_overlap,
    drop_set_settled,
    model_scores,
    model_sources,
    most_covering,
    pruned_vs_original,
    rank_consistency,
    side_lines,
    source_rows,
    tradeoff,
)


@dataclass
class ModelReport:
    """Everything the report says about one model."""

    model: str
    calibration: str
    intro: str = ""
    """What was scored: checkpoints, calibration set, dtype, scorer."""
    findings: list[Finding] = field(default_factory=list)
    """The papers' claims checked against this model (see `ckpt_trace.analysis.findings`)."""
    figures: dict[str, tuple[str, Figure]] = field(default_factory=dict)
    """name -> (caption, figure)"""
    tables: dict[str, tuple[str, pl.DataFrame]] = field(default_factory=dict)
    """name -> (caption, frame)"""
    notes: list[str] = field(default_factory=list)
    """What could not be drawn, and why."""
    dynamics: DynamicsSection | None = None
    """Weight change and CKA against the line's reference checkpoint, and when layers settle (see `dynamics`)."""
    over_training: list[pl.DataFrame] = field(default_factory=list)
    """Attention rank consistency and importance's agreement with ablation_loss by fraction of training, for the
    comparison across models (see `by_fraction`)."""


def _per_revision(frame: pl.DataFrame, module: str, metric: str) -> pl.DataFrame:
    """Revisions (rows, in training order) by layers (columns)."""
    part = frame.filter((pl.col("module") == module) & (pl.col("metric") == metric))
    wide = part.pivot(on="layer", index=["order", "revision", "step"], values="value").sort("order").drop("order")
    return wide.rename({c: f"layer {c}" for c in wide.columns if c not in ("revision", "step")})


def _named(frame: pl.DataFrame, column: str, value) -> str:
    """A calibration set by its id and what it is; any other value as it is."""
    if column != "calibration":
        return str(value)
    named = frame.filter(pl.col("calibration") == value)["calibration_source"].drop_nulls()
    return f"`{value}` ({named[0]})" if len(named) else f"`{value}`"


def _drawn(frame: pl.DataFrame, source: str | None) -> str:
    """Which scan of each checkpoint the report draws, in words."""
    where = "no source is recorded" if source is None else f"`{source}` is not on this machine"
    per = frame.sort("order").group_by("drawn").agg(pl.col("revision").unique(maintain_order=True),
                                                    pl.col("copied_from").unique(maintain_order=True).drop_nulls())
    said = []
    for drawn, revisions, copied in per.sort("drawn").rows():
        names = ", ".join(revisions) if len(revisions) <= 6 else f"{len(revisions)} checkpoints"
        said.append(f"{DRAWN[drawn]}" + (f" (copies of {', '.join(copied)})" if copied else "") + f": {names}"
                    + (f" ({where})" if drawn == "latest" else ""))
    return "scores drawn from " + "; ".join(said)


def build_model_report(scores: pl.DataFrame, revisions: pl.DataFrame, model: str,
                       evals: pl.DataFrame | None = None, curves: pl.DataFrame | None = None,
                       color_scale: str = "linear", branch: str | None = None, from_fork: bool = False,
                       source: str | None = None, on_disk: dict[str, str] | None = None) -> ModelReport:
    """Analyse one model's scores (and its pruned models' evaluations and pruning curves) and draw its figures, on
    its trunk or on the side line `branch` with the trunk into it (`from_fork`: from the checkpoint it forks from).

    `source` is the folder or Hub repo the model is read from (two folders of one name are two models); `on_disk`
    ({revision: fingerprint}, see `ckpt_trace.fetch.sources.weights_on_disk`) the weights there now, whose scans are
    drawn where the store has them, as `prune` and `curves` use them."""
    scores = source_rows(scores, revisions, model, source)
    if source is not None:  # what other folders of the name recorded is theirs
        revisions = revisions.filter(pl.col("source").is_null() | (pl.col("source") == source))
    frame = model_scores(scores, model, branch=branch, from_fork=from_fork, on_disk=on_disk)
    calibration, dtype, scorer = frame["calibration"][0], frame["dtype"][0], frame["scorer"][0]
    n_revisions = frame["revision"].n_unique()
    line = "" if branch is None else (f" of the side line `{branch}` from the checkpoint it forks from" if from_fork
                                      else f" of the side line `{branch}`, with the trunk into it")
    named = frame["calibration_source"].drop_nulls()
    what = f" ({named[0]})" if len(named) else ""
    report = ModelReport(model, calibration, f"{n_revisions} checkpoints{line}, calibration set `{calibration}`{what}, "
                         f"dtype {dtype}, scorer {scorer}; {_drawn(frame, source)}.")
    if curves is not None and source is not None:
        curves = curves.filter(pl.col("source").is_null() | (pl.col("source") == source))
    measured = latest_curves(curves, model) if curves is not None else pl.DataFrame(schema=CURVES_SCHEMA)
    if measured.height:  # the curves drawn are of one checkpoint's weights (see curves.latest)
        revision, weights = measured["revision"][0], measured["weights"][0]
        scans = frame.filter((pl.col("revision") == revision) & pl.col("weights").is_not_null())
        scanned_weights = set(scans["weights"])
        if weights is not None and scanned_weights and weights not in scanned_weights:
            # The checkpoint was re-published (or retrained) between its scan and its curves.
            again = "curves" if measured["created"].max() < scans["created"].max() else "scan"
            report.notes.append(f"the pruning curves of {revision} are of other weights ({weights[:12]}) than its "
                                f"scores here ({', '.join(sorted(w[:12] for w in scanned_weights))}); they are "
                                f"left out: run `ckpt-trace {again}` again")
            measured = measured.head(0)
    curve = curve_summary(measured) if measured.height else None
    first = measured.row(0, named=True) if curve is not None else None
    healing = measured.filter(pl.col("strategy") == "healed")["healed"].drop_nulls()
    healing = healing[0] if healing.len() else None  # how the similarity drop sets were healed, where they were
    named = curve.with_columns(dtype=pl.lit(first["dtype"]), calibration=pl.lit(first["calibration"]),
                               data=pl.lit(first["data"]), healing=pl.lit(healing, pl.String)
                               ) if curve is not None else None  # what (c) names
    report.findings = findings(frame, evals if evals is not None else pl.DataFrame(schema=EVALS_SCHEMA), model, named,
                               (first["revision"], first["weights"]) if curve is not None else None)
    if curve is not None:
        where = (f"{first['revision']} ({first['dtype']}), perplexity on {first['n_tokens']:,} held-out tokens (set "
                 f"`{first['data']}`)")
        healed = ("; healed: the similarity drop sets after healing" + (f" ({healing})" if healing else "")
                  if "healed" in curve.columns else "")
        for target in curve["target"].unique(maintain_order=True):
            report.figures[f"pruning_curve_{target}"] = (
                f"{plots.MODULE_TITLES[target]} drop: perplexity with k dropped by similarity, oracle (lowest "
                f"ablation_loss), last and random{healed}; {where}", plots.pruning_curve(curve, target))
        report.tables["pruning_curves"] = (f"pruning curves: perplexity with k dropped; {where}", curve)
    truth = agreement(frame)
    compared = n_revisions >= 2 and not from_fork  # across models: whole lines, not a side line from its fork
    if compared:
        report.over_training.append(by_fraction(model, "agreement", truth.filter(pl.col("score") == "importance")))
    if truth.height:
        report.figures["agreement"] = ("Spearman correlation of the one-pass scores with ablation_loss over "
                                       "training: does the cheap score pick what matters?", plots.agreement(truth))
        report.tables["agreement"] = ("Spearman ρ with ablation_loss, over every layer and module", truth.pivot(
            on="score", index=["order", "revision", "step"], values="spearman").sort("order").drop("order"))
    mine = scores.filter(pl.col("model") == model).with_columns(pl.col("scorer").fill_null(1))
    for column, chosen, what in (("calibration", calibration, "calibration sets"), ("dtype", dtype, "dtypes"),
                                 ("scorer", scorer, "scorer versions")):
        others = sorted(str(v) for v in mine.filter(pl.col(column) != chosen)[column].unique())
        if others:
            chosen_from = mine.filter(pl.col("calibration") == calibration) if column != "calibration" else mine
            if column == "scorer":
                chosen_from = chosen_from.filter(pl.col("dtype") == dtype)
            why = most_covering(chosen_from, column)[1]
            report.notes.append(f"scores of other {what} ({', '.join(_named(mine, column, v) for v in others)}) are "
                                f"left out; this report uses {_named(mine, column, chosen)}: {why}")
    same = mine.filter((pl.col("calibration") == calibration) & (pl.col("dtype") == dtype) & (pl.col("scorer") == scorer))
    older = same.filter(pl.col("revision").is_in(frame["revision"].unique().to_list())).join(
        frame.select("revision", "weights", "created").unique(), on=["revision", "weights", "created"],
        how="anti", nulls_equal=True)["revision"].unique()
    if len(older):
        report.notes.append(f"other scans (other weights) of {len(older)} checkpoint{'s' if len(older) > 1 else ''} "
                            "are left out; each checkpoint is drawn from one scan, as said above")
    off_line = sorted(set(same["revision"]) - set(frame["revision"]))
    if branch is None or from_fork:  # every line is drawn in a section of its own: only names no line holds
        off_line = [name for name in off_line if not parse_revision(name).parsed]
    if off_line:
        report.notes.append(f"revisions off this line of training (other side lines, or names placed by commit "
                            f"beside a revision) are left out: {', '.join(off_line)}")
    metrics = set(frame["metric"].unique())
    for metric in ("importance", "update_ratio"):
        if metric not in metrics:
            report.notes.append(f"no {metric} scores for this model: its heatmaps are not drawn")
            continue
        report.figures[f"{metric}_heatmaps"] = (
            f"{plots.METRIC_TITLES[metric]}: layer by checkpoint, each module on its own {color_scale} colour scale "
            f"spanning percentiles {plots.LOW} to {plots.HIGH} of layers 1 and up (cells beyond it, often "
            "layer 0's, take the end colours)", plots.heatmaps(frame, metric, scale=color_scale)
        )
        for module in plots.MODULE_ORDER:
            table = _per_revision(frame, module, metric)
            if table.height:
                report.tables[f"{metric}_{module}"] = (f"{metric} of each {plots.MODULE_TITLES[module]} layer", table)
    if "angular_distance" in metrics:
        report.figures["angular_distance_heatmaps"] = (
            f"{plots.METRIC_TITLES['angular_distance']} (Gromov et al.): layer by checkpoint, each module on its own "
            f"{color_scale} colour scale as above", plots.heatmaps(frame, "angular_distance", scale=color_scale))
    for metric in ("span_distance", "span_distance_last"):
        if metric in metrics:
            report.figures[metric] = (f"{metric}: angular distance between the input of layer l and of layer l + n, at "
                                      "the final checkpoint", plots.spans(frame, metric))
            report.tables[f"{metric}_best"] = (f"the run of n blocks with the least {metric} (Gromov et al. remove "
                                               "it), per checkpoint", best_spans(frame, metric).drop("order"))
    if "importance" in metrics:
        report.figures["importance_lines"] = ("importance of each layer over training", plots.layer_lines(frame))
        if n_revisions < 2:
            report.notes.append(
                "only one checkpoint is stored: consistency and drop-set emergence need at least two, so they are not drawn"
            )
        else:
            consistency = rank_consistency(frame)
            if compared:
                report.over_training.insert(0, by_fraction(model, "consistency",
                                                           consistency.filter(pl.col("module") == "attention")))
            report.figures["consistency"] = (
                "Spearman correlation of each checkpoint's layer ranking with the final checkpoint's",
                plots.consistency(consistency),
            )
            report.tables["consistency"] = (
                "Spearman ρ with the final ranking",
                consistency.pivot(on="module", index=["order", "revision", "step"], values="spearman").sort("order").drop("order"),
            )
            overlap = drop_set_overlap(frame)
            report.figures["drop_set"] = (
                "Jaccard overlap of the k least important layers with the final checkpoint's", plots.drop_set(overlap)
            )
            report.tables["drop_set_settled"] = (
                "earliest checkpoint from which the k least important layers equal the final checkpoint's for good",
                drop_set_settled(overlap).with_columns(pl.col("final_layers").list.eval(pl.element().cast(pl.String)).list.join(", ")),
            )
            report.tables["drop_set"] = (
                "Jaccard overlap with the final drop set",
                overlap.with_columns(pl.format("{} {}", "module", "k").alias("set"))
                .pivot(on="set", index=["order", "revision", "step"], values="jaccard").sort("order").drop("order"),
            )
    report.dynamics, settled = dynamics_section(frame, color_scale)
    if settled is not None:
        report.findings.append(settled)
    report.findings.append(long_range_cost(evals if evals is not None else pl.DataFrame(schema=EVALS_SCHEMA), model,
                                           weights_by_revision(frame)))
    if report.dynamics is not None:
        report.notes += report.dynamics.notes
    scanned = frame.select("revision", "weights").unique()  # the loss of the weights scored, not of others by that name
    losses = revisions.filter((pl.col("model") == model) & pl.col("val_loss").is_not_null()).join(
        scanned, on=["revision", "weights"], nulls_equal=True)
    if losses.height:
        report.figures["validation_loss"] = ("validation loss over training", plots.validation_loss(losses))
        report.tables["validation_loss"] = ("validation loss", losses.sort("step").select("revision", "step", "tokens", "val_loss"))
    else:
        report.notes.append("the store has no validation loss for this model: its loss curve is not drawn")
    # A revision drawn with scores of its own is no duplicate of the weights shown (re-published since, say).
    duplicates = revisions.filter((pl.col("model") == model) & pl.col("duplicate_of").is_not_null()).unique(
        ["revision", "duplicate_of"], maintain_order=True).join(scanned, on="revision", how="anti")
    if duplicates.height:
        report.tables["duplicates"] = (
            "revisions with byte-identical weights to an earlier one (scored once, under the earlier name)",
            duplicates.select("revision", "duplicate_of"),
        )
    return report


def build_pruning_report(evals: pl.DataFrame, model: str) -> ModelReport | None:
    """Pruned (and healed) models of one source model against the original: the trade-off figure, the excess loss by
    position, and the relative table."""
    mine = evals.filter(pl.col("source_model") == model)
    comparison = pruned_vs_original(mine)
    if comparison.height == 0:
        return None
    report = ModelReport(f"{model}: pruned models", "")
    points = tradeoff(comparison)
    healed = " (healed models as hollow diamonds)" if points["healed"].is_not_null().any() else ""
    if points.height:
        report.figures["tradeoff"] = (f"quality kept against decode speedup{healed}", plots.quality_speed(points))
    else:
        report.notes.append("no pruned model has both a quality metric and decode speed beside its original's")
    excess = position_excess(mine)
    setting, left_out = most_measured(excess, mine)
    if setting is not None:
        excess = of_setting(excess, setting)
        on = f"on text `{setting['data']}`, {setting['dtype']}, {setting['device']}"
        report.figures["position_excess"] = (
            f"excess next-token loss over the original by position (tokens of context), one line per pruned model, "
            f"healed models dashed; {on}", plots.position_excess(excess))
        report.tables["position_excess"] = (f"excess loss (nats) by position bucket, pruned minus original; {on}",
                                            excess_table(excess))
        report.tables["position_loss"] = (f"next-token loss (nats) by position bucket; {on}", loss_table(excess))
    if left_out:
        report.notes.append(left_out)
    relative = comparison.filter(pl.col("task") != "position_loss").drop("source_model").with_columns(
        pl.col("source_weights").str.slice(0, 12))
    report.tables["relative"] = (
        "each pruned model relative to the original (relative > 1 is better: quality kept, speedup, memory saved)",
        relative if relative["healed"].is_not_null().any() else relative.drop("healed"),
    )
    return report


def by_fraction(model: str, measure: str, part: pl.DataFrame) -> pl.DataFrame:
    """A per-checkpoint Spearman ρ placed by the fraction of training (tokens seen over the final checkpoint's where
    every checkpoint knows them, else steps)."""
    if part.height == 0:
        return pl.DataFrame(schema={"model": pl.String, "measure": pl.String, "revision": pl.String, "step": pl.Int64,
                                    "tokens": pl.Int64, "fraction": pl.Float64, "value": pl.Float64})
    unit = plots.training_position(part)
    final = part.sort("order")[unit][-1]
    return part.select(
        pl.lit(model).alias("model"), pl.lit(measure).alias("measure"), "revision", "step", "tokens",
        (pl.col(unit).cast(pl.Float64) / (final or 1)).alias("fraction"), pl.col("spearman").alias("value"))


def across_models(reports: list[ModelReport]) -> ModelReport | None:
    """Models side by side by fraction of training: attention rank consistency with the final checkpoint, and the
    agreement of importance with ablation_loss, as each model's report measured them. None with fewer than two
    models that have them."""
    pieces = [part for report in reports for part in report.over_training if part.height]
    if not pieces or len({p["model"][0] for p in pieces}) < 2:
        return None
    frame = pl.concat(pieces)
    report = ModelReport("Across models", "")
    report.intro = ("Every model with at least two checkpoints, placed by the fraction of its training (tokens seen "
                    "over the final checkpoint's where known, else steps).")
    report.figures["across_models"] = ("attention ranking consistency and importance against ablation_loss, by "
                                       "fraction of training, one line per model", plots.across_models(frame))
    report.tables["across_models"] = ("Spearman ρ by fraction of training", frame.pivot(
        on="measure", index=["model", "revision", "step", "tokens", "fraction"], values="value").sort("model", "fraction"))
    return report


FINDINGS_INTRO = ("The claims of He et al. and Tyukin et al., and two that this project adds (that redundancy follows "
                  "settling, that dropping attention costs more at long range), checked against each model in the "
                  "store: a verdict by the rule given with it, the numbers behind it, and what they rest on.")


def write_report(store: str | os.PathLike = "data", out: str | os.PathLike = "figures", model: str | None = None,
                 color_scale: str = "linear", branch: str | None = None) -> Path:
    """Write PNG and SVG figures, report.md and a self-contained report.html for every model in the store (or one).

    `color_scale` (linear or log) is the heatmaps' colour scale; each module has its own (see `plots.colour_range`).
    `branch` draws the side line of that name (with the trunk into it) of every model that has one, where the
    trunk is drawn otherwise. Raises `ConfigError` for another colour scale, an `out` that cannot be made or a
    `branch` no model has, `StoreError` for a store without scores (of `model`, where given); a damaged or foreign
    file in the store is skipped with a warning.
    """
    if color_scale not in COLOR_SCALES:
        raise ConfigError(f"colour scale {color_scale!r} is not one of: {', '.join(COLOR_SCALES)}")
    db = Store(store)
    scores, revisions, evals, curves = db.scores(), db.revisions(), db.evals(), db.curves()
    models = sorted(scores["model"].unique())
    if not models:
        raise StoreError(f"store {str(store)!r} holds no scores; run `ckpt-trace scan` first")
    if model is not None:
        if model not in models:
            raise StoreError(f"no scores for model {model!r} in {str(store)!r}; models there: {', '.join(models)}")
        models = [model]
    if branch is not None:
        having = {name: side_lines(scores.filter(pl.col("model") == name)["revision"].unique().to_list())
                  for name in models}
        if not (models := [name for name in models if branch in having[name]]):
            found = "; ".join(f"{name}: {', '.join(lines) or 'none'}" for name, lines in having.items())
            raise ConfigError(f"no model in {str(store)!r} has a side line {branch!r}; their side lines: {found}")
    out = Path(out)
    if (blocker := unmakeable(out)) is not None:
        raise ConfigError(f"output folder {str(out)!r} cannot be made: {str(blocker)!r} is a file; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for name in models:
        sources = model_sources(scores, revisions, name)
        for source in sources:
            on_disk = weights_on_disk(source) if source is not None else None
            # Two folders of one name are two models, each named by its path.
            title, slug = (name, name) if len(sources) == 1 else (
                f"{name} ({source})", f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:8]}")
            report = build_model_report(scores, revisions, name, evals, curves, color_scale, branch, source=source,
                                        on_disk=on_disk)
            report.model = title
            reports.append((report, slug))
            if branch is None:  # each side line too, from the trunk's checkpoint it forks from
                for side in side_lines(source_rows(scores, revisions, name, source)["revision"].unique().to_list()):
                    report = build_model_report(scores, revisions, name, None, None, color_scale, side, from_fork=True,
                                                source=source, on_disk=on_disk)
                    report.model = f"{title} ({side})"
                    reports.append((report, f"{slug}-{side}"))
        pruning = build_pruning_report(evals, name) if evals.height else None
        if pruning is not None:
            pruning.intro = "Pruned models evaluated beside the original (`ckpt-trace eval`)."
            reports.append((pruning, f"{name}-pruned"))
    if (across := across_models([report for report, _ in reports])) is not None:
        reports.insert(0, (across, "across-models"))
    findings_blocks = [
        {"model": report.model, "claims": [
            {"claim": f.claim, "verdict": f.verdict,
             "sentence": f"{f.evidence[:1].upper()}{f.evidence[1:]}" + (f" ({f.basis})" if f.basis else "") + "."}
            for f in report.findings]}
        for report, _ in reports if report.findings
    ]
    sections = []
    for report, slug in reports:
        folder = out / path_part(slug)
        folder.mkdir(exist_ok=True)
        link = urllib.parse.quote(path_part(slug))  # a viewer decodes the link once: %2F must stay %2F on disk
        section = {"title": report.model, "intro": report.intro, "notes": report.notes,
                   "figures": figure_entries(report.figures, folder, link), "tables": table_entries(report.tables),
                   "dynamics": None}
        if report.dynamics is not None:
            section["dynamics"] = {"intro": report.dynamics.intro, "tables": table_entries(report.dynamics.tables),
                                   "figures": figure_entries(report.dynamics.figures, folder, link)}
        sections.append(section)
    context = {"version": VERSION, "store": str(store), "models": models, "findings_intro": FINDINGS_INTRO,
               "findings": findings_blocks, "sections": sections}
    environment = templates()
    (out / "report.md").write_text(environment.get_template("report.md.j2").render(context), encoding="utf-8")
    (out / "report.html").write_text(environment.get_template("report.html.j2").render(context), encoding="utf-8")
    return out / "report.md"
