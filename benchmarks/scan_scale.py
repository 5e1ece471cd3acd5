"""A download-bound suite scanned serially and over Ray with two workers, side by side.

A suite of N random GPT-NeoX checkpoints is served by the tests' loopback Hub, run as a
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
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
REPO = "bench/scale"


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (a snapshot's links to blobs not counted again), skipping those deleted while
    it counts (an eviction)."""
    total = 0
    for file in path.rglob("*") if path.exists() else ():
        try:
            total += file.stat().st_size if file.is_file() and not file.is_symlink() else 0
        except FileNotFoundError:
            pass
    return total


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed_scan(config, cache: Path) -> tuple[float, int]:
    """Seconds the scan took, and the peak bytes in its cache."""
    from ckpt_trace.scan import scan

    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], folder_bytes(cache))
            except OSError:  # a folder evicted while it was walked: the next sample counts again
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    summary = scan(config)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    assert (summary["status"] == "scored").all(), summary
    return seconds, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=40)
    parser.add_argument("--download-s", type=float, default=3.0, help="seconds to download one revision")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scan-scale-"))
    port = free_port()
    # Read once, on first import of huggingface_hub, by the driver and by every Ray worker it starts.
    os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", CKPT_TRACE_HOME=str(work / "home"),
                      HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")

    import torch
    import transformers

    config = transformers.GPTNeoXConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=256, use_parallel_residual=True, bos_token_id=0, eos_token_id=0,
    )
    for i in range(args.revisions):
        torch.manual_seed(i)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(work / "suite" / f"step{i * 1000}")
    weight_bytes = (work / "suite" / "step0" / "model.safetensors").stat().st_size
    ids = torch.randint(0, 4096, (16, 128), generator=torch.Generator().manual_seed(0))
    calibration_file = work / "ids.jsonl"
    calibration_file.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist()))

    bandwidth = weight_bytes / args.download_s
    server = subprocess.Popen([sys.executable, str(TESTS / "loopback_hub.py"), REPO, str(work / "suite"),
                               "--bandwidth", str(bandwidth), "--per-connection", "--port", str(port)],
                              stdout=subprocess.PIPE, text=True)
    server.stdout.readline()  # the URL: the server is up
    try:
        import ray

        from ckpt_trace.calibration import CalibrationSpec
        from ckpt_trace.scan import ScanConfig

        print(f"suite: {args.revisions} revisions of {weight_bytes / 1e6:.1f} MB, each connection throttled to "
              f"{bandwidth / 1e6:.1f} MB/s ({args.download_s:.1f} s a revision); torch {torch.__version__}, "
              f"ray {ray.__version__}, {os.cpu_count()} CPUs")
        runs = {}
        for name, use_ray in (("serial", False), ("ray", True)):
            if use_ray:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            scan_config = ScanConfig(source=REPO, calibration=CalibrationSpec(str(calibration_file)), device="cpu",
                                     dtype="float32", progress=False, store=work / f"store-{name}",
                                     cache_dir=work / f"cache-{name}", ray=use_ray)
            seconds, disk = timed_scan(scan_config, work / f"cache-{name}")
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            runs[name] = seconds
            print(f"{name:6s}: {seconds:7.2f} s  ({args.revisions / seconds:.2f} revisions/s); peak cache "
                  f"{disk / 1e6:.1f} MB = {disk / weight_bytes:.2f} revisions; driver peak memory {rss / 2**20:,.0f} MiB")
        ray.shutdown()
    finally:
        server.kill()
    print(f"serial_s={runs['serial']:.2f} ray_s={runs['ray']:.2f} ray_ratio={runs['ray'] / runs['serial']:.3f}")


if __name__ == "__main__":
    main()
