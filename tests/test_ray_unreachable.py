"""A Ray cluster that does not answer is one line and exit status 2 after --ray-timeout seconds, not a wait without end.

Every address here is on 127.0.0.1, at a port this process holds bound without listening: a connection to it is
refused, and no other process can take the port while a test runs.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import save_checkpoint

from ckpt_trace.errors import ConfigError
from ckpt_trace.scan.options import ScanConfig
from ckpt_trace.scan.ray import cluster_address, recorded_address_file, wait_for_cluster

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason='Ray is an extra: "ckpt-trace[ray]"')
SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture
def refused():
    """A socket bound to a loopback port that nothing listens on; its port refuses connections until it is closed."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    yield held
    held.close()


@pytest.fixture
def no_ray_env(monkeypatch, tmp_path):
    """No RAY_ADDRESS, and Ray's temporary folder (where `ray start` records a cluster) an empty one of the test's."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))


@pytest.fixture
def suite(tmp_path, tokenizer_dir):
    for seed, name in enumerate(["step0", "step100"]):
        save_checkpoint(tmp_path / "suite" / name, "gpt_neox", seed=seed, tokenizer_dir=tokenizer_dir)
    return tmp_path / "suite"


def scan_process(suite: Path, store: Path, address: str, *more: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from ckpt_trace.cli import entry_point; entry_point()", "scan", str(suite),
               "--store", str(store), "--ray", *SMALL, *more]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": address})


@needs_ray
@pytest.mark.parametrize("dtype", ["auto", "float32"])  # auto asks the cluster for GPUs first; float32 not until scoring
def test_an_unreachable_cluster_is_one_line_and_status_2_after_the_timeout(suite, tmp_path, refused, dtype):
    address = f"127.0.0.1:{refused.getsockname()[1]}"
    start = time.monotonic()
    ended = scan_process(suite, tmp_path / "store", address, "--ray-timeout", "1", "--dtype", dtype)
    seconds = time.monotonic() - start
    assert ended.returncode == 2, ended.stderr
    assert ended.stderr.count("\n") == 1 and "Traceback" not in ended.stderr, ended.stderr
    assert ended.stderr.startswith(f"ckpt-trace: error: no Ray cluster answers at {address} (RAY_ADDRESS) after 1 s "
                                   "(--ray-timeout): Connection refused; "), ended.stderr
    # The start of the process (some 4 s), then one second of trying: not the default's 60, nor Ray's own minutes.
    assert 1 <= seconds < 20
    assert not [p for p in (tmp_path / "store" / "scores").rglob("*") if p.is_file()]


@pytest.mark.parametrize("timeout", [0.3, 1.5])
def test_the_wait_lasts_the_timeout(refused, monkeypatch, timeout):
    address = f"127.0.0.1:{refused.getsockname()[1]}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^no Ray cluster answers at {address} \(RAY_ADDRESS\) after {timeout:g} s "):
        wait_for_cluster(timeout)
    assert timeout <= time.monotonic() - start < timeout + 0.5


def test_a_cluster_that_starts_listening_during_the_wait_is_taken(refused, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{refused.getsockname()[1]}")
    later = threading.Timer(0.5, refused.listen)
    later.start()
    start = time.monotonic()
    wait_for_cluster(5)
    later.join()
    assert 0.5 <= time.monotonic() - start < 2


def test_ray_timeout_above_0_is_asked_for():
    for bad, shown in ((0, "0"), (-1.5, "-1.5"), (math.nan, "nan"), (math.inf, "inf")):
        with pytest.raises(ConfigError, match=rf"^--ray-timeout {shown} is not a wait in seconds; use a finite number "
                                              r"above 0$"):
            ScanConfig(ray_timeout=bad)
    assert ScanConfig().ray_timeout == 60 and ScanConfig(ray_timeout=0.5).ray_timeout == 0.5


@needs_ray
def test_ray_timeout_0_on_the_command_line_is_one_line(suite, tmp_path, capsys):
    from ckpt_trace.cli import main

    assert main(["scan", str(suite), "--store", str(tmp_path / "s"), "--ray", "--ray-timeout", "0", *SMALL]) == 2
    assert capsys.readouterr().err == ("ckpt-trace: error: --ray-timeout 0 is not a wait in seconds; use a finite "
                                       "number above 0\n")
    assert not (tmp_path / "s").exists()  # it failed before any work


def test_which_addresses_are_probed(no_ray_env, monkeypatch):
    assert cluster_address() is None  # none given, none recorded: Ray starts a local instance
    for given in ("local", "other://anything"):  # a new local instance; a client module of its own
        monkeypatch.setenv("RAY_ADDRESS", given)
        assert cluster_address() is None
    for given, host in (("10.0.0.7:6379", "10.0.0.7"), ("ray://head.cluster:10001", "head.cluster"),
                        ("[::1]:6379", "::1")):
        monkeypatch.setenv("RAY_ADDRESS", given)
        assert cluster_address()[:2] == (host, int(given.rpartition(":")[2]))
    for bad in ("head.cluster", "head.cluster:port", ":6379", "host:70000"):
        monkeypatch.setenv("RAY_ADDRESS", bad)
        with pytest.raises(ConfigError, match=re.escape(f"the Ray address {bad!r} (RAY_ADDRESS) is not host:port or ")):
            cluster_address()


def test_auto_and_no_address_take_the_recorded_cluster(no_ray_env, monkeypatch, refused, tmp_path):
    file = tmp_path / "raytmp" / "ray" / "ray_current_cluster"
    assert recorded_address_file() == str(file)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(ConfigError, match=re.escape(f"RAY_ADDRESS=auto names the cluster that `ray start` records in "
                                                    f"{file}, and none is recorded; ")):
        wait_for_cluster(0.2)
    file.parent.mkdir(parents=True)
    file.write_text(f"127.0.0.1:{refused.getsockname()[1]}\n")  # left by a cluster that is gone
    for given, where in (("auto", "RAY_ADDRESS=auto: "), (None, "")):
        if given is None:
            monkeypatch.delenv("RAY_ADDRESS")
        expected = (f"no Ray cluster answers at 127.0.0.1:{refused.getsockname()[1]} ({where}recorded in {file} by "
                    "`ray start`) after 0.2 s (--ray-timeout): Connection refused; start it again, or clear the record "
                    "(ray stop) or set RAY_ADDRESS=local to start a local Ray instance")
        with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
            wait_for_cluster(0.2)


@needs_ray
def test_the_recorded_address_is_where_ray_records_it(monkeypatch, tmp_path):
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # where older Ray keeps it
        from ray._private.utils import get_ray_address_file
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert recorded_address_file() == get_ray_address_file(None)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "other"))
    assert recorded_address_file() == get_ray_address_file(None)
