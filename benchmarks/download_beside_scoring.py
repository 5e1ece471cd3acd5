"""Scoring alone, beside a download on a thread of the same process (as `ckpt_trace.scan` streams), and beside a
download in a separate process, interleaved round by round, over the loopback Hub (`ckpt_trace.testing`).

Six random 27 MB GPT-NeoX checkpoints are served by the loopback Hub (a separate process), throttled to
`--bandwidth`; the downloads loop over them without pause while three revisions are scored on one torch thread.
Also printed: the CPU time the download thread itself uses per revision, and how long a fresh interpreter takes to
import ckpt-trace (what starting a download process would cost a scan).

    python benchmarks/download_beside_scoring.py [--rounds 4] [--bandwidth 17.5e6]

The last line is ``thread_over_process=<median scoring beside a download thread / beside a download process>``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from loopback_suite import calibration_file, point_at_loopback, random_suite, start_hub

REPO = "bench/suite"
REVISIONS = 6
DOWNLOAD_LOOP = r"""
import itertools, shutil, sys
from huggingface_hub import snapshot_download
for i in itertools.count():
    snapshot_download(sys.argv[1], revision=f"step{(i % int(sys.argv[3])) * 1000}", cache_dir=sys.argv[2])
    shutil.rmtree(sys.argv[2], ignore_errors=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of alone, beside a thread, beside a process")
    parser.add_argument("--bandwidth", type=float, default=17.5e6, help="the loopback Hub's bytes/s")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="download-beside-scoring-"))
    port = point_at_loopback(work)

    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import ckpt_trace"], check=True)
    import_s = time.perf_counter() - start

    import torch

    torch.set_num_threads(1)
    random_suite(work / "suite", REVISIONS, layers=6)
    ids_file = calibration_file(work / "ids.jsonl", 64, 128)

    from ckpt_trace.calibration.sets import CalibrationSpec
    from ckpt_trace.fetch.sources import LocalSource
    from ckpt_trace.scan.options import ScanConfig
    from ckpt_trace.scan.run import score_stably
    from ckpt_trace.scoring.options import build_calibration

    spec = CalibrationSpec(str(ids_file))
    config = ScanConfig(calibration=spec, device="cpu", dtype="float32", progress=False)
    local = LocalSource(work / "suite").checkpoints()
    calibration = build_calibration(local[0].path, spec)

    def scorings() -> list[float]:
        seconds = []
        for checkpoint in local[:3]:
            begin = time.perf_counter()
            score_stably(checkpoint, calibration, config, torch.device("cpu"), torch.float32)
            seconds.append(time.perf_counter() - begin)
        return seconds

    scorings()  # warm-up
    server = start_hub(REPO, work / "suite", args.bandwidth, port)
    stop, cpu = threading.Event(), []

    def download_thread() -> None:
        from huggingface_hub import snapshot_download

        for i in range(sys.maxsize):
            if stop.is_set():
                return
            begin = time.thread_time()
            snapshot_download(REPO, revision=f"step{(i % REVISIONS) * 1000}", cache_dir=work / "cache-thread")
            cpu.append(time.thread_time() - begin)
            shutil.rmtree(work / "cache-thread", ignore_errors=True)

    times: dict[str, list[float]] = {"alone": [], "thread": [], "process": []}
    try:
        for _ in range(args.rounds):
            times["alone"] += scorings()
            stop.clear()
            thread = threading.Thread(target=download_thread, daemon=True)
            thread.start()
            time.sleep(0.5)
            times["thread"] += scorings()
            stop.set()
            thread.join()
            process = subprocess.Popen([sys.executable, "-c", DOWNLOAD_LOOP, REPO, str(work / "cache-process"),
                                        str(REVISIONS)])
            time.sleep(3.5)  # its imports done: downloading
            times["process"] += scorings()
            process.kill()
            process.wait()
    finally:
        server.kill()

    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.rounds} rounds of 3 scorings each; Hub throttled to {args.bandwidth / 1e6:.1f} MB/s")
    print("median scoring: " + ", ".join(f"{k} {v:.3f}s" for k, v in medians.items()))
    print(f"CPU time of the download thread: {min(cpu) * 1e3:.0f} to {max(cpu) * 1e3:.0f} ms a revision "
          f"({len(cpu)} downloads)")
    print(f"importing ckpt-trace in a fresh interpreter: {import_s:.1f}s")
    print(f"thread_over_process={medians['thread'] / medians['process']:.3f}")


if __name__ == "__main__":
    main()
