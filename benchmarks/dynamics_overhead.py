"""A scan with the training-dynamics metrics against the same scan without them, on one local suite, side by side.

The suite is N random GPT-NeoX checkpoints (`loopback_suite.random_suite`: width 256, 6 layers) in a folder, the
calibration set 64 random sequences of 128 tokens (`--seq-len`; 8,192 tokens: CKA measures a sample of 4,096, so the
CKA's share of the time falls as the calibration set grows). Three scans of the
whole suite, each into a fresh store, alternate for `--repeats` rounds:

- plain: importance and update_ratio (the default);
- weights: plain + weight_norm, weight_change_final, weight_change_prev (read from the weight files);
- all: plain + every dynamics metric (cka_final and cka_prev too: outputs kept in the same pass, the reference's on
  disk, and one more pass for the checkpoint before the reference, which is scored first).

Beside them, the time to read every checkpoint's weights once, two ways: every tensor copied out of the page-cached
files (`read`), and each revision's model loaded as a scan loads it (`load`); and the time of the weight metrics alone (`weight_metrics` of every revision against the last and the one before, as
the scan computes them). Medians are compared.

    python benchmarks/dynamics_overhead.py [--revisions 6] [--repeats 3] [--threads 2] [--seq-len 128]

Targets: `weight_metrics_over_load` = weight metrics alone / load once at most 1 (`weight_metrics_over_read` is at
least 3: each revision's tensors are read with the reference's and the previous revision's); the last line,
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
    parser.add_argument("--seq-len", type=int, default=128, help="calibration tokens per sequence (at most 256)")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from ckpt_trace.calibration.sets import CalibrationSpec
    from ckpt_trace.model.loading import load_model
    from ckpt_trace.scan.options import ScanConfig
    from ckpt_trace.scan.run import scan
    from ckpt_trace.scoring.metrics import DYNAMICS, WEIGHT_METRICS
    from ckpt_trace.scoring.weights import structure, weight_metrics
    from ckpt_trace.store import METRICS

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="dynamics-overhead-"))
    suite = work / "suite"
    size = random_suite(suite, args.revisions, layers=6)
    calibration = calibration_file(work / "calibration.jsonl", 64, args.seq_len)
    sides = {"plain": METRICS, "weights": (*METRICS, *WEIGHT_METRICS), "all": (*METRICS, *DYNAMICS)}
    times: dict[str, list[float]] = {side: [] for side in [*sides, "read", "load", "weight metrics"]}
    folders = sorted(suite.iterdir(), key=lambda f: int(f.name.removeprefix("step")))
    shape = structure(load_model(folders[0], torch.device("cpu"), torch.float32))

    def load_once() -> None:  # as a scan reads them: each revision's model loaded
        for folder in folders:
            load_model(folder, torch.device("cpu"), torch.float32)

    def weight_metrics_alone() -> None:  # each revision against the last and the one before, as a scan does
        for before, folder in zip([None, *folders], folders):
            weight_metrics(folder, shape, folders[-1], before)

    def read_once() -> None:  # every tensor's bytes, copied out of the (page-cached) files
        for folder in sorted(suite.iterdir()):
            for tensor in load_file(folder / "model.safetensors").values():
                tensor.clone()

    for round_ in range(args.repeats):
        for side, metrics in sides.items():
            config = ScanConfig(source=str(suite), store=str(work / f"store-{side}-{round_}"), metrics=metrics,
                                calibration=CalibrationSpec(str(calibration)), device="cpu", dtype="float32",
                                progress=False)
            start = time.perf_counter()
            summary = scan(config)
            times[side].append(time.perf_counter() - start)
            assert summary["status"].to_list() == ["scored"] * args.revisions, summary
        for side, work_ in (("read", read_once), ("load", load_once), ("weight metrics", weight_metrics_alone)):
            start = time.perf_counter()
            work_()
            times[side].append(time.perf_counter() - start)
        print(f"round {round_ + 1}: " + ", ".join(f"{side} {t[-1]:.3f} s" for side, t in times.items()), flush=True)

    median = {side: statistics.median(t) for side, t in times.items()}
    print(f"{args.revisions} revisions of {size / 2**20:.1f} MiB, 64 x {args.seq_len} calibration tokens, {args.threads} threads; "
          f"medians of {args.repeats}: " + ", ".join(f"{side} {t:.3f} s" for side, t in median.items()))
    print(f"weights_ratio={median['weights'] / median['plain']:.3f}")
    print(f"weight_metrics_over_read={median['weight metrics'] / median['read']:.3f}")
    print(f"weight_metrics_over_load={median['weight metrics'] / median['load']:.3f}")
    print(f"dynamics_ratio={median['all'] / median['plain']:.3f}")


if __name__ == "__main__":
    main()
