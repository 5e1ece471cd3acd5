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
from conftest import FAMILIES, save_checkpoint
from test_pruning import zeroed

from ckpt_trace.model.loading import load_pruned, read_config
from ckpt_trace.model.portable import CODE_FILE, PREFIX
from ckpt_trace.pruning.run import MANIFEST, PruneConfig, prune

IDS = [[5, 17, 250, 3, 99, 140, 7, 61, 300, 12, 44, 2], [201, 9, 18, 77, 150, 33, 260, 4, 91, 123, 8, 310]]
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
