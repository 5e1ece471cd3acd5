"""Pruned folders load right with plain transformers, on a machine without ckpt-trace: every family, every target.

The folders are made by `prune`, then loaded in a fresh interpreter where ``import ckpt_trace`` fails, with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; its logits and cached greedy generation are
compared with ckpt-trace's own loading and with the unpruned model whose dropped deltas hooks zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES, random_ids, save_checkpoint
from test_pruning import zeroed

from ckpt_trace.model.loading import load_pruned, read_config
from ckpt_trace.model.portable import CODE_FILE, PREFIX
from ckpt_trace.pruning.run import MANIFEST, PruneConfig, prune

IDS = random_ids(2, 24, seed=21)  # longer than the sliding windows of the Gemma configurations (16)
PROMPT = [[5, 17, 250, 3, 99]]
NEW_TOKENS = 8

# (target, drop) per folder; joint drops attention and MLP layers together, "then" adds a block dropped afterwards.
TARGETS = {"attention": ("attention", 2), "mlp": ("mlp", 1), "block": ("block", 1), "joint": ("joint", 3)}

PLAIN = textwrap.dedent("""
    import json, sys
    sys.modules["ckpt_trace"] = None  # no ckpt-trace on this machine
    try:
        import ckpt_trace  # noqa: F401
        sys.exit("ckpt_trace imported")
    except ImportError:
        pass
    import torch, transformers

    folders, out = json.loads(sys.argv[1]), sys.argv[2]
    ids, prompt = torch.tensor(json.loads(sys.argv[3])), torch.tensor(json.loads(sys.argv[4]))
    results = {}
    for name, folder in folders.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            tokens = model.generate(prompt, max_new_tokens=%d, do_sample=False, use_cache=True)
        try:
            transformers.AutoModelForCausalLM.from_pretrained(folder)
            refused = None
        except Exception as err:  # what plain loading says, for the test to read
            refused = f"{type(err).__name__}: {err}"
        results[name] = {"logits": logits, "tokens": tokens, "class": type(model).__name__, "refused": refused}
    torch.save(results, out)
""" % NEW_TOKENS)


def plain_transformers(folders: dict[str, str], tmp_path) -> dict:
    """Load every folder in a fresh interpreter that cannot import ckpt_trace; its logits, tokens and refusals."""
    out = tmp_path / "plain.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(folders), str(out), json.dumps(IDS),
                           json.dumps(PROMPT)], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def dropped_pairs(folder) -> list[tuple[str, int]]:
    """The (module, layer) pairs a pruned folder's manifest says were dropped, in the original numbering."""
    record = json.loads((folder / MANIFEST).read_text())["dropped"]
    return [(module, layer) for module, layers in record.items() for layer in layers]


def test_every_family_and_target_loads_right_without_ckpt_trace(tmp_path):
    ids, prompt = torch.tensor(IDS), torch.tensor(PROMPT)
    folders, expected = {}, {}
    for family in FAMILIES:
        source = save_checkpoint(tmp_path / family / "source", family, seed=3)
        for kind, (target, drop) in TARGETS.items():
            out = tmp_path / family / kind
            prune(PruneConfig(source=source, target=target, drop=drop, out=out, strategy="random", random_seed=1,
                              device="cpu", store=tmp_path / "store", progress=False))
            folders[f"{family}/{kind}"] = str(out)
            original = load_pruned(source)
            with zeroed(original, dropped_pairs(out)), torch.no_grad():
                reference = original(input_ids=ids).logits
            assert (reference - original(input_ids=ids).logits).abs().max() > 1e-4  # the drop changes something
            mine = load_pruned(out)
            with torch.no_grad():
                expected[f"{family}/{kind}"] = (reference, mine(input_ids=ids).logits,
                                                mine.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False))
        # A block dropped from a model whose attention was dropped before: a pruned folder again.
        again = tmp_path / family / "then-block"
        prune(PruneConfig(source=tmp_path / family / "attention", target="block", drop=1, out=again, strategy="last",
                          device="cpu", store=tmp_path / "store", progress=False))
        folders[f"{family}/then-block"] = str(again)
        original = load_pruned(source)
        with zeroed(original, dropped_pairs(again)), torch.no_grad():
            reference = original(input_ids=ids).logits
        mine = load_pruned(again)
        with torch.no_grad():
            expected[f"{family}/then-block"] = (reference, mine(input_ids=ids).logits,
                                                mine.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False))

    plain = plain_transformers(folders, tmp_path)
    for name, folder in folders.items():
        reference, ours, tokens = expected[name]
        got = plain[name]
        torch.testing.assert_close(got["logits"], ours, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(got["logits"], reference, atol=1e-5, rtol=0, msg=name)
        assert got["tokens"].tolist() == tokens.tolist(), name
        config = read_config(folder)
        family, kind = name.split("/")
        if kind == "block":  # a plain model of its family, which plain loading takes as it is
            assert got["refused"] is None and not config["model_type"].startswith(PREFIX), name
            assert not (tmp_path / folder / CODE_FILE).exists()
        else:
            assert got["refused"] is not None and "trust_remote_code=True" in got["refused"], name
            assert config["model_type"] == PREFIX + read_config(tmp_path / family / "source")["model_type"]
            assert got["class"] == "CkptTracePrunedForCausalLM", name


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_folder_code_is_never_run_by_ckpt_trace(family, tmp_path):
    """ckpt-trace loads a pruned folder with the family's stock class, whatever code the folder holds: a folder whose
    code would raise loads all the same, with trust_remote_code too."""
    source = save_checkpoint(tmp_path / "source", family, seed=2)
    out = tmp_path / "pruned"
    prune(PruneConfig(source=source, target="attention", drop=1, out=out, strategy="last", device="cpu",
                      store=tmp_path / "store", progress=False))
    before = load_pruned(out)
    (out / CODE_FILE).write_text("raise RuntimeError('this code ran')\n")
    after = load_pruned(out, trust_remote_code=True)
    assert type(after) is type(before) and type(after).__module__.startswith("transformers.models.")
    ids = torch.tensor(IDS)
    with torch.no_grad():
        torch.testing.assert_close(after(input_ids=ids).logits, before(input_ids=ids).logits, atol=0, rtol=0)
    assert after.config.model_type == family and not hasattr(after.config, "auto_map")


@pytest.fixture
def loopback(monkeypatch):
    """A loopback Hub, empty, with the client pointed at it."""
    from huggingface_hub import constants

    from ckpt_trace.testing.loopback_hub import LoopbackHub

    with LoopbackHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        yield server


def test_prune_pushes_a_folder_that_loads_from_the_hub(loopback, tmp_path, tokenizer_dir, capsys):
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckpt_trace.cli import main

    source = save_checkpoint(tmp_path / "source", "qwen3", seed=5, tokenizer_dir=tokenizer_dir)
    out = tmp_path / "pruned"
    code = main(["prune", str(source), "--target", "mlp", "--drop", "1", "--strategy", "last", "--out", str(out),
                 "--push-to-hub", "me/qwen3-mlp", "--store", str(tmp_path / "s"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "pushed to me/qwen3-mlp" in capsys.readouterr().out
    repo = loopback.repos["me/qwen3-mlp"]
    pushed = repo.commits[repo.branches["main"]]
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert pushed == {**local, ".gitattributes": pushed[".gitattributes"]}
    assert {"README.md", CODE_FILE, "config.json", MANIFEST} <= set(pushed)
    card = pushed["README.md"].decode()
    assert "mlp [1] dropped" in card and "trust_remote_code=True" in card and "- ckpt-trace" in card

    # Anyone downloads it with the real client and loads it with plain transformers.
    folder = snapshot_download("me/qwen3-mlp", cache_dir=tmp_path / "hf-cache")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = torch.tensor([tokenizer("def f(x): return x").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, load_pruned(out)(input_ids=ids).logits, atol=1e-5,
                                   rtol=0)

    # Another model pushed to the same repo (a block drop, a plain model): the repo holds it alone, no code left over.
    again = tmp_path / "again"
    assert main(["prune", str(source), "--target", "block", "--drop", "1", "--strategy", "last", "--out",
                 str(again), "--push-to-hub", "me/qwen3-mlp", "--store", str(tmp_path / "s"), "--device", "cpu"]) == 0
    now = repo.commits[repo.branches["main"]]
    assert now == {p.relative_to(again).as_posix(): p.read_bytes() for p in again.rglob("*") if p.is_file()} | {
        ".gitattributes": pushed[".gitattributes"]}
    assert CODE_FILE not in now and now["README.md"] != pushed["README.md"]


def test_push_refused_or_misnamed(loopback, tmp_path, capsys):
    from ckpt_trace.cli import main

    source = save_checkpoint(tmp_path / "source", "llama", seed=5)
    capsys.readouterr()
    args = ["prune", str(source), "--target", "mlp", "--drop", "1", "--strategy", "last", "--store",
            str(tmp_path / "s"), "--device", "cpu"]
    # A repo id the Hub does not take: one line before any work, nothing made.
    code = main([*args, "--out", str(tmp_path / "a"), "--push-to-hub", "me/bad name"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--push-to-hub 'me/bad name' is no Hub repo id" in err[0], err
    assert not (tmp_path / "a").exists() and not loopback.requests("POST")
    # The Hub refuses: one line, the folder kept whole.
    loopback.errors["/api/repos/create"] = 1
    code = main([*args, "--out", str(tmp_path / "b"), "--push-to-hub", "me/refused"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot push" in err[0] and "the folder is kept" in err[0], err
    assert load_pruned(tmp_path / "b").config.ckpt_trace_pruned == {"attention": [], "mlp": [1]}
    assert "me/refused" not in loopback.repos


def test_model_card_names_the_drop_its_scores_and_the_evaluations(tmp_path, tokenizer_dir, capsys):
    import polars as pl
    from conftest import random_ids, write_jsonl
    from huggingface_hub import ModelCard

    from ckpt_trace.cli import main
    from ckpt_trace.store import Store

    source = save_checkpoint(tmp_path / "source", "gpt_neox", seed=6, tokenizer_dir=tokenizer_dir)
    out, store = tmp_path / "pruned", tmp_path / "store"
    common = ["--store", str(store), "--device", "cpu", "--samples", "4", "--seq-len", "16"]
    assert main(["prune", str(source), "--target", "attention", "--drop", "1", "--out", str(out), *common]) == 0
    record = json.loads((out / MANIFEST).read_text())
    (dropped,) = record["order"]
    layer = int(dropped.split()[1])
    card = (out / "README.md").read_text()
    importance = next(r["value"] for r in record["scores"]
                      if (r["module"], r["layer"], r["metric"]) == ("attention", layer, "importance"))
    assert f"| attention | {layer} | {importance:.4g} |" in card and f"attention [{layer}] dropped" in card
    assert "None stored yet." in card and ModelCard.load(out / "README.md").data.tags == ["ckpt-trace", "pruned",
                                                                                          "custom_code"]

    # Evaluated (the pruned model first): the card holds both models' perplexity, as stored.
    data = write_jsonl(tmp_path / "held-out.jsonl", [{"input_ids": ids} for ids in random_ids(3, 30, seed=2)])
    assert main(["eval", str(out), str(source), "--perplexity", "--perplexity-data", str(data), *common]) == 0
    evals = Store(store).evals().filter(pl.col("task") == "perplexity")
    ours = evals.filter(pl.col("pruning").is_not_null())["value"][0]
    original = evals.filter(pl.col("pruning").is_null())["value"][0]
    card = (out / "README.md").read_text()
    n = evals["n"][0]
    assert f"| perplexity | perplexity | {evals['data'][0]} |  | {n} | float32 | cpu | {original:.4f} | {ours:.4f} |" in card

    # A card the user rewrote without ckpt-trace's tag is theirs: evaluating again leaves it as it is.
    (out / "README.md").write_text("---\ntags:\n- mine\n---\n# My model\n")
    assert main(["eval", str(out), "--perplexity", "--perplexity-data", str(data), *common]) == 0
    assert (out / "README.md").read_text() == "---\ntags:\n- mine\n---\n# My model\n"
    capsys.readouterr()


def test_card_of_an_iterative_prune_quotes_each_pick_by_its_round(tmp_path, tokenizer_dir, capsys):
    source = save_checkpoint(tmp_path / "source", "llama", seed=8, tokenizer_dir=tokenizer_dir)
    out = tmp_path / "pruned"
    from ckpt_trace.cli import main

    assert main(["prune", str(source), "--target", "joint", "--drop", "2", "--strategy", "iterative", "--out",
                 str(out), "--store", str(tmp_path / "s"), "--device", "cpu", "--samples", "4", "--seq-len", "16"]) == 0
    record = json.loads((out / MANIFEST).read_text())
    card = (out / "README.md").read_text()
    for i, pick in enumerate(record["order"]):
        module, layer = pick.split()
        value = next(r["value"] for r in record["scores"] if (r["module"], r["layer"], r["metric"], r["round"]) == (
            module, int(layer), "importance", i))
        assert f"| {module} | {layer} | {value:.4g} |" in card
    assert card.count("\n| attention |") + card.count("\n| mlp |") == 2
    capsys.readouterr()


def test_a_card_that_is_a_link_is_never_written_through(tmp_path, tokenizer_dir):
    """A pruned model downloaded from the Hub sits in a cache snapshot whose README.md links to a shared blob:
    evaluating it stores its results and leaves the blob as it is."""
    from ckpt_trace.pruning.card import write_card

    source = save_checkpoint(tmp_path / "source", "llama", seed=8)
    out = tmp_path / "pruned"
    prune(PruneConfig(source=source, target="mlp", drop=1, out=out, strategy="last", device="cpu",
                      store=tmp_path / "store", progress=False))
    blob = tmp_path / "blob"
    blob.write_bytes((out / "README.md").read_bytes())
    (out / "README.md").unlink()
    (out / "README.md").symlink_to(blob)
    record = json.loads((out / MANIFEST).read_text())
    assert write_card(out, record) is None
    assert blob.read_bytes() == (out / "README.md").read_bytes() and (out / "README.md").is_symlink()
