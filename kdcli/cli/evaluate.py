"""`kdcli evaluate` with its metric tables, and `kdcli compare` across models and seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kdcli.cli.common import chosen_threads, console, err, friendly_errors
from kdcli.cli.options import DataOpt, Device, Threads


@friendly_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from teach/distill.")],
    data: DataOpt = None,
    split: Annotated[str, typer.Option(help="train, dev or test.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout; the table goes to stderr.")] = False,
    predictions: Annotated[Path | None, typer.Option(help="Per-sample ids, labels, probabilities (.csv or "
                                                        ".parquet); segmentation: a folder of NIfTI volumes.")]
    = None,
    figure: Annotated[Path | None, typer.Option(help="Confusion-matrix PNG (default beside the checkpoint).")] = None,
    missing: Annotated[str | None, typer.Option(help="Segmentation: evaluate with sequences left out (zero-"
                                                     "filled): `all` non-empty subsets, or e.g. t1ce+flair,t2.")]
    = None,
    missing_rate: Annotated[str | None, typer.Option(help="Slides: fractions of test patients whose clinical "
                                                          "record is withheld, e.g. 0,0.2,0.4,0.6,0.8.")] = None,
    bag_size: Annotated[int | None, typer.Option(help="Slides: patches per evaluation bag, the slide's score the "
                                                      "mean over its bags (default: the training bag size; 0: "
                                                      "every patch in one bag).")] = None,
    device: Device = None,
    threads: Threads = None,
) -> None:
    """Metrics of a checkpoint on a split: accuracy, macro-F1, kappa, AUC, AP, per-class F1; for segmentation
    Dice and HD95 of each tumour region per case (--predictions DIR writes NIfTI label volumes)."""
    from kdcli.evaluate.run import EvaluateOptions
    from kdcli.evaluate.run import evaluate as run_evaluate

    with chosen_threads(threads):
        report = run_evaluate(EvaluateOptions(checkpoint, data, split, predictions, figure, device or "auto",
                                              missing=missing, missing_rate=missing_rate, bag_size=bag_size))
    _print_metrics(report, to_stderr=as_json)
    from kdcli.compare import report_at_chance

    if report_at_chance(report):
        err(f"warning: {checkpoint} is at chance on {split} (kappa and AUC no better than guessing): its numbers, "
            "and any difference from it, mean nothing")
    if as_json:
        typer.echo(json.dumps(report, indent=2))


def _print_metrics(report: dict, to_stderr: bool) -> None:
    """The report as its task type draws it (tasks/), on stderr when stdout carries the JSON."""
    from kdcli.tasks import TASKS

    TASKS.get(report.get("task") or "classification").run("print_report", report, console(stderr=to_stderr))


@friendly_errors
def compare(
    checkpoints: Annotated[list[str], typer.Argument(help="Checkpoints, folders of runs, or glob patterns (quoted): "
                                                          "runs differing only in the seed are one model.")],
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Shard directory to evaluate every checkpoint on "
                                                                   "(default: each one's own dataset).")] = None,
    split: Annotated[str, typer.Option(help="train, dev or test.")] = "test",
    reference: Annotated[str | None, typer.Option(help="The model the others are compared with: its label or one "
                                                       "of its checkpoints (default: the first given).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Paired-bootstrap resamples of the test samples (0: none).")] = 2000,
    csv: Annotated[Path | None, typer.Option("--csv", help="Write the table's numbers as CSV (long format).")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write the table as an HTML page.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write the whole report as JSON.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout; the table goes to stderr.")] = False,
    device: Device = None,
    threads: Threads = None,
) -> None:
    """One table of metrics across models and seeds: mean ± sd per model, seed-paired differences from the
    reference, per-sample paired intervals where both answered the same test set, and warnings where a number
    means nothing (a model at chance, a one-seed difference)."""
    from kdcli.compare import CompareOptions, check_outputs, render_table, write_outputs
    from kdcli.compare import compare as run_compare

    check_outputs(csv, html, report)
    with chosen_threads(threads):
        result = run_compare(CompareOptions(checkpoints, data, split, device or "auto", reference, bootstrap), log=err)
    write_outputs(result, csv, html, report)
    from rich.console import Console

    # wide enough for the labels in a log file (rich assumes 80 columns when the stream is not a terminal)
    stream = sys.stderr if as_json else sys.stdout
    Console(stderr=as_json, width=None if stream.isatty() else 160).print(render_table(result))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
