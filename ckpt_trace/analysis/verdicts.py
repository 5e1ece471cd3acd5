"""Verdicts: what every finding is made of (a claim, a verdict by a stated rule, the evidence and what it rests
on), and the wording findings share for numbers, correlations, counts and checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

HOLDS, FAILS, OPEN = "holds", "does not hold", "inconclusive"

CALIBRATION_NAME = "calibration_source"
"""The column of a scores frame that may hold a calibration set's human-readable name (its id is a hash); where the
frame has it, findings name the set by both."""


@dataclass(frozen=True)
class Finding:
    claim: str
    verdict: str
    evidence: str
    basis: str


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def num(x: float | None, spec: str) -> str:
    """A number as text; a NaN or infinity (a diverged model, a score of tied values) is said, not printed."""
    return format(x, spec) if finite(x) else "not a finite number"


def rho(rho: float | None) -> str:
    """A Spearman correlation as text: undefined where the values tie (or are too few), which polars gives as NaN."""
    return f"{rho:+.2f}" if finite(rho) else "undefined (tied or too few values)"


def count(n: int, thing: str) -> str:
    return f"{n} {thing}{'s' if n != 1 else ''}"


def final_checkpoint(frame: pl.DataFrame) -> dict:
    """The final checkpoint of the frame (of any metric): its first row."""
    return frame.filter(pl.col("order") == pl.col("order").max()).row(0, named=True)


def checkpoint_name(row: dict) -> str:
    """A checkpoint (a row with revision and step) by name, with its step where the name does not give it."""
    plain = row["step"] is None or row["revision"] == f"step{row['step']}"
    return row["revision"] + ("" if plain else f" (step {row['step']:,})")


def rows_at(frame: pl.DataFrame, revision: str, metric: str) -> pl.DataFrame:
    return frame.filter((pl.col("revision") == revision) & (pl.col("metric") == metric))


def lacking(frame: pl.DataFrame, metric: str, checkpoint: dict) -> str:
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


def basis(*parts: str) -> str:
    return "; ".join(part for part in parts if part)
