"""The ckpt-trace command line: thin click commands over the library functions.

Every option of a command that fills in a dataclass (`ScanConfig`, `PruneConfig`, `CurveConfig`, `EvalConfig`, their
shared `ScoringOptions` and `CalibrationSpec`, `MicroSuiteConfig`) is made from its field: the option's name,
default, type and help come from the field and the docstring under it, so that each is declared once. The few
options that fill in no dataclass (`report`'s, `micro-suite build --force`) are declared here, once.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import logging
import re
import sys
import textwrap
import types
import typing
from pathlib import Path

import click
import polars as pl

from .analysis import COLOR_SCALES
from .calibration.sets import CalibrationSpec
from .errors import CkptTraceError, one_line
from .evaluation.run import EvalConfig
from .microsuite.suite import MicroSuiteConfig
from .pruning.choice import STRATEGIES, TARGETS
from .pruning.curves import CurveConfig
from .pruning.heal import HealConfig
from .pruning.run import PruneConfig
from .scan.options import TOKENS, ScanConfig, parse_shard
from .scoring.options import ScoringOptions

OK, FAILED, INPUT_ERROR, INTERRUPTED = 0, 1, 2, 130


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass and of the dataclasses it extends, whitespace folded."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = one_line(after.value.value).replace("``", "").replace("`", "")
    return docs


class Listed(click.ParamType):
    """A comma-separated list, as a tuple of its non-empty items; one that names none is an error where `empty` says
    why (else the config's own check says so)."""

    name = "LIST"

    def __init__(self, empty: str | None = None):
        self.empty = empty

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = tuple(t.strip() for t in value.split(",") if t.strip())
        if not items and self.empty:
            self.fail(f"{value!r} {self.empty}", param, ctx)
        return items


class Parsed(click.ParamType):
    """A value read by a parser of the library (which raises its own one-line error)."""

    def __init__(self, parse, name: str):
        self.parse, self.name = parse, name

    def convert(self, value, param, ctx):
        return value if not isinstance(value, str) else self.parse(value)


def option(cls: type, name: str, *decls: str, dest: str | None = None, **kwargs):
    """The click option of field `name` of dataclass `cls`, passed to the command as `dest` (default: `name`): its
    default, its type (a flag for a bool, `--x/--no-x` where None means "decide"), and its docstring as help, where
    "None:" reads "default:" and pointers into the code are left out; `kwargs` add to or override what click is
    given."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    optional = isinstance(kind, types.UnionType) and len(args) < len(typing.get_args(kind))
    flag = f"--{name.replace('_', '-')}"
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default, kwargs = None, {"required": True, **kwargs}
    doc = re.sub(r" \((?:see|of) [^)]*\)", "", field_docs(cls).get(name, ""))  # pointers into the code
    doc = re.sub(r"(^|\. )None: ", r"\1Default: ", doc).replace("None: ", "default: ")
    settings = {"default": default, "help": doc}
    if kind is bool:
        settings["is_flag"] = True
    elif optional and args == [bool]:
        decls = decls or (f"{flag}/--no-{flag[2:]}",)
    elif (args or [kind])[0] in (int, float):
        settings["type"] = (args or [kind])[0]
    settings["show_default"] = default is not None and default is not False and default != ()
    return click.option(*(decls or (flag,)), dest or name, **{**settings, **kwargs})


def options(*made):
    """Apply click options in the order given (the first on top of --help)."""
    def apply(command):
        for each in reversed(made):
            command = each(command)
        return command
    return apply


CALIBRATION = options(
    option(CalibrationSpec, "source", "--calibration", dest="calibration"),
    option(CalibrationSpec, "samples"),
    option(CalibrationSpec, "seq_len"),
    option(CalibrationSpec, "seed"),
)
"""Which calibration set: the fields of `CalibrationSpec`, gathered into one by `calibration`."""


def loading(*without: str):
    """How checkpoints are loaded and scored, but for the fields named in `without`: the rest of `ScoringOptions`,
    which scan, prune, curves and eval share."""
    names = ("batch_size", "device", "device_map", "dtype", "store", "cache_dir", "trust_remote_code")
    return options(*(option(ScoringOptions, name) for name in names if name not in without))


def calibration(values: dict) -> CalibrationSpec:
    """The calibration spec that the CALIBRATION options in `values` give (taken out of `values`)."""
    return CalibrationSpec(values.pop("calibration"), values.pop("samples"), values.pop("seq_len"), values.pop("seed"))


def echo_frame(frame: pl.DataFrame, **settings) -> None:
    """Print a frame whole, without its shape and column types; `settings` add to or override polars' `Config`."""
    with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_rows=-1, tbl_cols=-1,
                   **{"tbl_width_chars": 220, **settings}):
        click.echo(frame)


class _OneLine(logging.Handler):
    def emit(self, record):
        click.echo(f"ckpt-trace: {record.levelname.lower()}: {record.getMessage()}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="ckpt-trace")
@click.option("-v", "--verbose", is_flag=True, help="Show the log lines of the libraries ckpt-trace runs (lm-eval's).")
def cli(verbose):
    """Which layers of a Transformer matter, and since when: score checkpoints layer by layer."""
    logging.getLogger("lm_eval").setLevel(logging.INFO if verbose else logging.ERROR)


@cli.command(short_help="Score every layer of every revision into the store.")
@click.argument("source", required=False)
@options(
    option(ScanConfig, "revisions"),
    option(ScanConfig, "branch"),
    option(ScanConfig, "metrics", type=Listed()),
    option(ScanConfig, "tokens", type=click.Choice(TOKENS)),
    option(ScanConfig, "reference"),
    option(ScanConfig, "ray"),
    option(ScanConfig, "ray_timeout"),
    option(ScanConfig, "prefetch"),
    option(ScanConfig, "load_ahead"),
    option(ScanConfig, "shard", type=Parsed(parse_shard, "I/N")),
)
@CALIBRATION
@loading()
@options(option(ScanConfig, "force"), option(ScanConfig, "keep_going"))
def scan(**values):
    """Score every layer of every revision of SOURCE and store the scores as Parquet.

    SOURCE is a Hub repo id (EleutherAI/pythia-160m), a model directory, or a directory of
    revision subdirectories (step0/, step1000/, ...). Hub revisions are streamed: the next
    downloads while one is scored, and each is deleted from the cache once stored, if
    ckpt-trace downloaded it. Without SOURCE, the built-in micro suite is built if needed
    and scanned.
    """
    from .scan.run import scan as run_scan

    config = ScanConfig(calibration=calibration(values), **values)
    summary = run_scan(config)
    if summary.height == 0:
        click.echo(f"shard {'/'.join(map(str, config.shard))} holds none of the selected revisions: nothing to do")
        return
    echo_frame(summary.drop("dtype", "calibration", "scorer"), float_precision=4, fmt_str_lengths=60)
    first = summary.row(0, named=True)
    click.echo(f"scores stored in {config.store}/scores (dtype {first['dtype']}, calibration set {first['calibration']}, "
               f"scorer {first['scorer']}; `weights` is each revision's fingerprint of weights and config)")
    failed = summary.filter(pl.col("status") == "failed")["revision"].to_list()
    if failed:  # --keep-going went on past them; the exit status still says so
        click.echo(f"ckpt-trace: {len(failed)} revision{'s' if len(failed) > 1 else ''} failed and {'are' if len(failed) > 1 else 'is'} "
                   f"recorded in {config.store}/runs: {', '.join(failed)}", err=True)
        return FAILED


@cli.command(short_help="List the revisions of a source in training order.")
@click.argument("source")
@options(option(ScanConfig, "revisions", "--select"), option(ScanConfig, "branch"),
         option(ScoringOptions, "cache_dir"))
def revisions(source, revisions, branch, cache_dir):
    """List the revisions of SOURCE (a Hub repo id or a directory) in training order.

    Weight bytes and byte-identical duplicates come from the Hub's tree listing, before
    anything is downloaded.
    """
    from .fetch.sources import revision_table

    table = revision_table(source, revisions, cache_dir, branch).with_columns(
        pl.col("commit").str.slice(0, 10), (pl.col("weight_bytes") / 1e6).round(1).alias("weight_MB")
    ).drop("weight_bytes")
    shown = table.drop("after")  # columns with nothing to say (no commits for a local suite, say) left out
    echo_frame(shown.select(c for c in shown.columns if c == "revision" or shown[c].null_count() < shown.height))
    for name, after, commit in table.filter(pl.col("after").is_not_null()).select("revision", "after", "commit").rows():
        why = "its commit matches no checkpoint" if commit else "it is no link to a checkpoint"
        click.echo(f"{name}: the release, after {after}; {why}")
    duplicates = table["duplicate_of"].drop_nulls().len()
    no_weights = table.filter(pl.col("weights").is_null()).height
    click.echo(f"{table.height} revision{'s' if table.height != 1 else ''}" + (f", {duplicates} with the same weights as an earlier one" if duplicates else "")
               + (f", {no_weights} with no weight files (a scan skips those without a config.json, and fails those with one)"
                  if no_weights else ""))


@cli.command(short_help="Drop attention, MLP or whole blocks and save the model.")
@click.argument("source")
@options(
    option(PruneConfig, "revision"),
    option(PruneConfig, "target", type=click.Choice(TARGETS)),
    option(PruneConfig, "drop"),
    option(PruneConfig, "strategy", type=click.Choice(STRATEGIES)),
    option(PruneConfig, "out"),
    option(PruneConfig, "random_seed"),
    option(PruneConfig, "push_to_hub"),
)
@CALIBRATION
@loading()
def prune(**values):
    """Drop attention layers, MLP layers, whole blocks, or both kinds jointly, and save the pruned model.

    The folder is ready to ship: a block-dropped model is a plain one of its family; an
    attention- or MLP-dropped one carries the code that builds it, which plain transformers
    runs with trust_remote_code=True. Its README.md is a model card.
    """
    from .pruning.run import manifest
    from .pruning.run import prune as run_prune

    out = run_prune(PruneConfig(calibration=calibration(values), **values))
    record = manifest(out)
    scores = {"store": "scores from the store", "computed": "scores computed"}.get(record["scores_from"], "no scores used")
    if record["scores_from"] is not None:  # the key the scores are, or would be, stored under
        scores += (f" of {record['revision']}, weights {record['weights']}, dtype {record['dtype']}, calibration set "
                   f"{record['calibration']}")
    click.echo(f"dropped {', '.join(record['order'])} ({record['strategy']}, {scores})")
    if record["previous"]:
        dropped = ", ".join(f"{kind} {layers}" for kind, layers in record["dropped"].items() if layers)
        click.echo(f"dropped in all, in the original layer numbering: {dropped}")
    click.echo(f"parameters {record['parameters_before']:,} -> {record['parameters_after']:,}; saved to {out}")
    if values["push_to_hub"]:
        click.echo(f"pushed to {values['push_to_hub']}")


@cli.command(short_help="Fine-tune a pruned model's kept modules with LoRA, and save it.")
@click.argument("pruned")
@options(
    option(HealConfig, "out"),
    option(HealConfig, "data"),
    option(CalibrationSpec, "samples"),
    option(CalibrationSpec, "seq_len"),
    option(HealConfig, "steps", type=click.IntRange(min=1)),
    option(HealConfig, "rank", type=click.IntRange(min=1)),
    option(HealConfig, "lr", type=click.FloatRange(min=0, min_open=True)),
    option(HealConfig, "seed"),
)
@loading("cache_dir")  # a pruned folder is local
def heal(**values):
    """Heal a PRUNED model folder: a short LoRA fine-tune (peft) of its kept attention and MLP layers on training text,
    the adapters merged into the saved weights.

    The healed folder loads like any pruned one, and its manifest records the healing under "healed".
    """
    from .pruning.heal import heal as run_heal

    # The blocks drawn do not depend on the LoRA seed: by default, those of the calibration set, which the held-out
    # text of `eval --perplexity` leaves out.
    spec = CalibrationSpec(samples=values.pop("samples"), seq_len=values.pop("seq_len"))
    out = run_heal(HealConfig(calibration=spec, **values))
    from .pruning.run import manifest

    healed = manifest(out)["healed"]
    click.echo(f"healed on {healed['data_source']} (set {healed['data']}): loss {healed['first_loss']:.4f} at the first "
               f"step, {healed['final_loss']:.4f} over the last tenth; saved to {out}")


@cli.command(short_help="Perplexity against the number of modules dropped.")
@click.argument("source")
@options(
    option(CurveConfig, "revision"),
    option(CurveConfig, "targets", type=Listed(), default=",".join(CurveConfig.targets), show_default=True),
    option(CurveConfig, "seeds"),
    option(CurveConfig, "heal", type=click.IntRange(min=1), metavar="STEPS"),
    option(CurveConfig, "perplexity_data"),
)
@CALIBRATION
@loading()
def curves(**values):
    """Held-out perplexity against the number of modules dropped, by similarity, last, random and oracle.

    k = 1 .. L-1 modules are dropped from one checkpoint, for each target.

    The oracle drops the modules whose removal alone costs the least loss (ablation_loss).
    Scores are taken from the store when it has them for these weights, else computed.
    """
    from .pruning.curves import run_curves, summary

    config = CurveConfig(calibration=calibration(values), **values)
    frame = run_curves(config)
    echo_frame(summary(frame), float_precision=2, tbl_width_chars=200)
    first = frame.row(0, named=True)
    click.echo(f"perplexity of {first['model']} {first['revision']} on {first['n_tokens']:,} held-out tokens (set "
               f"{first['data']}), stored in {config.store}/curves; random: geometric mean, lowest and highest over seeds")


@cli.command("eval", short_help="Benchmarks, perplexity and speed of model folders.")
@click.argument("models", nargs=-1, required=True)
@options(
    option(EvalConfig, "tasks", type=Listed("names no task; give lm-eval task names, task YAML paths, paper or "
                                            "ckpt_trace_python_mc, comma-separated")),
    option(EvalConfig, "num_fewshot", type=click.IntRange(min=0)),
    option(EvalConfig, "limit"),
    option(EvalConfig, "perplexity"),
    option(EvalConfig, "position_loss"),
    option(EvalConfig, "perplexity_data"),
    option(EvalConfig, "speed"),
)
@CALIBRATION
@loading("cache_dir")  # model directories are local
def eval_command(**values):
    """Evaluate original and pruned MODELS (model directories): lm-eval benchmarks, perplexity and speed, into the
    store."""
    from .evaluation.run import evaluate

    tasks, models = values.pop("tasks"), list(values.pop("models"))
    config = EvalConfig(models=models, tasks=list(tasks) if tasks is not None else None, calibration=calibration(values),
                        **values)
    results = evaluate(config)
    table = results.filter(~pl.col("metric").str.ends_with("_spread")).select("model", "task", "metric", "value", "stderr", "n")
    echo_frame(table, float_precision=4)
    click.echo(f"results stored in {config.store}/evals")


@cli.command(short_help="Write the report: the findings and their figures.")
@options(
    option(ScoringOptions, "store"),
    click.option("--out", default="figures", show_default=True,
                 help="Where report.md, report.html and the figures (PNG and SVG) go."),
    click.option("--model", help="Only this model (default: every model in the store)."),
    click.option("--color-scale", default="linear", show_default=True, type=click.Choice(COLOR_SCALES),
                 help="The heatmaps' colour scale (each module has its own range); log shows the late layers near 0."),
    click.option("--branch", help="Draw this side line of training (an OLMo-2 ingredient, say), with the trunk into "
                 "it, instead of the trunk: for every model that has it."),
)
def report(store, out, model, color_scale, branch):
    """Write the report: findings, heatmaps, per-layer curves, consistency, drop-set emergence, pruning curves."""
    from .analysis.report import write_report

    click.echo(f"wrote {write_report(store, out, model, color_scale, branch)} and {Path(out) / 'report.html'}")


@cli.group("micro-suite", short_help="The built-in micro checkpoint suite.")
def micro_suite():
    """The built-in micro checkpoint suite, trained on Python's own documentation."""


@micro_suite.command("build", short_help="Train the micro suite and print where it is.")
@options(option(MicroSuiteConfig, "arch"),
         click.option("--force", is_flag=True, help="Train again even if the suite is built."))
def micro_suite_build(arch, force):
    """Train the micro suite (a few minutes on a laptop CPU) and print where it is."""
    from .microsuite.suite import MicroSuiteConfig, build

    click.echo(build(MicroSuiteConfig(arch=arch), force=force))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; user errors become one line on stderr and exit status 2."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a bar per checkpoint load is noise beside ckpt-trace's own
    logger = logging.getLogger("ckpt_trace")
    if not logger.handlers:
        logger.addHandler(_OneLine())
        logger.setLevel(logging.INFO)
    try:
        result = cli.main(args=argv, prog_name="ckpt-trace", standalone_mode=False)
    except click.exceptions.Exit as stop:
        return stop.exit_code
    except click.ClickException as err:
        click.echo(f"ckpt-trace: error: {err.format_message()}", err=True)
        return INPUT_ERROR if isinstance(err, click.UsageError) else err.exit_code
    except CkptTraceError as err:
        click.echo(f"ckpt-trace: error: {one_line(err)}", err=True)
        return INPUT_ERROR
    except OSError as err:  # the disk is full, a folder is read-only, a path runs through a file
        where = f" {err.filename}" if err.filename else ""
        click.echo(f"ckpt-trace: error: cannot use{where}: {err.strerror or err}; what was stored before is unchanged",
                   err=True)
        return INPUT_ERROR
    except (click.Abort, KeyboardInterrupt):
        click.echo("ckpt-trace: interrupted", err=True)
        return INTERRUPTED
    return result if isinstance(result, int) else OK


def entry_point() -> None:
    """Console-script entry point."""
    sys.exit(main())
