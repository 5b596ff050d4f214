"""`kdcli bench ...`: kdcli measured against the naive way, in the same run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kdcli.cli.common import command, err, parse_list
from kdcli.cli.options import Threads

bench_app = typer.Typer(no_args_is_help=True, help="Measure kdcli against the naive way, in the same run.")


@command(bench_app, "loader")
def bench_loader(
    data: Annotated[Path, typer.Argument(help="Shard directory.")],
    modality: Annotated[str | None, typer.Option(help="Modality (default: the first).")] = None,
    split: Annotated[str, typer.Option(help="Split to read.")] = "train",
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
    workers: Annotated[list[int] | None, typer.Option(help="Worker counts to try (default 0, 1, all cores).")] = None,
    repeats: Annotated[int, typer.Option(help="Passes over the split per measurement.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Samples/s: kdcli's shard loader vs PNG files + PIL with the same augmentation, and vs plain h5py."""
    from kdcli.bench import LoaderBenchOptions
    from kdcli.bench import bench_loader as run_bench

    results = run_bench(LoaderBenchOptions(data, modality, split, batch_size, tuple(workers or ()), repeats), log=err)
    if as_json:
        typer.echo(json.dumps(results, indent=2))


@command(bench_app, "prepare")
def bench_prepare(
    raw: Annotated[Path, typer.Argument(help="Raw dataset folder.")],
    source: Annotated[str, typer.Option(help="Dataset source.")] = "multieye",
    size: Annotated[int, typer.Option(help="Stored image side.")] = 128,
    workers: Annotated[int, typer.Option(help="N for the N-worker run (0 = all cores).")] = 0,
    scale: Annotated[int, typer.Option(help="Peak memory also on phantoms this many times larger (1 = skip).")]
    = 10,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """images/s of prepare with 1 and N workers vs a naive single-process PIL loop; peak memory for 1x and 10x."""
    from kdcli.bench import PrepareBenchOptions
    from kdcli.bench import bench_prepare as run_bench

    results = run_bench(PrepareBenchOptions(raw, source, size, workers, scale), log=err)
    if as_json:
        typer.echo(json.dumps(results, indent=2))


@command(bench_app, "engine")
def bench_engine(
    data: Annotated[Path, typer.Argument(help="Shard directory.")],
    teacher: Annotated[Path | None, typer.Option(help="Also time distill --method coda with this teacher.")] = None,
    student: Annotated[str, typer.Option(help="Modality trained.")] = "fundus",
    model: Annotated[str, typer.Option(help="timm model.")] = "test_resnet",
    epochs: Annotated[int, typer.Option(help="Epochs per measurement (the first is warm-up).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    rounds: Annotated[int, typer.Option(help="Alternating engine/bare-loop rounds; medians are compared.")] = 3,
    threads: Threads = None,
    contention: Annotated[bool, typer.Option(help="Also time teach idle and with one busy process competing: "
                                                  "kdcli's threads vs torch's default.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Training samples/s: kdcli's engine vs a bare PyTorch loop; distillation vs student-only training; the
    slowdown under a competing CPU load with kdcli's thread choice and with torch's default."""
    from kdcli.bench import EngineBenchOptions
    from kdcli.bench import bench_engine as run_bench

    if epochs < 2:
        raise typer.BadParameter("at least 2 (the first is warm-up)", param_hint="--epochs")
    results = run_bench(EngineBenchOptions(data, teacher, student, model, epochs, batch_size, rounds, threads or 0,
                                           contention), log=err)
    if as_json:
        typer.echo(json.dumps(results, indent=2))



@command(bench_app, "distill")
def bench_distill(
    dataset: Annotated[str, typer.Argument(help="multieye, brats, cxr, camelyon or fundus-grading.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for runs/ (phantoms, checkpoints; reused "
                                                                 "when rerun) and the results (default: "
                                                                 "kdcli-bench/DATASET).")] = None,
    quick: Annotated[bool, typer.Option(help="CI scale: 2 sizes x 2 seeds, 5 epochs (minutes).")] = False,
    sizes: Annotated[str | None, typer.Option(help="Training sizes, comma-separated, in the generator's unit "
                                                   "(per class, cases or slides); default: the grid's.")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds 0..N-1 (0: the grid's, 5; --quick 2).")] = 0,
    epochs: Annotated[int, typer.Option(help="Epochs per model (0: the grid's).")] = 0,
    model: Annotated[str, typer.Option(help="Model for every run (default: test_resnet; brats: a plain U-Net).")]
    = "",
    image_size: Annotated[int, typer.Option(help="Stored image side (0: the grid's, 32 px; cxr 64).")] = 0,
    methods: Annotated[str | None, typer.Option(help="Methods to compare, comma-separated (default: all of the "
                                                     "dataset's).")] = None,
    independent: Annotated[bool, typer.Option(help="Also run the independent-modalities control (when the "
                                                   "generator has it).")] = True,
    label_smoothing: Annotated[float, typer.Option(help="Label-smoothing baseline's epsilon (0: no such "
                                                        "control).")] = 0.1,
    label_noise: Annotated[float | None, typer.Option(help="Share of training labels the generator flips (when it "
                                                           "has the option).")] = None,
    unlabeled: Annotated[str | None, typer.Option(help="Unlabeled-pool sizes, comma-separated (e.g. 0,200): the "
                                                       "methods that learn from unlabeled samples train again with "
                                                       "each pool, beside a self-training control (the baseline as "
                                                       "teacher); teachers and baselines never see it.")] = None,
    data_seed: Annotated[int, typer.Option(help="Seed of the phantoms.")] = 0,
    resample: Annotated[bool, typer.Option(help="Draw a new phantom per seed (the interval then covers data "
                                                "draws too).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda[:N] or mps.")] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader workers; synth and prepare processes.")] = 0,
    jobs: Annotated[int, typer.Option(help="Cells trained in parallel processes (2 on 2 cores with "
                                           "OMP_NUM_THREADS=1).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Distillation vs the same student without a teacher: paired differences over seeds and training sizes.

    Per (variant, size, seed): teacher, baseline, label-smoothing baseline and each method, on phantoms;
    with --unlabeled, each method that learns from unlabeled samples again per pool, and self-training.

    Writes results.csv, results.json and gain.png under --out; rerun to resume.

    Full grid on a GPU: kdcli bench distill multieye --sizes 8,16,32,64,128 --seeds 10 --epochs 40

    --image-size 128 --model resnet18 --device cuda --workers 4 --jobs 4"""
    from kdcli.bench_distill import DistillBenchOptions, render_table
    from kdcli.bench_distill import bench_distill as run_bench

    options = DistillBenchOptions(
        dataset, out or Path("kdcli-bench") / dataset, quick, parse_list(sizes, "--sizes", int), seeds, epochs,
        model, image_size, parse_list(methods, "--methods"), independent, label_smoothing, label_noise,
        parse_list(unlabeled, "--unlabeled", int), data_seed, resample, device, workers, jobs)
    results = run_bench(options, log=err)
    from rich.console import Console

    # wide enough for the table's columns in a log file (rich assumes 80 when stderr is not a terminal)
    Console(stderr=True, width=None if sys.stderr.isatty() else 160).print(render_table(results))
    if as_json:
        typer.echo(json.dumps(results, indent=2))
