"""Loss by position: what a pruned model loses, against its original, at each context length, and finding (f),
that dropping attention costs more at long range than at short.

`ckpt-trace eval --position-loss` stores, per position bucket (positions 1, 2-4, 5-16, ... up to the sequence
length - 1; see `ckpt_trace.scoring.loss.position_buckets`), the mean next-token loss of the tokens predicted from
that many tokens of context. The excess loss of a pruned (or healed) model is its bucket's loss minus its original's
on the same text, dtype and device, as `ckpt_trace.analysis.statistics.pruned_vs_original` pairs them. Attention is
what reads the context; an MLP sees one position. If attention is what a pruned model loses, the excess should grow
with the context it no longer reads. Frames in, frames and findings out; no file I/O.
"""

from __future__ import annotations

import polars as pl

from .payoff import left_out, of_scans
from .statistics import pruned_vs_original, pruning_target
from .verdicts import FAILS, HOLDS, OPEN, Finding, basis, count, finite, num

TASK = "position_loss"
"""The evals task of `ckpt-trace eval --position-loss`: one row per bucket, metric ``positions <first>-<last>``."""

SETTING = ["data", "dtype", "device"]
"""What position losses are measured on and in: only rows alike compare."""

CLAIM = "(f) dropping attention costs more at long range"
RUN = "`ckpt-trace eval ORIGINAL PRUNED --position-loss`"


def position_excess(evals: pl.DataFrame) -> pl.DataFrame:
    """One row per pruned (or healed) model and position bucket whose original has the same bucket on the same text,
    dtype and device: its loss (`value`), the original's, `excess` = value - original (nats per predicted token), the
    bucket's `first` and `last` position, and the model's `target` (see `statistics.pruning_target`)."""
    rows = evals.filter(pl.col("task") == TASK)
    schema = {"source_model": pl.String, "revision": pl.String, "source_weights": pl.String, "model": pl.String,
              "pruning": pl.String, "healed": pl.String, "target": pl.String, **{c: pl.String for c in SETTING},
              "first": pl.Int64, "last": pl.Int64, "bucket": pl.String, "n": pl.Int64, "value": pl.Float64,
              "original": pl.Float64, "excess": pl.Float64}
    # pruned_vs_original pairs on the text but does not hand it on: one text at a time.
    pieces = [pruned_vs_original(part).with_columns(data=pl.lit(data, pl.String))
              for (data,), part in rows.group_by("data", maintain_order=True)]
    pieces = [piece for piece in pieces if piece.height]
    if not pieces:
        return pl.DataFrame(schema=schema)
    bounds = pl.col("metric").str.extract_groups(r"^positions (\d+)-(\d+)$")
    return pl.concat(pieces).with_columns(
        target=pruning_target(pl.col("pruning")), first=bounds.struct[0].cast(pl.Int64),
        last=bounds.struct[1].cast(pl.Int64), excess=pl.col("value") - pl.col("original"),
    ).drop_nulls(["first", "last"]).with_columns(
        bucket=pl.when(pl.col("first") == pl.col("last")).then(pl.col("first").cast(pl.String))
        .otherwise(pl.format("{}-{}", "first", "last"))
    ).select(list(schema)).sort("source_model", "target", "model", "healed", *SETTING, "first", nulls_last=False)


def most_measured(excess: pl.DataFrame, evals: pl.DataFrame) -> tuple[dict | None, str]:
    """The text, dtype and device (`SETTING`) under which the most models' position losses compare with their
    original's (of those as many, the one evaluated last), and a note naming the others left out ('' if none)."""
    if not excess.height:
        return None, ""
    when = evals.filter(pl.col("task") == TASK).group_by(SETTING).agg(pl.col("created").max())
    settings = excess.group_by(SETTING).agg(models=pl.struct("model", "healed", "source_weights").n_unique()).join(
        when, on=SETTING, how="left", nulls_equal=True).sort(["models", "created", *SETTING],
                                                             descending=[True, True, False, False, False],
                                                             nulls_last=True)
    chosen = settings.row(0, named=True)
    others = settings.slice(1)
    left = ", ".join(_setting(row) for row in others.iter_rows(named=True))
    note = "" if not others.height else (
        f"position losses on other texts, dtypes or devices ({left}) are left out of the position figure; it draws "
        f"{_setting(chosen)}, which the most models have")
    return {c: chosen[c] for c in SETTING}, note


def _setting(row: dict) -> str:
    """A text, dtype and device, in words."""
    return f"text `{row['data']}`, {row['dtype']}, {row['device']}"


def of_setting(excess: pl.DataFrame, setting: dict) -> pl.DataFrame:
    """The rows measured on one text, dtype and device (as `most_measured` names them)."""
    return excess.filter(*(pl.col(c).eq_missing(v) for c, v in setting.items()))


def excess_table(excess: pl.DataFrame) -> pl.DataFrame:
    """One row per model, its excess loss in each position bucket (columns, in position order)."""
    buckets = excess.sort("first")["bucket"].unique(maintain_order=True).to_list()
    return excess.pivot(on="bucket", index=["model", "pruning", "healed", "target", "revision"], values="excess",
                        sort_columns=False).select("model", "pruning", "healed", "target", "revision", *buckets)


def loss_table(excess: pl.DataFrame) -> pl.DataFrame:
    """The losses behind the excess: each original's (once per checkpoint) and each model's, by position bucket."""
    buckets = excess.sort("first")["bucket"].unique(maintain_order=True).to_list()
    originals = excess.unique(["source_model", "revision", "source_weights", "bucket"]).select(
        model=pl.format("{} (original)", "revision"), pruning=pl.lit(None, pl.String), healed=pl.lit(None, pl.String),
        revision="revision", bucket="bucket", value="original")
    models = excess.select("model", "pruning", "healed", "revision", "bucket", "value")
    return pl.concat([originals.sort("revision"), models]).pivot(
        on="bucket", index=["model", "pruning", "healed", "revision"], values="value", sort_columns=False
    ).select("model", "pruning", "healed", "revision", *buckets)


def _ends(excess: pl.DataFrame) -> pl.DataFrame:
    """Per model: its excess at position 1 and in its last bucket, that bucket, and whether the last is greater.
    A model without position 1, or with no bucket beyond it, has none."""
    keyed = ["model", "healed", "pruning", "target", "revision", "source_weights"]
    return excess.sort("first").group_by(keyed, maintain_order=True).agg(
        at_first=pl.col("excess").filter(pl.col("first") == 1).first(), at_last=pl.col("excess").last(),
        last_bucket=pl.col("bucket").last(), buckets=pl.len(), starts=pl.col("first").min(),
    ).filter((pl.col("starts") == 1) & (pl.col("buckets") >= 2)).with_columns(
        greater=pl.col("at_last") > pl.col("at_first")).sort("target", "model", "revision")


def _quoted(row: dict) -> str:
    return (f"{row['model']} ({row['pruning']}) of {row['revision']}: {num(row['at_first'], '+.3f')} nats at position "
            f"1, {num(row['at_last'], '+.3f')} at positions {row['last_bucket']}")


def long_range_cost(evals: pl.DataFrame, model: str, scanned: dict[str, str | None] | None = None) -> Finding:
    """(f) For each model with only attention layers dropped (not healed) whose position losses compare with its
    original's: the excess loss in the last position bucket against that at position 1; models with only MLPs or
    whole blocks dropped quoted for contrast, not judged.

    Evaluations count as in finding (c): where `scanned` ({revision: weights}) is given, only those whose source
    weights are their checkpoint's scanned ones, the rest left out with a note; None takes every evaluation."""
    mine = evals.filter(pl.col("source_model") == model)
    notes = []
    if scanned is not None:
        marked = of_scans(mine, {r: w for r, w in scanned.items() if w is not None})
        notes.append(left_out(marked.filter(pl.col("task") == TASK)))
        mine = marked.filter(pl.col("unusable").is_null()).select(evals.columns)
    excess = position_excess(mine)
    attention_only = (pl.col("target") == "attention") & pl.col("healed").is_null()
    setting, _ = most_measured(excess.filter(attention_only), mine)  # the text the most judged models have
    notes = [note for note in notes if note]
    if setting is None:
        none = (f"no position losses of a model pruned from {model} with only attention layers dropped are stored "
                f"beside its original's: run {RUN}")
        return Finding(CLAIM, OPEN, "; ".join([none, *notes]), "")
    ends = _ends(of_setting(excess, setting))
    rows = list(ends.filter(attention_only).iter_rows(named=True))
    if not rows:
        return Finding(CLAIM, OPEN, "; ".join([
            f"the position losses of {model}'s models with only attention layers dropped on {_setting(setting)} lack "
            f"position 1 or any bucket beyond it: run {RUN} on sequences of 3 tokens or more", *notes]), "")
    greater = sum(bool(row["greater"]) for row in rows)
    unmeasured = [row for row in rows if not (finite(row["at_first"]) and finite(row["at_last"]))]
    if unmeasured:
        verdict = OPEN
    else:
        verdict = HOLDS if greater == len(rows) else FAILS if greater == 0 else OPEN
    evidence = "excess loss over the original, " + "; ".join(map(_quoted, rows))
    if verdict == OPEN and not unmeasured:
        evidence += f"; greater at long range for {greater} of {count(len(rows), 'model')}: mixed"
    contrast = ends.filter(pl.col("target").is_in(["mlp", "block"]) & pl.col("healed").is_null())
    if contrast.height:
        evidence += "; for contrast (not judged), " + "; ".join(map(_quoted, contrast.iter_rows(named=True)))
    on = (f"next-token loss by position against the original's on {_setting(setting)}, "
          f"{count(len(rows), 'model')} with only attention layers dropped")
    rule = ("holds when the excess loss in the last position bucket is greater than at position 1 for every model with "
            "only attention layers dropped (healed ones aside), fails when it is greater for none")
    return Finding(CLAIM, verdict, "; ".join([evidence, *notes]), basis(on, rule))
