"""What the memory benchmarks share: a process's peak memory, and a measurement run in a fresh process of its own,
so that one side's peak never counts toward the other's."""

from __future__ import annotations

import resource
import subprocess
import sys


def peak_memory(device: str = "cpu") -> int:
    """Peak bytes of this process: what torch allocated on a CUDA device (since the last reset), else the peak
    resident set."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def in_fresh_process(script: str, *args: str) -> list[str]:
    """Run `script` with `args` in a new interpreter; the words of the last line it printed."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1].split()
