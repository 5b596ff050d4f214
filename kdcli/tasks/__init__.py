"""Task types, registered by name (dataset.json's and every checkpoint's "task"); see tasks/base.py.

Adding a task type is its file (a `TASK = Task(...)` and the light functions it names) + one line here."""

from __future__ import annotations

from typing import Any

from kdcli.registry import Registry

TASKS = Registry("task type")
TASKS.add("classification", "kdcli.tasks.classification:TASK", "one label per image (or per label space)")
TASKS.add("multilabel", "kdcli.tasks.multilabel:TASK", "several findings per image (chest X-rays)")
TASKS.add("segmentation", "kdcli.tasks.segmentation:TASK", "a label per voxel (BraTS tumour regions)")
TASKS.add("mil", "kdcli.tasks.mil:TASK", "one label per slide from a bag of its patches (+ a clinical record)")


def task_of(meta: Any) -> Any:
    """The Task of a dataset (DatasetMeta) or a checkpoint's meta dict; checkpoints from before the field
    existed are image classifiers."""
    name = meta.get("task") if isinstance(meta, dict) else getattr(meta, "task", None)
    return TASKS.get(name or "classification")


def takers(option: str) -> list[str]:
    """The nouns of the task types that take a task-specific option, for the refusal line."""
    return [TASKS.get(name).noun for name in TASKS.names() if option in TASKS.get(name).options]


def refuse_foreign_options(task: Any, **given: Any) -> None:
    task.refuse_options(given, takers)
