"""prepare fundus-grading: one task per set appended to one shard directory, patient-level splits, bad CSVs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from conftest import kdcli_run
from test_prepare_multieye import assert_one_line_error


@pytest.fixture(scope="module")
def grading_raw(tmp_path_factory) -> Path:
    from kdcli.synth.fundus_grading import synth_fundus_grading

    root = tmp_path_factory.mktemp("grading") / "raw"
    synth_fundus_grading(root, per_class=5, amd_per_class=5, size=32, seed=0)
    synth_fundus_grading(root / "aptos", per_class=3, amd_per_class=3, size=32, seed=1, dr_layout="aptos")
    return root


def prepare_both(raw: Path, out: Path, *extra: str):
    first = kdcli_run("prepare", "fundus-grading", raw / "dr", "--labels", raw / "dr" / "trainLabels.csv",
                      "--task", "dr", "--out", out, "--size", "32", *extra, ok=False)
    second = kdcli_run("prepare", "fundus-grading", raw / "amd", "--labels", raw / "amd" / "labels.csv",
                       "--task", "amd", "--out", out, "--size", "32", *extra, ok=False)
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
    inspected = kdcli_run("inspect", tmp_path / "s", "--json", "--verify", ok=False)
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
    again = kdcli_run("prepare", "fundus-grading", grading_raw / "dr", "--labels",
                      grading_raw / "dr" / "trainLabels.csv", "--task", "dr", "--out", tmp_path / "s", "--size", "32",
                      ok=False)
    assert_one_line_error(again, "already holds task dr", "--overwrite")
    assert (tmp_path / "s" / "dataset.json").read_bytes() == before
    kdcli_run("prepare", "fundus-grading", grading_raw / "aptos" / "dr", "--labels",
              grading_raw / "aptos" / "dr" / "train.csv", "--task", "dr", "--out", tmp_path / "s", "--size", "32",
              "--overwrite")
    manifest = pl.read_parquet(tmp_path / "s" / "manifest.parquet")
    assert manifest.group_by("task").len().sort("task").rows() == [("amd", 20), ("dr", 15)]
    on_disk = {p.name for p in (tmp_path / "s" / "shards").glob("*.h5")}
    assert on_disk == set(manifest["shard"])  # the replaced set's shards are gone, nothing orphaned
    kdcli_run("inspect", tmp_path / "s", "--verify")


def test_bad_csvs_name_the_row_and_leave_the_dataset_whole(grading_raw, tmp_path):
    prepare_both(grading_raw, tmp_path / "s")
    before = (tmp_path / "s" / "manifest.parquet").read_bytes()
    bad = tmp_path / "bad"
    shutil.copytree(grading_raw / "amd", bad)
    csv = bad / "labels.csv"
    lines = csv.read_text().splitlines()

    def attempt(text: str, *needles: str, task: str = "amd2", extra: tuple = ()) -> None:
        csv.write_text(text)
        result = kdcli_run("prepare", "fundus-grading", bad, "--labels", csv, "--task", task, "--out", tmp_path / "s",
                           "--size", "32", *extra, ok=False)
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
    kdcli_run("prepare", "fundus-grading", data, "--labels", data / "grades.csv", "--task", "amd",
              "--image-column", "file", "--label-column", "grade", "--image-dir", data / "pictures",
              "--out", tmp_path / "s", "--size", "32")
    assert json.loads((tmp_path / "s" / "dataset.json").read_text())["counts"]["fundus"]["train"] > 0


# ---------------------------------------------------------------- bad data is refused, never stored wrong


def _labels_text(raw: Path) -> tuple[str, list[str]]:
    lines = (raw / "amd" / "labels.csv").read_text().splitlines()
    return lines[0], lines[1:]


BAD_GRADES = [
    # (what, replacement of row 2's grade, needles)
    ("fractional", "2.5", ("row 2", "'2.5'", "not a whole grade")),
    ("infinite", "inf", ("row 2", "'inf'", "not a finite number")),
    ("nan", "NaN", ("row 2", "'NaN'", "not a finite number")),
    ("negative", "-1", ("row 2", "'-1'", "negative")),
    ("text", "two", ("row 2", "'two'", "not a number")),
]


@pytest.mark.parametrize("what, value, needles", BAD_GRADES, ids=[case[0] for case in BAD_GRADES])
def test_a_grade_that_is_not_a_whole_grade_is_refused_naming_file_and_row(grading_raw, tmp_path, what, value,
                                                                         needles):
    bad = tmp_path / "bad"
    shutil.copytree(grading_raw / "amd", bad)
    header, rows = _labels_text(grading_raw)
    (bad / "labels.csv").write_text("\n".join([header, f"{rows[0].split(',')[0]},{value}", *rows[1:]]) + "\n")
    result = kdcli_run("prepare", "fundus-grading", bad, "--labels", bad / "labels.csv", "--task", "amd",
                       "--out", tmp_path / "s", "--size", "32", ok=False)
    assert_one_line_error(result, str(bad / "labels.csv"), *needles)
    assert not (tmp_path / "s").exists()  # nothing written
    if what == "negative":  # an unknown task has no default range: a negative grade is still refused
        result = kdcli_run("prepare", "fundus-grading", bad, "--labels", bad / "labels.csv", "--task", "other",
                           "--out", tmp_path / "s", "--size", "32", ok=False)
        assert_one_line_error(result, "row 2", "negative")


def test_whole_grades_written_as_floats_are_read(grading_raw, tmp_path):
    data = tmp_path / "floats"
    shutil.copytree(grading_raw / "amd", data)
    header, rows = _labels_text(grading_raw)
    (data / "labels.csv").write_text("\n".join([header, *(f"{r.split(',')[0]},{r.split(',')[1]}.0" for r in rows)])
                                     + "\n")
    kdcli_run("prepare", "fundus-grading", data, "--labels", data / "labels.csv", "--task", "amd", "--out",
              tmp_path / "s", "--size", "32")
    manifest = pl.read_parquet(tmp_path / "s" / "manifest.parquet")
    assert sorted(manifest["label"]) == sorted(int(r.split(",")[1]) for r in rows)


@pytest.mark.parametrize("grades", ["0", "1", "-3"])
def test_grades_below_two_are_refused_not_replaced_by_the_default(grading_raw, tmp_path, grades):
    result = kdcli_run("prepare", "fundus-grading", grading_raw / "amd", "--labels", grading_raw / "amd" / "labels.csv",
                       "--task", "amd", "--out", tmp_path / "s", "--size", "32", "--grades", grades, ok=False)
    assert_one_line_error(result, f"--grades {grades}", "at least 2")
    assert not (tmp_path / "s").exists()


def test_unreadable_label_csvs_are_one_clear_line(grading_raw, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(grading_raw / "amd", bad)
    header, rows = _labels_text(grading_raw)
    csv = bad / "labels.csv"

    def attempt(*needles: str) -> None:
        result = kdcli_run("prepare", "fundus-grading", bad, "--labels", csv, "--task", "amd", "--out", tmp_path / "s",
                           "--size", "32", ok=False)
        assert_one_line_error(result, str(csv), *needles)
        assert not (tmp_path / "s").exists()

    csv.write_bytes("\n".join([header, *rows[:3]]).encode() + b"\ncaf\xe9_eye,1\n" + "\n".join(rows[3:]).encode())
    attempt("line 5", "0xe9", "not UTF-8", "save the file as UTF-8")
    csv.write_bytes(b"")
    attempt("is empty")
    csv.write_text("\n\n  \n")
    attempt("is empty")
    csv.write_text(header + "\n")
    attempt("no rows")
    name = rows[0].split(",")[0]
    csv.write_text("\n".join([header, *rows, f"{name},3" if rows[0].split(',')[1] != "3" else f"{name},2"]) + "\n")
    attempt(f"row {len(rows) + 2}", f"image {name!r} listed twice with grades", "first at row 2")


def test_splits_file_gives_each_image_its_split_and_bad_ones_are_refused(grading_raw, tmp_path):
    names = [line.split(",")[0] for line in _labels_text(grading_raw)[1]]
    chosen = {name: ("test" if k % 4 == 0 else "validation" if k % 4 == 1 else "train") for k, name in
              enumerate(names)}
    splits = tmp_path / "splits.csv"
    splits.write_text("image,split\n" + "".join(f"{n},{s}\n" for n, s in chosen.items()))

    def prepare_amd(path: Path, out: Path):
        return kdcli_run("prepare", "fundus-grading", grading_raw / "amd", "--labels",
                         grading_raw / "amd" / "labels.csv", "--task", "amd", "--out", out, "--size", "32", "--splits",
                         path, ok=False)

    assert prepare_amd(splits, tmp_path / "s").exit_code == 0
    manifest = pl.read_parquet(tmp_path / "s" / "manifest.parquet")
    canonical = {"validation": "dev"}
    assert dict(zip(manifest["id"], manifest["split"], strict=True)) == {
        f"amd:{n}": canonical.get(s, s) for n, s in chosen.items()}
    as_json = tmp_path / "splits.json"
    as_json.write_text(json.dumps({"train": names, "dev": [], "test": []}))
    assert prepare_amd(as_json, tmp_path / "j").exit_code == 0
    assert set(pl.read_parquet(tmp_path / "j" / "manifest.parquet")["split"]) == {"train"}

    lines = splits.read_text().splitlines()
    for text, needles in (
        ("\n".join(lines[:-1]), ("1 image(s) of the label CSV are not listed", names[-1])),
        ("\n".join([*lines, "amd_9999,train"]), ("not in the label CSV", "amd_9999")),
        ("\n".join([*lines, f"{names[0]},holdout"]), (f"row {len(lines) + 1}", "unknown split 'holdout'")),
        ("\n".join([*lines, f"{names[1]},train" if chosen[names[1]] != "train" else f"{names[1]},test"]),
         ("listed in",)),
        ("name,fold\n", ("expected a header with columns image,split",)),
    ):
        bad = tmp_path / "bad_splits.csv"
        bad.write_text(text + "\n")
        assert_one_line_error(prepare_amd(bad, tmp_path / "x"), str(bad), *needles)
        assert not (tmp_path / "x").exists()
    assert_one_line_error(prepare_amd(tmp_path / "none.csv", tmp_path / "x"), "splits file not found")


def test_a_splits_file_that_cuts_a_patient_is_leakage(grading_raw, tmp_path):
    rows = (grading_raw / "dr" / "trainLabels.csv").read_text().splitlines()[1:]
    names = [row.split(",")[0] for row in rows]
    pairs = sorted(n for n in names if n.endswith("_left") and n.replace("_left", "_right") in names)
    splits = tmp_path / "splits.csv"
    cut = pairs[0].replace("_left", "_right")
    splits.write_text("image,split\n" + "".join(f"{n},{'test' if n == cut else 'train'}\n" for n in names))
    command = ("prepare", "fundus-grading", grading_raw / "dr", "--labels", grading_raw / "dr" / "trainLabels.csv",
               "--task", "dr", "--out", tmp_path / "s", "--size", "32", "--splits", splits)
    assert_one_line_error(kdcli_run(*command, ok=False), "patient leakage", f"patient '{pairs[0].split('_')[0]}'",
                          "train and test", "--allow-leakage")
    assert not (tmp_path / "s").exists()
    kdcli_run(*command, "--allow-leakage")  # kept on purpose, recorded as a data warning
    meta = json.loads((tmp_path / "s" / "dataset.json").read_text())
    assert "patient_leakage" in json.dumps(meta)
