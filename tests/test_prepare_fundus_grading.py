"""prepare fundus-grading: one task per set appended to one shard directory, patient-level splits, bad CSVs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from test_prepare_multieye import assert_one_line_error
from typer.testing import CliRunner

from kdcli.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def grading_raw(tmp_path_factory) -> Path:
    from kdcli.synth.fundus_grading import synth_fundus_grading

    root = tmp_path_factory.mktemp("grading") / "raw"
    synth_fundus_grading(root, per_class=5, size=32, seed=0)
    synth_fundus_grading(root / "aptos", per_class=3, size=32, seed=1, dr_layout="aptos")
    return root


def prepare_both(raw: Path, out: Path, *extra: str):
    first = run("prepare", "fundus-grading", raw / "dr", "--labels", raw / "dr" / "trainLabels.csv", "--task", "dr",
                "--out", out, "--size", "32", *extra)
    second = run("prepare", "fundus-grading", raw / "amd", "--labels", raw / "amd" / "labels.csv", "--task", "amd",
                 "--out", out, "--size", "32", *extra)
    return first, second


def test_two_sets_append_into_one_dataset_that_records_each_task(grading_raw, tmp_path):
    first, second = prepare_both(grading_raw, tmp_path / "s")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    meta = json.loads((tmp_path / "s" / "dataset.json").read_text())
    assert meta["tasks"]["dr"]["classes"] == ["0 none", "1 mild", "2 moderate", "3 severe", "4 proliferative"]
    assert meta["tasks"]["amd"]["ordinal"] is True and len(meta["tasks"]["amd"]["classes"]) == 4
    manifest = pl.read_parquet(tmp_path / "s" / "manifest.parquet")
    assert manifest.group_by("task").len().sort("task").rows() == [("amd", 20), ("dr", 25)]
    assert manifest.filter(pl.col("task") == "dr")["label"].max() == 4
    dr_csv = pl.read_csv(grading_raw / "dr" / "trainLabels.csv")
    dr_rows = manifest.filter(pl.col("task") == "dr")
    assert dict(zip(dr_rows["id"], dr_rows["label"], strict=True)) == {
        f"dr:{name}": level for name, level in zip(dr_csv["image"], dr_csv["level"], strict=True)}
    inspected = run("inspect", tmp_path / "s", "--json", "--verify")
    assert inspected.exit_code == 0 and json.loads(inspected.stdout)["verified"] is True
    assert len(meta["extra"]["prepare_runs"]) == 2


def test_patients_never_straddle_splits(grading_raw, tmp_path):
    prepare_both(grading_raw, tmp_path / "s")
    manifest = pl.read_parquet(tmp_path / "s" / "manifest.parquet").filter(pl.col("task") == "dr")
    assert manifest.group_by("group").agg(pl.col("split").n_unique())["split"].max() == 1
    assert set(manifest["split"]) == {"train", "dev", "test"}


def test_the_same_task_again_is_refused_then_replaced_with_overwrite(grading_raw, tmp_path):
    prepare_both(grading_raw, tmp_path / "s")
    before = (tmp_path / "s" / "dataset.json").read_bytes()
    again = run("prepare", "fundus-grading", grading_raw / "dr", "--labels", grading_raw / "dr" / "trainLabels.csv",
                "--task", "dr", "--out", tmp_path / "s", "--size", "32")
    assert_one_line_error(again, "already holds task dr", "--overwrite")
    assert (tmp_path / "s" / "dataset.json").read_bytes() == before
    replaced = run("prepare", "fundus-grading", grading_raw / "aptos" / "dr", "--labels",
                   grading_raw / "aptos" / "dr" / "train.csv", "--task", "dr", "--out", tmp_path / "s", "--size", "32",
                   "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    manifest = pl.read_parquet(tmp_path / "s" / "manifest.parquet")
    assert manifest.group_by("task").len().sort("task").rows() == [("amd", 20), ("dr", 15)]
    on_disk = {p.name for p in (tmp_path / "s" / "shards").glob("*.h5")}
    assert on_disk == set(manifest["shard"])  # the replaced set's shards are gone, nothing orphaned
    assert run("inspect", tmp_path / "s", "--verify").exit_code == 0


def test_bad_csvs_name_the_row_and_leave_the_dataset_whole(grading_raw, tmp_path):
    prepare_both(grading_raw, tmp_path / "s")
    before = (tmp_path / "s" / "manifest.parquet").read_bytes()
    bad = tmp_path / "bad"
    shutil.copytree(grading_raw / "amd", bad)
    csv = bad / "labels.csv"
    lines = csv.read_text().splitlines()

    def attempt(text: str, *needles: str, task: str = "amd2", extra: tuple = ()) -> None:
        csv.write_text(text)
        result = run("prepare", "fundus-grading", bad, "--labels", csv, "--task", task, "--out", tmp_path / "s",
                     "--size", "32", *extra)
        assert_one_line_error(result, *needles)
        assert (tmp_path / "s" / "manifest.parquet").read_bytes() == before

    name = lines[1].split(",")[0]
    attempt("\n".join([lines[0], f"{name},7", *lines[2:]]) + "\n", str(csv), "row 2", "outside 0..3",
            extra=("--grades", "4"))
    attempt("\n".join([*lines, lines[1]]) + "\n", "listed twice")
    attempt("\n".join(["file,grade", *lines[1:]]) + "\n", "found: file, grade", "--image-column")
    attempt("\n".join([lines[0], "missing_image,1", *lines[2:]]) + "\n", "row 2", "missing_image", "not found")
    attempt("\n".join(lines) + "\n", "already in the 'amd' set")  # same images under another task name


def test_other_column_names_and_folders_via_options(grading_raw, tmp_path):
    data = tmp_path / "custom"
    shutil.copytree(grading_raw / "amd", data)
    (data / "images").rename(data / "pictures")
    frame = pl.read_csv(data / "labels.csv").rename({"image": "file", "level": "grade"})
    frame.write_csv(data / "grades.csv")
    result = run("prepare", "fundus-grading", data, "--labels", data / "grades.csv", "--task", "amd",
                 "--image-column", "file", "--label-column", "grade", "--image-dir", data / "pictures",
                 "--out", tmp_path / "s", "--size", "32")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "dataset.json").read_text())["counts"]["fundus"]["train"] > 0
