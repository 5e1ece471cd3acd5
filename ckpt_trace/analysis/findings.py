"""Findings: the papers' claims, checked against one model's stored scores and evaluations.

(a) Attention layers are more redundant than MLP layers, the deeper ones most (He et al.).
(b) The pattern is there early in training and stays (He et al.'s checkpoints).
(c) Dropping half the attention layers costs little quality and speeds decoding (both papers): in
    `ckpt_trace.analysis.payoff`.
(d) The cheap score picks the layers that matter: its ranking agrees with `ablation_loss`, the
    loss that removing each module costs, and since when in training.
(e) A layer becomes redundant once its output has settled: in `ckpt_trace.analysis.dynamics`,
    from the training-dynamics metrics.
(f) Dropping attention costs more at long range than at short: the excess loss of a model with
    attention layers dropped, by position, in `ckpt_trace.analysis.positions`.

(a) to (d) are the papers'; (e) and (f) are questions this project adds. The report adds (e) and (f)
to the four `findings` gives.

Each finding is a verdict (holds, does not hold, inconclusive), by a rule stated in its text,
with the numbers behind it and what they rest on: the dtype and calibration set of the scores,
the weights and dtype of the evaluations. A number quoted for a checkpoint is of that checkpoint's
own rows: where the checkpoint lacks a metric the finding says so, and never takes another
checkpoint's. Frames in, findings out; no file I/O.
"""

from __future__ import annotations

import polars as pl

from .payoff import pruning_payoff
from .positions import long_range_cost  # noqa: F401  (finding (f), beside the others)
from .statistics import drop_count, drop_set_overlap, drop_set_settled, rank_consistency
from .verdicts import (
    FAILS,
    HOLDS,
    OPEN,
    Finding,
    basis,
    checkpoint_name,
    count,
    final_checkpoint,
    finite,
    lacking,
    rho,
    rows_at,
    scored_on,
)

EARLY = 0.25
"""(b) holds when the final drop set is stable from this share of training on; fails beyond LATE."""
LATE = 0.5
AGREES = 0.5
"""(d) holds when the final checkpoint's Spearman correlation with ablation_loss reaches this."""


CHEAP_SCORES = ("importance", "update_ratio", "angular_distance")
"""The one-pass scores whose agreement with ablation_loss is measured."""


def redundancy(frame: pl.DataFrame) -> Finding:
    """(a) At the final checkpoint: mean importance of attention against MLP layers, and its trend with depth."""
    claim = "(a) attention layers are more redundant than MLP layers, the deeper ones most"
    if frame.height == 0:
        return Finding(claim, OPEN, "no scores are stored", "")
    final = final_checkpoint(frame)
    importance = rows_at(frame, final["revision"], "importance")
    means = dict(importance.group_by("module").agg(pl.col("value").mean()).rows())
    if not all(finite(means.get(module)) for module in ("attention", "mlp")):
        return Finding(claim, OPEN, lacking(frame, "importance", final) if not importance.height else
                       f"the importance of attention or MLP layers at {checkpoint_name(final)} is missing or not a "
                       "finite number",
                       f"final checkpoint {checkpoint_name(final)}")
    attention = importance.filter(pl.col("module") == "attention")
    depth = attention.select(pl.corr("layer", "value", method="spearman")).item()
    if means["attention"] < means["mlp"] and finite(depth) and depth < 0:
        verdict = HOLDS
    elif means["attention"] > means["mlp"] and finite(depth) and depth > 0:
        verdict = FAILS
    else:
        verdict = OPEN
    evidence = (f"mean importance of attention layers {means['attention']:.4f} against MLP layers {means['mlp']:.4f}; "
                f"Spearman ρ of attention importance with depth {rho(depth)}")
    costs = dict(rows_at(frame, final["revision"], "ablation_loss").group_by("module").agg(pl.col("value").mean()).rows())
    if all(finite(costs.get(module)) for module in ("attention", "mlp")):
        evidence += (f"; removing one attention layer costs {costs['attention']:.4f} nats of loss on average, "
                     f"one MLP {costs['mlp']:.4f}")
    elif frame["metric"].eq("ablation_loss").any():
        evidence += f"; {lacking(frame, 'ablation_loss', final)}, so no cost of removing a layer is quoted"
    rule = "holds when attention is below MLP and falls with depth, fails when both are the other way"
    return Finding(claim, verdict, evidence,
                   basis(f"final checkpoint {checkpoint_name(final)}, {attention.height} layers", scored_on(frame), rule))


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
    final = final_checkpoint(frame)
    if not importance["revision"].eq(final["revision"]).any():
        return Finding(claim, OPEN, f"{lacking(frame, 'importance', final)}: the final drop set is not known", "")
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
    agreeing = f"mean {late.mean():.2f}, lowest {late.min():.2f}" if late.len() else rho(None)
    evidence = (f"the final checkpoint's {drop_count(n_layers, 0.5)} least important attention layers "
                f"{list(row['final_layers'])} are the least important from {row['settled_revision']} on"
                + (f" ({', '.join(seen)})" if seen else "")
                + f"; Spearman ρ of the attention ranking with the final one over the second half of training: "
                f"{agreeing}")
    rule = f"holds when stable from {EARLY:.0%} of training or earlier, fails when only after {LATE:.0%}"
    return Finding(claim, verdict, evidence, basis(f"{checkpoints} checkpoints, {n_layers} layers", scored_on(frame), rule))


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
    final = final_checkpoint(frame)
    truth = agreement(frame)
    table = truth.filter(pl.col("score") == "importance")
    at_final = table.filter(pl.col("revision") == final["revision"])
    if not at_final.height:
        missing = [lacking(frame, metric, final) for metric in ("ablation_loss", "importance")
                   if not rows_at(frame, final["revision"], metric).height]
        return Finding(claim, OPEN, f"{' and '.join(missing) or 'no agreement is measured'}, the final checkpoint: "
                       f"{scan} at {final['revision']}", scored_on(frame))
    at_end = at_final["spearman"][0]
    good = (table["spearman"].fill_nan(-1.0) >= AGREES).cast(pl.Int8).reverse().cum_min().reverse()
    since = table.filter(good == 1)
    others = dict(truth.filter((pl.col("score") != "importance") & (pl.col("revision") == final["revision"]))
                  .select("score", "spearman").rows())
    said = [f"{score}: {rho(others[score])}" if score in others else f"no {score} at {final['revision']}"
            for score in CHEAP_SCORES[1:] if score in others or frame["metric"].eq(score).any()]
    evidence = (f"Spearman ρ of importance with ablation_loss over every layer and module at {checkpoint_name(final)}: "
                f"{rho(at_end)}"
                + (f" ({', '.join(said)})" if said else "")
                + (f"; at least {AGREES} from {since['revision'][0]} on" if since.height else f"; never {AGREES} for good"))
    verdict = OPEN if not finite(at_end) else HOLDS if at_end >= AGREES else FAILS if at_end <= 0 else OPEN
    n = rows_at(frame, final["revision"], "ablation_loss").select("layer", "module").n_unique()
    rule = f"holds when ρ reaches {AGREES} at the final checkpoint, fails when it is 0 or below"
    return Finding(claim, verdict, evidence, basis(f"{count(table.height, 'checkpoint')} with ablation_loss, "
                                                    f"{n} modules at {checkpoint_name(final)}", scored_on(frame), rule))


def weights_by_revision(frame: pl.DataFrame) -> dict[str, str | None]:
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
            pruning_payoff(evals, model, n_layers, curve, checkpoint, weights_by_revision(frame)),
            cheap_versus_truth(frame)]
