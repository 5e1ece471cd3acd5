"""A scan killed with SIGKILL and run again: nothing stored is downloaded again, nothing is lost."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
from conftest import write_tokenizer
from test_hub import model_files

from ckpt_trace.store import Store
from ckpt_trace.testing import LoopbackHub

ROOT = Path(__file__).resolve().parents[1]
REPO = "org/kill-me"
NAMES = ["step0", "step1", "step2", "step4", "step8", "step16"]


def scan_command(store: Path, cache: Path) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "scan", REPO, "--store", str(store), "--cache-dir", str(cache),
            "--samples", "2", "--seq-len", "16", "--device", "cpu"]


def test_sigkill_then_resume(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    write_tokenizer(tokenizer_dir)
    suite = {name: model_files(10 + i, ("safetensors",), tokenizer_dir) for i, name in enumerate(NAMES)}
    weight_sha = {name: hashlib.sha256(files["model.safetensors"]).hexdigest() for name, files in suite.items()}
    size = len(suite["step0"]["model.safetensors"])

    # Throttled so that each revision takes about half a second to download.
    with LoopbackHub(bandwidth=2 * size) as hub:
        for name, files in suite.items():
            hub.add_revision(REPO, name, files)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "CKPT_TRACE_HOME": str(tmp_path / "home"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        store, cache = tmp_path / "store", tmp_path / "cache"

        process = subprocess.Popen(scan_command(store, cache), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not list((store / "scores").rglob("*.parquet")) and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
        stored = {p.parent.name for p in (store / "scores").rglob("*.parquet")}
        assert 0 < len(stored) < len(NAMES)
        # A kill during a write may leave a temporary file, which readers never see; every .parquet file is whole.
        for file in store.rglob("*.parquet"):
            pl.read_parquet(file)
        assert all(p.name.startswith(".") for p in store.rglob("*.tmp"))

        hub.log.clear()
        again = subprocess.run(scan_command(store, cache), env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        for name in NAMES:
            downloads = [r for r in hub.requests("GET", f"/cdn/{weight_sha[name]}") if r.status in (200, 206)]
            # Stored revisions are not fetched again; the others at most once (one the killed scan had
            # already fetched whole is taken from the cache).
            assert len(downloads) == 0 if name in stored else len(downloads) <= 1, name
        resumed = Store(store).scores()
        assert not list(store.rglob("*.tmp"))  # what the killed scan was writing is cleared away

        # An uninterrupted scan into a fresh store and cache gives the same dataset.
        whole = subprocess.run(scan_command(tmp_path / "whole", tmp_path / "cache2"), env=env, capture_output=True,
                               text=True, timeout=300)
        assert whole.returncode == 0, whole.stderr
    key = ["revision", "layer", "module", "metric"]
    expected = Store(tmp_path / "whole").scores().sort(key)
    assert resumed.height == len(NAMES) * 3 * 3 * 2
    assert resumed.sort(key).drop("created").equals(expected.drop("created"))
    # The revision downloaded when the scan was killed was evicted by the next one.
    snapshots = cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
    assert not snapshots.exists() or not list(snapshots.iterdir())
    assert pl.DataFrame(resumed).select(pl.col("commit").n_unique()).item() == len(NAMES)
