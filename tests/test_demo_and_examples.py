"""The README's main job (`kdcli demo`) and the lab-pipeline example, end to end on tiny phantoms."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kdcli_run

ROOT = Path(__file__).resolve().parents[1]


# slow: trains teacher, baseline and student over two seeds; demo stays in the fast subset through its brats form
@pytest.mark.slow
def test_demo_reports_teacher_baseline_and_student_on_the_same_split(tmp_path):
    result = kdcli_run("demo", "--out", str(tmp_path / "demo"), "--per-class", "5", "--size", "32",
                       "--epochs", "1", "--seeds", "2", "--json")
    report = json.loads(result.stdout)
    assert list(report["summary"]) == ["teacher (OCT)", "baseline (fundus)", "CoDA student (fundus)"]
    for role, runs in report["runs"].items():
        assert len(runs) == 2 and all(0 <= run["accuracy"] <= 1 for run in runs), role
        stats = report["summary"][role]["macro_f1"]
        assert stats["min"] <= stats["mean"] <= stats["max"]
    assert "CoDA student (fundus)" in result.stderr and "±" in result.stderr
    paired = report["paired"]["CoDA student (fundus) - baseline (fundus)"]["accuracy"]
    runs = report["runs"]
    expected = [s["accuracy"] - b["accuracy"] for s, b in zip(runs["CoDA student (fundus)"],
                                                               runs["baseline (fundus)"], strict=True)]
    assert paired["per_seed"] == pytest.approx(expected)
    assert paired["se"] == pytest.approx(abs(expected[0] - expected[1]) / 2)  # sd/sqrt(2) for two seeds
    assert paired["up"] + paired["down"] <= 2 and "Δ: per-seed difference" in result.stderr  # the table says it
    seed_dirs = sorted(p.name for p in (tmp_path / "demo" / "multieye" / "checkpoints").iterdir())
    assert seed_dirs == ["seed0", "seed1"]
    from kdcli.engine.checkpoint import load_checkpoint

    student = load_checkpoint(tmp_path / "demo" / "multieye" / "checkpoints" / "seed0" / "fundus-coda.pt")
    assert student.meta["model"]["concept_scale"] == 10.0  # short from-scratch runs: see kdcli/demo.py


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_multieye_example_script_runs_the_lab_pipeline(tmp_path):
    from kdcli.synth.multieye import synth_multieye

    synth_multieye(tmp_path / "raw", per_class=4, size=32, seed=3)
    shim = tmp_path / "bin" / "kdcli"  # the checkout's kdcli, whatever is installed on PATH
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kdcli "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", str(ROOT / "examples" / "multieye.sh"), str(tmp_path / "raw"),
                             str(tmp_path / "work"), "test_resnet", "1"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "macro-F1 baseline" in result.stdout
    report = json.loads((tmp_path / "work" / "fundus.test.json").read_text())
    assert report["method"] == "coda" and report["split"] == "test"
    assert (tmp_path / "work" / "explain" / "index.html").is_file()
    assert (tmp_path / "work" / "fundus.test.csv").is_file()


@pytest.mark.parametrize(("pipeline", "args", "roles", "metric"), [
    ("brats", ["--cases", "6", "--size", "32", "--model", "plain-4-2"],
     ["teacher (t1+t1ce+t2+flair)", "baseline (t1ce)", "ProtoKD student (t1ce)"], "dice_mean"),
    # slow: cxr and wsi train three models each (wsi through slide embedding); brats keeps demo in the fast subset
    pytest.param("cxr", ["--per-class", "3", "--size", "64", "--annotated", "0.5"],
                 ["stage 1 (global labels)", "stage 2 without gaze (control)", "CVI stage 2 (+ gaze)"], "mean_auroc",
                 marks=pytest.mark.slow),
    pytest.param("wsi", ["--cases", "10", "--size", "32"],
                 ["WSI-only baseline", "naive WSI + clinical", "bidirectional"], "auc@0.8", marks=pytest.mark.slow),
])
def test_new_pipeline_demos_report_their_comparison(tmp_path, pipeline, args, roles, metric):
    result = kdcli_run("demo", pipeline, "--out", str(tmp_path / "demo"), "--epochs", "2",
                       "--seeds", "1", "--json", *args)
    report = json.loads(result.stdout)
    assert list(report["summary"]) == roles
    for role in roles:
        value = report["runs"][role][0][metric]
        assert value is None or 0.0 <= value <= 1.0, (role, value)
    model, reference = roles[-1], roles[1] if pipeline == "cxr" else roles[0 if pipeline == "wsi" else 1]
    paired = report["paired"][f"{model} - {reference}"]
    for name, difference in paired.items():
        ours, theirs = report["runs"][model][0][name], report["runs"][reference][0][name]
        assert difference["per_seed"] == pytest.approx([ours - theirs]), name


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_cluster_recipe_runs_here_without_slurm(multieye_raw, tmp_path):
    """examples/cluster.sh outside SLURM: the array parts run in turn, merge gives the one-shot dataset, and
    training goes through torchrun (one gloo process)."""
    from kdcli.engine.checkpoint import load_checkpoint
    from kdcli.prepare import PrepareOptions, prepare

    shims = tmp_path / "bin"  # the checkout's kdcli and torchrun, whatever is installed on PATH
    shims.mkdir()
    for name, module in (("kdcli", "kdcli"), ("torchrun", "torch.distributed.run")):
        (shims / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        (shims / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "PARTS": "3"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    script, shards = str(ROOT / "examples" / "cluster.sh"), tmp_path / "shards"

    def stage(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env, timeout=600)

    for args in (("prepare", str(multieye_raw), str(shards), "--size", "32"), ("merge", str(shards)),
                 ("teach", str(shards), str(tmp_path / "oct.pt"), "--modality", "oct", "--model", "test_resnet",
                  "--epochs", "1", "--batch-size", "8", "--workers", "0")):
        result = stage(*args)
        assert result.returncode == 0, (args[0], result.stderr[-3000:])
    one_shot = prepare(PrepareOptions(source="multieye", raw=multieye_raw, out=tmp_path / "one", size=32))
    merged = json.loads((shards / "dataset.json").read_text())
    assert merged["content_hash"] == one_shot.meta.content_hash
    assert load_checkpoint(tmp_path / "oct.pt").meta["data"]["content_hash"] == merged["content_hash"]
    assert stage("evaluate").returncode == 2
