"""Pruning curves: the held-out perplexity of one checkpoint with k modules dropped, for every k.

For each target (attention, MLP, block) and k = 1 .. L-1, the model is measured with k
modules dropped as each strategy chooses them:

- ``similarity``: the k least important by ``importance`` (He et al.);
- ``last``: the k deepest, the final layer kept (Tyukin et al.);
- ``random``: seeds 0 .. S-1, uniformly among the choices the pruning rules allow (a control);
- ``oracle``: the k whose removal alone costs the least loss (``ablation_loss``): the
  ground truth the cheap score approximates, one module at a time.

So claim (c) reads off a curve rather than one point, and the gap between `similarity`,
`oracle` and `random` says what the cheap score is worth. Modules are dropped in place for
the measurement and put back (`ckpt_trace.model.surgery.dropped`); a dropped block is its
attention and MLP dropped, which passes its input through as a removed layer does. Each
distinct drop set is measured once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import polars as pl
from tqdm.auto import tqdm

from ..calibration.sets import CalibrationSet
from ..errors import ConfigError
from ..model.adapters import locate
from ..model.surgery import dropped, pruned_record
from ..scoring.loss import perplexity
from ..scoring.options import ScoringOptions
from ..store import CURVES_SCHEMA, VERSION
from .choice import choose_last, choose_oracle, choose_random, choose_similarity, most_droppable
from .heal import Healing, lora, training_data

TARGETS = ("attention", "mlp", "block")
STRATEGIES = ("similarity", "last", "random", "oracle")
INTACT = "intact"
"""The strategy label of the k = 0 row: the model with nothing dropped."""


@dataclass
class CurveConfig(ScoringOptions):
    """A pruning-curve job; the command line only fills this in."""

    source: str | os.PathLike
    """A Hub repo id, a model directory, or a directory of revision subdirectories."""
    revision: str | None = None
    """Revision to measure; default: the last in training order."""
    targets: tuple[str, ...] = TARGETS
    """Which of attention, mlp and block to draw curves for."""
    seeds: int = 5
    """Random drop sets per k (seeds 0 .. seeds-1)."""
    heal: int | None = None
    """Also heal each drop set of the similarity strategy with this many LoRA steps (the other settings of
    `ckpt-trace heal`, on its default text) and draw it as a line; None: no healed line."""
    perplexity_data: str | None = None
    """Any calibration spec; default: as `ckpt-trace eval --perplexity` (a micro suite's held-out documents)."""

    def __post_init__(self):
        super().__post_init__()
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"unknown target {', '.join(map(repr, unknown)) or repr('')}; use some of: {', '.join(TARGETS)}")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be at least 1, got {self.seeds}")
        if self.heal is not None and self.heal < 1:
            raise ConfigError(f"--heal {self.heal} heals nothing; give 1 or more steps, or leave it out")


def drop_sets(scores: pl.DataFrame, target: str, n_layers: int, seeds: int,
              already: dict[str, list[int]] | None = None) -> Iterator[tuple[int, str, int | None, list[tuple[str, int]]]]:
    """(k, strategy, seed, chosen) for every k the rules allow and every strategy; `scores` holds importance and
    ablation_loss rows (layer, module, metric, value)."""
    for k in range(1, most_droppable(target, n_layers, already) + 1):
        yield k, "similarity", None, choose_similarity(scores, target, k, n_layers, already)
        yield k, "last", None, choose_last(target, k, n_layers, already)
        for seed in range(seeds):
            yield k, "random", seed, choose_random(target, k, n_layers, seed, already)
        yield k, "oracle", None, choose_oracle(scores, target, k, n_layers, already)


def _modules(chosen: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """The attention and MLP layers a choice drops; a block is both of its own."""
    attention = sorted({layer for module, layer in chosen if module in ("attention", "block")})
    mlp = sorted({layer for module, layer in chosen if module in ("mlp", "block")})
    return attention, mlp


def curves(model, scores: pl.DataFrame, data, targets: tuple[str, ...] = TARGETS, seeds: int = 5,
           batch_size: int = 8, progress: bool | str = False, healing: Healing | None = None,
           heal_data: CalibrationSet | None = None) -> pl.DataFrame:
    """Perplexity on `data` of the model with k modules dropped, for every target, k, strategy (and seed).

    Returns columns target, k, strategy, seed, dropped, perplexity, n_tokens, healed, with a k = 0 row per
    target (strategy ``intact``). `scores` must hold `importance` and `ablation_loss` of this model. With `healing`,
    each drop set of the similarity strategy is also healed on `heal_data` (LoRA adapters trained, measured, taken
    out again; each distinct set once): strategy ``healed``, its `healed` column saying how.
    """
    missing = {"importance", "ablation_loss"} - set(scores["metric"].unique())
    if missing:
        raise ConfigError(f"pruning curves need {' and '.join(sorted(missing))} scores of the model")
    n_layers = len(locate(model).layers)
    already = pruned_record(model.config)
    plan = [(target, *row) for target in targets for row in drop_sets(scores, target, n_layers, seeds, already)]
    measured: dict[tuple[tuple[int, ...], tuple[int, ...], bool], tuple[float, int]] = {}
    if healing is not None:
        plan += [(target, k, "healed", None, chosen) for target, k, strategy, _, chosen in plan
                 if strategy == "similarity"]
    label = healing.label(heal_data.id, batch_size) if healing is not None else None
    bar = tqdm(total=len(plan) + 1, desc=progress if isinstance(progress, str) else "curves", unit="model",
               disable=None if progress else True, leave=False)
    try:
        intact = perplexity(model, data, batch_size)
        bar.update()
        rows = [(target, 0, INTACT, None, "", *intact, None) for target in targets]
        for target, k, strategy, seed, chosen in plan:
            attention, mlp = _modules(chosen)
            key = (tuple(attention), tuple(mlp), strategy == "healed")
            if key not in measured:
                with dropped(model, attention, mlp):
                    if strategy != "healed":
                        measured[key] = perplexity(model, data, batch_size)
                    else:
                        with lora(model, heal_data, healing, batch_size, progress=False) as (adapted, _):
                            measured[key] = perplexity(adapted, data, batch_size)
            bar.update()
            names = ", ".join(f"{module} {layer}" for module, layer in sorted(chosen, key=lambda c: (c[1], c[0])))
            rows.append((target, k, strategy, seed, names, *measured[key], label if strategy == "healed" else None))
    finally:
        bar.close()
    schema = {c: CURVES_SCHEMA[c] for c in ("target", "k", "strategy", "seed", "dropped", "perplexity", "n_tokens",
                                            "healed")}
    return pl.DataFrame(rows, schema=schema, orient="row")


def summary(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per target and k: each strategy's perplexity; random as the geometric mean over seeds (perplexities
    of random drops span orders of magnitude) with the lowest and highest."""
    fixed = frame.filter(~pl.col("strategy").is_in(["random", INTACT])).pivot(
        on="strategy", index=["target", "k"], values="perplexity")
    spread = frame.filter(pl.col("strategy") == "random").group_by("target", "k").agg(
        random=pl.col("perplexity").log().mean().exp(), random_min=pl.col("perplexity").min(),
        random_max=pl.col("perplexity").max(), seeds=pl.len())
    intact = frame.filter(pl.col("strategy") == INTACT).select("target", original=pl.col("perplexity"))
    table = fixed.join(spread, on=["target", "k"], how="left").join(intact, on="target")
    columns = [c for c in ("target", "k", "original", "similarity", "healed", "oracle", "last", "random", "random_min",
                           "random_max", "seeds") if c in table.columns]
    order = pl.col("target").replace_strict({t: i for i, t in enumerate(TARGETS)}, default=len(TARGETS))
    return table.sort(order, "k").select(columns)


def latest(frame: pl.DataFrame, model: str) -> pl.DataFrame:
    """The most recent stored pruning curve of each target of one model, on the checkpoint (its weights too),
    calibration set (what the similarity and oracle orders rank by), perplexity set and dtype of the most recent run,
    so that the curves drawn side by side are measured alike."""
    mine = frame.filter(pl.col("model") == model)
    if mine.height == 0:
        return mine
    newest = mine.sort("created").row(-1, named=True)
    alike = mine.filter((pl.col("revision") == newest["revision"]) & pl.col("weights").eq_missing(newest["weights"])
                        & pl.col("calibration").eq_missing(newest["calibration"]) & (pl.col("data") == newest["data"])
                        & (pl.col("dtype") == newest["dtype"]))
    return alike.filter(pl.col("created") == pl.col("created").max().over("target"))


def run_curves(config: CurveConfig) -> pl.DataFrame:
    """Measure the pruning curves of one checkpoint and store them in the store's curves/ table.

    Raises `CkptTraceError` (a `SourceError`, `CalibrationError`, ...) for input that cannot be used, OSError where
    the store cannot be written."""
    from ..model.loading import dtype_name, load_tokenizer
    from ..scoring.loss import ablation_losses, perplexity_set
    from ..scoring.metrics import score
    from ..scoring.options import build_calibration, loaded, score_key
    from ..store import Store

    store = Store(config.store)
    with loaded(config, config.source, config.revision) as at:
        checkpoint, model, dtype = at.checkpoint, at.model, at.dtype
        calibration = build_calibration(at.path, config.calibration)
        # Only scores of exactly these weights, dtype, calibration set and scorer are reused.
        scores = store.read_scores(score_key(checkpoint, dtype, calibration.id), ("importance", "update_ratio", "ablation_loss"))
        if scores is None:
            label = config.progress and f"{checkpoint.revision.name}: scoring"
            scores = pl.concat([score(model, calibration, config.batch_size, progress=label),
                                ablation_losses(model, calibration, config.batch_size, progress=label)])
        tokenizer = load_tokenizer(at.path)
        data = perplexity_set(at.path, model, tokenizer, config.calibration, config.perplexity_data)
        healing = Healing(steps=config.heal) if config.heal else None
        heal_data = training_data(at.path, tokenizer, config.calibration, None) if healing else None
        frame = curves(model, scores, data, config.targets, config.seeds, config.batch_size,
                       progress=config.progress and f"{checkpoint.revision.name}: curves", healing=healing,
                       heal_data=heal_data)
        at.check("measured")
    frame = frame.with_columns(
        model=pl.lit(checkpoint.model), revision=pl.lit(checkpoint.revision.name), source=pl.lit(checkpoint.source),
        weights=pl.lit(checkpoint.weights, pl.String), data=pl.lit(data.id), calibration=pl.lit(calibration.id),
        dtype=pl.lit(dtype_name(dtype)), version=pl.lit(VERSION),
        created=pl.lit(datetime.now(timezone.utc), CURVES_SCHEMA["created"]),
    ).select(list(CURVES_SCHEMA))
    store.write_curves(frame)
    return frame
