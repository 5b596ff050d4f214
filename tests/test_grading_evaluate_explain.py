"""`evaluate` and `explain` on a dataset with two label spaces (fundus-grading: a DR set and an AMD set):
metrics, figures and predictions per task, one Grad-CAM overlay per head of a SALL student, and single-task
teachers kept to their own task's rows. One tiny dataset and three 1-epoch checkpoints per module."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from conftest import kdcli_run
from test_prepare_multieye import assert_one_line_error

from kdcli.engine.checkpoint import load_checkpoint, save_checkpoint
from kdcli.errors import UsageError
from kdcli.evaluate.run import run_model
from kdcli.explain.common import GAP
from kdcli.shards.reader import ShardStore

FAST = ["--model", "test_resnet", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--device", "cpu"]
TASKS = ("dr", "amd")


@pytest.fixture(scope="module")
def grading(tmp_path_factory) -> dict[str, Path]:
    """shards (DR + AMD sets, 48 px) and dr.pt, amd.pt (single-task teachers), sall.pt (two-headed student)."""
    from kdcli.prepare import PrepareOptions, prepare
    from kdcli.synth.fundus_grading import synth_fundus_grading

    root = tmp_path_factory.mktemp("grading")
    sets = synth_fundus_grading(root / "raw", per_class=5, amd_per_class=5, size=48, seed=0)["sets"]
    shards = root / "shards"
    for task in TASKS:
        labels = sets[task]["labels"]
        prepare(PrepareOptions(source="fundus-grading", raw=Path(labels).parent, out=shards, size=48, append=True,
                               source_options={"labels": labels, "task": task}))
    paths = {"shards": shards, **{name: root / f"{name}.pt" for name in (*TASKS, "sall")}}
    for task in TASKS:
        kdcli_run("teach", "--data", shards, "--task", task, "--out", paths[task], *FAST)
    kdcli_run("distill", "--data", shards, "--teacher", paths["dr"], "--teacher", paths["amd"], "--method", "sall",
              "--out", paths["sall"], *FAST)
    return paths


def task_rows(shards: Path, task: str) -> pl.DataFrame:
    return ShardStore(shards).rows("test", "fundus", task)


def test_evaluate_sall_reports_each_task_on_its_own_rows(grading, tmp_path):
    shards = grading["shards"]
    result = kdcli_run("evaluate", grading["sall"], "--data", shards, "--json", "--predictions", tmp_path / "p.csv",
                       "--figure", tmp_path / "cm.png")
    report = json.loads(result.stdout)  # the table went to stderr: stdout is pure JSON
    assert report["tasks"] == list(TASKS) and set(report["metrics"]) == set(TASKS)
    predictions = pl.read_csv(tmp_path / "p.csv")
    assert predictions.columns == ["id", "task", "label", "label_name", "prediction", "prediction_name",
                                   *(f"prob_{i}" for i in range(5))]
    for task in TASKS:
        metrics, rows = report["metrics"][task], task_rows(shards, task)
        assert metrics["n"] == rows.height > 0 and metrics["kappa_weights"] == "quadratic"
        assert {"accuracy", "macro_f1", "kappa", "auc"} <= set(metrics)
        mine = predictions.filter(pl.col("task") == task)
        assert sorted(mine["id"]) == sorted(rows["id"])
        assert (mine["prediction"] == mine["label"]).mean() == pytest.approx(metrics["accuracy"])
        assert report["figure"][task] == str(tmp_path / f"cm.{task}.png")
        assert (tmp_path / f"cm.{task}.png").stat().st_size > 1000
    amd = predictions.filter(pl.col("task") == "amd")
    assert amd["prob_4"].is_null().all()  # AMD has 4 grades, DR 5: the fifth column is empty for AMD
    probs = amd.select(f"prob_{i}" for i in range(4)).to_numpy()
    assert abs(probs.sum(1) - 1).max() < 1e-4 and (amd["prediction"].to_numpy() == probs.argmax(1)).all()
    table = kdcli_run("evaluate", grading["sall"], "--data", shards).output
    for task in TASKS:  # one table row per task: name, n, accuracy...
        n = report["metrics"][task]["n"]
        assert re.search(rf"│ {task}\s+│\s+{n} │", table), table


def test_evaluate_single_task_teacher_reports_its_task_only(grading, tmp_path):
    result = kdcli_run("evaluate", grading["dr"], "--data", grading["shards"], "--json", "--predictions",
                       tmp_path / "p.parquet")
    report = json.loads(result.stdout)
    assert list(report["metrics"]) == ["dr"]
    assert report["metrics"]["dr"]["n"] == task_rows(grading["shards"], "dr").height
    assert Path(report["figure"]["dr"]) == grading["dr"].with_name("dr.test.dr.confusion.png")
    predictions = pl.read_parquet(tmp_path / "p.parquet")
    assert (predictions["task"] == "dr").all() and predictions["prob_4"].null_count() == 0


@pytest.mark.parametrize("command", ["evaluate", "explain"])
def test_teacher_of_a_task_the_dataset_lacks_is_refused(command, grading, tmp_path):
    checkpoint = load_checkpoint(grading["dr"])
    fake = tmp_path / "glaucoma.pt"
    save_checkpoint(fake, {**checkpoint.meta, "label_task": "glaucoma"}, checkpoint.model)
    result = kdcli_run(command, fake, "--data", grading["shards"],
                       *(["--out", tmp_path / "x"] * (command == "explain")), ok=False)
    assert_one_line_error(result, "glaucoma")


def test_run_model_picks_rows_and_head_by_task(grading):
    _, _, view, probs, labels, _ = run_model(grading["sall"], grading["shards"], "test", "cpu", task="amd")
    assert probs.shape == (task_rows(grading["shards"], "amd").height, 4)
    assert all(i.startswith("amd:") for i in view.ids) and labels.max() < 4
    _, _, view, probs, _, _ = run_model(grading["dr"], grading["shards"], "test", "cpu")  # its own task
    assert probs.shape[1] == 5 and all(i.startswith("dr:") for i in view.ids)
    with pytest.raises(UsageError, match="dr, amd"):
        run_model(grading["sall"], grading["shards"], "test", "cpu")  # two heads: which one is ambiguous


def explained(index: Path, heads: int) -> dict:
    """explain.json, index.html and the PNGs agree; each PNG is the image plus one overlay per head."""
    out = index.parent
    report = json.loads((out / "explain.json").read_text())
    files = [r["file"] for r in report["images"]]
    figures = [report["curves"]] if report["curves"] else []  # the training curves, above the samples
    assert re.findall(r'<img src="([^"]+)"', index.read_text()) == figures + files
    assert sorted(p.name for p in out.glob("*.png")) == sorted(figures + files)
    for name in files:
        height, width = cv2.imread(str(out / name)).shape[:2]
        assert height >= 192 and width == (heads + 1) * height + heads * GAP, (name, height, width)
    return report


def test_explain_sall_shows_every_head_side_by_side(grading, tmp_path):
    kdcli_run("explain", grading["sall"], "--data", grading["shards"], "--out", tmp_path / "ex", "--count", 6)
    report = explained(tmp_path / "ex" / "index.html", heads=2)
    store = ShardStore(grading["shards"])
    assert report["tasks"] == list(TASKS) and len(report["images"]) == 6
    assert {r["task"] for r in report["images"]} == set(TASKS)  # picks alternate between the two sets
    for record in report["images"]:
        row = store.rows("test", "fundus", record["task"]).filter(pl.col("id") == record["id"])
        assert row.height == 1 and row["label"][0] == record["label"]
        assert [h["task"] for h in record["heads"]] == list(TASKS)
        for head in record["heads"]:
            assert head["prediction_name"] == store.meta.classes_for(head["task"])[head["prediction"]]
            assert 0.0 <= head["probability"] <= 1.0
        own = record["heads"][TASKS.index(record["task"])]
        assert record["correct"] == (own["prediction"] == record["label"])
    assert "amd head" in (tmp_path / "ex" / "index.html").read_text()


def test_explain_single_task_teacher_covers_its_rows_only(grading, tmp_path):
    kdcli_run("explain", grading["dr"], "--data", grading["shards"], "--out", tmp_path / "ex", "--count", 50)
    report = explained(tmp_path / "ex" / "index.html", heads=1)
    ids = [r["id"] for r in report["images"]]
    assert sorted(ids) == sorted(task_rows(grading["shards"], "dr")["id"])
    assert all(r["task"] == "dr" and len(r["heads"]) == 1 for r in report["images"])
    assert np.unique([r["label"] for r in report["images"]]).size > 1


# slow: two more SALL runs; SALL stays fast through the module's student, the cache through test_teacher_cache
@pytest.mark.slow
def test_sall_with_the_teacher_cache_matches_the_online_teachers_soft_labels(grading, tmp_path):
    """Without augmentation the cached and the online teachers see the same images: same training, same weights."""
    import torch

    from kdcli.engine.checkpoint import load_checkpoint

    common = ["distill", "--data", grading["shards"], "--teacher", grading["dr"], "--teacher", grading["amd"],
              "--method", "sall", *FAST, "--set", "augment=none"]
    kdcli_run(*common, "--out", tmp_path / "online.pt")
    kdcli_run(*common, "--cache-teacher", "--out", tmp_path / "cached.pt")
    online, cached = load_checkpoint(tmp_path / "online.pt").model, load_checkpoint(tmp_path / "cached.pt").model
    assert all(torch.allclose(online[k].float(), cached[k].float(), atol=1e-5) for k in online)
    assert list((grading["shards"] / "cache").glob("teacher-*.h5"))
