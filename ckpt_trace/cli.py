"""The ckpt-trace command line: thin click commands over the library functions."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import polars as pl

from .calibration.sets import DEFAULT_SPEC, CalibrationSpec
from .errors import CkptTraceError

OK, FAILED, INPUT_ERROR, INTERRUPTED = 0, 1, 2, 130


class _OneLine(logging.Handler):
    def emit(self, record):
        click.echo(f"ckpt-trace: {record.levelname.lower()}: {record.getMessage()}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckpt-trace")
def cli():
    """Which layers of a Transformer matter, and since when: score checkpoints layer by layer."""


def model_options(command):
    """The calibration, batching, device and storage options that scan and prune share."""
    options = [
        click.option("--calibration", default=DEFAULT_SPEC, show_default=True, help="pydoc, a .txt/.jsonl(.gz/.zst) file, or hf:REPO."),
        click.option("--samples", default=64, show_default=True, help="Calibration blocks drawn from text."),
        click.option("--seq-len", type=int, help="Tokens per calibration block  [default: the model's positions, at most 512]"),
        click.option("--seed", default=0, show_default=True, help="Seed of the calibration block draw."),
        click.option("--batch-size", default=8, show_default=True, help="Sequences per forward pass."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--device-map", help="Split the model over every GPU (then the CPU) instead of --device: auto, "
                     "balanced or sequential (accelerate's placement), for a model larger than one GPU."),
        click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16."),
        click.option("--store", default="data", show_default=True, help="Store directory."),
        click.option("--cache-dir", help="Hugging Face cache for Hub sources  [default: HF_HUB_CACHE]"),
        click.option("--trust-remote-code", is_flag=True, help="Allow a checkpoint's own modeling code to run."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("source", required=False)
@click.option("--revisions", help="Selection: names, A..B step ranges, every:K, log:K, first:N, last:N (default: all).")
@click.option("--branch", help="The side line of training to select from (e.g. ingredient1), with the trunk into it.")
@click.option("--metrics", help="Comma-separated: importance, update_ratio (always), angular_distance, span_distance "
              "(the same pass), their _last variants, ablation_loss (one forward pass more per layer and module)  "
              "[default: importance,update_ratio; for the micro suite, every one but the _last variants]")
@click.option("--tokens", default="all", show_default=True, type=click.Choice(["all", "last"]),
              help="Average the one-pass metrics over every real token, or over each sequence's last (stored as "
              "their _last variants; importance and update_ratio over every token are stored too).")
@click.option("--ray", "use_ray", is_flag=True, help="Spread the revisions over the Ray cluster in RAY_ADDRESS (else a "
              "local Ray instance): one task per revision, one GPU each where the cluster has GPUs.")
@click.option("--prefetch", default=1, show_default=True,
              help="Revisions downloaded ahead of the one being scored (each takes its place in the cache).")
@click.option("--load-ahead/--no-load-ahead", default=None,
              help="Load the next revision's model while one is scored (two models in memory)  [default: on a GPU, "
              "where two of the largest revision take at most half its free memory and no --device-map splits it]")
@click.option("--shard", help="I/N: scan only the I-th of N parts of the selected revisions (every N-th in training "
              "order), so that N processes (a job array) share one store.")
@model_options
@click.option("--force", is_flag=True, help="Score again what is already stored.")
@click.option("--keep-going", is_flag=True, help="Record failing revisions and go on.")
def scan(source, revisions, calibration, samples, seq_len, seed, metrics, tokens, shard, prefetch, load_ahead, use_ray,
         **options):
    """Score every layer of every revision of SOURCE and store the scores as Parquet.

    SOURCE is a Hub repo id (EleutherAI/pythia-160m), a model directory, or a directory of
    revision subdirectories (step0/, step1000/, ...). Hub revisions are streamed: the next
    downloads while one is scored, and each is deleted from the cache once stored, if
    ckpt-trace downloaded it. Without SOURCE, the built-in micro suite is built if needed
    and scanned.
    """
    from .scan.options import ScanConfig, parse_shard
    from .scan.run import scan as run_scan

    config = ScanConfig(
        shard=parse_shard(shard) if shard is not None else None,
        prefetch=prefetch,
        load_ahead=load_ahead,
        ray=use_ray,
        source=source,
        revisions=revisions,
        metrics=tuple(m.strip() for m in metrics.split(",")) if metrics is not None else None,
        tokens=tokens,
        calibration=CalibrationSpec(calibration, samples, seq_len, seed),
        **options,
    )
    summary = run_scan(config)
    if summary.height == 0:
        click.echo(f"shard {shard} holds none of the selected revisions: nothing to do")
        return
    with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, float_precision=4, tbl_rows=-1,
                   fmt_str_lengths=60, tbl_width_chars=220, tbl_cols=-1):
        click.echo(summary.drop("dtype", "calibration", "scorer"))
    first = summary.row(0, named=True)
    click.echo(f"scores stored in {config.store}/scores (dtype {first['dtype']}, calibration set {first['calibration']}, "
               f"scorer {first['scorer']}; `weights` is each revision's weights fingerprint)")
    failed = summary.filter(pl.col("status") == "failed")["revision"].to_list()
    if failed:  # --keep-going went on past them; the exit status still says so
        click.echo(f"ckpt-trace: {len(failed)} revision{'s' if len(failed) > 1 else ''} failed and {'are' if len(failed) > 1 else 'is'} "
                   f"recorded in {config.store}/runs: {', '.join(failed)}", err=True)
        return FAILED


@cli.command()
@click.argument("source")
@click.option("--select", "selection", help="Selection: names, A..B step ranges, every:K, log:K, first:N, last:N.")
@click.option("--branch", help="The side line of training to select from (e.g. ingredient1), with the trunk into it.")
@click.option("--cache-dir", help="Hugging Face cache  [default: HF_HUB_CACHE]")
def revisions(source, selection, branch, cache_dir):
    """List the revisions of SOURCE (a Hub repo id or a directory) in training order.

    Weight bytes and byte-identical duplicates come from the Hub's tree listing, before
    anything is downloaded.
    """
    from .fetch.sources import revision_table

    table = revision_table(source, selection, cache_dir, branch).with_columns(
        pl.col("commit").str.slice(0, 10), (pl.col("weight_bytes") / 1e6).round(1).alias("weight_MB")
    ).drop("weight_bytes")
    shown = table.select(c for c in table.columns if c == "revision" or table[c].null_count() < table.height)
    with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_rows=-1, tbl_cols=-1,
                   tbl_width_chars=220):
        click.echo(shown)  # columns with nothing to say (no commits for a local suite, say) left out
    duplicates = table["duplicate_of"].drop_nulls().len()
    no_weights = table.filter(pl.col("weights").is_null()).height
    click.echo(f"{table.height} revisions" + (f", {duplicates} with the same weights as an earlier one" if duplicates else "")
               + (f", {no_weights} with no weight files (a scan skips them)" if no_weights else ""))


@cli.command()
@click.argument("source")
@click.option("--revision", help="Revision to prune  [default: the last in training order]")
@click.option("--target", required=True, type=click.Choice(["attention", "mlp", "block", "joint"]), help="What to drop.")
@click.option("--drop", required=True, type=int, help="How many to drop.")
@click.option("--strategy", default="similarity", show_default=True,
              type=click.Choice(["similarity", "iterative", "last", "random"]), help="How to choose them.")
@click.option("--out", required=True, help="Output directory (new or empty).")
@click.option("--random-seed", default=0, show_default=True, help="Seed of the random strategy.")
@model_options
def prune(source, calibration, samples, seq_len, seed, **options):
    """Drop attention layers, MLP layers, whole blocks, or both kinds jointly, and save the pruned model.

    A block-dropped model loads with plain transformers; an attention- or MLP-dropped one
    with ckpt_trace.load_pruned (and every ckpt-trace command).
    """
    from .pruning.run import PruneConfig, manifest
    from .pruning.run import prune as run_prune

    config = PruneConfig(source=source, calibration=CalibrationSpec(calibration, samples, seq_len, seed), **options)
    out = run_prune(config)
    record = manifest(out)
    scores = {"store": "scores from the store", "computed": "scores computed"}.get(record["scores_from"], "no scores used")
    click.echo(f"dropped {', '.join(record['order'])} ({record['strategy']}, {scores})")
    if record["previous"]:
        dropped = ", ".join(f"{kind} {layers}" for kind, layers in record["dropped"].items() if layers)
        click.echo(f"dropped in all, in the original layer numbering: {dropped}")
    click.echo(f"parameters {record['parameters_before']:,} -> {record['parameters_after']:,}; saved to {out}")


@cli.command()
@click.argument("source")
@click.option("--revision", help="Revision to measure  [default: the last in training order]")
@click.option("--targets", default="attention,mlp,block", show_default=True,
              help="Comma-separated: which of attention, mlp and block to draw curves for.")
@click.option("--seeds", default=5, show_default=True, help="Random drop sets per k (seeds 0 .. N-1).")
@click.option("--perplexity-data", help="Any calibration spec  [default: as eval --perplexity: a micro suite's "
              "held-out documents, else calibration text the calibration set does not take]")
@model_options
def curves(source, targets, calibration, samples, seq_len, seed, **options):
    """Pruning curves: held-out perplexity with k = 1 .. L-1 modules dropped by similarity, last, random and oracle.

    The oracle drops the modules whose removal alone costs the least loss (ablation_loss).
    Scores are taken from the store when it has them for these weights, else computed.
    """
    from .pruning.curves import CurveConfig, run_curves, summary

    config = CurveConfig(source=source, targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                         calibration=CalibrationSpec(calibration, samples, seq_len, seed), **options)
    frame = run_curves(config)
    with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_rows=-1, tbl_cols=-1,
                   float_precision=2, tbl_width_chars=200):
        click.echo(summary(frame))
    first = frame.row(0, named=True)
    click.echo(f"perplexity of {first['model']} {first['revision']} on {first['n_tokens']:,} held-out tokens (set "
               f"{first['data']}), stored in {config.store}/curves; random: geometric mean, lowest and highest over seeds")


def _task_list(tasks: str | None) -> list[str] | None:
    if tasks is None:
        return None
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise click.BadParameter(f"{tasks!r} names no task; give lm-eval task names, task YAML paths, paper or "
                                 "ckpt_trace_python_mc, comma-separated", param_hint="--tasks")
    return names


@cli.command("eval")
@click.argument("model_dirs", nargs=-1, required=True)
@click.option("--tasks", help="Comma-separated lm-eval tasks, task YAML paths, 'paper', or ckpt_trace_python_mc  "
              "[default: paper, unless only --perplexity or --speed is asked for]")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="Shots for every task  [default: each task's own; the paper's for its tasks]")
@click.option("--limit", type=int, help="At most this many items per task.")
@click.option("--perplexity", is_flag=True, help="Perplexity on held-out text (or --perplexity-data).")
@click.option("--perplexity-data", help="Any calibration spec, pre-tokenized jsonl included.")
@click.option("--speed", is_flag=True, help="Prefill latency, decode throughput, peak memory, KV-cache bytes.")
@click.option("--calibration", default=DEFAULT_SPEC, show_default=True, help="Calibration text the default perplexity blocks avoid.")
@click.option("--samples", default=64, show_default=True, help="Calibration blocks (kept out of perplexity).")
@click.option("--seq-len", type=int, help="Tokens per block  [default: the model's positions, at most 512]")
@click.option("--seed", default=0, show_default=True, help="Seed of the calibration block draw.")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16.")
@click.option("--store", default="data", show_default=True, help="Store directory.")
def eval_command(model_dirs, tasks, calibration, samples, seq_len, seed, **options):
    """Evaluate original and pruned MODEL_DIRS: lm-eval benchmarks, perplexity and speed, into the store."""
    from .evaluation.run import EvalConfig, evaluate

    config = EvalConfig(
        models=list(model_dirs), tasks=_task_list(tasks),
        calibration=CalibrationSpec(calibration, samples, seq_len, seed), **options,
    )
    results = evaluate(config)
    table = results.filter(~pl.col("metric").str.ends_with("_spread")).select("model", "task", "metric", "value", "stderr", "n")
    with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_rows=-1, float_precision=4):
        click.echo(table)
    click.echo(f"results stored in {config.store}/evals")


@cli.command()
@click.option("--store", default="data", show_default=True, help="Store directory.")
@click.option("--out", default="figures", show_default=True,
              help="Where report.md, report.html and the figures (PNG and SVG) go.")
@click.option("--model", help="Only this model (default: every model in the store).")
@click.option("--color-scale", default="linear", show_default=True, type=click.Choice(["linear", "log"]),
              help="The heatmaps' colour scale (each module has its own range); log shows the late layers near 0.")
def report(store, out, model, color_scale):
    """Write the report: findings, heatmaps, per-layer curves, consistency, drop-set emergence, pruning curves."""
    from .analysis.report import write_report

    click.echo(f"wrote {write_report(store, out, model, color_scale)} and {Path(out) / 'report.html'}")


@cli.group("micro-suite")
def micro_suite():
    """The built-in micro checkpoint suite, trained on Python's own documentation."""


@micro_suite.command("build")
@click.option("--arch", default="pythia", show_default=True, help="pythia (parallel residual) or llama (sequential).")
@click.option("--force", is_flag=True, help="Train again even if the suite is built.")
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
        click.echo(f"ckpt-trace: error: {' '.join(str(err).split())}", err=True)
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
