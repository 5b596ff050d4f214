"""The contract every method keeps with the engine.

A method names the data view it needs (`pairing`), holds the frozen teacher if any, and returns its
loss as named terms; the engine sums them, logs each and backpropagates the sum.
Terms whose name starts with "_" are logged, not summed (e.g. how often a gate opened).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from kdcli.errors import UsageError


@dataclasses.dataclass
class NoParams:
    pass


class Method(nn.Module):
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    needs_teacher: ClassVar[bool] = False
    pairing: ClassVar[str] = "none"  # "none" | "unpaired" (class-matched partner) | "paired"
    per_task_teachers: ClassVar[bool] = False  # True: one teacher per task (dict task -> model), multi-head student
    targets: ClassVar[tuple[str, ...]] = ()  # target arrays the batches must carry besides "label" (e.g. gaze maps)
    dev_targets: ClassVar[tuple[str, ...] | None] = None  # those the dev view carries; None: the labels, if any
    uses_teacher_outputs: ClassVar[bool] = True  # False: the teacher only seeds the student (CVI's stage 1)
    # True: batches may carry unlabeled samples (label -1); supervised terms leave them out, distillation terms
    # read the teacher's answer for them. False: they never reach the method.
    unlabeled: ClassVar[bool] = False
    # dataset tasks (dataset.json "task") the method can learn; anything else is refused before training
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    # the loss terms it returns, as logged per epoch (train_<term> in metrics.jsonl); "_x" are logged, not summed
    terms: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_task(cls, task: str) -> None:
        """Refuse a dataset of a task this method does not learn, in one line, before anything is written."""
        if task not in cls.tasks:
            from kdcli.methods import METHODS

            fitting = [name for name in METHODS.names() if METHODS.get(name).needs_teacher
                       and task in METHODS.get(name).tasks]
            raise UsageError(f"--method {cls.name} learns {' or '.join(cls.tasks)} data; this dataset is {task}: "
                             f"use --method {' or '.join(fitting) or '(none fits)'}")

    @classmethod
    def check_data(cls, meta: Any) -> None:
        """Refuse a dataset the method cannot learn from (DatasetMeta), with a clear KdcliError."""

    @classmethod
    def make_student(cls, params: Any, teacher: nn.Module) -> nn.Module | None:
        """A student built from the teacher itself (e.g. its weights, partly frozen); None: the usual student."""
        return None

    def train_rows(self, train_set: Any) -> Any:
        """Indices of the training view to train on (an np.ndarray); None: all of it."""
        return None

    def make_validator(self, dev_set: Any, classes: list[str], engine: Any, log: Any) -> Any:
        """A dev validator of the method's own (engine.loop.Validate; its dev view carries `dev_targets`);
        None: the task's usual one."""
        return None

    def fit_notes(self, history: list[dict[str, Any]]) -> list[str]:
        """Lines to log once training has ended, read from the per-epoch rows (e.g. a warning about them)."""
        return []

    def __init__(self, params: Any, student: nn.Module, teacher: nn.Module | dict[str, nn.Module] | None = None):
        super().__init__()
        self.params = params
        self.student = student
        # Teachers are frozen and kept out of state_dict/optimizer/DDP: a plain attribute, not a module.
        self.__dict__["teacher"] = teacher
        for model in self.teachers():
            model.eval().requires_grad_(False)

    def teachers(self) -> list[nn.Module]:
        if self.teacher is None:
            return []
        return list(self.teacher.values()) if isinstance(self.teacher, dict) else [self.teacher]

    def teacher_to(self, device: torch.device, memory_format: torch.memory_format | None = None) -> None:
        for model in self.teachers():
            model.to(device)
            if memory_format is not None:
                model.to(memory_format=memory_format)

    def loss(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def teacher_outputs(self, batch: dict, image_key: str) -> dict[str, dict[str, torch.Tensor]]:
        """Each teacher's outputs on `batch[image_key]`: read from the teacher cache when the batch carries it,
        else computed now. Keys: "teacher" for a single teacher, the task names for per-task teachers."""
        if "cached" in batch:
            return batch["cached"]
        teachers = self.teacher if isinstance(self.teacher, dict) else {"teacher": self.teacher}
        with torch.no_grad():
            return {name: model(batch[image_key]) for name, model in teachers.items()}

    @property
    def run_student(self) -> nn.Module:
        """The student to call in a training step: its torch.compile'd version under --compile (the engine sets
        `compiled`), else the student itself. Methods that override `forward` call this too."""
        compiled = self.__dict__.get("compiled")  # not `or`: a compiled module's truth value raises
        return compiled if compiled is not None else self.student

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One training step's loss terms; the engine wraps the whole method in DDP, so every trainable part
        (student and any discriminator) is synchronised."""
        return self.loss(batch, self.run_student(batch["image"]))


def parse_params(params_cls: type, overrides: dict[str, Any], method: str) -> Any:
    """Build the method's params dataclass from defaults (the paper's) and `-p key=value` overrides."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    values = {}
    for key, raw in overrides.items():
        if key not in fields:
            known = ", ".join(f"{f.name}={f.default}" for f in fields.values()) or "none"
            raise UsageError(f"method {method!r} has no parameter {key!r}; known: {known}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                values[key] = str(raw).lower() in ("1", "true", "yes", "on") if isinstance(raw, str) else bool(raw)
            else:
                values[key] = type(default)(raw)
        except (TypeError, ValueError):
            raise UsageError(f"method {method!r}: {key}={raw!r} is not a {type(default).__name__}") from None
    return params_cls(**values)


def params_table(params_cls: type) -> list[tuple[str, Any, str]]:
    return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(params_cls)]
