"""The scan: score every selected revision that the store lacks, in this process or on Ray, and store its rows.

Revisions already in the store (the same weights and config, dtype, calibration set and scorer) are
skipped, so a scan that was interrupted, by Ctrl-C, SIGKILL or a crash, picks up where it
stopped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace
from datetime import datetime, timezone
from types import SimpleNamespace

import polars as pl
import torch
from tqdm.auto import tqdm

from ..calibration.sets import CalibrationSet
from ..errors import REVISION_ERRORS, SourceError, one_line
from ..fetch.sources import Checkpoint, changed_error, changed_since, identified_now, open_source
from ..model.loading import dtype_name, load_model, resolve_device, resolve_dtype
from ..paths import remove_stale_temporaries
from ..scoring.loss import ablation_losses
from ..scoring.metrics import ABLATION, DYNAMICS, SCORER_VERSION, SPAN, score
from ..scoring.options import build_calibration, score_key
from ..store import METRICS, MODULES, REVISIONS_SCHEMA, RUNS_SCHEMA, SCORES_SCHEMA, VERSION, ScoreKey, Store
from .dynamics import Dynamics, Plan, plan
from .options import ScanConfig, resolve_metrics, shard
from .streaming import LoadAhead, _drop_locals, loads_ahead, streamed

log = logging.getLogger(__name__)

def score_checkpoint(
    checkpoint: Checkpoint, calibration: CalibrationSet, config: ScanConfig, device: torch.device, dtype: torch.dtype,
    model: torch.nn.Module, dynamics: Dynamics | None = None,
) -> pl.DataFrame:
    """Score one fetched checkpoint's loaded `model` (and its training dynamics, with `dynamics`) and return its rows
    in the store's scores schema."""
    label = checkpoint.revision.name if config.progress else False
    sample = dynamics.sample(model) if dynamics is not None else None
    frame = score(model, calibration, config.batch_size, progress=label, metrics=config.metrics or METRICS,
                  sample=sample)
    if ABLATION in (config.metrics or ()):
        frame = pl.concat([frame, ablation_losses(model, calibration, config.batch_size, progress=label)])
    frame = frame.with_columns(reference=pl.lit(None, pl.String), reference_weights=pl.lit(None, pl.String))
    if dynamics is not None:
        frame = pl.concat([frame, dynamics.rows(checkpoint, model, sample)])
    rev = checkpoint.revision
    return frame.with_columns(
        model=pl.lit(checkpoint.model),
        source=pl.lit(checkpoint.source, pl.String),
        revision=pl.lit(rev.name),
        commit=pl.lit(rev.commit, pl.String),
        weights=pl.lit(checkpoint.weights, pl.String),
        step=pl.lit(rev.step, pl.Int64),
        branch=pl.lit(rev.branch, pl.String),
        tokens=pl.lit(rev.tokens, pl.Int64),
        calibration=pl.lit(calibration.id),
        calibration_source=pl.lit(calibration.describe()),
        dtype=pl.lit(dtype_name(dtype)),
        scorer=pl.lit(SCORER_VERSION, pl.Int32),
        version=pl.lit(VERSION),
        created=pl.lit(datetime.now(timezone.utc), pl.Datetime("us", "UTC")),
    )


def load_identified(checkpoint: Checkpoint, config: ScanConfig, device, dtype) -> tuple[Checkpoint, torch.nn.Module]:
    """The checkpoint with its identity taken right before loading (see `identified_now`), and its model."""
    checkpoint = identified_now(checkpoint)
    return checkpoint, load_model(checkpoint.path, device, dtype, config.trust_remote_code, config.device_map)


def score_stably(checkpoint: Checkpoint, calibration: CalibrationSet, config: ScanConfig, device, dtype,
                 loaded: tuple[Checkpoint, torch.nn.Module] | None = None,
                 dynamics: Dynamics | None = None) -> tuple[Checkpoint, pl.DataFrame]:
    """Load (unless `loaded` holds it, from `load_identified`) and score a checkpoint; return it as identified at
    load time, with its scores. Files that changed while they were loaded or scored are loaded and scored once
    more; if they change again, `changed_error` is raised: scores are never of other bytes than the identity
    they are stored under."""
    for attempt in range(2):
        at_load, model = loaded if loaded is not None else load_identified(checkpoint, config, device, dtype)
        loaded = None
        frame = score_checkpoint(at_load, calibration, config, device, dtype, model, dynamics)
        model = None
        if not changed_since(at_load):
            return at_load, frame
        if attempt == 0:
            log.warning("the files of %s changed while it was scored; scoring it again", checkpoint.revision.name)
    raise changed_error(at_load)


def keep_stored(store: Store, key: ScoreKey, frame: pl.DataFrame) -> pl.DataFrame:
    """The new scores with the stored metrics of the same key that were not measured again (an earlier scan's
    ablation_loss, say): the same weights and config, dtype, calibration set and scorer gave both, so one file holds both.
    Their `version` stays the one that measured them; `created` becomes the file's."""
    stored = store.read_scores(key, ())
    if stored is None:
        return frame
    # Rows of the same metric against another checkpoint (a scan with another --reference) are kept beside these.
    kept = stored.join(frame.select("metric", "reference_weights").unique(), on=["metric", "reference_weights"],
                       how="anti", nulls_equal=True)
    if kept.height == 0:
        return frame
    return pl.concat([frame, kept.select(frame.columns).with_columns(created=frame["created"][0])], how="vertical_relaxed")


def why_score(store: Store, key: ScoreKey, force: bool, metrics: tuple[str, ...] = METRICS,
              against: dict[str, Checkpoint] | None = None) -> str | None:
    """Why a checkpoint is to be scored, or None when whole scores of exactly its key, with these metrics (each in
    `against` measured against that checkpoint), are stored."""
    if force:
        return "--force"
    if (stored := store.read_scores(key, metrics)) is not None:
        pairs = set(stored.select("metric", "reference_weights").iter_rows())
        other = [m for m, c in (against or {}).items() if (m, c.weights) not in pairs]
        if not other:
            return None
        return f"the stored {', '.join(other)} are measured against other checkpoints than " + \
            ", ".join(sorted({against[m].revision.name for m in other}))
    if store.has_scores(key):
        stored = set(store.read_scores(key)["metric"])
        return f"the stored scores lack {', '.join(m for m in metrics if m not in stored)}"
    others = store.stored_keys(key.model, key.revision)
    if not others:
        return "no scores yet"
    closest = min((key.differences(other) for other in others), key=len)
    names = {"weights": "weights", "dtype": "dtype", "calibration": "calibration set", "scorer": "scorer version"}
    return "the stored scores are of other " + ", ".join(names.get(f, f) for f in closest)


def _revision_row(checkpoint: Checkpoint) -> pl.DataFrame:
    rev = checkpoint.revision
    row = {
        "model": checkpoint.model, "source": checkpoint.source, "revision": rev.name, "commit": rev.commit, "weights": checkpoint.weights, "step": rev.step,
        "tokens": rev.tokens, "stage": rev.stage, "branch": rev.branch, "val_loss": checkpoint.val_loss(),
        "weight_bytes": checkpoint.weight_bytes, "duplicate_of": checkpoint.duplicate_of,
    }
    return pl.DataFrame([row], schema=REVISIONS_SCHEMA)


def _run_row(checkpoint: Checkpoint, key: ScoreKey, status: str, error: str | None, seconds: float) -> pl.DataFrame:
    row = {
        "model": checkpoint.model, "revision": checkpoint.revision.name, "source": checkpoint.source,
        "weights": checkpoint.weights, "dtype": key.dtype, "calibration": key.calibration,
        "status": status, "error": error, "seconds": seconds, "finished_at": datetime.now(timezone.utc),
        "version": VERSION,
    }
    return pl.DataFrame([row], schema=RUNS_SCHEMA)


def holds_config(checkpoint: Checkpoint) -> bool:
    """Whether a revision holds a model's config: a revision with neither config nor weights (a Hub repo's
    README-only main) is no model, while one with a config and no weights is a checkpoint that is broken."""
    if checkpoint.path is not None:
        return (checkpoint.path / "config.json").is_file()
    return "config.json" in getattr(checkpoint.files, "files", ())


def check_weights(checkpoint: Checkpoint) -> None:
    """Raise `SourceError` for a checkpoint without weight files: it fails, as weights that cannot be read do."""
    if checkpoint.weights is None:
        raise SourceError(f"revision {checkpoint.revision.name!r} of {checkpoint.model!r} has a config.json but no "
                          "weight files (.safetensors or .bin)")


def score_revision(source: str, cache_dir, checkpoint: Checkpoint, calibration: CalibrationSet, config: ScanConfig,
                   dtype: torch.dtype, plan: Plan | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """On a Ray worker: fetch, load and score one revision (with the dynamics of `plan`), then release it; its
    revision row and its scores."""
    opened = open_source(source, cache_dir)
    fetched = checkpoint
    device = resolve_device(config.device)  # the worker's own: the GPU Ray gave the task, else the CPU
    dynamics = Dynamics(plan, opened, calibration, config, device, dtype, lasting=True) if plan is not None else None
    try:
        check_weights(checkpoint)
        fetched = opened.fetch(checkpoint)
        scored, frame = score_stably(fetched, calibration, config, device, dtype, dynamics=dynamics)
        return _revision_row(scored), frame
    finally:
        opened.release(fetched)  # a download cut short too
        if dynamics is not None:
            dynamics.close()


def scored_here(source, checkpoints: list[Checkpoint], calibration: CalibrationSet, config: ScanConfig,
                device: torch.device, dtype: torch.dtype,
                dynamics: Dynamics | None = None) -> Iterator[tuple[Checkpoint, tuple | None, Exception | None, float]]:
    """Yield (checkpoint, (revision row, scores) or None, error or None, seconds) for each checkpoint, streamed
    (see `streamed`) and scored in this process; with load-ahead (see `loads_ahead`, `LoadAhead`), each revision's
    model is loaded while the one before it is scored. With `dynamics`, the files it measures against stay fetched
    (see `Dynamics.release`)."""
    def load(checkpoint: Checkpoint) -> tuple[Checkpoint, torch.nn.Module]:
        return load_identified(checkpoint, config, device, dtype)

    ahead = LoadAhead(load) if loads_ahead(config, checkpoints, device, dtype) else None
    holding = source if dynamics is None else SimpleNamespace(fetch=source.fetch, release=dynamics.release)
    if dynamics is not None:
        dynamics.coming = {c.revision.name for c in checkpoints}
    waiting = None  # the reference's result, until its `_prev` rows are made (see `Dynamics.complete`)
    with closing(streamed(holding, checkpoints, config.prefetch, ahead)) as stream:
        for checkpoint, fetch_error, loading in stream:
            if dynamics is not None:
                dynamics.handed(checkpoint)
            start = time.perf_counter()
            try:
                if fetch_error is not None:
                    raise fetch_error
                _revision_row(checkpoint)  # reads what is recorded beside the weights: a bad record fails early
                check_weights(checkpoint)
                loaded = ahead.take(loading, checkpoint) if ahead is not None else None
                loading = None
                scored, frame = score_stably(checkpoint, calibration, config, device, dtype, loaded, dynamics)
                row = _revision_row(scored)
            except REVISION_ERRORS as err:
                _drop_locals(err)  # its frames hold the model: freed before the next is loaded
                yield checkpoint, None, err, time.perf_counter() - start
                continue
            finally:
                loading = loaded = None  # freed before the next is loaded
            if dynamics is not None and dynamics.waiting is not None and dynamics.waiting[0] == scored:
                waiting = (scored, row, frame, time.perf_counter() - start)
                continue
            yield scored, (row, frame), None, time.perf_counter() - start
            if waiting is not None and (whole := dynamics.complete(waiting[2])) is not None:
                yield waiting[0], (waiting[1], whole), None, waiting[3]
                waiting = None
        if waiting is not None:  # the checkpoint before it failed: its outputs are made now
            try:
                yield waiting[0], (waiting[1], dynamics.complete(waiting[2], now=True)), None, waiting[3]
            except REVISION_ERRORS as err:
                yield waiting[0], None, err, waiting[3]


def scan(config: ScanConfig) -> pl.DataFrame:
    """Score every selected revision that the store lacks; return one summary row per revision.

    Raises `SourceError`, `SelectionError`, `CalibrationError`, `ConfigError` or `StoreError` (all `CkptTraceError`)
    for bad input, before any revision is scored; a revision that fails to fetch, load or score raises its error
    (`REVISION_ERRORS`) after it is recorded in runs/, unless `keep_going`; OSError where the store cannot be
    written."""
    if config.metrics is None:  # the ground truth and the training dynamics too where they are cheap: the micro suite
        micro = (*METRICS, "angular_distance", SPAN, ABLATION, *DYNAMICS)
        config = replace(config, metrics=resolve_metrics(micro if config.source is None else METRICS, config.tokens))
    store = Store(config.store)
    if config.ray:  # each worker resolves its own device; the dtype, part of what is stored, is settled here
        from .ray import cluster_dtype

        device, dtype = None, cluster_dtype(config.dtype, config.ray_timeout)
    else:
        device = resolve_device(config.device)  # bad options fail before any work
        dtype = resolve_dtype(config.dtype, device)
    for file in remove_stale_temporaries(store.root):
        log.info("removed %s, left by a scan that was killed while writing it", file)
    if config.source is None:
        from ..microsuite.suite import build

        source = open_source(build(progress=config.progress))
    else:
        source = open_source(config.source, config.cache_dir)
    checkpoints = source.checkpoints(config.revisions, config.branch)
    # Tokenized by the first revision that has weights (a Hub repo's main may hold only a README).
    first = next((c for c in checkpoints if c.weights is not None), checkpoints[0])
    calibration = build_calibration(source.metadata(first), config.calibration)
    lined = plan(source, checkpoints, config.metrics, config.reference, config.branch)  # of the whole selection
    if config.shard is not None:  # every shard tokenizes with the same revision, so all share one calibration set
        checkpoints = shard(checkpoints, *config.shard)
        if first not in checkpoints:
            source.release(first)  # its metadata: the shard that scores it evicts it

    statuses, todo, keys = {}, [], {}
    for checkpoint in checkpoints:
        name = checkpoint.revision.name
        key = keys[name] = score_key(checkpoint, dtype, calibration.id)
        if checkpoint.weights is None and not isinstance(checkpoint.files, Exception) and not holds_config(checkpoint):
            statuses[name] = ("skipped", None, "no model: no weight files in this revision, and no config.json")
        elif checkpoint.duplicate_of is not None:
            why = f"same weights as {checkpoint.duplicate_of}"
            store.write_revision(_revision_row(checkpoint))
            store.write_run(_run_row(checkpoint, key, "duplicate", why, 0.0))
            statuses[name] = ("duplicate", None, why)
        elif (why := why_score(store, key, config.force, lined.metrics_of(checkpoint, config.metrics) if lined
                               else config.metrics, lined and lined.against(checkpoint))) is None:
            statuses[name] = ("stored", None, "same weights and config, dtype, calibration set and scorer")
            try:  # this source holds it too: its record says so (scores are stored by content, once)
                store.write_revision(_revision_row(checkpoint))
            except SourceError as err:
                log.warning("revision %s: %s", name, one_line(err))
        else:
            statuses[name] = ("to score", None, why)
            todo.append(checkpoint)
    if lined is not None:  # the reference first: every other checkpoint is measured against its outputs
        todo.sort(key=lambda c: c.weights != lined.reference.weights)
    to_score = {c.revision.name for c in todo}
    for checkpoint in checkpoints:
        if checkpoint.revision.name not in to_score:  # metadata fetched above, or what an interrupted scan left
            source.release(checkpoint)

    bar = tqdm(total=len(todo), desc="revisions", unit="rev", disable=None if config.progress else True)
    dynamics = None
    if config.ray:
        from .ray import scored_on_ray

        where = source.root if config.source is None else config.source
        local = os.path.exists(where)  # a path, made absolute for workers that run elsewhere; else a repo id
        results = scored_on_ray(score_revision, os.path.abspath(where) if local else str(where),
                                config.cache_dir and os.path.abspath(config.cache_dir), todo, calibration, config, dtype,
                                lined)
    else:
        dynamics = Dynamics(lined, source, calibration, config, device, dtype) if lined and todo else None
        results = scored_here(source, todo, calibration, config, device, dtype, dynamics)
    done: set[str] = set()
    try:
        _store_results(store, config, results, keys, statuses, calibration, dtype, source, bar, done)
    except KeyboardInterrupt:  # the attempts under way are recorded as such; a killed process records nothing
        waiting = [c for c in todo if c.revision.name not in done]  # in this process, the first is under way
        for checkpoint in waiting if config.ray else waiting[:1]:
            store.write_run(_run_row(checkpoint, keys[checkpoint.revision.name], "interrupted", "interrupted", 0.0))
        raise
    finally:
        if dynamics is not None:
            dynamics.close()
    bar.close()
    return summarize(store, [keys[c.revision.name] for c in checkpoints], statuses)


def _store_results(store: Store, config: ScanConfig, results, keys: dict, statuses: dict, calibration, dtype, source,
                   bar, done: set[str]) -> None:
    """Store each revision's rows as its result comes, and record every attempt in runs/."""
    with closing(results):  # on an early exit, what the stream holds (a model, the cache) is released now
        for checkpoint, result, error, seconds in results:
            if config.ray:  # a worker fetched and released it; what this process holds of it (metadata) goes too
                source.release(checkpoint)
            name = checkpoint.revision.name
            key, why = keys[name], statuses[name][2]
            bar.set_postfix_str(name)
            if error is not None:
                store.write_run(_run_row(checkpoint, key, "failed", str(error), seconds))
                done.add(name)
                if not config.keep_going:
                    bar.close()
                    raise error
                message = one_line(error)
                log.warning("revision %s failed: %s", name, message)
                statuses[name] = ("failed", seconds, message)
                done.add(name)
                bar.update()
                continue
            row, frame = result
            if checkpoint.weights != key.weights:  # its files changed after they were listed: stored as loaded
                key = keys[name] = score_key(checkpoint, dtype, calibration.id)
                log.warning("the files of %s changed after the scan listed them; stored as the files loaded (%s)",
                            name, checkpoint.weights)
            if not config.force:
                frame = keep_stored(store, key, frame)
            # The revision row first, the scores last: whole scores on disk mean the revision is stored whole, and a
            # scan killed between the two writes scores it again on resume.
            store.write_revision(row)
            store.write_scores(frame)
            store.write_run(_run_row(checkpoint, key, "scored", None, seconds))
            statuses[name] = ("scored", seconds, why)
            done.add(name)
            bar.update()


def summarize(store: Store, keys: list[ScoreKey], statuses: dict[str, tuple]) -> pl.DataFrame:
    """Per revision: status, why, seconds, and the mean importance of each module type, from the scores of its key."""
    if not keys:  # a shard with no revision of the selection
        return pl.DataFrame(schema={"revision": pl.String, "status": pl.String, "seconds": pl.Float64, "step": pl.Int64,
                                    "why": pl.String, "weights": pl.String, "dtype": pl.String,
                                    "calibration": pl.String, "scorer": pl.Int32})
    status = pl.DataFrame(
        [(k.revision, *statuses[k.revision]) for k in keys], orient="row",
        schema={"revision": pl.String, "status": pl.String, "seconds": pl.Float64, "why": pl.String},
    )
    wanted = pl.DataFrame([(k.revision, k.weights) for k in keys], schema={"revision": pl.String, "weights": pl.String},
                          orient="row")
    stored = [frame for frame in map(store.read_scores, keys) if frame is not None]  # exactly the scan's keys
    scores = pl.concat(stored) if stored else pl.DataFrame(schema=SCORES_SCHEMA)
    means = (
        scores.filter(pl.col("metric") == "importance").group_by("revision", "step", "module")
        .agg(pl.col("value").mean())
        .pivot(on="module", index=["revision", "step"], values="value")
    )
    modules = [m for m in MODULES if m in means.columns]
    return (status.join(means.select("revision", "step", *modules), on="revision", how="left", maintain_order="left")
            .join(wanted, on="revision", how="left", maintain_order="left")
            .with_columns(dtype=pl.lit(keys[0].dtype), calibration=pl.lit(keys[0].calibration), scorer=pl.lit(keys[0].scorer))
            .select("revision", "status", "seconds", "step", *modules, "why", "weights", "dtype", "calibration", "scorer"))
