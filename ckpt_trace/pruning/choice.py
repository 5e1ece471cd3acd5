"""Choosing what to drop: Attention, MLP, Block and Joint Layer Drop.

Strategies (He et al. 2406.15786; Tyukin et al. 2407.15516):

- ``similarity``: drop the K least important by ``importance``, in one shot;
- ``iterative``: drop the least important, score the pruned model again, repeat K times;
- ``last``: drop the K deepest, keeping the final layer (the position-based rule);
- ``random``: K chosen with a seed, as a control.

``joint`` ranks attention and MLP layers together on one scale. How modules are taken out
is `ckpt_trace.model.surgery`; a pruned model loads with `ckpt_trace.model.loading.load_pruned`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import polars as pl
from torch import nn

from ..errors import ConfigError
from ..model.surgery import dropped, layer_list, pruned_record
from ..scoring.metrics import score

TARGETS = ("attention", "mlp", "block", "joint")
STRATEGIES = ("similarity", "iterative", "last", "random")


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
