"""The built-in micro checkpoint suite: a small model that ckpt-trace trains itself, for real.

Takes a `MicroSuiteConfig`; hands on a local folder of revision subfolders (``step0``, ``step1``,
...), each a complete Hugging Face model directory, which `fetch` then reads like any suite, and the
documents the suite held out from training, for perplexity and the built-in task.

May import: `fetch`, `calibration` and the edges.
"""

from .suite import ARCHS, MicroSuiteConfig, build, heldout_set, schedule

__all__ = ["ARCHS", "MicroSuiteConfig", "build", "heldout_set", "schedule"]
