"""Scan a checkpoint suite: score every revision and store the scores."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import torch
from tqdm.auto import tqdm

from . import __version__
from .adapters import adapter_for_type
from .calibration import DEFAULT_SEQ_LEN, CalibrationSet, CalibrationSpec, load_calibration
from .errors import CalibrationError, CkptTraceError, ConfigError
from .models import dtype_name, load_model, load_tokenizer, read_config, resolve_device, resolve_dtype
from .scoring import MODULES, score
from .sources import Checkpoint, local_checkpoints
from .store import REVISIONS_SCHEMA, Store

log = logging.getLogger(__name__)


@dataclass
class ScanConfig:
    """Everything a scan needs; the command line only fills this in."""

    source: str | os.PathLike | None = None
    """A model directory, or a directory whose subdirectories are revisions; None: the built-in micro suite."""
    revisions: list[str] | None = None
    """Revision names to scan; all when None."""
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    """Which calibration set to score on."""
    batch_size: int = 8
    """Sequences per forward pass."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16."""
    store: str | os.PathLike = "data"
    """Store directory."""
    force: bool = False
    """Score revisions again even when their scores are stored."""
    keep_going: bool = False
    """Record a failing revision in runs/ and go on, instead of stopping."""
    trust_remote_code: bool = False
    """Allow a checkpoint's own modeling code to run."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")


def max_positions(config: dict) -> int | None:
    """The longest sequence a model's config allows, where it says."""
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _select(checkpoints: list[Checkpoint], names: list[str] | None) -> list[Checkpoint]:
    if not names:
        return checkpoints
    known = {c.revision.name: c for c in checkpoints}
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(f"unknown revision {missing[0]!r}; available: {', '.join(known)}")
    return [c for c in checkpoints if c.revision.name in set(names)]


def _calibration_for(checkpoints: list[Checkpoint], spec: CalibrationSpec) -> CalibrationSet:
    """One calibration set for the whole scan, tokenized by the first revision that has a tokenizer."""
    config = read_config(checkpoints[0].path)
    limit = max_positions(config)
    if spec.seq_len is None:
        spec = replace(spec, seq_len=min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN))
    tokenizer = next((t for c in checkpoints if (t := load_tokenizer(c.path)) is not None), None)
    calibration = load_calibration(spec, tokenizer)
    if isinstance(config.get("vocab_size"), int):
        calibration.check_vocab(config["vocab_size"])
    if limit is not None and calibration.max_len > limit:
        raise CalibrationError(
            f"calibration sequences have {calibration.max_len} tokens, more than the model's {limit} positions; "
            f"use --seq-len {limit} or less"
        )
    return calibration


def score_checkpoint(
    checkpoint: Checkpoint, calibration: CalibrationSet, config: ScanConfig, device: torch.device, dtype: torch.dtype
) -> pl.DataFrame:
    """Load one checkpoint and return its rows in the store's scores schema."""
    model = load_model(checkpoint.path, device, dtype, config.trust_remote_code)
    label = checkpoint.revision.name if config.progress else False
    frame = score(model, calibration, config.batch_size, progress=label)
    rev = checkpoint.revision
    return frame.with_columns(
        model=pl.lit(checkpoint.model),
        revision=pl.lit(rev.name),
        commit=pl.lit(rev.commit, pl.String),
        step=pl.lit(rev.step, pl.Int64),
        tokens=pl.lit(rev.tokens, pl.Int64),
        calibration=pl.lit(calibration.id),
        dtype=pl.lit(dtype_name(dtype)),
        version=pl.lit(__version__),
    )


def _revision_row(checkpoint: Checkpoint) -> pl.DataFrame:
    rev = checkpoint.revision
    return pl.DataFrame(
        {
            "model": [checkpoint.model],
            "revision": [rev.name],
            "commit": [rev.commit],
            "step": [rev.step],
            "tokens": [rev.tokens],
            "stage": [rev.stage],
            "val_loss": [checkpoint.val_loss()],
        },
        schema=REVISIONS_SCHEMA,
    )


def _run_row(checkpoint: Checkpoint, calibration: str, status: str, error: str | None, seconds: float) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "model": [checkpoint.model],
            "revision": [checkpoint.revision.name],
            "calibration": [calibration],
            "status": [status],
            "error": [error],
            "seconds": [seconds],
            "finished_at": [datetime.now(timezone.utc)],
            "version": [__version__],
        }
    )


def scan(config: ScanConfig) -> pl.DataFrame:
    """Score every selected revision that the store lacks; return one summary row per revision."""
    store = Store(config.store)
    device = resolve_device(config.device)  # bad options fail before any work
    dtype = resolve_dtype(config.dtype, device)
    if config.source is None:
        from .microsuite import build

        source = build(progress=config.progress)
    else:
        source = config.source
    checkpoints = _select(local_checkpoints(source), config.revisions)
    for checkpoint in checkpoints:  # an unsupported revision fails the scan before any work
        adapter_for_type(read_config(checkpoint.path).get("model_type"))
    calibration = _calibration_for(checkpoints, config.calibration)
    statuses = []
    bar = tqdm(checkpoints, desc="revisions", unit="rev", disable=None if config.progress else True)
    for checkpoint in bar:
        name = checkpoint.revision.name
        bar.set_postfix_str(name)
        if store.has_scores(checkpoint.model, name, calibration.id) and not config.force:
            statuses.append((name, "stored", None))
            continue
        start = time.perf_counter()
        try:
            frame = score_checkpoint(checkpoint, calibration, config, device, dtype)
        except (CkptTraceError, OSError, RuntimeError) as err:
            seconds = time.perf_counter() - start
            store.write_run(_run_row(checkpoint, calibration.id, "failed", str(err), seconds))
            if not config.keep_going:
                raise
            log.warning("revision %s failed: %s", name, err)
            statuses.append((name, "failed", seconds))
            continue
        store.write_scores(frame)
        store.write_revision(_revision_row(checkpoint))
        seconds = time.perf_counter() - start
        store.write_run(_run_row(checkpoint, calibration.id, "scored", None, seconds))
        statuses.append((name, "scored", seconds))
    bar.close()
    return summarize(store, checkpoints[0].model, calibration.id, statuses)


def summarize(store: Store, model: str, calibration: str, statuses: list[tuple]) -> pl.DataFrame:
    """Per revision: status, seconds, and the mean importance of each module type."""
    status = pl.DataFrame(statuses, schema={"revision": pl.String, "status": pl.String, "seconds": pl.Float64}, orient="row")
    scores = store.scan_scores().filter(
        (pl.col("model") == model) & (pl.col("calibration") == calibration) & (pl.col("metric") == "importance")
    )
    means = (
        scores.group_by("revision", "step", "module")
        .agg(pl.col("value").mean())
        .collect()
        .pivot(on="module", index=["revision", "step"], values="value")
    )
    modules = [m for m in MODULES if m in means.columns]
    return status.join(means.select("revision", "step", *modules), on="revision", how="left", maintain_order="left")
