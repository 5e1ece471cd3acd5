"""Hooked scoring against a plain forward pass of the same model over the same tokens.

The model is GPT-NeoX shaped like Pythia-70m (6 layers, width 512, parallel residual,
70M parameters; `--shape pythia-1b`: 16 layers, width 2048), random, so nothing is downloaded. Both sides run the decoder stack
(the scorer skips the LM head, so the plain pass does too) under inference mode,
alternating, and the medians are compared. Peak memory is measured in fresh
subprocesses with N and 4N calibration sequences, to show that it does not grow with
the calibration set.

    python benchmarks/scorer_overhead.py [--sequences 16] [--seq-len 256] [--repeats 7] [--device cpu]
                                         [--metrics importance,update_ratio] [--shape pythia-70m] [--dtype float32]

On a GPU, the issue's figure (a Pythia-1B-shaped model, 256 x 2048 tokens, bfloat16):

    python benchmarks/scorer_overhead.py --shape pythia-1b --sequences 256 --seq-len 2048 --batch-size 8 \
        --device cuda --dtype bfloat16 --repeats 3

`--metrics all` scores every one-pass metric (angular and span distances, last-token variants too).

The last line is ``overhead_ratio=<hooked/plain>``; the target on CPU is <= 1.10.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from measure import in_fresh_process, peak_memory

from ckpt_trace.calibration.sets import CalibrationSet
from ckpt_trace.scoring.metrics import ABLATION, ALL_METRICS, score
from ckpt_trace.store import METRICS

SHAPES = {  # Pythia's own widths, depths and heads
    "pythia-70m": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8),
    "pythia-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=8),
}


def pythia_shaped(shape: str, device: str, dtype: torch.dtype):
    config = transformers.GPTNeoXConfig(
        vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True, **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: no host copy of a large model first
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def calibration(n: int, seq_len: int) -> CalibrationSet:
    ids = torch.randint(0, 50304, (n, seq_len), generator=torch.Generator().manual_seed(0))
    return CalibrationSet.from_ids(ids.tolist(), "random")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain(model, cal: CalibrationSet, batch_size: int, device: str) -> None:
    with torch.inference_mode():
        for ids, mask in cal.batches(batch_size):
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory_child(n: int, seq_len: int, batch_size: int, device: str, metrics: tuple[str, ...], shape: str,
                      dtype: torch.dtype) -> None:
    """Score n sequences in this process and print its peak memory in bytes."""
    model = pythia_shaped(shape, device, dtype)
    cal = calibration(n, seq_len)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    score(model, cal, batch_size, metrics=metrics)
    print(peak_memory(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--metrics", default=",".join(METRICS), help="comma-separated one-pass metrics, or all")
    parser.add_argument("--shape", default="pythia-70m", choices=sorted(SHAPES))
    parser.add_argument("--peak-memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    metrics = tuple(m for m in ALL_METRICS if m != ABLATION) if args.metrics == "all" else tuple(args.metrics.split(","))
    dtype = getattr(torch, args.dtype)
    if args.peak_memory_child:
        peak_memory_child(args.peak_memory_child, args.seq_len, args.batch_size, args.device, metrics, args.shape, dtype)
        return

    model = pythia_shaped(args.shape, args.device, dtype)
    cal = calibration(args.sequences, args.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-NeoX {n_params / 1e6:.1f}M parameters, {args.dtype} on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"calibration: {args.sequences} x {args.seq_len} tokens, batch {args.batch_size}; metrics {', '.join(metrics)}")

    plain(model, cal, args.batch_size, args.device)  # warm-up
    score(model, cal, args.batch_size, metrics=metrics)
    plain_times, hooked_times = [], []
    for _ in range(args.repeats):
        plain_times.append(timed(lambda: plain(model, cal, args.batch_size, args.device), args.device))
        hooked_times.append(timed(lambda: score(model, cal, args.batch_size, metrics=metrics), args.device))
    p, h = statistics.median(plain_times), statistics.median(hooked_times)
    tokens = cal.n_tokens
    print(f"plain forward:  median {p:.3f}s  ({tokens / p:,.0f} tokens/s)  runs {[round(t, 3) for t in plain_times]}")
    print(f"hooked scoring: median {h:.3f}s  ({tokens / h:,.0f} tokens/s)  runs {[round(t, 3) for t in hooked_times]}")

    peaks = {}
    for n in (args.sequences, 4 * args.sequences):
        (peak,) = in_fresh_process(
            __file__, "--peak-memory-child", str(n), "--seq-len", str(args.seq_len), "--batch-size",
            str(args.batch_size), "--device", args.device, "--metrics", ",".join(metrics), "--shape", args.shape,
            "--dtype", args.dtype,
        )
        peaks[n] = int(peak)
        print(f"peak memory scoring {n:4d} sequences: {peaks[n] / 2**20:,.0f} MiB")
    n, n4 = args.sequences, 4 * args.sequences
    print(f"memory_growth_ratio={peaks[n4] / peaks[n]:.3f}  (4N / N sequences)")
    print(f"overhead_ratio={h / p:.3f}")


if __name__ == "__main__":
    main()
