"""Scans spread over Ray: the same rows as a serial scan, a killed worker's revision scored again, errors recorded."""

from __future__ import annotations

import signal
import sys
import threading
import time

import polars as pl
import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from conftest import save_checkpoint  # noqa: E402

from ckpt_trace.calibration.sets import CalibrationSpec  # noqa: E402
from ckpt_trace.cli import main  # noqa: E402
from ckpt_trace.scan.options import ScanConfig  # noqa: E402
from ckpt_trace.scan.run import scan  # noqa: E402
from ckpt_trace.store import Store  # noqa: E402

NAMES = ["step0", "step100", "step200", "step300"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def suite(tmp_path, tokenizer_dir):
    for seed, name in enumerate(NAMES):
        save_checkpoint(tmp_path / "suite" / name, "gpt_neox", seed=seed, tokenizer_dir=tokenizer_dir)
    return tmp_path / "suite"


def config(suite, store, **more) -> ScanConfig:
    return ScanConfig(source=str(suite), store=store, calibration=CalibrationSpec("pydoc", 4, 16), batch_size=2,
                      device="cpu", dtype="float32", progress=False, **more)


def dataset(store) -> pl.DataFrame:
    return Store(store).scores().drop("created").sort("revision", "layer", "module", "metric")


def test_a_ray_scan_stores_what_a_serial_scan_stores(local_ray, suite, tmp_path):
    summary = scan(config(suite, tmp_path / "ray", ray=True))
    assert summary["status"].to_list() == ["scored"] * len(NAMES)
    scan(config(suite, tmp_path / "serial"))
    assert dataset(tmp_path / "ray").equals(dataset(tmp_path / "serial"))
    assert Store(tmp_path / "ray").runs().height == len(NAMES)
    again = scan(config(suite, tmp_path / "ray", ray=True))  # resumable as a serial scan: nothing left to do
    assert again["status"].to_list() == ["stored"] * len(NAMES)


def test_a_ray_scan_stores_the_training_dynamics_of_a_serial_scan(local_ray, suite, tmp_path):
    from ckpt_trace.scoring.metrics import DYNAMICS

    summary = scan(config(suite, tmp_path / "ray", ray=True, metrics=DYNAMICS))
    assert summary["status"].to_list() == ["scored"] * len(NAMES)
    scan(config(suite, tmp_path / "serial", metrics=DYNAMICS))
    ray_rows, serial_rows = dataset(tmp_path / "ray"), dataset(tmp_path / "serial")
    assert set(ray_rows["metric"]) >= set(DYNAMICS)
    assert ray_rows.drop("value").equals(serial_rows.drop("value"))
    assert ray_rows["value"].to_list() == pytest.approx(serial_rows["value"].to_list(), rel=1e-9, abs=1e-12)


def test_a_worker_killed_mid_task_is_retried_and_nothing_is_lost(local_ray, suite, tmp_path):
    killed = []

    def kill_one():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for process in psutil.process_iter(["cmdline"]):
                if any("ray::score_revision" in part for part in process.info["cmdline"] or []):
                    process.send_signal(signal.SIGKILL)
                    killed.append(process.pid)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one)
    killer.start()
    summary = scan(config(suite, tmp_path / "ray", ray=True))
    killer.join()
    assert killed, "no scoring worker was seen to kill"
    assert summary["status"].to_list() == ["scored"] * len(NAMES)
    scan(config(suite, tmp_path / "serial"))
    assert dataset(tmp_path / "ray").equals(dataset(tmp_path / "serial"))
    runs = Store(tmp_path / "ray").runs()
    assert runs.height == len(NAMES) and set(runs["status"]) == {"scored"}  # each stored once


def test_a_bad_revision_fails_as_in_a_serial_scan(local_ray, suite, tmp_path, capsys):
    (suite / "step300" / "model.safetensors").write_bytes(b"not weights")
    summary = scan(config(suite, tmp_path / "ray", ray=True, keep_going=True))
    status = dict(summary.select("revision", "status").rows())
    assert status == {"step0": "scored", "step100": "scored", "step200": "scored", "step300": "failed"}
    why = summary.filter(pl.col("revision") == "step300")["why"][0]
    serial = scan(config(suite, tmp_path / "serial", keep_going=True))
    assert why == serial.filter(pl.col("revision") == "step300")["why"][0]  # recorded as a serial scan records it
    assert why.startswith("cannot load the weights in")
    assert main(["scan", str(suite), "--store", str(tmp_path / "cli"), "--ray", "--samples", "4", "--seq-len", "16",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("ckpt-trace: error:") == 1 and "cannot load the weights" in err and "Traceback" not in err


def test_without_ray_installed_the_flag_is_one_line(suite, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["scan", str(suite), "--store", str(tmp_path / "s"), "--ray", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == 'ckpt-trace: error: --ray needs Ray: pip install "ckpt-trace[ray]"\n'
    assert not (tmp_path / "s").exists()  # it failed before any work


def test_streaming_options_that_a_ray_scan_would_ignore_are_one_line(suite, tmp_path, capsys):
    for option, named in ((["--load-ahead"], "--load-ahead"), (["--prefetch", "3"], "--prefetch 3")):
        assert main(["scan", str(suite), "--store", str(tmp_path / "s"), "--ray", *option, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ckpt-trace: error: {named} streams revisions through this process, which --ray does "
                              "not") and err.count("\n") == 1
    assert not (tmp_path / "s").exists()  # it failed before any work
    assert ScanConfig(source=str(suite), ray=True, load_ahead=False).load_ahead is False  # consistent: no error
