"""What a scan is asked to do: `ScanConfig`, shards and the metrics it stores."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..errors import ConfigError
from ..scoring.metrics import ALL_METRICS, CHEAP, LAST
from ..scoring.options import ScoringOptions
from ..store import METRICS

PREFETCH = 1
"""Revisions fetched ahead of the one being scored, by default (see `streamed`; measured in benchmarks/)."""


@dataclass
class ScanConfig(ScoringOptions):
    """Everything a scan needs; the command line only fills this in."""

    source: str | os.PathLike | None = None
    """A Hub repo id, a model directory, or a directory of revision subdirectories; None: the micro suite."""
    revisions: str | None = None
    """Selection: names, A..B step ranges, every:K, log:K, first:N, last:N (see `ckpt_trace.fetch.revisions.select`);
    last:1 and open ranges (A..) reach the release, main, where its commit is no checkpoint's. None: all revisions."""
    branch: str | None = None
    """The side line of training that ranges and counts select from, with the trunk into it; None: the trunk, or the
    side line a range's ends name."""
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
    """I/N: only the I-th (from 1) of N parts of the selected revisions, every N-th in training order (see `shard`), so
    that N processes (a job array) share one store."""
    ray: bool = False
    """Spread the revisions over the Ray cluster in ``RAY_ADDRESS`` (else a local Ray instance): one task per
    revision, one GPU each where the cluster has GPUs (see `ckpt_trace.scan.ray`)."""
    ray_timeout: float = 60.0
    """Seconds to wait for the Ray cluster in ``RAY_ADDRESS`` (or the one `ray start` recorded) to answer before the
    scan stops with an error (see `ckpt_trace.scan.ray.wait_for_cluster`)."""
    metrics: tuple[str, ...] | None = None
    """Metrics to store (of `ckpt_trace.scoring.ALL_METRICS`): importance and update_ratio always; angular_distance,
    span_distance and their variants over each sequence's last token (importance_last, update_ratio_last,
    angular_distance_last, span_distance_last) from the same pass where asked; ablation_loss where asked (one forward
    pass more per layer and module); the training dynamics weight_norm, weight_change_final, weight_change_prev (from
    the weight files), cka_final and cka_prev (from outputs kept in the same pass) where asked; all: every one. None:
    importance and update_ratio; for the micro suite (no source), every one but the last-token variants."""
    reference: str | None = None
    """The revision that weight_change_final and cka_final are measured against; None: the last checkpoint of the
    scanned line in training order."""
    tokens: str = "all"
    """Average the one-pass metrics over every real token (``all``), or over each sequence's last (``last``: stored as
    their `_last` variants; importance and update_ratio over every token are stored too)."""

    def __post_init__(self):
        super().__post_init__()
        if self.ray:
            from .ray import ray_module

            ray_module()  # fails now, not after the set-up, where Ray is missing
        if not 0 < self.ray_timeout < math.inf:
            raise ConfigError(f"--ray-timeout {self.ray_timeout:g} is not a wait in seconds; use a finite number above 0")
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
        if self.metrics == ("all",):
            self.metrics = ALL_METRICS
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
