"""`kdcli demo`: synth -> prepare -> teach -> distill -> evaluate on small phantoms, in one command."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from kdcli.cli.common import chosen_threads, console, err, friendly_errors, parse_params
from kdcli.cli.options import Threads


class Pipeline(StrEnum):
    multieye = "multieye"
    sall = "sall"
    brats = "brats"
    cxr = "cxr"
    wsi = "wsi"


@friendly_errors
def demo(
    pipeline: Annotated[Pipeline, typer.Argument(help="multieye (OCT -> fundus, CoDA), sall (DR + AMD) or brats "
                                                      "(4 sequences -> T1ce, ProtoKD), cxr (gaze, CVI) or wsi "
                                                      "(slides + clinical, bidirectional).")]
    = Pipeline.multieye,
    out: Annotated[Path, typer.Option("--out", "-o", help="Working folder (phantoms, shards, checkpoints).")]
    = Path("kdcli-demo"),
    seeds: Annotated[int, typer.Option(help="Repeat training over this many seeds (mean ± spread).")] = 1,
    epochs: Annotated[int, typer.Option(help="Epochs per model.")] = 30,
    per_class: Annotated[int, typer.Option(help="Phantom images per class and modality.")] = 60,
    cases: Annotated[int, typer.Option(help="brats: phantom cases; wsi: slides.")] = 24,
    annotated: Annotated[float, typer.Option(help="cxr: fraction of images with gaze and boxes.")] = 0.1,
    size: Annotated[int, typer.Option(help="Image side.")] = 64,
    model: Annotated[str, typer.Option(help="Model for teacher and students (default: test_resnet; brats: the "
                                            "plain-8 U-Net).")] = "",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Parameter KEY=VALUE for the "
                                                    "distillation method (coda or sall).")] = None,
    threads: Threads = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON results on stdout.")] = False,
) -> None:
    """synth -> prepare -> teach -> distill -> evaluate on small phantoms, ending with a comparison table.

    multieye: OCT teacher, fundus baseline, CoDA fundus student. sall: single-task DR and AMD graders vs SALL."""
    from kdcli.demo import DemoOptions, render_table, run_demo

    with chosen_threads(threads):  # evaluation's; each training chooses its own unless --threads is given
        results = run_demo(DemoOptions(out, seeds, epochs, per_class, size, pipeline.value, model, cases=cases,
                                       annotated=annotated, method_params=parse_params(param), threads=threads or 0),
                           log=err)
    console(stderr=as_json).print(render_table(results))
    if as_json:
        typer.echo(json.dumps(results, indent=2))
