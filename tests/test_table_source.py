"""`kdcli prepare table` on `kdcli synth table` phantoms: paired, unpaired, multi-label, NIfTI and DICOM files, the
seeded split, and bad CSVs refused in one line naming the file and row with nothing written at --out."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import polars as pl
import pytest
from conftest import kdcli_run
from test_prepare_multieye import assert_one_line_error

CLASSES = "normal,benign,malignant"
FAST = ["--epochs", "1", "--batch-size", "16", "--workers", "0", "--model", "test_resnet"]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict[str, str]], header: list[str] | None = None) -> None:
    header = header or list(rows[0])
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("table")
    kdcli_run("synth", "table", root / "paired", "--size", "32")
    kdcli_run("synth", "table", root / "unpaired", "--size", "32", "--unpaired")
    kdcli_run("synth", "table", root / "multilabel", "--size", "32", "--multilabel", "--scan-format", "nifti")
    return {name: root / name / "table.csv" for name in ("paired", "unpaired", "multilabel")}


@pytest.fixture()
def copy(phantoms, tmp_path):
    """A private copy of a phantom to damage; returns its CSV."""

    def make(name: str = "paired") -> Path:
        shutil.copytree(phantoms[name].parent, tmp_path / name)
        return tmp_path / name / "table.csv"

    return make


def test_paired_table_is_stored_row_by_row(phantoms, tmp_path):
    out = tmp_path / "shards"
    kdcli_run("prepare", "table", phantoms["paired"], "--out", out, "--size", "32", "--classes", CLASSES)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["source"] == "table" and meta["pairing"] == "paired" and meta["task"] == "classification"
    assert meta["classes"] == CLASSES.split(",")
    assert meta["modalities"] == {"photo": {"shape": [32, 32, 3], "dtype": "uint8"},
                                  "scan": {"shape": [32, 32, 1], "dtype": "uint8"}}
    rows = read_rows(phantoms["paired"])
    manifest = pl.read_parquet(out / "manifest.parquet")
    assert set(manifest["modality"]) == {"photo+scan"}
    found = {r["id"]: (r["group"], r["split"], r["label"]) for r in manifest.iter_rows(named=True)}
    assert found == {r["id"]: (r["patient"], r["split"], CLASSES.split(",").index(r["label"])) for r in rows}
    row = manifest.filter(pl.col("id") == "s0004").row(0, named=True)
    with h5py.File(out / "shards" / row["shard"], "r") as handle:
        scan, photo = handle["scan"][row["index"]], handle["photo"][row["index"]]
    raw = phantoms["paired"].parent
    assert np.array_equal(scan[:, :, 0], cv2.imread(str(raw / "scan/s0004.png"), cv2.IMREAD_UNCHANGED))
    assert np.array_equal(photo, cv2.cvtColor(cv2.imread(str(raw / "photo/s0004.png")), cv2.COLOR_BGR2RGB))
    assert "(verified)" in kdcli_run("inspect", out, "--verify").output


@pytest.mark.slow
def test_paired_table_teaches_distils_and_predicts_on_raw_files(phantoms, tmp_path):
    out = tmp_path / "shards"
    kdcli_run("prepare", "table", phantoms["paired"], "--out", out, "--size", "32", "--classes", CLASSES)
    kdcli_run("teach", "--data", out, "--modality", "scan", "--out", tmp_path / "scan.pt", *FAST)
    kdcli_run("distill", "--data", out, "--teacher", tmp_path / "scan.pt", "--student", "photo", "--method", "kd",
              "--out", tmp_path / "photo.pt", *FAST)
    # the student where it is deployed: predict on the raw test photos gives evaluate's probabilities
    kdcli_run("evaluate", tmp_path / "photo.pt", "--predictions", tmp_path / "eval.csv", "--device", "cpu", "--json")
    raw = phantoms["paired"].parent
    tests = [raw / r["photo"] for r in read_rows(phantoms["paired"]) if r["split"] == "test"]
    kdcli_run("predict", tmp_path / "photo.pt", *tests, "--out", tmp_path / "raw.csv", "--device", "cpu")
    evaluated, predicted = pl.read_csv(tmp_path / "eval.csv"), pl.read_csv(tmp_path / "raw.csv")
    joined = evaluated.join(predicted, on="id", suffix="_raw")
    assert joined.height == len(tests) == 6
    columns = [f"prob_{c}" for c in CLASSES.split(",")]
    assert np.allclose(joined.select(columns).to_numpy(), joined.select([f"{c}_raw" for c in columns]).to_numpy(),
                       atol=1e-6)


@pytest.mark.slow
def test_unpaired_table_gives_one_record_per_file_and_teaches(phantoms, tmp_path):
    out = tmp_path / "shards"
    kdcli_run("prepare", "table", phantoms["unpaired"], "--out", out, "--size", "32")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["pairing"] == "unpaired" and meta["classes"] == sorted(CLASSES.split(","))
    rows = read_rows(phantoms["unpaired"])
    manifest = pl.read_parquet(out / "manifest.parquet")
    expected = {f"{m}:{r['id']}" for r in rows for m in ("photo", "scan") if r[m]}
    assert set(manifest["id"]) == expected and len(expected) == len(rows)  # one file per row
    assert dict(zip(manifest["id"], manifest["modality"], strict=True)) == {i: i.split(":")[0] for i in expected}
    assert meta["counts"]["photo"] == {"train": 9, "dev": 3, "test": 3}
    kdcli_run("inspect", out, "--verify")
    kdcli_run("teach", "--data", out, "--modality", "photo", "--out", tmp_path / "photo.pt", *FAST)


@pytest.mark.slow
def test_multilabel_columns_and_nifti_scans_train_evaluate_and_predict(phantoms, tmp_path):
    out = tmp_path / "shards"
    kdcli_run("prepare", "table", phantoms["multilabel"], "--out", out, "--size", "32", "--label-columns", "spots,ring")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["task"] == "multilabel" and meta["classes"] == ["spots", "ring"]
    assert meta["targets"]["labels"]["shape"] == [2]
    rows = {r["id"]: r for r in read_rows(phantoms["multilabel"])}
    assert all(r["scan"].endswith(".nii.gz") for r in rows.values())
    manifest = pl.read_parquet(out / "manifest.parquet")
    for shard in sorted(set(manifest["shard"])):
        with h5py.File(out / "shards" / shard, "r") as handle:
            for ident, labels, scan in zip(handle["id"][:], handle["labels"][:], handle["scan"][:], strict=True):
                row = rows[ident.decode()]
                assert labels.tolist() == [int(row["spots"]), int(row["ring"])]
                assert scan.max() == 255 and scan.min() == 0  # NIfTI scaled by its percentiles, not clipped
    kdcli_run("inspect", out, "--verify")
    kdcli_run("teach", "--data", out, "--modality", "scan", "--out", tmp_path / "scan.pt", *FAST)
    # evaluated on the scans it learnt from (not on the dataset's first modality), and predicted on raw NIfTIs
    kdcli_run("evaluate", tmp_path / "scan.pt", "--predictions", tmp_path / "eval.csv", "--device", "cpu", "--json")
    tests = [phantoms["multilabel"].parent / r["scan"] for r in rows.values() if r["split"] == "test"]
    kdcli_run("predict", tmp_path / "scan.pt", *tests, "--out", tmp_path / "raw.csv", "--device", "cpu")
    joined = pl.read_csv(tmp_path / "eval.csv").join(pl.read_csv(tmp_path / "raw.csv"), on="id", suffix="_raw")
    assert joined.height == len(tests) == 6
    assert np.allclose(joined.select(["prob_spots", "prob_ring"]).to_numpy(),
                       joined.select(["prob_spots_raw", "prob_ring_raw"]).to_numpy(), atol=1e-6)


def test_without_a_split_column_patients_are_split_by_seed(copy, tmp_path):
    table = copy()
    rows = read_rows(table)
    write_rows(table, rows, ["id", "patient", "label", "photo", "scan"])
    splits = []
    for seed in ("0", "0", "1"):
        out = tmp_path / f"shards-{len(splits)}"
        result = kdcli_run("prepare", "table", table, "--out", out, "--size", "16", "--ratios", "0.6,0.2,0.2",
                           "--split-seed", seed)
        assert "no split column: 15 patients split 0.6,0.2,0.2 by label" in result.output
        manifest = pl.read_parquet(out / "manifest.parquet")
        by_patient = manifest.group_by("group").agg(pl.col("split").n_unique().alias("n"))
        assert by_patient["n"].max() == 1  # a patient's samples stay together
        splits.append(dict(zip(manifest["id"], manifest["split"], strict=True)))
        assert set(splits[-1].values()) == {"train", "dev", "test"}
    assert splits[0] == splits[1] and splits[0] != splits[2]


def test_dicom_files_and_unlabeled_rows(copy, tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    table = copy()
    rows = read_rows(table)
    pixels = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 4)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", 32, 32
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(table.parent / "scan" / "s0000.dcm", enforce_file_format=True)
    rows[0]["scan"] = "scan/s0000.dcm"
    rows[1]["label"] = ""  # a training row nobody labelled
    write_rows(table, rows)
    out = tmp_path / "shards"
    kdcli_run("prepare", "table", table, "--out", out, "--size", "32", "--classes", CLASSES)
    manifest = pl.read_parquet(out / "manifest.parquet")
    assert manifest.filter(pl.col("id") == "s0001")["label"].to_list() == [-1]
    row = manifest.filter(pl.col("id") == "s0000").row(0, named=True)
    with h5py.File(out / "shards" / row["shard"], "r") as handle:
        stored = handle["scan"][row["index"]][:, :, 0]
    expected = np.round(pixels / pixels.max() * 255.0).astype(np.uint8)  # min..max of a DICOM without a window
    assert np.array_equal(stored, expected)


def _missing_file(table: Path, rows: list[dict]) -> tuple[list[str], list[str]]:
    (table.parent / rows[3]["photo"]).unlink()
    return [], ["row 5", "photo file 'photo/s0003.png' not found"]


def _unknown_split(table: Path, rows: list[dict]) -> tuple[list[str], list[str]]:
    rows[6]["split"] = "holdout"
    return [], ["row 8", "unknown split 'holdout'"]


def _empty_split(table: Path, rows: list[dict]) -> tuple[list[str], list[str]]:
    rows[5]["split"] = ""
    return [], ["row 7", "no split for 's0005'"]


def _patient_in_two_splits(table: Path, rows: list[dict]) -> tuple[list[str], list[str]]:
    rows[7]["patient"] = rows[0]["patient"]  # a dev row given a training patient
    return [], ["patient leakage", f"patient {rows[0]['patient']!r} has records in train and dev", "--allow-leakage"]


def _unreadable_image(table: Path, rows: list[dict]) -> tuple[list[str], list[str]]:
    (table.parent / rows[4]["scan"]).write_bytes(b"not a png")
    return [], ["scan/s0004.png", "will not decode"]


def _missing_column(table: Path, rows: list[dict]) -> tuple[list[str], list[str]]:
    return ["--label-column", "diagnosis"], ["no column 'diagnosis'", "found: id, patient, split, label"]


def _unknown_label(table: Path, rows: list[dict]) -> tuple[list[str], list[str]]:
    rows[2]["label"] = "malignnat"
    return ["--classes", CLASSES], ["row 4", "unknown label 'malignnat'"]


def _duplicate_id(table: Path, rows: list[dict]) -> tuple[list[str], list[str]]:
    rows[9]["id"] = rows[2]["id"]
    return [], ["row 11", "id 's0002' is also on row 4"]


def _unlabeled_in_test(table: Path, rows: list[dict]) -> tuple[list[str], list[str]]:
    rows[8]["label"] = ""  # s0008 is a test row
    return [], ["row 10", "unlabeled sample 's0008' in split 'test'"]


def _bad_finding(table: Path, rows: list[dict]) -> tuple[list[str], list[str]]:
    rows[1]["spots"] = "maybe"
    return ["--label-columns", "spots,ring"], ["row 3", "spots is 'maybe', not 1, 0 or empty"]


@pytest.mark.parametrize("damage", [_missing_file, _unknown_split, _empty_split, _patient_in_two_splits,
                                    _unreadable_image, _missing_column, _unknown_label, _duplicate_id,
                                    _unlabeled_in_test, _bad_finding],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_tables_are_refused_in_one_line(copy, tmp_path, damage):
    table = copy("multilabel" if damage is _bad_finding else "paired")
    rows = read_rows(table)
    extra, needles = damage(table, rows)
    write_rows(table, rows)
    out = tmp_path / "shards"
    result = kdcli_run("prepare", "table", table, "--out", out, "--size", "16", *extra, ok=False)
    assert_one_line_error(result, *needles)
    assert not out.exists()


def test_a_grade_column_gives_whole_number_classes(copy, tmp_path):
    table = copy()
    rows = [{**r, "grade": str(CLASSES.split(",").index(r["label"]) * 2)} for r in read_rows(table)]  # grades 0, 2, 4
    write_rows(table, rows, ["id", "patient", "split", "grade", "photo", "scan"])
    kdcli_run("prepare", "table", table, "--out", tmp_path / "shards", "--size", "16")
    meta = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    assert meta["classes"] == ["0", "1", "2", "3", "4"]  # a grade nobody has is still a grade
    manifest = pl.read_parquet(tmp_path / "shards" / "manifest.parquet")
    assert dict(zip(manifest["id"], manifest["label"], strict=True)) == {r["id"]: int(r["grade"]) for r in rows}


def test_allow_leakage_keeps_the_patient_as_a_warning(copy, tmp_path):
    table = copy()
    rows = read_rows(table)
    rows[7]["patient"] = rows[0]["patient"]
    write_rows(table, rows)
    out = tmp_path / "shards"
    result = kdcli_run("prepare", "table", table, "--out", out, "--size", "16", "--allow-leakage")
    assert "warning:" in result.output and rows[0]["patient"] in result.output
    assert json.loads((out / "dataset.json").read_text())["prepare"]["allow_leakage"] is True


def test_a_folder_is_not_a_table(phantoms, tmp_path):
    result = kdcli_run("prepare", "table", phantoms["paired"].parent, "--out", tmp_path / "shards", ok=False)
    assert_one_line_error(result, "is a folder", "pass the CSV file itself")


def test_synth_renders_the_class_in_both_modalities_and_repeats_itself(phantoms, tmp_path):
    raw = phantoms["paired"].parent
    rows = read_rows(phantoms["paired"])
    brightness: dict[str, dict[str, list[float]]] = {"photo": {}, "scan": {}}
    for row in rows:
        for modality in brightness:
            image = cv2.imread(str(raw / row[modality]), cv2.IMREAD_UNCHANGED).astype(float)
            brightness[modality].setdefault(row["label"], []).append(image.mean())
    scan = [np.mean(brightness["scan"][c]) for c in CLASSES.split(",")]
    photo = [np.mean(brightness["photo"][c]) for c in CLASSES.split(",")]
    assert scan[0] < scan[1] < scan[2]  # a larger, brighter lesion with each class
    assert photo[0] > photo[1] > photo[2]  # a larger, darker patch
    assert scan[2] - scan[0] > 2 * (photo[0] - photo[2])  # clear in the scan, faint in the photo
    kdcli_run("synth", "table", tmp_path / "again", "--size", "32")
    assert (tmp_path / "again" / "table.csv").read_bytes() == phantoms["paired"].read_bytes()
    assert (tmp_path / "again" / "scan" / "s0007.png").read_bytes() == (raw / "scan" / "s0007.png").read_bytes()
