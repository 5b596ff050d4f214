"""Slide MIL: one label per whole-slide image from an attention-pooled bag of its tissue patches, with a
clinical record beside it that may be missing at test time (Camelyon/BCNB)."""

from __future__ import annotations

from typing import Any

from kdcli.tasks.base import Task
from kdcli.tasks.classification import cell

TASK = Task(
    name="mil", noun="slide", supervised_method="mil", selection_metric="auc",
    report_metrics=("auc", "accuracy", "macro_f1"),
    teach="kdcli.mil:teach_mil", distill="kdcli.mil:distill_mil",
    validator="kdcli.mil:dev_validator",
    evaluate="kdcli.evaluate.slides:evaluate_slide_checkpoint", explain="kdcli.explain.slides:explain_slides",
    predict="kdcli.predict.slides:predict_slides", export_inputs="kdcli.export:slide_inputs",
    export_contract="kdcli.export:slide_contract", print_report="kdcli.tasks.mil:print_report",
    default_method="kdcli.tasks.mil:default_method",
    options=frozenset({"embeddings", "missing_rate", "bag_size", "clinical"}),
)


def default_method(dataset: Any, teachers: list[dict]) -> tuple[str, str]:
    return "bidirectional", "slides with clinical records"


def print_report(report: dict, out: Any) -> None:
    from rich.table import Table

    metrics = report["metrics"]
    rows = metrics if "missing_rates" in report else {"0": metrics}
    table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']}")
    for column in ("clinical missing", "AUC", "accuracy", "macro-F1", "slides"):
        table.add_column(column, justify="right")
    for rate, m in rows.items():
        table.add_row(rate, cell(m["auc"]), cell(m["accuracy"]), cell(m["macro_f1"]), str(m["n"]))
    out.print(table)
