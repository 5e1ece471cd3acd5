"""Peak memory of building a calibration set from a 1 MB and a 40 MB text, side by side.

A byte-level BPE tokenizer (4,096 tokens) is trained with `tokenizers` on the first
megabyte; both texts are made of the same kind of lines (random words), so only the size
differs. Each side runs `ckpt_trace.calibration.load_calibration` (64 blocks of 512
tokens) in a fresh subprocess that reports its peak resident memory. The text is read
and tokenized a piece at a time, and only the blocks taken are kept.

    python benchmarks/calibration_memory.py [--small-mb 1] [--large-mb 40] [--jsonl]

With ``--jsonl`` the same lines are written as a JSON-lines file of documents of 20 lines
(``{"text": ...}`` per line), which is read a line at a time.

The last line is ``memory_ratio=<large/small>``; the target is at most 1.3.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from measure import in_fresh_process, peak_memory

WORDS = [f"w{i}" + "abcdefghij"[i % 10] * (i % 5) for i in range(3000)]


def write_text(path: Path, megabytes: float, jsonl: bool = False) -> None:
    rng = random.Random(0)
    lines, size = [], 0
    while size < megabytes * 2**20:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
        lines.append(line)
        size += len(line) + 1
    if jsonl:
        path.write_text("".join(json.dumps({"text": "\n".join(lines[i:i + 20])}) + "\n" for i in range(0, len(lines), 20)))
    else:
        path.write_text("\n".join(lines) + "\n")


def train_tokenizer(text: Path, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from ckpt_trace.microsuite.suite import EOS, byte_level_bpe

    with text.open(encoding="utf-8") as lines:
        tokenizer = byte_level_bpe(lines, 4096)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS).save_pretrained(out)


def child(text: str, tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    from ckpt_trace.calibration.blocks import load_calibration
    from ckpt_trace.calibration.sets import CalibrationSpec

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = time.perf_counter()
    calibration = load_calibration(CalibrationSpec(text, samples=64, seq_len=512), tokenizer)
    seconds = time.perf_counter() - start
    print(calibration.n_tokens, f"{seconds:.1f}", peak_memory())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-mb", type=float, default=1)
    parser.add_argument("--large-mb", type=float, default=40)
    parser.add_argument("--jsonl", action="store_true", help="documents in a JSON-lines file instead of one text")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        peaks = {}
        suffix = ".jsonl" if args.jsonl else ".txt"
        for name, size in (("small", args.small_mb), ("large", args.large_mb)):
            write_text(root / f"{name}.txt", size)
            if args.jsonl:
                write_text(root / f"{name}.jsonl", size, jsonl=True)
        train_tokenizer(root / "small.txt", root / "tokenizer")
        for name, size in (("small", args.small_mb), ("large", args.large_mb)):
            tokens, seconds, peak = in_fresh_process(__file__, "--child", str(root / f"{name}{suffix}"),
                                                     str(root / "tokenizer"))
            peaks[name] = int(peak)
            print(f"{size:6.1f} MB {suffix[1:]}: {tokens} calibration tokens in {seconds} s, peak memory {int(peak) / 2**20:,.0f} MiB")
    print(f"memory_ratio={peaks['large'] / peaks['small']:.3f}")


if __name__ == "__main__":
    main()
