"""Streamed scanning against download-then-score, over a throttled loopback Hub.

A suite of N random GPT-NeoX checkpoints is served by the tests' loopback Hub, run as a
separate process (as the real Hub is another machine), with its bandwidth set so that
downloading one revision takes about as long as scoring it. Scoring gets one CPU thread
in both runs (``--threads``): on a 2-core machine the other core serves the Hub and
receives the download, as a host CPU does while a GPU scores. The sequential baseline
downloads, scores and evicts each revision in turn with the same library pieces; the
streamed run is `ckpt_trace.scan`, which downloads the next revision while the current
one is scored. A sampler records the bytes held in the cache throughout the streamed run.

    python benchmarks/stream_overlap.py [--revisions 12] [--samples 64] [--threads 1] [--prefetch 1]

The last line is ``overlap_ratio=<streamed / max(total download, total scoring)>``;
targets: ratio <= 1.15, peak cache <= prefetch + 1 revisions.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
REPO = "bench/suite"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_hub(suite: Path, bandwidth: float, port: int) -> subprocess.Popen:
    command = [sys.executable, str(TESTS / "loopback_hub.py"), REPO, str(suite), "--bandwidth", str(bandwidth),
               "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    server.stdout.readline()  # the URL: the server is up
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for scoring, in both runs")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=1, help="revisions downloaded ahead in the streamed run")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stream-overlap-"))
    # huggingface_hub reads HF_ENDPOINT once, when first imported (transformers imports it too).
    port = free_port()
    os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", CKPT_TRACE_HOME=str(work / "home"),
                      HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    config = transformers.GPTNeoXConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
        max_position_embeddings=256, use_parallel_residual=True, bos_token_id=0, eos_token_id=0,
    )
    for i in range(args.revisions):
        torch.manual_seed(i)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(work / "suite" / f"step{i * 1000}")
    weight_bytes = (work / "suite" / "step0" / "model.safetensors").stat().st_size
    ids = torch.randint(0, 4096, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    calibration_file = work / "ids.jsonl"
    calibration_file.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist()))

    from ckpt_trace.calibration import CalibrationSpec
    from ckpt_trace.scan import ScanConfig, build_calibration, scan, score_checkpoint
    from ckpt_trace.sources import LocalSource

    spec = CalibrationSpec(str(calibration_file))
    scan_config = ScanConfig(calibration=spec, device="cpu", dtype="float32", progress=False, prefetch=args.prefetch)
    device, dtype = torch.device("cpu"), torch.float32
    local = LocalSource(work / "suite").checkpoints()
    calibration = build_calibration(local[0].path, spec)
    score_checkpoint(local[0], calibration, scan_config, device, dtype)  # warm-up
    start = time.perf_counter()
    for checkpoint in local[:3]:
        score_checkpoint(checkpoint, calibration, scan_config, device, dtype)
    per_score = (time.perf_counter() - start) / 3

    server = start_hub(work / "suite", weight_bytes / per_score, port)
    try:
        from ckpt_trace.sources import HubSource

        print(f"suite: {args.revisions} revisions of {weight_bytes / 1e6:.1f} MB; calibration {args.samples} x "
              f"{args.seq_len} tokens; Hub throttled to {weight_bytes / per_score / 1e6:.1f} MB/s so that one download "
              f"takes about one scoring ({per_score:.2f}s)")

        # Sequential: download, then score, then evict, one revision at a time.
        source = HubSource(REPO, work / "cache-sequential")
        download_s = scoring_s = 0.0
        start = time.perf_counter()
        for checkpoint in source.checkpoints():
            t0 = time.perf_counter()
            fetched = source.fetch(checkpoint)
            t1 = time.perf_counter()
            score_checkpoint(fetched, calibration, scan_config, device, dtype)
            t2 = time.perf_counter()
            source.release(fetched)
            download_s += t1 - t0
            scoring_s += t2 - t1
        sequential = time.perf_counter() - start

        # Streamed: the library's scan, with a sampler watching the cache.
        cache = work / "cache-streamed"
        peak, stop = [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], folder_bytes(cache / "models--bench--suite" / "blobs"))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        scan_config.source, scan_config.cache_dir, scan_config.store = REPO, cache, work / "store"
        start = time.perf_counter()
        summary = scan(scan_config)
        streamed = time.perf_counter() - start
        stop.set()
        sampler.join()
        assert (summary["status"] == "scored").all(), summary
    finally:
        server.kill()

    print(f"total download {download_s:.2f}s, total scoring {scoring_s:.2f}s (measured in the sequential run)")
    print(f"sequential (download then score): {sequential:.2f}s")
    print(f"streamed (ckpt_trace.scan):       {streamed:.2f}s  speedup {sequential / streamed:.2f}x")
    from ckpt_trace.store import Store

    scored_while_downloading = Store(work / "store").runs()["seconds"].sum()
    print(f"scoring during the streamed run: {scored_while_downloading:.2f}s (alone: {scoring_s:.2f}s)")
    print(f"peak cache: {peak[0] / 1e6:.1f} MB = {peak[0] / weight_bytes:.2f} revisions")
    print(f"overlap_ratio={streamed / max(download_s, scoring_s):.3f}")


if __name__ == "__main__":
    main()
