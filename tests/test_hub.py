"""Streaming scans from a loopback Hub through the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import LAYERS, make_model, write_tokenizer
from huggingface_hub import constants, snapshot_download

from ckpt_trace.cli import main
from ckpt_trace.errors import SourceError
from ckpt_trace.fetch import cache
from ckpt_trace.fetch import hub as hub_module
from ckpt_trace.fetch.sources import HubSource, revision_table
from ckpt_trace.model.loading import load_model
from ckpt_trace.store import Store
from ckpt_trace.testing import LoopbackHub

REPO = "org/tiny-suite"
SMALL = ["--samples", "2", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]


def model_files(seed: int, formats: tuple[str, ...], tokenizer_dir) -> dict[str, bytes]:
    """A tiny GPT-NeoX checkpoint's files in the given weight formats, plus its tokenizer."""
    model = make_model("gpt_neox", seed)
    files = {"config.json": model.config.to_json_string().encode()}
    if "safetensors" in formats:
        from safetensors.torch import save

        files["model.safetensors"] = save({k: v.contiguous() for k, v in model.state_dict().items()}, {"format": "pt"})
    if "bin" in formats:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        files["pytorch_model.bin"] = buffer.getvalue()
    for file in tokenizer_dir.iterdir():
        files[file.name] = file.read_bytes()
    return files


@pytest.fixture(scope="module")
def suite_files(tmp_path_factory):
    tokenizer_dir = tmp_path_factory.mktemp("tok")
    write_tokenizer(tokenizer_dir)
    return {
        "step0": model_files(0, ("safetensors",), tokenizer_dir),
        "step2": model_files(1, ("bin",), tokenizer_dir),
        "step1000": model_files(2, ("safetensors", "bin"), tokenizer_dir),
        "step2000": model_files(3, ("safetensors",), tokenizer_dir),
    }


@pytest.fixture
def hub(suite_files, monkeypatch, tmp_path):
    """A running loopback Hub with the suite, the client pointed at it, and a private cache and home."""
    with LoopbackHub() as server:
        for branch, files in suite_files.items():
            server.add_revision(REPO, branch, files)
        server.add_revision(REPO, "main", suite_files["step2000"])  # byte-identical to step2000
        server.add_revision(REPO, "custom-branch", suite_files["step0"] | {"config.json": suite_files["step0"]["config.json"] + b" "})
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("CKPT_TRACE_HOME", str(tmp_path / "home"))
        monkeypatch.setattr(hub_module, "BACKOFF_S", 0.01)
        import datasets.config  # datasets keeps the endpoint and the offline flag it read when first imported

        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", server.url)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
        yield server


def weight_gets(server, files: dict[str, bytes]) -> list[str]:
    """The weight files of one revision that were downloaded, by name."""
    names = []
    for name, data in files.items():
        if name.endswith((".safetensors", ".bin")):
            sha = hashlib.sha256(data).hexdigest()
            if server.requests("GET", f"/cdn/{sha}"):
                names.append(name)
    return names


def snapshots(cache) -> list[str]:
    folder = cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_revisions_in_training_order_with_bytes_and_duplicates_before_any_download(hub, suite_files):
    table = revision_table(REPO, cache_dir=None)
    # Names that fit no scheme and share no commit come last, by name; `duplicate_of` says what their weights are.
    assert table["revision"].to_list() == ["step0", "step2", "step1000", "step2000", "custom-branch", "main"]
    assert table["step"].to_list() == [0, 2, 1000, 2000, None, None]
    bytes_of = {r: len(suite_files[r]["model.safetensors" if "model.safetensors" in suite_files[r] else "pytorch_model.bin"])
                for r in suite_files}
    assert table["weight_bytes"].to_list()[:4] == [bytes_of[r] for r in ["step0", "step2", "step1000", "step2000"]]
    # custom-branch holds step0's weights under another config.json: another checkpoint, no duplicate.
    assert table["duplicate_of"].to_list() == [None, None, None, None, None, "step2000"]
    assert table["weights"][4] != table["weights"][0]
    assert table["commit"].str.len_chars().to_list() == [40] * 6
    assert not hub.requests("GET", "/resolve/") and not hub.requests("GET", "/cdn/")


def test_revisions_command_and_selection(hub, capsys):
    assert main(["revisions", REPO, "--select", "step2..step1000,main"]) == 0
    out = capsys.readouterr().out
    assert "step2" in out and "step1000" in out and "main" in out and "step0 " not in out
    assert main(["revisions", REPO, "--select", "step5000..step9000"]) == 2
    err = capsys.readouterr().err
    assert "'step5000..step9000' matches no revision; available: step0, step2, step1000" in err


def test_streamed_scan(hub, suite_files, tmp_path, capsys, monkeypatch):
    cache, store = tmp_path / "cache", tmp_path / "store"
    held = []
    fetch = HubSource.fetch

    weight_shas = {
        hashlib.sha256(data).hexdigest()
        for f in suite_files.values() for name, data in f.items() if name.endswith((".bin", ".safetensors"))
    }

    def watched_fetch(self, checkpoint):
        result = fetch(self, checkpoint)
        blobs = cache / f"models--{REPO.replace('/', '--')}" / "blobs"
        held.append(sum(p.stat().st_size for p in blobs.iterdir() if p.name in weight_shas))
        return result

    monkeypatch.setattr(HubSource, "fetch", watched_fetch)
    code = main(["scan", REPO, "--store", str(store), "--cache-dir", str(cache), "--revisions", "step0..,main",
                 "--load-ahead", *SMALL])
    assert code == 0, capsys.readouterr().err

    # One weight format per revision: safetensors where there is one, else .bin.
    assert weight_gets(hub, suite_files["step0"]) == ["model.safetensors"]
    assert weight_gets(hub, suite_files["step2"]) == ["pytorch_model.bin"]
    assert weight_gets(hub, suite_files["step1000"]) == ["model.safetensors"]
    assert weight_gets(hub, suite_files["step2000"]) == ["model.safetensors"]
    # The duplicate main was never downloaded: its weights came once, for step2000.
    sha = hashlib.sha256(suite_files["step2000"]["model.safetensors"]).hexdigest()
    assert len([r for r in hub.requests("GET", f"/cdn/{sha}") if r.status in (200, 206)]) == 1

    # Everything downloaded was evicted, and the cache never held more than two revisions' weights.
    assert snapshots(cache) == []
    largest = max(len(data) for f in suite_files.values() for name, data in f.items() if name.endswith((".bin", ".safetensors")))
    assert 0 < max(held) <= 2 * largest

    frame = Store(store).scores()
    assert sorted(set(frame["revision"])) == ["step0", "step1000", "step2", "step2000"]
    assert frame.height == 4 * LAYERS * 6
    revisions = Store(store).revisions()
    assert revisions.filter(pl.col("revision") == "main")["duplicate_of"].to_list() == ["step2000"]
    assert set(frame["commit"].str.len_chars()) == {40}

    # The scores equal a scan of the same checkpoints from local directories, each loaded after the one before
    # was scored (the scan above loaded each while the one before was scored: --load-ahead).
    local = tmp_path / "local" / "tiny-suite"
    for name in ("step0", "step2", "step1000", "step2000"):
        (local / name).mkdir(parents=True)
        for file, data in suite_files[name].items():
            (local / name / file).write_bytes(data)
    assert main(["scan", str(local), "--store", str(tmp_path / "local-store"), "--no-load-ahead", *SMALL]) == 0
    key = ["revision", "layer", "module", "metric"]
    here = Store(tmp_path / "local-store").scores().sort(key)
    assert here["value"].to_list() == frame.sort(key)["value"].to_list()


def test_never_evicts_what_it_did_not_download(hub, tmp_path, capsys):
    cache = tmp_path / "cache"
    mine = snapshot_download(REPO, revision="step0", cache_dir=cache)  # the user's own download
    code = main(["scan", REPO, "--store", str(tmp_path / "s"), "--cache-dir", str(cache), "--revisions", "step0,step2", *SMALL])
    assert code == 0, capsys.readouterr().err
    assert snapshots(cache) == [os.path.basename(mine)]
    assert (cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / os.path.basename(mine) / "model.safetensors").is_file()


def test_a_cache_snapshot_is_named_by_its_repo_and_branch(hub, tmp_path, capsys):
    cache = tmp_path / "cache"
    step0 = Path(snapshot_download(REPO, revision="step0", cache_dir=cache))
    step2000 = Path(snapshot_download(REPO, revision="step2000", cache_dir=cache))
    # On the Hub, main is often the final training checkpoint's commit under a second name.
    refs = cache / f"models--{REPO.replace('/', '--')}" / "refs"
    (refs / "main").write_text(step2000.name)
    store = tmp_path / "s"
    (tmp_path / "my-link").symlink_to(step0, target_is_directory=True)  # a link to a snapshot is that snapshot
    for path in (tmp_path / "my-link", step2000):
        assert main(["scan", str(path), "--store", str(store), *SMALL]) == 0, capsys.readouterr().err
    frame = Store(store).scores()
    assert set(frame["model"]) == {REPO}
    assert sorted(set(frame["revision"])) == ["step0", "step2000"]  # the training checkpoint's name, not main
    assert set(frame["commit"]) == {step0.name, step2000.name} and set(frame["step"]) == {0, 2000}


def test_an_olmo2_style_run_with_ingredients(hub, suite_files, tmp_path, capsys):
    """Stage-2 ingredients are side lines from the last stage-1 checkpoint; their steps and tokens count from zero."""
    repo = "allenai/OLMo-2-tiny"
    hub.add_revision(repo, "stage1-step100-tokens1B", suite_files["step0"])
    hub.add_revision(repo, "stage1-step200-tokens2B", suite_files["step2"])
    hub.add_revision(repo, "stage2-ingredient1-step10-tokens1B", suite_files["step1000"])
    hub.add_revision(repo, "stage2-ingredient2-step10-tokens1B", suite_files["step2000"])
    soup = dict(suite_files["step2000"], **{"config.json": suite_files["step2000"]["config.json"] + b" "})
    hub.add_revision(repo, "main", soup)  # the average of the ingredients: a commit of its own
    table = revision_table(repo)
    assert table.select("revision", "tokens", "branch").rows() == [
        ("stage1-step100-tokens1B", 10**9, None), ("stage1-step200-tokens2B", 2 * 10**9, None),
        ("stage2-ingredient1-step10-tokens1B", 3 * 10**9, "ingredient1"),
        ("stage2-ingredient2-step10-tokens1B", 3 * 10**9, "ingredient2"), ("main", None, None)]
    line = revision_table(repo, "last:2", branch="ingredient2")["revision"].to_list()
    assert line == ["stage1-step200-tokens2B", "stage2-ingredient2-step10-tokens1B"]
    code = main(["scan", repo, "--branch", "ingredient2", "--revisions", "last:2", "--store", str(tmp_path / "s"),
                 "--cache-dir", str(tmp_path / "c"), *SMALL])
    assert code == 0, capsys.readouterr().err
    stored = Store(tmp_path / "s").scores().select("revision", "tokens", "branch").unique().sort("tokens").rows()
    assert stored == [("stage1-step200-tokens2B", 2 * 10**9, None), ("stage2-ingredient2-step10-tokens1B", 3 * 10**9, "ingredient2")]
    assert main(["revisions", repo, "--branch", "ingredient9"]) == 2
    assert "no branch 'ingredient9'; branches: ingredient1, ingredient2" in capsys.readouterr().err
    # The training dynamics follow one line: both ingredients at once is one line that says how to choose.
    both = "stage2-ingredient1-step10-tokens1B,stage2-ingredient2-step10-tokens1B"
    assert main(["scan", repo, "--revisions", both, "--metrics", "cka_final", "--store", str(tmp_path / "d"),
                 "--cache-dir", str(tmp_path / "c"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ingredient1, ingredient2" in err and "--branch" in err
    assert not (tmp_path / "d" / "scores").exists()
    # The whole run scanned, the report draws the trunk and each ingredient from the checkpoint it forks from.
    assert main(["scan", repo, "--store", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c"), *SMALL]) == 0
    assert main(["report", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    sections = dict(s.split("\n", 1) for s in md.split("\n## ")[1:])
    assert [s for s in sections if s.startswith(repo)] == [repo, f"{repo} (ingredient1)", f"{repo} (ingredient2)"]
    for side in ("ingredient1", "ingredient2"):
        drawn = [row.split(" | ")[0].strip("| ") for row in sections[f"{repo} ({side})"].splitlines()
                 if row.startswith("| stage")]
        assert drawn[:2] == ["stage1-step200-tokens2B", f"stage2-{side}-step10-tokens1B"], drawn
        assert set(drawn) == set(drawn[:2])


def test_tags_are_revisions_and_a_readme_only_main_is_skipped(hub, suite_files, tmp_path, capsys):
    """stanford-crfm and BLOOM publish checkpoints as git tags; SmolLM2/3 checkpoint repos' main holds only a README."""
    repo = "stanford-crfm/tiny-run"
    for step, files in ((100, suite_files["step0"]), (20, suite_files["step2"]), (3, suite_files["step1000"])):
        hub.add_revision(repo, f"checkpoint-{step}", files, tag=True)
    hub.add_revision(repo, "main", {"README.md": b"# checkpoints live in the tags\n"})
    table = revision_table(repo)
    assert table["revision"].to_list() == ["checkpoint-3", "checkpoint-20", "checkpoint-100", "main"]
    assert table["weights"].to_list()[3] is None
    assert main(["revisions", repo]) == 0
    assert ("4 revisions, 1 with no weight files (a scan skips those without a config.json, and fails those with "
            "one)") in capsys.readouterr().out
    code = main(["scan", repo, "--store", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c"), *SMALL])
    assert code == 0, capsys.readouterr().err
    assert sorted(set(Store(tmp_path / "s").scores()["revision"])) == ["checkpoint-100", "checkpoint-20", "checkpoint-3"]
    assert "no weight files in this revision" in capsys.readouterr().out
    # last:1 is the last training checkpoint, not the README.
    assert revision_table(repo, "last:1")["revision"].to_list() == ["checkpoint-100"]


def test_a_hub_revision_with_a_config_and_no_weights_fails(hub, suite_files, tmp_path, capsys):
    """A Hub revision whose tree holds a config.json and no weights is a broken checkpoint: exit 2, recorded in
    runs/; with --keep-going the others are stored and the exit status is 1."""
    hub.add_revision(REPO, "step3000", {"config.json": suite_files["step2000"]["config.json"]})
    store, cache = tmp_path / "s", tmp_path / "c"
    args = ["scan", REPO, "--store", str(store), "--cache-dir", str(cache), "--revisions", "step2000,step3000", *SMALL]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"revision 'step3000' of '{REPO}' has a config.json but no weight files" in err and "Traceback" not in err
    assert Store(store).runs().filter(pl.col("status") == "failed")["revision"].to_list() == ["step3000"]
    assert main([*args, "--keep-going"]) == 1
    assert sorted(set(Store(store).scores()["revision"])) == ["step2000"] and snapshots(cache) == []


def test_a_file_in_the_cache_before_the_scan_survives_it(hub, tmp_path, capsys):
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "cache"
    mine = Path(hf_hub_download(REPO, "config.json", revision="step0", cache_dir=cache))  # the user's, from before
    code = main(["scan", REPO, "--store", str(tmp_path / "s"), "--cache-dir", str(cache), "--revisions", "step0", *SMALL])
    assert code == 0, capsys.readouterr().err
    assert mine.is_file() and json.loads(mine.read_text())["model_type"]
    snapshot = mine.parent
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json"]  # the weights and tokenizer it fetched are gone
    blobs = cache / f"models--{REPO.replace('/', '--')}" / "blobs"
    assert [p.resolve() for p in blobs.iterdir()] == [mine.resolve()]


def test_a_snapshot_another_scan_still_uses_is_evicted_by_the_last_to_release_it(hub, tmp_path):
    import socket
    import subprocess
    import sys as system

    repo = hub_module.HubRepo(REPO, tmp_path / "cache", tmp_path / "ledger.json")
    revision = next(r for r in repo.revisions() if r.name == "step0")
    snapshot = repo.download(revision, repo.files(revision))
    other = f"{socket.gethostname()}:{os.getppid()}"  # a process that runs: another scan of the same cache
    ended = subprocess.run([system.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = f"{socket.gethostname()}:{ended.stdout.strip()}"  # a scan that was killed without releasing
    with repo.ledger.locked() as state:
        state.holders[str(snapshot)] |= {other, gone}
    assert repo.evict(revision) == 0 and (snapshot / "model.safetensors").is_file()  # the other scan still reads it
    with repo.ledger.locked() as state:
        assert state.holders[str(snapshot)] == {other}  # the ended one is forgotten
        state.holders[str(snapshot)].discard(other)  # the other scan is done
        state.hold(snapshot)  # this one takes it again
    assert repo.evict(revision) > 0 and not snapshot.exists()
    assert repo.ledger.under(snapshot) == []


def _add_entries(path: str, worker: int, count: int) -> None:
    ledger = cache.DownloadLedger(Path(path))
    for i in range(count):
        with ledger.locked() as state:
            state.files.add(f"/cache/snapshots/{worker}/file-{i}")
            state.hold(Path(f"/cache/snapshots/{worker}"))


@pytest.mark.filterwarnings("ignore:This process .* fork:DeprecationWarning")  # Python 3.12+; the children use no thread
def test_twenty_processes_writing_the_ledger_lose_no_entry(tmp_path):
    import multiprocessing

    path = tmp_path / "ledger.json"
    context = multiprocessing.get_context("fork")  # fast: the children only read and write the ledger
    workers = [context.Process(target=_add_entries, args=(str(path), w, 30)) for w in range(20)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * 20
    ledger = json.loads(path.read_text())
    assert len(ledger["files"]) == len(set(ledger["files"])) == 600 and len(ledger["holders"]) == 20


def test_cut_off_download_is_resumed(hub, tmp_path, capsys):
    hub.cut_once.add("/cdn/")
    code = main(["scan", REPO, "--store", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c"), "--revisions", "step0", *SMALL])
    assert code == 0, capsys.readouterr().err
    assert Store(tmp_path / "s").scores().height == LAYERS * 6
    assert not hub.cut_once  # the fault was served


def test_transient_server_errors_are_retried(hub, suite_files, tmp_path, capsys):
    sha = hashlib.sha256(suite_files["step0"]["model.safetensors"]).hexdigest()
    hub.errors["/tree/"] = 1  # retried by ckpt-trace (and by huggingface_hub 2)
    hub.errors["/refs"] = 1  # retried by ckpt-trace
    hub.errors[f"/cdn/{sha}"] = 2  # retried by ckpt-trace
    code = main(["scan", REPO, "--store", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c"), "--revisions", "step0", *SMALL])
    assert code == 0, capsys.readouterr().err
    assert set(hub.errors.values()) == {0}
    assert len(hub.requests(contains="/refs")) == 2


def test_network_faults_are_retried(hub, suite_files, tmp_path, capsys):
    """Connections closed with no answer: errors of huggingface_hub's HTTP library, not HTTP statuses."""
    from huggingface_hub import HfApi

    hub.hang_ups["/refs"] = 1
    with pytest.raises(Exception) as caught:
        HfApi().list_repo_refs(REPO)
    assert not hasattr(caught.value, "response") and hub_module._transient(caught.value)
    library = sys.modules[type(caught.value).__module__.partition(".")[0]]  # httpx or httpx2
    status = library.HTTPStatusError("404", request=library.Request("GET", "http://x"), response=library.Response(404))
    assert not hub_module._transient(status)  # an answer, not a network fault

    sha = hashlib.sha256(suite_files["step0"]["model.safetensors"]).hexdigest()
    hub.hang_ups["/refs"] = 1
    hub.hang_ups[f"/cdn/{sha}"] = 2
    code = main(["scan", REPO, "--store", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c"), "--revisions", "step0", *SMALL])
    assert code == 0, capsys.readouterr().err
    assert set(hub.hang_ups.values()) == {0}
    assert Store(tmp_path / "s").scores().height == LAYERS * 6


def test_an_unreachable_hub_is_one_line(hub, tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    assert main(["revisions", REPO, "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("retry") == hub_module.RETRIES - 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ckpt-trace: error: listing {REPO} failed: [Errno ") and last.endswith("Connection refused")


def test_a_revision_that_keeps_failing(hub, suite_files, tmp_path, capsys):
    sha = hashlib.sha256(suite_files["step2"]["pytorch_model.bin"]).hexdigest()
    hub.errors[f"/cdn/{sha}"] = 10_000
    args = ["scan", REPO, "--store", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c"), "--revisions", "step0,step2,step1000", *SMALL]
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ckpt-trace: error: download of org/tiny-suite@step2 failed") and "500" in last
    assert "Traceback" not in err
    assert err.count("retry") == hub_module.RETRIES - 1
    runs = Store(tmp_path / "s").runs()
    assert runs.filter(pl.col("status") == "failed")["revision"].to_list() == ["step2"]

    capsys.readouterr()
    assert main([*args, "--keep-going"]) == 1  # it went on, and says that something failed
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ckpt-trace: 1 revision failed and is recorded in {tmp_path / 's'}/runs: step2")
    assert sorted(set(Store(tmp_path / "s").scores()["revision"])) == ["step0", "step1000"]
    assert Store(tmp_path / "s").runs().filter(pl.col("status") == "failed").height == 2
    assert snapshots(tmp_path / "c") == []


def test_offline_mode_lists_and_scans_from_the_cache(hub, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    snapshot_download(REPO, revision="step0", cache_dir=cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.log.clear()
    table = revision_table(REPO, cache_dir=cache)
    assert table["revision"].to_list() == ["step0"]
    code = main(["scan", REPO, "--store", str(tmp_path / "s"), "--cache-dir", str(cache), *SMALL])
    assert code == 0, capsys.readouterr().err
    assert hub.log == []
    assert Store(tmp_path / "s").scores().height == LAYERS * 6
    assert main(["scan", "org/elsewhere", "--store", str(tmp_path / "s"), "--cache-dir", str(cache)]) == 2
    assert "not in the cache" in capsys.readouterr().err


def test_unknown_repo_and_revision(hub, tmp_path, capsys):
    assert main(["scan", "org/nothing-here", "--store", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'org/nothing-here' not found" in err[0]
    assert main(["scan", REPO, "--revisions", "step7", "--store", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "no revision 'step7'; available: step0, step2, step1000, step2000, custom-branch, main" in capsys.readouterr().err


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


def test_bin_weights_load_only_through_the_weights_only_unpickler(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "evil"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(make_model("gpt_neox").config.to_json_string())
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Exploit()}, protocol=2))
    with pytest.raises(SourceError, match="cannot load the weights in .*evil.*Weights only load failed"):
        load_model(model_dir, torch.device("cpu"), torch.float32)
    assert not (tmp_path / "exploited").exists()


def test_trust_remote_code_stays_off(tmp_path):
    model_dir = tmp_path / "remote"
    model_dir.mkdir()
    config = make_model("llama").config.to_dict() | {"auto_map": {"AutoModelForCausalLM": "modeling_x.Evil"}}
    import json

    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_x.py").write_text("raise SystemExit('remote code ran')\n")
    make_model("llama").save_pretrained(tmp_path / "weights")
    shutil.copy(tmp_path / "weights" / "model.safetensors", model_dir)
    model = load_model(model_dir, torch.device("cpu"), torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_calibration_from_a_hub_dataset(hub, tmp_path, monkeypatch):
    """hf:REPO[:CONFIG][:SPLIT] reads a dataset's text column through huggingface_hub, config and split chosen."""
    from transformers import AutoTokenizer

    from ckpt_trace.calibration.blocks import load_calibration, token_stream
    from ckpt_trace.calibration.sets import CalibrationSpec
    from ckpt_trace.errors import CalibrationError

    def parquet(texts):
        buffer = io.BytesIO()
        pl.DataFrame({"text": texts, "id": list(range(len(texts)))}).write_parquet(buffer)
        return buffer.getvalue()

    train = ["the quick brown fox " * 40, "jumps over the lazy dog " * 40]
    card = ("---\nconfigs:\n- config_name: plain\n  data_dir: plain\n- config_name: other\n  data_dir: other\n"
            "---\n# texts\n")
    hub.add_revision("org/texts", "main", {
        "README.md": card.encode(),
        "plain/train-00000-of-00001.parquet": parquet(train),
        "plain/test-00000-of-00001.parquet": parquet(["held out " * 50]),
        "other/train-00000-of-00001.parquet": parquet(["another config " * 50]),
    }, repo_type="dataset")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    tokenizer_dir = tmp_path / "tok"
    from conftest import write_tokenizer

    write_tokenizer(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    calibration = load_calibration(CalibrationSpec("hf:org/texts:plain:train", samples=3, seq_len=8), tokenizer)
    stream = token_stream(train, tokenizer)
    blocks = [stream[i * 8 : (i + 1) * 8] for i in range(len(stream) // 8)]
    assert all(seq.tolist() in blocks for seq in calibration.sequences) and len(calibration.sequences) == 3
    requested = {r.path for r in hub.requests("GET") if "/resolve/" in r.path or "/cdn/" in r.path}
    assert any("plain/train" in p for p in requested)
    assert not any("test-" in p or "other/" in p for p in requested)

    with pytest.raises(CalibrationError, match="dataset 'org/texts' config 'plain' has no split 'validation'; its "
                                               "splits: train, test"):
        load_calibration(CalibrationSpec("hf:org/texts:plain:validation", samples=3, seq_len=8), tokenizer)
    with pytest.raises(Exception, match="cannot fetch dataset 'org/missing'"):
        load_calibration(CalibrationSpec("hf:org/missing", samples=3, seq_len=8), tokenizer)


def test_a_hub_dataset_is_drawn_from_its_first_blocks_and_only_their_files_are_downloaded(hub, tmp_path, monkeypatch):
    """A split of four parquet files (several row groups each): the draw takes HUB_POOL blocks per
    sample from the start of the split, downloads only the files that hold them, and equals the same draw from
    a reference token stream of those files' texts; the held-out blocks come from the same pool."""
    import random

    from transformers import AutoTokenizer

    from ckpt_trace.calibration.blocks import heldout_set, load_calibration, token_stream
    from ckpt_trace.calibration.hub import HUB_POOL, HubTexts
    from ckpt_trace.calibration.sets import CalibrationSpec
    from ckpt_trace.errors import CalibrationError

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [[" ".join(random.Random(f * 1000 + d).choices(words, k=60)) for d in range(40)] for f in range(4)]

    def parquet(rows):
        buffer = io.BytesIO()
        pl.DataFrame({"text": rows}).write_parquet(buffer, row_group_size=7)
        return buffer.getvalue()

    hub.add_revision("org/big", "main", {f"data/train-0000{f}-of-00004.parquet": parquet(texts[f]) for f in range(4)},
                     repo_type="dataset")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    write_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    per_file = len(token_stream(texts[0], tokenizer))

    def downloaded():
        return sorted({r.path.rsplit("/", 1)[-1] for r in hub.requests("GET") if "/resolve/" in r.path})

    for samples, files in ((per_file // (8 * HUB_POOL) - 1, 1), (per_file // (8 * HUB_POOL) + 2, 2)):
        spec = CalibrationSpec("hf:org/big", samples=samples, seq_len=8, seed=3)
        calibration = load_calibration(spec, tokenizer)
        assert downloaded() == [f"train-0000{f}-of-00004.parquet" for f in range(files)]  # ever, the cache kept
        stream = token_stream([t for f in range(files) for t in texts[f]], tokenizer)
        pool = HUB_POOL * samples
        assert len(stream) >= pool * 8
        taken = sorted(random.Random(3).sample(range(pool), samples))
        assert [s.tolist() for s in calibration.sequences] == [stream[i * 8:(i + 1) * 8] for i in taken]
        held = heldout_set(spec, tokenizer, samples=5)
        rest = [i for i in range(pool) if i not in set(taken)]
        chosen = sorted(random.Random(4).sample(rest, 5))
        assert [s.tolist() for s in held.sequences] == [stream[i * 8:(i + 1) * 8] for i in chosen]
    # A draw that needs the whole split reads every file.
    whole = load_calibration(CalibrationSpec("hf:org/big", samples=10_000, seq_len=8), tokenizer)
    assert len(whole.sequences) == len(token_stream([t for f in texts for t in f], tokenizer)) // 8
    # A file without texts is named, with what it holds instead.
    buffer = io.BytesIO()
    pl.DataFrame({"content": ["x"]}).write_parquet(buffer)
    hub.add_revision("org/parquet", "main", {"train.parquet": buffer.getvalue()}, repo_type="dataset")
    hub.add_revision("org/jsonl", "main", {"train.jsonl": b'{"text": "a"}\n{"content": "x"}\n'}, repo_type="dataset")
    with pytest.raises(CalibrationError, match=r"dataset file train.parquet has no 'text' column \(columns: \['content'\]\)"):
        load_calibration(CalibrationSpec("hf:org/parquet", samples=2, seq_len=8), tokenizer)
    with pytest.raises(CalibrationError, match='dataset file train.jsonl:2 needs a "text" field'):
        list(HubTexts("hf:org/jsonl"))


def test_a_hub_dataset_offline_and_in_other_layouts(hub, tmp_path, monkeypatch):
    """Offline, a dataset is read at the commit and with the files resolved online, from the cache, and a file the
    cache lacks is named; files that name no split are the train split; bad files are one clear error; configs are
    the ones a card declares, and splits are named as datasets names them."""
    from transformers import AutoTokenizer

    from ckpt_trace.calibration.blocks import load_calibration
    from ckpt_trace.calibration.hub import HubTexts
    from ckpt_trace.calibration.sets import CalibrationSpec
    from ckpt_trace.errors import CalibrationError

    def parquet(frame):
        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        return buffer.getvalue()

    shards = [[f"shard {f} text {d} " * 30 for d in range(8)] for f in range(2)]
    hub.add_revision("org/web", "main", {
        f"data/CC-MAIN-2024-10/00{f}_00000.parquet": parquet(pl.DataFrame({"text": shards[f]})) for f in range(2)
    }, repo_type="dataset")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    write_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert list(HubTexts("hf:org/web")) == shards[0] + shards[1]
    online = load_calibration(CalibrationSpec("hf:org/web", samples=2, seq_len=8), tokenizer)
    with pytest.raises(CalibrationError, match=r"^dataset 'org/web' has no split 'test'; its splits: train$"):
        HubTexts("hf:org/web::test")
    with pytest.raises(CalibrationError, match=r"^cannot resolve dataset 'org/web' config 'data': BuilderConfig 'data' "
                       r"not found. Available: \['default'\]"):
        HubTexts("hf:org/web:data")  # a folder is no config unless a card declares it
    hub.add_revision("org/hand", "main", {"train.jsonl": b'{"text": "fetched by hand"}\n'}, repo_type="dataset")
    snapshot_download("org/hand", repo_type="dataset", cache_dir=tmp_path / "cache")  # no listing remembered

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.log.clear()
    assert load_calibration(CalibrationSpec("hf:org/web", samples=2, seq_len=8), tokenizer).id == online.id
    assert not hub.log  # nothing asked of the Hub
    assert list(HubTexts("hf:org/hand")) == ["fetched by hand"]  # the cache's copy of main
    with pytest.raises(CalibrationError, match="dataset 'org/never' is not in the cache, and HF_HUB_OFFLINE is set"):
        HubTexts("hf:org/never")
    files = tmp_path / "cache" / "datasets--org--web" / "snapshots"
    next(files.rglob("001_00000.parquet")).unlink()
    with pytest.raises(CalibrationError, match=r"data/CC-MAIN-2024-10/001_00000.parquet of dataset 'org/web' \(commit "
                       r"[0-9a-f]{12}\) is not in the cache, and HF_HUB_OFFLINE is set"):
        list(HubTexts("hf:org/web"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    card = "---\nconfigs:\n" + "".join(f"- config_name: {c}\n  data_dir: {c}\n" for c in ("numbers", "damaged", "latin1"))
    hub.add_revision("org/bad", "main", {
        "README.md": (card + "---\n").encode(),
        "numbers/train.parquet": parquet(pl.DataFrame({"text": [1, 2]})),
        "damaged/train.parquet": parquet(pl.DataFrame({"text": ["a"] * 100}))[:-40],
        "latin1/train.jsonl": '{"text": "caf\u00e9"}\n'.encode("latin-1"),
    }, repo_type="dataset")
    with pytest.raises(CalibrationError, match="dataset file numbers/train.parquet has a 'text' column of int64, not of strings"):
        list(HubTexts("hf:org/bad:numbers"))
    with pytest.raises(CalibrationError, match="cannot read damaged/train.parquet of dataset 'org/bad': "):
        list(HubTexts("hf:org/bad:damaged"))
    with pytest.raises(CalibrationError, match="cannot read latin1/train.jsonl of dataset 'org/bad': .*utf-8"):
        list(HubTexts("hf:org/bad:latin1"))
    # C4's layout: gzipped JSON lines, one folder per config.
    import gzip

    lines = "".join(json.dumps({"text": f"web page {d} " * 20, "url": f"u{d}"}) + "\n" for d in range(6)).encode()
    c4 = {"en": {"train": "en/c4-train.*.json.gz", "validation": "en/c4-validation.*.json.gz"},
          "en.noblocklist": {"validation": "en.noblocklist/c4-validation.*.json.gz"},
          "cut": {"validation": "cut/c4-validation.*.json.gz"}}
    card = "---\nconfigs:\n" + "".join(
        f"- config_name: {name}\n  data_files:\n" + "".join(f"  - split: {s}\n    path: {g}\n" for s, g in splits.items())
        for name, splits in c4.items()) + "---\n"
    hub.add_revision("org/c4", "main", {
        "README.md": card.encode(),
        "en/c4-validation.00000-of-00001.json.gz": gzip.compress(lines),
        "en/c4-train.00000-of-00001.json.gz": gzip.compress(b"{}"),
        "en.noblocklist/c4-validation.00000-of-00001.json.gz": gzip.compress(b"{}"),
        "cut/c4-validation.00000-of-00001.json.gz": gzip.compress(lines)[:-20],
    }, repo_type="dataset")
    assert list(HubTexts("hf:org/c4:en:validation")) == [f"web page {d} " * 20 for d in range(6)]
    with pytest.raises(CalibrationError, match="cannot read cut/c4-validation.00000-of-00001.json.gz of dataset 'org/c4'"):
        list(HubTexts("hf:org/c4:cut:validation"))
    # The Pile's layout: zstd-compressed JSON lines, the train split in a folder of shards.
    import pyarrow as pa

    def zst(data: bytes) -> bytes:
        return pa.compress(data, codec="zstd", asbytes=True)  # a standard zstd frame, as the zstd tool writes

    hub.add_revision("org/pile", "main", {
        "train/00.jsonl.zst": zst(b'{"text": "shard zero", "meta": {}}\n'),
        "train/01.jsonl.zst": zst(b'{"text": "shard one"}\n') + zst(b'{"text": "a second frame"}\n'),
        "val.jsonl.zst": zst(b'{"text": "held"}\n'),
    }, repo_type="dataset")
    hub.add_revision("org/pile-cut", "main", {"cut/train.jsonl.zst": zst(lines)[:-20]}, repo_type="dataset")
    assert list(HubTexts("hf:org/pile")) == ["shard zero", "shard one", "a second frame"]
    with pytest.raises(CalibrationError, match="^dataset 'org/pile' has no split 'validation'; its splits: train$"):
        HubTexts("hf:org/pile::validation")  # a folder named for a split wins: datasets reads no val.jsonl.zst then
    with pytest.raises(CalibrationError, match="^cannot read cut/train.jsonl.zst of dataset 'org/pile-cut': "):
        list(HubTexts("hf:org/pile-cut"))
    # A split is a word of the file's path; a split in several configs asks for one.
    hub.add_revision("org/tricky", "main", {
        "invalid-0.jsonl": b'{"text": "not valid"}\n', "valid-0.jsonl": b'{"text": "valid"}\n',
        "pretrain_mix/train.jsonl": b'{"text": "mix"}\n',
    }, repo_type="dataset")
    assert list(HubTexts("hf:org/tricky::validation")) == ["valid"]
    assert list(HubTexts("hf:org/tricky")) == ["mix"]
    with pytest.raises(CalibrationError, match=r"^dataset 'org/c4' declares several configs and no default \(en, "
                       r"en.noblocklist, cut\); name one, as hf:org/c4:en:validation$"):
        HubTexts("hf:org/c4::validation")  # several declared configs and no default: name one
    # Files that name their split otherwise than train are never the train split.
    for repo, files, splits in (
            ("org/named", {"training.jsonl": b'{"text": "train"}\n', "testing.jsonl": b'{"text": "test"}\n'}, None),
            ("org/no-train", {"data/val.parquet": parquet(pl.DataFrame({"text": ["v"]})),
                              "data/part-0.parquet": parquet(pl.DataFrame({"text": ["p"]}))}, "validation"),
            ("org/eval-only", {"eval.jsonl": b'{"text": "e"}\n'}, "test")):
        hub.add_revision(repo, "main", files, repo_type="dataset")
        if splits is None:
            assert list(HubTexts(f"hf:{repo}")) == ["train"]
        else:
            with pytest.raises(CalibrationError, match=f"^dataset '{repo}' has no split 'train'; its splits: {splits}$"):
                HubTexts(f"hf:{repo}")


def test_a_hub_dataset_whose_readme_declares_its_configs(hub, tmp_path, monkeypatch):
    """A README's `configs:` say which files make a config's split (FineWeb's `sample-10BT` lives in sample/10BT/),
    the default config is taken where none is named, `.json` files they name are read (JSON lines or one array),
    offline reads the same files, and what the README does not declare is one clear error."""
    from transformers import AutoTokenizer

    from ckpt_trace.calibration.blocks import load_calibration
    from ckpt_trace.calibration.hub import HubTexts
    from ckpt_trace.calibration.sets import CalibrationSpec
    from ckpt_trace.errors import CalibrationError

    def parquet(texts):
        buffer = io.BytesIO()
        pl.DataFrame({"text": texts}).write_parquet(buffer)
        return buffer.getvalue()

    readme = b"""---
license: odc-by
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
- config_name: arrays
  data_files:
  - split: train
    path:
    - arrays/a.json
    - arrays/lines.json
  - split: test
    path: arrays/*.csv
- config_name: nested
  data_files: "deep/**/*.jsonl"
---
# A web corpus
"""
    files = {
        "README.md": readme,
        "data/CC-MAIN-2024-10/000_00000.parquet": parquet(["crawl one"]),
        "data/CC-MAIN-2024-18/000_00000.parquet": parquet(["crawl two"]),
        "data/CC-MAIN-2024-18/dataset_info.json": b'{"not": "texts"}',  # a card file: never rows
        "sample/10BT/000_00000.parquet": parquet(["sample a"]),
        "sample/10BT/001_00000.parquet": parquet(["sample b"]),
        "sample/100BT/000_00000.parquet": parquet(["not this sample"]),
        "arrays/a.json": json.dumps([{"text": "first"}, {"text": None}, {"text": "second"}], indent=2).encode(),
        "arrays/lines.json": b'{"text": "third"}\n{"text": "fourth"}\n',
        "arrays/held.csv": b"text\nx\n",
        "deep/x/y/part.jsonl": b'{"text": "deep"}\n',
        "dataset_info.json": b'{"not": "texts"}',
    }
    hub.add_revision("org/fw", "main", files, repo_type="dataset")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert HubTexts("hf:org/fw:sample-10BT").files == ["sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet"]
    assert list(HubTexts("hf:org/fw:sample-10BT")) == ["sample a", "sample b"]
    assert list(HubTexts("hf:org/fw")) == ["crawl one", "crawl two"]  # the default config, its train split
    assert list(HubTexts("hf:org/fw::train")) == ["crawl one", "crawl two"]
    assert list(HubTexts("hf:org/fw:arrays")) == ["first", "second", "third", "fourth"]
    assert list(HubTexts("hf:org/fw:nested")) == ["deep"]  # ** crosses folders

    write_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    online = load_calibration(CalibrationSpec("hf:org/fw:sample-10BT", samples=1, seq_len=4), tokenizer)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.log.clear()
    assert load_calibration(CalibrationSpec("hf:org/fw:sample-10BT", samples=1, seq_len=4), tokenizer).id == online.id
    assert not hub.log  # the README and the files came from the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    with pytest.raises(CalibrationError, match=r"^cannot resolve dataset 'org/fw' config 'en': BuilderConfig 'en' not "
                       r"found. Available: \['default', 'sample-10BT', 'arrays', 'nested'\]$"):
        HubTexts("hf:org/fw:en")
    with pytest.raises(CalibrationError, match="^dataset 'org/fw' config 'sample-10BT' has no split 'validation'; "
                       "its splits: train$"):
        HubTexts("hf:org/fw:sample-10BT:validation")
    with pytest.raises(CalibrationError, match=r"^split 'test' of dataset 'org/fw' config 'arrays' has no file that "
                       r"calibration reads \(.parquet, .jsonl, .jsonl.gz, .json, .json.gz, .jsonl.zst\): "
                       r"arrays/held.csv$"):
        HubTexts("hf:org/fw:arrays:test")
    hub.add_revision("org/two", "main", {"README.md": b"---\nconfigs:\n- config_name: a\n  data_files: a/*\n"
                                         b"- config_name: b\n  data_files: b/*\n---\n", "a/t.jsonl": b'{"text": "a"}\n'},
                     repo_type="dataset")
    with pytest.raises(CalibrationError, match=r"^dataset 'org/two' declares several configs and no default \(a, b\); "
                       r"name one, as hf:org/two:a$"):
        HubTexts("hf:org/two")
    assert list(HubTexts("hf:org/two:a")) == ["a"]
    hub.add_revision("org/bad-card", "main", {"README.md": b"---\nconfigs: [unclosed\n---\n"}, repo_type="dataset")
    with pytest.raises(CalibrationError, match="^cannot resolve dataset 'org/bad-card': while parsing a flow sequence"):
        HubTexts("hf:org/bad-card")
    hub.add_revision("org/bad-files", "main", {"README.md": b"---\nconfigs:\n- config_name: x\n  data_files:\n"
                                               b"  - path: x/*\n---\n"}, repo_type="dataset")
    with pytest.raises(CalibrationError, match=r"^cannot resolve dataset 'org/bad-files': Expected data_files in YAML to "
                       r"be either a string or a list of strings or a list of dicts with two keys: 'split' and 'path', "
                       r"but got \[\{'path': 'x/\*'\}\]"):
        HubTexts("hf:org/bad-files")
    hub.add_revision("org/bad-array", "main", {
        "README.md": b"---\nconfigs:\n- config_name: x\n  data_files: x.json\n---\n", "x.json": b'[{"body": "no text"}]',
    }, repo_type="dataset")
    with pytest.raises(CalibrationError, match='^dataset file x.json: record 0 needs a "text" field$'):
        list(HubTexts("hf:org/bad-array"))
    with pytest.raises(CalibrationError, match=r"^dataset 'org/two' declares several configs and no default \(a, b\); "
                       r"name one, as hf:org/two:a:validation$"):
        HubTexts("hf:org/two::validation")  # the suggestion keeps the split
    # A README without configs leaves the files to be found by name, as before.
    hub.add_revision("org/plain", "main", {"README.md": b"---\nlicense: mit\n---\n", "train.jsonl": b'{"text": "p"}\n'},
                     repo_type="dataset")
    assert list(HubTexts("hf:org/plain")) == ["p"]


def test_what_a_dataset_card_declares_is_read_as_datasets_reads_it(hub, tmp_path, monkeypatch):
    """The configs, splits and files of a dataset are those the `datasets` library resolves from its card and its
    file names (ckpt-trace asks it, and reads the files it names): the default config where none is named, splits
    inferred under a config's data_dir, hidden folders left out, names read as written; a card that `datasets`
    refuses is one line with its reason. Offline, the files resolved online are read from the cache."""
    from ckpt_trace.calibration.hub import HubTexts
    from ckpt_trace.errors import CalibrationError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    lines = lambda *texts: "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()  # noqa: E731
    readme = b"""---
configs:
- config_name: sample
  data_files:
  - split: train
    path: corpus/en/*.jsonl
  - split: year
    path: corpus/en/2020.json
- config_name: folder
  data_dir: corpus/de
- config_name: everything
  data_files: "**/*.jsonl"
  default: true
- config_name: "no"
  data_files: "no/*.jsonl"
---
"""
    files = {
        "README.md": readme,
        "corpus/en/part.jsonl": lines("en one"),
        "corpus/en/2020.json": b"\xef\xbb\xbf" + b" " * 5000 + json.dumps([{"text": "en 2020"}]).encode(),  # BOM
        "corpus/en/notes.json": b'{"text": "not named"}\n',
        "corpus/de/train-0.jsonl": lines("de train"),
        "corpus/de/train1.jsonl": lines("de train 1"),
        "corpus/de/dev.jsonl": lines("de dev"),
        "corpus/de/test-0.jsonl": lines("de test"),
        "corpus/de/.cache/train.jsonl": lines("hidden"),
        "y2024/x.jsonl": b"\xef\xbb\xbf" + lines("year"),
        "no/x.jsonl": lines("a config YAML would read as false"),
        "__init__.jsonl": lines("a file that starts with __"),
        ".hidden/h.jsonl": lines("hidden"),
    }
    hub.add_revision("org/card", "main", files, repo_type="dataset")
    assert list(HubTexts("hf:org/card:sample")) == ["en one"]
    assert list(HubTexts("hf:org/card:sample:year")) == ["en 2020"]  # one JSON array, after a BOM
    assert HubTexts("hf:org/card:folder").files == ["corpus/de/train-0.jsonl", "corpus/de/train1.jsonl"]
    assert list(HubTexts("hf:org/card:folder:validation")) == ["de dev"]  # dev is validation
    assert list(HubTexts("hf:org/card:folder:test")) == ["de test"]
    assert list(HubTexts("hf:org/card:no")) == ["a config YAML would read as false"]
    everything = ["__init__.jsonl", "corpus/de/dev.jsonl", "corpus/de/test-0.jsonl", "corpus/de/train-0.jsonl",
                  "corpus/de/train1.jsonl", "corpus/en/part.jsonl", "no/x.jsonl", "y2024/x.jsonl"]  # no hidden folder
    assert HubTexts("hf:org/card:everything").files == everything == HubTexts("hf:org/card").files  # the default
    assert list(HubTexts("hf:org/card"))[-1] == "year"  # a BOM'd line
    for spec, message in [
        ("hf:org/card:extra", r"cannot resolve dataset 'org/card' config 'extra': BuilderConfig 'extra' not found. "
                              r"Available: \['sample', 'folder', 'everything', 'no'\]"),
        ("hf:org/card:folder:dev", r"dataset 'org/card' config 'folder' has no split 'dev'; its splits: train, "
                                   r"validation, test"),
        ("hf:org/card::test", r"dataset 'org/card' has no split 'test'; its splits: train"),
    ]:
        with pytest.raises(CalibrationError, match=f"^{message}$"):
            HubTexts(spec)

    def card(repo: str, yaml: bytes, more: dict) -> None:
        hub.add_revision(repo, "main", {"README.md": b"---\n" + yaml + b"---\n", **more}, repo_type="dataset")

    card("org/sharded", b"configs:\n- config_name: default\n  sep: ';'\n", {
        "data/train-00000-of-00002.jsonl": lines("s0"), "data/train-00001-of-00002.jsonl": lines("s1"),
        "data/holdout-00000-of-00001.jsonl": lines("held out"), "other/test.jsonl": lines("not a shard")})
    assert list(HubTexts("hf:org/sharded")) == ["s0", "s1"]
    assert list(HubTexts("hf:org/sharded::holdout")) == ["held out"]  # sharded names win over split words
    card("org/one-split", b"configs:\n- config_name: only\n  data_dir: texts\n", {"texts/a.jsonl": lines("all train")})
    assert list(HubTexts("hf:org/one-split")) == ["all train"]  # no split word anywhere: all train; the only config
    refused = {  # cards that datasets refuses: one line each, with its reason
        "marked": (b"configs:\n- config_name: a\n  data_files: a/*\n  default: true\n- config_name: default\n"
                   b"  data_files: d/*\n", "Dataset has several default configs: 'a' and 'default'."),
        "unnamed": (b"configs:\n- config_name: x\n  data_files: x/*\n- data_files: y/*\n",
                    "Each config must include `config_name` field with a string name of a config, but got "
                    "{'data_files': 'y/*'}."),
        "split-twice": (b"configs:\n- config_name: s\n  data_files:\n  - {split: train, path: a/*}\n"
                        b"  - {split: train, path: b/*}\n", "Some splits are duplicated in data_files: ['train', 'train']"),
        "bad-date": (b"date: 2024-02-30\n", "day is out of range for month"),
        "numeric": (b"configs:\n- config_name: 2024\n  data_files: a/*.jsonl\n", "argument of type 'int' is not iterable"),
    }
    for name, (yaml, reason) in refused.items():
        card(f"org/{name}", yaml, {"a/t.jsonl": lines("a")})
        with pytest.raises(CalibrationError) as caught:
            HubTexts(f"hf:org/{name}")
        assert str(caught.value) == f"cannot resolve dataset 'org/{name}': {reason}"

    # Offline, the files resolved online are read from the cache, its README no longer needed.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "other-cache"))
    card("org/later", b"license: mit\n", {"train.jsonl": lines("l")})
    assert list(HubTexts("hf:org/later")) == ["l"]
    for readme_copy in (tmp_path / "other-cache").glob("datasets--org--later/snapshots/*/README.md"):
        readme_copy.unlink()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.log.clear()
    assert list(HubTexts("hf:org/later")) == ["l"] and not hub.log


def shared_store_link(cache: Path, repo_id: str, name: str, revision: str) -> tuple[Path, str, int]:
    """Move a cached file's blob into the cache-wide Xet store, as huggingface_hub 2.x does for a Xet download:
    the repo's blobs/<etag> becomes a link into blobs/<2 hex>/<xet hash>, listed in that file's .refs manifest.
    Where the store holds the content already (another repo's copy), the blob is linked to it instead. The Xet hash
    of the content stands in for the Hub's (a sha256 here: any 64 hex digits name a store entry)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import _shared_blobs

    entry = Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache, local_files_only=True))
    blob = entry.parent.parent.parent / "blobs" / os.readlink(entry).rsplit("/", 1)[-1]
    data = blob.read_bytes()
    xet_hash = hashlib.sha256(data).hexdigest()
    if not _shared_blobs.try_link_from_shared_store(blob_path=str(blob), xet_hash=xet_hash, cache_dir=cache,
                                                    expected_size=len(data)):
        assert _shared_blobs.publish_blob_to_shared_store(blob_path=str(blob), xet_hash=xet_hash, cache_dir=cache,
                                                          expected_size=len(data))
    store = _shared_blobs.shared_blob_path(cache, xet_hash)
    assert blob.is_symlink() and blob.resolve() == store.resolve() and store.read_bytes() == data
    return store, xet_hash, len(data)


def test_eviction_leaves_a_xet_file_that_another_repo_shares_in_the_cache(hub, suite_files, tmp_path, monkeypatch,
                                                                          capsys):
    """A Xet-backed cache keeps one copy of a file for every repo that has it: evicting a scanned revision whose
    weights another cached repo shares deletes this repo's links only, and the other repo stays whole and loads."""
    other = "someone/same-weights"
    hub.add_revision(other, "main", suite_files["step0"])
    cache = (tmp_path / "cache").resolve()
    theirs = Path(snapshot_download(other, cache_dir=cache))  # the user's own, from before
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    store, _, size = shared_store_link(cache, other, "model.safetensors", "main")

    real = hub_module.HubRepo.download
    linked = []

    def download_as_xet(self, revision, files):  # what a Xet download of content the store holds leaves
        path = real(self, revision, files)
        if "model.safetensors" in files.files:
            linked.append(shared_store_link(cache, self.repo_id, "model.safetensors", revision.commit)[0])
        return path

    monkeypatch.setattr(hub_module.HubRepo, "download", download_as_xet)
    code = main(["scan", REPO, "--store", str(tmp_path / "s"), "--cache-dir", str(cache), "--revisions", "step0",
                 *SMALL])
    assert code == 0, capsys.readouterr().err
    assert linked == [store] and snapshots(cache) == []  # the scan's revision went through the store, and is gone
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before and store.stat().st_size == size
    assert load_model(theirs).config.model_type == "gpt_neox"

    # Evicted alone, the same revision frees its own blobs, and the shared file only once no repo links to it.
    repo = hub_module.HubRepo(REPO, cache, tmp_path / "ledger.json")
    revision = next(r for r in repo.revisions() if r.name == "step0")
    files = repo.files(revision)
    own = sum(len(suite_files["step0"][name]) for name in files.files if name != "model.safetensors")
    for keep_theirs in (True, False):
        repo.download(revision, files)
        shared_store_link(cache, REPO, "model.safetensors", revision.commit)
        if not keep_theirs:
            from huggingface_hub import scan_cache_dir

            scan_cache_dir(cache).delete_revisions(theirs.name).execute()  # the user deletes their repo's copy
        assert repo.evict(revision) == own + (0 if keep_theirs else size)
        assert store.exists() is keep_theirs


def test_dynamics_from_the_hub_keep_the_reference_and_the_previous_revision_until_measured(hub, suite_files, tmp_path,
                                                                                          capsys, monkeypatch):
    cache, store = tmp_path / "cache", tmp_path / "store"
    weight_shas = {hashlib.sha256(data).hexdigest(): len(data)
                   for f in suite_files.values() for name, data in f.items() if name.endswith((".bin", ".safetensors"))}
    held, fetch = [], HubSource.fetch

    def watched_fetch(self, checkpoint):
        result = fetch(self, checkpoint)
        blobs = cache / f"models--{REPO.replace('/', '--')}" / "blobs"
        held.append(sum(weight_shas.get(p.name, 0) for p in blobs.iterdir()))
        return result

    monkeypatch.setattr(HubSource, "fetch", watched_fetch)
    dynamics = ["--metrics", "weight_norm,weight_change_final,weight_change_prev,cka_final,cka_prev"]
    code = main(["scan", REPO, "--store", str(store), "--cache-dir", str(cache), "--revisions", "step0..step2000",
                 *dynamics, *SMALL])
    assert code == 0, capsys.readouterr().err
    # Each revision's weights came once (step2's as .bin, read tensor by tensor like the others), and went again.
    for name in ("step0", "step2", "step1000", "step2000"):
        for file, data in suite_files[name].items():
            if file in weight_gets(hub, suite_files[name]):
                sha = hashlib.sha256(data).hexdigest()
                assert len([r for r in hub.requests("GET", f"/cdn/{sha}") if r.status in (200, 206)]) == 1, name
    assert snapshots(cache) == []
    largest = max(weight_shas.values())
    assert 0 < max(held) <= 4 * largest  # the one scored, the one fetched ahead, the previous and the reference

    local = tmp_path / "local" / "tiny-suite"
    for name in ("step0", "step2", "step1000", "step2000"):
        (local / name).mkdir(parents=True)
        for file, data in suite_files[name].items():
            (local / name / file).write_bytes(data)
    assert main(["scan", str(local), "--store", str(tmp_path / "local-store"), *dynamics, *SMALL]) == 0
    key = ["revision", "metric", "layer", "module"]
    wanted = pl.col("metric").is_in(["weight_norm", "weight_change_final", "weight_change_prev", "cka_final", "cka_prev"])
    here = Store(tmp_path / "local-store").scores().filter(wanted).sort(key)
    there = Store(store).scores().filter(wanted).sort(key)
    assert there.height == 4 * LAYERS * 3 * 3 + 3 * LAYERS * 3 * 2
    assert there["value"].to_list() == here["value"].to_list()
    assert there["reference"].to_list() == here["reference"].to_list()
