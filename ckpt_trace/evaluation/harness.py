"""Benchmarks through lm-evaluation-harness (``lm-eval``), handed the loaded model object, so pruned models need
no files copied anywhere.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import yaml

from ..errors import ConfigError, one_line

PAPER_TASKS = {"boolq": 0, "rte": 0, "openbookqa": 0, "piqa": 0, "mmlu": 5, "winogrande": 5, "hellaswag": 10,
               "arc_challenge": 25}
BUILTIN_TASK = "ckpt_trace_python_mc"
TASK_DATA = Path(__file__).parent / "tasks" / "python_mc.jsonl"
STDERR_BOOTSTRAP = 1000
TASK_ERRORS = (ValueError, KeyError, OSError, ImportError, yaml.YAMLError)
"""What lm-eval raises for a task it cannot find (ValueError, KeyError), read (OSError, YAMLError) or load (a dataset
offline: OSError; a missing extra: ImportError)."""


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
    # lm-eval logs at the level its logger is given (the command line's -v), else errors only.
    verbosity = logging.getLevelName(logging.getLogger("lm_eval").level or logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    # lm-eval's own tasks (thousands of YAML files) are indexed only where a task may name one.
    manager = task_manager(tuple(include), defaults=any(name != BUILTIN_TASK for name in tasks))
    rows = []
    for shots, specs in groups.items():
        try:
            # Accuracies are means, whose standard error lm-eval computes in closed form; the iterations are for
            # the few metrics it can only bootstrap.
            results = simple_evaluate(model=lm, tasks=specs, num_fewshot=shots, task_manager=manager, limit=limit,
                                      log_samples=False, bootstrap_iters=STDERR_BOOTSTRAP, verbosity=verbosity)
        except TASK_ERRORS as err:  # a task it cannot find, read or load (offline, unknown name, bad YAML)
            names = [s["task"] if isinstance(s, dict) else s for s in specs]
            raise ConfigError(f"lm-eval could not run {', '.join(names)}: {one_line(err)}") from err
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
