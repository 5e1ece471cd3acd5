"""What the streaming benchmarks share: a suite of random GPT-NeoX checkpoints, a pre-tokenized calibration file,
and the loopback Hub (`ckpt_trace.testing`) serving the suite from a separate process (as the real Hub is another machine)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def point_at_loopback(work: Path) -> int:
    """Set the environment for a loopback Hub on a free port (huggingface_hub reads HF_ENDPOINT once, when first
    imported, in this process and in any it starts); return the port. Call before importing transformers."""
    port = free_port()
    os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", CKPT_TRACE_HOME=str(work / "home"),
                      HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    return port


def random_suite(folder: Path, revisions: int, layers: int) -> int:
    """`revisions` random GPT-NeoX checkpoints (width 256) as step0, step1000, ...; return one's weight bytes."""
    import torch
    import transformers

    config = transformers.GPTNeoXConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=256, use_parallel_residual=True, bos_token_id=0, eos_token_id=0,
    )
    for i in range(revisions):
        torch.manual_seed(i)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder / f"step{i * 1000}")
    return (folder / "step0" / "model.safetensors").stat().st_size


def calibration_file(path: Path, samples: int, seq_len: int) -> Path:
    """A pre-tokenized jsonl of random ids in the suite's vocabulary."""
    import torch

    ids = torch.randint(0, 4096, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    path.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids.tolist()))
    return path


def start_hub(repo: str, suite: Path, bandwidth: float, port: int, per_connection: bool = False) -> subprocess.Popen:
    """The loopback Hub serving every checkpoint of `suite` as a branch of `repo`, throttled to `bandwidth` bytes/s
    (over all connections, or each connection's own); returns once it is up."""
    command = [sys.executable, "-m", "ckpt_trace.testing.loopback_hub", repo, str(suite), "--bandwidth", str(bandwidth),
               "--port", str(port), *(["--per-connection"] if per_connection else [])]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    server.stdout.readline()  # the URL: the server is up
    return server


def timed_scan(config, watched: Path, interval: float) -> tuple[float, int]:
    """Run `ckpt_trace.scan` (every revision must end scored); the seconds it took, and the peak bytes in `watched`
    (a cache, or its blobs), sampled every `interval` seconds meanwhile."""
    import threading
    import time

    from ckpt_trace.scan.run import scan

    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], folder_bytes(watched))
            except OSError:  # a folder evicted while it was walked: the next sample counts again
                pass
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    summary = scan(config)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    assert (summary["status"] == "scored").all(), summary
    return seconds, peak[0]
