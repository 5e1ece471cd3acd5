"""Evaluation of original and pruned models: benchmarks, perplexity and speed, stored side by side.

- Benchmarks run through lm-evaluation-harness (``lm-eval``), which is handed the loaded
  model object, so pruned models need no files copied anywhere. Task names, paths to
  local task YAML files (fully offline), ``paper`` (the tasks and shots of He et al.) and
  ``ckpt_trace_python_mc`` (a small multiple-choice task shipped with ckpt-trace) are
  understood.
- Perplexity is exp of the mean negative log-likelihood over every predicted token, by
  default on the documents a micro suite held out from training (so it equals exp of the
  suite's validation loss), else on blocks of the calibration text that the calibration
  set does not take.
- Speed: prefill latency (batch 1, T tokens), decode throughput with the KV cache, peak
  memory and KV-cache bytes, after warm-up, as medians with their spread, synchronised on GPU.
"""

from __future__ import annotations

import functools
import math
import os
import resource
import statistics
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import torch

from . import __version__
from .calibration import CalibrationSet, CalibrationSpec, fit_seq_len, heldout_set, load_calibration
from .microsuite import heldout_set as suite_heldout_set
from .errors import CalibrationError, ConfigError
from .scoring import LossSums, model_device
from .sources import single_checkpoint
from .store import EVALS_SCHEMA

PAPER_TASKS = {"boolq": 0, "rte": 0, "openbookqa": 0, "piqa": 0, "mmlu": 5, "winogrande": 5, "hellaswag": 10,
               "arc_challenge": 25}
BUILTIN_TASK = "ckpt_trace_python_mc"
TASK_DATA = Path(__file__).parent / "tasks" / "python_mc.jsonl"
STDERR_BOOTSTRAP = 1000



# -- perplexity -------------------------------------------------------------------------

@torch.inference_mode()
def perplexity(model, data: CalibrationSet, batch_size: int = 8) -> tuple[float, int]:
    """exp(mean negative log-likelihood) over every predicted token, and the number of those tokens; memory does
    not grow with the vocabulary beyond the model's own (`ckpt_trace.scoring.next_token_losses`)."""
    device = model_device(model)
    data.check_vocab(model.get_input_embeddings().num_embeddings)
    sums = LossSums()
    for ids, mask in data.batches(batch_size):
        sums.update(model, ids.to(device), mask.to(device))
    if sums.count == 0:
        raise CalibrationError(f"perplexity data {data.source!r} has no token to predict: every sequence needs 2 tokens or more")
    return math.exp(sums.mean()), sums.count


def perplexity_set(model_dir: Path, model, tokenizer, calibration: CalibrationSpec,
                   perplexity_data: str | None = None) -> CalibrationSet:
    """The text a model's perplexity is measured on: `perplexity_data` (any calibration spec) when given; else, for a
    micro-suite model, the documents its suite held out from training; else blocks of the calibration text that
    the calibration set does not take."""
    from .models import max_positions

    spec = fit_seq_len(calibration, max_positions(model.config.to_dict()))
    if perplexity_data:
        return load_calibration(replace(spec, source=perplexity_data), tokenizer)
    if tokenizer is None:
        raise ConfigError(f"{str(model_dir)!r} has no tokenizer; give --perplexity-data with a pre-tokenized jsonl")
    return suite_heldout_set(model_dir, tokenizer) or heldout_set(spec, tokenizer)


# -- speed ------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_cache_bytes(cache) -> int:
    """Bytes held by a transformers cache's key and value tensors."""
    cache = getattr(cache, "self_attention_cache", cache)
    return sum(
        t.numel() * t.element_size()
        for layer in getattr(cache, "layers", []) for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )


@torch.inference_mode()
def prefill(model, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Run the prompt through the model with a fresh KV cache; return the last position's logits [B, 1, V] and the cache."""
    out = model(input_ids=ids, use_cache=True)
    return out.logits[:, -1:], out.cache


@torch.inference_mode()
def decode(model, cache, token: torch.Tensor, steps: int, keep_logits: bool = False):
    """Greedy decoding with the KV cache passed back in: feed `token` [B, 1], then each argmax, `steps` tokens in all.

    Returns the tokens fed [B, steps], the logits after each (when `keep_logits`), and the cache.
    """
    fed, kept = [], []
    for _ in range(steps):
        fed.append(token)
        logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:]
        if keep_logits:
            kept.append(logits)
        token = logits.argmax(-1)
    return torch.cat(fed, dim=1), kept if keep_logits else None, cache


@torch.inference_mode()
def measure_speed(model, prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 5, warmup: int = 1) -> dict:
    """Prefill latency, decode throughput with the KV cache, KV-cache bytes and peak memory of one model."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)

    def timed_decode():
        last, cache = prefill(model, prompt)
        _sync(device)
        start = time.perf_counter()
        _, _, cache = decode(model, cache, last.argmax(-1), new_tokens)
        _sync(device)
        return time.perf_counter() - start, cache

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        timed_decode()
    prefill_times, decode_times = [], []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        prefill(model, prompt)
        _sync(device)
        prefill_times.append(time.perf_counter() - start)
        seconds, cache = timed_decode()
        decode_times.append(seconds)
    rates = [new_tokens / s for s in decode_times]
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "prefill_latency_s": statistics.median(prefill_times),
        "prefill_latency_s_spread": max(prefill_times) - min(prefill_times),
        "decode_tokens_per_s": statistics.median(rates),
        "decode_tokens_per_s_spread": max(rates) - min(rates),
        "kv_cache_bytes": float(kv_cache_bytes(cache)),
        # On the CPU this is the process's peak resident memory, not the model's alone.
        "peak_memory_bytes": float(peak),
    }


# -- benchmarks -------------------------------------------------------------------------

def builtin_task() -> dict:
    """The offline multiple-choice task shipped with ckpt-trace, as an lm-eval task config."""
    return {
        "task": BUILTIN_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(TASK_DATA)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }


def task_plan(tasks: list[str], num_fewshot: int | None) -> tuple[dict[int | None, list], list[str]]:
    """Group task specs by their number of shots; also return the folders of local YAML tasks."""
    groups: dict[int | None, list] = {}
    include = []
    for name in tasks:
        if name == "paper":
            for task, shots in PAPER_TASKS.items():
                groups.setdefault(shots if num_fewshot is None else num_fewshot, []).append(task)
        elif name == BUILTIN_TASK:
            groups.setdefault(num_fewshot, []).append(builtin_task())
        elif name.endswith((".yaml", ".yml")):
            path = Path(name)
            if not path.is_file():
                raise ConfigError(f"task file {name!r} does not exist")
            include.append(str(path.resolve().parent))
            task = next((line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                         if line.startswith("task:")), None)
            if not task:
                raise ConfigError(f"task file {name!r} has no 'task:' line")
            groups.setdefault(num_fewshot, []).append(task)
        else:
            groups.setdefault(PAPER_TASKS.get(name) if num_fewshot is None else num_fewshot, []).append(name)
    return groups, include


@functools.lru_cache(maxsize=4)
def task_manager(include: tuple[str, ...], defaults: bool):
    """lm-eval's task index over these folders (and its own tasks where `defaults`), built once per process: each
    model of an evaluation runs the same tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def run_tasks(model, tokenizer, tasks: list[str], num_fewshot: int | None = None, batch_size: int = 8,
              limit: int | None = None) -> list[dict]:
    """Run lm-eval tasks on a loaded model; one row per (task, metric)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    groups, include = task_plan(tasks, num_fewshot)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    # lm-eval's own tasks (thousands of YAML files) are indexed only where a task may name one.
    manager = task_manager(tuple(include), defaults=any(name != BUILTIN_TASK for name in tasks))
    rows = []
    for shots, specs in groups.items():
        try:
            # Accuracies are means, whose standard error lm-eval computes in closed form; the iterations are for
            # the few metrics it can only bootstrap.
            results = simple_evaluate(model=lm, tasks=specs, num_fewshot=shots, task_manager=manager, limit=limit,
                                      log_samples=False, bootstrap_iters=STDERR_BOOTSTRAP, verbosity="ERROR")
        except Exception as err:  # lm-eval raises many kinds for a task it cannot load (offline, unknown name)
            names = [s["task"] if isinstance(s, dict) else s for s in specs]
            raise ConfigError(f"lm-eval could not run {', '.join(names)}: {' '.join(str(err).split())}") from err
        for task, metrics in results["results"].items():
            n = results.get("n-samples", {}).get(task, {}).get("effective")
            for key, value in metrics.items():
                metric, _, kind = key.partition(",")
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if numeric and not metric.endswith("_stderr") and metric != "sample_len":
                    stderr = metrics.get(f"{metric}_stderr,{kind}" if kind else f"{metric}_stderr")
                    stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
                    rows.append({"task": task, "metric": metric, "value": float(value), "stderr": stderr, "n": n,
                                 "num_fewshot": shots})
    return rows


# -- the whole job ----------------------------------------------------------------------

def describe(path: Path) -> dict:
    """Who a model directory is: its own name, the model and revision it comes from, its pruning, and the
    fingerprints of its weights and of the unpruned model's (which a pruned model's manifest records; null in
    manifests written before it did)."""
    from .identity import local_weights
    from .pruning import MANIFEST, manifest

    if (path / MANIFEST).is_file():
        record = manifest(path)
        dropped = ", ".join(f"{kind} {layers}" for kind, layers in record["dropped"].items() if layers)
        strategies, step = [], record
        while step:  # a model pruned again lists every step, earliest first
            strategies.insert(0, step["strategy"])
            step = step.get("previous")
        return {"model": path.name, "source_model": record["model"], "revision": record["revision"],
                "pruning": f"{dropped} ({' then '.join(strategies)})", "weights": local_weights(path)[0],
                "source_weights": record.get("weights")}
    checkpoint = single_checkpoint(path)
    return {"model": path.name, "source_model": checkpoint.model, "revision": checkpoint.revision.name, "pruning": None,
            "weights": checkpoint.weights, "source_weights": checkpoint.weights}


@dataclass
class EvalConfig:
    """An evaluation job over one or more model directories."""

    models: list[str | os.PathLike]
    tasks: list[str] | None = None
    """lm-eval tasks; None: the paper's tasks unless only perplexity or speed is asked for."""
    num_fewshot: int | None = None
    perplexity: bool = False
    perplexity_data: str | None = None
    """Any calibration spec; default: held-out blocks of the calibration text."""
    speed: bool = False
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    """The calibration set that default perplexity blocks are kept apart from."""
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    store: str | os.PathLike = "data"
    limit: int | None = None
    """At most this many items per task (for quick looks)."""
    prompt_tokens: int = 128
    new_tokens: int = 32

    def __post_init__(self):
        if self.tasks is None and not (self.perplexity or self.speed):
            self.tasks = ["paper"]


def evaluate(config: EvalConfig) -> pl.DataFrame:
    """Evaluate every model directory and store the results in the store's evals/ table."""
    from .models import dtype_name, load_model, load_tokenizer, resolve_device, resolve_dtype
    from .store import Store

    store = Store(config.store)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    frames = []
    for model_dir in map(Path, config.models):
        model = load_model(model_dir, device, dtype)
        tokenizer = load_tokenizer(model_dir)
        rows = []
        if config.perplexity:
            data = perplexity_set(model_dir, model, tokenizer, config.calibration, config.perplexity_data)
            ppl, n = perplexity(model, data, config.batch_size)
            rows.append({"task": "perplexity", "metric": "perplexity", "value": ppl, "n": n, "num_fewshot": None,
                         "data": data.id})
        if config.speed:
            for metric, value in measure_speed(model, config.prompt_tokens, config.new_tokens).items():
                rows.append({"task": "speed", "metric": metric, "value": value, "n": None, "num_fewshot": None})
        if config.tasks:
            rows += run_tasks(model, tokenizer, config.tasks, config.num_fewshot, config.batch_size, config.limit)
        identity = describe(model_dir)
        now = datetime.now(timezone.utc)
        frame = pl.DataFrame(
            [{**identity, **row, "path": str(model_dir.resolve()), "dtype": dtype_name(dtype), "device": str(device),
              "version": __version__, "created": now} for row in rows],
            schema=EVALS_SCHEMA,
        )
        store.write_evals(frame)
        frames.append(frame)
        del model
    return pl.concat(frames) if frames else pl.DataFrame(schema=EVALS_SCHEMA)
