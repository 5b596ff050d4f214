"""Bad raw data through `kdcli prepare` (MultiEYE, ChestX-ray14, MIMIC-CXR, BraTS phantoms, corrupted one way each):
either refused in one `error:` line naming the file (exit code, no traceback, an earlier dataset at --out left
byte for byte), or kept, repaired, and counted as a data warning in the report and in dataset.json."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import nibabel as nib
import numpy as np
import polars as pl
import pytest
from conftest import kdcli_run
from test_prepare_multieye import assert_one_line_error

SIZE = {"multieye": "32", "cxr": "32", "brats": "16"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory, multieye_raw) -> dict[str, Path]:
    from kdcli.synth.brats import synth_brats
    from kdcli.synth.cxr import synth_cxr

    root = tmp_path_factory.mktemp("bad-data")
    synth_cxr(root / "nih", per_class=1, size=64, layout="nih", gaze="none", seed=0)
    synth_cxr(root / "mimic", per_class=1, size=64, layout="mimic", gaze="none", seed=0)
    synth_brats(root / "brats", cases=3, size=32, seed=0)
    return {"multieye": multieye_raw, "nih": root / "nih", "mimic": root / "mimic", "brats": root / "brats"}


def source_of(layout: str) -> str:
    return {"nih": "cxr", "mimic": "cxr"}.get(layout, layout)


def prepare(layout: str, raw: Path, out: Path, *extra: str):
    source = source_of(layout)
    options = ["--boxes", raw / "BBox_List_2017.csv"] if layout == "nih" else []
    return kdcli_run("prepare", source, raw, "--out", out, "--size", SIZE[source], *options, *extra, ok=False)


@pytest.fixture(scope="module")
def earlier(phantoms, tmp_path_factory) -> dict[str, Path]:
    """A good dataset per layout, to stand at --out while a bad prepare runs with --overwrite."""
    root = tmp_path_factory.mktemp("earlier")
    made = {}
    for layout, raw in phantoms.items():
        result = prepare(layout, raw, root / layout)
        assert result.exit_code == 0, result.output
        made[layout] = root / layout
    return made


# ------------------------------------------------------------------ editing the phantoms


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def csv_rows(path: Path) -> list[list[str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as handle:
        return list(csv.reader(handle))


def write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def garble(path: Path, line: int = 2) -> None:
    """Latin-1 bytes (not UTF-8) into one line of a text file, as a spreadsheet export leaves them."""
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1][:4] + b"\xe9\xff" + lines[line - 1][4:]
    path.write_bytes(b"\n".join(lines))


def fundus_list(raw: Path, split: str = "train") -> Path:
    return raw / "assemble" / split / "large9cls.txt"


def multieye_image(raw: Path, name: str, modality: str = "oct") -> Path:
    folder = "assemble_oct/train/ImageData/oct-filter-448x448" if modality == "oct" else \
        "assemble/train/ImageData/cfp-clahe-224x224"
    return next((raw / folder).glob(f"{name}.*"))


def first_listed(path: Path) -> tuple[str, int]:
    line = next(line for line in lines_of(path) if line.strip())
    name, label = line.split("\t") if "\t" in line else line.rsplit(None, 1)
    return name.strip(), int(label)


def oct_list(raw: Path, split: str = "train") -> Path:
    return raw / "assemble_oct" / split / "large9cls.txt"


def repeat_with_other_label(raw: Path) -> list[str]:
    path = fundus_list(raw)
    name, label = first_listed(path)
    write_lines(path, [*lines_of(path), f"{name} {(label + 1) % 9}"])
    return [path.name, name, "listed again with label"]


def garble_list(raw: Path) -> list[str]:
    garble(fundus_list(raw), 1)
    return [str(fundus_list(raw)), "line 1", "not UTF-8"]


def garble_unlabeled_list(raw: Path) -> list[str]:
    path = raw / "assemble" / "train" / "unlabeled.txt"
    path.write_bytes(b"x\xff\xfe.png\n")
    return [str(path), "line 1", "not UTF-8"]


def nan_tiff(raw: Path) -> list[str]:
    name, _ = first_listed(oct_list(raw))
    image = multieye_image(raw, name)
    pixels = cv2.imread(str(image), cv2.IMREAD_UNCHANGED).astype(np.float32)
    pixels[0, 0] = np.nan
    image.unlink()
    cv2.imwrite(str(image.with_suffix(".tiff")), pixels)
    return [f"{name}.tiff", "NaN"]


def name_in_two_splits(raw: Path) -> list[str]:
    name, label = first_listed(oct_list(raw))
    write_lines(oct_list(raw, "test"), [*lines_of(oct_list(raw, "test")), f"{name}\t{label}"])
    return ["large9cls.txt", name, "also listed in split"]


# ChestX-ray14: Data_Entry_2017.csv, train_val_list.txt, test_list.txt, BBox_List_2017.csv


def entry_rows(raw: Path) -> list[list[str]]:
    return csv_rows(raw / "Data_Entry_2017.csv")


def patient_images(raw: Path) -> dict[str, list[str]]:
    images: dict[str, list[str]] = {}
    for row in entry_rows(raw)[1:]:
        images.setdefault(row[3], []).append(row[0])
    return images


def split_a_patient(raw: Path) -> list[str]:
    train = lines_of(raw / "train_val_list.txt")
    patient, images = next((p, i) for p, i in patient_images(raw).items() if len(i) > 1 and set(i) <= set(train))
    write_lines(raw / "train_val_list.txt", [n for n in train if n != images[0]])
    write_lines(raw / "test_list.txt", [*lines_of(raw / "test_list.txt"), images[0]])
    return [str(raw), "patient leakage", f"'{patient}'", "--allow-leakage"]


def image_in_both_lists(raw: Path) -> list[str]:
    name = lines_of(raw / "train_val_list.txt")[0]
    write_lines(raw / "test_list.txt", [*lines_of(raw / "test_list.txt"), name])
    return ["test_list.txt", name, "also in train_val_list.txt"]


def entry_twice_other_labels(raw: Path) -> list[str]:
    rows = entry_rows(raw)
    twin = list(rows[1])
    twin[1] = "Hernia" if twin[1] != "Hernia" else "Mass"
    write_csv(raw / "Data_Entry_2017.csv", [*rows, twin])
    return ["Data_Entry_2017.csv", twin[0], f"line {len(rows) + 1}", "listed again"]


def garble_data_entry(raw: Path) -> list[str]:
    garble(raw / "Data_Entry_2017.csv", 3)
    return ["Data_Entry_2017.csv", "line 3", "not UTF-8"]


def garble_train_list(raw: Path) -> list[str]:
    garble(raw / "train_val_list.txt", 2)
    return ["train_val_list.txt", "line 2", "not UTF-8"]


def garble_boxes(raw: Path) -> list[str]:
    garble(raw / "BBox_List_2017.csv", 2)
    return ["BBox_List_2017.csv", "line 2", "not UTF-8"]


# MIMIC-CXR: mimic-cxr-2.0.0-{split,chexpert,metadata}.csv


def chexpert_two(raw: Path) -> list[str]:
    path = raw / "mimic-cxr-2.0.0-chexpert.csv"
    rows = csv_rows(path)
    rows[1][rows[0].index("Cardiomegaly")] = "2.0"
    write_csv(path, rows)
    return [path.name, "line 2", "Cardiomegaly is '2.0'"]


def subject_in_train_and_test(raw: Path) -> list[str]:
    path = raw / "mimic-cxr-2.0.0-split.csv"
    rows = csv_rows(path)
    train = next(r for r in rows[1:] if r[3] == "train")
    test = next(r for r in rows[1:] if r[3] == "test")
    _move_subject(raw, test, train[2])
    return [str(raw), "patient leakage", f"'{train[2]}'"]


def _move_subject(raw: Path, row: list[str], subject: str) -> None:
    """Give the image of split-CSV `row` to `subject`: its CSV rows and its file's folder follow."""
    dicom, study, old = row[0], row[1], row[2]
    for name in ("split", "metadata", "chexpert"):
        path = raw / f"mimic-cxr-2.0.0-{name}.csv"
        rows = csv_rows(path)
        at = rows[0].index("subject_id")
        for r in rows[1:]:
            if r[at] == old and r[rows[0].index("study_id")] == study:
                r[at] = subject
        write_csv(path, rows)
    source = next((raw / "files" / f"p{old[:2]}" / f"p{old}" / f"s{study}").glob(f"{dicom}.*"))
    target = raw / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
    target.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), target / source.name)


def split_row_twice_other_split(raw: Path) -> list[str]:
    path = raw / "mimic-cxr-2.0.0-split.csv"
    rows = csv_rows(path)
    twin = list(rows[1])
    twin[3] = "test" if twin[3] != "test" else "train"
    write_csv(path, [*rows, twin])
    return [path.name, twin[0], "listed again"]


def garble_chexpert(raw: Path) -> list[str]:
    garble(raw / "mimic-cxr-2.0.0-chexpert.csv", 2)
    return ["mimic-cxr-2.0.0-chexpert.csv", "line 2", "not UTF-8"]


def garble_gzipped_split(raw: Path) -> list[str]:
    path = raw / "mimic-cxr-2.0.0-split.csv"
    garble(path, 2)
    with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
        handle.write(path.read_bytes())
    path.unlink()
    return ["mimic-cxr-2.0.0-split.csv.gz", "line 2", "not UTF-8"]


# BraTS


def splits_file(raw: Path, text: bytes) -> Path:
    path = raw.parent / f"{raw.name}-splits.csv"
    path.write_bytes(text)
    return path


@dataclass
class Bad:
    layout: str
    edit: Callable[[Path], list[str]]
    extra: tuple[str, ...] = ()
    exit_code: int = 1


def ratio_case(value: str) -> Bad:
    return Bad("brats", lambda raw: ["--ratios", repr(value)], ("--ratios", value), exit_code=2)


REFUSED = {
    "multieye: name twice, other label": Bad("multieye", repeat_with_other_label),
    "multieye: list not UTF-8": Bad("multieye", garble_list),
    "multieye: unlabeled list not UTF-8": Bad("multieye", garble_unlabeled_list),
    "multieye: NaN pixel in a float TIFF": Bad("multieye", nan_tiff),
    "multieye: name in two splits": Bad("multieye", name_in_two_splits),
    "nih: patient in train_val and test lists": Bad("nih", split_a_patient),
    "nih: image in both lists": Bad("nih", image_in_both_lists),
    "nih: Data_Entry row twice, other labels": Bad("nih", entry_twice_other_labels),
    "nih: Data_Entry not UTF-8": Bad("nih", garble_data_entry),
    "nih: train_val_list not UTF-8": Bad("nih", garble_train_list),
    "nih: BBox_List not UTF-8": Bad("nih", garble_boxes),
    "mimic: CheXpert value 2.0": Bad("mimic", chexpert_two),
    "mimic: subject in train and test": Bad("mimic", subject_in_train_and_test),
    "mimic: split row twice, other split": Bad("mimic", split_row_twice_other_split),
    "mimic: chexpert CSV not UTF-8": Bad("mimic", garble_chexpert),
    "mimic: gzipped split CSV not UTF-8": Bad("mimic", garble_gzipped_split),
    "brats: ratios summing to 0.9": ratio_case("0.7,0.1,0.1"),
    "brats: ratios summing to 10": ratio_case("7,1,2"),
    "brats: a negative ratio": ratio_case("0.8,0.3,-0.1"),
    "brats: splits CSV not UTF-8": Bad("brats", lambda raw: [str(splits_file(raw, b"case,split\nx\xff,train\n")),
                                                             "line 2", "not UTF-8"]),
}


def _with_splits_option(raw: Path, extra: tuple[str, ...]) -> tuple[str, ...]:
    path = raw.parent / f"{raw.name}-splits.csv"
    return (*extra, "--splits", str(path)) if path.is_file() else extra


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_data_is_refused_in_one_line(phantoms, earlier, tmp_path, case):
    bad = REFUSED[case]
    raw = tmp_path / bad.layout
    shutil.copytree(phantoms[bad.layout], raw)
    needles = bad.edit(raw)
    out = tmp_path / "out"
    shutil.copytree(earlier[bad.layout], out)
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    result = prepare(bad.layout, raw, out, *_with_splits_option(raw, bad.extra), "--overwrite")
    assert result.exit_code == bad.exit_code, result.output
    assert_one_line_error(result, *needles)
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_leakage_can_be_allowed_and_is_recorded(phantoms, tmp_path):
    raw = tmp_path / "nih"
    shutil.copytree(phantoms["nih"], raw)
    needles = split_a_patient(raw)
    result = prepare("nih", raw, tmp_path / "out", "--allow-leakage")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["prepare"]["allow_leakage"] is True
    leak = meta["data_warnings"]["patient_leakage"]
    assert leak["count"] == 1 and leak["examples"][0].startswith(needles[2].strip("'"))
    assert "warning: 1 x patients with records in several splits" in result.output


# ------------------------------------------------------------------ kept, repaired and counted


def repeat_with_same_label(raw: Path) -> str:
    path = fundus_list(raw)
    name, label = first_listed(path)
    write_lines(path, [*lines_of(path), f"{name} {label}"])
    return name


def float_tiff(raw: Path) -> str:
    name, _ = first_listed(oct_list(raw))
    image = multieye_image(raw, name)
    pixels = cv2.imread(str(image), cv2.IMREAD_UNCHANGED).astype(np.float32) * (1000.0 / 255.0)  # 0..1000
    image.unlink()
    cv2.imwrite(str(image.with_suffix(".tiff")), pixels)
    return name


def entry_twice_same(raw: Path) -> str:
    rows = entry_rows(raw)
    write_csv(raw / "Data_Entry_2017.csv", [*rows, rows[1]])
    return rows[1][0]


def list_line_twice(raw: Path) -> str:
    name = lines_of(raw / "test_list.txt")[0]
    write_lines(raw / "test_list.txt", [*lines_of(raw / "test_list.txt"), name])
    return name


def split_row_twice_same(raw: Path) -> str:
    path = raw / "mimic-cxr-2.0.0-split.csv"
    rows = csv_rows(path)
    write_csv(path, [*rows, rows[1]])
    return rows[1][0]


def box_rows(raw: Path) -> list[list[str]]:
    return csv_rows(raw / "BBox_List_2017.csv")


def box_off_image(raw: Path) -> str:
    rows = box_rows(raw)
    name = rows[1][0]
    write_csv(raw / "BBox_List_2017.csv", [rows[0], [name, rows[1][1], "5000", "5000", "10", "10"], *rows[2:]])
    return name


def box_partly_off_image(raw: Path) -> str:
    rows = box_rows(raw)
    name = rows[1][0]
    write_csv(raw / "BBox_List_2017.csv", [rows[0], [name, rows[1][1], "-20", "-20", "40", "40"], *rows[2:]])
    return name


def nan_voxels(raw: Path) -> str:
    path = next(raw.glob("*/*_flair.nii.gz"))
    image = nib.load(path)
    voxels = np.asarray(image.get_fdata(dtype=np.float32))
    voxels[:4, :4, :] = np.nan
    voxels[voxels.shape[0] // 2, voxels.shape[1] // 2, voxels.shape[2] // 2] = np.nan  # one inside the brain too
    nib.save(nib.Nifti1Image(voxels, image.affine), path)
    return path.parent.name


KEPT = {
    "multieye: name twice, same label": ("multieye", repeat_with_same_label, "duplicate_entry", 1),
    "multieye: float32 TIFF of 0..1000": ("multieye", float_tiff, "image_rescaled", 1),
    "nih: Data_Entry row twice": ("nih", entry_twice_same, "duplicate_row", 1),
    "nih: test_list line twice": ("nih", list_line_twice, "duplicate_list_line", 1),
    "mimic: split row twice": ("mimic", split_row_twice_same, "duplicate_row", 1),
    "nih: box off the image": ("nih", box_off_image, "box_off_image", 1),
    "nih: box partly off the image": ("nih", box_partly_off_image, "box_clipped", 1),
    "brats: NaN voxels in FLAIR": ("brats", nan_voxels, "nonfinite_voxels", 1),
}


def stored(out: Path, record: str, array: str) -> np.ndarray:
    manifest = pl.read_parquet(out / "manifest.parquet").filter(pl.col("record").is_in([record, f"oct:{record}"]))
    shard, index = manifest["shard"][0], int(manifest["index"][0])
    with h5py.File(out / "shards" / shard, "r") as handle:
        return handle[array][index]


@pytest.mark.parametrize("case", list(KEPT))
def test_bad_data_kept_is_repaired_and_counted(phantoms, tmp_path, case):
    layout, edit, kind, count = KEPT[case]
    raw = tmp_path / layout
    shutil.copytree(phantoms[layout], raw)
    name = edit(raw)
    out = tmp_path / "out"
    result = prepare(layout, raw, out)
    assert result.exit_code == 0, result.output
    warnings = json.loads((out / "dataset.json").read_text())["data_warnings"]
    assert set(warnings) == {kind} and warnings[kind]["count"] == count, warnings
    assert name in warnings[kind]["examples"][0]
    assert f"warning: {count} x {warnings[kind]['message']}" in result.output
    inspected = kdcli_run("inspect", out, ok=False)
    assert inspected.exit_code == 0 and f"data warning: {count} x {warnings[kind]['message']}" in inspected.output
    manifest = pl.read_parquet(out / "manifest.parquet")
    assert manifest["id"].n_unique() == manifest.height  # never the same sample twice
    if kind == "image_rescaled":
        oct_image = stored(out, name, "oct")
        assert oct_image.max() == 255 and (oct_image < 250).mean() > 0.5  # scaled, not clipped to white
    if kind == "nonfinite_voxels":
        for shard in (out / "shards").glob("*.h5"):
            with h5py.File(shard, "r") as handle:
                assert np.isfinite(handle["flair"][:]).all()
    if kind in ("box_off_image", "box_clipped"):
        annotated, mask = stored(out, name, "annotated"), stored(out, name, "boxes")
        boxes_left = kind == "box_clipped" or any(r[0] == name for r in box_rows(raw)[2:])
        assert bool(annotated[1]) == boxes_left and bool(mask.any()) == boxes_left
        if kind == "box_clipped":
            assert mask[0, 0, 0] == 255  # the clipped box starts at the image's corner


def test_warnings_are_the_same_from_workers_and_from_parts(phantoms, tmp_path):
    """Warnings met reading records in worker processes, or in the parts of a `--part I/N` run, reach dataset.json
    just as from a single process."""
    raw = tmp_path / "multieye"
    shutil.copytree(phantoms["multieye"], raw)
    float_tiff(raw)
    repeat_with_same_label(raw)
    assert prepare("multieye", raw, tmp_path / "a").exit_code == 0
    assert prepare("multieye", raw, tmp_path / "b", "--workers", "2").exit_code == 0
    for part in ("1/2", "2/2"):
        assert prepare("multieye", raw, tmp_path / "c", "--part", part, "--shard-size", "8").exit_code == 0
    kdcli_run("prepare", "merge", tmp_path / "c")
    a, b, c = (json.loads((tmp_path / n / "dataset.json").read_text())["data_warnings"] for n in "abc")
    assert set(a) == {"duplicate_entry", "image_rescaled"} and a == b == c


# ------------------------------------------------------------------ a set too small to train on


def test_a_cxr_dev_split_without_both_outcomes_is_refused_before_training(phantoms, tmp_path):
    out = tmp_path / "cxr"
    assert prepare("nih", phantoms["nih"], out).exit_code == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"]["xray"]["dev"] == 1  # one dev image: every label has one outcome only
    result = kdcli_run("teach", "--data", out, "--out", tmp_path / "x.pt", "--model", "test_resnet", "--epochs", "1",
                       "--workers", "0", "--batch-size", "4", ok=False)
    assert_one_line_error(result, str(out), "no label with both positive and negative")
    assert not list(tmp_path.glob("x*"))
