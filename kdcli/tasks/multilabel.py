"""Multi-label classification: several findings per image, each a sigmoid (chest X-rays, ChestX-ray14 labels)."""

from __future__ import annotations

from typing import Any

from kdcli.errors import UsageError
from kdcli.tasks.base import Task
from kdcli.tasks.classification import cell

TASK = Task(
    name="multilabel", noun="multi-label", supervised_method="multilabel", selection_metric="mean_auroc",
    report_metrics=("mean_auroc", "mean_ap"),
    teach="kdcli.train_images:teach_images", distill="kdcli.train_images:distill_images",
    validator="kdcli.tasks.multilabel:validator",
    evaluate="kdcli.evaluate.run:evaluate_multilabel_images", explain="kdcli.explain.gaze:explain_multilabel",
    predict="kdcli.predict.images:predict_images", export_inputs="kdcli.export:image_inputs",
    export_contract="kdcli.export:image_contract", print_report="kdcli.tasks.multilabel:print_report",
    default_method="kdcli.tasks.multilabel:default_method", options=frozenset({"output_stride"}),
    label_targets=("labels",), activation="sigmoid",
)


def validator(cfg: Any, store: Any, dev_set: Any) -> Any:
    from kdcli.engine.loop import multilabel_validator

    return multilabel_validator(dev_set, store.meta.classes, cfg.engine)


def default_method(dataset: Any, teachers: list[dict]) -> tuple[str, str]:
    if "gaze" in dataset.targets or "boxes" in dataset.targets:
        return "cvi", "chest X-rays with gaze or box annotations"
    raise UsageError("--method is required: no default fits multi-label data without gaze or boxes")


def print_report(report: dict, out: Any) -> None:
    from rich.table import Table

    metrics = report["metrics"]
    table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']} (n={metrics['n']})")
    table.add_column("label")
    table.add_column("AUROC", justify="right")
    table.add_column("AP", justify="right")
    for name, auroc in metrics["per_label_auroc"].items():
        if auroc is not None:
            table.add_row(name, cell(auroc), cell(metrics["per_label_ap"][name]))
    table.add_row("mean", cell(metrics["mean_auroc"]), cell(metrics["mean_ap"]))
    out.print(table)
