"""Findings: the papers' claims, checked against one model's stored scores and evaluations.

(a) Attention layers are more redundant than MLP layers, the deeper ones most (He et al.).
(b) The pattern is there early in training and stays (He et al.'s checkpoints).
(c) Dropping half the attention layers costs little quality and speeds decoding (both papers).
(d) The cheap score picks the layers that matter: its ranking agrees with `ablation_loss`, the
    loss that removing each module costs, and since when in training.

Each finding is a verdict (holds, does not hold, inconclusive), by a rule stated in its text,
with the numbers behind it and what they rest on. Frames in, findings out; no file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from .statistics import (
    PRUNED_MODEL,
    drop_count,
    drop_set_overlap,
    drop_set_settled,
    pruned_vs_original,
    rank_consistency,
)

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


@dataclass(frozen=True)
class Finding:
    claim: str
    verdict: str
    evidence: str
    basis: str


def _final(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("order") == pl.col("order").max())


def _label(frame: pl.DataFrame) -> str:
    row = frame.row(0, named=True)
    plain = row["step"] is None or row["revision"] == f"step{row['step']}"
    return row["revision"] + ("" if plain else f" (step {row['step']:,})")


def redundancy(frame: pl.DataFrame) -> Finding:
    """(a) At the final checkpoint: mean importance of attention against MLP layers, and its trend with depth."""
    claim = "(a) attention layers are more redundant than MLP layers, the deeper ones most"
    final = _final(frame.filter(pl.col("metric") == "importance"))
    if final.height == 0:
        return Finding(claim, OPEN, "no importance scores are stored", "")
    means = dict(final.group_by("module").agg(pl.col("value").mean()).rows())
    attention = final.filter(pl.col("module") == "attention")
    depth = attention.select(pl.corr("layer", "value", method="spearman")).item()
    if means["attention"] < means["mlp"] and depth < 0:
        verdict = HOLDS
    elif means["attention"] > means["mlp"] and depth > 0:
        verdict = FAILS
    else:
        verdict = OPEN
    evidence = (f"mean importance of attention layers {means['attention']:.4f} against MLP layers {means['mlp']:.4f}; "
                f"Spearman ρ of attention importance with depth {depth:+.2f}")
    truth = _final(frame.filter(pl.col("metric") == "ablation_loss"))
    if truth.height:
        costs = dict(truth.group_by("module").agg(pl.col("value").mean()).rows())
        evidence += (f"; removing one attention layer costs {costs['attention']:.4f} nats of loss on average, "
                     f"one MLP {costs['mlp']:.4f}")
    rule = "holds when attention is below MLP and falls with depth, fails when both are the other way"
    return Finding(claim, verdict, evidence, f"final checkpoint {_label(final)}, {attention.height} layers; {rule}")


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
    n_layers = importance["layer"].n_unique()
    settled = drop_set_settled(drop_set_overlap(importance, fractions=(0.5,), modules=("attention",)))
    row = settled.row(0, named=True)
    share, by = _share(frame, row["settled_revision"])
    consistency = rank_consistency(importance).filter(pl.col("module") == "attention")
    late = consistency.filter(pl.col("order") >= consistency["order"].max() / 2)["spearman"].drop_nans()
    tokens = frame.filter(pl.col("revision") == row["settled_revision"])["tokens"][0]
    seen = [f"{tokens:,} tokens seen"] if tokens is not None else []
    seen += [f"{share:.0%} of training by {by}"] if share is not None else []
    verdict = OPEN if share is None else HOLDS if share <= EARLY else FAILS if share > LATE else OPEN
    evidence = (f"the final checkpoint's {drop_count(n_layers, 0.5)} least important attention layers "
                f"{list(row['final_layers'])} are the least important from {row['settled_revision']} on"
                + (f" ({', '.join(seen)})" if seen else "")
                + f"; Spearman ρ of the attention ranking with the final one over the second half of training: "
                f"mean {late.mean():.2f}, lowest {late.min():.2f}")
    rule = f"holds when stable from {EARLY:.0%} of training or earlier, fails when only after {LATE:.0%}"
    return Finding(claim, verdict, evidence, f"{checkpoints} checkpoints, {n_layers} layers; {rule}")


def _dropped_attention(pruning: str) -> int | None:
    """How many attention layers a pruning label (``attention [3, 4, 5] (similarity)``) says were dropped, if only those."""
    if not pruning.startswith("attention [") or "mlp" in pruning or "block" in pruning:
        return None
    return len(pruning.split("[", 1)[1].split("]", 1)[0].split(","))


def pruning_payoff(evals: pl.DataFrame, model: str, n_layers: int, curve: pl.DataFrame | None = None,
                   checkpoint: tuple[str, str | None] | None = None) -> Finding:
    """(c) Half the attention layers dropped: perplexity kept (on the pruning curve by similarity, where one is stored,
    else of an evaluated pruned model) and decode speedup (of an evaluated pruned model).

    Both are of one checkpoint: with a curve, the speed is of a model pruned from the curve's `checkpoint` (its
    revision and weights; a model whose manifest predates recorded weights is taken at its revision's word);
    without, quality and speed are of one pruned model, where one has both."""
    claim = "(c) dropping half the attention layers costs little quality and speeds decoding"
    half = n_layers // 2
    comparison = pruned_vs_original(evals.filter(pl.col("source_model") == model)) if evals.height else evals
    labels = [p for p in (comparison["pruning"].unique().to_list() if comparison.height else [])
              if _dropped_attention(p) == half]
    rows = comparison.filter(pl.col("pruning").is_in(labels)) if labels else comparison.head(0)
    quality = rows.filter(pl.col("metric") == "perplexity")
    speed = rows.filter(pl.col("metric") == "decode_tokens_per_s")
    point = curve.filter((pl.col("target") == "attention") & (pl.col("k") == half)) if curve is not None else None
    parts, basis = [], []
    kept = speedup = None
    if point is not None and point.height and "similarity" in point.columns:
        if checkpoint is not None:
            revision, weights = checkpoint
            same = pl.col("revision") == revision
            if weights is not None:
                same = same & (pl.col("source_weights").is_null() | (pl.col("source_weights") == weights))
            rows = rows.filter(same)  # the accuracies quoted too
            speed = speed.filter(same)
        row = point.row(0, named=True)
        kept = row["original"] / row["similarity"]
        others = ", ".join(f"{s} {row['original'] / row[s]:.0%}" for s in ("oracle", "last", "random") if row.get(s))
        at = f"at {checkpoint[0]}, " if checkpoint is not None else ""
        parts.append(f"{at}with {half} of {n_layers} attention layers dropped by similarity, perplexity {row['original']:.2f} -> "
                     f"{row['similarity']:.2f} ({kept:.0%} of the original's quality kept; {others}"
                     f"{' (geometric mean of ' + _count(row['seeds'], 'seed') + ')' if row.get('seeds') else ''})")
        basis.append("the pruning curve")
    elif quality.height:
        paired = quality.join(speed.select(PRUNED_MODEL), on=PRUNED_MODEL, how="semi", nulls_equal=True)
        best = (paired if paired.height else quality).sort("relative", descending=True).row(0, named=True)
        speed = speed.filter(pl.all_horizontal(pl.col(c).eq_missing(best[c]) for c in PRUNED_MODEL))
        kept = best["relative"]
        parts.append(f"pruned model {best['model']} ({best['pruning']}): perplexity {best['original']:.2f} -> {best['value']:.2f} "
                     f"({kept:.0%} of the original's quality kept)")
    for row in rows.filter(pl.col("metric") == "acc").sort("task", "model").iter_rows(named=True):
        spread = lambda value, stderr: f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")  # noqa: E731
        parts.append(f"pruned model {row['model']}: {row['task']} accuracy {spread(row['original'], row['original_stderr'])} -> "
                     f"{spread(row['value'], row['stderr'])} ({row['n']} items, ± one standard error)")
    if speed.height:
        speedup = speed["relative"].max()
        fastest = speed.sort("relative").row(-1, named=True)
        parts.append(f"decode {speedup:.2f}x as fast ({fastest['model']}, pruned from {fastest['revision']})")
        basis.append(_count(speed["model"].n_unique(), "evaluated pruned model"))
    if kept is None and speedup is None:
        return Finding(claim, OPEN, f"no pruning curve (`ckpt-trace curves`) and no model pruned from {model} with "
                       f"{half} of its {n_layers} attention layers dropped evaluated beside the original (`ckpt-trace "
                       "eval --perplexity --speed`) is stored", "")
    if kept is not None and kept < KEPT:
        verdict = FAILS
    elif kept is None or speedup is None:
        verdict = OPEN
        parts.append("no " + ("perplexity" if kept is None else "decode speed") + " of such a model is stored")
    else:
        verdict = HOLDS if speedup > 1 else FAILS
    rule = f"holds when {KEPT:.0%} of the quality is kept and decoding is faster"
    return Finding(claim, verdict, "; ".join(parts), "; ".join([" and ".join(basis)] * bool(basis) + [rule]))


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'s' if n != 1 else ''}"


def agreement(frame: pl.DataFrame) -> pl.DataFrame:
    """Per checkpoint: Spearman correlation, over every layer and module, of each cheap score with ablation_loss."""
    wide = frame.filter(pl.col("metric").is_in([*CHEAP_SCORES, "ablation_loss"])).pivot(
        on="metric", index=["revision", "order", "step", "tokens", "layer", "module"], values="value")
    if "ablation_loss" not in wide.columns:
        return pl.DataFrame(schema={"revision": pl.String, "order": pl.Int64, "step": pl.Int64, "tokens": pl.Int64,
                                    "score": pl.String, "spearman": pl.Float64})
    pieces = [
        wide.group_by("revision").agg(pl.col("order", "step", "tokens").first(),
                                      spearman=pl.corr(score, "ablation_loss", method="spearman")).with_columns(
            score=pl.lit(score))
        for score in CHEAP_SCORES if score in wide.columns
    ]
    return pl.concat(pieces).select("revision", "order", "step", "tokens", "score", "spearman").sort("score", "order")


def cheap_versus_truth(frame: pl.DataFrame) -> Finding:
    """(d) Whether importance ranks layers and modules as removing them costs, at the end and since when."""
    claim = "(d) importance picks the modules that matter: it ranks them as ablation_loss does"
    table = agreement(frame).filter(pl.col("score") == "importance")
    if table.height == 0:
        return Finding(claim, OPEN, "no ablation_loss is stored: scan with --metrics importance,update_ratio,ablation_loss", "")
    final = table.row(-1, named=True)
    good = (table["spearman"].fill_nan(-1.0) >= AGREES).cast(pl.Int8).reverse().cum_min().reverse()
    since = table.filter(good == 1)
    others = agreement(frame).filter(pl.col("score") != "importance").sort("order").group_by(
        "score", maintain_order=True).last().sort(pl.col("score").replace_strict(
            {s: i for i, s in enumerate(CHEAP_SCORES)}, return_dtype=pl.Int64))
    evidence = (f"Spearman ρ of importance with ablation_loss over every layer and module at {final['revision']}: "
                f"{final['spearman']:+.2f}"
                + (" (" + ", ".join(f"{s}: {r:+.2f}" for s, r in others.select("score", "spearman").rows()) + ")"
                   if others.height else "")
                + (f"; at least {AGREES} from {since['revision'][0]} on" if since.height else f"; never {AGREES} for good"))
    verdict = HOLDS if final["spearman"] >= AGREES else FAILS if final["spearman"] <= 0 else OPEN
    n = frame.filter(pl.col("metric") == "ablation_loss").select("layer", "module").n_unique()
    rule = f"holds when ρ reaches {AGREES} at the final checkpoint, fails when it is 0 or below"
    return Finding(claim, verdict, evidence, f"{table.height} checkpoints, {n} modules each; {rule}")


def findings(frame: pl.DataFrame, evals: pl.DataFrame, model: str, curve: pl.DataFrame | None = None,
             checkpoint: tuple[str, str | None] | None = None) -> list[Finding]:
    """The four findings for one model's scores (as `analysis.model_scores` gives them), the store's evaluations and
    the model's pruning curve (as `ckpt_trace.pruning.curves.summary` gives it), if any, measured on `checkpoint` (its
    revision and weights)."""
    n_layers = frame["layer"].n_unique()
    return [redundancy(frame), persistence(frame), pruning_payoff(evals, model, n_layers, curve, checkpoint),
            cheap_versus_truth(frame)]
