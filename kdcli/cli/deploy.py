"""`kdcli predict` on raw files and `kdcli export` for other runtimes."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from kdcli.cli.common import chosen_threads, err, friendly_errors
from kdcli.cli.options import Device, Threads


@friendly_errors
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from teach/distill.")],
    inputs: Annotated[list[str], typer.Argument(help="Raw files, folders or glob patterns: fundus/OCT images, "
                                                     "X-rays (PNG/JPEG/DICOM), BraTS case folders or NIfTI "
                                                     "sequences, slides (OpenSlide formats, BCNB jpg).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Table of predictions: .csv, .parquet or .json. NIfTI "
                                                          "volumes, heat maps and overlays go to the folder named "
                                                          "after it (preds.csv -> preds/).")],
    explain: Annotated[bool, typer.Option(help="Also a Grad-CAM overlay PNG per image (segmentation: the labels "
                                               "on the slice with most tumour).")] = False,
    strict: Annotated[bool, typer.Option(help="Stop at the first input that cannot be read; write nothing.")]
    = False,
    batch_size: Annotated[int, typer.Option(help="Images (slices) per forward pass.")] = 32,
    workers: Annotated[int, typer.Option(help="Processes decoding images (0: this one).")] = 0,
    threshold: Annotated[float, typer.Option(help="Multi-label: findings listed at or above this probability.")]
    = 0.5,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Only for checkpoints older than the "
                                              "preprocessing record: the shards they were trained on.")] = None,
    clinical: Annotated[Path | None, typer.Option(help="Slides: the clinical sheet (.csv/.xlsx, the layout "
                                                  "`prepare camelyon` reads), one row per slide, encoded as prepare "
                                                  "encoded the training data; fusion models need it.")] = None,
    device: Device = None,
    threads: Threads = None,
) -> None:
    """Run a checkpoint on raw files, preprocessed exactly as `prepare` did for its data (size, CLAHE/median,
    DICOM windowing, brain z-score and crop, patches at the magnification).

    An unreadable input is one `failed` line and the rest go on; the exit status is then 1 (the table holds
    the others). --strict stops at the first one with nothing written."""
    from kdcli.predict.run import PredictOptions
    from kdcli.predict.run import predict as run_predict

    with chosen_threads(threads, workers):
        result = run_predict(PredictOptions(checkpoint, list(inputs), out, device or "auto", batch_size, workers,
                                            explain, strict, data, threshold, clinical), log=err)
    where = f" (files in {result.files})" if result.files else ""
    err(f"wrote {result.rows} prediction(s) to {result.out}{where}")
    if result.failures:
        err(f"error: {len(result.failures)} input(s) failed; see the lines above")
        raise typer.Exit(1)


class ExportFormat(StrEnum):
    onnx = "onnx"
    torchscript = "torchscript"


@friendly_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from teach/distill.")],
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx (needs the onnx package: the "
                                                                          "`export` extra) or torchscript.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model file (.onnx; .pt or .ts for TorchScript); the "
                                                          "contract goes beside it as <file>.json.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Only for checkpoints older than the "
                                              "preprocessing record: the shards they were trained on.")] = None,
) -> None:
    """Export a model for other runtimes, with its preprocessing contract (input size, dtype, channels, mean/std,
    the preprocessing steps, modality, classes) as JSON beside it."""
    from kdcli.export import ExportOptions, contract_path
    from kdcli.export import export as run_export

    contract = run_export(ExportOptions(checkpoint, format.value, out, overwrite, data))
    inputs = ", ".join(f"{i['name']} {i['dtype']} [{', '.join(map(str, i['shape']))}]" for i in contract["inputs"])
    err(f"wrote {out} ({inputs} -> {', '.join(contract['outputs'])}) and {contract_path(out)}")
