"""`kdcli evaluate`: a checkpoint on one split of a shard directory -> metrics, predictions, figure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kdcli.engine.checkpoint import load_checkpoint, sibling
from kdcli.errors import KdcliError, UsageError
from kdcli.evaluate.metrics import classification_metrics
from kdcli.shards.reader import ShardStore


@dataclass
class EvaluateOptions:
    checkpoint: Path
    data: Path
    split: str = "test"
    predictions: Path | None = None
    figure: Path | None = None
    device: str = "auto"
    batch_size: int = 64
    workers: int = 0


def run_model(checkpoint_path: Path, data: Path, split: str, device_name: str = "auto", batch_size: int = 64,
              workers: int = 0):
    """Load, check compatibility, predict. Returns (checkpoint, store, view, probs, labels, extras)."""
    import torch

    from kdcli.data.views import ModalityView
    from kdcli.engine.device import amp_dtype, select_device
    from kdcli.engine.loop import predict
    from kdcli.train import check_compatible, load_model

    checkpoint = load_checkpoint(Path(checkpoint_path))
    store = ShardStore(data)
    check_compatible(checkpoint, store)
    view = ModalityView(store, split, checkpoint.meta["modality"])
    if len(view) == 0:
        raise KdcliError(f"split {split!r} has no {checkpoint.meta['modality']} samples", path=data,
                         hint="choose --split train, dev or test")
    model = load_model(checkpoint)
    device = select_device(device_name)
    model.to(device)
    loader = torch.utils.data.DataLoader(view, batch_size=batch_size, num_workers=workers)
    probs, labels, extras = predict(model, loader, device, amp_dtype(device))
    return checkpoint, store, view, probs, labels, extras


def evaluate(options: EvaluateOptions) -> dict[str, Any]:
    if options.split not in ("train", "dev", "test"):
        raise UsageError(f"--split {options.split!r}: use train, dev or test")
    checkpoint, store, view, probs, labels, _ = run_model(
        options.checkpoint, options.data, options.split, options.device, options.batch_size, options.workers)
    metrics = classification_metrics(labels, probs, store.classes)
    figure = options.figure or sibling(Path(options.checkpoint), f".{options.split}.confusion.png")
    plot_confusion(np.array(metrics["confusion_matrix"]), store.classes, figure,
                   f"{Path(options.checkpoint).name} on {options.split}")
    if options.predictions:
        write_predictions(options.predictions, view.ids, labels, probs, store.classes)
    meta = checkpoint.meta
    return {
        "checkpoint": str(options.checkpoint), "data": str(options.data), "split": options.split,
        "modality": meta["modality"], "kind": meta["kind"], "method": meta["method"],
        "data_hash_matches": meta["data"]["content_hash"] == store.meta.content_hash,
        "metrics": metrics, "figure": str(figure),
        "predictions": str(options.predictions) if options.predictions else None,
    }


def write_predictions(path: Path, ids: list[str], labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    path = Path(path)
    frame = pl.DataFrame({
        "id": ids, "label": labels.astype(np.int64), "label_name": [classes[i] for i in labels],
        "prediction": probs.argmax(1).astype(np.int64), "prediction_name": [classes[i] for i in probs.argmax(1)],
        **{f"prob_{name}": probs[:, i].astype(np.float64) for i, name in enumerate(classes)},
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        frame.write_parquet(tmp)
    elif path.suffix in (".csv", ".txt", ""):
        frame.write_csv(tmp)
    else:
        raise UsageError(f"--predictions {path}: use a .csv or .parquet name")
    tmp.replace(path)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.0 + 0.55 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > matrix.max() / 2 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
