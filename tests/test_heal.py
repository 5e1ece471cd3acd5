"""Healing: a LoRA fine-tune of a pruned model's kept modules, merged, deterministic, recorded, and loadable anywhere."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from conftest import random_ids, save_checkpoint, write_jsonl
from test_portable import IDS, plain_transformers

from ckpt_trace.calibration.sets import CalibrationSet
from ckpt_trace.cli import main
from ckpt_trace.model.loading import load_pruned
from ckpt_trace.pruning.heal import Healing, lora, lora_targets
from ckpt_trace.pruning.run import MANIFEST
from ckpt_trace.store import Store

COMMON = ["--device", "cpu", "--samples", "4", "--seq-len", "16"]


def pruned_folder(tmp_path, family: str, tokenizer_dir=None):
    source = save_checkpoint(tmp_path / f"{family}-source", family, seed=7, tokenizer_dir=tokenizer_dir)
    out = tmp_path / f"{family}-pruned"
    assert main(["prune", str(source), "--target", "joint", "--drop", "2", "--strategy", "last", "--out", str(out),
                 "--store", str(tmp_path / "s"), *COMMON]) == 0
    return source, out


def training_file(tmp_path):
    """Eight blocks of 24 tokens, each repeating a short pattern, which a model can learn in a few steps."""
    blocks = [(row[:6] * 4) for row in random_ids(8, 6, seed=11)]
    return write_jsonl(tmp_path / "train.jsonl", [{"input_ids": b} for b in blocks])


def heal(tmp_path, pruned, out, *args):
    code = main(["heal", str(pruned), "--out", str(tmp_path / out), "--data", str(training_file(tmp_path)),
                 "--steps", "30", "--rank", "4", "--lr", "1e-2", "--batch-size", "4", "--store", str(tmp_path / "s"),
                 "--device", "cpu", *args])
    assert code == 0
    return tmp_path / out


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_heal_lowers_the_loss_is_deterministic_and_records_itself(family, tmp_path):
    _, pruned = pruned_folder(tmp_path, family)
    healed = heal(tmp_path, pruned, "healed")
    record = json.loads((healed / MANIFEST).read_text())
    before = json.loads((pruned / MANIFEST).read_text())
    steps = record.pop("healed")
    assert record == before  # the pruning is the pruned folder's, unchanged
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    data = CalibrationSet.from_ids([json.loads(line)["input_ids"] for line in lines])
    assert steps["data"] == data.id and (steps["steps"], steps["rank"], steps["alpha"], steps["lr"], steps["seed"]) == (
        30, 4, 8, 0.01, 0)
    assert steps["final_loss"] < 0.95 * steps["first_loss"]
    assert steps["label"] == f"LoRA rank 4, 30 steps of 4, lr 0.01, seed 0, on {data.id}"

    # The same seed heals to the same bytes; another seed to other weights.
    again = heal(tmp_path, pruned, "again")
    assert (again / "model.safetensors").read_bytes() == (healed / "model.safetensors").read_bytes()
    other = heal(tmp_path, pruned, "other", "--seed", "1")
    assert (other / "model.safetensors").read_bytes() != (healed / "model.safetensors").read_bytes()

    # The healed folder holds the merged adapters: its logits are the pruned model's with the adapters on.
    ids = torch.tensor(IDS)
    model = load_pruned(pruned)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    with lora(model, data, Healing(steps=30, rank=4, lr=1e-2), batch_size=4, progress=False) as (adapted, losses):
        with torch.no_grad():
            adapted_logits = adapted(input_ids=ids).logits
    assert losses[0] == pytest.approx(steps["first_loss"], abs=0)
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(healed)(input_ids=ids).logits, adapted_logits, atol=1e-5, rtol=0)
        # ... and taking the adapters out leaves the pruned model as it was, bit for bit.
        torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=0, rtol=0)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_lora_gives_the_model_back_as_it_was():
    from conftest import make_model

    model = make_model("llama").train()
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    data = CalibrationSet.from_ids(random_ids(4, 8, seed=1))
    with lora(model, data, Healing(steps=3, rank=2), batch_size=2, progress=False) as (adapted, losses):
        assert adapted is model and len(losses) == 3 and model.training is False
        assert all(not p.requires_grad for name, p in model.named_parameters() if "lora" not in name)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags and model.training
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_lora_adapts_only_the_kept_linear_layers_of_the_decoder():
    from conftest import make_model

    from ckpt_trace.model.surgery import drop_modules_

    model = drop_modules_(make_model("llama"), attention=[1], mlp=[2])
    targets = lora_targets(model)
    assert "model.layers.1.self_attn.q_proj" not in targets and "model.layers.2.mlp.up_proj" not in targets
    assert "model.layers.0.self_attn.q_proj" in targets and "model.layers.1.mlp.down_proj" in targets
    assert len(targets) == 4 * 2 + 3 * 2  # attention of layers 0 and 2, MLPs of layers 0 and 1
    assert not any("lm_head" in t or "embed" in t for t in targets)


def test_a_healed_folder_loads_right_with_plain_transformers(tmp_path, tokenizer_dir):
    folders, expected = {}, {}
    for family in ("llama", "gpt2"):
        _, pruned = pruned_folder(tmp_path, family, tokenizer_dir)
        healed = heal(tmp_path, pruned, f"{family}-healed")
        folders[family] = str(healed)
        with torch.no_grad():
            expected[family] = load_pruned(healed)(input_ids=torch.tensor(IDS)).logits
        card = (healed / "README.md").read_text()
        assert "LoRA" in card and "rank 4, 30 steps" in card and "- healed" in card
    plain = plain_transformers(folders, tmp_path)
    for family in folders:
        torch.testing.assert_close(plain[family]["logits"], expected[family], atol=1e-5, rtol=0)
        assert plain[family]["refused"] is not None


def test_eval_stores_a_healed_model_as_healed(tmp_path):
    source, pruned = pruned_folder(tmp_path, "llama")
    healed = heal(tmp_path, pruned, "healed")
    data = write_jsonl(tmp_path / "held-out.jsonl", [{"input_ids": ids} for ids in random_ids(3, 20, seed=2)])
    assert main(["eval", str(source), str(pruned), str(healed), "--perplexity", "--perplexity-data", str(data),
                 "--store", str(tmp_path / "s"), "--device", "cpu"]) == 0
    rows = Store(tmp_path / "s").evals().sort("model").select("model", "pruning", "healed")
    label = json.loads((healed / MANIFEST).read_text())["healed"]["label"]
    assert rows.rows() == [("healed", rows["pruning"][1], label), ("llama-pruned", rows["pruning"][1], None),
                           ("llama-source", None, None)]
    assert rows["pruning"][1] is not None and rows.filter(pl.col("model") == "healed")["pruning"][0] == rows["pruning"][1]


def test_bad_heal_input_is_one_line(tmp_path, capsys):
    source, pruned = pruned_folder(tmp_path, "llama")
    healed = heal(tmp_path, pruned, "healed")
    capsys.readouterr()
    cases = [
        ([str(pruned), "--steps", "0"], "Invalid value for '--steps'"),
        ([str(pruned), "--lr", "0"], "Invalid value for '--lr'"),
        ([str(pruned), "--lr", "inf"], "--lr inf must be a number greater than 0"),
        ([str(pruned), "--lr", "1e9", "--data", str(training_file(tmp_path)), "--steps", "5"], "healing diverged"),
        ([str(source)], "is no pruned model folder (it has no ckpt_trace_prune.json); prune it first"),
        ([str(healed)], "is healed already"),
        ([str(pruned), "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
    ]
    for args, fragment in cases:
        code = main(["heal", *args, "--out", str(tmp_path / "x"), "--store", str(tmp_path / "s"), "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[-1], (args, err)
        assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code = main(["heal", str(pruned), "--out", str(tmp_path / "full"), "--device", "cpu"])
    assert code == 2 and "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_heal_in_bfloat16_keeps_the_dtype(tmp_path):
    _, pruned = pruned_folder(tmp_path, "qwen2")
    healed = heal(tmp_path, pruned, "healed", "--dtype", "bfloat16")
    steps = json.loads((healed / MANIFEST).read_text())["healed"]
    assert steps["dtype"] == "bfloat16" and steps["final_loss"] < steps["first_loss"]
    model = load_pruned(healed)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_micro_suite_model_heals_on_its_training_documents_only(tmp_path, monkeypatch):
    from test_microsuite import QUICK

    from ckpt_trace.microsuite.suite import MicroSuiteConfig, _stream, build, split_documents, training_set
    from ckpt_trace.model.loading import load_tokenizer

    monkeypatch.setenv("CKPT_TRACE_HOME", str(tmp_path / "home"))
    config = MicroSuiteConfig(arch="llama", **{**QUICK, "steps": 2, "interval": 2})
    suite = build(config, progress=False)
    tokenizer = load_tokenizer(suite / "step2")
    train_docs, heldout_docs = split_documents(config.seed, config.holdout)
    assert heldout_docs and not set(train_docs) & set(heldout_docs)
    found = training_set(suite / "step2", tokenizer)
    expected = _stream(tokenizer, train_docs)
    stream = torch.cat(found.sequences)
    assert len(stream) == len(expected) // config.seq_len * config.seq_len
    assert torch.equal(stream, expected[: len(stream)])
    assert {len(s) for s in found.sequences} == {config.seq_len}

    # heal's default text for a model pruned from the suite is that set, found through the pruning manifest.
    pruned = tmp_path / "pruned"
    assert main(["prune", str(suite), "--revision", "step2", "--target", "attention", "--drop", "1", "--strategy",
                 "last", "--out", str(pruned), "--store", str(tmp_path / "s"), "--device", "cpu"]) == 0
    assert main(["heal", str(pruned), "--out", str(tmp_path / "healed"), "--steps", "2", "--store",
                 str(tmp_path / "s"), "--device", "cpu"]) == 0
    steps = json.loads((tmp_path / "healed" / MANIFEST).read_text())["healed"]
    assert steps["data"] == found.id and "training documents" in steps["data_source"]
