"""Every number is stored under the identity of the bytes loaded: files swapped, rewritten, cut short, restored or
reconfigured around a load are never scored, evaluated, pruned or measured under another checkpoint's fingerprint.

Each test is a user's report, replayed with the files changed at the moment they were in the report.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import random_ids, save_checkpoint, write_jsonl
from test_faults import one_line

from ckpt_trace.calibration.sets import CalibrationSpec
from ckpt_trace.cli import main
from ckpt_trace.errors import SourceError
from ckpt_trace.evaluation.run import EvalConfig, evaluate
from ckpt_trace.fetch.identity import local_weights
from ckpt_trace.pruning.curves import CurveConfig, run_curves
from ckpt_trace.pruning.run import MANIFEST, PruneConfig, manifest, prune
from ckpt_trace.scan.options import ScanConfig
from ckpt_trace.store import Store

SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]
METRICS = ["--metrics", "importance,update_ratio"]
OPTIONS = {"calibration": CalibrationSpec(samples=4, seq_len=16), "batch_size": 2, "device": "cpu", "progress": False}
CELL = ["layer", "module", "metric"]
WEIGHTS = "model.safetensors"

# By module path: the packages' names are taken by the functions they export (ckpt_trace.scan is `scan`).
loading = importlib.import_module("ckpt_trace.model.loading")
scan_run = importlib.import_module("ckpt_trace.scan.run")
scoring_options = importlib.import_module("ckpt_trace.scoring.options")


@pytest.fixture
def suite(tmp_path, tokenizer_dir) -> Path:
    root = tmp_path / "suite"
    for seed, name in enumerate(["step1", "step2", "step3"], start=1):
        save_checkpoint(root / name, "gpt_neox", seed=seed, tokenizer_dir=tokenizer_dir)
    return root


@pytest.fixture
def others(tmp_path, tokenizer_dir) -> list[Path]:
    """Checkpoints of the same family outside the suite: bytes that are no revision of it."""
    return [save_checkpoint(tmp_path / f"other{seed}", "gpt_neox", seed=seed, tokenizer_dir=tokenizer_dir)
            for seed in (7, 8)]


def scan_cli(suite: Path, store: Path, *extra: str) -> int:
    return main(["scan", str(suite), "--store", str(store), *METRICS, *SMALL, *extra])


def scan_config(suite: Path, store: Path, **changes) -> ScanConfig:
    return ScanConfig(source=str(suite), store=store, metrics=("importance", "update_ratio"), **OPTIONS, **changes)


def values(store: Path, revision: str, weights: str | None = None) -> pl.DataFrame:
    """The stored (layer, module, metric, value) of one revision, of the given weights where given."""
    scores = Store(store).scores().filter(pl.col("revision") == revision)
    if weights is not None:
        scores = scores.filter(pl.col("weights") == weights)
    return scores.select(*CELL, "value").sort(CELL)


def stored_weights(store: Path, revision: str) -> set[str]:
    """The fingerprints the store holds whole scores of, for one revision of the suite."""
    return {key.weights for key in Store(store).stored_keys("suite", revision)}


def score_files(store: Path, revision: str) -> list[str]:
    return sorted(p.name for p in (store / "scores" / "suite" / revision).glob("*.parquet"))


def status_of(summary: pl.DataFrame, revision: str) -> str:
    return summary.filter(pl.col("revision") == revision)["status"].item()


def swapping(real, target: Path, sources: list[Path], every_call: bool = False, keep_mtime: bool = False):
    """A loader that, when asked for `target`, first copies the weights of the next of `sources` over target's in
    place (once, or on every call; with `keep_mtime`, its modification time set back, as `touch -r` does), then
    loads as `real` does."""
    calls = []

    def load_model(path, *args, **kwargs):
        if Path(path).resolve() == target.resolve() and (every_call or not calls):
            before = os.stat(target / WEIGHTS)
            shutil.copyfile(sources[len(calls) % len(sources)] / WEIGHTS, target / WEIGHTS)
            if keep_mtime:
                os.utime(target / WEIGHTS, ns=(before.st_atime_ns, before.st_mtime_ns))
            calls.append(path)
        return real(path, *args, **kwargs)

    return load_model


# -- 1. weights swapped during a scan --------------------------------------------------------------------------------

@pytest.mark.parametrize("ahead, keep_mtime", [("--no-load-ahead", False), ("--load-ahead", False),
                                               ("--no-load-ahead", True)])
def test_weights_swapped_during_the_scan_are_stored_as_loaded(suite, tmp_path, monkeypatch, ahead, keep_mtime):
    """With `keep_mtime`, only the change time tells the new bytes from the old: size, modification time and inode
    are those of the file that was identified."""
    step1, step3 = suite / "step1", suite / "step3"
    original = local_weights(step3)[0]
    store = tmp_path / "store"
    with monkeypatch.context() as patch:
        patch.setattr(scan_run, "load_model", swapping(scan_run.load_model, step3, [step1], keep_mtime=keep_mtime))
        assert scan_cli(suite, store, ahead) == 0

    now = local_weights(step3)[0]
    assert now != original and (step3 / WEIGHTS).read_bytes() == (step1 / WEIGHTS).read_bytes()
    assert stored_weights(store, "step3") == {now}
    assert not [name for name in score_files(store, "step3") if original in name]
    assert set(Store(store).scores().filter(pl.col("revision") == "step3")["weights"]) == {now}
    # A fresh scan of step3 as it is now (alone: in the whole suite it is a duplicate of step1, and not scored).
    fresh = tmp_path / "fresh"
    assert scan_cli(suite, fresh, "--revisions", "step3") == 0
    assert values(store, "step3").equals(values(fresh, "step3"))
    assert values(store, "step3").height == 3 * 3 * 2


# -- 2. weights that change on every load -----------------------------------------------------------------------------

def test_weights_that_change_on_every_load_fail_the_revision(suite, others, tmp_path, monkeypatch, capsys):
    step3 = suite / "step3"
    monkeypatch.setattr(scan_run, "load_model", swapping(scan_run.load_model, step3, others, every_call=True))
    store = tmp_path / "store"
    assert scan_cli(suite, store) == 2  # a failed revision stops the scan: CkptTraceError, exit 2
    assert one_line(capsys) == (f"ckpt-trace: error: the weights of step3 ({step3}) changed while they were scored; "
                                "run again once they are written")
    runs = Store(store).runs()
    failed = runs.filter(pl.col("revision") == "step3")
    assert failed["status"].to_list() == ["failed"] and "changed while they were scored" in failed["error"][0]
    assert set(runs.filter(pl.col("status") == "scored")["revision"]) == {"step1", "step2"}
    assert not (store / "scores" / "suite" / "step3").exists()
    assert set(Store(store).scores()["revision"]) == {"step1", "step2"}
    assert "step3" not in Store(store).revisions()["revision"].to_list()

    # --keep-going records it again and says so in its exit status.
    assert scan_cli(suite, store, "--keep-going") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"1 revision failed and is recorded in {store}/runs: step3" in err
    assert Store(store).runs().filter(pl.col("revision") == "step3")["status"].to_list() == ["failed", "failed"]
    assert not (store / "scores" / "suite" / "step3").exists()


# -- 3. swapped, scanned, restored with cp -p -------------------------------------------------------------------------

def test_weights_restored_with_their_old_times_are_stored_and_pruned_from_the_store(suite, others, tmp_path):
    step3, store = suite / "step3", tmp_path / "store"
    original = local_weights(step3)[0]
    first = scan_run.scan(scan_config(suite, store))
    assert first["status"].to_list() == ["scored"] * 3
    backup = tmp_path / "backup.safetensors"
    shutil.copy2(step3 / WEIGHTS, backup)
    before = os.stat(step3 / WEIGHTS)

    shutil.copyfile(others[0] / WEIGHTS, step3 / WEIGHTS)
    swapped = scan_run.scan(scan_config(suite, store))
    assert [status_of(swapped, r) for r in ("step1", "step2", "step3")] == ["stored", "stored", "scored"]
    assert swapped.filter(pl.col("revision") == "step3")["weights"].item() == local_weights(step3)[0] != original

    shutil.copy2(backup, step3 / WEIGHTS)  # cp -p: the old size and modification time, in the same inode
    after = os.stat(step3 / WEIGHTS)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    restored = scan_run.scan(scan_config(suite, store))
    assert restored["status"].to_list() == ["stored"] * 3
    assert restored.filter(pl.col("revision") == "step3")["weights"].item() == original
    assert local_weights(step3)[0] == original

    out = tmp_path / "pruned"
    prune(PruneConfig(source=str(suite), revision="step3", target="attention", drop=2, out=out, strategy="similarity",
                      store=store, **OPTIONS))
    record = manifest(out)
    assert record["scores_from"] == "store" and record["weights"] == original
    stored = Store(store).scores().filter((pl.col("revision") == "step3") & (pl.col("weights") == original))
    ranking = (stored.filter((pl.col("metric") == "importance") & (pl.col("module") == "attention"))
               .sort("value", "layer")["layer"].to_list())
    assert record["order"] == [f"attention {layer}" for layer in ranking[:2]]
    assert pl.DataFrame(record["scores"]).select(*CELL, "value").sort(CELL).equals(
        stored.select(*CELL, "value").sort(CELL))


# -- 4. a file rewritten in place while it is loaded: no bus error ----------------------------------------------------

DRIVER = """\
import importlib
import sys
from pathlib import Path

from ckpt_trace.cli import main

run = importlib.import_module("ckpt_trace.scan.run")

target, mode = Path(sys.argv[1]).resolve(), sys.argv[2]
real, calls = run.load_model, []


def load_model(path, *args, **kwargs):
    model = real(path, *args, **kwargs)
    if Path(path).resolve() == target and not calls:
        calls.append(path)
        file = next(p for p in target.iterdir() if p.suffix in (".safetensors", ".bin"))
        data = file.read_bytes()
        open(file, "wb").close()  # cut to nothing in place, as a save over it starts
        if mode == "rewrite":
            sum(float(p.sum()) for p in model.parameters())  # the model read while the file is empty
            file.write_bytes(data)
    return model


run.load_model = load_model
sys.exit(main(sys.argv[3:]))
"""

REWRITES = {"rewrite": ("safetensors", "rewrite"), "truncate": ("safetensors", "truncate"),
            "truncate-bin": ("bin", "truncate")}
"""Scans run in a process of their own, where a bus error (SIGBUS) kills that process and not pytest: step2's
weight file (of this format) cut to nothing right after it is loaded, and written back or not."""


def as_bin(directory: Path) -> None:
    """Turn a checkpoint's safetensors weights into a pytorch_model.bin, which torch memory-maps as it loads it."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(directory / WEIGHTS), directory / "pytorch_model.bin")
    (directory / WEIGHTS).unlink()


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory, tokenizer_dir) -> dict[str, tuple[Path, Path, subprocess.CompletedProcess]]:
    """(suite, store, finished process) of each of REWRITES, all run at once."""
    driver = tmp_path_factory.mktemp("driver") / "driver.py"
    driver.write_text(DRIVER)
    started = {}
    for name, (fmt, mode) in REWRITES.items():
        root = tmp_path_factory.mktemp(name)
        suite, store = root / "suite", root / "store"
        for seed, revision in enumerate(["step1", "step2", "step3"], start=1):
            save_checkpoint(suite / revision, "gpt_neox", seed=seed, tokenizer_dir=tokenizer_dir)
        if fmt == "bin":
            as_bin(suite / "step2")
        command = [sys.executable, str(driver), str(suite / "step2"), mode,
                   "scan", str(suite), "--store", str(store), *METRICS, *SMALL]
        # Its own home (no test has set a private one yet); one thread each, as they run side by side.
        env = {**os.environ, "CKPT_TRACE_HOME": str(root / "home"), "OMP_NUM_THREADS": "1"}
        started[name] = (suite, store, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE, text=True))
    finished = {}
    for name, (suite, store, process) in started.items():
        out, err = process.communicate(timeout=300)
        finished[name] = (suite, store, subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return finished


def test_weights_rewritten_in_place_right_after_the_load(rewritten, tmp_path):
    suite, store, done = rewritten["rewrite"]
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])  # not -7 (SIGBUS), not 135
    assert "Traceback" not in done.stderr
    assert "the files of step2 changed while it was scored; scoring it again" in done.stderr
    fresh = tmp_path / "fresh"
    assert scan_cli(suite, fresh) == 0
    assert values(store, "step2").equals(values(fresh, "step2"))
    assert stored_weights(store, "step2") == {local_weights(suite / "step2")[0]}
    assert set(Store(store).scores()["revision"]) == {"step1", "step2", "step3"}


@pytest.mark.parametrize("variant", ["truncate", "truncate-bin"])
def test_weights_cut_short_right_after_the_load(rewritten, variant):
    suite, store, done = rewritten[variant]
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])  # a failed revision, not a signal
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ckpt-trace: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"ckpt-trace: error: cannot load the weights in '{suite / 'step2'}'"), done.stderr
    failed = Store(store).runs().filter(pl.col("status") == "failed")
    assert failed["revision"].to_list() == ["step2"]
    assert set(Store(store).scores()["revision"]) == {"step1"}


# -- 5. the config changed, the weights did not -----------------------------------------------------------------------

def test_a_config_change_alone_is_another_checkpoint(suite, tmp_path):
    step3, store = suite / "step3", tmp_path / "store"
    assert scan_run.scan(scan_config(suite, store))["status"].to_list() == ["scored"] * 3
    old = local_weights(step3)[0]
    old_values = values(store, "step3", old)
    weights_before = (step3 / WEIGHTS).read_bytes()

    config = json.loads((step3 / "config.json").read_text())
    assert config["use_parallel_residual"] is True and config["hidden_act"] != "relu"
    (step3 / "config.json").write_text(json.dumps(config | {"use_parallel_residual": False, "hidden_act": "relu"}))
    new = local_weights(step3)[0]
    assert new != old and (step3 / WEIGHTS).read_bytes() == weights_before

    again = scan_run.scan(scan_config(suite, store))
    assert [status_of(again, r) for r in ("step1", "step2", "step3")] == ["stored", "stored", "scored"]
    assert again.filter(pl.col("revision") == "step3")["why"].item() == "the stored scores are of other weights"
    assert stored_weights(store, "step3") == {old, new}
    fresh = tmp_path / "fresh"
    assert scan_run.scan(scan_config(suite, fresh))["status"].to_list() == ["scored"] * 3
    assert values(store, "step3", new).equals(values(fresh, "step3"))
    assert values(store, "step3", old).equals(old_values)  # the old rows stay, under the old fingerprint
    assert not values(store, "step3", new).equals(old_values)  # the config changes what the weights compute


# -- 6. eval ----------------------------------------------------------------------------------------------------------

def eval_config(model: Path, tmp_path: Path, store: Path) -> EvalConfig:
    data = write_jsonl(tmp_path / "heldout.jsonl", [{"input_ids": ids} for ids in random_ids(3, 16, seed=9)])
    return EvalConfig(models=[model], perplexity=True, perplexity_data=str(data), store=store, **OPTIONS)


def test_eval_of_weights_swapped_during_the_load_stores_nothing(suite, others, tmp_path, monkeypatch):
    step3, store = suite / "step3", tmp_path / "store"
    with monkeypatch.context() as patch:
        patch.setattr(loading, "load_model", swapping(loading.load_model, step3, others))
        with pytest.raises(SourceError, match="changed while they were evaluated") as caught:
            evaluate(eval_config(step3, tmp_path, store))
    assert str(caught.value) == (f"the weights in '{step3}' changed while they were evaluated; nothing of them is "
                                 "stored; run again once they are written")
    assert Store(store).evals().height == 0

    evaluate(eval_config(step3, tmp_path, store))
    evals = Store(store).evals()
    assert evals.height == 1 and evals["weights"].to_list() == [local_weights(step3)[0]]
    assert evals["weights"][0] == local_weights(others[0])[0]  # the same bytes, config and all: one fingerprint


# -- 7. prune and curves ----------------------------------------------------------------------------------------------

def test_prune_of_weights_swapped_during_the_load_leaves_no_folder(suite, others, tmp_path, monkeypatch):
    step3, out = suite / "step3", tmp_path / "pruned"
    monkeypatch.setattr(scoring_options, "load_model", swapping(scoring_options.load_model, step3, others))
    with pytest.raises(SourceError, match="changed while they were pruned") as caught:
        prune(PruneConfig(source=str(suite), revision="step3", target="attention", drop=1, out=out,
                          store=tmp_path / "store", **OPTIONS))
    assert str(caught.value) == (f"the weights of step3 ({step3}) changed while they were pruned; "
                                 "run again once they are written")
    assert not out.exists() and not (out / MANIFEST).exists()
    assert not [p for p in tmp_path.iterdir() if "pruned" in p.name]  # no staging folder left either


def test_curves_of_weights_swapped_during_the_load_store_nothing(suite, others, tmp_path, monkeypatch):
    step3, store = suite / "step3", tmp_path / "store"
    data = write_jsonl(tmp_path / "heldout.jsonl", [{"input_ids": ids} for ids in random_ids(3, 16, seed=9)])
    monkeypatch.setattr(scoring_options, "load_model", swapping(scoring_options.load_model, step3, others))
    with pytest.raises(SourceError, match="changed while they were measured"):
        run_curves(CurveConfig(source=str(suite), revision="step3", targets=("mlp",), seeds=1,
                               perplexity_data=str(data), store=store, **OPTIONS))
    assert Store(store).curves().height == 0


# -- the Hub cache is still memory-mapped -----------------------------------------------------------------------------

def test_only_a_hub_cache_snapshot_is_memory_mapped(suite, tmp_path, monkeypatch):
    """A snapshot that huggingface_hub itself downloaded (links to blobs it writes whole and never rewrites) is
    memory-mapped; a plain folder, a copy of a snapshot, or a link elsewhere is read into memory. The model is the
    same either way."""
    import transformers
    from huggingface_hub import constants, snapshot_download

    from ckpt_trace.testing import LoopbackHub

    with LoopbackHub() as server:
        server.add_model_dir("org/tiny", "step1", suite / "step1")
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        snapshot = Path(snapshot_download("org/tiny", revision="step1", cache_dir=tmp_path / "cache"))
    assert (snapshot / WEIGHTS).is_symlink() and (snapshot / WEIGHTS).resolve().parent.name == "blobs"
    assert loading._mapped_safely(snapshot) is True
    assert loading._mapped_safely(suite / "step1") is False
    copied = shutil.copytree(snapshot, tmp_path / "copied")  # links followed: plain files, which may be rewritten
    assert loading._mapped_safely(copied) is False
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / WEIGHTS).symlink_to(suite / "step1" / WEIGHTS)  # a link, but not into a cache's blobs
    assert loading._mapped_safely(linked) is False

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("disable_mmap"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    mapped, read = loading.load_model(snapshot), loading.load_model(suite / "step1")
    assert seen == [False, True]
    for (name, a), (_, b) in zip(mapped.state_dict().items(), read.state_dict().items(), strict=True):
        assert a.equal(b), name
