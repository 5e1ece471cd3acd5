"""Pruning: equivalence with zeroed deltas, the KV cache, strategies, saving and loading."""

from __future__ import annotations

import json
import pickle
from contextlib import contextmanager

import polars as pl
import pytest
import torch
import transformers
from conftest import FAMILIES, LAYERS, make_model, random_ids, save_checkpoint

from ckpt_trace.calibration.sets import CalibrationSet
from ckpt_trace.cli import main
from ckpt_trace.errors import ConfigError
from ckpt_trace.model.adapters import locate
from ckpt_trace.model.loading import load_pruned
from ckpt_trace.model.surgery import DroppedAttention, apply_, drop_modules_, dropped
from ckpt_trace.pruning.choice import check_drop, choose_iterative, choose_last, choose_random, choose_similarity
from ckpt_trace.pruning.run import MANIFEST
from ckpt_trace.scoring.metrics import score
from ckpt_trace.store import SCORES_SCHEMA, Store

# What each target drops in the equivalence test: (module, layer) pairs, layer 0 included somewhere.
DROPS = {
    "attention": [("attention", 0), ("attention", 2)],
    "mlp": [("mlp", 1)],
    "block": [("block", 0)],
    "joint": [("attention", 1), ("mlp", 0), ("mlp", 2)],
}


@contextmanager
def zeroed(model, chosen):
    """The reference: the original model with the same residual deltas zeroed by hooks."""
    layout = locate(model)
    handles = []
    for module, layer in chosen:
        taps = layout.layers[layer]
        if module == "block":
            handles.append(taps.block.register_forward_hook(
                lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True))
        else:
            tap = taps.attention if module == "attention" else taps.mlp
            handles.append(tap.register_forward_hook(
                lambda m, a, out: (torch.zeros_like(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("target", sorted(DROPS))
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_equals_zeroed_deltas_before_and_after_saving(family, target, tmp_path):
    ids = torch.tensor(random_ids(2, 12, seed=5))
    original = make_model(family)
    with zeroed(original, DROPS[target]):
        expected = logits(original, ids)
    assert (expected - logits(original, ids)).abs().max() > 1e-4  # the drop changes something

    pruned = apply_(make_model(family), DROPS[target])
    torch.testing.assert_close(logits(pruned, ids), expected, atol=1e-5, rtol=1e-5)

    pruned.save_pretrained(tmp_path)
    reloaded = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path) if target == "block"
                else load_pruned(tmp_path))
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)
    saved = sum(p.numel() for p in reloaded.parameters())
    assert saved < sum(p.numel() for p in original.parameters())


def test_context_manager_restores_and_scorer_scores_a_pruned_model():
    model = make_model("llama")
    calibration = CalibrationSet.from_ids(random_ids(3, 10))
    before = score(model, calibration)
    with dropped(model, attention=[1], mlp=[2]):
        assert isinstance(model.model.layers[1].self_attn, DroppedAttention)
        pruned_scores = score(model, calibration)
    assert not isinstance(model.model.layers[1].self_attn, DroppedAttention)
    assert score(model, calibration).equals(before)
    zero = pruned_scores.filter(
        ((pl.col("module") == "attention") & (pl.col("layer") == 1)) | ((pl.col("module") == "mlp") & (pl.col("layer") == 2))
    )
    assert zero["value"].to_list() == [0.0] * 4


def test_last_and_random():
    assert choose_last("attention", 2, 6) == [("attention", 4), ("attention", 3)]
    assert choose_last("block", 1, 6) == [("block", 4)]
    assert choose_last("joint", 3, 6) == [("mlp", 4), ("attention", 4), ("mlp", 3)]
    a, b = choose_random("mlp", 3, 12, seed=1), choose_random("mlp", 3, 12, seed=1)
    assert a == b and len(set(a)) == 3
    assert any(choose_random("mlp", 3, 12, seed=s) != a for s in range(2, 6))


def test_iterative_rescores_after_each_drop():
    model = make_model("qwen2")
    calibration = CalibrationSet.from_ids(random_ids(4, 16, seed=3))
    chosen, rounds = choose_iterative(model, calibration, "joint", 3)
    # Reference: the same loop written out by hand.
    expected = []
    for _ in range(3):
        with dropped(model, [l for m, l in expected if m == "attention"], [l for m, l in expected if m == "mlp"]):
            frame = score(model, calibration).filter(pl.col("metric") == "importance")
        ranked = [(m, l) for m, l in frame.filter(pl.col("module") != "block").sort("value", "layer", "module")
                  .select("module", "layer").rows() if (m, l) not in expected]
        expected.append(ranked[0])
    assert chosen == expected
    assert rounds["round"].unique().sort().to_list() == [0, 1, 2]


def importance(values: dict[tuple[str, int], float]) -> pl.DataFrame:
    return pl.DataFrame([{"module": m, "layer": l, "metric": "importance", "value": v} for (m, l), v in values.items()])


def test_every_model_keeps_an_attention_layer():
    # Joint, at the largest count: all MLPs and all attention layers but one, whatever the seed.
    for seed in range(30):
        chosen = choose_random("joint", 5, 3, seed=seed)
        assert len(set(chosen)) == 5 and sum(m == "attention" for m, _ in chosen) == 2
    assert len({tuple(choose_random("joint", 5, 3, seed=s)) for s in range(30)}) == 3  # each attention layer can be the one kept
    # last, joint, 2L - 1: the final layer's MLP goes last of all, its attention stays.
    assert choose_last("joint", 5, 3) == [("mlp", 1), ("attention", 1), ("mlp", 0), ("attention", 0), ("mlp", 2)]
    # similarity skips a candidate that would remove the last attention layer, and takes the next one instead.
    scores = importance({("attention", 0): 0.0, ("attention", 1): 0.1, ("attention", 2): 0.2,
                         ("mlp", 0): 0.5, ("mlp", 1): 0.6, ("mlp", 2): 0.7})
    assert choose_similarity(scores, "joint", 4, 3) == [("attention", 0), ("attention", 1), ("mlp", 0), ("mlp", 1)]
    # Blocks: with attention already dropped in layers 0 and 1, block 2 holds the last attention layer.
    blocks = importance({("block", 2): 0.0, ("block", 0): 0.1, ("block", 1): 0.2})
    assert choose_similarity(blocks, "block", 2, 3, {"attention": [0, 1], "mlp": []}) == [("block", 0), ("block", 1)]
    assert sorted(choose_random("block", 2, 3, seed=0, already={"attention": [0, 1], "mlp": []})) == [("block", 0), ("block", 1)]


def test_modules_already_dropped_are_not_candidates():
    already = {"attention": [1], "mlp": [0]}
    scores = importance({("attention", 0): 0.3, ("attention", 1): 0.0, ("attention", 2): 0.2,
                         ("mlp", 0): 0.0, ("mlp", 1): 0.1, ("mlp", 2): 0.4})
    assert choose_similarity(scores, "attention", 1, 3, already) == [("attention", 2)]
    assert choose_similarity(scores, "joint", 3, 3, already) == [("mlp", 1), ("attention", 2), ("mlp", 2)]
    assert choose_last("attention", 1, 3, already) == [("attention", 0)]
    for seed in range(10):
        assert not {("attention", 1), ("mlp", 0)} & set(choose_random("joint", 3, 3, seed=seed, already=already))


@pytest.mark.parametrize(
    "target, k, n_layers, already, message",
    [
        ("attention", 2, 3, {"attention": [1]}, "cannot drop 2 attention layers of a 3-layer model with 1 module already dropped; use 1 to 1"),
        ("attention", 1, 1, None, "cannot drop any attention layers of a 1-layer model: the last attention layer must stay"),
        ("joint", 6, 3, None, "cannot drop 6 joint layers of a 3-layer model; use 1 to 5"),
        ("block", 3, 3, {"attention": [0, 1]}, "cannot drop 3 block layers of a 3-layer model with 2 modules already dropped; use 1 to 2"),
    ],
)
def test_drop_counts_the_rules_cannot_meet(target, k, n_layers, already, message):
    with pytest.raises(ConfigError) as err:
        check_drop(target, k, n_layers, already)
    assert str(err.value) == message


def test_iterative_joint_never_drops_every_attention_layer(monkeypatch):
    import ckpt_trace.pruning.choice as pruning

    model = make_model("llama")
    # Every attention layer scores below every MLP, in every round: the last attention layer must still stay.
    fixed = importance({**{("attention", l): 0.01 * l for l in range(LAYERS)}, **{("mlp", l): 1.0 + l for l in range(LAYERS)}})
    monkeypatch.setattr(pruning, "score", lambda *a, **k: fixed)
    chosen, _ = choose_iterative(model, None, "joint", 2 * LAYERS - 1)
    assert chosen == [("attention", 0), ("attention", 1), ("mlp", 0), ("mlp", 1), ("mlp", 2)]


@pytest.fixture
def checkpoint(tmp_path, tokenizer_dir):
    return save_checkpoint(tmp_path / "model", "gpt_neox", seed=4, tokenizer_dir=tokenizer_dir)


SMALL = ["--samples", "4", "--seq-len", "16", "--device", "cpu"]


def test_similarity_uses_stored_scores(checkpoint, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    assert main(["scan", str(checkpoint), "--store", str(store), *SMALL]) == 0
    stored = Store(store).scores()
    # Rewrite the stored attention importance so the answer is known: layers 2 and 0 are lowest.
    values = {0: 0.2, 1: 0.9, 2: 0.1}
    stored = stored.with_columns(value=pl.when((pl.col("module") == "attention") & (pl.col("metric") == "importance"))
                                 .then(pl.col("layer").replace_strict(values, return_dtype=pl.Float64)).otherwise("value"))
    Store(store).write_scores(stored.select(list(SCORES_SCHEMA)))
    import ckpt_trace.pruning.run as pruning

    monkeypatch.setattr(pruning, "score", lambda *a, **k: pytest.fail("scored although the store has the scores"))
    out = tmp_path / "pruned"
    code = main(["prune", str(checkpoint), "--target", "attention", "--drop", "2", "--out", str(out),
                 "--store", str(store), *SMALL])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dropped"]["attention"] == [0, 2] and manifest["order"] == ["attention 2", "attention 0"]
    assert manifest["scores_from"] == "store" and manifest["revision"] == "main"
    assert json.loads((out / "config.json").read_text())["ckpt_trace_pruned"] == {"attention": [0, 2], "mlp": []}
    assert (out / "model.safetensors").stat().st_size < (checkpoint / "model.safetensors").stat().st_size
    assert (out / "tokenizer.json").is_file()
    # The pruned model scans like any other, through the CLI.
    assert main(["scan", str(out), "--store", str(tmp_path / "s2"), *SMALL]) == 0
    rescored = Store(tmp_path / "s2").scores().filter((pl.col("module") == "attention") & pl.col("layer").is_in([0, 2]))
    assert set(rescored["value"]) == {0.0}


def test_block_prune_from_the_cli_loads_with_plain_transformers(checkpoint, tmp_path, capsys):
    out = tmp_path / "blocks"
    code = main(["prune", str(checkpoint), "--target", "block", "--drop", "1", "--strategy", "last",
                 "--out", str(out), "--store", str(tmp_path / "s"), *SMALL])
    assert code == 0, capsys.readouterr().err
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == LAYERS - 1 and len(model.gpt_neox.layers) == LAYERS - 1
    assert json.loads((out / MANIFEST).read_text())["dropped"]["block"] == [LAYERS - 2]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--target", "attention", "--drop", "0"], "cannot drop 0 attention layers of a 3-layer model; use 1 to 2"),
        (["--target", "block", "--drop", "3"], "use 1 to 2"),
        (["--target", "joint", "--drop", "9"], "use 1 to 5"),
        (["--target", "heads", "--drop", "1"], "'heads' is not one of"),
        (["--target", "mlp", "--drop", "1", "--strategy", "best"], "'best' is not one of"),
    ],
)
def test_bad_prune_input(checkpoint, tmp_path, capsys, args, fragment):
    code = main(["prune", str(checkpoint), "--out", str(tmp_path / "o"), "--store", str(tmp_path / "s"), *args, *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "o").exists()


def test_output_that_exists_is_refused(checkpoint, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep")
    code = main(["prune", str(checkpoint), "--target", "mlp", "--drop", "1", "--out", str(tmp_path / "o")])
    assert code == 2 and "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep"


def test_pruning_a_pruned_model_again(checkpoint, tmp_path, capsys):
    def run(source, out, *args):
        code = main(["prune", str(source), "--out", str(tmp_path / out), "--store", str(tmp_path / "s"), *args, *SMALL])
        assert code == 0, capsys.readouterr().err
        return json.loads((tmp_path / out / MANIFEST).read_text())

    first = run(checkpoint, "a1", "--target", "attention", "--drop", "1", "--strategy", "last")
    assert first["dropped"]["attention"] == [1] and first["previous"] is None and first["layers"] == [0, 1, 2]
    # Similarity scores the dropped layer 0.0, the lowest of all; it is not a candidate again.
    second = run(tmp_path / "a1", "a2", "--target", "attention", "--drop", "1")
    assert second["order"] != ["attention 1"] and len(second["dropped"]["attention"]) == 2
    assert second["previous"] == first and second["model"] == first["model"] == "model"
    assert second["revision"] == first["revision"]
    # The weights it came from are the unpruned model's, through every step.
    from ckpt_trace.fetch.identity import local_weights

    assert second["weights"] == first["weights"] == local_weights(checkpoint)[0] != local_weights(tmp_path / "a1")[0]
    config = json.loads((tmp_path / "a2" / "config.json").read_text())
    assert config["ckpt_trace_pruned"]["attention"] == second["dropped"]["attention"]
    # Only one attention layer is left to spare in a1; none in a2.
    code = main(["prune", str(tmp_path / "a1"), "--target", "attention", "--drop", "2", "--out", str(tmp_path / "x"), *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["ckpt-trace: error: cannot drop 2 attention layers of a 3-layer model with 1 module "
                                 "already dropped; use 1 to 1"]
    # A block dropped from a1 renumbers the layers; the manifest keeps the original numbers.
    blocks = run(tmp_path / "a1", "b1", "--target", "block", "--drop", "1", "--strategy", "last")
    assert blocks["order"] == ["block 1"] and blocks["layers"] == [0, 2]
    assert blocks["dropped"] == {"attention": [], "mlp": [], "block": [1]}  # the block took its attention along
    again = run(tmp_path / "b1", "b2", "--target", "attention", "--drop", "1", "--strategy", "last")
    assert again["order"] == ["attention 0"] and again["dropped"] == {"attention": [0], "mlp": [], "block": [1]}
    assert again["layers"] == [0, 2] and again["previous"]["previous"] == first
    model = load_pruned(tmp_path / "b2")
    assert model.config.num_hidden_layers == 2 and model.config.ckpt_trace_pruned == {"attention": [0], "mlp": []}


def test_a_model_pruned_in_python_and_saved_without_a_manifest(tmp_path, tokenizer_dir, capsys):
    source = tmp_path / "by-hand"
    drop_modules_(make_model("llama"), attention=[1]).save_pretrained(source)
    code = main(["prune", str(source), "--target", "attention", "--drop", "1", "--strategy", "last",
                 "--out", str(tmp_path / "again"), "--store", str(tmp_path / "s"), *SMALL])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "again" / MANIFEST).read_text())
    assert record["order"] == ["attention 0"] and record["previous"] is None
    assert record["dropped"] == {"attention": [0, 1], "mlp": [], "block": []}  # what the config said, and this step


def test_iterative_block_pruning_scores_a_dropped_block_as_nothing():
    model = make_model("llama")
    calibration = CalibrationSet.from_ids(random_ids(4, 16, seed=3))
    chosen, rounds = choose_iterative(model, calibration, "block", 2)
    first = chosen[0][1]
    later = rounds.filter((pl.col("round") == 1) & (pl.col("layer") == first))
    assert later.height == 6 and set(later["value"]) == {0.0}  # block, attention and MLP: both metrics
    # A block with its attention and MLP dropped passes its input through: the next layer sees the same input.
    with dropped(model, [first], [first]):
        ids = torch.tensor(random_ids(1, 8, seed=4))
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(hidden[first + 1], hidden[first], atol=0, rtol=0)


def test_loading_a_pruned_model_never_allocates_what_was_dropped(tmp_path, monkeypatch):
    """The dropped MLPs would take 604 MB; loading takes less than a quarter of that in all (measured in a fresh
    process, its imports done first), and gives the model that loading it whole and dropping after gives."""
    import copy
    import subprocess
    import sys

    from conftest import CONFIGS

    config = copy.deepcopy(CONFIGS["llama"])
    config.intermediate_size = 1 << 19  # 3 x 32 x 2^19 float32 weights per MLP: 201 MB
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    drop_modules_(model, mlp=range(LAYERS))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    script = (
        "import resource, sys, torch, transformers.models.llama.modeling_llama\n"
        "from ckpt_trace.model.loading import load_pruned\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "model = load_pruned(sys.argv[1])\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    grown = int(subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, capture_output=True,
                               text=True).stdout.split()[-1])
    assert grown < 604e6 / 4, f"loading grew the process by {grown / 1e6:.0f} MB"
    loaded = load_pruned(tmp_path)
    assert type(loaded) is transformers.LlamaForCausalLM  # the library's class, as the model was saved
    assert type(pickle.loads(pickle.dumps(loaded))) is transformers.LlamaForCausalLM
    assert all(isinstance(layer.mlp, type(loaded.model.layers[0].mlp)) for layer in loaded.model.layers)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    monkeypatch.setattr("ckpt_trace.model.loading._dropping_class", lambda *args: None)
    whole = load_pruned(tmp_path)  # allocated, initialized, then dropped
    ids = torch.tensor(random_ids(2, 12, seed=5))
    assert torch.equal(logits(loaded, ids), logits(whole, ids))
