"""A scan spread over a Ray cluster: one task per revision, the driver the store's one writer.

`ckpt-trace scan SOURCE --ray` connects to the cluster in ``RAY_ADDRESS`` or starts a local Ray
instance; a cluster that does not answer within ``--ray-timeout`` seconds is an error, not a wait
without end (Ray's own connect retries for minutes). Each revision is one task that downloads,
loads and scores it on a worker (one GPU per task where the cluster has GPUs) and hands the rows
back; the driver writes them into the store under the same rules as a serial scan (revision row
first, scores last, atomic files), so a scan interrupted anywhere resumes where it stopped. A task
whose worker dies (killed, out of memory, node lost) is run again by Ray; an error of the revision
itself (bad weights) is not, and is recorded like a serial scan's. Ray is an optional extra:
``pip install "ckpt-trace[ray]"``.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
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
    """The ``ray`` package; raises `ConfigError` naming the extra to install where it is missing."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError('--ray needs Ray: pip install "ckpt-trace[ray]"') from err
    return ray


def cluster_dtype(name: str, timeout: float = 60.0) -> torch.dtype:
    """The dtype the workers score in: as asked, or for `auto` bfloat16 where the cluster has GPUs, else float32 (a
    scan's dtype is part of what it stores, so it is settled once, for every worker). Raises `ConfigError` where the
    cluster does not answer within `timeout` seconds (see `connect`)."""
    from ..model.loading import DTYPES, resolve_dtype

    if name != "auto":
        return resolve_dtype(name, torch.device("cpu"))
    return DTYPES["bfloat16"] if connect(timeout).cluster_resources().get("GPU", 0) else DTYPES["float32"]


def connect(timeout: float = 60.0) -> object:
    """Ray, connected to ``RAY_ADDRESS`` or to a local instance started for this scan.

    Raises `ConfigError` where the cluster to connect to does not accept a TCP connection within `timeout` seconds
    (see `wait_for_cluster`), before Ray is asked to connect."""
    ray = ray_module()
    if not ray.is_initialized():
        wait_for_cluster(timeout)
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return ray


def recorded_address_file() -> str:
    """The file in which `ray start` records the address of the cluster it started (Ray's ``ray_current_cluster``, in
    its temporary folder), which Ray connects to where ``RAY_ADDRESS`` is unset or ``auto``."""
    if "RAY_TMPDIR" in os.environ:
        root = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        root = os.environ["TMPDIR"]
    elif sys.platform.startswith(("linux", "darwin")):
        root = "/tmp"
    else:
        root = tempfile.gettempdir()
    return os.path.join(root, "ray", "ray_current_cluster")


def cluster_address() -> tuple[str, int, str] | None:
    """(host, port, where the address comes from) of the cluster that `ray.init` connects to, as Ray resolves
    ``RAY_ADDRESS``: an address (``host:port`` or ``ray://host:port``), or, where it is unset or ``auto``, the one
    `ray start` recorded (see `recorded_address_file`). None where Ray starts a local instance (``RAY_ADDRESS`` unset
    and none recorded, or ``local``) or connects through a client module of another scheme.

    Raises `ConfigError` for ``RAY_ADDRESS=auto`` with no address recorded, and for an address that is not
    ``host:port``."""
    given = os.environ.get("RAY_ADDRESS") or None
    if given == "local":
        return None
    if given is None or given == "auto":
        file = recorded_address_file()
        try:
            with open(file, encoding="utf-8") as recorded:
                address = recorded.read().strip()
        except FileNotFoundError:
            address = ""
        if not address:
            if given is None:
                return None
            raise ConfigError(f"RAY_ADDRESS=auto names the cluster that `ray start` records in {file}, and none is "
                              f"recorded; start one (ray start --head), set RAY_ADDRESS to a cluster's host:port, or "
                              f"unset it to start a local Ray instance")
        where = f"{'RAY_ADDRESS=auto: ' if given else ''}recorded in {file} by `ray start`"
    else:
        address, where = given, "RAY_ADDRESS"
    scheme, separator, rest = address.rpartition("://")
    if separator and scheme != "ray":
        return None
    host, colon, port = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"the Ray address {address!r} ({where}) is not host:port or ray://host:port; set RAY_ADDRESS "
                          f"to one, to auto (the cluster `ray start` recorded) or to local (a new local instance)")
    return host, int(port), where


def wait_for_cluster(timeout: float) -> None:
    """Return once the cluster that `ray.init` is to connect to (see `cluster_address`) accepts a TCP connection at
    its address, trying again until `timeout` seconds have passed; at once where Ray is to start a local instance.

    Raises `ConfigError` naming the address, where it comes from and the last reason it gave, where it does not answer
    in time (Ray's own connect would retry for minutes, then end the process)."""
    found = cluster_address()
    if found is None:
        return
    host, port, where = found
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            socket.create_connection((host, port), timeout=max(left, 0.01)).close()
            return
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(0.2, left))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    fix = ("start it, set RAY_ADDRESS to a running cluster's host:port, or unset RAY_ADDRESS to start a local Ray "
           "instance" if where == "RAY_ADDRESS" else
           "start it again, or clear the record (ray stop) or set RAY_ADDRESS=local to start a local Ray instance")
    raise ConfigError(f"no Ray cluster answers at {address} ({where}) after {timeout:g} s (--ray-timeout): {reason}; "
                      f"{fix}")


def scored_on_ray(work: Callable, source: str, cache_dir, checkpoints: list[Checkpoint], calibration: CalibrationSet,
                  config, dtype, plan=None) -> Iterator[tuple[Checkpoint, tuple[pl.DataFrame, pl.DataFrame] | None, Exception | None, float]]:
    """Yield (checkpoint, (revision row, scores) or None, error or None, seconds since its task was sent) as each
    revision's task ends; each task is ``work(source, cache_dir, checkpoint, calibration, config, dtype, plan)`` on a
    worker (`ckpt_trace.scan.run.score_revision`; `plan`, the scan's training dynamics, or None).

    At most twice as many tasks as the cluster has workers for are in flight, so a worker's cache holds a
    revision or two, however many there are. Raises `ConfigError` where the cluster does not answer within
    ``config.ray_timeout`` seconds (see `connect`).
    """
    ray = connect(config.ray_timeout)
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
            running[task.remote(source, cache_dir, checkpoint, calibration_ref, config, dtype, plan)] = (
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
