"""Classification: one label per image, or one per label space (fundus grading: DR and AMD grades)."""

from __future__ import annotations

from typing import Any

from kdcli.tasks.base import Task

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "kappa", "auc")

TASK = Task(
    name="classification", noun="image classification", supervised_method="supervised",
    selection_metric="macro_f1", report_metrics=CLASSIFICATION_METRICS,
    teach="kdcli.train_images:teach_images", distill="kdcli.train_images:distill_images",
    validator="kdcli.tasks.classification:validator",
    evaluate="kdcli.evaluate.run:evaluate_images", explain="kdcli.explain.run:explain_images",
    predict="kdcli.predict.images:predict_images", export_inputs="kdcli.export:image_inputs",
    export_contract="kdcli.export:image_contract", print_report="kdcli.tasks.classification:print_report",
    default_method="kdcli.tasks.classification:default_method", options=frozenset({"output_stride"}),
    compare_per_sample=True,
)


def validator(cfg: Any, store: Any, dev_set: Any) -> Any:
    from kdcli.engine.loop import classification_validator

    ordinal = bool(cfg.task and store.meta.tasks[cfg.task].get("ordinal"))
    return classification_validator(dev_set, store.meta.classes_for(cfg.task or None), cfg.engine, ordinal=ordinal)


def default_method(dataset: Any, teachers: list[dict]) -> tuple[str, str]:
    if len(teachers) > 1 or dataset.tasks:
        return "sall", "teachers of different label spaces"
    if dataset.pairing == "paired":
        return "kd", "paired images"
    return "coda", "unpaired modalities"


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_report(report: dict, out: Any) -> None:
    from rich.table import Table

    metrics = report["metrics"]
    if report.get("tasks"):  # one row per label space (fundus-grading: dr, amd), each on its own rows
        table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']}")
        table.add_column("task")
        for key in ("n", "accuracy", "macro_f1", "kappa", "auc"):
            table.add_column(key, justify="right")
        for space in report["tasks"]:
            m = metrics[space]
            table.add_row(space, str(m["n"]), *[cell(m[k]) for k in ("accuracy", "macro_f1", "kappa", "auc")])
        out.print(table)
        for space in report["tasks"]:
            out.print(f"{space} per-class F1: " + ", ".join(
                f"{name} {value:.2f}" for name, value in metrics[space]["per_class_f1"].items()))
        return
    keys = ("accuracy", "macro_f1", "kappa", "auc", "ap", "macro_precision", "macro_recall")
    table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']} (n={metrics['n']})")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_row(*[cell(metrics[k]) for k in keys])
    out.print(table)
    out.print("per-class F1: " + ", ".join(f"{name} {value:.2f}" for name, value in metrics["per_class_f1"].items()))
