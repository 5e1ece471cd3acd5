"""Figures of stored scores. Each function takes polars frames and returns a matplotlib Figure.

Figures are built with the object-oriented API (no pyplot state), so they work headless
and in notebooks alike; saving is the caller's business.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import seaborn as sns
from matplotlib.figure import Figure

from .analysis import checkpoint_labels, layer_matrix

MODULE_ORDER = ("attention", "mlp", "block")
MODULE_TITLES = {"attention": "Attention", "mlp": "MLP", "block": "Block"}
METRIC_TITLES = {"importance": "importance = 1 - cos(in, out)", "update_ratio": "update ratio = ||delta|| / ||in||"}


def _sparse_ticks(labels: list[str], most: int = 16) -> tuple[list[int], list[str]]:
    every = max(1, -(-len(labels) // most))
    positions = list(range(0, len(labels), every))
    return positions, [labels[i] for i in positions]


def heatmaps(frame: pl.DataFrame, metric: str = "importance", title: str = "") -> Figure:
    """Layer-by-checkpoint heatmaps of one metric, one panel per module type, on one shared colour scale."""
    modules = [m for m in MODULE_ORDER if frame.filter((pl.col("module") == m) & (pl.col("metric") == metric)).height]
    matrices = {m: layer_matrix(frame, m, metric) for m in modules}
    values = np.concatenate([matrices[m].drop("layer").to_numpy().ravel() for m in modules])
    vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))
    labels = checkpoint_labels(frame.filter(pl.col("metric") == metric))["label"].to_list()
    figure = Figure(figsize=(4.2 * len(modules) + 1.2, 0.28 * matrices[modules[0]].height + 2.4), layout="constrained")
    axes = figure.subplots(1, len(modules), sharey=True, squeeze=False)[0]
    for i, (ax, module) in enumerate(zip(axes, modules)):
        data = matrices[module].drop("layer").to_numpy()
        sns.heatmap(data, ax=ax, vmin=vmin, vmax=vmax, cmap="viridis", cbar=i == len(modules) - 1,
                    cbar_kws={"label": metric}, xticklabels=False, yticklabels=matrices[module]["layer"].to_list())
        positions, shown = _sparse_ticks(labels)
        ax.set_xticks([p + 0.5 for p in positions], shown, rotation=90, fontsize=7)
        ax.set_title(MODULE_TITLES[module])
        ax.set_xlabel("training step")
        if i == 0:
            ax.set_ylabel("layer")
    figure.suptitle(title or METRIC_TITLES.get(metric, metric))
    return figure


def _step_axis(ax) -> None:
    # Schedules are log-spaced early; symlog keeps step 0 on the axis.
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)


def layer_lines(frame: pl.DataFrame, metric: str = "importance") -> Figure:
    """Each layer's metric over training, one panel per module type, on a log-scaled step axis."""
    modules = [m for m in MODULE_ORDER if frame.filter((pl.col("module") == m) & (pl.col("metric") == metric)).height]
    figure = Figure(figsize=(4.6 * len(modules), 3.8), layout="constrained")
    axes = figure.subplots(1, len(modules), sharey=True, squeeze=False)[0]
    layers = sorted(frame["layer"].unique().to_list())
    colours = sns.color_palette("viridis", len(layers))
    for ax, module in zip(axes, modules):
        part = frame.filter((pl.col("module") == module) & (pl.col("metric") == metric)).sort("order")
        for colour, layer in zip(colours, layers):
            line = part.filter(pl.col("layer") == layer)
            ax.plot(line["step"].to_numpy(), line["value"].to_numpy(), marker=".", color=colour, label=f"layer {layer}")
        ax.set_title(MODULE_TITLES[module])
        _step_axis(ax)
    axes[0].set_ylabel(metric)
    axes[-1].legend(fontsize=7, ncols=max(1, len(layers) // 12), loc="best")
    return figure


def consistency(frame: pl.DataFrame) -> Figure:
    """Spearman correlation with the final checkpoint's layer ranking over training, per module type."""
    figure = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = figure.subplots()
    for module in MODULE_ORDER:
        part = frame.filter(pl.col("module") == module).sort("order")
        if part.height:
            ax.plot(part["step"].to_numpy(), part["spearman"].to_numpy(), marker="o", label=MODULE_TITLES[module])
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("Spearman ρ with final ranking")
    ax.set_ylim(-1.05, 1.05)
    _step_axis(ax)
    ax.legend()
    return figure


def agreement(frame: pl.DataFrame) -> Figure:
    """Spearman correlation of the cheap scores with ablation_loss, over every layer and module, over training."""
    figure = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = figure.subplots()
    for score, part in frame.sort("order").group_by("score", maintain_order=True):
        ax.plot(part["step"].to_numpy(), part["spearman"].to_numpy(), marker="o", label=score[0])
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("Spearman ρ with ablation_loss")
    ax.set_ylim(-1.05, 1.05)
    _step_axis(ax)
    ax.legend()
    return figure


def drop_set(frame: pl.DataFrame) -> Figure:
    """Jaccard overlap of the k least important layers with the final checkpoint's, over training."""
    figure = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = figure.subplots()
    for (module, fraction, k), part in frame.sort("order").group_by("module", "fraction", "k", maintain_order=True):
        style = "-" if module == "attention" else "--"
        ax.plot(part["step"].to_numpy(), part["jaccard"].to_numpy(), style, marker="o",
                label=f"{MODULE_TITLES[module]}, {fraction:.0%} (k={k})")
    ax.set_ylabel("Jaccard overlap with final drop set")
    ax.set_ylim(-0.05, 1.05)
    _step_axis(ax)
    ax.legend(fontsize=8)
    return figure


def validation_loss(revisions: pl.DataFrame) -> Figure:
    """Validation loss over training."""
    part = revisions.filter(pl.col("val_loss").is_not_null()).sort("step")
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = figure.subplots()
    ax.plot(part["step"].to_numpy(), part["val_loss"].to_numpy(), marker="o", color="black")
    ax.set_ylabel("validation loss")
    _step_axis(ax)
    return figure


def quality_speed(tradeoff: pl.DataFrame) -> Figure:
    """Quality kept against decode speedup, one point per pruned model and quality metric."""
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.subplots()
    for (task, metric), part in tradeoff.group_by("task", "metric", maintain_order=True):
        label = task if task == metric else f"{task} {metric}"
        ax.scatter(part["speedup"].to_numpy(), part["quality_kept"].to_numpy(), label=label, s=40)
        for x, y, name in part.select("speedup", "quality_kept", "model").rows():
            ax.annotate(name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("decode speedup over the original")
    ax.set_ylabel("quality kept (relative to the original)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure
