"""Every stored score is the score of the weights, dtype and calibration set it names, never of others."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time

import polars as pl
import pytest
import torch
from conftest import LAYERS, save_checkpoint

from ckpt_trace.calibration.blocks import load_calibration
from ckpt_trace.calibration.sets import CalibrationSpec
from ckpt_trace.cli import main
from ckpt_trace.fetch.identity import HashCache, local_weights
from ckpt_trace.model.loading import load_model, load_tokenizer
from ckpt_trace.pruning.run import MANIFEST
from ckpt_trace.scan.options import ScanConfig
from ckpt_trace.scan.run import scan
from ckpt_trace.scoring.metrics import score
from ckpt_trace.store import Store

SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]


def reference(path, dtype=torch.float32) -> list[float]:
    """The scores of one model directory, computed directly with the library."""
    calibration = load_calibration(CalibrationSpec("pydoc", samples=4, seq_len=16), load_tokenizer(path))
    frame = score(load_model(path, torch.device("cpu"), dtype), calibration, batch_size=2)
    return frame.sort("layer", "module", "metric")["value"].to_list()


def stored(store, **where) -> pl.DataFrame:
    frame = Store(store).scores()
    for column, value in where.items():
        frame = frame.filter(pl.col(column) == value)
    return frame.sort("layer", "module", "metric")


def scan_summary(path, store, *args) -> dict[str, tuple[str, str]]:
    config = ScanConfig(source=path, store=store, calibration=CalibrationSpec("pydoc", 4, 16), batch_size=2,
                        device="cpu", progress=False, dtype=args[0] if args else "float32")
    return {r["revision"]: (r["status"], r["why"]) for r in scan(config).iter_rows(named=True)}


def test_float32_then_bfloat16_stores_both(tmp_path, tokenizer_dir):
    model = save_checkpoint(tmp_path / "m", "llama", seed=1, tokenizer_dir=tokenizer_dir)
    assert scan_summary(model, tmp_path / "s") == {"main": ("scored", "no scores yet")}
    assert scan_summary(model, tmp_path / "s", "bfloat16") == {"main": ("scored", "the stored scores are of other dtype")}
    assert scan_summary(model, tmp_path / "s", "bfloat16") == {
        "main": ("stored", "same weights and config, dtype, calibration set and scorer")}
    assert stored(tmp_path / "s", dtype="float32")["value"].to_list() == reference(model)
    assert stored(tmp_path / "s", dtype="bfloat16")["value"].to_list() == reference(model, torch.bfloat16)


def test_two_models_in_directories_of_the_same_name(tmp_path, tokenizer_dir):
    a = save_checkpoint(tmp_path / "a" / "ckpt", "llama", seed=1, tokenizer_dir=tokenizer_dir)
    b = save_checkpoint(tmp_path / "b" / "ckpt", "llama", seed=2, tokenizer_dir=tokenizer_dir)
    scan_summary(a, tmp_path / "s")
    assert scan_summary(b, tmp_path / "s") == {"main": ("scored", "the stored scores are of other weights")}
    weights = {path: local_weights(path)[0] for path in (a, b)}
    assert len(set(weights.values())) == 2
    for path in (a, b):
        assert stored(tmp_path / "s", weights=weights[path])["value"].to_list() == reference(path)


def test_new_weights_saved_over_a_scanned_directory_are_scored_again(tmp_path, tokenizer_dir, capsys):
    model = save_checkpoint(tmp_path / "suite" / "step100", "gpt_neox", seed=1, tokenizer_dir=tokenizer_dir)
    assert main(["scan", str(tmp_path / "suite"), "--store", str(tmp_path / "s"), *SMALL]) == 0
    old = local_weights(model)[0]
    save_checkpoint(model, "gpt_neox", seed=2)  # retrained, saved over it
    assert main(["scan", str(tmp_path / "suite"), "--store", str(tmp_path / "s"), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "scored" in out and "the stored scores are of other weights" in out
    new = local_weights(model)[0]
    assert new != old
    assert stored(tmp_path / "s", weights=new)["value"].to_list() == reference(model)
    assert stored(tmp_path / "s", weights=old).height == LAYERS * 6  # the old scores stay, told apart by weights
    # The report and similarity pruning use the scores of the weights at hand.
    assert main(["report", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "fig")]) == 0
    md = (tmp_path / "fig" / "report.md").read_text()
    assert "other scans (other weights) of 1 checkpoint are left out" in md
    assert "scores drawn from the weights on disk: step100" in md
    assert main(["prune", str(model), "--target", "attention", "--drop", "1", "--out", str(tmp_path / "p"),
                 "--store", str(tmp_path / "s"), *SMALL]) == 0
    used = json.loads((tmp_path / "p" / MANIFEST).read_text())
    assert used["scores_from"] == "store"
    mine = stored(tmp_path / "s", weights=new, metric="importance").select("layer", "module", "value").rows()
    assert sorted((s["layer"], s["module"], s["value"]) for s in used["scores"] if s["metric"] == "importance") == sorted(mine)


def test_identical_weights_under_two_names_are_scored_once(tmp_path, tokenizer_dir):
    suite = tmp_path / "suite"
    save_checkpoint(suite / "step100", "gpt_neox", seed=1, tokenizer_dir=tokenizer_dir)
    shutil.copytree(suite / "step100", suite / "step200")  # a copy, not a link: found by content
    summary = scan_summary(suite, tmp_path / "s")
    assert summary == {"step100": ("scored", "no scores yet"), "step200": ("duplicate", "same weights as step100")}
    assert main(["report", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "fig")]) == 0
    copy = re.compile(r"\| step200 +\| step100 +\|")
    assert copy.search((tmp_path / "fig" / "report.md").read_text())
    # step200 re-published with weights of its own: the report draws its scores, and no longer lists it as a copy.
    save_checkpoint(suite / "step200", "gpt_neox", seed=2, tokenizer_dir=tokenizer_dir)
    assert scan_summary(suite, tmp_path / "s")["step200"] == ("scored", "no scores yet")
    assert main(["report", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "fig2")]) == 0
    md = (tmp_path / "fig2" / "report.md").read_text()
    assert not copy.search(md) and "byte-identical" not in md


def test_file_hashes_are_read_once_and_again_only_when_a_file_changes(tmp_path, monkeypatch):
    import ckpt_trace.fetch.identity as identity

    file = tmp_path / "model.safetensors"
    file.write_bytes(b"a" * 1000)
    cache = HashCache(tmp_path / "hashes.json")
    reads = []
    real = identity._sha256
    monkeypatch.setattr(identity, "_sha256", lambda path: reads.append(path) or real(path))
    first = cache.sha256s([file])
    assert cache.sha256s([file]) == first and len(reads) == 1
    file.write_bytes(b"b" * 1000)  # same size, new content and time
    second = cache.sha256s([file])
    assert second != first and len(reads) == 2
    # New content under the old modification time (cp -p, touch -r): its change time tells.
    stat = file.stat()
    time.sleep(0.01)
    file.write_bytes(b"c" * 1000)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file.stat().st_mtime_ns == stat.st_mtime_ns and file.stat().st_size == stat.st_size
    assert cache.sha256s([file]) == {file.resolve(): hashlib.sha256(b"c" * 1000).hexdigest()} and len(reads) == 3
    # Replaced by another file with the same size and times: a new inode.
    other = tmp_path / "other"
    other.write_bytes(b"d" * 1000)
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, file)
    assert cache.sha256s([file]) == {file.resolve(): hashlib.sha256(b"d" * 1000).hexdigest()} and len(reads) == 4
    assert cache.sha256s([file]) and len(reads) == 4  # and then read from the cache again
    # An entry of the earlier form (size, time, sha) is read once more, not trusted.
    cache.path.write_text(json.dumps({str(file.resolve()): [1000, file.stat().st_mtime_ns, "0" * 64]}))
    assert cache.sha256s([file])[file.resolve()] == hashlib.sha256(b"d" * 1000).hexdigest() and len(reads) == 5


def test_hub_and_local_copies_of_the_same_weights_share_a_fingerprint(tmp_path):
    import hashlib

    from ckpt_trace.fetch.hub import choose_files

    data = bytes(range(256)) * 4
    (tmp_path / "model.safetensors").write_bytes(data)
    (tmp_path / "config.json").write_text("{}")
    blob = hashlib.sha1(b"blob 2\0{}").hexdigest()  # what git, and the Hub's tree listing, call this config
    listing = {"model.safetensors": (len(data), hashlib.sha256(data).hexdigest()), "config.json": (2, blob)}
    assert choose_files(listing).fingerprint == local_weights(tmp_path)[0]
    assert local_weights(tmp_path)[1] == len(data)
    # Another config over the same weights is another checkpoint, on the Hub and locally alike.
    other = choose_files({**listing, "config.json": (3, hashlib.sha1(b"blob 3\0{ }").hexdigest())}).fingerprint
    (tmp_path / "config.json").write_text("{ }")
    assert other == local_weights(tmp_path)[0] != choose_files(listing).fingerprint


def test_a_link_to_a_revision_is_that_revision_of_the_suite_it_is_in(tmp_path, tokenizer_dir):
    suite = tmp_path / "my-suite"
    save_checkpoint(suite / "step1000", "gpt_neox", seed=1, tokenizer_dir=tokenizer_dir)
    (suite / "main").symlink_to("step1000", target_is_directory=True)
    assert scan_summary(suite / "main", tmp_path / "s") == {"step1000": ("scored", "no scores yet")}
    assert set(Store(tmp_path / "s").scores()["model"]) == {"my-suite"}
    # The whole suite lists the link once, as the revision it points at: nothing new to score.
    assert scan_summary(suite, tmp_path / "s") == {"step1000": ("stored", "same weights and config, dtype, calibration set and scorer")}


def test_a_gemma_model_is_scored_with_bos(tmp_path, capsys):
    from conftest import write_tokenizer

    write_tokenizer(tmp_path / "tok", bos=True)
    model = save_checkpoint(tmp_path / "gemma", "gemma2", seed=1, tokenizer_dir=tmp_path / "tok")
    assert main(["scan", str(model), "--store", str(tmp_path / "s"), *SMALL]) == 0, capsys.readouterr().err
    tokenizer = load_tokenizer(model)
    calibration = load_calibration(CalibrationSpec("pydoc", samples=4, seq_len=16), tokenizer)
    assert {int(s[0]) for s in calibration.sequences} == {tokenizer.bos_token_id}
    assert set(Store(tmp_path / "s").scores()["calibration"]) == {calibration.id}
    assert stored(tmp_path / "s")["value"].to_list() == reference(model)


def test_asking_for_ablation_loss_scores_again_what_lacks_it(tmp_path, tokenizer_dir, capsys):
    from ckpt_trace.scoring.loss import ablation_losses

    model = save_checkpoint(tmp_path / "m", "gpt_neox", seed=2, tokenizer_dir=tokenizer_dir)
    assert main(["scan", str(model), "--store", str(tmp_path / "s"), *SMALL]) == 0
    assert main(["scan", str(model), "--store", str(tmp_path / "s"), "--metrics", "ablation_loss", *SMALL]) == 0
    assert "the stored scores lack ablation_loss" in capsys.readouterr().out
    frame = Store(tmp_path / "s").scores()
    assert sorted(set(frame["metric"])) == ["ablation_loss", "importance", "update_ratio"] and frame.height == LAYERS * 9
    calibration = load_calibration(CalibrationSpec("pydoc", samples=4, seq_len=16), load_tokenizer(model))
    direct = ablation_losses(load_model(model, torch.device("cpu"), torch.float32), calibration, batch_size=2)
    stored_ablation = frame.filter(pl.col("metric") == "ablation_loss").sort("layer", "module")["value"].to_list()
    assert stored_ablation == direct.sort("layer", "module")["value"].to_list()
    # The cheap scan afterwards finds everything it asks for.
    assert main(["scan", str(model), "--store", str(tmp_path / "s"), *SMALL]) == 0
    assert "same weights and config, dtype, calibration set and scorer" in capsys.readouterr().out
    assert main(["scan", str(model), "--store", str(tmp_path / "s"), "--metrics", "importance,loss", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "unknown metric loss; use some of: importance, update_ratio, angular_distance, span_distance, " in err
    assert err.count("\n") == 1


def test_last_token_and_span_metrics_join_what_is_stored(tmp_path, tokenizer_dir, capsys):
    from ckpt_trace.scoring.metrics import MAX_SPAN

    model = save_checkpoint(tmp_path / "m", "llama", seed=4, tokenizer_dir=tokenizer_dir)
    store = str(tmp_path / "s")
    assert main(["scan", str(model), "--store", store, "--metrics", "ablation_loss", *SMALL]) == 0
    ablation = Store(store).scores().filter(pl.col("metric") == "ablation_loss").sort("layer", "module")["value"]
    assert main(["scan", str(model), "--store", store, "--metrics", "angular_distance,span_distance", "--tokens",
                 "last", *SMALL]) == 0
    assert "the stored scores lack angular_distance_last, span_dist" in capsys.readouterr().out
    frame = Store(store).scores()
    assert sorted(set(frame["metric"])) == ["ablation_loss", "angular_distance_last", "importance", "span_distance_last",
                                            "update_ratio"]
    assert frame["created"].n_unique() == 1  # one scan's file, whose ablation_loss an earlier pass measured
    assert frame.filter(pl.col("metric") == "ablation_loss").sort("layer", "module")["value"].equals(ablation)
    spans = min(MAX_SPAN, LAYERS)
    assert frame.filter(pl.col("metric") == "span_distance_last").height == sum(LAYERS - n + 1 for n in range(1, spans + 1))
    calibration = load_calibration(CalibrationSpec("pydoc", samples=4, seq_len=16), load_tokenizer(model))
    direct = score(load_model(model, torch.device("cpu"), torch.float32), calibration, batch_size=2,
                   metrics=("importance", "update_ratio", "angular_distance_last", "span_distance_last"))
    mine = frame.filter(pl.col("metric") != "ablation_loss").sort("layer", "module", "metric")
    assert mine["value"].to_list() == direct.sort("layer", "module", "metric")["value"].to_list()
    assert set(frame.filter(pl.col("metric").str.ends_with("_last"))["n_tokens"]) == {4}  # one token per sequence
    assert main(["scan", str(model), "--store", store, "--tokens", "first", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'first'" in err and "all" in err and "last" in err


def split_map(n_layers: int, far: str) -> dict[str, str]:
    """Embeddings and the first half of the layers on the CPU, the rest and the head on `far`."""
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
            **{f"model.layers.{i}": "cpu" if i < n_layers // 2 else far for i in range(n_layers)},
            "model.norm": far, "lm_head": far}


@pytest.mark.parametrize("far", ["cpu", pytest.param("cuda:0", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a split between the CPU and a GPU needs a GPU")])])
def test_a_model_placed_by_a_device_map_scores_as_on_one_device(tmp_path, tokenizer_dir, capsys, far):
    from ckpt_trace.scoring.loss import ablation_losses

    model = save_checkpoint(tmp_path / "m", "llama", seed=5, tokenizer_dir=tokenizer_dir)
    metrics = ("importance", "update_ratio", "angular_distance", "span_distance", "span_distance_last")
    calibration = load_calibration(CalibrationSpec("pydoc", samples=4, seq_len=16), load_tokenizer(model))
    whole = load_model(model, torch.device("cpu"), torch.float32)
    split = load_model(model, dtype=torch.float32, device_map=split_map(LAYERS, far))
    assert {p.device.type for p in split.parameters()} == {"cpu", torch.device(far).type}
    one, mapped = (score(m, calibration, batch_size=2, metrics=metrics) for m in (whole, split))
    assert mapped.sort("layer", "module", "metric")["value"].to_list() == pytest.approx(
        one.sort("layer", "module", "metric")["value"].to_list(), abs=1e-6)
    losses = [ablation_losses(m, calibration, batch_size=2).sort("layer", "module")["value"] for m in (whole, split)]
    assert losses[1].to_list() == pytest.approx(losses[0].to_list(), abs=1e-5)
    # The command line: accelerate's placement over what this machine has (a GPU's sums differ in the last bits).
    assert main(["scan", str(model), "--store", str(tmp_path / "s"), "--device-map", "auto", *SMALL]) == 0
    expected = reference(model)
    assert stored(tmp_path / "s")["value"].to_list() == (expected if far == "cpu" else pytest.approx(expected, abs=1e-5))
    capsys.readouterr()
    assert main(["scan", str(model), "--store", str(tmp_path / "s"), "--device-map", "fast", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'fast'" in err and "auto" in err
