"""Scan a checkpoint suite: score every revision and store the scores.

Revisions are streamed: while one is scored, the next is fetched on a background
thread. A fetched revision is released (for the Hub: deleted from the cache, if
ckpt-trace downloaded it) once its scores are stored, and only while no fetch is in
flight, so the cache never holds more than two revisions' weights and eviction never
races a download that could share a blob. Revisions already in the store are skipped,
so a scan that was interrupted, by Ctrl-C, SIGKILL or a crash, picks up where it stopped.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, wait
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import polars as pl
import torch
from tqdm.auto import tqdm

from . import __version__
from .adapters import adapter_for_type
from .calibration import CalibrationSet, CalibrationSpec, fit_seq_len, load_calibration
from .errors import REVISION_ERRORS, CalibrationError, ConfigError, SourceError
from .models import dtype_name, load_model, load_tokenizer, max_positions, read_config, resolve_device, resolve_dtype
from .scoring import (
    ABLATION, ALL_METRICS, CHEAP, LAST, METRICS, MODULES, SCORER_VERSION, SPAN, ablation_losses, score,
)
from .sources import Checkpoint, open_source
from .paths import remove_stale_temporaries
from .store import REVISIONS_SCHEMA, RUNS_SCHEMA, SCORES_SCHEMA, ScoreKey, Store

log = logging.getLogger(__name__)

PREFETCH = 1
"""Revisions fetched ahead of the one being scored, by default (see `streamed`; measured in benchmarks/)."""


@dataclass(kw_only=True)
class ScoringOptions:
    """How checkpoints are loaded and scored; shared by scans and pruning."""

    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    """Which calibration set to score on."""
    batch_size: int = 8
    """Sequences per forward pass."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    device_map: str | dict | None = None
    """Split the model over devices instead: auto, balanced or sequential (every GPU, then the CPU, placed by
    accelerate), or a map of module names to devices. None: all of it on `device`."""
    dtype: str = "auto"
    """auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16."""
    store: str | os.PathLike = "data"
    """Store directory."""
    cache_dir: str | os.PathLike | None = None
    """Hugging Face cache for Hub sources; None: the usual one (HF_HUB_CACHE)."""
    trust_remote_code: bool = False
    """Allow a checkpoint's own modeling code to run."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if isinstance(self.device_map, str) and self.device_map not in DEVICE_MAPS:
            raise ConfigError(f"unknown device map {self.device_map!r}; use {', '.join(DEVICE_MAPS)}")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class Loaded:
    """One checkpoint of a source, fetched and loaded (see `loaded`)."""

    source: object
    checkpoint: Checkpoint
    path: str | os.PathLike
    model: torch.nn.Module
    dtype: torch.dtype


@contextmanager
def loaded(options: ScoringOptions, source: str | os.PathLike, revision: str | None) -> Iterator[Loaded]:
    """The revision `revision` of `source` (default: the last in training order), fetched and loaded on the options'
    device and dtype; released (for the Hub: its download evicted) on exit."""
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    opened = open_source(source, options.cache_dir)
    checkpoint = opened.checkpoints(revision or "last:1")[-1]
    fetched = opened.fetch(checkpoint)
    try:
        model = load_model(fetched.path, device, dtype, options.trust_remote_code, options.device_map)
        yield Loaded(opened, checkpoint, fetched.path, model, dtype)
    finally:
        opened.release(fetched)


@dataclass
class ScanConfig(ScoringOptions):
    """Everything a scan needs; the command line only fills this in."""

    source: str | os.PathLike | None = None
    """A Hub repo id, a model directory, or a directory of revision subdirectories; None: the micro suite."""
    revisions: str | None = None
    """Selection spec (see `ckpt_trace.revisions.select`); all revisions when None."""
    branch: str | None = None
    """The side line of training that ranges and counts select from, with the trunk into it; None: the trunk."""
    force: bool = False
    """Score revisions again even when their scores are stored."""
    keep_going: bool = False
    """Record a failing revision in runs/ and go on, instead of stopping."""
    prefetch: int = PREFETCH
    """Revisions downloaded ahead of the one being scored (each takes its place in the cache)."""
    load_ahead: bool | None = None
    """Load the next revision's model while one is scored (two models in memory); None: on a GPU, where two fit in
    half its free memory and no device map splits them (see `loads_ahead`)."""
    shard: tuple[int, int] | None = None
    """(I, N): scan only the I-th (from 1) of N parts of the selected revisions (see `shard`)."""
    ray: bool = False
    """Spread the revisions over a Ray cluster (``RAY_ADDRESS``, else a local instance): see `ckpt_trace.distributed`."""
    metrics: tuple[str, ...] | None = None
    """Metrics to store (`ckpt_trace.scoring.ALL_METRICS`): importance and update_ratio always; angular_distance,
    span_distance and the `_last` variants from the same pass where asked; ablation_loss where asked (one forward
    pass more per layer and module). None: the two, and ablation_loss too for the micro suite (no source)."""
    tokens: str = "all"
    """`last`: the asked one-pass metrics over each sequence's last real token only (their `_last` variants)."""

    def __post_init__(self):
        super().__post_init__()
        if self.ray:
            from .distributed import ray_module

            ray_module()  # fails now, not after the set-up, where Ray is missing
        if self.prefetch < 1:
            raise ConfigError(f"--prefetch {self.prefetch} is not a number of revisions; use 1 or more")
        if self.ray and (self.load_ahead or self.prefetch != PREFETCH):  # each Ray task fetches and loads one revision
            given = "--load-ahead" if self.load_ahead else f"--prefetch {self.prefetch}"
            raise ConfigError(f"{given} streams revisions through this process, which --ray does not: each Ray task "
                              f"downloads and loads its own revision, as many at once as the cluster runs; drop one")
        if self.shard is not None:
            index, count = self.shard
            if not 1 <= index <= count:
                raise ConfigError(f"--shard {index}/{count} is not I/N with 1 <= I <= N")
        if self.tokens not in TOKENS:
            raise ConfigError(f"--tokens {self.tokens!r} is not one of: {', '.join(TOKENS)}")
        if self.metrics is not None:
            unknown = [m for m in self.metrics if m not in ALL_METRICS]
            if unknown or not self.metrics:
                raise ConfigError(f"unknown metric {', '.join(unknown) or repr('')}; use some of: {', '.join(ALL_METRICS)}")
            self.metrics = resolve_metrics(self.metrics, self.tokens)


TOKENS = ("all", "last")


def shard(checkpoints: list, index: int, count: int) -> list:
    """The `index`-th (from 1) of `count` parts of the revisions, in training order: every count-th from the
    index-th, so that each part spans training alike. The parts are disjoint and together are all of them, for any
    process that selects the same revisions: a job array of N scans, or N shells, shares one store."""
    return checkpoints[index - 1::count]


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N)."""
    index, slash, count = text.partition("/")
    if not (slash and index.strip().isdigit() and count.strip().isdigit()):
        raise ConfigError(f"--shard {text!r} is not I/N (for example 1/4: the first of 4 parts)")
    return int(index), int(count)


def resolve_metrics(metrics: tuple[str, ...], tokens: str = "all") -> tuple[str, ...]:
    """The metrics a scan stores, in a fixed order: the asked ones (with `tokens` last, the one-pass ones as their
    `_last` variants), and importance and update_ratio over every token always."""
    if tokens == "last":
        metrics = tuple(m + LAST if m in CHEAP else m for m in metrics)
    return tuple(m for m in ALL_METRICS if m in metrics or m in METRICS)


def build_calibration(model_dir, spec: CalibrationSpec) -> CalibrationSet:
    """The scan's one calibration set, tokenized by (and checked against) the model in `model_dir`."""
    config = read_config(model_dir)
    adapter_for_type(config.get("model_type"))
    limit = max_positions(config)
    spec = fit_seq_len(spec, limit)
    calibration = load_calibration(spec, load_tokenizer(model_dir))
    if isinstance(config.get("vocab_size"), int):
        calibration.check_vocab(config["vocab_size"])
    if limit is not None and calibration.max_len > limit:
        raise CalibrationError(
            f"calibration sequences have {calibration.max_len} tokens, more than the model's {limit} positions; "
            f"use --seq-len {limit} or less"
        )
    return calibration


def score_checkpoint(
    checkpoint: Checkpoint, calibration: CalibrationSet, config: ScanConfig, device: torch.device, dtype: torch.dtype,
    model: torch.nn.Module | None = None,
) -> pl.DataFrame:
    """Score one fetched checkpoint (loaded here, unless its `model` is given) and return its rows in the store's
    scores schema."""
    if model is None:
        model = load_model(checkpoint.path, device, dtype, config.trust_remote_code, config.device_map)
    label = checkpoint.revision.name if config.progress else False
    frame = score(model, calibration, config.batch_size, progress=label, metrics=config.metrics or METRICS)
    if ABLATION in (config.metrics or ()):
        frame = pl.concat([frame, ablation_losses(model, calibration, config.batch_size, progress=label)])
    rev = checkpoint.revision
    return frame.with_columns(
        model=pl.lit(checkpoint.model),
        revision=pl.lit(rev.name),
        commit=pl.lit(rev.commit, pl.String),
        weights=pl.lit(checkpoint.weights, pl.String),
        step=pl.lit(rev.step, pl.Int64),
        branch=pl.lit(rev.branch, pl.String),
        tokens=pl.lit(rev.tokens, pl.Int64),
        calibration=pl.lit(calibration.id),
        dtype=pl.lit(dtype_name(dtype)),
        scorer=pl.lit(SCORER_VERSION, pl.Int32),
        version=pl.lit(__version__),
        created=pl.lit(datetime.now(timezone.utc), pl.Datetime("us", "UTC")),
    )


def score_key(checkpoint: Checkpoint, dtype: torch.dtype, calibration: str) -> ScoreKey:
    """What the scores of a checkpoint scanned with this dtype and calibration set are stored under."""
    return ScoreKey(checkpoint.model, checkpoint.revision.name, checkpoint.weights, dtype_name(dtype), calibration,
                    SCORER_VERSION)


def keep_stored(store: Store, key: ScoreKey, frame: pl.DataFrame) -> pl.DataFrame:
    """The new scores with the stored metrics of the same key that were not measured again (an earlier scan's
    ablation_loss, say): the same weights, dtype, calibration set and scorer gave both, so one file holds both.
    Their `version` stays the one that measured them; `created` becomes the file's."""
    stored = store.read_scores(key, ())
    if stored is None:
        return frame
    kept = stored.filter(~pl.col("metric").is_in(frame["metric"].unique().implode()))
    if kept.height == 0:
        return frame
    return pl.concat([frame, kept.select(frame.columns).with_columns(created=frame["created"][0])], how="vertical_relaxed")


def why_score(store: Store, key: ScoreKey, force: bool, metrics: tuple[str, ...] = METRICS) -> str | None:
    """Why a checkpoint is to be scored, or None when whole scores of exactly its key, with these metrics, are stored."""
    if force:
        return "--force"
    if store.has_scores(key, metrics):
        return None
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
        "model": checkpoint.model, "revision": rev.name, "commit": rev.commit, "weights": checkpoint.weights, "step": rev.step,
        "tokens": rev.tokens, "stage": rev.stage, "branch": rev.branch, "val_loss": checkpoint.val_loss(),
        "weight_bytes": checkpoint.weight_bytes, "duplicate_of": checkpoint.duplicate_of,
    }
    return pl.DataFrame([row], schema=REVISIONS_SCHEMA)


def _run_row(checkpoint: Checkpoint, key: ScoreKey, status: str, error: str | None, seconds: float) -> pl.DataFrame:
    row = {
        "model": checkpoint.model, "revision": checkpoint.revision.name, "weights": checkpoint.weights,
        "dtype": key.dtype, "calibration": key.calibration,
        "status": status, "error": error, "seconds": seconds, "finished_at": datetime.now(timezone.utc),
        "version": __version__,
    }
    return pl.DataFrame([row], schema=RUNS_SCHEMA)


class _Worker:
    """One daemon thread that runs jobs in the order they are given (an interrupted scan does not wait for it): the
    fetches, and the releases between them, so that an eviction never races a download that could share a blob."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def submit(self, fn, arg) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, arg))
        return future

    def close(self, wait: bool = False) -> None:
        """No more jobs; with `wait`, return once those given have run."""
        self._jobs.put(None)
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, arg = job
            if not future.set_running_or_notify_cancel():
                continue  # cancelled before it started
            try:
                future.set_result(fn(arg))
            except BaseException as err:  # handed to the caller of result()
                future.set_exception(err)


def streamed(source, checkpoints: list[Checkpoint], depth: int = PREFETCH,
             prepare: Callable[[Checkpoint], object] | None = None) -> Iterator[tuple[Checkpoint, Exception | None, Future | None]]:
    """Yield each checkpoint fetched (or the error that stopped its fetch) while the next `depth` are fetched, one
    after another on one background thread.

    With `prepare` (loading the weights, say), each checkpoint also comes with a future of `prepare(checkpoint)`,
    run on a second thread as soon as the checkpoint is fetched and the one before it handed out: the next
    revision is prepared while the caller works on the current one, and at most one is prepared ahead. The
    caller drops what it was handed before it asks for the next, so that two prepared revisions at most are alive.

    A checkpoint is released once the caller asks for the next one (and its preparation, which reads it, is done),
    on the fetch thread between two fetches, whether its fetch succeeded or not: the cache holds the revision
    being scored, those fetched ahead, and the one downloading. On an early exit, no preparation starts any more
    and one under way is waited for (a thread still inside torch must not outlive the interpreter), not the fetch
    it may wait on; then the checkpoint in hand and those fetched ahead are released after the fetch in flight if
    the process lives on; else the next scan evicts them.
    """
    def release(checkpoint: Checkpoint) -> None:
        try:
            source.release(checkpoint)
        except Exception as err:  # the scores are stored; a file left in the cache is the next scan's to evict
            log.warning("could not evict %s from the cache: %s", checkpoint.revision.name, err)

    stop, preparing = threading.Event(), threading.Lock()

    def prepared(index: int):
        checkpoint = futures[index].result()  # a failed fetch fails this too; the caller sees the fetch error
        with preparing:
            if stop.is_set():
                raise CancelledError("the stream stopped")
            return prepare(checkpoint)

    worker, loader = _Worker(), _Worker() if prepare is not None else None
    futures = [worker.submit(source.fetch, c) for c in checkpoints[:depth]]
    ahead = loader.submit(prepared, 0) if loader is not None and checkpoints else None
    handed, held, finished = 0, None, False
    try:
        for i, checkpoint in enumerate(checkpoints):
            try:
                fetched, error = futures[i].result(), None
            except Exception as err:
                fetched, error = checkpoint, err
            handed = i + 1
            if i + depth < len(checkpoints):
                futures.append(worker.submit(source.fetch, checkpoints[i + depth]))
            current, ahead = ahead, (loader.submit(prepared, i + 1) if loader is not None and i + 1 < len(checkpoints)
                                     else None)
            held = fetched  # a failed fetch may have left part of the revision behind
            yield fetched, error, current
            if current is not None:
                wait([current])  # done already where the caller took its result
            del current  # the caller's to keep or drop
            worker.submit(release, held)
            held = None
        finished = True
    finally:
        if loader is not None:  # none starts now; one under way ends first (a thread inside torch at exit aborts)
            stop.set()
            _await_unlocked(preparing)
            loader.close()
        if held is not None:
            worker.submit(release, held)
        for checkpoint in checkpoints[handed:len(futures)]:  # fetched ahead, never handed out
            worker.submit(release, checkpoint)
        worker.close(wait=finished)  # a scan that ran to the end leaves the cache as it found it


def _await_unlocked(lock: threading.Lock) -> None:
    """Return once no one holds `lock`; a Ctrl-C meanwhile is said and waited through."""
    while True:
        try:
            with lock:
                return
        except KeyboardInterrupt:
            log.warning("finishing the model load under way before stopping")


def score_revision(source: str, cache_dir, checkpoint: Checkpoint, calibration: CalibrationSet, config: ScanConfig,
                   dtype: torch.dtype) -> tuple[pl.DataFrame, pl.DataFrame]:
    """On a Ray worker: fetch, load and score one revision, then release it; its revision row and its scores."""
    opened = open_source(source, cache_dir)
    fetched = checkpoint
    try:
        fetched = opened.fetch(checkpoint)
        device = resolve_device(config.device)  # the worker's own: the GPU Ray gave the task, else the CPU
        return _revision_row(fetched), score_checkpoint(fetched, calibration, config, device, dtype)
    finally:
        opened.release(fetched)  # a download cut short too


def scored_here(source, checkpoints: list[Checkpoint], calibration: CalibrationSet, config: ScanConfig,
                device: torch.device, dtype: torch.dtype) -> Iterator[tuple[Checkpoint, tuple | None, Exception | None, float]]:
    """Yield (checkpoint, (revision row, scores) or None, error or None, seconds) for each checkpoint, streamed
    (see `streamed`) and scored in this process; with load-ahead (see `loads_ahead`, `LoadAhead`), each revision's
    model is loaded while the one before it is scored."""
    def load(checkpoint: Checkpoint) -> torch.nn.Module:
        return load_model(checkpoint.path, device, dtype, config.trust_remote_code, config.device_map)

    ahead = LoadAhead(load) if loads_ahead(config, checkpoints, device, dtype) else None
    with closing(streamed(source, checkpoints, config.prefetch, ahead)) as stream:
        for checkpoint, fetch_error, model in stream:
            start = time.perf_counter()
            try:
                if fetch_error is not None:
                    raise fetch_error
                row = _revision_row(checkpoint)  # reads what is recorded beside the weights: a bad record fails early
                frame = score_checkpoint(checkpoint, calibration, config, device, dtype,
                                         ahead.take(model, checkpoint) if ahead is not None else None)
            except REVISION_ERRORS as err:
                _drop_locals(err)  # its frames hold the model: freed before the next is loaded
                yield checkpoint, None, err, time.perf_counter() - start
                continue
            finally:
                model = None  # freed before the next is loaded
            yield checkpoint, (row, frame), None, time.perf_counter() - start


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """An error and its causes (or, where none, the errors it was raised in handling), each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _drop_locals(err: BaseException) -> None:
    """Clear the locals of the finished frames in the tracebacks of an error and its causes (a model, or what was
    loaded of it, among them), keeping the tracebacks themselves; frames still running (on any thread) or of a
    generator (which clearing would close) are left."""
    for each in _chain(err):
        frame = each.__traceback__
        while frame is not None:
            if not frame.tb_frame.f_code.co_flags & (inspect.CO_GENERATOR | inspect.CO_COROUTINE
                                                     | inspect.CO_ASYNC_GENERATOR):
                try:
                    frame.tb_frame.clear()
                except RuntimeError:  # running
                    pass
            frame = frame.tb_next


def _out_of_memory(err: BaseException) -> bool:
    """Whether an error, or one of its causes, is the device running out of memory."""
    return any(isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower() for e in _chain(err))


class LoadAhead:
    """Loads models for `streamed` to hand out one revision ahead, until a load runs out of memory beside the model
    being scored: from then on it loads none, and drops the one it holds, so that each revision after is loaded
    alone, never failed for the one before it."""

    def __init__(self, load: Callable[[Checkpoint], torch.nn.Module]):
        self._load, self._lock, self._on, self._held = load, threading.Lock(), True, None

    def __call__(self, checkpoint: Checkpoint) -> list[torch.nn.Module]:
        """On the loader thread: [the model], or [] once loading ahead is off."""
        with self._lock:
            if not self._on:
                return []
            self._held = [self._load(checkpoint)]
            return self._held

    def take(self, future: Future, checkpoint: Checkpoint) -> torch.nn.Module | None:
        """The model loaded ahead for `checkpoint`; None for the caller to load it alone (loading ahead is off, or
        ran out of memory: then it goes off)."""
        try:
            held = future.result()
        except SourceError as err:
            if not _out_of_memory(err):
                raise
            _drop_locals(err)  # what was loaded of it
            with self._lock:  # a load under way ends first; none starts after
                self._on = False
                if self._held:
                    self._held.clear()  # the next revision, loaded meanwhile
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("loading %s beside the model being scored ran out of memory; loading it and every revision "
                        "after it alone", checkpoint.revision.name)
            return None
        return held.pop() if held else None


def loads_ahead(config: ScanConfig, checkpoints: list[Checkpoint], device: torch.device, dtype: torch.dtype) -> bool:
    """Whether to load the next revision while one is scored: `ScanConfig.load_ahead` where given; else on a GPU
    where no device map splits the model and two of the largest revision, in `dtype`, take at most half its free
    memory (what other processes hold of a shared GPU is not there to take).

    On the CPU, loading and scoring share the same cores, so it is off there unless asked for (measured in
    benchmarks/stream_overlap.py)."""
    if config.load_ahead is not None:
        return config.load_ahead
    if device.type != "cuda" or config.device_map is not None or not checkpoints:
        return False
    largest = max(c.weight_bytes or 0 for c in checkpoints)
    in_memory = largest * max(1.0, dtype.itemsize / 2)  # files of 16-bit weights grow in float32
    free, _ = torch.cuda.mem_get_info(device)
    return 2 * in_memory <= free / 2


def scan(config: ScanConfig) -> pl.DataFrame:
    """Score every selected revision that the store lacks; return one summary row per revision."""
    if config.metrics is None:  # the ground truth too where it is cheap: the micro suite
        micro = (*METRICS, "angular_distance", SPAN, ABLATION)
        config = replace(config, metrics=resolve_metrics(micro if config.source is None else METRICS, config.tokens))
    store = Store(config.store)
    if config.ray:  # each worker resolves its own device; the dtype, part of what is stored, is settled here
        from .distributed import cluster_dtype

        device, dtype = None, cluster_dtype(config.dtype)
    else:
        device = resolve_device(config.device)  # bad options fail before any work
        dtype = resolve_dtype(config.dtype, device)
    for file in remove_stale_temporaries(store.root):
        log.info("removed %s, left by a scan that was killed while writing it", file)
    if config.source is None:
        from .microsuite import build

        source = open_source(build(progress=config.progress))
    else:
        source = open_source(config.source, config.cache_dir)
    checkpoints = source.checkpoints(config.revisions, config.branch)
    # Tokenized by the first revision that has weights (a Hub repo's main may hold only a README).
    first = next((c for c in checkpoints if c.weights is not None), checkpoints[0])
    calibration = build_calibration(source.metadata(first), config.calibration)
    if config.shard is not None:  # every shard tokenizes with the same revision, so all share one calibration set
        checkpoints = shard(checkpoints, *config.shard)
        if first not in checkpoints:
            source.release(first)  # its metadata: the shard that scores it evicts it

    statuses, todo, keys = {}, [], {}
    for checkpoint in checkpoints:
        name = checkpoint.revision.name
        key = keys[name] = score_key(checkpoint, dtype, calibration.id)
        if checkpoint.weights is None and not isinstance(checkpoint.files, Exception):
            statuses[name] = ("skipped", None, "no weight files in this revision")
        elif checkpoint.duplicate_of is not None:
            why = f"same weights as {checkpoint.duplicate_of}"
            store.write_revision(_revision_row(checkpoint))
            store.write_run(_run_row(checkpoint, key, "duplicate", why, 0.0))
            statuses[name] = ("duplicate", None, why)
        elif (why := why_score(store, key, config.force, config.metrics)) is None:
            statuses[name] = ("stored", None, "same weights, dtype, calibration set and scorer")
        else:
            statuses[name] = ("to score", None, why)
            todo.append(checkpoint)
    to_score = {c.revision.name for c in todo}
    for checkpoint in checkpoints:
        if checkpoint.revision.name not in to_score:  # metadata fetched above, or what an interrupted scan left
            source.release(checkpoint)

    bar = tqdm(total=len(todo), desc="revisions", unit="rev", disable=None if config.progress else True)
    if config.ray:
        from .distributed import scored_on_ray

        where = source.root if config.source is None else config.source
        local = os.path.exists(where)  # a path, made absolute for workers that run elsewhere; else a repo id
        results = scored_on_ray(score_revision, os.path.abspath(where) if local else str(where),
                                config.cache_dir and os.path.abspath(config.cache_dir), todo, calibration, config, dtype)
    else:
        results = scored_here(source, todo, calibration, config, device, dtype)
    with closing(results):  # on an early exit, what the stream holds (a model, the cache) is released now
        for checkpoint, result, error, seconds in results:
            if config.ray:  # a worker fetched and released it; what this process holds of it (metadata) goes too
                source.release(checkpoint)
            name = checkpoint.revision.name
            key, why = keys[name], statuses[name][2]
            bar.set_postfix_str(name)
            if error is not None:
                store.write_run(_run_row(checkpoint, key, "failed", str(error), seconds))
                if not config.keep_going:
                    bar.close()
                    raise error
                message = " ".join(str(error).split())
                log.warning("revision %s failed: %s", name, message)
                statuses[name] = ("failed", seconds, message)
                bar.update()
                continue
            row, frame = result
            if not config.force:
                frame = keep_stored(store, key, frame)
            # The revision row first, the scores last: whole scores on disk mean the revision is stored whole, and a
            # scan killed between the two writes scores it again on resume.
            store.write_revision(row)
            store.write_scores(frame)
            store.write_run(_run_row(checkpoint, key, "scored", None, seconds))
            statuses[name] = ("scored", seconds, why)
            bar.update()
    bar.close()
    return summarize(store, [keys[c.revision.name] for c in checkpoints], statuses)


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
