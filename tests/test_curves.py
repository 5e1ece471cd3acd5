"""Pruning curves: every point is the perplexity of the saved-and-reloaded pruned model, and each strategy picks
what it says."""

from __future__ import annotations

import copy
import math

import polars as pl
import pytest
from conftest import LAYERS, make_model, random_ids, save_checkpoint, write_jsonl

from ckpt_trace.calibration.sets import CalibrationSet
from ckpt_trace.cli import main
from ckpt_trace.model.loading import load_pruned
from ckpt_trace.model.surgery import apply_
from ckpt_trace.pruning.choice import choose_random
from ckpt_trace.pruning.curves import curves, summary
from ckpt_trace.pruning.curves import latest as latest_curves
from ckpt_trace.scoring.loss import ablation_losses, perplexity
from ckpt_trace.scoring.metrics import score
from ckpt_trace.store import Store


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "olmo2", "gpt2", "gemma2"])
def test_every_point_is_the_perplexity_of_the_pruned_model(family, tmp_path):
    model = make_model(family, seed=3)
    calibration = CalibrationSet.from_ids(random_ids(4, 12, seed=1))
    data = CalibrationSet.from_ids(random_ids(3, 14, seed=2))
    scores = pl.concat([score(model, calibration), ablation_losses(model, calibration)])
    frame = curves(model, scores, data, seeds=2, batch_size=2)

    # k = 1 .. L-1 for every target; per k: similarity, last, oracle and 2 random seeds; one intact row per target.
    assert frame.filter(pl.col("k") > 0).group_by("target").len().sort("target").rows() == \
        [("attention", 5 * (LAYERS - 1)), ("block", 5 * (LAYERS - 1)), ("mlp", 5 * (LAYERS - 1))]
    intact, n = perplexity(model, data)
    assert frame.filter(pl.col("strategy") == "intact")["perplexity"].to_list() == [intact] * 3
    assert set(frame["n_tokens"]) == {n} == {3 * 13}

    for target, k, strategy, seed, dropped, value in frame.filter(pl.col("k") > 0).select(
            "target", "k", "strategy", "seed", "dropped", "perplexity").rows():
        chosen = [(m, int(layer)) for m, layer in (part.split(" ") for part in dropped.split(", "))]
        assert len(chosen) == k and {m for m, _ in chosen} == {target}
        # The reference: the model pruned by surgery, saved and loaded back as a user would.
        pruned = apply_(copy.deepcopy(model), chosen)
        pruned.save_pretrained(tmp_path / "p")
        expected, _ = perplexity(load_pruned(tmp_path / "p", "cpu"), data)
        assert value == pytest.approx(expected, rel=1e-5), (target, k, strategy, seed, dropped)

        ranked = lambda metric: scores.filter((pl.col("module") == target) & (pl.col("metric") == metric)).sort(
            "value", "layer")["layer"].to_list()
        layers = sorted(layer for _, layer in chosen)
        if strategy == "similarity":
            assert layers == sorted(ranked("importance")[:k])
        elif strategy == "oracle":
            assert layers == sorted(ranked("ablation_loss")[:k])  # the k whose removal alone costs least
        elif strategy == "last":
            assert layers == list(range(LAYERS - 1 - k, LAYERS - 1))  # the deepest, the final layer kept
        else:
            assert sorted(chosen, key=lambda c: c[1]) == choose_random(target, k, LAYERS, seed)
    assert model.training is False and math.isfinite(perplexity(model, data)[0])
    assert perplexity(model, data)[0] == intact  # every module is back in place


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_healed_point_is_the_perplexity_of_the_pruned_model_healed(family, monkeypatch):
    from ckpt_trace.pruning import curves as curves_module
    from ckpt_trace.pruning.heal import Healing, lora

    model = make_model(family, seed=3)
    calibration = CalibrationSet.from_ids(random_ids(4, 12, seed=1))
    data = CalibrationSet.from_ids(random_ids(3, 14, seed=2))
    train = CalibrationSet.from_ids(random_ids(6, 10, seed=4))
    scores = pl.concat([score(model, calibration), ablation_losses(model, calibration)])
    healing = Healing(steps=5, rank=2, lr=1e-2)
    trained = []
    counted = lambda *args, **kwargs: (trained.append(1), lora(*args, **kwargs))[1]  # noqa: E731
    monkeypatch.setattr(curves_module, "lora", counted)
    frame = curves(model, scores, data, targets=("attention", "block"), seeds=1, batch_size=2, healing=healing,
                   heal_data=train)
    healed = frame.filter(pl.col("strategy") == "healed")
    similarity = frame.filter(pl.col("strategy") == "similarity")
    assert healed.select("target", "k", "dropped").rows() == similarity.select("target", "k", "dropped").rows()
    assert set(healed["healed"]) == {healing.label(train.id, 2)} and frame.filter(
        pl.col("strategy") != "healed")["healed"].null_count() == frame.height - healed.height
    assert len(trained) == healed.select("dropped").n_unique()  # each distinct drop set healed once

    for dropped, value in healed.select("dropped", "perplexity").rows():
        chosen = [(m, int(layer)) for m, layer in (part.split(" ") for part in dropped.split(", "))]
        pruned = apply_(copy.deepcopy(model), chosen)
        with lora(pruned, train, healing, batch_size=2, progress=False) as (adapted, _):
            expected, _ = perplexity(adapted, data)
        assert value == pytest.approx(expected, rel=1e-4), dropped
        unhealed = similarity.filter(pl.col("dropped") == dropped)["perplexity"][0]
        assert value != unhealed
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert perplexity(model, data)[0] == frame.filter(pl.col("strategy") == "intact")["perplexity"][0]


def test_summary_takes_the_geometric_mean_of_random_drops():
    rows = [("attention", 0, "intact", None, 10.0), ("attention", 1, "similarity", None, 11.0),
            ("attention", 1, "oracle", None, 10.5), ("attention", 1, "last", None, 12.0),
            ("attention", 1, "random", 0, 10.0), ("attention", 1, "random", 1, 1000.0)]
    frame = pl.DataFrame(rows, schema=["target", "k", "strategy", "seed", "perplexity"], orient="row")
    table = summary(frame)
    assert table.columns == ["target", "k", "original", "similarity", "oracle", "last", "random", "random_min",
                             "random_max", "seeds"]
    assert table.row(0) == pytest.approx(("attention", 1, 10.0, 11.0, 10.5, 12.0, 100.0, 10.0, 1000.0, 2))


def test_curves_command_stores_them_and_the_report_draws_one_figure_per_target(tmp_path, tokenizer_dir, capsys):
    suite = tmp_path / "suite"
    for step, seed in ((0, 1), (100, 2)):
        save_checkpoint(suite / f"step{step}", "llama", seed=seed, tokenizer_dir=tokenizer_dir)
    store = tmp_path / "store"
    data = write_jsonl(tmp_path / "heldout.jsonl", [{"input_ids": ids} for ids in random_ids(3, 16, seed=9)])
    small = ["--samples", "4", "--seq-len", "16", "--device", "cpu", "--store", str(store)]
    assert main(["scan", str(suite), "--metrics", "importance,update_ratio,ablation_loss", *small]) == 0
    capsys.readouterr()
    assert main(["curves", str(suite), "--seeds", "3", "--perplexity-data", str(data), *small]) == 0
    out = capsys.readouterr().out
    assert "perplexity of suite step100 on 45 held-out tokens" in out and "random_max" in out
    stored = Store(store).curves()
    assert stored.height == 3 + 3 * (LAYERS - 1) * 6 and set(stored["revision"]) == {"step100"}
    assert stored["weights"].n_unique() == 1 and stored["data"].n_unique() == 1

    assert main(["report", "--store", str(store), "--out", str(tmp_path / "fig")]) == 0
    md = (tmp_path / "fig" / "report.md").read_text()
    for target in ("attention", "mlp", "block"):
        assert (tmp_path / "fig" / "suite" / f"pruning_curve_{target}.png").stat().st_size > 10_000
        assert f"suite/pruning_curve_{target}.png" in md
    findings = md.split("## Findings")[1].split("\n## ")[0]
    # 3 layers: "half" of the attention is 1 layer, read off the curve.
    similarity = stored.filter((pl.col("target") == "attention") & (pl.col("k") == 1) & (pl.col("strategy") == "similarity"))
    assert f"At step100, with 1 of 3 attention layers dropped by similarity, perplexity {stored['perplexity'][0]:.2f} -> " \
           f"{similarity['perplexity'][0]:.2f}" in findings

    # A later run for one target replaces that target's curve and leaves the others'.
    assert main(["curves", str(suite), "--targets", "mlp", "--seeds", "2", "--perplexity-data", str(data), *small]) == 0
    again = Store(store).curves()
    assert again.height == stored.height - (LAYERS - 1) and again.filter(pl.col("target") != "mlp").equals(
        stored.filter(pl.col("target") != "mlp"))
    assert set(again.filter(pl.col("target") == "mlp")["seed"].drop_nulls()) == {0, 1}
    latest = latest_curves(again, "suite")
    assert set(latest["target"]) == {"attention", "mlp", "block"} and latest.height == again.height
    # An mlp curve measured later with another calibration set (what the similarity order ranks by) is drawn alone.
    other = again.filter(pl.col("target") == "mlp").with_columns(
        calibration=pl.lit("0" * 12), created=pl.col("created") + pl.duration(seconds=1))
    newer = latest_curves(pl.concat([again, other]), "suite")
    assert set(newer["target"]) == {"mlp"} and newer["calibration"].to_list() == ["0" * 12] * other.height

    # step100 re-published with other weights and scanned again: its stored curves are not of the scores the report
    # shows, so they are left out, with a note, rather than drawn beside them.
    save_checkpoint(suite / "step100", "llama", seed=3, tokenizer_dir=tokenizer_dir)
    assert main(["scan", str(suite), "--metrics", "importance,update_ratio,ablation_loss", *small]) == 0
    rescanned = Store(store).scores().filter(pl.col("revision") == "step100")["weights"].unique()
    assert len(rescanned) == 2 and stored["weights"][0] in set(rescanned)
    capsys.readouterr()
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "fig2")]) == 0
    md = (tmp_path / "fig2" / "report.md").read_text()
    newest = next(w for w in rescanned if w != stored["weights"][0])
    assert (f"the pruning curves of step100 are of other weights ({stored['weights'][0][:12]}) than its scores here "
            f"({newest[:12]}); they are left out: run `ckpt-trace curves` again") in md
    assert "pruning_curve" not in md and not list((tmp_path / "fig2").glob("**/pruning_curve_*.png"))
    assert "attention layers dropped by similarity" not in md

    # The mlp curve measured again on the new weights is drawn, alone: the older targets' curves are of the old ones.
    assert main(["curves", str(suite), "--targets", "mlp", "--seeds", "1", "--perplexity-data", str(data), *small]) == 0
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "fig3")]) == 0
    md = (tmp_path / "fig3" / "report.md").read_text()
    assert "suite/pruning_curve_mlp.png" in md and "pruning_curve_attention" not in md and "pruning curves of" not in md
    # Curves measured on weights published after the scan: the scan is what is out of date.
    save_checkpoint(suite / "step100", "llama", seed=4, tokenizer_dir=tokenizer_dir)
    assert main(["curves", str(suite), "--targets", "mlp", "--seeds", "1", "--perplexity-data", str(data), *small]) == 0
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "fig4")]) == 0
    md = (tmp_path / "fig4" / "report.md").read_text()
    assert "pruning_curve" not in md and "they are left out: run `ckpt-trace scan` again" in md


@pytest.mark.parametrize("args, message", [
    (["--targets", "heads"], "unknown target 'heads'; use some of: attention, mlp, block"),
    (["--seeds", "0"], "seeds must be at least 1, got 0"),
])
def test_curves_bad_input_is_one_line(args, message, tmp_path, tokenizer_dir, capsys):
    checkpoint = save_checkpoint(tmp_path / "model", "llama", tokenizer_dir=tokenizer_dir)
    assert main(["curves", str(checkpoint), "--store", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err
    assert err == f"ckpt-trace: error: {message}\n"
    assert not (tmp_path / "s").exists()
