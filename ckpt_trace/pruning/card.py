"""The model card of a pruned (or healed) model folder: its README.md, which the Hub shows.

It says where the model comes from (source model, revision, commit, weights), what was dropped
and why (each pruning step's target, strategy and order, with the dropped modules' scores), how it
was healed, how to load it, and the evaluations ckpt-trace has stored of it and of its unpruned
source model. `ckpt-trace eval` writes the card again with its results, so a folder is ready to push.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from ..errors import ConfigError, PushError, one_line
from ..model.adapters import adapter_for_type
from ..model.loading import read_config
from ..model.portable import CODE_FILE, PREFIX, TRANSFORMERS, stock_type
from ..paths import atomic_write_bytes

CARD = "README.md"
TAG = "ckpt-trace"
"""Cards written by ckpt-trace carry this tag; a README.md without it is the user's, and is never replaced."""
_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md.j2"


def steps(record: dict) -> list[dict]:
    """Every pruning step of a manifest, earliest first (a model pruned again holds the earlier one's under
    `previous`)."""
    found = []
    while record:
        found.insert(0, record)
        record = record.get("previous")
    return found


def _step(record: dict) -> str:
    how = {"similarity": "the least important by importance, in one shot",
           "iterative": "the least important, scored again after each drop",
           "last": "the deepest, the final layer kept", "random": f"at random (seed {record.get('random_seed')})"}
    calibration = f" on calibration set `{record['calibration']}`" if record.get("calibration") else ""
    return (f"{record['drop']} {record['target']} module{'s' if record['drop'] != 1 else ''} by {record['strategy']} "
            f"({how.get(record['strategy'], record['strategy'])}){calibration}: {', '.join(record['order'])}")


def _scores(record: dict) -> tuple[list[str], list[dict]]:
    """The scores by which the last step picked each module it dropped (for `iterative`, those of the round that picked
    it), one row per module, one column per metric."""
    if not record.get("scores"):
        return [], []
    numbering = record.get("previous") and (record["previous"].get("layers"))
    picks = [(module, int(layer), i) for i, (module, layer) in enumerate(o.split() for o in record["order"])]
    if numbering:  # the order is in the original numbering, the scores in that of the model this step pruned
        picks = [(module, numbering.index(layer), i) for module, layer, i in picks if layer in numbering]
    frame = pl.DataFrame(record["scores"])
    on = ["module", "layer", "round"] if "round" in frame.columns else ["module", "layer"]
    wanted = pl.DataFrame(picks, schema=["module", "layer", "round"], orient="row").select(on)
    frame = frame.join(wanted.cast({c: frame.schema[c] for c in on}), on=on)
    if frame.height == 0:
        return [], []
    wide = frame.pivot(on="metric", index=["module", "layer"], values="value").sort("module", "layer")
    metrics = [m for m in ("importance", "update_ratio", "ablation_loss") if m in wide.columns]
    return metrics, [{**row, **{m: f"{row[m]:.4g}" for m in metrics}} for row in wide.to_dicts()]


def _evaluations(evals: pl.DataFrame | None, weights: str | None, source_weights: str | None) -> list[dict]:
    """The latest evaluation of each (task, metric, data, dtype) of this model (its `weights`; none before it is
    evaluated) beside its unpruned source's."""
    if evals is None or evals.height == 0:
        return []
    keys = ["task", "metric", "data", "num_fewshot", "n", "dtype", "device"]  # measured alike
    latest = evals.sort("created")
    of = lambda w: pl.col("weights") == w if w is not None else pl.lit(False)  # noqa: E731
    this = latest.filter(of(weights)).unique(keys, keep="last", maintain_order=True).select(*keys, this="value")
    original = latest.filter(of(source_weights) & pl.col("pruning").is_null()).unique(
        keys, keep="last", maintain_order=True).select(*keys, original="value")
    table = this.join(original, on=keys, how="full", coalesce=True, nulls_equal=True, maintain_order="left_right")
    shown = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    return [{**row, "data": row["data"] or "", "shots": "" if row["num_fewshot"] is None else row["num_fewshot"],
             "this": shown(row["this"]), "original": shown(row["original"])} for row in table.to_dicts()]


def write_card(folder: str | os.PathLike, record: dict, evals: pl.DataFrame | None = None,
               weights: str | None = None, name: str | None = None) -> Path | None:
    """Write the model card of a pruned folder from its manifest `record` and the stored `evals` (those of this
    model's `weights` and of its source's); `name` is the folder's own (where it is written in a staging folder).
    A README.md that ckpt-trace did not write is left as it is (None), and so is one that is a link (a Hugging Face
    cache snapshot's, whose blob other snapshots share)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    path = folder / CARD
    if path.is_symlink() or (path.is_file() and TAG not in (ModelCard.load(path).data.tags or [])):
        return None
    config = read_config(folder)
    family = adapter_for_type(stock_type(config)).name
    portable = str(config.get("model_type", "")).startswith(PREFIX)
    every = steps(record)
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         base_model=record["model"] if record.get("commit") else None,  # a Hub repo's commit
                         tags=[TAG, "pruned", *(["healed"] if record.get("healed") else []),
                               *(["custom_code"] if portable else [])])
    dropped = ", ".join(f"{kind} {layers}" for kind, layers in record["dropped"].items() if layers)
    metrics, scores = _scores(record)
    card = ModelCard.from_template(
        data, template_path=str(_TEMPLATE), title=f"{record['model']} at {record['revision']}, pruned",
        summary=f"{record['model']} ({record['revision']}) with {dropped} dropped by ckpt-trace"
                + (", then healed with LoRA." if record.get("healed") else "."),
        name=name or folder.name, family=family, portable=portable, code_file=CODE_FILE, record=record,
        parameters_before=every[0]["parameters_before"], steps=[_step(s) for s in every], score_metrics=metrics,
        scores=scores,
        healed=record.get("healed"), evaluations=_evaluations(evals, weights, record.get("weights")),
        transformers=TRANSFORMERS)
    atomic_write_bytes(path, str(card).encode())
    return path


def check_repo_id(repo_id: str) -> None:
    """Raise `ConfigError` for a repo id the Hub does not take (checked before any work is done)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(f"--push-to-hub {repo_id!r} is no Hub repo id; give owner/name (letters, digits, '-', '_', "
                          "'.')") from None


def push(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Push a model folder to a Hub model repo (made where it does not exist); return the commit's URL. Raises
    `PushError` with one line where the Hub refuses it (no token, no rights, a bad repo id); the folder stays."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    from ..fetch.hub import hub_errors

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        # Weights, code and configs of a model pushed there before go: the repo holds this model only.
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message=f"ckpt-trace: {Path(folder).name}",
                                   delete_patterns=["*.safetensors", "*.bin", "*.py", "*.json"])
    except (HfHubHTTPError, HFValidationError, *hub_errors()) as err:
        raise PushError(f"cannot push {str(folder)!r} to {repo_id!r} on {api.endpoint}: {one_line(err, 200)}; the "
                        "folder is kept, push it again with `hf upload`") from err
    return commit.commit_url
