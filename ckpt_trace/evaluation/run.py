"""Evaluation of original and pruned models: benchmarks, perplexity and speed, stored side by side.

- Benchmarks run through lm-evaluation-harness (``lm-eval``), which is handed the loaded
  model object, so pruned models need no files copied anywhere. Task names, paths to
  local task YAML files (fully offline), ``paper`` (the tasks and shots of He et al.) and
  ``ckpt_trace_python_mc`` (a small multiple-choice task shipped with ckpt-trace) are
  understood.
- Perplexity is exp of the mean negative log-likelihood over every predicted token, by
  default on the documents a micro suite held out from training (so it equals exp of the
  suite's validation loss), else on blocks of the calibration text that the calibration
  set does not take.
- Speed: prefill latency (batch 1, T tokens), decode throughput with the KV cache, peak
  memory and KV-cache bytes, after warm-up, as medians with their spread, synchronised on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from ..errors import ConfigError, SourceError
from ..fetch.sources import single_checkpoint
from ..scoring.loss import perplexity, perplexity_set, position_losses
from ..scoring.options import ScoringOptions
from ..store import EVALS_SCHEMA, VERSION
from .harness import run_tasks
from .speed import measure_speed


def describe(path: Path) -> dict:
    """Who a model directory is: its own name, the model and revision it comes from, its pruning and healing, and the
    fingerprints of its weights and of the unpruned model's (which a pruned model's manifest records; null in
    manifests written before it did)."""
    from ..fetch.identity import local_weights
    from ..pruning.card import steps
    from ..pruning.run import MANIFEST, manifest

    if (path / MANIFEST).is_file():
        record = manifest(path)
        dropped = ", ".join(f"{kind} {layers}" for kind, layers in record["dropped"].items() if layers)
        strategies = [step["strategy"] for step in steps(record)]  # a model pruned again: every step, earliest first
        return {"model": path.name, "source_model": record["model"], "revision": record["revision"],
                "pruning": f"{dropped} ({' then '.join(strategies)})", "weights": local_weights(path)[0],
                "source_weights": record.get("weights"), "healed": (record.get("healed") or {}).get("label")}
    checkpoint = single_checkpoint(path)
    return {"model": path.name, "source_model": checkpoint.model, "revision": checkpoint.revision.name, "pruning": None,
            "weights": checkpoint.weights, "source_weights": checkpoint.weights}


@dataclass
class EvalConfig(ScoringOptions):
    """An evaluation job over one or more model directories; the command line only fills this in."""

    models: list[str | os.PathLike]
    """Model directories: checkpoints and pruned models alike."""
    tasks: list[str] | None = None
    """lm-eval task names, task YAML paths, ``paper`` (the tasks and shots of He et al.) or ``ckpt_trace_python_mc``;
    None: ``paper``, unless only perplexity or speed is asked for."""
    num_fewshot: int | None = None
    """Shots for every task; None: each task's own (the paper's for its tasks)."""
    limit: int | None = None
    """At most this many items per task (for quick looks)."""
    perplexity: bool = False
    """Measure perplexity on held-out text (or on the perplexity data given)."""
    perplexity_data: str | None = None
    """Any calibration spec, pre-tokenized jsonl included; None: the documents a micro suite held out from training,
    else blocks of the calibration text that the calibration set does not take."""
    position_loss: bool = False
    """Measure the mean next-token loss by position (buckets 1, 2-4, 5-16, 17-64, ... up to the model's context) on the
    perplexity text: how much a pruned model loses at long range against short."""
    speed: bool = False
    """Measure prefill latency, decode throughput, peak memory and KV-cache bytes."""
    prompt_tokens: int = 128
    """Prompt length of the speed measurement."""
    new_tokens: int = 32
    """Tokens decoded by the speed measurement."""

    def __post_init__(self):
        super().__post_init__()
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit {self.limit} leaves no item to evaluate; give 1 or more, or leave it out")
        if self.tasks is None and not (self.perplexity or self.position_loss or self.speed):
            self.tasks = ["paper"]


def evaluate(config: EvalConfig) -> pl.DataFrame:
    """Evaluate every model directory and store the results in the store's evals/ table.

    Raises `SourceError` for a directory that is no model, `ConfigError` for a task lm-eval cannot run,
    `CalibrationError` for perplexity data that cannot be used, OSError where the store cannot be written."""
    from ..fetch.identity import file_stamps
    from ..model.loading import dtype_name, load_model, load_tokenizer, resolve_device, resolve_dtype
    from ..store import Store

    store = Store(config.store)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    frames = []
    for model_dir in map(Path, config.models):
        # Identified right before it is loaded, and checked once measured: a result is of the bytes it names.
        stamps = file_stamps(model_dir)
        identity = describe(model_dir)
        model = load_model(model_dir, device, dtype, config.trust_remote_code, config.device_map)
        tokenizer = load_tokenizer(model_dir)
        rows = []
        if config.perplexity or config.position_loss:
            data = perplexity_set(model_dir, model, tokenizer, config.calibration, config.perplexity_data)
        if config.perplexity:
            ppl, n = perplexity(model, data, config.batch_size)
            rows.append({"task": "perplexity", "metric": "perplexity", "value": ppl, "n": n, "num_fewshot": None,
                         "data": data.id})
        if config.position_loss:
            rows += [{"task": "position_loss", "metric": f"positions {low}-{high}", "value": loss, "n": n,
                      "num_fewshot": None, "data": data.id}
                     for low, high, loss, n in position_losses(model, data, config.batch_size)]
        if config.speed:
            for metric, value in measure_speed(model, config.prompt_tokens, config.new_tokens).items():
                rows.append({"task": "speed", "metric": metric, "value": value, "n": None, "num_fewshot": None})
        if config.tasks:
            rows += run_tasks(model, tokenizer, config.tasks, config.num_fewshot, config.batch_size, config.limit)
        if file_stamps(model_dir) != stamps:
            raise SourceError(f"the weights in {str(model_dir)!r} changed while they were evaluated; nothing of them "
                              "is stored; run again once they are written")
        now = datetime.now(timezone.utc)
        frame = pl.DataFrame(
            [{**identity, **row, "path": str(model_dir.resolve()), "dtype": dtype_name(dtype), "device": str(device),
              "version": VERSION, "created": now} for row in rows],
            schema=EVALS_SCHEMA,
        )
        store.write_evals(frame)
        frames.append(frame)
        del model
    _refresh_cards(store, config.models, frames)
    return pl.concat(frames) if frames else pl.DataFrame(schema=EVALS_SCHEMA)


def _refresh_cards(store, models: list, frames: list[pl.DataFrame]) -> None:
    """Write again the model card of each pruned folder evaluated, with every result stored of it and of its source
    (once all are evaluated, so that an original evaluated after its pruned model is in the card too)."""
    from ..pruning.card import write_card
    from ..pruning.run import MANIFEST, manifest

    evals = None
    for model_dir, frame in zip(map(Path, models), frames):
        if (model_dir / MANIFEST).is_file() and frame.height:
            evals = store.evals() if evals is None else evals
            write_card(model_dir, manifest(model_dir), evals, frame["weights"][0])
