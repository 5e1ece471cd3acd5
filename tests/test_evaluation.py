"""Evaluation: perplexity, an offline lm-eval task, speed and the KV cache, and the evals table."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
import torch
import transformers
from conftest import make_model, random_ids, save_checkpoint

from ckpt_trace.calibration.sets import CalibrationSet
from ckpt_trace.cli import main
from ckpt_trace.evaluation.harness import BUILTIN_TASK, TASK_DATA, run_tasks
from ckpt_trace.scoring.loss import perplexity
from ckpt_trace.store import Store


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_perplexity_equals_a_direct_computation():
    model = make_model("llama")
    lengths = [12, 5, 9]
    seqs = [ids[:n] for ids, n in zip(random_ids(3, 12, seed=8), lengths)]
    ppl, n = perplexity(model, CalibrationSet.from_ids(seqs), batch_size=2)
    total, count = 0.0, 0
    for seq in seqs:  # one sequence at a time, no padding, float64 log-softmax
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), dim=-1)
        total -= sum(logp[t - 1, seq[t]].item() for t in range(1, len(seq)))
        count += len(seq) - 1
    assert n == count == sum(lengths) - 3
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2"])
def test_loss_by_position_equals_a_direct_computation(family):
    from ckpt_trace.scoring.loss import position_buckets, position_losses

    assert position_buckets(70) == [(1, 1), (2, 4), (5, 16), (17, 64), (65, 69)]
    assert position_buckets(257) == [(1, 1), (2, 4), (5, 16), (17, 64), (65, 256)]
    model = make_model(family)
    lengths = [40, 5, 23, 17]
    seqs = [ids[:n] for ids, n in zip(random_ids(4, 40, seed=9), lengths)]
    found = position_losses(model, CalibrationSet.from_ids(seqs), batch_size=3)
    sums: dict[tuple[int, int], list[float]] = {}
    for seq in seqs:  # one sequence at a time, no padding, float64 log-softmax; position p predicts token p + 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), dim=-1)
        for p in range(1, len(seq)):
            bucket = next(b for b in position_buckets(40) if b[0] <= p <= b[1])
            sums.setdefault(bucket, []).append(-logp[p - 1, seq[p]].item())
    expected = [(low, high, sum(v) / len(v), len(v)) for (low, high), v in sorted(sums.items())]
    assert [(low, high, n) for low, high, _, n in found] == [(low, high, n) for low, high, _, n in expected]
    assert [loss for *_, loss, _ in found] == pytest.approx([loss for *_, loss, _ in expected], rel=1e-5)
    assert sum(n for *_, n in found) == sum(lengths) - len(lengths)


def test_eval_stores_loss_by_position(tmp_path, tokenizer_dir):
    from conftest import write_jsonl

    folder = save_checkpoint(tmp_path / "m", "llama", tokenizer_dir=tokenizer_dir)
    data = write_jsonl(tmp_path / "held-out.jsonl", [{"input_ids": ids} for ids in random_ids(3, 30, seed=2)])
    assert main(["eval", str(folder), "--position-loss", "--perplexity-data", str(data), "--store",
                 str(tmp_path / "s"), "--device", "cpu"]) == 0
    rows = Store(tmp_path / "s").evals().sort("metric")
    assert set(rows["task"]) == {"position_loss"}
    assert rows["metric"].to_list() == ["positions 1-1", "positions 17-29", "positions 2-4", "positions 5-16"]
    assert dict(zip(rows["metric"], rows["n"])) == {"positions 1-1": 3, "positions 2-4": 9, "positions 5-16": 36,
                                                    "positions 17-29": 39}
    assert rows["value"].is_finite().all() and rows["data"].n_unique() == 1


def direct_choice_accuracy(model, tokenizer) -> tuple[float, float]:
    """Pick the choice with the highest log-likelihood after the prompt, item by item."""
    correct = correct_norm = 0
    items = [json.loads(line) for line in TASK_DATA.read_text().splitlines()]
    for item in items:
        context = item["context"]
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            prefix = tokenizer(context, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
            scores.append(sum(logp[t - 1, whole[t]].item() for t in range(len(prefix), len(whole))))
        correct += max(range(4), key=scores.__getitem__) == item["answer"]
        normed = [s / len(c) for s, c in zip(scores, item["choices"])]
        correct_norm += max(range(4), key=normed.__getitem__) == item["answer"]
    return correct / len(items), correct_norm / len(items)


@pytest.fixture(scope="module")
def task_model(tmp_path_factory, tokenizer_dir):
    path = save_checkpoint(tmp_path_factory.mktemp("m") / "model", "gpt_neox", seed=11, tokenizer_dir=tokenizer_dir)
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def test_local_task_accuracy_equals_direct_log_likelihood(task_model, tmp_path):
    model, tokenizer = task_model
    acc, acc_norm = direct_choice_accuracy(model, tokenizer)
    rows = {r["metric"]: r for r in run_tasks(model, tokenizer, [BUILTIN_TASK], batch_size=4)}
    n = len(TASK_DATA.read_text().splitlines())
    assert rows["acc"]["value"] == pytest.approx(acc) and rows["acc"]["n"] == n >= 200
    assert rows["acc_norm"]["value"] == pytest.approx(acc_norm)
    # The standard error of a mean of 0/1 outcomes: the sample standard deviation over sqrt(n).
    assert rows["acc"]["stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)), rel=1e-9)
    assert rows["acc_norm"]["stderr"] == pytest.approx(math.sqrt(acc_norm * (1 - acc_norm) / (n - 1)), rel=1e-9)
    # The same task as a local YAML file, as a user would write one.
    yaml = tmp_path / "my_task.yaml"
    yaml.write_text(
        "task: my_python_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {TASK_DATA}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    from_yaml = {r["metric"]: r for r in run_tasks(model, tokenizer, [str(yaml)])}
    assert from_yaml["acc"]["value"] == pytest.approx(acc)


def test_eval_command_stores_results_for_original_and_pruned(task_model, tmp_path, tokenizer_dir, capsys):
    original = save_checkpoint(tmp_path / "suite" / "step100", "gpt_neox", seed=3, tokenizer_dir=tokenizer_dir)
    out = tmp_path / "pruned"
    assert main(["prune", str(original), "--target", "attention", "--drop", "1", "--strategy", "last",
                 "--out", str(out), "--device", "cpu"]) == 0
    code = main(["eval", str(original), str(out), "--tasks", BUILTIN_TASK, "--perplexity", "--speed",
                 "--seq-len", "16", "--samples", "4", "--store", str(tmp_path / "store"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    evals = Store(tmp_path / "store").evals()
    assert set(evals["model"]) == {"step100", "pruned"}
    assert set(evals["source_model"]) == {"suite"} and set(evals["revision"]) == {"step100"}
    assert evals.filter(pl.col("model") == "pruned")["pruning"].unique().to_list() == ["attention [1] (last)"]
    for metric in ("perplexity", "acc", "prefill_latency_s", "decode_tokens_per_s", "peak_memory_bytes", "kv_cache_bytes"):
        assert evals.filter(pl.col("metric") == metric).height == 2, metric
    assert evals.filter(pl.col("metric") == "acc")["stderr"].is_not_null().all()
    assert evals.filter(pl.col("metric") == "perplexity")["stderr"].is_null().all()
    kv = dict(evals.filter(pl.col("metric") == "kv_cache_bytes").select("model", "value").rows())
    assert kv["pruned"] * 3 == kv["step100"] * 2
    # Each result names the weights evaluated and those the pruned model came from; perplexity, its text.
    from ckpt_trace.fetch.identity import local_weights

    weights = {"step100": local_weights(original)[0], "pruned": local_weights(out)[0]}
    assert evals.group_by("model").agg(pl.col("weights", "source_weights").unique()).sort("model").rows() == [
        ("pruned", [weights["pruned"]], [weights["step100"]]), ("step100", [weights["step100"]], [weights["step100"]])]
    texts = evals.filter(pl.col("metric") == "perplexity")["data"]
    assert texts.n_unique() == 1 and texts[0] is not None and evals.filter(pl.col("task") != "perplexity")["data"].is_null().all()


def test_unknown_task_is_one_line(task_model, tmp_path, tokenizer_dir, capsys):
    model_dir = save_checkpoint(tmp_path / "m", "gpt_neox", tokenizer_dir=tokenizer_dir)
    code = main(["eval", str(model_dir), "--tasks", "no_such_task_anywhere", "--store", str(tmp_path / "s"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no_such_task_anywhere" in err[-1] and err[-1].startswith("ckpt-trace: error:")
    code = main(["eval", str(model_dir), "--tasks", str(tmp_path / "missing.yaml"), "--device", "cpu"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_lm_eval_errors_and_a_limit_of_nothing_are_one_line(tmp_path, tokenizer_dir, capsys):
    """An unknown task is one line on stderr, lm-eval's own log lines shown only with -v; --limit 0 is refused
    before lm-eval runs. In a fresh process: lm-eval's log handler writes to the stderr it found first."""
    import subprocess
    import sys

    model_dir = save_checkpoint(tmp_path / "m", "gpt_neox", tokenizer_dir=tokenizer_dir)

    def run(*args: str) -> subprocess.CompletedProcess:
        entry = "from ckpt_trace.cli import entry_point; entry_point()"
        return subprocess.run([sys.executable, "-c", entry, *args], capture_output=True, text=True)

    unknown = ["eval", str(model_dir), "--tasks", "no_such_task_anywhere", "--store", str(tmp_path / "s"),
               "--device", "cpu"]
    quiet = run(*unknown)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == [
        "ckpt-trace: error: lm-eval could not run no_such_task_anywhere: \"Spec 'no_such_task_anywhere' is not a "
        "registered task/group/tag name or valid YAML path\""]
    verbose = run("-v", *unknown)
    assert verbose.returncode == 2 and "`pretrained` model kwarg is not of type `str`" in verbose.stderr
    assert main(["eval", str(model_dir), "--tasks", BUILTIN_TASK, "--limit", "0", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "ckpt-trace: error: --limit 0 leaves no item to evaluate; give 1 or more, or leave it out"]
