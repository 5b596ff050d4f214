"""The commands as users write them in lab scripts: every option that can be known is left out."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import TINY_MODEL, kdcli_run
from test_prepare_multieye import assert_one_line_error

from kdcli.engine.checkpoint import load_checkpoint

QUICK_TEACH = ["--model", TINY_MODEL, "--epochs", "2", "--batch-size", "16", "--workers", "0", "--lr", "3e-3"]


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """An empty working directory, no KDCLI_SHARDS."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDCLI_SHARDS", raising=False)
    return tmp_path


@pytest.mark.slow
def test_the_design_cards_two_lines_run_literally(lab):
    kdcli_run("synth", "multieye", "./raw", "--per-class", "5", "--size", "32")
    prepared = kdcli_run("prepare", "multieye", "./raw")  # literally
    assert prepared.output.strip().splitlines()[-1].startswith("prepared shards/multieye ")
    assert (lab / "shards" / "multieye" / "dataset.json").is_file()
    taught = kdcli_run("teach", "--modality", "oct", "--out", "oct.pt", *QUICK_TEACH)
    assert "--data not given: using shards/multieye" in taught.output
    distilled = kdcli_run("distill", "--teacher", "oct.pt", "--student", "fundus")  # literally
    assert "--method not given: using coda (unpaired modalities)" in distilled.output
    student = load_checkpoint(lab / "fundus-coda.pt")
    assert student.meta["kind"] == "student" and student.meta["method"] == "coda"
    assert student.meta["teacher"]["path"] == str((lab / "oct.pt").resolve())
    assert student.meta["data"]["path"] == str((lab / "shards" / "multieye").resolve())
    evaluated = kdcli_run("evaluate", "fundus-coda.pt", "--json")  # the dataset it was trained on
    report = json.loads(evaluated.stdout)
    assert report["data"] == str((lab / "shards" / "multieye").resolve())


def test_prepare_default_out_follows_kdcli_shards_and_refuses_to_overwrite(lab, multieye_raw):
    home = lab / "elsewhere"
    first = kdcli_run("prepare", "multieye", multieye_raw, "--size", "16", env={"KDCLI_SHARDS": str(home)})
    assert first.output.strip().splitlines()[-1].startswith(f"prepared {home / 'multieye'} ")
    before = (home / "multieye" / "dataset.json").read_bytes()
    assert_one_line_error(kdcli_run("prepare", "multieye", multieye_raw, "--size", "16", ok=False,
                                    env={"KDCLI_SHARDS": str(home)}),
                          "--overwrite")
    assert (home / "multieye" / "dataset.json").read_bytes() == before


def test_teach_without_data_refuses_when_the_default_folder_is_ambiguous_or_empty(lab, multieye_shards):
    assert_one_line_error(kdcli_run("teach", "--modality", "oct", *QUICK_TEACH,
                                    ok=False), "no prepared dataset under shards/")
    shutil.copytree(multieye_shards, lab / "shards" / "a")
    shutil.copytree(multieye_shards, lab / "shards" / "b")
    result = kdcli_run("teach", "--modality", "oct", *QUICK_TEACH, ok=False)
    assert_one_line_error(result, "2 datasets (a, b)", "--data")
    assert not (lab / "oct.pt").exists()


def test_teach_default_out_is_the_modality_and_is_not_overwritten(lab, multieye_shards):
    shutil.copytree(multieye_shards, lab / "shards" / "multieye")
    first = kdcli_run("teach", "--modality", "oct", *QUICK_TEACH)
    assert "--out not given: writing oct.pt" in first.output and (lab / "oct.pt").is_file()
    before = (lab / "oct.pt").read_bytes()
    assert_one_line_error(kdcli_run("teach", "--modality", "oct", *QUICK_TEACH,
                                    ok=False), "checkpoint exists", "--overwrite")
    assert (lab / "oct.pt").read_bytes() == before


def test_distill_without_data_refuses_a_moved_or_changed_dataset(lab, multieye_shards):
    shards = lab / "shards" / "multieye"
    shutil.copytree(multieye_shards, shards)
    kdcli_run("teach", "--modality", "oct", "--out", "oct.pt", *QUICK_TEACH)
    shards.rename(lab / "moved")
    result = kdcli_run("distill", "--teacher", "oct.pt", "--student", "fundus", *QUICK_TEACH, ok=False)
    assert_one_line_error(result, str(shards.resolve()), "is gone", "--data")
    (lab / "moved").rename(shards)
    meta = json.loads((shards / "dataset.json").read_text())
    meta["content_hash"] = "sha256:" + "0" * 64
    (shards / "dataset.json").write_text(json.dumps(meta))
    result = kdcli_run("distill", "--teacher", "oct.pt", "--student", "fundus", *QUICK_TEACH, ok=False)
    assert_one_line_error(result, "has changed", "--data")
    assert_one_line_error(kdcli_run("evaluate", "oct.pt", ok=False), "has changed", "--data")
    assert not list(lab.glob("fundus-*.pt"))


def test_distill_default_output_beside_the_teacher_is_not_overwritten(lab, multieye_shards, oct_teacher):
    teacher = lab / "models" / "oct.pt"
    teacher.parent.mkdir()
    shutil.copy(oct_teacher, teacher)
    existing = lab / "models" / "fundus-coda.pt"
    existing.write_bytes(b"earlier student")
    result = kdcli_run("distill", "--data", multieye_shards, "--teacher", teacher, "--student", "fundus", *QUICK_TEACH,
                       ok=False)
    assert_one_line_error(result, "checkpoint exists", "--overwrite")
    assert existing.read_bytes() == b"earlier student"


@pytest.mark.parametrize(("task", "pairing", "targets", "teachers", "spaces", "expected"), [
    ("classification", "unpaired", {}, [{}], {}, "coda"),
    ("classification", "paired", {}, [{}], {}, "kd"),
    ("classification", "unpaired", {}, [{}, {}], {"dr": {}, "amd": {}}, "sall"),
    ("segmentation", "paired", {"seg": {}}, [{}], {}, "protokd"),
    ("multilabel", "none", {"labels": {}, "gaze": {}}, [{}], {}, "cvi"),
    ("mil", "none", {"clinical": {}}, [{}], {}, "bidirectional"),
])
def test_default_method_is_the_one_the_data_call_for(task, pairing, targets, teachers, spaces, expected):
    from types import SimpleNamespace

    from kdcli.defaults import default_method

    dataset = SimpleNamespace(task=task, pairing=pairing, targets=targets, tasks=spaces)
    assert default_method(dataset, teachers)[0] == expected


def test_no_default_method_for_multilabel_data_without_annotations():
    from types import SimpleNamespace

    from kdcli.defaults import default_method
    from kdcli.errors import UsageError

    with pytest.raises(UsageError, match="--method is required"):
        default_method(SimpleNamespace(task="multilabel", pairing="none", targets={"labels": {}}, tasks={}), [{}])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_quickstart_example_runs_end_to_end_on_phantoms(lab, multieye_raw):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shims = lab / "bin"  # the checkout's kdcli, whatever is installed on PATH
    shims.mkdir()
    (shims / "kdcli").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kdcli "$@"\n')
    (shims / "kdcli").chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(root),
           "OMP_NUM_THREADS": "1"}
    env.pop("KDCLI_SHARDS", None)
    result = subprocess.run(["bash", str(root / "examples" / "quickstart.sh"), str(multieye_raw), *QUICK_TEACH],
                            capture_output=True, text=True, env=env, timeout=900, cwd=lab)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((lab / "fundus-coda.test.json").read_text())
    assert report["metrics"]["accuracy"] is not None and (lab / "oct.pt").is_file()
