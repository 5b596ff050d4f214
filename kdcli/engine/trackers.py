"""`--log tensorboard|mlflow`: the per-epoch rows the engine already writes to <out>.metrics.csv/.jsonl, sent
to an experiment tracker as well. The CSV/JSONL logs stay the record; trackers are optional extras
(`pip install 'kdcli[tensorboard]'`, `'kdcli[mlflow]'`), imported only when asked for and refused in one line,
before training starts, when their package is missing.

    --log tensorboard              event files in <out>.tensorboard/ (tensorboard --logdir <that>)
    --log tensorboard=runs/oct     event files in runs/oct/
    --log mlflow                   MLflow's own default (MLFLOW_TRACKING_URI, else ./mlruns)
    --log mlflow=http://host:5000  that tracking server or a file:// store
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from kdcli.engine.checkpoint import sibling
from kdcli.errors import UsageError

KINDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # kind -> the package it needs


def parse_log(text: str) -> list[tuple[str, str]]:
    """'tensorboard,mlflow=URI' -> [(kind, where or '')], refusing unknown kinds and missing packages."""
    wanted = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        kind, _, where = item.partition("=")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise UsageError(f"--log {kind}: use {' or '.join(KINDS)} (the CSV/JSONL logs are always written)")
        if importlib.util.find_spec(KINDS[kind]) is None:
            raise UsageError(f"--log {kind} needs the {KINDS[kind]} package, which is not installed: "
                             f"pip install 'kdcli[{kind}]' (or drop --log {kind}; CSV/JSONL logs are written anyway)")
        wanted.append((kind, where.strip()))
    return wanted


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers (None, NaN and nested values are not tracked)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and k != "epoch"}


class TensorBoardTracker:
    def __init__(self, where: str, out: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.directory = Path(where) if where else sibling(out, ".tensorboard")
        self.writer = SummaryWriter(log_dir=str(self.directory))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())))

    def log(self, row: dict[str, Any], epoch: int) -> None:
        for key, value in numbers(row).items():
            self.writer.add_scalar(key.replace("_", "/", 1), value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def describe(self) -> str:
        return f"tensorboard {self.directory}"


class MLflowTracker:
    def __init__(self, where: str, out: Path, config: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        if where:
            mlflow.set_tracking_uri(where)
        self.run = mlflow.start_run(run_name=Path(out).stem)
        # MLflow caps a parameter's value at 6000 characters (500 in older servers): keep each short
        mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, row: dict[str, Any], epoch: int) -> None:
        self.mlflow.log_metrics(numbers(row), step=epoch)

    def close(self) -> None:
        self.mlflow.end_run()

    def describe(self) -> str:
        return f"mlflow run {self.run.info.run_id} at {self.mlflow.get_tracking_uri()}"


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker}


class Trackers:
    """Every tracker asked for, driven as one; none at all is the common case and costs nothing."""

    def __init__(self, text: str, out: Path, config: dict[str, Any]):
        self.items = []
        for kind, where in parse_log(text):
            try:
                self.items.append(TRACKERS[kind](where, out, config))
            except ImportError as exc:  # installed, but broken or missing a dependency of its own
                self.close()
                raise UsageError(f"--log {kind}: {KINDS[kind]} is installed but does not import ({exc}); "
                                 f"reinstall it: pip install --force-reinstall 'kdcli[{kind}]'") from None

    def log(self, row: dict[str, Any], epoch: int) -> None:
        for tracker in self.items:
            tracker.log(row, epoch)

    def close(self) -> None:
        for tracker in self.items:
            tracker.close()

    def describe(self) -> str:
        return ", ".join(tracker.describe() for tracker in self.items)
