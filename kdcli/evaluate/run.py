"""`kdcli evaluate`: a checkpoint on one split of a shard directory -> metrics, predictions, figure.

Datasets with several label spaces (fundus-grading: DR and AMD sets) are evaluated per task: each task on its
own rows, with the head that predicts it, so `metrics` (and the figures) are keyed by task."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from kdcli.engine.checkpoint import Checkpoint, load_checkpoint, sibling
from kdcli.errors import KdcliError, UsageError
from kdcli.metrics.classification import classification_metrics
from kdcli.shards.reader import ShardStore
from kdcli.storage import atomic_write, save_figure

if TYPE_CHECKING:
    import torch

    from kdcli.data.views import ModalityView
    from kdcli.models.classifier import Classifier

PREDICTION_SUFFIXES = (".parquet", ".csv", ".txt", "")


@dataclass
class EvaluateOptions:
    checkpoint: Path
    data: Path | None  # None: the dataset the checkpoint records
    split: str = "test"
    predictions: Path | None = None
    figure: Path | None = None
    device: str = "auto"
    batch_size: int = 64
    workers: int = 0
    missing: str | None = None  # segmentation: "all" or "t1ce+flair,t2", sequences zero-filled
    missing_rate: str | None = None  # slides: "0,0.2,0.4" fractions of test patients without clinical record
    bag_size: int | None = None  # slides: patches per evaluation bag (None: the training bag size; 0: whole slide)


def label_tasks(meta: dict[str, Any]) -> list[str]:
    """The label spaces a checkpoint predicts: its heads (multi-head student), its one task (`teach --task`),
    or none (a dataset with a single label space)."""
    if meta.get("tasks"):
        return list(meta["tasks"])
    return [meta["label_task"]] if meta.get("label_task") else []


def head_for(meta: dict[str, Any], task: str | None) -> str | None:
    """The model output predicting `task`: a named head of a multi-head model, else the only logits."""
    return task if meta.get("tasks") else None


def load_for_inference(checkpoint_path: Path, data: Path,
                       device_name: str = "auto") -> tuple[Checkpoint, ShardStore, Classifier, torch.device]:
    """Load the checkpoint and the data, refuse a mismatch, put the model on the device."""
    from kdcli.engine.device import select_device
    from kdcli.models.loading import load_model
    from kdcli.train_images import check_compatible

    checkpoint = load_checkpoint(Path(checkpoint_path))
    store = ShardStore(data)
    check_compatible(checkpoint, store)
    model = load_model(checkpoint)
    device = select_device(device_name)
    model.to(device)
    return checkpoint, store, model, device


def split_view(store: ShardStore, split: str, modality: str, tasks: list[str] | None = None) -> ModalityView:
    """The split's samples of `modality`, only those labelled for `tasks` when given; never empty."""
    from kdcli.data.views import ModalityView

    view = ModalityView(store, split, modality, tasks=tasks or None)
    if len(view) == 0:
        what = f"{' or '.join(tasks)} {modality}" if tasks else modality
        raise KdcliError(f"split {split!r} has no {what} samples", path=store.root,
                         hint="choose --split train, dev or test")
    return view


def predict_view(model: Classifier, view: ModalityView, device: torch.device, head: str | None = None,
                 batch_size: int = 64, workers: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    import torch

    from kdcli.data.views import collate
    from kdcli.engine.device import amp_dtype
    from kdcli.engine.loop import predict

    loader = torch.utils.data.DataLoader(view, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    return predict(model, loader, device, amp_dtype(device), head=head)


def run_model(checkpoint_path: Path, data: Path, split: str, device_name: str = "auto", batch_size: int = 64,
              workers: int = 0, task: str | None = None):
    """Load, check compatibility, predict. Returns (checkpoint, store, view, probs, labels, extras).

    On a dataset with several label spaces, `task` picks the rows and the head (default: a single-task
    checkpoint's own task; a multi-head checkpoint needs it)."""
    checkpoint, store, model, device = load_for_inference(checkpoint_path, data, device_name)
    tasks = label_tasks(checkpoint.meta)
    if task is None and len(tasks) == 1:
        task = tasks[0]
    if tasks and task not in tasks:
        raise UsageError(f"task {task!r}: the checkpoint predicts {', '.join(tasks)}")
    if task and not tasks:
        raise UsageError(f"task {task!r}: the checkpoint has a single label space")
    view = split_view(store, split, checkpoint.meta["modality"], [task] if task else None)
    probs, labels, extras = predict_view(model, view, device, head_for(checkpoint.meta, task), batch_size, workers)
    return checkpoint, store, view, probs, labels, extras


def check_predictions_path(path: Path | None) -> None:
    # Before inference: a typo in the file name should not cost a pass over the data.
    if path is not None and Path(path).suffix not in PREDICTION_SUFFIXES:
        raise UsageError(f"--predictions {path}: use a .csv or .parquet name")


def evaluate(options: EvaluateOptions) -> dict[str, Any]:
    if options.split not in ("train", "dev", "test"):
        raise UsageError(f"--split {options.split!r}: use train, dev or test")
    meta = load_checkpoint(Path(options.checkpoint)).meta
    if options.data is None:  # the dataset it was trained on, if still there unchanged
        from kdcli.defaults import recorded_dataset

        options.data = recorded_dataset(meta, Path(options.checkpoint))
    from kdcli.tasks import refuse_foreign_options, task_of

    task = task_of(meta)
    refuse_foreign_options(task, missing=options.missing, missing_rate=options.missing_rate,
                           bag_size=options.bag_size is not None)  # 0 is a size: every patch in one bag
    return {"task": task.name, **task.run("evaluate", options)}


def _image_report(options: EvaluateOptions) -> tuple[Checkpoint, ShardStore, Classifier, torch.device, dict]:
    """The checkpoint, its data, the model on its device, and the report's header, for image checkpoints."""
    check_predictions_path(options.predictions)
    checkpoint, store, model, device = load_for_inference(options.checkpoint, options.data, options.device)
    store.verify(options.split)  # the shards scored are re-hashed: the hash compared below is of these bytes
    meta = checkpoint.meta
    report = {
        "checkpoint": str(options.checkpoint), "data": str(options.data), "split": options.split,
        "modality": meta["modality"], "kind": meta["kind"], "method": meta["method"],
        "data_hash_matches": meta["data"]["content_hash"] == store.meta.content_hash,
    }
    return checkpoint, store, model, device, report


def evaluate_images(options: EvaluateOptions) -> dict[str, Any]:
    """A classifier: metrics, a confusion figure, predictions; per label space where the data has several."""
    checkpoint, store, model, device, report = _image_report(options)
    meta = checkpoint.meta
    tasks = label_tasks(meta)
    if tasks:
        return {**report, "tasks": tasks, **evaluate_tasks(options, meta, store, model, device, tasks)}
    view = split_view(store, options.split, meta["modality"])
    probs, labels, _ = predict_view(model, view, device, None, options.batch_size, options.workers)
    metrics = classification_metrics(labels, probs, store.classes)
    figure = options.figure or sibling(Path(options.checkpoint), f".{options.split}.confusion.png")
    plot_confusion(np.array(metrics["confusion_matrix"]), store.classes, figure,
                   f"{Path(options.checkpoint).name} on {options.split}", figure_hint(options))
    if options.predictions:
        write_predictions(options.predictions, view.ids, labels, probs, store.classes)
    return {**report, "metrics": metrics, "figure": str(figure),
            "predictions": str(options.predictions) if options.predictions else None}


def evaluate_multilabel_images(options: EvaluateOptions) -> dict[str, Any]:
    """A multi-label classifier: per-label AUROC/AP."""
    checkpoint, store, model, device, report = _image_report(options)
    return {**report, **evaluate_multilabel(options, store, model, device, checkpoint.meta["modality"])}


def evaluate_multilabel(options: EvaluateOptions, store: ShardStore, model: Classifier,
                        device: torch.device, modality: str) -> dict[str, Any]:
    """Per-label AUROC/AP and their means; --predictions: one probability column per label."""
    import torch

    from kdcli.data.views import ModalityView, collate
    from kdcli.engine.device import amp_dtype
    from kdcli.engine.loop import predict
    from kdcli.metrics.classification import multilabel_metrics

    view = ModalityView(store, options.split, modality, targets=("labels",))  # the checkpoint's: a table has several
    if len(view) == 0:
        raise KdcliError(f"split {options.split!r} is empty", path=store.root)
    loader = torch.utils.data.DataLoader(view, batch_size=options.batch_size, num_workers=options.workers,
                                         collate_fn=collate)
    probs, targets, _ = predict(model, loader, device, amp_dtype(device), multilabel=True)
    metrics = multilabel_metrics(targets, probs, store.classes)
    if options.predictions:
        frame = pl.DataFrame({"id": view.ids, **{f"label_{c}": targets[:, i].astype(int)
                                                 for i, c in enumerate(store.classes)},
                              **{f"prob_{c}": probs[:, i] for i, c in enumerate(store.classes)}})
        write_frame(Path(options.predictions), frame)
    return {"metrics": metrics, "predictions": str(options.predictions) if options.predictions else None}


def evaluate_tasks(options: EvaluateOptions, meta: dict[str, Any], store: ShardStore, model: Classifier,
                   device: torch.device, tasks: list[str]) -> dict[str, Any]:
    """Each task on its own rows with its own head: metrics, figure and prediction rows keyed by task."""
    metrics, figures, frames = {}, {}, []
    width = max(len(store.meta.classes_for(task)) for task in tasks)
    for task in tasks:
        view = split_view(store, options.split, meta["modality"], [task])
        probs, labels, _ = predict_view(model, view, device, head_for(meta, task), options.batch_size,
                                        options.workers)
        classes, ordinal = store.meta.classes_for(task), bool(store.meta.tasks[task].get("ordinal"))
        metrics[task] = classification_metrics(labels, probs, classes, ordinal=ordinal)
        figure = (sibling(Path(options.figure), f".{task}.png") if options.figure
                  else sibling(Path(options.checkpoint), f".{options.split}.{task}.confusion.png"))
        plot_confusion(np.array(metrics[task]["confusion_matrix"]), classes, figure,
                       f"{Path(options.checkpoint).name} on {options.split}, {task}", figure_hint(options))
        figures[task] = str(figure)
        frames.append(prediction_frame(view.ids, labels, probs, classes, [f"prob_{i}" for i in range(len(classes))])
                      .with_columns(pl.lit(task).alias("task")))
    if options.predictions:
        # One file for all tasks: prob_0..prob_{K-1} for the widest task, null where a task has fewer classes.
        columns = ["id", "task", "label", "label_name", "prediction", "prediction_name",
                   *(f"prob_{i}" for i in range(width))]
        write_frame(options.predictions, pl.concat(frames, how="diagonal").select(columns))
    return {"metrics": metrics, "figure": figures,
            "predictions": str(options.predictions) if options.predictions else None}


def prediction_frame(ids: list[str], labels: np.ndarray, probs: np.ndarray, classes: list[str],
                     prob_columns: list[str]) -> pl.DataFrame:
    predicted = probs.argmax(1)
    return pl.DataFrame({
        "id": ids, "label": labels.astype(np.int64), "label_name": [classes[i] for i in labels],
        "prediction": predicted.astype(np.int64), "prediction_name": [classes[i] for i in predicted],
        **{name: probs[:, i].astype(np.float64) for i, name in enumerate(prob_columns)},
    })


def write_predictions(path: Path, ids: list[str], labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    write_frame(path, prediction_frame(ids, labels, probs, classes, [f"prob_{name}" for name in classes]))


def write_frame(path: Path, frame: pl.DataFrame) -> None:
    path = Path(path)
    check_predictions_path(path)
    atomic_write(path, frame.write_parquet if path.suffix == ".parquet" else frame.write_csv)


def figure_hint(options: EvaluateOptions) -> str | None:
    """What to do when the figure cannot be written: beside a checkpoint in a read-only folder, write it elsewhere."""
    if options.figure is None:
        return "the figure goes beside the checkpoint by default; pass --figure PATH to write it elsewhere"
    return None


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str, hint: str | None = None) -> None:
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
    save_figure(fig, path, hint)
