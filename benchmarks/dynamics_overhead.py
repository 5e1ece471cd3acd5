"""A scan with the training-dynamics metrics against the same scan without them, on one local suite, side by side.

The suite is N random GPT-NeoX checkpoints (`loopback_suite.random_suite`: width 256, 6 layers) in a folder, the
calibration set 64 random sequences of 128 tokens (8,192 tokens: CKA measures a sample of 4,096). Three scans of the
whole suite, each into a fresh store, alternate for `--repeats` rounds:

- plain: importance and update_ratio (the default);
- weights: plain + weight_norm, weight_change_final, weight_change_prev (read from the weight files);
- all: plain + every dynamics metric (cka_final and cka_prev too: outputs kept in the same pass, the reference's on
  disk, and one more pass for the checkpoint before the reference, which is scored first).

Beside them, the time to read every checkpoint's weights once (safetensors into memory). Medians are compared.

    python benchmarks/dynamics_overhead.py [--revisions 6] [--repeats 3] [--threads 2]

Targets: `weights_overhead_over_read` = (weights - plain) / read-once at most 1; the last line,
``dynamics_ratio=<all / plain>``, at most 1.25.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from loopback_suite import calibration_file, random_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from ckpt_trace.calibration.sets import CalibrationSpec
    from ckpt_trace.scan.options import ScanConfig
    from ckpt_trace.scan.run import scan
    from ckpt_trace.scoring.metrics import DYNAMICS, WEIGHT_METRICS
    from ckpt_trace.store import METRICS

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="dynamics-overhead-"))
    suite = work / "suite"
    size = random_suite(suite, args.revisions, layers=6)
    calibration = calibration_file(work / "calibration.jsonl", 64, 128)
    sides = {"plain": METRICS, "weights": (*METRICS, *WEIGHT_METRICS), "all": (*METRICS, *DYNAMICS)}
    times: dict[str, list[float]] = {side: [] for side in [*sides, "read"]}

    def read_once() -> None:
        for folder in sorted(suite.iterdir()):
            load_file(folder / "model.safetensors")

    for round_ in range(args.repeats):
        for side, metrics in sides.items():
            config = ScanConfig(source=str(suite), store=str(work / f"store-{side}-{round_}"), metrics=metrics,
                                calibration=CalibrationSpec(str(calibration)), device="cpu", dtype="float32",
                                progress=False)
            start = time.perf_counter()
            summary = scan(config)
            times[side].append(time.perf_counter() - start)
            assert summary["status"].to_list() == ["scored"] * args.revisions, summary
        start = time.perf_counter()
        read_once()
        times["read"].append(time.perf_counter() - start)
        print(f"round {round_ + 1}: " + ", ".join(f"{side} {t[-1]:.3f} s" for side, t in times.items()), flush=True)

    median = {side: statistics.median(t) for side, t in times.items()}
    print(f"{args.revisions} revisions of {size / 2**20:.1f} MiB, 64 x 128 calibration tokens, {args.threads} threads; "
          f"medians of {args.repeats}: " + ", ".join(f"{side} {t:.3f} s" for side, t in median.items()))
    print(f"weights_ratio={median['weights'] / median['plain']:.3f}")
    print(f"weights_overhead_over_read={(median['weights'] - median['plain']) / median['read']:.3f}")
    print(f"dynamics_ratio={median['all'] / median['plain']:.3f}")


if __name__ == "__main__":
    main()
