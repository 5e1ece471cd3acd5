"""Streamed scanning against download-then-score, over a throttled loopback Hub.

A suite of N random GPT-NeoX checkpoints is served by the loopback Hub (`ckpt_trace.testing`), run as a
separate process (as the real Hub is another machine), with its bandwidth set so that
downloading one revision takes about as long as scoring it. Scoring gets one CPU thread
in both runs (``--threads``): on a 2-core machine the other core serves the Hub and
receives the download, as a host CPU does while a GPU scores. The sequential baseline
downloads, scores and evicts each revision in turn with the same library pieces; the
streamed run is `ckpt_trace.scan`, which downloads the next revision while the current
one is scored. A sampler records the bytes held in the cache throughout the streamed run.

    python benchmarks/stream_overlap.py [--revisions 12] [--samples 64] [--threads 1] [--prefetch 1] [--no-load-ahead]
                                        [--device cpu] [--dtype float32]

On a GPU (``--device cuda``), the scan's own default loads the next revision while one is scored.

The last line is ``overlap_ratio=<streamed / max(total download, total scoring)>``;
targets: ratio <= 1.10 (the ideal, with downloads and scoring of equal length, is 1 + 1/N for N revisions; the line
before it gives the ideal for the times measured),
peak cache <= prefetch + 1 revisions.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from loopback_suite import calibration_file, point_at_loopback, random_suite, start_hub, timed_scan

REPO = "bench/suite"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for scoring, in both runs")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=1, help="revisions downloaded ahead in the streamed run")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--load-ahead", action=argparse.BooleanOptionalAction, default=None,
                        help="load the next revision while one is scored in the streamed run [default: the scan's]")
    parser.add_argument("--device", default="cpu", help="where both runs score: cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stream-overlap-"))
    port = point_at_loopback(work)

    import torch

    torch.set_num_threads(args.threads)
    weight_bytes = random_suite(work / "suite", args.revisions, layers=6)
    ids_file = calibration_file(work / "ids.jsonl", args.samples, args.seq_len)

    from ckpt_trace.calibration.sets import CalibrationSpec
    from ckpt_trace.fetch.sources import LocalSource
    from ckpt_trace.scan.options import ScanConfig
    from ckpt_trace.scan.run import score_stably
    from ckpt_trace.scan.streaming import loads_ahead
    from ckpt_trace.scoring.options import build_calibration

    spec = CalibrationSpec(str(ids_file))
    scan_config = ScanConfig(calibration=spec, device=args.device, dtype=args.dtype, progress=False,
                             prefetch=args.prefetch, load_ahead=args.load_ahead)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    local = LocalSource(work / "suite").checkpoints()
    calibration = build_calibration(local[0].path, spec)
    score_stably(local[0], calibration, scan_config, device, dtype)  # warm-up
    start = time.perf_counter()
    for checkpoint in local[:3]:
        score_stably(checkpoint, calibration, scan_config, device, dtype)
    per_score = (time.perf_counter() - start) / 3

    server = start_hub(REPO, work / "suite", weight_bytes / per_score, port)
    try:
        from ckpt_trace.fetch.sources import HubSource

        print(f"suite: {args.revisions} revisions of {weight_bytes / 1e6:.1f} MB; calibration {args.samples} x "
              f"{args.seq_len} tokens; Hub throttled to {weight_bytes / per_score / 1e6:.1f} MB/s so that one download "
              f"takes about one scoring ({per_score:.2f}s)")
        print(f"scoring on {device} in {args.dtype}; the streamed run loads ahead: "
              f"{'yes' if loads_ahead(scan_config, local, device, dtype) else 'no'}")

        # Sequential: download, then score, then evict, one revision at a time.
        source = HubSource(REPO, work / "cache-sequential")
        download_s = scoring_s = 0.0
        start = time.perf_counter()
        for checkpoint in source.checkpoints():
            t0 = time.perf_counter()
            fetched = source.fetch(checkpoint)
            t1 = time.perf_counter()
            score_stably(fetched, calibration, scan_config, device, dtype)
            t2 = time.perf_counter()
            source.release(fetched)
            download_s += t1 - t0
            scoring_s += t2 - t1
        sequential = time.perf_counter() - start

        # Streamed: the library's scan, with a sampler watching the cache.
        cache = work / "cache-streamed"
        scan_config.source, scan_config.cache_dir, scan_config.store = REPO, cache, work / "store"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        streamed, peak = timed_scan(scan_config, cache / "models--bench--suite" / "blobs", interval=0.01)
        if device.type == "cuda":
            print(f"peak GPU memory in the streamed run: {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB "
                  f"(one revision's weights in {args.dtype}: {weight_bytes * dtype.itemsize / 4 / 2**20:,.0f} MiB)")
    finally:
        server.kill()

    print(f"total download {download_s:.2f}s, total scoring {scoring_s:.2f}s (measured in the sequential run)")
    print(f"sequential (download then score): {sequential:.2f}s")
    print(f"streamed (ckpt_trace.scan):       {streamed:.2f}s  speedup {sequential / streamed:.2f}x")
    from ckpt_trace.store import Store

    scored_while_downloading = Store(work / "store").runs()["seconds"].sum()
    print(f"scoring during the streamed run: {scored_while_downloading:.2f}s (alone: {scoring_s:.2f}s)")
    print(f"peak cache: {peak / 1e6:.1f} MB = {peak / weight_bytes:.2f} revisions")
    longer, shorter = max(download_s, scoring_s), min(download_s, scoring_s)
    print(f"ideal for these times: {(longer + shorter / args.revisions) / longer:.3f} (the longer of the two totals, "
          f"plus one revision's share of the shorter, which nothing overlaps)")
    print(f"overlap_ratio={streamed / max(download_s, scoring_s):.3f}")


if __name__ == "__main__":
    main()
