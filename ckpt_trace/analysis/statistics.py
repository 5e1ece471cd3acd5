"""Analysis of stored scores: polars frames in, polars frames out, no file I/O.

The questions, per model: how each layer's score moves over training; whether the
ranking of layers is consistent across training (Spearman rank correlation of every
checkpoint's ranking with the final checkpoint's); and when the set of layers one would
drop emerges (Jaccard overlap of the k least important layers with the final
checkpoint's, and the earliest checkpoint from which they stay the same).
"""

from __future__ import annotations

import polars as pl

from ..errors import ConfigError
from ..fetch.revisions import lines, parse_revision, place

DROP_FRACTIONS = (0.25, 0.5)


def training_line(revisions: list[tuple[str, str | None]], branch: str | None = None) -> list[str]:
    """The revisions, given as (name, commit), of one line of training in order: the trunk, or the side line
    `branch` with the trunk into it (see `ckpt_trace.fetch.revisions`). A run whose names fit no scheme (one model,
    revision main) is one line of all of them. Raises `ConfigError` for a `branch` the revisions do not have."""
    placed = place([parse_revision(name, commit=commit) for name, commit in revisions])
    by_line = lines(placed)
    if branch is not None and branch not in by_line:
        sides = sorted(name for name in by_line if name is not None)
        raise ConfigError(f"no side line {branch!r} among the revisions; side lines: {', '.join(sides) or 'none'}")
    return [r.name for r in (by_line[branch] or placed)]


def side_lines(revisions: list[str]) -> list[str]:
    """The side lines of training (OLMo-2's ingredients, say) that the named revisions hold, in name order."""
    return sorted(name for name in lines(place([parse_revision(r) for r in revisions])) if name is not None)


def most_covering(frame: pl.DataFrame, column: str) -> tuple[object, str]:
    """The value of `column` under which most revisions are scored, and why it was chosen: it covers the most
    revisions, or, among values that cover as many, it was scanned last."""
    if not frame.height:
        return None, ""
    # In frame order, and sorted stably: of values that tie on both, the first (a scan's new rows lead its file).
    counts = frame.group_by(column, maintain_order=True).agg(pl.col("revision").n_unique().alias("n"),
                                                              pl.col("created").max())
    counts = counts.sort(["n", "created"], descending=True, nulls_last=True, maintain_order=True)
    n = counts["n"][0]
    tied = counts.filter(pl.col("n") == n).height
    why = (f"it covers the most revisions ({n})" if tied == 1 else
           f"it covers as many revisions ({n}) as {tied - 1} other{'s' if tied > 2 else ''} and was scanned last")
    return counts[column][0], why


def latest_scans(frame: pl.DataFrame) -> pl.DataFrame:
    """Per revision, only the rows of its latest scan: of the file (weights, dtype, calibration set, scorer) written
    last, every row, whatever time each row bears (rows an earlier scan measured against another reference, say).

    A store keeps the scores of earlier weights beside the new ones; analysis takes one scan
    per revision, never a mix.
    """
    key = ["weights", "dtype", "calibration", "scorer"]
    files = frame.group_by("revision", *key).agg(pl.col("created").max())
    latest = files.sort("created", nulls_last=False).group_by("revision").last().drop("created")
    return frame.join(latest, on=["revision", *key], nulls_equal=True)


def model_sources(scores: pl.DataFrame, revisions: pl.DataFrame, model: str) -> list[str | None]:
    """The sources (folders, Hub repos) a model's rows were read from, in name order: two folders of one name are
    two models. [None] for a store written before sources were recorded."""
    found = set(scores.filter(pl.col("model") == model)["source"].drop_nulls()) | \
        set(revisions.filter(pl.col("model") == model)["source"].drop_nulls())
    return sorted(found) or [None]


def source_rows(scores: pl.DataFrame, revisions: pl.DataFrame, model: str, source: str | None) -> pl.DataFrame:
    """The scores of one model read from one source: rows it wrote, and rows of the same revision and weights that
    another source (or a scan before sources were recorded) wrote, since scores are stored by content."""
    mine = scores.filter(pl.col("model") == model)
    if source is None:
        return mine
    seen = revisions.filter((pl.col("model") == model) & (pl.col("source") == source)).select("revision", "weights")
    return mine.filter(pl.col("source") == source).vstack(
        mine.filter(pl.col("source").ne_missing(source)).join(seen.unique(), on=["revision", "weights"], how="semi")
    )


DRAWN = {"disk": "the weights on disk", "copy": "the weights on disk, a copy of another revision's",
         "not scanned": "the latest scan: the weights on disk have none", "latest": "the latest scan"}
"""How a revision's rows were chosen (the `drawn` column of `model_scores`), in words."""


def on_disk_scans(frame: pl.DataFrame, on_disk: dict[str, str] | None) -> pl.DataFrame:
    """Per revision, the rows of the scan of the weights now on disk (`on_disk`: {revision: fingerprint}; None where
    the source is not on this machine) where one is stored, else of its latest scan; a revision whose weights on
    disk are a copy of another scanned revision's is drawn from that one's rows, under its own name. A `drawn`
    column says which (a key of `DRAWN`); `copied_from` names the revision a copy's rows are of."""
    latest = latest_scans(frame).with_columns(drawn=pl.lit("latest"), copied_from=pl.lit(None, pl.String))
    if on_disk is None:
        return latest
    pieces = []
    for revision in frame["revision"].unique(maintain_order=True).to_list():
        wanted = on_disk.get(revision)
        own = frame.filter((pl.col("revision") == revision) & (pl.col("weights") == wanted))
        copied = frame.filter(pl.col("weights") == wanted)
        if wanted is not None and own.height:
            pieces.append(latest_scans(own).with_columns(drawn=pl.lit("disk"), copied_from=pl.lit(None, pl.String)))
        elif wanted is not None and copied.height:
            copied = latest_scans(copied)
            origin = copied["revision"][0]
            mine = latest.filter(pl.col("revision") == revision).row(0, named=True)  # its own name, step and tokens
            pieces.append(copied.filter(pl.col("revision") == origin).with_columns(
                *(pl.lit(mine[c], frame.schema[c]).alias(c) for c in ("revision", "commit", "step", "tokens", "branch")),
                drawn=pl.lit("copy"), copied_from=pl.lit(origin)))
        else:
            pieces.append(latest.filter(pl.col("revision") == revision).with_columns(
                drawn=pl.lit("not scanned" if wanted is not None else "latest")))
    return pl.concat(pieces, how="vertical_relaxed") if pieces else latest


def model_scores(scores: pl.DataFrame, model: str, calibration: str | None = None, dtype: str | None = None,
                 branch: str | None = None, from_fork: bool = False, on_disk: dict[str, str] | None = None) -> pl.DataFrame:
    """One model's scores, one scan per revision, on one line of training, with an `order` column.

    The calibration set, dtype and scorer version are those covering the most revisions (ties: the one scanned
    last; a file written before scorer versions were recorded counts as version 1); per revision, the scan of the
    weights now on disk where `on_disk` ({revision: fingerprint}) names them, else its latest scan, as its `drawn`
    column says (see `on_disk_scans`); the revisions of the trunk, or of the side line `branch` with the trunk into it (`from_fork`: from the
    trunk's checkpoint it forks from). Give `scores` of one source (see `source_rows`).
    """
    frame = scores.filter(pl.col("model") == model).with_columns(pl.col("scorer").fill_null(1))
    frame = frame.filter(pl.col("calibration") == (calibration or most_covering(frame, "calibration")[0]))
    frame = frame.filter(pl.col("dtype") == (dtype or most_covering(frame, "dtype")[0]))
    frame = frame.filter(pl.col("scorer") == most_covering(frame, "scorer")[0])
    frame = on_disk_scans(frame, on_disk)
    named = frame.select("revision", "commit").unique("revision", keep="first").rows()
    line = training_line(named, branch)
    if from_fork and branch is not None:
        own = next(i for i, name in enumerate(line) if parse_revision(name).branch == branch)
        line = line[max(own - 1, 0):]
    rank = {name: i for i, name in enumerate(line)}
    frame = frame.filter(pl.col("revision").is_in(list(rank)))
    return frame.with_columns(order=pl.col("revision").replace_strict(rank, return_dtype=pl.Int64)).sort(
        "order", "module", "layer"
    )


def checkpoint_labels(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per revision in training order: revision, order, step, tokens, and a short axis label."""
    return (
        frame.group_by("revision").agg(pl.col("order", "step", "tokens").first()).sort("order")
        .with_columns(label=pl.when(pl.col("step").is_not_null()).then(pl.col("step").cast(pl.String)).otherwise(pl.col("revision")))
    )


def layer_matrix(frame: pl.DataFrame, module: str, metric: str) -> pl.DataFrame:
    """Layers (rows) by revisions (columns, in training order) of one module's metric."""
    part = frame.filter((pl.col("module") == module) & (pl.col("metric") == metric))
    columns = checkpoint_labels(part)["revision"].to_list()
    wide = part.pivot(on="revision", index="layer", values="value").sort("layer")
    return wide.select("layer", *columns)


def _with_final(frame: pl.DataFrame, metric: str, modules: tuple[str, ...]) -> pl.DataFrame:
    part = frame.filter((pl.col("metric") == metric) & pl.col("module").is_in(modules))
    final = part.filter(pl.col("order") == pl.col("order").max()).select("module", "layer", final=pl.col("value"))
    return part.join(final, on=["module", "layer"])


def rank_consistency(frame: pl.DataFrame, metric: str = "importance") -> pl.DataFrame:
    """Spearman correlation of each checkpoint's layer ranking with the final checkpoint's, per module."""
    part = _with_final(frame, metric, ("attention", "mlp", "block"))
    keys = ["module", "revision"]
    return (
        part.group_by(keys)
        .agg(pl.col("order", "step", "tokens").first(), pl.corr("value", "final", method="spearman").alias("spearman"))
        .sort("module", "order")
    )


def best_spans(frame: pl.DataFrame, metric: str = "span_distance") -> pl.DataFrame:
    """Per checkpoint and span length n: the run of n blocks whose input and output are closest (the least
    span distance), the run Gromov et al. remove: its first and last layer and its distance."""
    part = frame.filter(pl.col("metric") == metric)
    return (
        part.with_columns(n=pl.col("module").str.strip_prefix("span").cast(pl.Int64))
        .sort("value", "layer").group_by("revision", "n", maintain_order=True).first()
        .select("revision", "order", "step", "tokens", "n", first_layer="layer", last_layer=pl.col("layer") + pl.col("n") - 1,
                distance="value")
        .sort("order", "n")
    )


def drop_count(n_layers: int, fraction: float) -> int:
    """How many layers a fraction of `n_layers` is, rounded half up, at least one."""
    return max(1, int(fraction * n_layers + 0.5))


def drop_set_overlap(
    frame: pl.DataFrame, fractions=DROP_FRACTIONS, modules=("attention", "mlp"), metric: str = "importance"
) -> pl.DataFrame:
    """Jaccard overlap of each checkpoint's k least important layers with the final checkpoint's."""
    part = frame.filter((pl.col("metric") == metric) & pl.col("module").is_in(modules))
    n_layers = part["layer"].n_unique()
    final_order = part["order"].max()
    pieces = []
    for fraction in fractions:
        k = drop_count(n_layers, fraction)
        lowest = (
            part.sort("value", "layer").group_by("module", "revision", maintain_order=True).head(k)
            .group_by("module", "revision").agg(pl.col("order", "step", "tokens").first(),
                                                pl.col("layer").sort().alias("layers"))
        )
        final = lowest.filter(pl.col("order") == final_order).select("module", final_layers=pl.col("layers"))
        pieces.append(
            lowest.join(final, on="module").with_columns(
                fraction=pl.lit(fraction),
                k=pl.lit(k),
                jaccard=pl.col("layers").list.set_intersection("final_layers").list.len()
                / pl.col("layers").list.set_union("final_layers").list.len(),
            )
        )
    if not pieces:
        return pl.DataFrame()
    return pl.concat(pieces).select(
        "module", "fraction", "k", "revision", "order", "step", "tokens", "layers", "final_layers", "jaccard"
    ).sort("module", "fraction", "order")


def drop_set_settled(overlap: pl.DataFrame) -> pl.DataFrame:
    """Per module and fraction: the earliest checkpoint from which the drop set equals the final one for good."""
    return (
        overlap.sort("order")
        .with_columns(
            # Still equal from here to the end: a reversed cumulative minimum of "equal".
            settled=(pl.col("jaccard") == 1.0).cast(pl.Int8).reverse().cum_min().reverse().over("module", "fraction")
        )
        .filter(pl.col("settled") == 1)
        .group_by("module", "fraction", "k")
        .agg(pl.col("revision", "step").first().name.prefix("settled_"), pl.col("final_layers").first())
        .sort("module", "fraction")
    )


# Which way is better, per metric: quality kept and speedup are both "higher is better" ratios.
_LOWER_IS_BETTER = {"perplexity", "prefill_latency_s", "kv_cache_bytes", "peak_memory_bytes"}


def pruned_vs_original(evals: pl.DataFrame) -> pl.DataFrame:
    """Each pruned model's latest results beside its original's, with `relative` (> 1 is better).

    A result is compared only with the original's on the same task, shots, number of items, text (for
    perplexity), dtype and device: a bfloat16 pruned model is not measured against a float32 original. The
    original is the model it was pruned from, by weights: a checkpoint re-published under the same name, or
    another directory of that name, is another model. Results stored before weights were recorded (null) are
    compared among themselves only.
    """
    # On the CPU, peak memory is the process's high-water mark, which only grows from one model to the next; the
    # spread of a timing is no quality of the model, and a ratio of two spreads means nothing.
    comparable = ~((pl.col("metric") == "peak_memory_bytes") & pl.col("device").str.starts_with("cpu")) & \
        ~pl.col("metric").str.ends_with("_spread")
    if "healed" not in evals.columns:  # a frame of a store written before healing was recorded
        evals = evals.with_columns(healed=pl.lit(None, pl.String))
    setting = ["task", "metric", "num_fewshot", "data", "dtype", "device"]
    latest = evals.filter(comparable).sort("created").group_by("model", "path", "weights", *setting, "n").last()
    keys = ["source_model", "revision", "source_weights", *setting, "n"]
    # A healed model keeps its pruned model's label: it is no original, and another model than the one it was
    # healed from (its own weights).
    original = pl.col("pruning").is_null() & pl.col("healed").is_null()
    originals = latest.filter(original).sort("created").group_by(keys).agg(
        original=pl.col("value").last(), original_stderr=pl.col("stderr").last())
    pruned = latest.filter(~original)
    lower = pl.col("metric").is_in(list(_LOWER_IS_BETTER)) | (pl.col("task") == "position_loss")
    return (
        pruned.join(originals, on=keys, nulls_equal=True)
        .with_columns(relative=pl.when(lower).then(pl.col("original") / pl.col("value"))
                      .otherwise(pl.col("value") / pl.col("original")))
        .select("source_model", "revision", "source_weights", "model", "pruning", "healed", "dtype", "device", "task",
                "metric", "n", "value", "stderr", "original", "original_stderr", "relative")
        .sort("source_model", "model", "healed", "dtype", "device", "task", "metric", nulls_last=False)
    )


PRUNED_MODEL = ["model", "healed", "revision", "source_weights", "dtype", "device"]
"""The columns of `pruned_vs_original` that name one pruned model, measured alike: its quality and its speed go
together only within them. A healed model is another model than the one it was healed from, whatever its name."""

TARGETS = ("attention", "mlp", "block", "joint")
"""What a pruned model had dropped, by its pruning label: only attention layers, only MLPs, only whole blocks, or a
mix (attention and MLP layers, He et al.'s Joint Layer Drop, or blocks beside either)."""


def pruning_target(label: pl.Expr) -> pl.Expr:
    """The `TARGETS` entry of pruning labels (``attention [1, 3], mlp [4] (similarity)``); null for a null label."""
    kinds = label.str.extract_all(r"\b(?:attention|mlp|block) \[").list.eval(
        pl.element().str.strip_suffix(" [")).list.unique()
    return (pl.when(label.is_null()).then(pl.lit(None, pl.String))
            .when(kinds.list.len() > 1).then(pl.lit("joint"))
            .otherwise(kinds.list.first()))


def dropped_count(label: str, kind: str) -> int | None:
    """How many layers of `kind` a pruning label says were dropped, where only layers of that kind were."""
    frame = pl.DataFrame({"label": [label]}).select(
        target=pruning_target(pl.col("label")),
        layers=pl.col("label").str.extract(rf"\b{kind} \[([\d, ]*)\]").str.count_matches(r"\d+"))
    target, layers = frame.row(0)
    return layers if target == kind else None


def tradeoff(comparison: pl.DataFrame, speed_metric: str = "decode_tokens_per_s") -> pl.DataFrame:
    """One row per pruned model and quality metric: quality kept and speedup, both relative to the original, and the
    standard error of the quality kept that the pruned model's own standard error gives (the original's held fixed)."""
    speed = comparison.filter(pl.col("metric") == speed_metric).select(*PRUNED_MODEL, speedup="relative")
    quality = comparison.filter((pl.col("task") != "speed") & pl.col("metric").is_in(["perplexity", "acc"]))
    return quality.join(speed, on=PRUNED_MODEL, nulls_equal=True).select(
        "source_model", "model", "pruning", "healed", "task", "metric", quality_kept="relative",
        quality_kept_stderr=pl.col("stderr") / pl.col("original"), speedup="speedup",
    )
