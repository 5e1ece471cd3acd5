"""How checkpoints are loaded and scored: the options shared by scans, pruning and curves, a checkpoint fetched and
loaded for the length of a `with`, its calibration set, and the key its scores are stored under.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..calibration.blocks import load_calibration
from ..calibration.sets import CalibrationSet, CalibrationSpec, fit_seq_len
from ..errors import CalibrationError, ConfigError
from ..fetch.sources import Checkpoint, changed_error, changed_since, identified_now, open_source
from ..model.adapters import adapter_for_type
from ..model.portable import stock_type
from ..model.loading import (
    dtype_name,
    load_model,
    load_tokenizer,
    max_positions,
    read_config,
    resolve_device,
    resolve_dtype,
)
from ..store import ScoreKey
from .metrics import SCORER_VERSION


@dataclass(kw_only=True)
class ScoringOptions:
    """How checkpoints are loaded and scored; shared by scans, pruning, curves and evaluation."""

    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    """Which calibration set to score on."""
    batch_size: int = 8
    """Sequences per forward pass."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    device_map: str | dict | None = None
    """Split the model over devices instead of putting it on one: auto, balanced, balanced_low_0 or sequential (every
    GPU, then the CPU, placed by accelerate), or, from Python, a dict of module names to devices. None: all of it on
    the one device."""
    dtype: str = "auto"
    """auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16."""
    store: str | os.PathLike = "data"
    """Store directory."""
    cache_dir: str | os.PathLike | None = None
    """Hugging Face cache for Hub sources; None: the usual one (HF_HUB_CACHE)."""
    trust_remote_code: bool = False
    """Allow a checkpoint's own modeling code to run."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if isinstance(self.device_map, str) and self.device_map not in DEVICE_MAPS:
            raise ConfigError(f"unknown device map {self.device_map!r}; use {', '.join(DEVICE_MAPS)}")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class Loaded:
    """One checkpoint of a source, fetched and loaded (see `loaded`)."""

    source: object
    checkpoint: Checkpoint
    """As identified right before it was loaded: its `weights` are those of the model."""
    path: str | os.PathLike
    model: torch.nn.Module
    dtype: torch.dtype

    def check(self, doing: str) -> None:
        """Raise `SourceError` if the checkpoint's files changed since it was identified and loaded: what was made
        of the model is then of other bytes than its identity says, and must not be kept."""
        if changed_since(self.checkpoint):
            raise changed_error(self.checkpoint, doing)


@contextmanager
def loaded(options: ScoringOptions, source: str | os.PathLike, revision: str | None) -> Iterator[Loaded]:
    """The revision `revision` of `source` (default: the last in training order), fetched, identified and loaded on
    the options' device and dtype; released (for the Hub: its download evicted) on exit. Call `Loaded.check` before
    keeping anything made of the model."""
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    opened = open_source(source, options.cache_dir)
    checkpoint = opened.checkpoints(revision or "last:1")[-1]
    fetched = opened.fetch(checkpoint)
    try:
        fetched = identified_now(fetched)
        model = load_model(fetched.path, device, dtype, options.trust_remote_code, options.device_map)
        yield Loaded(opened, fetched, fetched.path, model, dtype)
    finally:
        opened.release(fetched)


def build_calibration(model_dir, spec: CalibrationSpec) -> CalibrationSet:
    """The scan's one calibration set, tokenized by (and checked against) the model in `model_dir`."""
    config = read_config(model_dir)
    adapter_for_type(stock_type(config))
    limit = max_positions(config)
    spec = fit_seq_len(spec, limit)
    calibration = load_calibration(spec, load_tokenizer(model_dir))
    if isinstance(config.get("vocab_size"), int):
        calibration.check_vocab(config["vocab_size"])
    if limit is not None and calibration.max_len > limit:
        raise CalibrationError(
            f"calibration sequences have {calibration.max_len} tokens, more than the model's {limit} positions; "
            f"use --seq-len {limit} or less"
        )
    return calibration


def score_key(checkpoint: Checkpoint, dtype: torch.dtype, calibration: str) -> ScoreKey:
    """What the scores of a checkpoint scanned with this dtype and calibration set are stored under."""
    return ScoreKey(checkpoint.model, checkpoint.revision.name, checkpoint.weights, dtype_name(dtype), calibration,
                    SCORER_VERSION)
