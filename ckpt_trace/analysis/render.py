"""Rendering: tables as Markdown and HTML, figures as PNG and SVG, and the report's templates."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import jinja2
import markupsafe
import matplotlib
import polars as pl
from matplotlib.figure import Figure
from tabulate import tabulate

DPI = 110


def _cell(value) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 1e4:  # byte counts and the like, whole
            return f"{int(value):,}"
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _rows(frame: pl.DataFrame) -> list[list[str]]:
    return [[_cell(v) for v in row] for row in frame.iter_rows()]


def markdown_table(frame: pl.DataFrame) -> str:
    """A GitHub Markdown table of the frame, numbers to 4 significant digits, `|` in cells escaped."""
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    return tabulate([[escape(c) for c in row] for row in _rows(frame)], headers=[escape(c) for c in frame.columns],
                    tablefmt="github", disable_numparse=True)


def html_table(frame: pl.DataFrame) -> str:
    """An HTML table of the frame (cells escaped), numbers as in `markdown_table`."""
    return str(tabulate(_rows(frame), headers=frame.columns, tablefmt="html", disable_numparse=True))


def save_figure(figure: Figure, folder: Path, key: str) -> bytes:
    """Write the figure as `key`.png and `key`.svg in `folder`; return the PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    (folder / f"{key}.png").write_bytes(buffer.getvalue())
    with matplotlib.rc_context({"svg.hashsalt": "ckpt-trace"}):  # stable element ids: the same figure, the same file
        figure.savefig(folder / f"{key}.svg", format="svg", metadata={"Date": None})
    return buffer.getvalue()


def figure_entries(figures: dict[str, tuple[str, Figure]], folder: Path, link: str) -> list[dict]:
    """Each figure (key -> (caption, figure)) saved in `folder` (see `save_figure`), as the templates show it: its
    caption, its PNG and SVG under `link` (the folder, as a link from the report) and the PNG's data."""
    entries = []
    for key, (caption, figure) in figures.items():
        png = save_figure(figure, folder, key)
        entries.append({"caption": caption, "png": f"{link}/{key}.png", "svg": f"{link}/{key}.svg",
                        "data": base64.b64encode(png).decode()})
    return entries


def table_entries(tables: dict[str, tuple[str, pl.DataFrame]]) -> list[dict]:
    """Each table (key -> (caption, frame)) as the templates show it: its caption, Markdown and HTML."""
    return [{"caption": caption, "markdown": markdown_table(table), "html": markupsafe.Markup(html_table(table))}
            for caption, table in tables.values()]


def templates() -> jinja2.Environment:
    """The report's Jinja2 templates (Markdown and HTML, the HTML autoescaped), with a `code` filter."""
    environment = jinja2.Environment(loader=jinja2.PackageLoader("ckpt_trace.analysis", "templates"), trim_blocks=True,
                                     lstrip_blocks=True, autoescape=jinja2.select_autoescape(["html.j2"]),
                                     undefined=jinja2.StrictUndefined)
    # `code` in prose: <code> in HTML, the text itself escaped first.
    environment.filters["code"] = lambda text: markupsafe.Markup(
        re.sub(r"`([^`]*)`", r"<code>\1</code>", str(markupsafe.escape(text))))
    return environment
