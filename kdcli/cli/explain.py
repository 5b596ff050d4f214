"""`kdcli explain`: Grad-CAM overlays and concepts of a checkpoint as PNGs and a page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdcli.cli.common import chosen_threads, err, friendly_errors
from kdcli.cli.options import DataOpt, Device, Threads


@friendly_errors
def explain(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from teach/distill.")],
    data: DataOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for PNGs and index.html.")] = Path("explain"),
    split: Annotated[str, typer.Option(help="Split to draw images from.")] = "test",
    count: Annotated[int, typer.Option("--count", "-n", help="Images to explain.")] = 12,
    top_concepts: Annotated[int, typer.Option(help="Concepts listed per image (concept models).")] = 5,
    device: Device = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier explain report at --out (its page, JSON and "
                                                 "images; your other files there stay).")] = False,
    threads: Threads = None,
) -> None:
    """Grad-CAM overlays (and top concepts for concept models) as PNGs plus an index.html with the training
    curves and, for classifiers, the split's metrics and confusion matrix; warns when a result means nothing."""
    from kdcli.explain.common import ExplainOptions
    from kdcli.explain.run import explain as run_explain

    with chosen_threads(threads):
        index = run_explain(ExplainOptions(checkpoint, data, out, split, count, top_concepts, device or "auto",
                                           overwrite=overwrite), log=err)
    err(f"wrote {index}")
