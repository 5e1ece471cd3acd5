"""A scan spread over a Ray cluster: one task per revision, the driver the store's one writer.

`ckpt-trace scan SOURCE --ray` connects to the cluster in ``RAY_ADDRESS`` or starts a local Ray
instance. Each revision is one task that downloads, loads and scores it on a worker (one GPU per
task where the cluster has GPUs) and hands the rows back; the driver writes them into the store
under the same rules as a serial scan (revision row first, scores last, atomic files), so a scan
interrupted anywhere resumes where it stopped. A task whose worker dies (killed, out of memory,
node lost) is run again by Ray; an error of the revision itself (bad weights) is not, and is
recorded like a serial scan's. Ray is an optional extra: ``pip install "ckpt-trace[ray]"``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import polars as pl
import torch

from ..calibration.sets import CalibrationSet
from ..errors import REVISION_ERRORS, ConfigError
from ..fetch.sources import Checkpoint

RETRIES = 3
"""How many times Ray runs a revision's task again after its worker died."""


def ray_module():
    try:
        import ray
    except ImportError as err:
        raise ConfigError('--ray needs Ray: pip install "ckpt-trace[ray]"') from err
    return ray


def cluster_dtype(name: str) -> torch.dtype:
    """The dtype the workers score in: as asked, or for `auto` bfloat16 where the cluster has GPUs, else float32 (a
    scan's dtype is part of what it stores, so it is settled once, for every worker)."""
    from ..model.loading import DTYPES, resolve_dtype

    if name != "auto":
        return resolve_dtype(name, torch.device("cpu"))
    return DTYPES["bfloat16"] if connect().cluster_resources().get("GPU", 0) else DTYPES["float32"]


def connect() -> object:
    """Ray, connected to ``RAY_ADDRESS`` or to a local instance started for this scan."""
    ray = ray_module()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return ray


def scored_on_ray(work: Callable, source: str, cache_dir, checkpoints: list[Checkpoint], calibration: CalibrationSet,
                  config, dtype) -> Iterator[tuple[Checkpoint, tuple[pl.DataFrame, pl.DataFrame] | None, Exception | None, float]]:
    """Yield (checkpoint, (revision row, scores) or None, error or None, seconds since its task was sent) as each
    revision's task ends; each task is ``work(source, cache_dir, checkpoint, calibration, config, dtype)`` on a worker
    (`ckpt_trace.scan.run.score_revision`).

    At most twice as many tasks as the cluster has workers for are in flight, so a worker's cache holds a
    revision or two, however many there are.
    """
    ray = connect()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    slots = gpus or max(1, int(resources.get("CPU", 1)))
    task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(work)
    calibration_ref = ray.put(calibration)
    waiting = list(checkpoints)
    running: dict = {}
    while waiting or running:
        while waiting and len(running) < 2 * slots:
            checkpoint = waiting.pop(0)
            running[task.remote(source, cache_dir, checkpoint, calibration_ref, config, dtype)] = (
                checkpoint, time.perf_counter())
        done, _ = ray.wait(list(running), num_returns=1)
        checkpoint, sent = running.pop(done[0])
        try:
            result, error = ray.get(done[0]), None
        except ray.exceptions.RayTaskError as err:  # raised on the worker: the revision's own error is recorded
            cause = err.cause
            if not isinstance(cause, REVISION_ERRORS):
                raise cause from err  # as a serial scan does, a bug stops the scan
            result, error = None, cause
        except ray.exceptions.RayError as err:  # the worker died more often than Ray retries
            result, error = None, RuntimeError(f"the Ray task of {checkpoint.revision.name} failed: {err}")
        yield checkpoint, result, error, time.perf_counter() - sent
