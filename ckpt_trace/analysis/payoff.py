"""Finding (c): dropping half the attention layers costs little quality and speeds decoding (both papers), from the
model's pruning curve and the evaluations of one pruned model whose source weights are the scanned ones; the quality
that healing (`ckpt-trace heal`) brings back is quoted beside it, never judged."""

from __future__ import annotations

import math

import polars as pl

from .statistics import dropped_count, pruned_vs_original
from .verdicts import FAILS, HOLDS, OPEN, Finding, basis, count, finite, num

KEPT = 0.9
"""(c) holds when the pruned model keeps this share of the original's quality (original / pruned perplexity)."""

EVALUATED = ["model", "path", "weights", "revision", "source_weights", "dtype", "device"]
"""The columns of evals that name one evaluated pruned model, measured alike. Its own weights are among them: a model
pruned again into the same folder, or healed into it, is another model."""

_LEFT_OUT = {
    "unknown": "of unknown weights (stored before evaluations recorded them)",
    "unscanned": "of a checkpoint not scanned here",
    "other": "of other weights than the checkpoint's scores here (re-published or retrained since)",
}
"""Why an evaluation is not quoted beside the scores, by the `unusable` mark of `of_scans`."""


def of_scans(evals: pl.DataFrame, scanned: dict[str, str]) -> pl.DataFrame:
    """The evaluations, each marked `unusable` with why it cannot stand beside the scores (null where it can): its
    source weights (an original's are its own) unknown, its checkpoint not scanned, or scanned with other weights."""
    scans = pl.DataFrame({"revision": list(scanned), "scanned": list(scanned.values())},
                         schema={"revision": pl.String, "scanned": pl.String})
    original = pl.col("pruning").is_null() & pl.col("healed").is_null()
    own = pl.when(original).then(pl.col("weights")).otherwise(pl.col("source_weights"))
    return evals.with_columns(source_weights=own).join(scans, on="revision", how="left").with_columns(
        unusable=pl.when(pl.col("source_weights").is_null()).then(pl.lit("unknown"))
        .when(pl.col("scanned").is_null()).then(pl.lit("unscanned"))
        .when(pl.col("source_weights") != pl.col("scanned")).then(pl.lit("other")))


def left_out(marked: pl.DataFrame) -> str:
    """How many evaluations (runs of `ckpt-trace eval` on one model) were left out, and why."""
    runs = dict(marked.filter(pl.col("unusable").is_not_null()).group_by("unusable").agg(
        pl.struct("model", "path", "created").n_unique()).rows())
    said = [f"{count(runs[why], 'evaluation')} {text}" for why, text in _LEFT_OUT.items() if why in runs]
    return "left out: " + ", ".join(said) if said else ""


def _curve_unusable(checkpoint: tuple[str, str | None] | None, scanned: dict[str, str]) -> str:
    """Why a pruning curve cannot stand beside the scores ('' where it can)."""
    if checkpoint is None:
        return "the pruning curve names no checkpoint: it is left out"
    revision, weights = checkpoint
    if revision not in scanned:
        return f"the pruning curve of {revision} is left out: {revision} is not scanned here"
    if weights != scanned[revision]:
        of = "unknown weights" if weights is None else f"other weights ({weights[:12]})"
        return f"the pruning curve of {revision} is left out: it is of {of}, its scores of {scanned[revision][:12]}"
    return ""


def _spread(value: float | None, stderr: float | None) -> str:
    return num(value, ".3f") + (f" ± {stderr:.3f}" if finite(stderr) else "")


def _curve_clause(row: dict, revision: str, half: int, n_layers: int) -> tuple[float, str, str]:
    """Quality kept on the pruning curve by similarity with `half` attention layers dropped, its clause and basis."""
    original, similarity = row["original"], row["similarity"]
    kept = original / similarity if finite(original) and finite(similarity) else math.nan
    others = ", ".join(f"{s} {original / row[s]:.0%}" for s in ("oracle", "last", "random")
                       if finite(row.get(s)) and finite(original))
    seeds = f" (geometric mean of {count(row['seeds'], 'seed')})" if row.get("seeds") else ""
    healed = ""
    if finite(row.get("healed")) and finite(original):  # the same drop set, healed after it was dropped
        how = f" ({row['healing']})" if row.get("healing") else ""
        healed = f"; healed{how} {original / row['healed']:.0%}"
    clause = (f"at {revision}, with {half} of {n_layers} attention layers dropped by similarity, perplexity "
              f"{num(original, '.2f')} -> {num(similarity, '.2f')} ({num(kept, '.0%')} of the original's quality "
              f"kept{healed}" + (f"; {others}{seeds}" if others else "") + ")")
    setting = ", ".join(f"{what} `{row[column]}`" if what else str(row[column]) for column, what in (
        ("dtype", ""), ("calibration", "calibration set"), ("data", "perplexity on text")) if row.get(column))
    return kept, clause, f"the pruning curve of {revision}" + (f" ({setting})" if setting else "")


def _one_pruned_model(usable: pl.DataFrame, originals: pl.DataFrame) -> tuple[dict | None, pl.DataFrame, pl.DataFrame]:
    """The most recently evaluated of the pruned models (its `EVALUATED` columns and latest `created`), its latest
    result of each task and metric, and those results beside its original's (`pruned_vs_original`)."""
    chosen = usable.group_by(EVALUATED).agg(pl.col("created").max()).sort(
        ["created", "model"], descending=[True, False], nulls_last=True).head(1)
    # Each of its results is the latest: an accuracy measured twice (a re-run, another --limit) is quoted once.
    latest = usable.join(chosen.drop("created"), on=EVALUATED, nulls_equal=True).sort("created").group_by(
        "task", "metric").last().select(originals.columns)
    comparison = pruned_vs_original(pl.concat([originals, latest]))
    return (chosen.row(0, named=True) if chosen.height else None), latest, comparison


def _healed_clauses(healed: pl.DataFrame, originals: pl.DataFrame, who: dict, latest: pl.DataFrame) -> list[str]:
    """The quality kept by each healed model of the chosen pruned model's drop set (its pruning label, checkpoint and
    source weights), measured as it is (dtype, device; perplexity on its text, where it has one)."""
    text = latest.filter(pl.col("metric") == "perplexity")["data"]
    same = healed.filter(pl.col("pruning") == latest["pruning"][0], pl.col("metric") == "perplexity",
                         *(pl.col(c).eq_missing(who[c]) for c in ("revision", "source_weights", "dtype", "device")))
    if text.len():
        same = same.filter(pl.col("data").eq_missing(text[0]))
    comparison = pruned_vs_original(pl.concat([originals, same.select(originals.columns)]))
    return [f"healed ({row['healed']}), model {row['model']}: perplexity {num(row['original'], '.2f')} -> "
            f"{num(row['value'], '.2f')} ({num(row['relative'], '.0%')} of the original's quality kept)"
            for row in comparison.sort("model", "healed").iter_rows(named=True)]


def pruning_payoff(evals: pl.DataFrame, model: str, n_layers: int, curve: pl.DataFrame | None = None,
                   checkpoint: tuple[str, str | None] | None = None,
                   scanned: dict[str, str | None] | None = None) -> Finding:
    """(c) Half the attention layers dropped: perplexity kept (on the pruning curve by similarity, where one is stored,
    else of an evaluated pruned model) and decode speedup, of one checkpoint and one named pruned model.

    Everything quoted is of the weights the scores are of: `scanned` maps each scanned revision to its weights; an
    evaluation counts only where its source weights (an original's own) are its checkpoint's scanned ones, and the
    curve only where its `checkpoint` (revision, weights) is. The rest is left out with a note (None: nothing is
    scanned). The pruned model is the most recently evaluated one with half the attention layers dropped (of the
    curve's checkpoint, where there is a curve); each of its results is its latest."""
    claim = "(c) dropping half the attention layers costs little quality and speeds decoding"
    half = n_layers // 2
    scanned = {revision: weights for revision, weights in (scanned or {}).items() if weights is not None}
    parts, notes, rests_on = [], [], []
    kept = speedup = None
    clauses: list[str] = []
    point = curve.filter((pl.col("target") == "attention") & (pl.col("k") == half)) \
        if curve is not None and "similarity" in curve.columns else None
    if point is not None and point.height and (why := _curve_unusable(checkpoint, scanned)):
        notes.append(why)
        point = None
    elif point is not None and point.height:
        kept, clause, of = _curve_clause(point.row(0, named=True), checkpoint[0], half, n_layers)
        parts.append(clause)
        rests_on.append(of)
    else:
        point = None
    mine = of_scans(evals.filter(pl.col("source_model") == model), scanned)
    labels = [p for p in mine["pruning"].drop_nulls().unique().to_list() if dropped_count(p, "attention") == half]
    candidates = mine.filter(pl.col("pruning").is_in(labels))
    if point is not None:
        candidates = candidates.filter(pl.col("revision") == checkpoint[0])
    notes.append(left_out(mine.filter(pl.col("revision").is_in(candidates["revision"].unique().to_list())
                                      & (pl.col("pruning").is_null() | pl.col("pruning").is_in(labels)))))
    # The verdict is on a model as pruned; a healed one (the same label, its own weights) is quoted beside it.
    healed = candidates.filter(pl.col("unusable").is_null() & pl.col("healed").is_not_null()).select(evals.columns)
    usable = candidates.filter(pl.col("unusable").is_null() & pl.col("healed").is_null())
    originals = mine.filter(pl.col("pruning").is_null() & pl.col("healed").is_null() & pl.col("unusable").is_null()
                            ).select(evals.columns)
    who, latest, comparison = _one_pruned_model(usable.select(evals.columns), originals)
    if who is not None:
        quality = comparison.filter(pl.col("metric") == "perplexity")
        if point is None and quality.height:
            measured = quality.row(0, named=True)
            kept = measured["relative"]
            clauses.append(f"perplexity {num(measured['original'], '.2f')} -> {num(measured['value'], '.2f')} "
                           f"({num(kept, '.0%')} of the original's quality kept)")
        for row in comparison.filter(pl.col("metric") == "acc").sort("task").iter_rows(named=True):
            items = f"{row['n']} items, " if row["n"] is not None else ""
            clauses.append(f"{row['task']} accuracy {_spread(row['original'], row['original_stderr'])} -> "
                           f"{_spread(row['value'], row['stderr'])} ({items}± one standard error)")
        speed = comparison.filter(pl.col("metric") == "decode_tokens_per_s")
        if speed.height:
            speedup = speed["relative"][0]
            clauses.append(f"decode {num(speedup, '.2f')}x as fast")
        clauses += _healed_clauses(healed, originals, who, latest)
        when = f", evaluated {who['created']:%Y-%m-%d}" if who["created"] is not None else ""
        parts.append(f"pruned model {who['model']} ({latest['pruning'][0]}) of {who['revision']}{when}: "
                     + ("; ".join(clauses) or "no result of it beside its original's (the same weights, dtype and "
                                              "device) is stored"))
        text = latest.filter(pl.col("metric") == "perplexity")["data"].drop_nulls()
        how = [str(who[c]) for c in ("dtype", "device") if who[c]]
        if point is None and quality.height and text.len():
            how.append(f"perplexity on text `{text[0]}`")
        rests_on.append(f"pruned model {who['model']}, the most recent of "
                     f"{count(usable.select('model', 'path', 'weights').n_unique(), 'evaluated pruned model')} with half "
                     f"the attention layers dropped from weights scanned here, from {who['revision']}'s "
                     f"{who['source_weights'][:12]}" + (f", in {', '.join(how)}" if how else ""))
    notes = [note for note in notes if note]
    if kept is None and speedup is None and who is None:
        none = (f"no pruning curve (`ckpt-trace curves`) and no model pruned from {model} with {half} of its {n_layers} "
                "attention layers dropped evaluated beside the original (`ckpt-trace eval --perplexity --speed`) is stored")
        return Finding(claim, OPEN, "; ".join([none, *notes]), "")
    unmeasured = [what for what, x in (("perplexity", kept), ("decode speed", speedup)) if x is None]
    if kept is not None and not finite(kept) or speedup is not None and not finite(speedup):
        verdict = OPEN
    elif kept is not None and kept < KEPT:
        verdict = FAILS
    elif unmeasured:
        verdict = OPEN
        if who is None or clauses:  # else its clause says that none of its results is
            of = f"{who['model']} beside its original's" if who is not None else "such a model"
            parts.append(f"no {' and no '.join(unmeasured)} of {of} is stored")
    else:
        verdict = HOLDS if speedup > 1 else FAILS
    rule = (f"holds when {KEPT:.0%} of the quality is kept and decoding is faster, by the model as pruned (a healed "
            "model's quality is quoted beside it, not judged)")
    return Finding(claim, verdict, "; ".join(parts + notes), basis(" and ".join(rests_on), rule))
