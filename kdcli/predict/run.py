"""`kdcli predict CHECKPOINT INPUTS... --out FILE`: the options, the dispatch on the checkpoint's task, the table.

The table (one row per input that could be read) goes to --out as CSV, Parquet or JSON by its suffix; files made
per input (NIfTI label volumes, heat maps, Grad-CAM overlays) go to a folder beside it named after it
(preds.csv -> preds/). An input that cannot be read is one line in `failures` and the others go on; `strict`
stops at the first one instead, before anything is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcli.errors import KdcliError, UsageError
from kdcli.predict.inputs import Failure

TABLE_SUFFIXES = (".csv", ".parquet", ".json")


@dataclass
class PredictOptions:
    checkpoint: Path
    inputs: list[str]
    out: Path
    device: str = "auto"
    batch_size: int = 32
    workers: int = 0
    explain: bool = False
    strict: bool = False
    data: Path | None = None  # older checkpoints without a preprocessing record: the shards they were trained on
    threshold: float = 0.5  # multi-label: findings listed at or above this probability
    clinical: Path | None = None  # slides: the clinical sheet whose rows fusion models read


@dataclass
class PredictResult:
    out: Path
    rows: int
    failures: list[Failure] = field(default_factory=list)
    files: Path | None = None  # the folder of per-input files, when any were written
    task: str = ""


def artifacts_dir(out: Path) -> Path:
    """preds.csv -> preds/ beside it: the NIfTI volumes, heat maps and overlays of one run."""
    return out.with_suffix("")


def check_options(options: PredictOptions) -> Path:
    out = Path(options.out)
    if out.suffix.lower() not in TABLE_SUFFIXES:
        raise UsageError(f"--out {out}: name a .csv, .parquet or .json file (the table of predictions)")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as {out}/predictions.csv")
    if not options.inputs:
        raise UsageError("give at least one input: image files, folders or glob patterns")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size {options.batch_size}: at least 1")
    if options.workers < 0:
        raise UsageError(f"--workers {options.workers}: 0 (read in this process) or more")
    if not 0.0 <= options.threshold <= 1.0:
        raise UsageError(f"--threshold {options.threshold}: a probability between 0 and 1")
    return out


def predict(options: PredictOptions, log: Callable[[str], None] = print) -> PredictResult:
    from kdcli.engine.checkpoint import load_checkpoint
    from kdcli.engine.device import select_device
    from kdcli.predict.contract import checkpoint_preprocessing

    out = check_options(options)
    checkpoint = load_checkpoint(Path(options.checkpoint))
    record = checkpoint_preprocessing(checkpoint.meta, checkpoint.path, options.data)
    device = select_device(options.device)
    from kdcli.tasks import refuse_foreign_options, task_of

    task = task_of(checkpoint.meta)
    refuse_foreign_options(task, clinical=options.clinical)
    files = artifacts_dir(out)
    rows, failures = task.run("predict", checkpoint, record, options, device, files)
    for failure in failures:
        log(f"failed {failure.input}: {failure.reason}")
    if not rows:
        raise KdcliError(f"none of the {len(failures)} input(s) could be read; nothing written",
                         hint="see the lines above for why")
    write_table(out, rows)
    return PredictResult(out, len(rows), failures, files if files.is_dir() else None, task.name)


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """CSV, Parquet or JSON (a list of objects) by suffix, under a temporary name and then renamed."""
    import polars as pl

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            tmp.write_text(json.dumps(rows, indent=1) + "\n")
        else:
            frame = pl.DataFrame(rows, infer_schema_length=None)
            frame.write_parquet(tmp) if suffix == ".parquet" else frame.write_csv(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
