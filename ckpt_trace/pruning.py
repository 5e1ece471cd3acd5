"""Pruning: Attention, MLP, Block and Joint Layer Drop.

Strategies (He et al. 2406.15786; Tyukin et al. 2407.15516):

- ``similarity``: drop the K least important by ``importance``, in one shot;
- ``iterative``: drop the least important, score the pruned model again, repeat K times;
- ``last``: drop the K deepest, keeping the final layer (the position-based rule);
- ``random``: K chosen with a seed, as a control.

``joint`` ranks attention and MLP layers together on one scale. How modules are taken out
is `ckpt_trace.surgery`; a pruned model loads with `ckpt_trace.models.load_pruned`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
from torch import nn

from . import __version__
from .adapters import locate
from .errors import ConfigError
from .paths import unmakeable
from .scan import ScoringOptions
from .scoring import score
from .surgery import apply_, dropped, layer_list, pruned_record


TARGETS = ("attention", "mlp", "block", "joint")
STRATEGIES = ("similarity", "iterative", "last", "random")
MANIFEST = "ckpt_trace_prune.json"


# -- choosing what to drop ------------------------------------------------------------
#
# The rules, for a model that may already be pruned (`already`: what its config says is dropped):
# modules already dropped are not candidates; every model keeps at least one attention layer (the
# KV cache reads the sequence length from one, and a Transformer without attention is no longer
# one); attention, MLP and block targets also keep at least one of their own kind.

def candidates(target: str, n_layers: int, already: dict[str, list[int]] | None = None) -> list[tuple[str, int]]:
    """Every (module, layer) a target may drop, in layer order; modules already dropped are not candidates."""
    if target == "block":
        return [("block", layer) for layer in range(n_layers)]
    already = already or {}
    modules = ("attention", "mlp") if target == "joint" else (target,)
    return [(m, layer) for layer in range(n_layers) for m in modules if layer not in already.get(m, ())]


def keeps_attention(chosen: Iterable[tuple[str, int]], n_layers: int, already: dict[str, list[int]] | None = None) -> bool:
    """Whether at least one attention layer is left after dropping `chosen` (blocks take their attention along)."""
    gone = set((already or {}).get("attention", ())) | {layer for m, layer in chosen if m in ("attention", "block")}
    return len(gone) < n_layers


def most_droppable(target: str, n_layers: int, already: dict[str, list[int]] | None = None) -> int:
    """The largest drop count the rules allow."""
    already = already or {}
    attention = n_layers - len(set(already.get("attention", ())))
    mlp = n_layers - len(set(already.get("mlp", ())))
    if target == "joint":
        return attention - 1 + mlp
    return {"attention": attention, "mlp": mlp, "block": n_layers if attention else 0}[target] - 1


def check_drop(target: str, k: int, n_layers: int, already: dict[str, list[int]] | None = None) -> None:
    """A drop count must leave at least one layer of the target's kind, and one attention layer."""
    most = most_droppable(target, n_layers, already)
    gone = sum(len(v) for v in (already or {}).values())
    model = f"a {n_layers}-layer model" + (f" with {gone} module{'s' if gone > 1 else ''} already dropped" if gone else "")
    if most < 1:
        raise ConfigError(f"cannot drop any {target} layers of {model}: the last {'attention' if target == 'joint' else target} layer must stay")
    if not 1 <= k <= most:
        raise ConfigError(f"cannot drop {k} {target} layers of {model}; use 1 to {most}")


def _take(order: Iterable[tuple[str, int]], k: int, target: str, n_layers: int,
          already: dict[str, list[int]] | None, exclude: Iterable[tuple[str, int]] = ()) -> list[tuple[str, int]]:
    """The first k candidates in `order`, skipping any that would remove the last attention layer."""
    allowed = set(candidates(target, n_layers, already)) - set(exclude)
    chosen: list[tuple[str, int]] = []
    for candidate in order:
        if len(chosen) == k:
            break
        if candidate in allowed and keeps_attention([*chosen, candidate], n_layers, already):
            chosen.append(candidate)
    return chosen


def rank(scores: pl.DataFrame, target: str, metric: str = "importance") -> list[tuple[str, int]]:
    """(module, layer) pairs of a target, lowest `metric` first (ties: shallower layer, then attention)."""
    modules = ("attention", "mlp") if target == "joint" else (target,)
    ranked = (
        scores.filter((pl.col("metric") == metric) & pl.col("module").is_in(modules))
        .sort("value", "layer", "module")
        .select("module", "layer").rows()
    )
    return [(m, int(layer)) for m, layer in ranked]


def choose_similarity(scores: pl.DataFrame, target: str, k: int, n_layers: int,
                      already: dict[str, list[int]] | None = None) -> list[tuple[str, int]]:
    """The k least important candidates, in one shot."""
    return _take(rank(scores, target), k, target, n_layers, already)


def choose_oracle(scores: pl.DataFrame, target: str, k: int, n_layers: int,
                  already: dict[str, list[int]] | None = None) -> list[tuple[str, int]]:
    """The k candidates whose removal alone costs the least loss (`ablation_loss`), in one shot: the ground truth
    that `similarity` approximates."""
    return _take(rank(scores, target, "ablation_loss"), k, target, n_layers, already)


def choose_last(target: str, k: int, n_layers: int, already: dict[str, list[int]] | None = None) -> list[tuple[str, int]]:
    """The K deepest candidates, the final layer last of all (for joint: MLP before attention within a layer)."""
    modules = ("mlp", "attention") if target == "joint" else (target,)
    layers = [*range(n_layers - 2, -1, -1), n_layers - 1]
    return _take(((m, layer) for layer in layers for m in modules), k, target, n_layers, already)


def choose_random(target: str, k: int, n_layers: int, seed: int,
                  already: dict[str, list[int]] | None = None) -> list[tuple[str, int]]:
    """K candidates drawn uniformly with a seed among the draws the rules allow."""
    pool = candidates(target, n_layers, already)
    rng = random.Random(seed)  # one stream: each rejected draw is followed by a fresh one
    while True:  # a draw keeps an attention layer with probability at least 1 / len(pool), since k < len(pool)
        chosen = rng.sample(pool, k)
        if keeps_attention(chosen, n_layers, already):
            return sorted(chosen, key=lambda c: (c[1], c[0]))


def choose_iterative(model: nn.Module, calibration, target: str, k: int, batch_size: int = 8, progress=False):
    """Drop the least important module, score the pruned model again, and repeat; return the picks and their scores.

    Picks are in the original layer numbering. Scoring runs on a model whose picks so far are
    dropped; a dropped block is its attention and MLP dropped (it passes its input through, and
    scores 0), so indices stay put.
    """
    n_layers = len(layer_list(model)[2])
    already = pruned_record(model.config)
    chosen: list[tuple[str, int]] = []
    rounds = []
    for step in range(k):
        attention = [layer for m, layer in chosen if m == "attention"]
        mlp = [layer for m, layer in chosen if m == "mlp"]
        blocks = [layer for m, layer in chosen if m == "block"]
        with dropped(model, attention + blocks, mlp + blocks):
            scores = score(model, calibration, batch_size, progress=progress and f"iterative {step + 1}/{k}")
        now = {"attention": [*already["attention"], *attention, *blocks], "mlp": [*already["mlp"], *mlp]}
        chosen += _take(rank(scores, target), 1, target, n_layers, now, exclude=chosen)
        rounds.append(scores.with_columns(round=pl.lit(step, pl.Int32)))
    return chosen, pl.concat(rounds)


# -- loading and the whole job ----------------------------------------------------------

@dataclass
class PruneConfig(ScoringOptions):
    """A pruning job; the command line only fills this in."""

    source: str | os.PathLike
    """A Hub repo id, a model directory, or a directory of revision subdirectories."""
    target: str
    """attention, mlp, block or joint (attention and MLP ranked together)."""
    drop: int
    """How many modules to drop."""
    out: str | os.PathLike
    """Output directory for the pruned model; must not exist or be empty."""
    strategy: str = "similarity"
    """similarity, iterative, last or random."""
    revision: str | None = None
    """Revision to prune; default: the last in training order."""
    random_seed: int = 0
    """Seed of the `random` strategy."""

    def __post_init__(self):
        super().__post_init__()
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; use one of: {', '.join(TARGETS)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; use one of: {', '.join(STRATEGIES)}")
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"output directory {str(out)!r} exists and is not empty; choose a new --out")
        if (blocker := unmakeable(out)) is not None:
            raise ConfigError(f"output folder {str(out)!r} cannot be made: {str(blocker)!r} is a file; choose another --out")


def prune(config: PruneConfig) -> Path:
    """Choose what to drop, drop it, and save the pruned model with a manifest; return the output directory."""
    from .models import load_tokenizer
    from .scan import build_calibration, loaded, score_key
    from .store import Store

    with loaded(config, config.source, config.revision) as at:
        source, checkpoint, model, dtype = at.source, at.checkpoint, at.model, at.dtype
        n_layers = len(locate(model).layers)
        already = pruned_record(model.config)
        check_drop(config.target, config.drop, n_layers, already)
        scores, scores_from, calibration = None, None, None
        if config.strategy in ("similarity", "iterative"):
            calibration = build_calibration(at.path, config.calibration)
        if config.strategy == "similarity":
            # Only scores of exactly these weights, dtype, calibration set and scorer are reused.
            stored = Store(config.store).read_scores(score_key(checkpoint, dtype, calibration.id))
            scores = stored.select("layer", "module", "metric", "value", "n_tokens") if stored is not None else None
            scores_from = "store" if scores is not None else "computed"
            if scores is None:
                scores = score(model, calibration, config.batch_size, progress=config.progress and "scoring")
            chosen = choose_similarity(scores, config.target, config.drop, n_layers, already)
        elif config.strategy == "iterative":
            chosen, scores = choose_iterative(model, calibration, config.target, config.drop, config.batch_size, config.progress)
            scores_from = "computed"
        elif config.strategy == "last":
            chosen = choose_last(config.target, config.drop, n_layers, already)
        else:
            chosen = choose_random(config.target, config.drop, n_layers, config.random_seed, already)
        assert len(chosen) == config.drop, (chosen, config.drop)  # check_drop admits only counts the rules can meet
        previous = manifest(at.path) if (Path(at.path) / MANIFEST).is_file() else None
        layers, total = _original_numbering(previous, n_layers), _dropped_so_far(previous, already)
        for module, layer in chosen:
            total[module].append(layers[layer])
        before = sum(p.numel() for p in model.parameters())
        apply_(model, chosen)
        record = {
            # Layer numbers in `dropped`, `order` and `layers` are those of the original, unpruned model.
            "source": str(config.source), "model": previous["model"] if previous else source.model,
            "revision": previous["revision"] if previous else checkpoint.revision.name,
            "commit": previous["commit"] if previous else checkpoint.revision.commit,
            # The unpruned model's weights (see ckpt_trace.identity), which evaluations compare this model with.
            "weights": previous.get("weights") if previous else checkpoint.weights,
            "target": config.target, "strategy": config.strategy, "drop": config.drop,
            # A block dropped takes its attention and MLP with it: they are listed under block only.
            "dropped": {kind: sorted(set(v) - (set(total["block"]) if kind != "block" else set())) for kind, v in total.items()},
            "order": [f"{m} {layers[l]}" for m, l in chosen],
            "layers": [i for n, i in enumerate(layers) if ("block", n) not in chosen],
            "scores_from": scores_from, "calibration": calibration.id if calibration else None,
            "random_seed": config.random_seed if config.strategy == "random" else None,
            # In the numbering of the model this step pruned.
            "scores": scores.to_dicts() if scores is not None else None,
            "parameters_before": before, "parameters_after": sum(p.numel() for p in model.parameters()),
            "dtype": str(dtype).removeprefix("torch."), "version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "previous": previous,
        }
        out = Path(config.out)
        staging = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            model.save_pretrained(staging)
            tokenizer = load_tokenizer(at.path)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            (staging / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
            if out.exists():
                out.rmdir()  # empty, checked above
            os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out


def manifest(path: str | os.PathLike) -> dict:
    """The manifest of a pruned model directory."""
    return json.loads((Path(path) / MANIFEST).read_text())


def _dropped_so_far(previous: dict | None, already: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """What earlier steps dropped, in the original numbering: from their manifest, or (a model pruned in
    Python and saved without one) from its config, whose numbering is then the original one."""
    dropped = previous["dropped"] if previous else (already or {})
    return {kind: list(dropped.get(kind, [])) for kind in ("attention", "mlp", "block")}


def _original_numbering(previous: dict | None, n_layers: int) -> list[int]:
    """The original layer index of each layer of a model that earlier pruning steps may have shortened."""
    if previous is None:
        return list(range(n_layers))
    blocks = set(_dropped_so_far(previous)["block"])
    return previous.get("layers") or [i for i in range(n_layers + len(blocks)) if i not in blocks]


