"""What `ckpt-trace heal` wins back, and what it costs: micro-llama's step1000 with half its attention dropped.

The Llama-style micro suite (built, or found in ckpt-trace's cache) is pruned as `prune --target attention --drop 3`
does (the 3 least important attention layers of 6), then healed with `heal`'s defaults (200 LoRA steps of 8 blocks
on the suite's training documents), each into a temporary folder. The held-out perplexity of the original, the
pruned and the healed model is measured as `eval --perplexity` measures it (the suite's held-out documents), and the
healing is timed on its own, from loading the pruned folder to the saved healed one.

    python benchmarks/heal_recovery.py [--steps 200] [--device cpu]

The last line is ``recovered=<(pruned - healed) / (pruned - original) perplexity>  heal_s=<seconds>  original=<ppl>
pruned=<ppl>  healed=<ppl>``: the share of the perplexity that dropping cost which healing wins back.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ckpt_trace.calibration.sets import CalibrationSpec
from ckpt_trace.microsuite.suite import MicroSuiteConfig, build
from ckpt_trace.model.loading import load_pruned, load_tokenizer
from ckpt_trace.pruning.heal import HealConfig, heal
from ckpt_trace.pruning.run import PruneConfig, prune
from ckpt_trace.scoring.loss import perplexity, perplexity_set


def held_out_perplexity(folder: Path, device: str) -> float:
    model = load_pruned(folder, device)
    data = perplexity_set(folder, model, load_tokenizer(folder), CalibrationSpec())
    return perplexity(model, data)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    suite = build(MicroSuiteConfig(arch="llama"), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = dict(device=args.device, dtype="float32", store=tmp / "store", progress=False)
        pruned = prune(PruneConfig(source=suite, revision="step1000", target="attention", drop=3, out=tmp / "pruned",
                                   **common))
        start = time.perf_counter()
        healed = heal(HealConfig(pruned=pruned, out=tmp / "healed", steps=args.steps, **common))
        seconds = time.perf_counter() - start
        original, after_drop, after_heal = (held_out_perplexity(f, args.device)
                                            for f in (suite / "step1000", pruned, healed))
        recovered = (after_drop - after_heal) / (after_drop - original)
        print(f"recovered={recovered:.3f}  heal_s={seconds:.1f}  original={original:.2f}  pruned={after_drop:.2f}  "
              f"healed={after_heal:.2f}")


if __name__ == "__main__":
    main()
