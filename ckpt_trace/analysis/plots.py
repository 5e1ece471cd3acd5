"""Figures of stored scores. Each function takes polars frames and returns a matplotlib Figure.

Figures are built with the object-oriented API (no pyplot state), so they work headless
and in notebooks alike; saving is the caller's business.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl
import seaborn as sns
from matplotlib.figure import Figure

from .statistics import checkpoint_labels, layer_matrix

MODULE_ORDER = ("attention", "mlp", "block")
MODULE_TITLES = {"attention": "Attention", "mlp": "MLP", "block": "Block"}
METRIC_TITLES = {"importance": "importance = 1 - cos(in, out)", "update_ratio": "update ratio = ||delta|| / ||in||",
                 "angular_distance": "angular distance = arccos(cos(in, out)) / π",
                 "weight_change_final": "weight change = ||θ - θ_ref|| / ||θ_ref||",
                 "cka_final": "CKA = linear CKA(output, output_ref)"}


LOW, HIGH = 2, 98
"""Percentiles that bound a heatmap's colour scale: a few extreme cells do not wash out the rest."""


def _sparse_ticks(labels: list[str], most: int = 16) -> tuple[list[int], list[str]]:
    every = max(1, -(-len(labels) // most))
    positions = list(range(0, len(labels), every))
    return positions, [labels[i] for i in positions]


def _si(count: int) -> str:
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k")):
        if abs(count) >= size:
            return f"{count / size:.3g}{suffix}"
    return str(count)


def training_position(frame: pl.DataFrame) -> str:
    """The column that places a checkpoint in training: `tokens` (tokens seen) where every row knows it, else `step`."""
    if "tokens" in frame.columns and frame.height and frame["tokens"].null_count() == 0:
        return "tokens"
    return "step"


def colour_range(matrix: np.ndarray, scale: str = "linear") -> tuple[float, float, str]:
    """vmin, vmax and matplotlib's colour-bar `extend` for one heatmap panel, layers in rows.

    The range spans the 2nd to the 98th percentile of the layers after the first (of all layers when there are
    fewer than three): the first layer's scores are often far from the rest and would leave every other layer
    one colour. Cells beyond the range take the end colours, and the colour bar's arrows say so. On a log scale
    only positive values count.
    """
    body = matrix[1:] if matrix.shape[0] >= 3 else matrix
    values, everything = body[np.isfinite(body)], matrix[np.isfinite(matrix)]
    if scale == "log":
        values, everything = values[values > 0], everything[everything > 0]
    if values.size == 0:
        values = everything
    if values.size == 0:
        return (1e-6, 1.0, "neither") if scale == "log" else (0.0, 1.0, "neither")
    vmin, vmax = (float(v) for v in np.percentile(values, [LOW, HIGH]))
    if vmax <= vmin:
        vmin, vmax = (vmin / 2, vmax * 2) if scale == "log" else (vmin - 0.5, vmax + 0.5)
    below, above = bool((everything < vmin).any()), bool((everything > vmax).any())
    return vmin, vmax, {(True, True): "both", (True, False): "min", (False, True): "max"}.get((below, above), "neither")


def heatmaps(frame: pl.DataFrame, metric: str = "importance", title: str = "", scale: str = "linear",
             limits: tuple[float, float] | None = None) -> Figure:
    """Layer-by-checkpoint heatmaps of one metric, one panel per module type, each on its own colour scale
    (see `colour_range`), linear or log, or all on one linear scale from `limits[0]` to `limits[1]`."""
    from matplotlib.colors import LogNorm, Normalize

    modules = [m for m in MODULE_ORDER if frame.filter((pl.col("module") == m) & (pl.col("metric") == metric)).height]
    matrices = {m: layer_matrix(frame, m, metric) for m in modules}
    checkpoints = checkpoint_labels(frame.filter(pl.col("metric") == metric))
    by_tokens = training_position(checkpoints) == "tokens"
    labels = [_si(t) for t in checkpoints["tokens"]] if by_tokens else checkpoints["label"].to_list()
    figure = Figure(figsize=(5.0 * len(modules), 0.28 * matrices[modules[0]].height + 2.6), layout="constrained")
    axes = figure.subplots(1, len(modules), sharey=True, squeeze=False)[0]
    colours = sns.color_palette("viridis", as_cmap=True).with_extremes(bad="#d9d9d9")
    for i, (ax, module) in enumerate(zip(axes, modules)):
        data = matrices[module].drop("layer").to_numpy().astype(float)
        vmin, vmax, extend = (*limits, "neither") if limits else colour_range(data, scale)
        logarithmic = scale == "log" and not limits
        norm = LogNorm(vmin, vmax) if logarithmic else Normalize(vmin, vmax)
        shown = np.where(data > 0, data, np.nan) if logarithmic else data
        sns.heatmap(shown, ax=ax, norm=norm, cmap=colours, cbar=True, xticklabels=False,
                    cbar_kws={"label": metric + (" (log)" if logarithmic else ""), "extend": extend, "shrink": 0.9},
                    yticklabels=matrices[module]["layer"].to_list())
        positions, ticks = _sparse_ticks(labels)
        ax.set_xticks([p + 0.5 for p in positions], ticks, rotation=90, fontsize=7)
        ax.set_title(MODULE_TITLES[module])
        ax.set_xlabel("tokens seen" if by_tokens else "training step")
        if i == 0:
            ax.set_ylabel("layer")
    figure.suptitle(title or METRIC_TITLES.get(metric, metric))
    return figure


def _training_axis(ax, positions: np.ndarray, unit: str) -> None:
    # Schedules are log-spaced early; symlog keeps step 0 (token 0) on the axis.
    positive = positions[positions > 0]
    ax.set_xscale("symlog", linthresh=float(positive.min()) if positive.size else 1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel({"tokens": "tokens seen", "step": "training step", "fraction": "fraction of training"}[unit])
    ax.grid(alpha=0.3)


def _plot_over_training(ax, part: pl.DataFrame, column: str, *args, **kwargs) -> np.ndarray:
    x = part[training_position(part)].to_numpy()
    ax.plot(x, part[column].to_numpy(), *args, **kwargs)
    return x


def settling(table: pl.DataFrame, unit: str = "step") -> Figure:
    """Per module, each layer of the final drop set at (where its output settled, since when it is redundant), in
    training position (`unit`: step or tokens), labelled with its layer, the diagonal drawn; layers that never
    settled are named in the panel. `table` as `ckpt_trace.analysis.dynamics.settling_table` gives it."""
    dropped = table.filter(pl.col("relation").is_not_null())
    modules = [m for m in MODULE_ORDER if dropped["module"].eq(m).any()] or ["attention"]  # an empty panel
    figure = Figure(figsize=(4.2 * len(modules), 4.4), layout="constrained")
    axes = figure.subplots(1, len(modules), squeeze=False)[0]
    x, y = f"settled_{unit}", f"redundant_{unit}"
    known = pl.concat([dropped[x], dropped[y]]).drop_nulls().unique().sort().cast(pl.Float64).to_numpy()
    positive = known[known > 0]
    end = 1.1 * float(known.max()) if known.size and known.max() > 0 else 1.0
    ticks, labels, shown = [], [], float("-inf")  # ticks at least a fifth of a decade apart on the log scale
    for i, value in enumerate(known):
        place = np.log10(value) if value > 0 else float("-inf")
        if not ticks or place - shown >= 0.2:
            ticks, labels, shown = [*ticks, i], [*labels, _si(int(value))], place
    for ax, module in zip(axes, modules):
        part = dropped.filter((pl.col("module") == module) & pl.col(x).is_not_null() & pl.col(y).is_not_null())
        ax.plot([0, end], [0, end], color="grey", lw=0.8, ls=":")
        ax.plot(part[x].to_numpy(), part[y].to_numpy(), "o", color="tab:blue")
        for at, since, layers in part.group_by(x, y).agg(pl.col("layer").sort()).sort(x, y).rows():  # one label per point
            ax.annotate(", ".join(map(str, layers)), (at, since), fontsize=8, xytext=(4, 3), textcoords="offset points")
        never = dropped.filter((pl.col("module") == module) & (pl.col("relation") == "never settled"))["layer"].to_list()
        if never:
            ax.text(0.03, 0.97, f"never settled: {', '.join(map(str, never))}", transform=ax.transAxes, va="top",
                    fontsize=8)
        for scale, limit, place in ((ax.set_xscale, ax.set_xlim, ax.set_xticks), (ax.set_yscale, ax.set_ylim, ax.set_yticks)):
            scale("symlog", linthresh=float(positive.min()) if positive.size else 1.0)  # one scale: the diagonal is y = x
            limit(0, end)
            if known.size:
                place([known[i] for i in ticks], labels, fontsize=7)
        ax.set_xlabel(f"settled at ({'tokens seen' if unit == 'tokens' else 'training step'})")
        ax.set_title(MODULE_TITLES[module])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"redundant since ({'tokens seen' if unit == 'tokens' else 'training step'})")
    figure.suptitle("final drop set: above the diagonal, redundant after it settled", fontsize=10)
    return figure


def layer_lines(frame: pl.DataFrame, metric: str = "importance") -> Figure:
    """Each layer's metric over training, one panel per module type, on a log-scaled axis of tokens seen (or steps)."""
    modules = [m for m in MODULE_ORDER if frame.filter((pl.col("module") == m) & (pl.col("metric") == metric)).height]
    figure = Figure(figsize=(4.6 * len(modules), 3.8), layout="constrained")
    axes = figure.subplots(1, len(modules), sharey=True, squeeze=False)[0]
    layers = sorted(frame["layer"].unique().to_list())
    colours = sns.color_palette("viridis", len(layers))
    unit = training_position(frame)
    for ax, module in zip(axes, modules):
        part = frame.filter((pl.col("module") == module) & (pl.col("metric") == metric)).sort("order")
        for colour, layer in zip(colours, layers):
            _plot_over_training(ax, part.filter(pl.col("layer") == layer), "value", marker=".", color=colour,
                                label=f"layer {layer}")
        ax.set_title(MODULE_TITLES[module])
        _training_axis(ax, frame[unit].to_numpy(), unit)
    axes[0].set_ylabel(metric)
    axes[-1].legend(fontsize=7, ncols=max(1, len(layers) // 12), loc="best")
    return figure


def _spearman_over_training(frame: pl.DataFrame, lines: Iterable[tuple[str, pl.DataFrame]], reference: float,
                            ylabel: str) -> Figure:
    """One line of Spearman correlations over training per (label, part), with a dotted line at `reference`."""
    figure = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = figure.subplots()
    for label, part in lines:
        _plot_over_training(ax, part, "spearman", marker="o", label=label)
    ax.axhline(reference, color="grey", lw=0.8, ls=":")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-1.05, 1.05)
    _training_axis(ax, frame[training_position(frame)].to_numpy(), training_position(frame))
    ax.legend()
    return figure


def consistency(frame: pl.DataFrame) -> Figure:
    """Spearman correlation with the final checkpoint's layer ranking over training, per module type."""
    parts = ((MODULE_TITLES[m], frame.filter(pl.col("module") == m).sort("order")) for m in MODULE_ORDER)
    return _spearman_over_training(frame, ((label, part) for label, part in parts if part.height), 1.0,
                                   "Spearman ρ with final ranking")


def agreement(frame: pl.DataFrame) -> Figure:
    """Spearman correlation of the cheap scores with ablation_loss, over every layer and module, over training."""
    parts = frame.sort("order").group_by("score", maintain_order=True)
    return _spearman_over_training(frame, ((score, part) for (score,), part in parts), 0.0, "Spearman ρ with ablation_loss")


def drop_set(frame: pl.DataFrame) -> Figure:
    """Jaccard overlap of the k least important layers with the final checkpoint's, over training."""
    figure = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = figure.subplots()
    for (module, fraction, k), part in frame.sort("order").group_by("module", "fraction", "k", maintain_order=True):
        style = "-" if module == "attention" else "--"
        _plot_over_training(ax, part, "jaccard", style, marker="o", label=f"{MODULE_TITLES[module]}, {fraction:.0%} (k={k})")
    ax.set_ylabel("Jaccard overlap with final drop set")
    ax.set_ylim(-0.05, 1.05)
    _training_axis(ax, frame[training_position(frame)].to_numpy(), training_position(frame))
    ax.legend(fontsize=8)
    return figure


def validation_loss(revisions: pl.DataFrame) -> Figure:
    """Validation loss over training."""
    part = revisions.filter(pl.col("val_loss").is_not_null()).sort("step")
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = figure.subplots()
    x = _plot_over_training(ax, part, "val_loss", marker="o", color="black")
    ax.set_ylabel("validation loss")
    _training_axis(ax, x, training_position(part))
    return figure


def quality_speed(tradeoff: pl.DataFrame) -> Figure:
    """Quality kept against decode speedup, one point per pruned model and quality metric; healed models (a `healed`
    column not null) as hollow diamonds in the colour of their metric."""
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.subplots()
    if "healed" not in tradeoff.columns:
        tradeoff = tradeoff.with_columns(healed=pl.lit(None, pl.String))
    metrics = tradeoff.select("task", "metric").unique(maintain_order=True).rows()
    colours = dict(zip(metrics, sns.color_palette(n_colors=max(len(metrics), 1))))
    parts = tradeoff.with_columns(is_healed=pl.col("healed").is_not_null()).group_by(
        "task", "metric", "is_healed", maintain_order=True)
    for (task, metric, healed), part in sorted(parts, key=lambda item: (metrics.index(item[0][:2]), item[0][2])):
        label = (task if task == metric else f"{task} {metric}") + (", healed" if healed else "")
        errors = part["quality_kept_stderr"].fill_null(0.0).to_numpy() if "quality_kept_stderr" in part.columns else None
        style = {"fmt": "D", "mfc": "none", "ms": 7} if healed else {"fmt": "o"}
        ax.errorbar(part["speedup"].to_numpy(), part["quality_kept"].to_numpy(), yerr=errors, capsize=3,
                    color=colours[(task, metric)], **style,
                    label=label + (" (±1 standard error)" if errors is not None and errors.any() else ""))
        for x, y, name in part.select("speedup", "quality_kept", "model").rows():
            ax.annotate(name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("decode speedup over the original")
    ax.set_ylabel("quality kept (relative to the original)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


STRATEGY_STYLE = {"oracle": ("black", "s"), "similarity": ("tab:blue", "o"), "healed": ("tab:green", "D"),
                  "last": ("tab:orange", "^")}
"""The oracle first, hollow and larger, so that a strategy that picks the same modules shows on top of it; the
similarity drop sets healed after dropping (`healed`, where stored) beside them."""

STRATEGY_LABELS = {"healed": "similarity, healed"}


def pruning_curve(summary: pl.DataFrame, target: str) -> Figure:
    """Held-out perplexity against the number of modules dropped, one line per strategy (the similarity drop sets
    healed after dropping too, where the summary has them); random as its geometric mean over seeds with the band
    from the lowest to the highest; the intact model as a dashed line."""
    part = summary.filter(pl.col("target") == target).sort("k")
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.subplots()
    k = part["k"].to_numpy()
    for strategy, (colour, marker) in STRATEGY_STYLE.items():
        if strategy in part.columns:
            hollow = {"mfc": "none", "ms": 10, "lw": 2.5} if strategy == "oracle" else {}
            ax.plot(k, part[strategy].to_numpy(), marker=marker, color=colour,
                    label=STRATEGY_LABELS.get(strategy, strategy), **hollow)
    if "random" in part.columns:
        seeds = part["seeds"].max()
        ax.plot(k, part["random"].to_numpy(), marker="v", color="tab:red", label=f"random ({seeds} seeds)")
        ax.fill_between(k, part["random_min"].to_numpy(), part["random_max"].to_numpy(), color="tab:red", alpha=0.15)
    ax.axhline(part["original"][0], color="grey", ls="--", lw=1, label="nothing dropped")
    ax.set_yscale("log")
    ax.set_xticks(k)
    ax.set_xlabel(f"{MODULE_TITLES[target]} layers dropped")
    ax.set_ylabel("perplexity on held-out text (log)")
    ax.set_title(f"{MODULE_TITLES[target]} drop")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return figure


ACROSS = {"consistency": "attention ranking: Spearman ρ with the final checkpoint's",
          "agreement": "importance against ablation_loss: Spearman ρ"}


def across_models(frame: pl.DataFrame) -> Figure:
    """Models side by side over the fraction of their training (tokens seen, or steps, over the final checkpoint's):
    one panel per measure in `ACROSS`, one line per model. `frame`: model, measure, fraction, value."""
    measures = [m for m in ACROSS if frame.filter(pl.col("measure") == m).height]
    figure = Figure(figsize=(5.6 * len(measures), 4.0), layout="constrained")
    axes = figure.subplots(1, len(measures), squeeze=False)[0]
    for ax, measure in zip(axes, measures):
        part = frame.filter(pl.col("measure") == measure).sort("model", "fraction")
        for model, line in part.group_by("model", maintain_order=True):
            ax.plot(line["fraction"].to_numpy(), line["value"].to_numpy(), marker="o", label=model[0])
        ax.axhline(1.0 if measure == "consistency" else 0.0, color="grey", lw=0.8, ls=":")
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(ACROSS[measure], fontsize=10)
        _training_axis(ax, part["fraction"].to_numpy(), "fraction")
        ax.set_xlim(0, 1.05)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("Spearman ρ")
    return figure


def spans(frame: pl.DataFrame, metric: str = "span_distance") -> Figure:
    """The final checkpoint's span distance by first layer, one line per span length n; the least of each marked."""
    part = frame.filter(pl.col("metric") == metric)
    part = part.filter(pl.col("order") == pl.col("order").max())
    part = part.with_columns(n=pl.col("module").str.strip_prefix("span").cast(pl.Int64)).sort("n", "layer")
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.subplots()
    lengths = part["n"].unique().sort().to_list()
    colours = sns.color_palette("viridis", len(lengths))
    for colour, (n, line) in zip(colours, part.group_by("n", maintain_order=True)):
        ax.plot(line["layer"].to_numpy(), line["value"].to_numpy(), marker=".", color=colour, label=f"n = {n[0]}")
        best = line.sort("value", "layer").row(0, named=True)
        ax.plot([best["layer"]], [best["value"]], marker="o", mfc="none", ms=10, color=colour)
    ax.set_xlabel("first layer l of the span")
    ax.set_ylabel("angular distance of input l to input l + n")
    ax.set_title(f"{metric}: {part['revision'][0]} (circled: the least of each n)" if part.height else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    return figure


POSITION_TARGETS = {"attention": "Attention dropped", "mlp": "MLP dropped", "block": "Blocks dropped",
                    "joint": "Several kinds dropped (joint)"}


def position_excess(excess: pl.DataFrame) -> Figure:
    """Excess next-token loss over the original by position bucket (on a log axis at each bucket's last position,
    labelled with its range), one panel per target, one line per pruned model; a healed model dashed, in the colour
    of the model of its drop set. `excess` as `ckpt_trace.analysis.positions.position_excess` gives it."""
    targets = [t for t in POSITION_TARGETS if excess["target"].eq(t).any()]
    figure = Figure(figsize=(4.6 * len(targets), 4.0), layout="constrained")
    axes = figure.subplots(1, len(targets), sharey=True, squeeze=False)[0]
    drop = ["pruning", "revision", "source_weights"]
    lines = excess.select("target", "model", "healed", *drop).unique().sort("target", "model", "healed",
                                                                           nulls_last=False)
    colours = iter(sns.color_palette(n_colors=max(lines.height, 1)))
    # Each model as pruned its own colour; a healed one that of the first model of its drop set, else one of its own.
    of_drop_set: dict[tuple, tuple] = {}
    colour_of = {}
    for line in lines.sort(pl.col("healed").is_not_null(), maintain_order=True).iter_rows(named=True):
        key = tuple(line[c] for c in drop)
        healed_from = of_drop_set.get(key) if line["healed"] is not None else None
        colour_of[tuple(line.values())] = healed_from or next(colours)
        if line["healed"] is None:
            of_drop_set.setdefault(key, colour_of[tuple(line.values())])
    ticks = excess.select("last", "bucket").unique().sort("last")
    for ax, target in zip(axes, targets):
        for line in lines.filter(pl.col("target") == target).iter_rows(named=True):
            part = excess.filter(*(pl.col(c).eq_missing(v) for c, v in line.items())).sort("last")
            healed = line["healed"] is not None
            ax.plot(part["last"].to_numpy(), part["excess"].to_numpy(), marker="o",
                    color=colour_of[tuple(line.values())], **({"ls": "--", "mfc": "none"} if healed else {}),
                    label=line["model"] + (", healed" if healed else ""))
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xticks(ticks["last"].to_list(), ticks["bucket"].to_list(), fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("position (tokens of context)")
        ax.set_title(POSITION_TARGETS[target])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("excess loss over the original (nats)")
    return figure
