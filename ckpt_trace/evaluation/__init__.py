"""Evaluation: benchmarks, perplexity and speed of original and pruned models, stored side by side.

Takes model directories; hands on rows of the evals table. `harness` runs lm-eval tasks on the
loaded model, `speed` measures prefill and decode, `run` is the job that names each model (its
weights, and for a pruned model the original's) and stores the results.

May import: `pruning`, `scoring`, `model`, `calibration`, `fetch` and the edges.
"""

from .run import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate"]
