"""`kdcli prepare isic` on hand-made ISIC 2019 and 2020 layouts: classes, lesion/patient groups kept in one split,
and bad ground-truth rows refused in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from conftest import kdcli_run
from test_prepare_multieye import assert_one_line_error

COLUMNS_2019 = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        image = np.random.default_rng(i).integers(0, 255, (20, 24, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"{name}.jpg"), image)


def isic_2019(root: Path, bad_row: int | None = None) -> Path:
    """24 images of MEL, NV and BCC in turn, two per lesion (the metadata sheet's lesion_id)."""
    names = [f"ISIC_{i:07d}" for i in range(24)]
    write_images(root / "ISIC_2019_Training_Input", names)
    rows = []
    for i, name in enumerate(names):
        hot = [0.0] * len(COLUMNS_2019)
        hot[(i // 2) % 3] = 1.0
        if i == bad_row:
            hot[4] = 1.0  # two diagnoses on one row
        rows.append([name, *hot])
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *COLUMNS_2019], rows)
    write_csv(root / "ISIC_2019_Training_Metadata.csv", ["image", "age_approx", "anatom_site_general", "lesion_id",
                                                          "sex"],
              [[name, 50, "torso", f"IL_{i // 2:07d}", "female"] for i, name in enumerate(names)])
    return root


def isic_2020(root: Path, target: str | None = None) -> Path:
    names = [f"ISIC_{i:07d}" for i in range(16)]
    write_images(root / "train", names)
    rows = [[name, f"IP_{i // 2:07d}", "male", 45, "torso", "nevus", "benign" if i % 4 < 2 else "malignant",
             target if i == 5 and target else int(i % 4 >= 2)] for i, name in enumerate(names)]
    write_csv(root / "ISIC_2020_Training_GroundTruth.csv",
              ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
               "benign_malignant", "target"], rows)
    return root


def test_2019_keeps_the_diagnoses_present_and_each_lesion_in_one_split(tmp_path):
    raw, out = isic_2019(tmp_path / "isic2019"), tmp_path / "shards"
    result = kdcli_run("prepare", "isic", raw, "--out", out, "--size", "16", "--ratios", "0.5,0.25,0.25")
    assert "classes without images left out: AK, BKL, DF, VASC, SCC, UNK" in result.output
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classes"] == ["MEL", "NV", "BCC"] and meta["extra"]["release"] == "2019"
    assert meta["modalities"] == {"dermoscopy": {"shape": [16, 16, 3], "dtype": "uint8"}}
    manifest = pl.read_parquet(out / "manifest.parquet")
    assert dict(zip(manifest["id"], manifest["label"], strict=True)) == {
        f"ISIC_{i:07d}": (i // 2) % 3 for i in range(24)}
    assert dict(zip(manifest["id"], manifest["group"], strict=True))["ISIC_0000003"] == "IL_0000001"
    assert manifest.group_by("group").agg(pl.col("split").n_unique())["split"].max() == 1
    per_split = manifest.group_by("split").agg(pl.col("label").n_unique())
    assert dict(zip(per_split["split"], per_split["label"], strict=True)) == {"train": 3, "dev": 3, "test": 3}
    kdcli_run("inspect", out, "--verify")


def test_2020_reads_target_and_patient(tmp_path):
    raw, out = isic_2020(tmp_path / "isic2020"), tmp_path / "shards"
    kdcli_run("prepare", "isic", raw, "--out", out, "--size", "16")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classes"] == ["benign", "malignant"] and meta["extra"]["release"] == "2020"
    manifest = pl.read_parquet(out / "manifest.parquet")
    assert dict(zip(manifest["id"], manifest["label"], strict=True)) == {
        f"ISIC_{i:07d}": int(i % 4 >= 2) for i in range(16)}
    assert manifest.group_by("group").agg(pl.col("split").n_unique())["split"].max() == 1


@pytest.mark.parametrize("case", ["not_one_hot", "bad_target", "missing_image", "no_ground_truth"])
def test_bad_isic_downloads_are_refused_in_one_line(tmp_path, case):
    if case == "not_one_hot":
        raw, needles = isic_2019(tmp_path / "raw", bad_row=7), ["row 9", "ISIC_0000007", "is not one-hot"]
    elif case == "bad_target":
        raw, needles = isic_2020(tmp_path / "raw", target="2"), ["row 7", "target '2' is not 0 or 1"]
    elif case == "missing_image":
        raw = isic_2020(tmp_path / "raw")
        (raw / "train" / "ISIC_0000003.jpg").unlink()
        needles = ["row 5", "image 'ISIC_0000003' not found"]
    else:
        raw = isic_2020(tmp_path / "raw")
        (raw / "ISIC_2020_Training_GroundTruth.csv").unlink()
        needles = ["no ground-truth CSV in RAW", "--labels"]
    result = kdcli_run("prepare", "isic", raw, "--out", tmp_path / "shards", "--size", "16", ok=False)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "shards").exists()
