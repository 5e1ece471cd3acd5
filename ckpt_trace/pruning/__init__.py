"""Pruning: Attention, MLP, Block and Joint Layer Drop of a checkpoint, healing, and pruning curves.

Takes a checkpoint and its stored scores; hands on a pruned model folder with its manifest and
model card, ready to push (`run`, `card`), the choice of what to drop by each strategy
(`choice`), a pruned folder healed by a LoRA fine-tune (`heal`), and perplexity against the
number of modules dropped per strategy, stored in the curves table (`curves`).

May import: `scoring`, `model`, `microsuite` (its training text), `calibration`, `fetch` and the edges.
"""

from .run import MANIFEST, PruneConfig, manifest, prune

__all__ = ["MANIFEST", "PruneConfig", "manifest", "prune"]
