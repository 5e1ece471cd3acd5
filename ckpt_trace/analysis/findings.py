"""Findings: the papers' claims, checked against one model's stored scores and evaluations.

(a) Attention layers are more redundant than MLP layers, the deeper ones most (He et al.).
(b) The pattern is there early in training and stays (He et al.'s checkpoints).
(c) Dropping half the attention layers costs little quality and speeds decoding (both papers).
(d) The cheap score picks the layers that matter: its ranking agrees with `ablation_loss`, the
    loss that removing each module costs, and since when in training.
(e) A layer becomes redundant once its output has settled: in `ckpt_trace.analysis.dynamics`,
    from the training-dynamics metrics.

Each finding is a verdict (holds, does not hold, inconclusive), by a rule stated in its text,
with the numbers behind it and what they rest on: the dtype and calibration set of the scores,
the weights and dtype of the evaluations. A number quoted for a checkpoint is of that checkpoint's
own rows: where the checkpoint lacks a metric the finding says so, and never takes another
checkpoint's. Frames in, findings out; no file I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from .statistics import drop_count, drop_set_overlap, drop_set_settled, pruned_vs_original, rank_consistency

HOLDS, FAILS, OPEN = "holds", "does not hold", "inconclusive"
EARLY = 0.25
"""(b) holds when the final drop set is stable from this share of training on; fails beyond LATE."""
LATE = 0.5
KEPT = 0.9
"""(c) holds when the pruned model keeps this share of the original's quality (original / pruned perplexity)."""
AGREES = 0.5
"""(d) holds when the final checkpoint's Spearman correlation with ablation_loss reaches this."""


CHEAP_SCORES = ("importance", "update_ratio", "angular_distance")
"""The one-pass scores whose agreement with ablation_loss is measured."""

CALIBRATION_NAME = "calibration_source"
"""The column of a scores frame that may hold a calibration set's human-readable name (its id is a hash); where the
frame has it, findings name the set by both."""

EVALUATED = ["model", "path", "weights", "revision", "source_weights", "dtype", "device"]
"""The columns of evals that name one evaluated pruned model, measured alike. Its own weights are among them: a model
pruned again into the same folder is another model."""


@dataclass(frozen=True)
class Finding:
    claim: str
    verdict: str
    evidence: str
    basis: str


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _num(x: float | None, spec: str) -> str:
    """A number as text; a NaN or infinity (a diverged model, a score of tied values) is said, not printed."""
    return format(x, spec) if _finite(x) else "not a finite number"


def _rho(rho: float | None) -> str:
    """A Spearman correlation as text: undefined where the values tie (or are too few), which polars gives as NaN."""
    return f"{rho:+.2f}" if _finite(rho) else "undefined (tied or too few values)"


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'s' if n != 1 else ''}"


def _final(frame: pl.DataFrame) -> dict:
    """The final checkpoint of the frame (of any metric): its first row."""
    return frame.filter(pl.col("order") == pl.col("order").max()).row(0, named=True)


def checkpoint_name(row: dict) -> str:
    """A checkpoint (a row with revision and step) by name, with its step where the name does not give it."""
    plain = row["step"] is None or row["revision"] == f"step{row['step']}"
    return row["revision"] + ("" if plain else f" (step {row['step']:,})")


def _at(frame: pl.DataFrame, revision: str, metric: str) -> pl.DataFrame:
    return frame.filter((pl.col("revision") == revision) & (pl.col("metric") == metric))


def _lacking(frame: pl.DataFrame, metric: str, checkpoint: dict) -> str:
    """That a checkpoint lacks a metric, and which checkpoints have it (shards scanned with other --metrics)."""
    having = frame.filter(pl.col("metric") == metric).sort("order")["revision"].unique(maintain_order=True).to_list()
    more = f" and {len(having) - 3} more" if len(having) > 3 else ""
    where = f" (it is for {', '.join(having[:3])}{more} only)" if having else ""
    return f"no {metric} is stored for {checkpoint_name(checkpoint)}{where}"


def scored_on(frame: pl.DataFrame) -> str:
    """What the scores rest on, as "float32 scores on calibration set `1a2b3c4d5e6f`" (with the set's name where the
    frame has one)."""
    said = []
    if "dtype" in frame.columns and frame["dtype"].drop_nulls().len():
        said.append(f"{', '.join(sorted(set(frame['dtype'].drop_nulls())))} scores")
    if "calibration" in frame.columns and frame["calibration"].drop_nulls().len():
        name = pl.col(CALIBRATION_NAME) if CALIBRATION_NAME in frame.columns else pl.lit(None, pl.String)
        sets = frame.select("calibration", name=name).drop_nulls("calibration").unique("calibration").sort("calibration")
        named = [f"{name} (`{id_}`)" if name else f"`{id_}`" for id_, name in sets.rows()]
        said.append(f"calibration set{'s' if len(named) > 1 else ''} {', '.join(named)}")
    return " on ".join(said)


def _basis(*parts: str) -> str:
    return "; ".join(part for part in parts if part)


def redundancy(frame: pl.DataFrame) -> Finding:
    """(a) At the final checkpoint: mean importance of attention against MLP layers, and its trend with depth."""
    claim = "(a) attention layers are more redundant than MLP layers, the deeper ones most"
    if frame.height == 0:
        return Finding(claim, OPEN, "no scores are stored", "")
    final = _final(frame)
    importance = _at(frame, final["revision"], "importance")
    means = dict(importance.group_by("module").agg(pl.col("value").mean()).rows())
    if not all(_finite(means.get(module)) for module in ("attention", "mlp")):
        return Finding(claim, OPEN, _lacking(frame, "importance", final) if not importance.height else
                       f"the importance of attention or MLP layers at {checkpoint_name(final)} is missing or not a "
                       "finite number",
                       f"final checkpoint {checkpoint_name(final)}")
    attention = importance.filter(pl.col("module") == "attention")
    depth = attention.select(pl.corr("layer", "value", method="spearman")).item()
    if means["attention"] < means["mlp"] and _finite(depth) and depth < 0:
        verdict = HOLDS
    elif means["attention"] > means["mlp"] and _finite(depth) and depth > 0:
        verdict = FAILS
    else:
        verdict = OPEN
    evidence = (f"mean importance of attention layers {means['attention']:.4f} against MLP layers {means['mlp']:.4f}; "
                f"Spearman ρ of attention importance with depth {_rho(depth)}")
    costs = dict(_at(frame, final["revision"], "ablation_loss").group_by("module").agg(pl.col("value").mean()).rows())
    if all(_finite(costs.get(module)) for module in ("attention", "mlp")):
        evidence += (f"; removing one attention layer costs {costs['attention']:.4f} nats of loss on average, "
                     f"one MLP {costs['mlp']:.4f}")
    elif frame["metric"].eq("ablation_loss").any():
        evidence += f"; {_lacking(frame, 'ablation_loss', final)}, so no cost of removing a layer is quoted"
    rule = "holds when attention is below MLP and falls with depth, fails when both are the other way"
    return Finding(claim, verdict, evidence,
                   _basis(f"final checkpoint {checkpoint_name(final)}, {attention.height} layers", scored_on(frame), rule))


def _share(frame: pl.DataFrame, revision: str) -> tuple[float | None, str]:
    """How far into training a revision is, by tokens where known, else by step, as a share of the final's."""
    rows = frame.group_by("revision").agg(pl.col("step", "tokens", "order").first())
    final = rows.sort("order").row(-1, named=True)
    at = rows.filter(pl.col("revision") == revision).row(0, named=True)
    for column in ("tokens", "step"):
        if at[column] is not None and final[column]:
            return at[column] / final[column], column
    return None, "position"


def persistence(frame: pl.DataFrame) -> Finding:
    """(b) From which checkpoint the final checkpoint's attention drop set (half the layers) stays, and how well
    each checkpoint's layer ranking agrees with the final one over the second half of training."""
    claim = "(b) the redundancy pattern is there early in training and stays"
    importance = frame.filter(pl.col("metric") == "importance")
    checkpoints = importance["revision"].n_unique()
    if checkpoints < 2:
        return Finding(claim, OPEN, f"{checkpoints} checkpoint stored: this needs two or more", "")
    final = _final(frame)
    if not importance["revision"].eq(final["revision"]).any():
        return Finding(claim, OPEN, f"{_lacking(frame, 'importance', final)}: the final drop set is not known", "")
    n_layers = importance["layer"].n_unique()
    settled = drop_set_settled(drop_set_overlap(importance, fractions=(0.5,), modules=("attention",)))
    row = settled.row(0, named=True)
    share, by = _share(frame, row["settled_revision"])
    consistency = rank_consistency(importance).filter(pl.col("module") == "attention")
    late = consistency.filter(pl.col("order") >= consistency["order"].max() / 2)["spearman"].drop_nans().drop_nulls()
    tokens = frame.filter(pl.col("revision") == row["settled_revision"])["tokens"][0]
    seen = [f"{tokens:,} tokens seen"] if tokens is not None else []
    seen += [f"{share:.0%} of training by {by}"] if share is not None else []
    verdict = OPEN if share is None else HOLDS if share <= EARLY else FAILS if share > LATE else OPEN
    agreeing = f"mean {late.mean():.2f}, lowest {late.min():.2f}" if late.len() else _rho(None)
    evidence = (f"the final checkpoint's {drop_count(n_layers, 0.5)} least important attention layers "
                f"{list(row['final_layers'])} are the least important from {row['settled_revision']} on"
                + (f" ({', '.join(seen)})" if seen else "")
                + f"; Spearman ρ of the attention ranking with the final one over the second half of training: "
                f"{agreeing}")
    rule = f"holds when stable from {EARLY:.0%} of training or earlier, fails when only after {LATE:.0%}"
    return Finding(claim, verdict, evidence, _basis(f"{checkpoints} checkpoints, {n_layers} layers", scored_on(frame), rule))


def _dropped_attention(pruning: str) -> int | None:
    """How many attention layers a pruning label (``attention [3, 4, 5] (similarity)``) says were dropped, if only those."""
    if not pruning.startswith("attention [") or "mlp" in pruning or "block" in pruning:
        return None
    return len(pruning.split("[", 1)[1].split("]", 1)[0].split(","))


_LEFT_OUT = {
    "unknown": "of unknown weights (stored before evaluations recorded them)",
    "unscanned": "of a checkpoint not scanned here",
    "other": "of other weights than the checkpoint's scores here (re-published or retrained since)",
}
"""Why an evaluation is not quoted beside the scores, by the `unusable` mark of `_of_scans`."""


def _of_scans(evals: pl.DataFrame, scanned: dict[str, str]) -> pl.DataFrame:
    """The evaluations, each marked `unusable` with why it cannot stand beside the scores (null where it can): its
    source weights (an original's are its own) unknown, its checkpoint not scanned, or scanned with other weights."""
    scans = pl.DataFrame({"revision": list(scanned), "scanned": list(scanned.values())},
                         schema={"revision": pl.String, "scanned": pl.String})
    own = pl.when(pl.col("pruning").is_null()).then(pl.col("weights")).otherwise(pl.col("source_weights"))
    return evals.with_columns(source_weights=own).join(scans, on="revision", how="left").with_columns(
        unusable=pl.when(pl.col("source_weights").is_null()).then(pl.lit("unknown"))
        .when(pl.col("scanned").is_null()).then(pl.lit("unscanned"))
        .when(pl.col("source_weights") != pl.col("scanned")).then(pl.lit("other")))


def _left_out(marked: pl.DataFrame) -> str:
    """How many evaluations (runs of `ckpt-trace eval` on one model) were left out, and why."""
    runs = dict(marked.filter(pl.col("unusable").is_not_null()).group_by("unusable").agg(
        pl.struct("model", "path", "created").n_unique()).rows())
    said = [f"{_count(runs[why], 'evaluation')} {text}" for why, text in _LEFT_OUT.items() if why in runs]
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
    return _num(value, ".3f") + (f" ± {stderr:.3f}" if _finite(stderr) else "")


def _curve_clause(row: dict, revision: str, half: int, n_layers: int) -> tuple[float, str, str]:
    """Quality kept on the pruning curve by similarity with `half` attention layers dropped, its clause and basis."""
    original, similarity = row["original"], row["similarity"]
    kept = original / similarity if _finite(original) and _finite(similarity) else math.nan
    others = ", ".join(f"{s} {original / row[s]:.0%}" for s in ("oracle", "last", "random")
                       if _finite(row.get(s)) and _finite(original))
    seeds = f" (geometric mean of {_count(row['seeds'], 'seed')})" if row.get("seeds") else ""
    clause = (f"at {revision}, with {half} of {n_layers} attention layers dropped by similarity, perplexity "
              f"{_num(original, '.2f')} -> {_num(similarity, '.2f')} ({_num(kept, '.0%')} of the original's quality "
              f"kept" + (f"; {others}{seeds}" if others else "") + ")")
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
    parts, notes, basis = [], [], []
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
        basis.append(of)
    else:
        point = None
    mine = _of_scans(evals.filter(pl.col("source_model") == model), scanned)
    labels = [p for p in mine["pruning"].drop_nulls().unique().to_list() if _dropped_attention(p) == half]
    candidates = mine.filter(pl.col("pruning").is_in(labels))
    if point is not None:
        candidates = candidates.filter(pl.col("revision") == checkpoint[0])
    notes.append(_left_out(mine.filter(pl.col("revision").is_in(candidates["revision"].unique().to_list())
                                       & (pl.col("pruning").is_null() | pl.col("pruning").is_in(labels)))))
    usable = candidates.filter(pl.col("unusable").is_null())
    originals = mine.filter(pl.col("pruning").is_null() & pl.col("unusable").is_null()).select(evals.columns)
    who, latest, comparison = _one_pruned_model(usable.select(evals.columns), originals)
    if who is not None:
        quality = comparison.filter(pl.col("metric") == "perplexity")
        if point is None and quality.height:
            measured = quality.row(0, named=True)
            kept = measured["relative"]
            clauses.append(f"perplexity {_num(measured['original'], '.2f')} -> {_num(measured['value'], '.2f')} "
                           f"({_num(kept, '.0%')} of the original's quality kept)")
        for row in comparison.filter(pl.col("metric") == "acc").sort("task").iter_rows(named=True):
            items = f"{row['n']} items, " if row["n"] is not None else ""
            clauses.append(f"{row['task']} accuracy {_spread(row['original'], row['original_stderr'])} -> "
                           f"{_spread(row['value'], row['stderr'])} ({items}± one standard error)")
        speed = comparison.filter(pl.col("metric") == "decode_tokens_per_s")
        if speed.height:
            speedup = speed["relative"][0]
            clauses.append(f"decode {_num(speedup, '.2f')}x as fast")
        when = f", evaluated {who['created']:%Y-%m-%d}" if who["created"] is not None else ""
        parts.append(f"pruned model {who['model']} ({latest['pruning'][0]}) of {who['revision']}{when}: "
                     + ("; ".join(clauses) or "no result of it beside its original's (the same weights, dtype and "
                                              "device) is stored"))
        text = latest.filter(pl.col("metric") == "perplexity")["data"].drop_nulls()
        how = [str(who[c]) for c in ("dtype", "device") if who[c]]
        if point is None and quality.height and text.len():
            how.append(f"perplexity on text `{text[0]}`")
        basis.append(f"pruned model {who['model']}, the most recent of "
                     f"{_count(usable.select('model', 'path', 'weights').n_unique(), 'evaluated pruned model')} with half "
                     f"the attention layers dropped from weights scanned here, from {who['revision']}'s "
                     f"{who['source_weights'][:12]}" + (f", in {', '.join(how)}" if how else ""))
    notes = [note for note in notes if note]
    if kept is None and speedup is None and who is None:
        none = (f"no pruning curve (`ckpt-trace curves`) and no model pruned from {model} with {half} of its {n_layers} "
                "attention layers dropped evaluated beside the original (`ckpt-trace eval --perplexity --speed`) is stored")
        return Finding(claim, OPEN, "; ".join([none, *notes]), "")
    unmeasured = [what for what, x in (("perplexity", kept), ("decode speed", speedup)) if x is None]
    if kept is not None and not _finite(kept) or speedup is not None and not _finite(speedup):
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
    rule = f"holds when {KEPT:.0%} of the quality is kept and decoding is faster"
    return Finding(claim, verdict, "; ".join(parts + notes), _basis(" and ".join(basis), rule))


def agreement(frame: pl.DataFrame) -> pl.DataFrame:
    """Per checkpoint: Spearman correlation, over every layer and module, of each cheap score with ablation_loss,
    where the checkpoint has both (shards scanned with other --metrics may lack one)."""
    empty = pl.DataFrame(schema={"revision": pl.String, "order": pl.Int64, "step": pl.Int64, "tokens": pl.Int64,
                                 "score": pl.String, "spearman": pl.Float64})
    wide = frame.filter(pl.col("metric").is_in([*CHEAP_SCORES, "ablation_loss"])).pivot(
        on="metric", index=["revision", "order", "step", "tokens", "layer", "module"], values="value")
    if "ablation_loss" not in wide.columns:
        return empty
    pieces = [
        wide.drop_nulls([score, "ablation_loss"]).group_by("revision").agg(
            pl.col("order", "step", "tokens").first(), spearman=pl.corr(score, "ablation_loss", method="spearman"))
        .with_columns(score=pl.lit(score))
        for score in CHEAP_SCORES if score in wide.columns
    ]
    return pl.concat([empty, *(piece.select(empty.columns) for piece in pieces)], how="vertical_relaxed").sort(
        "score", "order")


def cheap_versus_truth(frame: pl.DataFrame) -> Finding:
    """(d) Whether importance ranks layers and modules as removing them costs, at the final checkpoint and since when."""
    claim = "(d) importance picks the modules that matter: it ranks them as ablation_loss does"
    scan = "scan with --metrics importance,update_ratio,ablation_loss"
    if not frame.height or not frame["metric"].eq("ablation_loss").any():
        return Finding(claim, OPEN, f"no ablation_loss is stored: {scan}", "")
    final = _final(frame)
    truth = agreement(frame)
    table = truth.filter(pl.col("score") == "importance")
    at_final = table.filter(pl.col("revision") == final["revision"])
    if not at_final.height:
        lacking = [_lacking(frame, metric, final) for metric in ("ablation_loss", "importance")
                   if not _at(frame, final["revision"], metric).height]
        return Finding(claim, OPEN, f"{' and '.join(lacking) or 'no agreement is measured'}, the final checkpoint: "
                       f"{scan} at {final['revision']}", scored_on(frame))
    rho = at_final["spearman"][0]
    good = (table["spearman"].fill_nan(-1.0) >= AGREES).cast(pl.Int8).reverse().cum_min().reverse()
    since = table.filter(good == 1)
    others = dict(truth.filter((pl.col("score") != "importance") & (pl.col("revision") == final["revision"]))
                  .select("score", "spearman").rows())
    said = [f"{score}: {_rho(others[score])}" if score in others else f"no {score} at {final['revision']}"
            for score in CHEAP_SCORES[1:] if score in others or frame["metric"].eq(score).any()]
    evidence = (f"Spearman ρ of importance with ablation_loss over every layer and module at {checkpoint_name(final)}: "
                f"{_rho(rho)}"
                + (f" ({', '.join(said)})" if said else "")
                + (f"; at least {AGREES} from {since['revision'][0]} on" if since.height else f"; never {AGREES} for good"))
    verdict = OPEN if not _finite(rho) else HOLDS if rho >= AGREES else FAILS if rho <= 0 else OPEN
    n = _at(frame, final["revision"], "ablation_loss").select("layer", "module").n_unique()
    rule = f"holds when ρ reaches {AGREES} at the final checkpoint, fails when it is 0 or below"
    return Finding(claim, verdict, evidence, _basis(f"{_count(table.height, 'checkpoint')} with ablation_loss, "
                                                    f"{n} modules at {checkpoint_name(final)}", scored_on(frame), rule))


def _scanned(frame: pl.DataFrame) -> dict[str, str | None]:
    """Each revision's scanned weights (one scan per revision, as `model_scores` gives them)."""
    if "weights" not in frame.columns:
        return {}
    return dict(frame.select("revision", "weights").unique("revision", keep="first").rows())


def findings(frame: pl.DataFrame, evals: pl.DataFrame, model: str, curve: pl.DataFrame | None = None,
             checkpoint: tuple[str, str | None] | None = None) -> list[Finding]:
    """The four findings for one model's scores (as `analysis.model_scores` gives them), the store's evaluations and
    the model's pruning curve (as `ckpt_trace.pruning.curves.summary` gives it, with `dtype`, `calibration` and `data`
    columns where known), if any, measured on `checkpoint` (its revision and weights). Evaluations and the curve count
    only where they are of the weights the scores are of."""
    n_layers = frame["layer"].n_unique()
    return [redundancy(frame), persistence(frame),
            pruning_payoff(evals, model, n_layers, curve, checkpoint, _scanned(frame)), cheap_versus_truth(frame)]
