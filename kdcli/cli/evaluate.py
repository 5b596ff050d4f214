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
    if as_json:
        typer.echo(json.dumps(report, indent=2))


def _print_metrics(report: dict, to_stderr: bool) -> None:
    from rich.table import Table

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    out = console(stderr=to_stderr)
    metrics = report["metrics"]
    if report.get("task") == "segmentation":
        _print_segmentation(report, out)
        return
    if report.get("task") == "mil":
        rows = metrics if "missing_rates" in report else {"0": metrics}
        table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']}")
        for column in ("clinical missing", "AUC", "accuracy", "macro-F1", "slides"):
            table.add_column(column, justify="right")
        for rate, m in rows.items():
            table.add_row(rate, cell(m["auc"]), cell(m["accuracy"]), cell(m["macro_f1"]), str(m["n"]))
        out.print(table)
        return
    if "mean_auroc" in metrics:
        table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']} (n={metrics['n']})")
        table.add_column("label")
        table.add_column("AUROC", justify="right")
        table.add_column("AP", justify="right")
        for name, auroc in metrics["per_label_auroc"].items():
            if auroc is not None:
                table.add_row(name, cell(auroc), cell(metrics["per_label_ap"][name]))
        table.add_row("mean", cell(metrics["mean_auroc"]), cell(metrics["mean_ap"]))
        out.print(table)
        return
    if report.get("tasks"):  # one row per label space (fundus-grading: dr, amd), each on its own rows
        table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']}")
        table.add_column("task")
        for key in ("n", "accuracy", "macro_f1", "kappa", "auc"):
            table.add_column(key, justify="right")
        for task in report["tasks"]:
            m = metrics[task]
            table.add_row(task, str(m["n"]), *[cell(m[k]) for k in ("accuracy", "macro_f1", "kappa", "auc")])
        out.print(table)
        for task in report["tasks"]:
            out.print(f"{task} per-class F1: " + ", ".join(
                f"{name} {value:.2f}" for name, value in metrics[task]["per_class_f1"].items()))
        return
    keys = ("accuracy", "macro_f1", "kappa", "auc", "ap", "macro_precision", "macro_recall")
    table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']} (n={metrics['n']})")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_row(*[cell(metrics[k]) for k in keys])
    out.print(table)
    out.print("per-class F1: " + ", ".join(f"{name} {value:.2f}" for name, value in metrics["per_class_f1"].items()))


def _print_segmentation(report: dict, out) -> None:
    from rich.table import Table

    metrics = report["metrics"]
    regions = [k[5:] for k in metrics if k.startswith("dice_") and k != "dice_mean"]
    table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']} ({report['cases']} cases)")
    table.add_column("")
    for region in regions:
        table.add_column(region.upper(), justify="right")
    table.add_column("mean", justify="right")
    table.add_row("Dice", *[f"{metrics[f'dice_{r}']:.4f}" for r in regions], f"{metrics['dice_mean']:.4f}")
    table.add_row("HD95 mm", *[f"{metrics[f'hd95_{r}']:.2f} ({metrics[f'hd95_{r}_undefined']} undef.)"
                               for r in regions], "")
    out.print(table)
    if report.get("missing"):
        sweep = Table(title="Dice with sequences missing (zero-filled)")
        sweep.add_column("present")
        for region in regions:
            sweep.add_column(region.upper(), justify="right")
        sweep.add_column("mean", justify="right")
        for row in report["missing"]:
            sweep.add_row("+".join(row["present"]), *[f"{row[f'dice_{r}']:.4f}" for r in regions],
                          f"{row['dice_mean']:.4f}")
        out.print(sweep)



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
