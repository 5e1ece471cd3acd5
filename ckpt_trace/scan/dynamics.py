"""Training dynamics in a scan: the line of checkpoints, its reference, each checkpoint's previous one, and what is
kept of them while the scan runs.

The line is the selected revisions that have weights of their own (a duplicate is its original), in training order:
one line of training, the trunk or a side line with the trunk into it. Its reference is its last checkpoint, or the
revision `--reference` names. Each `_final` metric of a checkpoint is measured against the reference, each `_prev`
metric against the checkpoint before it on the line (the first has none), and the identity of that checkpoint is
stored with the rows (`reference`, `reference_weights`).

While a scan runs, the reference's sampled outputs (`ckpt_trace.scoring.representations`) are kept on disk and its
files stay fetched, and each checkpoint's outputs and files are kept until the next one is scored. Outputs that are
not there when needed (the reference or a previous checkpoint whose scores are stored already, a shard, a Ray task)
are made by one more pass of that checkpoint's model, once per scan (per process on Ray).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import torch

from ..calibration.sets import CalibrationSet
from ..errors import ConfigError, SelectionError
from ..fetch.sources import Checkpoint, changed_error, identified_now
from ..model.loading import dtype_name, load_model
from ..scoring.metrics import CKA_METRICS, DYNAMICS, SCORE_SCHEMA, WEIGHT_METRICS, score
from ..scoring.representations import OutputSample, cka_frame, save_outputs
from ..scoring.weights import structure, weight_metrics

FINAL = ("weight_change_final", "cka_final")
PREVIOUS = ("weight_change_prev", "cka_prev")


@dataclass(frozen=True)
class Plan:
    """Which dynamics metrics a scan stores, and against which checkpoints."""

    metrics: tuple[str, ...]
    reference: Checkpoint
    previous: dict[str, Checkpoint]
    """Revision name -> the checkpoint before it on the line."""

    def against(self, checkpoint: Checkpoint) -> dict[str, Checkpoint]:
        """The checkpoint each of a checkpoint's dynamics metrics is measured against (none for weight_norm; the
        `_prev` metrics only where it has a previous checkpoint)."""
        previous = self.previous.get(checkpoint.revision.name)
        return {m: self.reference if m in FINAL else previous for m in self.metrics
                if m in FINAL or (m in PREVIOUS and previous is not None)}

    def metrics_of(self, checkpoint: Checkpoint, metrics: tuple[str, ...]) -> tuple[str, ...]:
        """The scan's `metrics` that a checkpoint has: without the `_prev` ones where it is first on the line."""
        missing = () if checkpoint.revision.name in self.previous else PREVIOUS
        return tuple(m for m in metrics if m not in missing)

    def kept(self, checkpoint: Checkpoint) -> bool:
        """Whether another checkpoint is measured against this one."""
        return checkpoint.weights == self.reference.weights or any(
            p.weights == checkpoint.weights for p in self.previous.values())


def plan(source, checkpoints: list[Checkpoint], metrics: tuple[str, ...], reference: str | None,
         branch: str | None) -> Plan | None:
    """The dynamics of a scan of `checkpoints` (all that it selects, before any shard), or None where `metrics`
    hold none. Raises `ConfigError` for a selection of several side lines, `SelectionError` for a reference that
    names no single revision with weights."""
    asked = tuple(m for m in metrics if m in DYNAMICS)
    if reference is not None and not any(m in FINAL for m in asked):
        raise ConfigError(f"--reference {reference} is what weight_change_final and cka_final are measured against; "
                          "add one of them to --metrics")
    if not asked:
        return None
    line = [c for c in checkpoints if c.weights is not None and c.duplicate_of is None]
    sides = sorted({c.revision.branch for c in line} - {None})
    if len(sides) > 1:
        raise ConfigError(f"the training dynamics follow one line of training, and the selection holds the side lines "
                          f"{', '.join(sides)}; select one with --branch")
    if not line:
        return None
    if reference is None:
        chosen = line[-1]
    else:
        named = [c for c in source.checkpoints(reference, branch) if c.weights is not None]
        if len(named) != 1:
            raise SelectionError(f"--reference {reference!r} selects {len(named)} revisions with weights; name one")
        chosen = named[0]
    return Plan(asked, chosen, {c.revision.name: before for before, c in zip(line, line[1:])})


_LASTING: dict[tuple, Path] = {}
"""Outputs kept for the life of the process (a Ray worker's), by (weights, calibration, dtype)."""
_lasting_lock = threading.Lock()
_lasting: list[Path] = []


def _lasting_folder() -> Path:
    """The process's folder of lasting outputs, removed when it exits."""
    with _lasting_lock:
        if not _lasting:
            _lasting.append(Path(tempfile.mkdtemp(prefix="ckpt-trace-outputs-")))
            atexit.register(shutil.rmtree, _lasting[0], ignore_errors=True)
        return _lasting[0]


class Dynamics:
    """A scan's dynamics at work: outputs kept on disk, files kept fetched, and each checkpoint's dynamics rows
    (see `rows`). `lasting` keeps outputs for the process's life (a Ray worker's), else until `close`."""

    def __init__(self, plan: Plan, source, calibration: CalibrationSet, config, device: torch.device,
                 dtype: torch.dtype, lasting: bool = False):
        self.plan, self.source, self.calibration, self.config = plan, source, calibration, config
        self.device, self.dtype, self.lasting = device, dtype, lasting
        self.folder = _lasting_folder() if lasting else Path(tempfile.mkdtemp(prefix="ckpt-trace-outputs-"))
        self.saved: dict[tuple, Path] = _LASTING if lasting else {}
        self.paths: dict[str, Path] = {}
        self.fetched: list[Checkpoint] = []
        self._held: list[Checkpoint] = []
        self._pinned: list[Checkpoint] = []
        self._lock = threading.Lock()
        self._io = threading.Lock()
        self._closed = False
        self.norms: dict[str, dict[str, float]] = {}
        """Weights -> each output's `self_norm`, computed once."""
        self.coming: set[str] = set()
        """Revisions this process is still to score (see `complete`)."""
        self.waiting: tuple[Checkpoint, tuple] | None = None

    def close(self) -> None:
        """Release what was fetched and held for the scan, and the outputs kept on disk (unless `lasting`); a
        checkpoint the stream releases after this is released at once."""
        with self._io:
            self._closed = True
            for checkpoint in [*self.fetched, *self._held, *self._pinned]:
                self._drop(checkpoint)
            self.fetched, self._held, self._pinned = [], [], []
        if not self.lasting:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _drop(self, checkpoint: Checkpoint) -> None:
        """Release a checkpoint's files (under `_io`): later uses fetch them again."""
        self.paths.pop(checkpoint.revision.name, None)
        self.source.release(checkpoint)

    def release(self, checkpoint: Checkpoint) -> None:
        """For the stream, in place of `source.release`: the reference stays fetched until `close`, and each other
        checkpoint until the next one is released (the next is measured against it). Fetches and releases of the
        scan's files happen one at a time (see `files_of`), so that an eviction never races a download that could
        share a blob."""
        with self._io:
            if self._closed:
                self._drop(checkpoint)
            elif checkpoint.weights == self.plan.reference.weights:
                self._pinned.append(checkpoint)
            else:
                self._held.append(checkpoint)
                earlier, self._held = self._held[:-1], self._held[-1:]
                for done in earlier:
                    self._drop(done)

    def handed(self, checkpoint: Checkpoint) -> None:
        """A checkpoint the stream fetched: its files are where later checkpoints find them."""
        if checkpoint.path is not None:
            self.paths[checkpoint.revision.name] = checkpoint.path

    @property
    def samples(self) -> bool:
        return any(m in CKA_METRICS for m in self.plan.metrics)

    def _key(self, checkpoint: Checkpoint) -> tuple:
        return checkpoint.weights, self.calibration.id, dtype_name(self.dtype)

    def files_of(self, checkpoint: Checkpoint) -> Path:
        """Where a checkpoint's files are: fetched by the stream, local, or fetched now. What is fetched here stays
        until the next fetch here (the reference's until `close`). Raises `SourceError` where a local checkpoint's
        files are no longer those it was listed with."""
        with self._io:
            path = self.paths.get(checkpoint.revision.name)
            if path is None and checkpoint.path is None:
                for done in [c for c in self.fetched if c.weights != self.plan.reference.weights]:
                    self.fetched.remove(done)
                    self._drop(done)
                fetched = self.source.fetch(checkpoint)
                self.fetched.append(fetched)
                path = fetched.path
            path = path or checkpoint.path
            self.paths[checkpoint.revision.name] = path
        if identified_now(replace(checkpoint, path=path)).weights != checkpoint.weights:
            raise changed_error(checkpoint, "measured against")
        return path

    def outputs_of(self, checkpoint: Checkpoint) -> Path:
        """The saved outputs of a checkpoint, made now by a pass of its model where none are saved."""
        with _lasting_lock if self.lasting else self._lock:
            if (path := self.saved.get(self._key(checkpoint))) is not None:
                return path
        model = load_model(self.files_of(checkpoint), self.device, self.dtype, self.config.trust_remote_code, self.config.device_map)
        sample = OutputSample(self.calibration, len(structure(model)[1]))
        label = f"{checkpoint.revision.name} (outputs)" if self.config.progress else False
        score(model, self.calibration, self.config.batch_size, progress=label, sample=sample)
        del model
        return self._save(checkpoint, sample.tensors())

    def _save(self, checkpoint: Checkpoint, outputs: dict[str, torch.Tensor]) -> Path:
        path = self.folder / f"{checkpoint.weights}-{self.calibration.id}-{dtype_name(self.dtype)}.safetensors"
        save_outputs(outputs, path)
        with _lasting_lock if self.lasting else self._lock:
            # The reference's, and the latest: a later checkpoint is measured against no other.
            for key, old in list(self.saved.items()):
                if key[0] != self.plan.reference.weights:
                    old.unlink(missing_ok=True)
                    del self.saved[key]
            self.saved[self._key(checkpoint)] = path
        return path

    def complete(self, frame: pl.DataFrame, now: bool = False) -> pl.DataFrame | None:
        """The reference's rows (`frame`) with the `_prev` rows that waited: once the checkpoint before it has been
        scored, or `now` (its outputs made by one more pass where they are not there); None while they wait."""
        checkpoint, shape = self.waiting
        previous = self.plan.previous[checkpoint.revision.name]
        if not now and (previous.revision.name in self.coming or self._key(previous) not in self.saved):
            return None
        from safetensors.torch import load_file

        self.waiting = None
        against = {m: c for m, c in self.plan.against(checkpoint).items() if m in PREVIOUS}
        outputs = load_file(self.outputs_of(checkpoint), device=str(self.device)) if self.samples else None
        extra = self._measured(checkpoint, self.files_of(checkpoint), shape, outputs, tuple(against), against)
        first = frame.row(0, named=True)
        extra = extra.with_columns(pl.lit(first[c], frame.schema[c]).alias(c)
                                   for c in frame.columns if c not in extra.columns)
        return pl.concat([frame, extra.select(frame.columns)])

    def sample(self, model: torch.nn.Module) -> OutputSample | None:
        """What keeps a pass's outputs, where CKA is asked."""
        return OutputSample(self.calibration, len(structure(model)[1])) if self.samples else None

    def rows(self, checkpoint: Checkpoint, model: torch.nn.Module, sample: OutputSample | None) -> pl.DataFrame:
        """The dynamics rows of a checkpoint as loaded (`model`, its files at `checkpoint.path`), with the outputs
        its pass kept in `sample`: each with the revision and weights it is measured against."""
        self.paths[checkpoint.revision.name] = checkpoint.path
        self.coming.discard(checkpoint.revision.name)
        outputs = sample.tensors() if sample is not None else None
        shape = structure(model)
        against = self.plan.against(checkpoint)
        metrics = self.plan.metrics
        previous = next((c for m, c in against.items() if m in PREVIOUS), None)
        if (checkpoint.weights == self.plan.reference.weights and previous is not None
                and previous.revision.name in self.coming):
            # The reference is scored first: its `_prev` rows wait for the checkpoint before it (see `complete`).
            metrics = tuple(m for m in metrics if m not in PREVIOUS)
            self.waiting = (checkpoint, shape)
        frame = self._measured(checkpoint, checkpoint.path, shape, outputs, metrics, against)
        if outputs is not None and self.plan.kept(checkpoint):  # once those it is measured against are read
            self._save(checkpoint, outputs)
        return frame

    def _measured(self, checkpoint: Checkpoint, path: Path, shape: tuple, outputs: dict[str, torch.Tensor] | None,
                  metrics: tuple[str, ...], against: dict[str, Checkpoint]) -> pl.DataFrame:
        """`metrics` of a checkpoint (its files at `path`, its outputs), each `_final` and `_prev` one measured against
        its checkpoint in `against`, with that checkpoint's revision and weights."""
        against = {m: c for m, c in against.items() if m in metrics}
        frames = []
        if weights := [m for m in metrics if m in WEIGHT_METRICS]:
            final, previous = against.get("weight_change_final"), against.get("weight_change_prev")
            frame = weight_metrics(path, shape, final and self.files_of(final), previous and self.files_of(previous))
            frames.append(frame.filter(pl.col("metric").is_in(weights)))
        if cka := {m: c for m, c in against.items() if m in CKA_METRICS}:  # the reference's against its own outputs
            others = {m: outputs if c.weights == checkpoint.weights else self.outputs_of(c) for m, c in cka.items()}
            frames.append(cka_frame(outputs, others, self.norms.setdefault(checkpoint.weights, {}),
                                    {m: self.norms.setdefault(c.weights, {}) for m, c in cka.items()}))
        names = {m: c.revision.name for m, c in against.items()}
        fingerprints = {m: c.weights for m, c in against.items()}
        return pl.concat([pl.DataFrame(schema=SCORE_SCHEMA), *frames]).with_columns(
            reference=pl.col("metric").replace_strict(names, default=None, return_dtype=pl.String),
            reference_weights=pl.col("metric").replace_strict(fingerprints, default=None, return_dtype=pl.String))
