"""Streaming: the next revisions fetched, and the next model loaded, while one is scored.

While one revision is scored, the next is fetched on a background thread. A fetched revision
is released (for the Hub: deleted from the cache, if ckpt-trace downloaded it) once its scores
are stored, and only while no fetch is in flight, so the cache never holds more than two
revisions' weights and eviction never races a download that could share a blob.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, wait

import torch

from ..errors import SourceError
from ..fetch.sources import Checkpoint
from .options import PREFETCH, ScanConfig

log = logging.getLogger(__name__)

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
        except OSError as err:  # the scores are stored; a file left in the cache is the next scan's to evict
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
    handed, held, finished, releases = 0, None, False, []
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
            releases.append(worker.submit(release, held))
            held = None
        finished = True
    finally:
        if loader is not None:  # none starts now; one under way ends first (a thread inside torch at exit aborts)
            stop.set()
            _await_unlocked(preparing)
            loader.close()
        if held is not None:
            releases.append(worker.submit(release, held))
        for checkpoint in checkpoints[handed:len(futures)]:  # fetched ahead, never handed out
            releases.append(worker.submit(release, checkpoint))
        worker.close(wait=finished)  # a scan that ran to the end leaves the cache as it found it
        if finished:
            for released in releases:
                released.result()  # a release that failed other than on the disk is a bug: raised, not lost

def _await_unlocked(lock: threading.Lock) -> None:
    """Return once no one holds `lock`; a Ctrl-C meanwhile is said and waited through."""
    while True:
        try:
            with lock:
                return
        except KeyboardInterrupt:
            log.warning("finishing the model load under way before stopping")


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

    def __init__(self, load: Callable[[Checkpoint], object]):
        self._load, self._lock, self._on, self._held = load, threading.Lock(), True, None

    def __call__(self, checkpoint: Checkpoint) -> list:
        """On the loader thread: [what `load` gives: the model, with what it needs beside it], or [] once loading
        ahead is off."""
        with self._lock:
            if not self._on:
                return []
            self._held = [self._load(checkpoint)]
            return self._held

    def take(self, future: Future, checkpoint: Checkpoint):
        """What was loaded ahead for `checkpoint`; None for the caller to load it alone (loading ahead is off, or
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
