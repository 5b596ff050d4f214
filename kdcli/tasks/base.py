"""What a task type (the problem a dataset poses: classification, multi-label, segmentation, slide MIL) owns.

Everything that differs between task types is declared here once, per type, so that `teach`, `distill`,
`evaluate`, `explain`, `predict`, `export`, `compare`, the CLI's reports and the defaults dispatch through one
lookup instead of if-chains. The heavy parts (trainers, evaluators, explainers) are "module:attribute" strings
resolved on first use, so reading a task (for `--help`, shell completion, a report) imports no torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: options of `teach`/`distill`, `evaluate` and `predict` that only some task types take: option -> its flag. A
#: task lists the ones it takes; given to any other, they are refused in one line rather than silently ignored.
TASK_OPTIONS = {
    "embeddings": "--embeddings", "output_stride": "--output-stride",  # training
    "missing": "--missing", "missing_rate": "--missing-rate", "bag_size": "--bag-size",  # evaluation
    "clinical": "--clinical",  # prediction
}


def resolve(target: str) -> Any:
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True)
class Task:
    name: str
    #: the kind of data, as a user says it: "--bag-size applies to slide datasets"
    noun: str
    #: the method `teach` trains (a METHODS name)
    supervised_method: str
    #: the dev metric the best checkpoint is selected by, unless --set metric=... says otherwise
    selection_metric: str
    #: test metrics `compare` tabulates, in order
    report_metrics: tuple[str, ...]
    #: "module:attribute" of (cfg, store, log) -> FitResult, one per command that trains
    teach: str
    distill: str
    #: "module:attribute" of (cfg, store, dev view) -> the dev validator the best checkpoint is selected with
    validator: str
    #: "module:attribute" of (EvaluateOptions) -> report dict; (ExplainOptions) -> index path
    evaluate: str
    explain: str
    #: "module:attribute" of (checkpoint, record, PredictOptions, device, files) -> (rows, failures)
    predict: str
    #: "module:attribute" of (checkpoint, record) -> (wrapper, inputs, output names, dynamic axes), and of
    #: (checkpoint, record) -> the contract fields of this task type
    export_inputs: str
    export_contract: str
    #: "module:attribute" of (report, console) -> None: the evaluate report as a table
    print_report: str
    #: "module:attribute" of (DatasetMeta, teacher metas) -> (method, why) for `distill` without --method
    default_method: str
    #: the TASK_OPTIONS this task type takes
    options: frozenset[str] = field(default_factory=frozenset)
    #: stored target arrays every batch of this task carries besides "label" (a multi-label vector: "labels")
    label_targets: tuple[str, ...] = ()
    #: `compare` pairs the models' per-sample answers (paired bootstrap intervals); else it tabulates the
    #: evaluate report's report_metrics
    compare_per_sample: bool = False
    #: how the model's logits become probabilities: "softmax" over classes, or "sigmoid" per finding
    activation: str = "softmax"

    def run(self, what: str, *args: Any, **kwargs: Any) -> Any:
        """Call one of the task's "module:attribute" parts, e.g. task.run("evaluate", options)."""
        function: Callable[..., Any] = resolve(getattr(self, what))
        return function(*args, **kwargs)

    def refuse_options(self, given: dict[str, Any], owners: Callable[[str], list[str]]) -> None:
        """One line for a task-specific option given to a task type that does not take it."""
        from kdcli.errors import UsageError

        for option, value in given.items():
            if value not in (None, "", 0, False) and option not in self.options:
                takers = " and ".join(owners(option)) or "no"
                raise UsageError(f"{TASK_OPTIONS[option]} applies to {takers} datasets, not {self.noun} ones")
