"""Training dynamics against a reference checkpoint: the reference a line of training is drawn against, when each
layer's output settles, since when each layer of the final drop set is redundant, and finding (e): whether layers
become redundant only once their output has settled.

`weight_change_final` and `cka_final` are measured against a reference checkpoint that every row names
(`reference`, `reference_weights`). A store may hold rows against several; a line is drawn against one only.
Frames in; a finding, frames and figures out; no file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
from matplotlib.figure import Figure

from . import plots
from .verdicts import FAILS, HOLDS, OPEN, Finding, checkpoint_name, scored_on
from .statistics import drop_set_overlap, most_covering

DYNAMICS = ("weight_norm", "weight_change_final", "weight_change_prev", "cka_final", "cka_prev")
"""The training-dynamics metrics: a model with none of them stored has no finding (e)."""
FINAL_METRICS = ("weight_change_final", "cka_final")
"""The metrics measured against the line's reference checkpoint, drawn as heatmaps."""
SETTLED = 0.9
"""A layer's output has settled from the first checkpoint where its cka_final is at least this and stays so."""
DROPPED = 0.5
"""The drop set: this share of the layers, the least important at the final checkpoint (as in finding (b))."""
SCAN = "`ckpt-trace scan --metrics cka_final` (or the micro suite's default scan)"
RELATIONS = ("after", "same", "before", "never settled")
"""When a layer of the drop set became redundant: after the checkpoint where it settled, at it, before it, or it
never settled."""
PATTERNS = {"follows": HOLDS, "precedes": FAILS, "mixed": OPEN}
"""(e)'s verdict by the attention layers' pattern."""


@dataclass(frozen=True)
class Reference:
    """The checkpoint a line's `FINAL_METRICS` are drawn against."""

    revision: str
    weights: str | None
    checkpoints: int
    """How many of the line's checkpoints have rows against it."""
    why: str = ""
    """Why it was chosen ('' where no other reference is stored)."""
    others: tuple[str, ...] = ()
    """The other references stored, by name and weights; their rows are left out."""

    def __str__(self) -> str:
        return _named(self.revision, self.weights)


def _named(revision: str | None, weights: str | None) -> str:
    return f"`{revision}`" + (f" (weights {weights[:12]})" if weights else "")


def against_reference(frame: pl.DataFrame) -> tuple[pl.DataFrame, Reference | None]:
    """The rows of `FINAL_METRICS` against one reference checkpoint, the one covering the most revisions (of those
    that cover as many, the one scanned last: see `most_covering`), and that reference (None: no such rows)."""
    part = frame.filter(pl.col("metric").is_in(FINAL_METRICS))
    if not part.height:
        return part, None
    weights, why = most_covering(part, "reference_weights")
    rows = part.filter(pl.col("reference_weights").eq_missing(weights))
    others = part.filter(pl.col("reference_weights").ne_missing(weights)).select("reference", "reference_weights")
    named = [_named(name, other) for name, other in others.unique().sort(pl.all()).rows()]
    return rows, Reference(str(rows["reference"][0]), weights, rows["revision"].n_unique(), why if named else "",
                           tuple(named))


def settling(rows: pl.DataFrame, threshold: float = SETTLED) -> pl.DataFrame:
    """Per module and layer, the first checkpoint from which its `cka_final` is at least `threshold` there and at
    every later one: `settled_revision`, `_order`, `_step`, `_tokens`, null where it never settles (NaN counts as
    below). `rows`: of one reference, as `against_reference` gives them."""
    above = (pl.col("value").fill_nan(None) >= threshold).fill_null(False).cast(pl.Int8)
    return (
        rows.filter(pl.col("metric") == "cka_final").sort("order")
        .with_columns(stays=above.reverse().cum_min().reverse().over("module", "layer"))  # at or above from here on
        .group_by("module", "layer")
        .agg(pl.col("revision", "order", "step", "tokens").filter(pl.col("stays") == 1).first().name.prefix("settled_"))
        .sort("module", "layer")
    )


def redundant_since(frame: pl.DataFrame) -> pl.DataFrame:
    """Per module, each layer of the final checkpoint's drop set (its `drop_count(layers, DROPPED)` least important,
    ranked as `drop_set_overlap` ranks them) and the first checkpoint from which it is among the k least important
    there and at every later one: `k`, `redundant_revision`, `_order`, `_step`, `_tokens`."""
    overlap = drop_set_overlap(frame, fractions=(DROPPED,), modules=plots.MODULE_ORDER)
    among = pl.col("layers").list.contains(pl.col("layer")).cast(pl.Int8)
    return (
        overlap.explode("final_layers").rename({"final_layers": "layer"}).sort("order")
        .with_columns(stays=among.reverse().cum_min().reverse().over("module", "layer"))
        .group_by("module", "layer")
        .agg(pl.col("k").first(),
             pl.col("revision", "order", "step", "tokens").filter(pl.col("stays") == 1).first().name.prefix("redundant_"))
        .sort("module", "layer")
    )


def settling_table(frame: pl.DataFrame, rows: pl.DataFrame) -> pl.DataFrame:
    """Per module and layer, over the checkpoints that have both importance and the reference's cka_final (`rows`, as
    `against_reference` gives them): where its output settled (see `settling`), since when it is redundant where it
    is in the final drop set (see `redundant_since`), and `relation`, one of `RELATIONS` (null outside the drop set)."""
    cka = _grid(frame, rows)
    table = settling(cka)
    if not table.height:
        return table
    redundant = redundant_since(frame.filter((pl.col("metric") == "importance")
                                             & pl.col("revision").is_in(cka["revision"].unique().to_list())))
    settled, since = pl.col("settled_order"), pl.col("redundant_order")
    return table.join(redundant, on=["module", "layer"], how="left").with_columns(
        relation=pl.when(since.is_null()).then(None).when(settled.is_null()).then(pl.lit("never settled"))
        .when(since > settled).then(pl.lit("after")).when(since == settled).then(pl.lit("same"))
        .otherwise(pl.lit("before")))


def _grid(frame: pl.DataFrame, rows: pl.DataFrame) -> pl.DataFrame:
    """The reference's cka_final rows of the checkpoints that have importance too: those `settling_table` compares."""
    scored = frame.filter(pl.col("metric") == "importance")["revision"].unique().to_list()
    return rows.filter((pl.col("metric") == "cka_final") & pl.col("revision").is_in(scored))


def _layers(layers: list[int]) -> str:
    return f"layer{'s' if len(layers) != 1 else ''} {', '.join(map(str, layers))}"


def _pattern(table: pl.DataFrame, module: str) -> tuple[str, str] | None:
    """How a module's drop set became redundant against when it settled: its pattern (a key of `PATTERNS`) and the
    sentence with its numbers; None where the module has no drop set."""
    dropped = table.filter((pl.col("module") == module) & pl.col("relation").is_not_null()).sort("layer")
    if not dropped.height:
        return None
    k = dropped.height
    count = {relation: dropped.filter(pl.col("relation") == relation).height for relation in RELATIONS}
    settled = dropped.filter(pl.col("settled_order").is_not_null())
    if settled.height < 3:
        rho = f"n/a ({settled.height} of its layers settled, fewer than 3)"
    elif settled["settled_order"].n_unique() < 2 or settled["redundant_order"].n_unique() < 2:
        tied = "settled" if settled["settled_order"].n_unique() < 2 else "became redundant"
        rho = f"n/a (every layer {tied} at one checkpoint: no variance)"
    else:
        rho = f"{settled.select(pl.corr('settled_order', 'redundant_order', method='spearman')).item():+.2f}"
    # The rule in whole numbers: at least two thirds of k.
    pattern = "follows" if 3 * (count["after"] + count["same"]) >= 2 * k else \
        "precedes" if 3 * count["before"] >= 2 * k else "mixed"
    never = dropped.filter(pl.col("relation") == "never settled")["layer"].to_list()
    said = {"follows": "redundancy follows settling", "precedes": "redundancy precedes settling",
            "mixed": "the pattern is mixed"}
    return pattern, (
        f"{plots.MODULE_TITLES[module]}: of the final drop set's {k} layers "
        f"({', '.join(map(str, dropped['layer'].to_list()))}), {count['after']} became redundant after settling, "
        f"{count['same']} at the checkpoint of settling, {count['before']} before settling"
        + (f", {len(never)} never settled ({_layers(never)})" if never else "")
        + f"; Spearman ρ between the checkpoint where each settled and the one from which it is redundant: {rho}; "
        f"so {said[pattern]}")


RULE = (f"redundancy follows settling when at least two thirds of the drop set's layers (the half least important "
        f"at the final checkpoint) became redundant at or after the checkpoint where they settled (cka_final at least "
        f"{SETTLED} there and at every later checkpoint), precedes it when at least two thirds became redundant before; "
        "else mixed; a layer that never settles counts for neither; holds when it follows for attention, fails when "
        "it precedes")


def redundancy_after_settling(frame: pl.DataFrame, rows: pl.DataFrame, reference: Reference | None) -> Finding:
    """(e) Whether the layers of the final drop set became redundant at or after the checkpoint where their output
    settled (see `RULE`): attention for the verdict, MLP beside it. `rows` and `reference` as `against_reference`
    gives them for `frame` (one model's scores, as `model_scores` gives them)."""
    claim = "(e) redundancy follows settling: layers join the final drop set once their output has settled"
    if reference is None or not rows["metric"].eq("cka_final").any():
        return Finding(claim, OPEN, f"no cka_final is stored for this model: {SCAN} gives it", scored_on(frame))
    table, grid = settling_table(frame, rows), _grid(frame, rows)
    checkpoints = grid["revision"].n_unique()
    against = f"cka_final against {reference}" + (f", chosen as {reference.why}" if reference.why else "")
    if checkpoints < 2:
        return Finding(claim, OPEN, f"{checkpoints} checkpoint{'s' if checkpoints != 1 else ''} with both importance "
                       f"and cka_final against {reference}: this needs two or more", scored_on(frame))
    found = {module: _pattern(table, module) for module in ("attention", "mlp")}
    evidence = "; ".join(sentence for pattern, sentence in filter(None, found.values()))
    verdict = PATTERNS[found["attention"][0]] if found["attention"] else OPEN
    final = grid.filter(pl.col("order") == grid["order"].max()).row(0, named=True)
    basis = (f"{against}; the drop set of {checkpoint_name(final)}, over {checkpoints} checkpoints with both importance "
             f"and cka_final, {table['layer'].n_unique()} layers; {scored_on(frame)}; {RULE}")
    return Finding(claim, verdict, evidence or "no attention or MLP layer has a drop set", basis)


@dataclass
class DynamicsSection:
    """What a model's section shows of training dynamics against its reference."""

    intro: str
    figures: dict[str, tuple[str, Figure]] = field(default_factory=dict)
    tables: dict[str, tuple[str, pl.DataFrame]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def dynamics_section(frame: pl.DataFrame, color_scale: str = "linear") -> tuple[DynamicsSection | None, Finding | None]:
    """The training-dynamics part of one model's section (None where no `FINAL_METRICS` are stored) and finding (e)
    (None where no `DYNAMICS` metric is), from one model's scores as `model_scores` gives them."""
    rows, reference = against_reference(frame)
    scanned = frame["metric"].is_in(DYNAMICS).any()
    finding = redundancy_after_settling(frame, rows, reference) if scanned else None
    if reference is None:
        return None, finding
    of = frame["revision"].n_unique()
    rest = " (the others have no rows against it and are left out here)" if reference.checkpoints < of else ""
    section = DynamicsSection(f"Measured against {reference}, the reference of {reference.checkpoints} of the {of} "
                              f"checkpoints drawn{rest}.")
    if reference.others:
        section.notes.append(f"training dynamics against other references ({', '.join(reference.others)}) are left "
                             f"out; this report uses {reference}: {reference.why}")
    for metric in FINAL_METRICS:
        if rows["metric"].eq(metric).any():
            title = f"{plots.METRIC_TITLES[metric]}, reference {reference.revision}"
            cka = metric == "cka_final"  # in [0, 1]: one scale for all, where 0.99 does not look like 0
            section.figures[f"{metric}_heatmaps"] = (
                f"{plots.METRIC_TITLES[metric]}, reference {reference}: layer by checkpoint, "
                + ("every module on one linear colour scale from 0 to 1" if cka else
                   f"each module on its own {color_scale} colour scale as above"),
                plots.heatmaps(rows, metric, title, scale=color_scale, limits=(0.0, 1.0) if cka else None))
    table, grid = settling_table(frame, rows), _grid(frame, rows)
    if not grid.height:
        section.notes.append(f"no cka_final against {reference} is stored with importance: the settling figure is not "
                             f"drawn; {SCAN} gives it")
    elif grid["revision"].n_unique() < 2:
        section.notes.append(f"the settling figure needs two or more checkpoints with both importance and cka_final "
                             f"against {reference}; 1 has them")
    elif table["relation"].drop_nulls().len():
        caption = (f"where each layer of the final drop set settled (cka_final at least {SETTLED} against {reference} "
                   "from there on) against since when it is redundant (among the half least important from there on); "
                   "on the diagonal, both at once")
        section.figures["settling"] = (caption, plots.settling(table, plots.training_position(grid)))
    if table.height:
        section.tables["settling"] = (
            "where each layer's output settled and, for the final drop set, since when it is redundant",
            table.sort(pl.col("module").replace_strict({m: i for i, m in enumerate(plots.MODULE_ORDER)}), "layer")
            .select("module", "layer", pl.col("settled_revision").alias("settled at"),
                    pl.col("redundant_revision").alias("redundant since"), "relation"))
    return section, finding
