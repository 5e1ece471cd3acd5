"""A download-bound suite scanned serially and over Ray with two workers, side by side.

A suite of N random GPT-NeoX checkpoints is served by the loopback Hub (`ckpt_trace.testing`), run as a
separate process, each connection throttled to a bandwidth at which one revision takes
`--download-s` seconds to download (as from a CDN, where a connection, not the link, is the
limit): the suite is download-bound. The serial run is `ckpt_trace.scan` (downloading the next
revision while one is scored); the Ray run is `ckpt_trace.scan` with ``ray=True`` on a local
Ray instance of 2 CPUs: one task per revision, two at a time. Each writes its own store and
cache; a sampler records the bytes held in each cache, and the driver's peak memory is
read after each run.

    python benchmarks/scan_scale.py [--revisions 40] [--download-s 3]

The last line is ``ray_ratio=<ray / serial>``, with the peak disk and memory; the target is a
ratio of at most 0.6.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from loopback_suite import calibration_file, point_at_loopback, random_suite, start_hub, timed_scan
from measure import peak_memory

REPO = "bench/scale"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=40)
    parser.add_argument("--download-s", type=float, default=3.0, help="seconds to download one revision")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scan-scale-"))
    port = point_at_loopback(work)  # for the driver and every Ray worker it starts

    import torch

    weight_bytes = random_suite(work / "suite", args.revisions, layers=4)
    ids_file = calibration_file(work / "ids.jsonl", 16, 128)
    bandwidth = weight_bytes / args.download_s
    server = start_hub(REPO, work / "suite", bandwidth, port, per_connection=True)
    try:
        import ray

        from ckpt_trace.calibration.sets import CalibrationSpec
        from ckpt_trace.scan.options import ScanConfig

        print(f"suite: {args.revisions} revisions of {weight_bytes / 1e6:.1f} MB, each connection throttled to "
              f"{bandwidth / 1e6:.1f} MB/s ({args.download_s:.1f} s a revision); torch {torch.__version__}, "
              f"ray {ray.__version__}, {os.cpu_count()} CPUs")
        runs = {}
        for name, use_ray in (("serial", False), ("ray", True)):
            if use_ray:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            scan_config = ScanConfig(source=REPO, calibration=CalibrationSpec(str(ids_file)), device="cpu",
                                     dtype="float32", progress=False, store=work / f"store-{name}",
                                     cache_dir=work / f"cache-{name}", ray=use_ray)
            seconds, disk = timed_scan(scan_config, work / f"cache-{name}", interval=0.02)
            rss = peak_memory()
            runs[name] = seconds
            print(f"{name:6s}: {seconds:7.2f} s  ({args.revisions / seconds:.2f} revisions/s); peak cache "
                  f"{disk / 1e6:.1f} MB = {disk / weight_bytes:.2f} revisions; driver peak memory {rss / 2**20:,.0f} MiB")
        ray.shutdown()
    finally:
        server.kill()
    print(f"serial_s={runs['serial']:.2f} ray_s={runs['ray']:.2f} ray_ratio={runs['ray'] / runs['serial']:.3f}")


if __name__ == "__main__":
    main()
