"""Analysis: statistics, findings, figures and the report, from the store's tables.

Takes polars frames read from the store; hands on frames of statistics (`statistics`), verdicts on
the papers' claims and this project's (`findings`, with finding (c) in `payoff` and what every
finding is made of in `verdicts`), training dynamics against a reference checkpoint and finding (e)
(`dynamics`), pruned models' excess loss by position and finding (f) (`positions`), matplotlib
figures (`plots`), and the Markdown and HTML report (`report`, rendered by `render` with its
templates).

May import: `pruning` (the curves table's readers), `fetch` (training order) and the edges.
"""

COLOR_SCALES = ("linear", "log")
"""The heatmaps' colour scales (`report --color-scale`); the package's modules are imported where used, so that
the command line starts without the plotting libraries."""
