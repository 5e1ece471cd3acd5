"""The pruning job: choose what to drop, drop it, and save the pruned model with its manifest."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ConfigError
from ..model.adapters import locate
from ..model.portable import save
from ..model.surgery import apply_, pruned_record
from ..paths import json_object, staged_folder, unmakeable
from ..scoring.metrics import score
from ..scoring.options import ScoringOptions
from ..store import VERSION
from .card import check_repo_id, push, write_card
from .choice import STRATEGIES, TARGETS, check_drop, choose_iterative, choose_last, choose_random, choose_similarity

MANIFEST = "ckpt_trace_prune.json"


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
    """similarity (the least important by importance, in one shot), iterative (the least important, scored again
    after each drop), last (the deepest, keeping the final layer) or random (chosen with the random seed)."""
    revision: str | None = None
    """Revision to prune; default: the last in training order."""
    random_seed: int = 0
    """Seed of the `random` strategy."""
    push_to_hub: str | None = None
    """A Hub model repo (owner/name) to push the pruned folder to, model card included; made where it does not
    exist (a token with write access is needed: `hf auth login`)."""

    def __post_init__(self):
        super().__post_init__()
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub)
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; use one of: {', '.join(TARGETS)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; use one of: {', '.join(STRATEGIES)}")
        check_out(self.out)


def prune(config: PruneConfig) -> Path:
    """Choose what to drop, drop it, and save the pruned model with a manifest; return the output directory.

    Raises `ConfigError` for a drop count the model cannot take, `SourceError`, `SelectionError` or
    `CalibrationError` for a source, revision or calibration set that cannot be used, OSError where `out` cannot be
    written (nothing is left there then)."""
    from ..model.loading import load_tokenizer
    from ..scoring.options import build_calibration, loaded, score_key
    from ..store import Store

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
            # The unpruned model's weights (see ckpt_trace.fetch.identity), which evaluations compare this model with.
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
            "dtype": str(dtype).removeprefix("torch."), "version": VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "previous": previous,
        }
        out = Path(config.out)
        with staged_folder(out) as staging:  # an empty `out` (checked above) is replaced
            write_folder(staging, model, load_tokenizer(at.path), record, Store(config.store), out.name)
            at.check("pruned")  # nothing is left in `out` then
    if config.push_to_hub:
        push(out, config.push_to_hub)
    return out


def check_out(out: str | os.PathLike) -> None:
    """Raise `ConfigError` for an output folder that exists and is not empty, or cannot be made."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output directory {str(out)!r} exists and is not empty; choose a new --out")
    if (blocker := unmakeable(out)) is not None:
        raise ConfigError(f"output folder {str(out)!r} cannot be made: {str(blocker)!r} is a file; choose another "
                          "--out")


def write_folder(folder: Path, model, tokenizer, record: dict, store, name: str) -> None:
    """Write a pruned (or healed) model folder: the model as plain transformers loads it right, its tokenizer, its
    manifest `record`, and its model card with what `store` holds of it (`name`: the folder's own, where `folder`
    is a staging folder)."""
    save(model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    write_card(folder, record, store.evals(), name=name)


def manifest(path: str | os.PathLike) -> dict:
    """The manifest of a pruned model directory. Raises OSError where it cannot be read, ValueError where it is no
    JSON object."""
    return json_object(Path(path) / MANIFEST)


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
