"""The contract every distillation method keeps, for each registered method x each task it declares: one
`distill` step on the task's smallest phantom logs finite terms, each one the method declares; the teacher comes
out as it went in (weights and buffers, no gradients, its checkpoint file untouched); the student's weights moved.

Parametrized over the METHODS registry, so a new METHODS line is tested without writing a test; a task with no
phantom recipe below fails with a line saying to add one. Methods that need no teacher (what `teach` runs) are
covered by the teach tests. Slow: each case trains a teacher on a fresh phantom (cached per recipe); the
registration checks are fast."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import kdcli_run

from kdcli.methods import METHODS
from kdcli.methods.base import Method, parse_params

TINY = ["--epochs", "1", "--workers", "0", "--lr", "3e-3"]


@dataclass
class Setup:
    shards: Path
    teachers: list[Path]
    distill: list[str]  # student modality and model options


def multieye(root: Path) -> Setup:
    """Paired fundus + OCT eyes (paired and unpaired methods both read them); the OCT teacher has the dataset's
    default concept head, which CoDA needs and logit methods ignore."""
    kdcli_run("synth", "multieye", root / "raw", "--paired", "--per-class", "3", "--size", "16")
    kdcli_run("prepare", "multieye", root / "raw", "--out", root / "shards", "--size", "16")
    fast = [*TINY, "--batch-size", "8", "--model", "test_resnet"]
    kdcli_run("teach", "--data", root / "shards", "--modality", "oct", "--out", root / "oct.pt", *fast)
    return Setup(root / "shards", [root / "oct.pt"], ["--student", "fundus", *fast])


def grading(root: Path) -> Setup:
    """Two graded fundus sets (DR, AMD), one single-task teacher each: for methods with per-task teachers."""
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.synth.fundus_grading import synth_fundus_grading

    sets = synth_fundus_grading(root / "raw", per_class=3, amd_per_class=3, size=32, seed=0)["sets"]
    for task in ("dr", "amd"):
        labels = sets[task]["labels"]
        prepare(PrepareOptions(source="fundus-grading", raw=Path(labels).parent, out=root / "shards", size=32,
                               append=True, source_options={"labels": labels, "task": task}))
    fast = [*TINY, "--batch-size", "8", "--model", "test_resnet"]
    for task in ("dr", "amd"):
        kdcli_run("teach", "--data", root / "shards", "--task", task, "--out", root / f"{task}.pt", *fast)
    return Setup(root / "shards", [root / "dr.pt", root / "amd.pt"], fast)


def cxr(root: Path) -> Setup:
    """Chest X-rays with gaze maps and boxes; the teacher is a multi-label stage-1 model."""
    kdcli_run("synth", "cxr", root / "raw", "--per-class", "3", "--size", "64", "--annotated-fraction", "0.5")
    kdcli_run("prepare", "cxr", root / "raw", "--out", root / "shards", "--size", "32", "--gaze",
              root / "raw" / "egd-cxr", "--boxes", root / "raw" / "BBox_List_2017.csv", "--egd-sigma", "10")
    fast = [*TINY, "--batch-size", "8", "--model", "test_resnet"]
    kdcli_run("teach", "--data", root / "shards", "--modality", "xray", "--head", "linear", "--out",
              root / "xray.pt", *fast)
    return Setup(root / "shards", [root / "xray.pt"], ["--student", "xray", *fast])


def brats(root: Path) -> Setup:
    """MRI volumes; the teacher reads all four sequences, the student one."""
    kdcli_run("synth", "brats", root / "raw", "--cases", "6", "--size", "32")
    kdcli_run("prepare", "brats", root / "raw", "--out", root / "shards", "--size", "32")
    fast = [*TINY, "--batch-size", "8", "--model", "plain-4-2"]
    kdcli_run("teach", "--data", root / "shards", "--modality", "t1,t1ce,t2,flair", "--out", root / "all.pt", *fast)
    return Setup(root / "shards", [root / "all.pt"], ["--student", "t1ce", *fast])


def camelyon(root: Path) -> Setup:
    """Slides with clinical records; the teacher reads both, the student the slides."""
    kdcli_run("synth", "camelyon", root / "raw", "--slides", "8", "--size", "1024")
    kdcli_run("prepare", "camelyon", root / "raw", "--out", root / "shards", "--patch-size", "128",
              "--max-patches", "4", "--size", "32")
    fast = [*TINY, "--batch-size", "4", "--model", "test_resnet"]
    kdcli_run("teach", "--data", root / "shards", "--modality", "wsi,clinical", "--out", root / "mm.pt", *fast)
    return Setup(root / "shards", [root / "mm.pt"], ["--student", "wsi", *fast])


RECIPES: dict[str, Callable[[Path], Setup]] = {"classification": multieye, "multilabel": cxr,
                                               "segmentation": brats, "mil": camelyon}


def recipe_name(method_cls: type[Method], task: str) -> str:
    if method_cls.per_task_teachers:
        return "per_task_teachers"
    assert task in RECIPES, f"no phantom recipe for task {task!r}: add one to RECIPES in {Path(__file__).name}"
    return task


def distillation_cases() -> list:
    return [pytest.param(name, task, id=f"{name}-{task}") for name in METHODS.names()
            if METHODS.get(name).needs_teacher for task in METHODS.get(name).tasks]


@pytest.fixture(scope="module")
def setups(tmp_path_factory) -> Callable[[str], Setup]:
    """Each recipe built once, on first use."""
    built: dict[str, Setup] = {}

    def get(name: str) -> Setup:
        if name not in built:
            make = grading if name == "per_task_teachers" else RECIPES[name]
            built[name] = make(tmp_path_factory.mktemp(name))
        return built[name]

    return get


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights and buffers (a teacher left in train mode would move its batch-norm statistics)."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights an optimiser may move (not buffers: batch-norm statistics move without any step)."""
    return {key: value.detach().clone() for key, value in model.named_parameters() if value.requires_grad}


@pytest.fixture
def built_methods(monkeypatch) -> list[tuple[Method, dict, list[dict]]]:
    """Every Method built while the test runs, with its student's and teachers' weights as they were built."""
    built = []
    original = Method.__init__

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append((self, trainable(self.student), [snapshot(model) for model in self.teachers()]))

    monkeypatch.setattr(Method, "__init__", recording_init)
    return built


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method_name", METHODS.names())
def test_method_is_registered_under_its_own_name_with_default_params_and_terms(method_name):
    method_cls = METHODS.get(method_name)
    assert method_cls.name == method_name  # error messages (check_task) say `--method {name}`
    assert method_cls.tasks and method_cls.terms
    parse_params(method_cls.Params, {}, method_name)  # the paper's defaults build without any -p


@pytest.mark.slow
@pytest.mark.parametrize(("method_name", "task"), distillation_cases())
def test_one_step_logs_finite_terms_keeps_the_teacher_and_moves_the_student(method_name, task, setups,
                                                                            built_methods, tmp_path):
    method_cls = METHODS.get(method_name)
    setup = setups(recipe_name(method_cls, task))
    digests = [file_digest(path) for path in setup.teachers]
    teacher_args = [arg for path in setup.teachers for arg in ("--teacher", path)]
    batch = int(setup.distill[setup.distill.index("--batch-size") + 1])
    built_methods.clear()  # the recipe's teach runs built methods too
    kdcli_run("distill", "--data", setup.shards, *teacher_args, "--method", method_name, "--out", tmp_path / "s.pt",
              "--set", f"samples_per_epoch={batch}", "--set", "weight_decay=0", *setup.distill)
    # one batch: one optimisation step; no weight decay, which would move the weights without any gradient

    [(method, student_before, teachers_before)] = [entry for entry in built_methods
                                                   if isinstance(entry[0], method_cls)]
    [row] = [json.loads(line) for line in (tmp_path / "s.metrics.jsonl").read_text().splitlines()]
    logged = {key: value for key, value in row.items() if key.startswith("train_")}
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in logged.values()), logged
    # what `kdcli methods` lists as its terms is what it logs (some only on some batches, e.g. CVI's attention)
    declared = {f"train_{term.lstrip('_')}" for term in method_cls.terms}
    terms = set(logged) - {"train_loss", "train_samples_per_s"}
    assert terms and terms <= declared, f"{method_name} logged {sorted(terms)}, declares {sorted(declared)}"

    for model, before in zip(method.teachers(), teachers_before, strict=True):
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())
        after = model.state_dict()
        assert all(torch.equal(before[key], after[key]) for key in before), f"{method_name} changed its teacher"
    assert [file_digest(path) for path in setup.teachers] == digests
    after = dict(method.student.named_parameters())
    moved = [key for key, value in student_before.items() if not torch.equal(value, after[key])]
    assert moved, f"{method_name}: one step left every student weight as it was built"
