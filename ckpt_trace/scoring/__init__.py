"""Scoring: every metric of every layer and module of one model, from one hooked forward pass.

Takes a loaded model and a `CalibrationSet`; hands on a polars frame of (layer, module, metric,
value, n_tokens). `metrics` holds the one-pass similarity and magnitude scores, `loss` the ground
truth (`ablation_loss`) and perplexity, `options` what scans, pruning and curves share: how a
checkpoint is fetched, loaded and calibrated, and the key its scores are stored under.

May import: `model`, `microsuite`, `calibration`, `fetch` and the edges.
"""

from .loss import ablation_losses, perplexity
from .metrics import ALL_METRICS, score
from .options import ScoringOptions

__all__ = ["ALL_METRICS", "ScoringOptions", "ablation_losses", "perplexity", "score"]
