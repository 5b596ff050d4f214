"""The task-type registry (kdcli/tasks/): every part a task names resolves, reading a task imports no torch,
and no module outside tasks/ dispatches on a task type's name — a new TASKS line is checked by these tests."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import kdcli
from kdcli.tasks import TASKS, takers
from kdcli.tasks.base import TASK_OPTIONS, Task

PARTS = [f.name for f in dataclasses.fields(Task) if f.type == "str" and f.name not in ("name", "noun",
                                                                                         "supervised_method",
                                                                                         "selection_metric",
                                                                                         "activation")]


@pytest.mark.parametrize("name", TASKS.names())
def test_every_part_of_a_task_resolves_to_a_function(name):
    from kdcli.methods import METHODS
    from kdcli.tasks.base import resolve

    task = TASKS.get(name)
    assert task.name == name
    for part in PARTS:
        assert callable(resolve(getattr(task, part))), f"{name}.{part} = {getattr(task, part)}"
    assert task.supervised_method in METHODS
    assert name in METHODS.get(task.supervised_method).tasks  # teach's method learns this task type
    assert set(task.options) <= set(TASK_OPTIONS)
    assert task.activation in ("softmax", "sigmoid")


@pytest.mark.parametrize("name", TASKS.names())
def test_some_distillation_method_learns_each_task_type(name):
    from kdcli.methods import METHODS

    assert [m for m in METHODS.names() if METHODS.get(m).needs_teacher and name in METHODS.get(m).tasks]


def test_reading_every_task_imports_no_torch():
    code = ("import sys; from kdcli.tasks import TASKS; [TASKS.get(n) for n in TASKS.names()]; "
            "import kdcli.defaults; print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_task_option_names_the_task_types_that_take_it():
    assert takers("bag_size") == ["slide"]
    with pytest.raises(kdcli.errors.UsageError, match="--bag-size applies to slide datasets, not segmentation ones"):
        TASKS.get("segmentation").refuse_options({"bag_size": True}, takers)
    TASKS.get("mil").refuse_options({"bag_size": True}, takers)  # its own option: no error


def _task_name_comparisons(path: Path, names: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and "arch" not in ast.unparse(node):  # architectures: another namespace
            for operand in (node.left, *node.comparators):
                items = operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
                if any(isinstance(c, ast.Constant) and c.value in names for c in items):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Dict):  # a lookup table keyed by task types is dispatch too
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
            if len(keys) > 1:
                found.append(f"{path.name}:{node.lineno}: a dict keyed by {keys}")
    return found


def test_no_module_outside_tasks_dispatches_on_a_task_type():
    """`task == "segmentation"` and the like belong in tasks/: elsewhere, ask the Task (task_of(meta))."""
    root = Path(kdcli.__file__).parent
    names = set(TASKS.names())
    found = [hit for path in sorted(root.rglob("*.py")) if path.parent.name != "tasks"
             for hit in _task_name_comparisons(path, names)]
    assert found == []


def test_the_dispatch_check_sees_a_planted_comparison(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('def f(meta):\n    return meta.get("task") == "segmentation"\n')
    assert _task_name_comparisons(planted, set(TASKS.names())) == [
        "planted.py:2: meta.get('task') == 'segmentation'"]
