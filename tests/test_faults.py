"""Faults and bad input: one line and exit 2 (or a resumable state), never a traceback, and nothing stored lost.

Every case runs the command line in-process as a user would, and checks that the files
already in the store are byte for byte what they were.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import LAYERS, save_checkpoint, write_jsonl

from ckpt_trace.cli import main
from ckpt_trace.store import Store

SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]
KEY = ["revision", "layer", "module", "metric"]


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("ckpt-trace: error:")]
    assert len(lines) == 1, err
    return lines[0]


def dataset(store: Path) -> pl.DataFrame:
    return Store(store).scores().drop("created").sort(KEY)


@pytest.fixture
def suite(tmp_path, tokenizer_dir):
    root = tmp_path / "suite"
    for seed, name in enumerate(["step0", "step100", "step200", "step300"]):
        save_checkpoint(root / name, "gpt_neox", seed=seed, tokenizer_dir=tokenizer_dir)
    return root


@pytest.fixture
def scanned(suite, tmp_path):
    """A store holding the scan of the first two revisions: what must never change."""
    store = tmp_path / "store"
    assert main(["scan", str(suite), "--revisions", "step0,step100", "--store", str(store), *SMALL]) == 0
    return store


WEIGHT_DAMAGE = {
    "cut short": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: b"\x00garbage" * 100,
}


@pytest.mark.parametrize("ahead", ["--load-ahead", "--no-load-ahead"])
@pytest.mark.parametrize("damage", sorted(WEIGHT_DAMAGE))
def test_unreadable_weights_in_the_middle_of_a_suite(suite, scanned, tmp_path, capsys, damage, ahead):
    """Whether step200 is loaded while step100 is scored or after, its error is its own, and stops the scan."""
    weights = suite / "step200" / "model.safetensors"
    weights.write_bytes(WEIGHT_DAMAGE[damage](weights.read_bytes()))
    line = step200_fails(suite, scanned, capsys, ahead, "cannot load the weights")
    assert line.startswith(f"ckpt-trace: error: cannot load the weights in '{suite / 'step200'}'")


def step200_fails(suite: Path, scanned: Path, capsys, ahead: str, error: str) -> str:
    """Scan the suite whose step200 is broken: the scan stops with exit 2, nothing stored changes, and step200 is
    recorded as failed with `error` in its message; then --keep-going scores the rest, records the failure, and
    says so in its exit status. The one line the first scan printed."""
    before = files_of(scanned)
    assert main(["scan", str(suite), "--store", str(scanned), ahead, *SMALL]) == 2
    line = one_line(capsys)
    assert all(files_of(scanned)[f] == data for f, data in before.items())
    runs = Store(scanned).runs().filter(pl.col("status") == "failed")
    assert runs["revision"].to_list() == ["step200"] and error in runs["error"][0]
    assert main(["scan", str(suite), "--store", str(scanned), "--keep-going", ahead, *SMALL]) == 1
    assert "1 revision failed and is recorded" in capsys.readouterr().err
    assert sorted(set(Store(scanned).scores()["revision"])) == ["step0", "step100", "step300"]
    return line


@pytest.mark.parametrize("ahead", ["--load-ahead", "--no-load-ahead"])
def test_a_revision_with_a_config_and_no_weights_fails_and_is_recorded(suite, scanned, tmp_path, capsys, ahead):
    """A revision folder with config.json but no weight files is a broken checkpoint, not a folder to pass over:
    it stops the scan with exit 2 and is recorded in runs/; with --keep-going every other revision is stored and
    the exit status is 1. A lone model folder without weights is one line and exit 2."""
    (suite / "step200" / "model.safetensors").unlink()
    line = step200_fails(suite, scanned, capsys, ahead, "no weight files")
    assert line == (f"ckpt-trace: error: revision 'step200' of '{suite.name}' has a config.json but no weight files "
                    "(.safetensors or .bin)")
    assert main(["scan", str(suite / "step200"), "--store", str(tmp_path / "lone"), *SMALL]) == 2
    assert "has a config.json but no weight files" in one_line(capsys)
    assert not (tmp_path / "lone" / "scores").exists()


def test_weights_that_do_not_fit_the_config(tmp_path, tokenizer_dir, capsys):
    deeper = save_checkpoint(tmp_path / "deeper", "llama", tokenizer_dir=tokenizer_dir)
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps(config | {"num_hidden_layers": LAYERS + 2}))
    assert main(["scan", str(deeper), "--store", str(tmp_path / "s"), *SMALL]) == 2
    line = one_line(capsys)
    assert "lack parameters its config calls for (they would be random): model.layers.3." in line
    shallower = save_checkpoint(tmp_path / "shallower", "llama", tokenizer_dir=tokenizer_dir)
    (shallower / "config.json").write_text(json.dumps(config | {"num_hidden_layers": LAYERS - 1}))
    assert main(["scan", str(shallower), "--store", str(tmp_path / "s"), *SMALL]) == 2
    assert f"hold decoder layers its config ({LAYERS - 1} layers) lacks: model.layers.2." in one_line(capsys)
    assert not (tmp_path / "s" / "scores").exists()  # nothing was scored


def test_a_model_with_no_layers_and_a_config_that_is_no_object(tmp_path, tokenizer_dir, capsys):
    import transformers
    from conftest import CONFIGS

    empty = tmp_path / "empty"
    config = CONFIGS["llama"].__class__(**{**CONFIGS["llama"].to_dict(), "num_hidden_layers": 0})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(empty)
    for file in tokenizer_dir.iterdir():
        (empty / file.name).write_bytes(file.read_bytes())
    assert main(["scan", str(empty), "--store", str(tmp_path / "s"), *SMALL]) == 2
    assert "has no decoder layers to score" in one_line(capsys)
    listed = save_checkpoint(tmp_path / "listed", "llama", tokenizer_dir=tokenizer_dir)
    (listed / "config.json").write_text("[1, 2, 3]")
    assert main(["scan", str(listed), "--store", str(tmp_path / "s"), *SMALL]) == 2
    assert "is not a model config: it holds a JSON list, not an object" in one_line(capsys)


def test_a_bad_record_beside_the_weights_fails_that_revision_only(suite, scanned, capsys):
    (suite / "step200" / "ckpt_trace_eval.json").write_text(json.dumps({"val_loss": "low"}))
    assert main(["scan", str(suite), "--store", str(scanned), "--keep-going", *SMALL]) == 1
    failed = Store(scanned).runs().filter(pl.col("status") == "failed")
    assert failed["revision"].to_list() == ["step200"] and "val_loss is 'low', not a number" in failed["error"][0]
    # Every revision with scores has its revisions row: the two are written as one.
    assert set(Store(scanned).revisions()["revision"]) == set(Store(scanned).scores()["revision"])


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["scan", "{suite}", "--revisions", ","], "',' names nothing"),
        (["revisions", "{suite}", "--select", ","], "',' names nothing"),
        (["scan", "{suite}", "--branch", "ingredient1"], "no branch 'ingredient1'; branches: none"),
        (["scan", "{tmp}/no-such-dir/model"], "is not a directory"),
        (["scan", "{suite}/step7"], "step7' is not a directory; '{suite}' holds: step0, step100, step200, step300"),
        (["eval", "{suite}/step0", "--tasks", ","], "',' names no task"),
        (["eval", "{suite}/step0", "--num-fewshot", "-1"], "-1 is not in the range x>=0"),
        (["scan", "{suite}", "--store", "{tmp}/a-file/store"], "cannot be made: '{tmp}/a-file' is a file"),
        (["report", "--store", "{store}", "--out", "{tmp}/a-file/figures"],
         "output folder '{tmp}/a-file/figures' cannot be made: '{tmp}/a-file' is a file"),
        (["prune", "{suite}", "--target", "attention", "--drop", "1", "--strategy", "last", "--out", "{tmp}/a-file/out"],
         "output folder '{tmp}/a-file/out' cannot be made: '{tmp}/a-file' is a file"),
        (["eval", "{suite}/step0", "--perplexity", "--perplexity-data", "{tmp}/one-token.jsonl"], "has no token to predict"),
    ],
)
def test_bad_input_is_one_line(suite, scanned, tmp_path, capsys, args, fragment):
    (tmp_path / "a-file").write_text("not a folder")
    write_jsonl(tmp_path / "one-token.jsonl", [{"input_ids": [5]}, {"input_ids": [7]}])
    fill = dict(suite=suite, tmp=tmp_path, store=scanned)
    before = files_of(scanned)
    start = time.perf_counter()
    extra = {"scan": SMALL, "prune": SMALL, "eval": ["--device", "cpu"]}.get(args[0], [])
    code = main([a.format(**fill) for a in args] + extra)
    line = one_line(capsys)
    assert code == 2 and fragment.format(**fill) in line, line
    assert time.perf_counter() - start < 20  # no network retries behind a local typo
    assert files_of(scanned) == before


def test_disk_full_while_storing_changes_nothing_and_resumes(suite, scanned, tmp_path, monkeypatch, capsys):
    before = files_of(scanned)

    def full(self, file, *args, **kwargs):
        Path(file).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    with monkeypatch.context() as patch:
        patch.setattr(pl.DataFrame, "write_parquet", full)
        assert main(["scan", str(suite), "--store", str(scanned), *SMALL]) == 2
    line = one_line(capsys)
    assert "No space left on device; what was stored before is unchanged" in line and str(scanned) in line
    assert files_of(scanned) == before and not list(scanned.rglob("*.tmp"))
    assert main(["scan", str(suite), "--store", str(scanned), *SMALL]) == 0  # space again: it resumes
    assert main(["scan", str(suite), "--store", str(tmp_path / "whole"), *SMALL]) == 0
    assert dataset(scanned).equals(dataset(tmp_path / "whole"))


def test_killed_between_the_revision_row_and_its_scores(suite, tmp_path, monkeypatch):
    from ckpt_trace.store import Store as StoreClass

    real = StoreClass.write_scores
    calls = []

    def dies_on_the_second(self, frame):
        calls.append(frame["revision"][0])
        if len(calls) == 2:
            raise SystemExit("killed")  # as a kill would: no handler runs
        return real(self, frame)

    with monkeypatch.context() as patch:
        patch.setattr(StoreClass, "write_scores", dies_on_the_second)
        with pytest.raises(SystemExit):
            main(["scan", str(suite), "--store", str(tmp_path / "s"), *SMALL])
    assert calls == ["step0", "step100"] and set(Store(tmp_path / "s").scores()["revision"]) == {"step0"}
    assert main(["scan", str(suite), "--store", str(tmp_path / "s"), *SMALL]) == 0
    assert main(["scan", str(suite), "--store", str(tmp_path / "whole"), *SMALL]) == 0
    assert dataset(tmp_path / "s").equals(dataset(tmp_path / "whole"))
    assert set(Store(tmp_path / "s").revisions()["revision"]) == {"step0", "step100", "step200", "step300"}


def test_a_foreign_or_corrupt_file_in_the_store_is_named_and_left_alone(suite, scanned, tmp_path, capsys, caplog):
    corrupt = scanned / "scores" / "suite" / "step0" / "stray.parquet"
    corrupt.write_bytes(b"PAR1 not really")
    foreign = scanned / "scores" / "notes.parquet"
    pl.DataFrame({"layer": ["one", "two"]}).write_parquet(foreign)
    assert main(["scan", str(suite), "--store", str(scanned), *SMALL]) == 0
    assert main(["report", "--store", str(scanned), "--out", str(tmp_path / "fig")]) == 0
    warned = capsys.readouterr().err + caplog.text
    assert f"skipping {corrupt}: not a readable Parquet file" in warned
    assert f"skipping {foreign}: its columns layer are not of the scores table's types" in warned
    assert corrupt.read_bytes() == b"PAR1 not really" and foreign.is_file()
    assert sorted(set(Store(scanned).scores()["revision"])) == ["step0", "step100", "step200", "step300"]


def test_temporary_files_of_killed_writers_are_removed_and_live_ones_kept(suite, scanned, tmp_path):
    import socket

    host = socket.gethostname().replace(".", "_")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = scanned / "scores" / f".x.parquet.{host}@{ended.stdout.strip()}-0123abcd.tmp"
    live = scanned / "scores" / f".y.parquet.{host}@{os.getppid()}-0123abcd.tmp"  # a writer that still runs
    dead.write_bytes(b"left by a kill")
    live.write_bytes(b"being written")
    assert main(["scan", str(suite), "--store", str(scanned), *SMALL]) == 0
    assert not dead.exists() and live.read_bytes() == b"being written"


def scan_process(suite: Path, store: Path) -> list[str]:
    return [sys.executable, "-c", "from ckpt_trace.cli import entry_point; entry_point()", "scan", str(suite),
            "--store", str(store), *SMALL]


@pytest.mark.parametrize("stored", [0, 1, 3])  # killed while starting, and after one and three revisions are stored
def test_sigkill_at_several_moments_resumes_to_the_uninterrupted_dataset(suite, tmp_path, stored):
    store = tmp_path / "killed"
    process = subprocess.Popen(scan_process(suite, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((store / "scores").rglob("*.parquet"))) < stored and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = files_of(store) if store.exists() else {}
    resumed = subprocess.run(scan_process(suite, store), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert all(files_of(store)[f] == data for f, data in kept.items() if f.startswith("scores"))  # nothing redone
    assert main(["scan", str(suite), "--store", str(tmp_path / "whole"), *SMALL]) == 0
    assert dataset(store).equals(dataset(tmp_path / "whole"))
    assert not list(store.rglob("*.tmp"))


def test_two_concurrent_shards_store_what_one_serial_scan_stores(suite, tmp_path, capsys):
    store = tmp_path / "sharded"
    processes = [subprocess.Popen([*scan_process(suite, store), "--shard", f"{i}/2"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]
    # Every other revision in training order, the parts disjoint and together the whole selection.
    assert "step0" in outputs[0][0] and "step200" in outputs[0][0] and "step100" not in outputs[0][0]
    assert "step100" in outputs[1][0] and "step300" in outputs[1][0] and "step200" not in outputs[1][0]
    assert main(["scan", str(suite), "--store", str(tmp_path / "serial"), *SMALL]) == 0
    assert dataset(store).equals(dataset(tmp_path / "serial"))  # the same rows, once each
    assert len(list((store / "scores").rglob("*.parquet"))) == 4
    runs = Store(store).runs()
    assert runs.height == 4 and runs["revision"].n_unique() == 4
    capsys.readouterr()
    for bad in ("3/2", "0/2", "1-2", "a/b"):
        assert main(["scan", str(suite), "--store", str(store), "--shard", bad, *SMALL]) == 2
        assert bad in one_line(capsys)
    # More shards than revisions: a shard with none has nothing to do, which is no error.
    assert main(["scan", str(suite), "--store", str(store), "--shard", "6/8", *SMALL]) == 0
    assert "shard 6/8 holds none of the selected revisions" in capsys.readouterr().out
    assert main(["scan", str(suite), "--store", str(store), "--prefetch", "0", *SMALL]) == 2
    assert "--prefetch 0" in one_line(capsys)


class RecordingSource:
    """A source whose fetches take a while; it records what the cache would hold and whether two jobs overlap."""

    def __init__(self, fail: str | None = None):
        self.events, self.held, self.most, self.running, self.overlap, self.fail = [], set(), 0, 0, False, fail

    def _enter(self):
        self.running += 1
        self.overlap |= self.running > 1

    def fetch(self, name):
        self._enter()
        try:
            time.sleep(0.02)
            self.held.add(name)
            self.most = max(self.most, len(self.held))
            self.events.append(("fetch", name))
            if name == self.fail:
                raise OSError(f"cannot fetch {name}")
            return name
        finally:
            self.running -= 1

    def release(self, name):
        self._enter()
        self.held.discard(name)
        self.events.append(("release", name))
        self.running -= 1


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_prefetch_depth_bounds_the_cache_and_releases_run_between_fetches(depth):
    from ckpt_trace.scan.streaming import streamed

    source, names = RecordingSource(fail="r3"), [f"r{i}" for i in range(7)]
    seen = []
    for fetched, error, prepared in streamed(source, names, depth):
        assert prepared is None
        time.sleep(0.05)  # scoring, slower than a fetch: the fetches ahead are done
        seen.append((fetched, type(error).__name__ if error else None))
        assert len(source.held) <= depth + 1
    assert seen == [(n, "OSError" if n == "r3" else None) for n in names]
    # A stream run to its end returns once the last revision is released: the cache is as it was.
    assert not source.held and not source.overlap and source.most == depth + 1
    assert [e for e in source.events if e[0] == "fetch"] == [("fetch", n) for n in names]
    # An early exit releases the one in hand and those fetched ahead.
    early = RecordingSource()
    for _ in streamed(early, names, depth):
        break
    deadline = time.monotonic() + 5
    while early.held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not early.held and {n for kind, n in early.events if kind == "fetch"} == set(names[:depth + 1])


def test_prepare_runs_one_revision_ahead_of_the_caller():
    """With `prepare`, the next revision is prepared while the caller works on the current one, never more than
    one ahead; a failing prepare is handed out with its revision, and a failed fetch fails its prepare too."""
    from ckpt_trace.scan.streaming import streamed

    source, names = RecordingSource(fail="r1"), [f"r{i}" for i in range(5)]
    started = []

    def prepare(name):
        started.append(name)
        if name == "r3":
            raise ValueError("unreadable weights")
        return name.upper()

    for i, (fetched, error, prepared) in enumerate(streamed(source, names, 2, prepare)):
        time.sleep(0.1)  # the caller's work: the next one is prepared meanwhile, and no further
        assert started == [n for n in names[:i + 2] if n != "r1"]  # r1's fetch failed: nothing to prepare
        if fetched == "r1":
            assert isinstance(error, OSError)
            with pytest.raises(OSError):
                prepared.result()
        elif fetched == "r3":
            assert error is None
            with pytest.raises(ValueError, match="unreadable weights"):
                prepared.result()
        else:
            assert error is None and prepared.result() == fetched.upper()
    assert not source.held


def test_load_ahead_on_a_gpu_where_two_models_fit_in_half_its_free_memory(monkeypatch):
    import torch

    from ckpt_trace.fetch.revisions import parse_revision
    from ckpt_trace.fetch.sources import Checkpoint
    from ckpt_trace.scan.options import ScanConfig
    from ckpt_trace.scan.streaming import loads_ahead

    memory = 80 * 2**30  # free, of a GPU of twice that, the rest held by another process
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (memory, 2 * memory))
    gpu, cpu = torch.device("cuda:0"), torch.device("cpu")

    def sizes(*weight_bytes):
        return [Checkpoint("m", parse_revision(f"step{i}"), weight_bytes=b) for i, b in enumerate(weight_bytes)]

    auto = ScanConfig(device="cpu")
    assert loads_ahead(auto, sizes(10, memory // 4), gpu, torch.bfloat16)
    assert not loads_ahead(auto, sizes(10, memory // 4 + 1), gpu, torch.bfloat16)
    assert not loads_ahead(auto, sizes(memory // 4), gpu, torch.float32)  # 16-bit files may double in float32
    assert loads_ahead(auto, sizes(memory // 8), gpu, torch.float32)
    assert not loads_ahead(auto, sizes(10), cpu, torch.float32)  # the CPU's cores load and score alike
    assert not loads_ahead(ScanConfig(device="cpu", device_map="auto"), sizes(10), gpu, torch.float32)
    assert not loads_ahead(ScanConfig(device="cpu", load_ahead=False), sizes(10), gpu, torch.float32)
    assert loads_ahead(ScanConfig(device="cpu", load_ahead=True), sizes(memory), cpu, torch.float32)


SLOW_LOAD = """
import importlib, sys, time, torch
scan = importlib.import_module("ckpt_trace.scan.run")
real = scan.load_model
def load_model(path, *args, **kwargs):
    if path.name == "step300":  # loaded ahead while step200 fails: busy inside torch when the scan stops
        x, end = torch.randn(128, 128), time.monotonic() + 1.5
        while time.monotonic() < end:
            x = torch.tanh(x @ x)
    return real(path, *args, **kwargs)
scan.load_model = load_model
from ckpt_trace.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_scan_that_stops_waits_for_the_model_it_was_loading_ahead(suite, scanned, capsys):
    """A revision that fails stops the scan while the next one loads on the loader thread: the process exits with
    status 2 and one line, not killed by a thread still inside torch as the interpreter ends."""
    weights = suite / "step200" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    done = subprocess.run([sys.executable, "-c", SLOW_LOAD, "scan", str(suite), "--store", str(scanned), "--load-ahead",
                           *SMALL], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "terminate called" not in done.stderr
    assert f"cannot load the weights in '{suite / 'step200'}'" in done.stderr


def test_a_model_that_runs_out_of_memory_loading_ahead_is_loaded_again_alone(suite, tmp_path, monkeypatch, caplog):
    """Out of memory beside the model being scored is no fault of the revision: it is loaded again with no other
    load under way and no model loaded ahead kept, and so is every revision after it; the scores are those of a
    scan without load-ahead."""
    import importlib
    import threading

    import torch

    from ckpt_trace.errors import SourceError

    scan_module = importlib.import_module("ckpt_trace.scan.run")
    real, lock = scan_module.load_model, threading.Lock()
    loads, running = [], set()

    def load_model(path, *args, **kwargs):
        here = "main" if threading.current_thread() is threading.main_thread() else "ahead"
        with lock:
            loads.append((here, path.name, sorted(running)))
            running.add(path.name)
        try:
            if here == "ahead" and path.name == "step100":
                try:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                except torch.OutOfMemoryError as err:
                    raise SourceError(f"cannot load the weights in '{path}': {err}") from err
            time.sleep(0.2)  # the next fetch ends meanwhile, and a load ahead would start
            return real(path, *args, **kwargs)
        finally:
            with lock:
                running.discard(path.name)

    monkeypatch.setattr(scan_module, "load_model", load_model)
    assert main(["scan", str(suite), "--store", str(tmp_path / "ahead"), "--load-ahead", *SMALL]) == 0
    assert [name for here, name, _ in loads if here == "ahead"][:2] == ["step0", "step100"]
    again = [i for i, (here, name, _) in enumerate(loads) if here == "main"]
    assert [loads[i][1] for i in again] == ["step100", "step200", "step300"]  # alone from the failure on
    assert all(loads[i][2] == [] for i in again)  # with no other load under way
    assert "loading step100 beside the model being scored ran out of memory" in caplog.text
    monkeypatch.setattr(scan_module, "load_model", real)
    assert main(["scan", str(suite), "--store", str(tmp_path / "serial"), "--no-load-ahead", *SMALL]) == 0
    assert dataset(tmp_path / "ahead").drop("version").equals(dataset(tmp_path / "serial").drop("version"))


def test_a_failed_revision_does_not_keep_its_model_alive(suite, tmp_path, monkeypatch):
    """With load-ahead and --keep-going, a revision whose scoring fails leaves no model behind in its error: when a
    revision starts loading, at most the one being scored is alive."""
    import gc
    import importlib
    import weakref

    from ckpt_trace.errors import SourceError

    scan_module = importlib.import_module("ckpt_trace.scan.run")
    real, alive, counts = scan_module.load_model, weakref.WeakSet(), []

    def load_model(*args, **kwargs):
        gc.collect()
        counts.append(len(alive))
        model = real(*args, **kwargs)
        alive.add(model)
        return model

    def score_checkpoint(checkpoint, calibration, config, device, dtype, model=None, dynamics=None):
        time.sleep(0.2)  # the next one loads meanwhile
        raise SourceError(f"cannot score {checkpoint.revision.name} with {type(model).__name__}")

    monkeypatch.setattr(scan_module, "load_model", load_model)
    monkeypatch.setattr(scan_module, "score_checkpoint", score_checkpoint)
    assert main(["scan", str(suite), "--store", str(tmp_path / "s"), "--load-ahead", "--keep-going", *SMALL]) == 1
    failed = Store(tmp_path / "s").runs()
    assert failed["status"].to_list() == ["failed"] * 4 and "with GPTNeoXForCausalLM" in failed["error"][0]
    assert len(counts) == 4 and max(counts) <= 1, counts


def test_a_stopped_stream_waits_for_a_load_under_way_not_for_a_download():
    """Closing a stream returns at once while the next revision still downloads, and nothing is loaded after; a load
    under way is waited for."""
    from ckpt_trace.scan.streaming import streamed

    class SlowSource(RecordingSource):
        def fetch(self, name):
            if name == "r1":
                time.sleep(3)
            return super().fetch(name)

    prepared = []
    stream = streamed(SlowSource(), ["r0", "r1", "r2"], 1, prepared.append)
    next(stream)[2].result()  # r0 loaded; r1 downloading
    start = time.perf_counter()
    stream.close()
    assert time.perf_counter() - start < 1.5
    time.sleep(3)
    assert prepared == ["r0"]  # r1 arrived after the stream stopped: not loaded

    def slow_prepare(name):
        time.sleep(1)
        prepared.append(name)

    stream = streamed(RecordingSource(), ["r0", "r1"], 1, slow_prepare)
    next(stream)[2].result()
    time.sleep(0.2)  # r1 is loading
    stream.close()
    assert prepared[-2:] == ["r0", "r1"]  # its load ended before close returned


def test_an_error_keeps_no_locals_of_its_causes():
    import weakref

    from ckpt_trace.errors import SourceError
    from ckpt_trace.scan.streaming import _drop_locals

    class Model:
        pass

    def build():
        model = Model()
        build.ref = weakref.ref(model)
        raise MemoryError("out of memory")

    def load():
        try:
            build()
        except MemoryError as err:
            raise SourceError("cannot load the weights") from err

    try:
        load()
    except SourceError as err:
        error = err
    assert build.ref() is not None
    _drop_locals(error)
    assert build.ref() is None and str(error) == "cannot load the weights" and error.__cause__.__traceback__
