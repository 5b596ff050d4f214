"""Segmentation: a label per voxel of a volume stored as axial slices (BraTS: WT/TC/ET tumour regions)."""

from __future__ import annotations

from typing import Any

from kdcli.tasks.base import Task

TASK = Task(
    name="segmentation", noun="segmentation", supervised_method="segmentation", selection_metric="dice_mean",
    report_metrics=("dice_wt", "dice_tc", "dice_et", "dice_mean"),
    teach="kdcli.segmentation:teach_segmentation", distill="kdcli.segmentation:distill_segmentation",
    validator="kdcli.segmentation:dev_validator",
    evaluate="kdcli.evaluate.volumes:evaluate_volumes", explain="kdcli.explain.segmentation:explain_segmentation",
    predict="kdcli.predict.volumes:predict_volumes", export_inputs="kdcli.export:segmentation_inputs",
    export_contract="kdcli.export:segmentation_contract", print_report="kdcli.tasks.segmentation:print_report",
    default_method="kdcli.tasks.segmentation:default_method", options=frozenset({"missing"}),
)


def default_method(dataset: Any, teachers: list[dict]) -> tuple[str, str]:
    return "protokd", "segmentation data"


def print_report(report: dict, out: Any) -> None:
    from rich.table import Table

    metrics = report["metrics"]
    regions = [k[5:] for k in metrics if k.startswith("dice_") and k != "dice_mean"]
    table = Table(title=f"{report['checkpoint']} — {report['modality']}, {report['split']} ({report['cases']} cases)")
    table.add_column("")
    for region in regions:
        table.add_column(region.upper(), justify="right")
    table.add_column("mean", justify="right")
    table.add_row("Dice", *[f"{metrics[f'dice_{r}']:.4f}" for r in regions], f"{metrics['dice_mean']:.4f}")
    table.add_row("HD95 mm", *[f"{metrics[f'hd95_{r}']:.2f} ({metrics[f'hd95_{r}_undefined']} undef.)"
                               for r in regions], "")
    out.print(table)
    if report.get("missing"):
        sweep = Table(title="Dice with sequences missing (zero-filled)")
        sweep.add_column("present")
        for region in regions:
            sweep.add_column(region.upper(), justify="right")
        sweep.add_column("mean", justify="right")
        for row in report["missing"]:
            sweep.add_row("+".join(row["present"]), *[f"{row[f'dice_{r}']:.4f}" for r in regions],
                          f"{row['dice_mean']:.4f}")
        out.print(sweep)
