"""The report: figures and the numbers behind them, per model, as Markdown and self-contained HTML."""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from matplotlib.figure import Figure

from . import __version__, plots
from .analysis import (
    drop_set_overlap, drop_set_settled, model_scores, pruned_vs_original, rank_consistency, tradeoff,
)
from .errors import ConfigError, StoreError
from .findings import Finding, agreement, findings
from .paths import unmakeable
from .store import EVALS_SCHEMA, Store, path_part

DPI = 110


@dataclass
class ModelReport:
    """Everything the report says about one model."""

    model: str
    calibration: str
    intro: str = ""
    """What was scored: checkpoints, calibration set, dtype, scorer."""
    findings: list[Finding] = field(default_factory=list)
    """The papers' claims checked against this model (see `ckpt_trace.findings`)."""
    figures: dict[str, tuple[str, Figure]] = field(default_factory=dict)
    """name -> (caption, figure)"""
    tables: dict[str, tuple[str, pl.DataFrame]] = field(default_factory=dict)
    """name -> (caption, frame)"""
    notes: list[str] = field(default_factory=list)
    """What could not be drawn, and why."""


def _per_revision(frame: pl.DataFrame, module: str, metric: str) -> pl.DataFrame:
    """Revisions (rows, in training order) by layers (columns)."""
    part = frame.filter((pl.col("module") == module) & (pl.col("metric") == metric))
    wide = part.pivot(on="layer", index=["order", "revision", "step"], values="value").sort("order").drop("order")
    return wide.rename({c: f"layer {c}" for c in wide.columns if c not in ("revision", "step")})


def build_model_report(scores: pl.DataFrame, revisions: pl.DataFrame, model: str,
                       evals: pl.DataFrame | None = None) -> ModelReport:
    """Analyse one model's scores (and its pruned models' evaluations) and draw its figures."""
    frame = model_scores(scores, model)
    calibration, dtype, scorer = frame["calibration"][0], frame["dtype"][0], frame["scorer"][0]
    n_revisions = frame["revision"].n_unique()
    report = ModelReport(model, calibration, f"{n_revisions} checkpoints, calibration set `{calibration}`, dtype "
                         f"{dtype}, scorer {scorer}; each checkpoint's latest scan of the weights it names.")
    report.findings = findings(frame, evals if evals is not None else pl.DataFrame(schema=EVALS_SCHEMA), model)
    truth = agreement(frame)
    if truth.height:
        report.figures["agreement"] = ("Spearman correlation of importance and update ratio with ablation_loss over "
                                       "training: does the cheap score pick what matters?", plots.agreement(truth))
        report.tables["agreement"] = ("Spearman ρ with ablation_loss, over every layer and module", truth.pivot(
            on="score", index=["order", "revision", "step"], values="spearman").sort("order").drop("order"))
    mine = scores.filter(pl.col("model") == model).with_columns(pl.col("scorer").fill_null(1))
    for column, chosen, what in (("calibration", calibration, "calibration sets"), ("dtype", dtype, "dtypes"),
                                 ("scorer", scorer, "scorer versions")):
        others = sorted(str(v) for v in mine.filter(pl.col(column) != chosen)[column].unique())
        if others:
            report.notes.append(f"scores of other {what} ({', '.join(others)}) are left out; this report uses "
                                f"{chosen}, which covers the most revisions")
    same = mine.filter((pl.col("calibration") == calibration) & (pl.col("dtype") == dtype) & (pl.col("scorer") == scorer))
    older = same.filter(pl.col("revision").is_in(frame["revision"].unique().to_list())).join(
        frame.select("revision", "weights", "created").unique(), on=["revision", "weights", "created"],
        how="anti", nulls_equal=True)["revision"].unique()
    if len(older):
        report.notes.append(f"earlier scans (other weights) of {len(older)} checkpoint{'s' if len(older) > 1 else ''} "
                            "are left out; each checkpoint's latest scan is used")
    off_line = sorted(set(same["revision"]) - set(frame["revision"]))
    if off_line:
        report.notes.append(f"revisions off the trunk of training (side lines, or names placed by commit beside a "
                            f"revision) are left out: {', '.join(off_line)}")
    metrics = set(frame["metric"].unique())
    for metric in ("importance", "update_ratio"):
        if metric not in metrics:
            report.notes.append(f"no {metric} scores for this model: its heatmaps are not drawn")
            continue
        report.figures[f"{metric}_heatmaps"] = (
            f"{plots.METRIC_TITLES[metric]}: layer by checkpoint, one shared colour scale", plots.heatmaps(frame, metric)
        )
        for module in plots.MODULE_ORDER:
            table = _per_revision(frame, module, metric)
            if table.height:
                report.tables[f"{metric}_{module}"] = (f"{metric} of each {plots.MODULE_TITLES[module]} layer", table)
    if "importance" in metrics:
        report.figures["importance_lines"] = ("importance of each layer over training", plots.layer_lines(frame))
        if n_revisions < 2:
            report.notes.append(
                "only one checkpoint is stored: consistency and drop-set emergence need at least two, so they are not drawn"
            )
        else:
            consistency = rank_consistency(frame)
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
    scanned = frame.select("revision", "weights").unique()  # the loss of the weights scored, not of others by that name
    losses = revisions.filter((pl.col("model") == model) & pl.col("val_loss").is_not_null()).join(
        scanned, on=["revision", "weights"], nulls_equal=True)
    if losses.height:
        report.figures["validation_loss"] = ("validation loss over training", plots.validation_loss(losses))
        report.tables["validation_loss"] = ("validation loss", losses.sort("step").select("revision", "step", "tokens", "val_loss"))
    else:
        report.notes.append("the store has no validation loss for this model: its loss curve is not drawn")
    duplicates = revisions.filter((pl.col("model") == model) & pl.col("duplicate_of").is_not_null()).unique(
        ["revision", "duplicate_of"], maintain_order=True)
    if duplicates.height:
        report.tables["duplicates"] = (
            "revisions with byte-identical weights to an earlier one (scored once, under the earlier name)",
            duplicates.select("revision", "duplicate_of"),
        )
    return report


def build_pruning_report(evals: pl.DataFrame, model: str) -> ModelReport | None:
    """Pruned models of one source model against the original: the trade-off figure and the relative table."""
    comparison = pruned_vs_original(evals.filter(pl.col("source_model") == model))
    if comparison.height == 0:
        return None
    report = ModelReport(f"{model}: pruned models", "")
    points = tradeoff(comparison)
    if points.height:
        report.figures["tradeoff"] = ("quality kept against decode speedup", plots.quality_speed(points))
    else:
        report.notes.append("no pruned model has both a quality metric and decode speed beside its original's")
    report.tables["relative"] = (
        "each pruned model relative to the original (relative > 1 is better: quality kept, speedup, memory saved)",
        comparison.drop("source_model"),
    )
    return report


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(frame: pl.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * frame.width]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join(lines)


def html_table(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in frame.iter_rows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%}table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}
.note{background:#fff6d6;padding:0.4em 0.8em;border-left:4px solid #e0b000}details{margin-bottom:1em}"""


def write_report(store: str | os.PathLike = "data", out: str | os.PathLike = "figures", model: str | None = None) -> Path:
    """Write PNG figures, report.md and a self-contained report.html for every model in the store (or one)."""
    db = Store(store)
    scores, revisions, evals = db.scores(), db.revisions(), db.evals()
    models = sorted(scores["model"].unique())
    if not models:
        raise StoreError(f"store {str(store)!r} holds no scores; run `ckpt-trace scan` first")
    if model is not None:
        if model not in models:
            raise StoreError(f"no scores for model {model!r} in {str(store)!r}; models there: {', '.join(models)}")
        models = [model]
    out = Path(out)
    if (blocker := unmakeable(out)) is not None:
        raise ConfigError(f"output folder {str(out)!r} cannot be made: {str(blocker)!r} is a file; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    md = ["# ckpt-trace report", "", f"ckpt-trace {__version__}; store `{store}`; models: {', '.join(models)}.", ""]
    body = [f"<h1>ckpt-trace report</h1><p>ckpt-trace {html.escape(__version__)}; store <code>{html.escape(str(store))}</code></p>"]
    sections = []
    for name in models:
        report = build_model_report(scores, revisions, name, evals)
        sections.append((report, name, report.intro))
        pruning = build_pruning_report(evals, name) if evals.height else None
        if pruning is not None:
            sections.append((pruning, f"{name}-pruned", "Pruned models evaluated beside the original (`ckpt-trace eval`)."))
    md += ["## Findings", "", "The claims of He et al. and Tyukin et al., checked against each model in the store: a "
           "verdict by the rule given with it, the numbers behind it, and what they rest on.", ""]
    body.append("<h2>Findings</h2><p>The claims of He et al. and Tyukin et al., checked against each model in the store: "
                "a verdict by the rule given with it, the numbers behind it, and what they rest on.</p>")
    for report, _, _ in sections:
        if report.findings:
            md += [f"**{report.model}**", ""]
            md += [f"- {f.claim}: **{f.verdict}**. {f.evidence[:1].upper()}{f.evidence[1:]}"
                   + (f" ({f.basis})" if f.basis else "") + "." for f in report.findings]
            md.append("")
            items = "".join(f"<li>{html.escape(f.claim)}: <b>{html.escape(f.verdict)}</b>. "
                            f"{html.escape(f.evidence[:1].upper() + f.evidence[1:])}"
                            + (f" ({html.escape(f.basis)})" if f.basis else "") + ".</li>" for f in report.findings)
            body.append(f"<h3>{html.escape(report.model)}</h3><ul>{items}</ul>")
    for report, slug, intro in sections:
        folder = out / path_part(slug)
        folder.mkdir(exist_ok=True)
        name = report.model
        md += [f"## {name}", "", intro, ""]
        body.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(intro.replace('`', ''))}</p>")
        for note in report.notes:
            md += [f"> Not drawn: {note}.", ""]
            body.append(f'<p class="note">Not drawn: {html.escape(note)}.</p>')
        for key, (caption, figure) in report.figures.items():
            png = _png(figure)
            (folder / f"{key}.png").write_bytes(png)
            md += [f"### {caption}", "", f"![{caption}]({path_part(slug)}/{key}.png)", ""]
            encoded = base64.b64encode(png).decode()
            body.append(f"<h3>{html.escape(caption)}</h3><img alt='{html.escape(caption)}' src='data:image/png;base64,{encoded}'>")
        for caption, table in report.tables.values():
            md += [f"<details><summary>{caption}</summary>", "", markdown_table(table), "", "</details>", ""]
            body.append(f"<details><summary>{html.escape(caption)}</summary>{html_table(table)}</details>")
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>ckpt-trace report</title><style>{_STYLE}</style></head><body>{''.join(body)}</body></html>"
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.md"
