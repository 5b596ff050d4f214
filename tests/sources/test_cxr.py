"""prepare on chest X-ray phantoms (ChestX-ray14 + EGD-CXR + boxes, MIMIC-CXR + REFLACX): labels and the uncertain
policies, DICOM polarity, 16-bit PNGs, gaze heatmaps and box masks where the findings are, patient-wise splits,
and one-line errors (or notes with skip_bad) for damaged input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kdcli.errors import KdcliError
from kdcli.prepare import PrepareOptions, prepare
from kdcli.shards.reader import ShardStore
from kdcli.sources import SOURCES
from kdcli.sources.cxr import CHEXPERT_LABELS, NIH_LABELS, CxrSource
from kdcli.synth.cxr import synth_cxr

if "cxr" not in SOURCES:  # until the registry lists it
    SOURCES.add("cxr", "kdcli.sources.cxr:CxrSource", "chest X-rays (ChestX-ray14 / MIMIC-CXR) + gaze and boxes")

SYNTH = 96  # phantom pixels
SIZE = 64  # stored pixels
SCALE = SIZE / SYNTH
NIH = {"per_class": 2, "size": SYNTH, "layout": "nih", "gaze": "egd", "annotated_fraction": 0.5,
       "dicom_fraction": 0.3, "seed": 0}
MIMIC = {**NIH, "layout": "mimic", "gaze": "reflacx"}


def run(raw: Path, out: Path, **source_options) -> object:
    return prepare(PrepareOptions(source="cxr", raw=raw, out=out, size=SIZE, source_options=source_options))


def stored(out: Path) -> tuple[dict, pl.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """dataset.json, manifest and every array of every image, by id."""
    meta = json.loads((out / "dataset.json").read_text())
    manifest = pl.read_parquet(out / "manifest.parquet")
    store = ShardStore(out)
    arrays = {row["id"]: {name: store.read(row["shard"], row["index"], name)
                          for name in ("xray", "labels", "gaze", "boxes", "annotated")}
              for row in store.rows().iter_rows(named=True)}
    store.close()
    return meta, manifest, arrays


def copy_raw(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def nih(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cxr") / "nih"
    return root, synth_cxr(root, **NIH)


@pytest.fixture(scope="module")
def mimic(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cxr") / "mimic"
    return root, synth_cxr(root, **MIMIC)


@pytest.fixture(scope="module")
def nih_out(nih, tmp_path_factory) -> tuple[Path, object]:
    raw, _ = nih
    out = tmp_path_factory.mktemp("out") / "nih"
    result = run(raw, out, gaze=str(raw / "egd-cxr"), boxes=str(raw / "BBox_List_2017.csv"), egd_sigma=3.0)
    return out, result


def near_finding(heat: np.ndarray, centres: dict[str, list[float]], within: float) -> bool:
    y, x = np.unravel_index(int(np.argmax(heat[:, :, 0])), heat.shape[:2])
    return min(np.hypot(x + 0.5 - cx * SCALE, y + 0.5 - cy * SCALE) for cx, cy in centres.values()) <= within


# ---------------------------------------------------------------- ChestX-ray14 + EGD-CXR + boxes


def test_nih_labels_splits_and_layout(nih, nih_out) -> None:
    _, info = nih
    out, result = nih_out
    meta, manifest, arrays = stored(out)
    assert meta["classes"] == NIH_LABELS and meta["task"] == "multilabel"
    assert set(meta["targets"]) == {"labels", "gaze", "boxes", "annotated"}
    assert meta["targets"]["labels"]["shape"] == [14] and meta["targets"]["gaze"]["kind"] == "heatmap"
    assert meta["modalities"] == {"xray": {"shape": [SIZE, SIZE, 1], "dtype": "uint8"}}
    assert meta["extra"]["layout"] == "nih" and meta["extra"]["gaze_source"] == "egd"
    assert set(manifest["modality"]) == {"xray"}
    assert set(manifest["id"]) == set(info["images"]) and len(arrays) == info["n_images"]
    for name, image in info["images"].items():
        expected = np.array([int(label in image["findings"]) for label in NIH_LABELS], np.uint8)
        np.testing.assert_array_equal(arrays[name]["labels"], expected, err_msg=name)
        row = manifest.filter(pl.col("id") == name).row(0, named=True)
        assert row["label"] == int(bool(image["findings"]))
        assert row["group"] == str(image["patient"])
        assert (row["split"] == "test") == (image["split"] == "test"), name  # official lists kept
    patients = {s: set(manifest.filter(pl.col("split") == s)["group"]) for s in ("train", "dev", "test")}
    assert patients["dev"] and patients["train"] and patients["test"]
    assert not (patients["train"] & patients["dev"] or patients["train"] & patients["test"]
                or patients["dev"] & patients["test"])
    assert any("outside their image dropped" in note for note in result.notes)  # the phantom's off-image points


def test_nih_gaze_boxes_and_annotated_flags(nih, nih_out) -> None:
    _, info = nih
    out, _ = nih_out
    meta, manifest, arrays = stored(out)
    checked = 0
    for name, image in info["images"].items():
        a = arrays[name]
        if not image["annotated"]:
            assert not a["gaze"].any() and not a["boxes"].any(), name
            np.testing.assert_array_equal(a["annotated"], [0, 0])
            continue
        assert a["gaze"].max() == 255
        np.testing.assert_array_equal(a["annotated"], [1, int(bool(image["boxes"]))])
        if image["findings"]:  # the gaze gathers on the lesions, labelled or below the threshold
            checked += 1
            lesions = {f: lesion["centre"] for f, lesion in image["lesions"].items()}
            assert near_finding(a["gaze"], lesions, within=8), name
        inside = np.zeros((SIZE, SIZE), bool)
        for x, y, w, h in image["boxes"].values():  # every box's interior is marked, and nothing far outside
            x0, y0, x1, y1 = (int(np.floor(v * SCALE)) for v in (x, y, x + w, y + h))
            assert a["boxes"][(y0 + y1) // 2, (x0 + x1) // 2, 0] == 255, name
            assert (a["boxes"][y0 + 1 : y1, x0 + 1 : x1] == 255).all(), name
            inside[max(0, y0 - 1) : y1 + 2, max(0, x0 - 1) : x1 + 2] = True
        assert not a["boxes"][~inside].any(), name
    assert checked >= 4
    train = manifest.filter(pl.col("split") == "train")["id"].to_list()
    measured = np.mean([arrays[i]["annotated"].any() for i in train])
    assert meta["extra"]["annotated_fraction"] == pytest.approx(measured)
    assert 0 < measured < 1


def test_egd_sigma_changes_the_spread(nih) -> None:
    raw, info = nih
    name = next(n for n in info["annotated"] if info["images"][n]["findings"])
    spread = {}
    for sigma in (2.0, 10.0):
        source = CxrSource(gaze=str(raw / "egd-cxr"), egd_sigma=sigma)
        record = next(r for r in source.scan(raw).records if r.id == name)
        heat = source.load(record, SIZE)["gaze"]
        spread[sigma] = int((heat > 127).sum())
    assert spread[10.0] > 3 * spread[2.0] > 0


def test_dicom_and_16bit_png_decode_like_the_png(nih, nih_out, tmp_path) -> None:
    """The same chests written as 8-bit PNGs only: DICOM (either photometric) and 16-bit PNGs must match them."""
    _, info = nih
    plain_raw = tmp_path / "plain"
    synth_cxr(plain_raw, **{**NIH, "dicom_fraction": 0.0, "gaze": "none"})
    run(plain_raw, tmp_path / "plain_out")
    _, _, reference = stored(tmp_path / "plain_out")
    _, _, arrays = stored(nih_out[0])
    kinds = {"mono1": [], "mono2": [], "png16": []}
    for name, image in info["images"].items():
        kind = ("mono1" if image["monochrome1"] else "mono2") if image["dicom"] else (
            "png16" if image["bits"] == 16 else None)
        if kind:
            a, b = arrays[name]["xray"].astype(float).ravel(), reference[name]["xray"].astype(float).ravel()
            kinds[kind].append(np.corrcoef(a, b)[0, 1])
            if kind == "png16":  # scaled by its own range: uses the 8-bit range
                assert arrays[name]["xray"].max() - arrays[name]["xray"].min() > 200
    assert all(kinds.values()), kinds
    assert min(min(v) for v in kinds.values()) > 0.9, kinds  # an uninverted MONOCHROME1 would be near -1


def test_infiltrate_is_normalised(nih, tmp_path) -> None:
    raw = copy_raw(nih[0], tmp_path / "raw")
    name = next(n for n in nih[1]["annotated"] if nih[1]["images"][n]["boxes"])
    entry = (raw / "Data_Entry_2017.csv").read_text().splitlines()
    for number, line in enumerate(entry):
        if line.startswith(f"{name},"):
            fields = line.split(",")
            fields[1] = "Infiltration" if fields[1] == "No Finding" else f"{fields[1]}|Infiltration"
            entry[number] = ",".join(fields)
    (raw / "Data_Entry_2017.csv").write_text("\n".join(entry) + "\n")
    box_lines = (raw / "BBox_List_2017.csv").read_text().splitlines()
    box_lines.append(f"{name},Infiltrate,10.0,12.0,8.0,8.0")
    (raw / "BBox_List_2017.csv").write_text("\n".join(box_lines) + "\n")
    result = run(raw, tmp_path / "out", boxes=str(raw / "BBox_List_2017.csv"))
    assert any("'Infiltrate' read as 'Infiltration'" in note for note in result.notes)
    _, _, arrays = stored(tmp_path / "out")
    assert arrays[name]["labels"][NIH_LABELS.index("Infiltration")] == 1
    assert arrays[name]["boxes"][int(16 * SCALE), int(14 * SCALE), 0] == 255  # the Infiltrate box is drawn


# ---------------------------------------------------------------- MIMIC-CXR + REFLACX


def chexpert_values(raw: Path) -> dict[str, dict[str, str]]:
    """dicom_id -> CheXpert column -> raw cell text."""
    with open(raw / "mimic-cxr-2.0.0-chexpert.csv", newline="") as handle:
        by_study = {(r["subject_id"], r["study_id"]): r for r in csv.DictReader(handle)}
    with open(raw / "mimic-cxr-2.0.0-split.csv", newline="") as handle:
        return {r["dicom_id"]: by_study[(r["subject_id"], r["study_id"])] for r in csv.DictReader(handle)}


@pytest.mark.parametrize("policy, uncertain_value", [("ones", 1), ("zeros", 0), ("ignore", 255)])
def test_mimic_uncertain_policies(mimic, tmp_path, policy, uncertain_value) -> None:
    raw, info = mimic
    run(raw, tmp_path / "out", uncertain=policy)
    meta, manifest, arrays = stored(tmp_path / "out")
    assert meta["classes"] == CHEXPERT_LABELS and meta["extra"]["uncertain"] == policy
    cells = chexpert_values(raw)
    seen_uncertain = 0
    for name, image in info["images"].items():
        got = arrays[name]["labels"]
        for column, value in zip(CHEXPERT_LABELS, got, strict=True):
            text = cells[name][column]
            expected = uncertain_value if text == "-1.0" else int(text == "1.0")  # blank and 0.0: negative
            seen_uncertain += text == "-1.0"
            assert value == expected, (name, column, text)
        for finding in image["findings"]:  # the summary's ground truth: positive or uncertain, never negative
            assert got[CHEXPERT_LABELS.index(info["label_map"]["mimic"][finding])] in (1, uncertain_value)
        row = manifest.filter(pl.col("id") == name).row(0, named=True)
        assert row["split"] == {"train": "train", "validate": "dev", "test": "test"}[image["split"]]
        assert row["group"] == str(image["patient"])
    assert seen_uncertain > 0


def test_mimic_reflacx_heatmaps_and_discarded(mimic, tmp_path) -> None:
    raw, info = mimic
    result = run(raw, tmp_path / "out", gaze=str(raw / "reflacx"))
    meta, manifest, arrays = stored(tmp_path / "out")
    assert meta["extra"]["gaze_source"] == "reflacx"
    kept, dropped = set(), set()
    for meta_csv in sorted((raw / "reflacx" / "main_data").glob("metadata_phase_*.csv")):
        with open(meta_csv, newline="") as handle:
            for row in csv.DictReader(handle):
                (dropped if row["eye_tracking_data_discarded"] == "True" else kept).add(row["dicom_id"])
    only_dropped = dropped - kept
    assert only_dropped, "the phantom should discard some readings"
    assert any("eye_tracking_data_discarded" in note for note in result.notes)
    near = 0
    for name, image in info["images"].items():
        gaze = arrays[name]["gaze"]
        if name in kept:
            assert gaze.max() == 255 and arrays[name]["annotated"][0] == 1
            near += bool(image["findings"]) and near_finding(gaze, image["centres"], within=10)
        else:  # never read, or only readings whose eye tracking was discarded
            assert not gaze.any() and arrays[name]["annotated"][0] == 0, name
        assert not arrays[name]["boxes"].any()
    assert near >= 0.6 * sum(bool(info["images"][n]["findings"]) for n in kept)
    patients = {s: set(manifest.filter(pl.col("split") == s)["group"]) for s in ("train", "dev", "test")}
    assert not (patients["train"] & patients["test"] or patients["train"] & patients["dev"])


# ---------------------------------------------------------------- bad input: one line naming the file, or a note


def one_line_error(raw: Path, out: Path, *pieces: str, **options) -> None:
    with pytest.raises(KdcliError) as caught:
        run(raw, out, **options)
    message = str(caught.value)
    assert "\n" not in message
    for piece in pieces:
        assert piece in message, (piece, message)
    assert not out.exists()


def entry_line(raw: Path, name: str) -> int:
    lines = (raw / "Data_Entry_2017.csv").read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.startswith(name + ","))


def test_missing_image(nih, tmp_path) -> None:
    raw = copy_raw(nih[0], tmp_path / "raw")
    name = next(n for n, i in nih[1]["images"].items() if not i["dicom"] and not i["annotated"])
    (raw / nih[1]["images"][name]["path"]).unlink()
    one_line_error(raw, tmp_path / "out", "Data_Entry_2017.csv", f"line {entry_line(raw, name)}", name)
    result = run(raw, tmp_path / "out", skip_bad=True)
    assert any(name in note and "not found" in note for note in result.notes)
    assert name not in set(pl.read_parquet(tmp_path / "out" / "manifest.parquet")["id"])


def test_unexpected_data_entry_header(nih, tmp_path) -> None:
    raw = copy_raw(nih[0], tmp_path / "raw")
    text = (raw / "Data_Entry_2017.csv").read_text()
    (raw / "Data_Entry_2017.csv").write_text(text.replace("Image Index,Finding Labels", "Image,Labels", 1))
    one_line_error(raw, tmp_path / "out", "Data_Entry_2017.csv", "unexpected header", "Image Index,Finding Labels")


def test_unknown_label_in_data_entry(nih, tmp_path) -> None:
    raw = copy_raw(nih[0], tmp_path / "raw")
    name = next(n for n, i in nih[1]["images"].items() if i["findings"])
    path = raw / "Data_Entry_2017.csv"
    path.write_text(path.read_text().replace(f"{name},", f"{name},Pneumonitis|", 1))
    one_line_error(raw, tmp_path / "out", "Data_Entry_2017.csv", f"line {entry_line(raw, name)}", "'Pneumonitis'")
    result = run(raw, tmp_path / "out", skip_bad=True)
    assert any("Pneumonitis" in note for note in result.notes)
    assert name not in set(pl.read_parquet(tmp_path / "out" / "manifest.parquet")["id"])


def test_unknown_label_in_bbox(nih, tmp_path) -> None:
    raw = copy_raw(nih[0], tmp_path / "raw")
    path = raw / "BBox_List_2017.csv"
    lines = path.read_text().splitlines()
    name = lines[1].split(",")[0]
    fields = lines[1].split(",")
    fields[1] = "Blob"
    lines[1] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    one_line_error(raw, tmp_path / "out", "BBox_List_2017.csv", "line 2", name, "'Blob'", boxes=str(path))


def test_fixation_for_unknown_image(nih, tmp_path) -> None:
    raw = copy_raw(nih[0], tmp_path / "raw")
    path = raw / "egd-cxr" / "fixations.csv"
    lines = path.read_text().splitlines()
    fields = lines[1].split(",")
    fields[1] = "99999999_000"
    lines.append(",".join(fields))
    path.write_text("\n".join(lines) + "\n")
    one_line_error(raw, tmp_path / "out", "fixations.csv", f"line {len(lines)}", "99999999_000",
                   gaze=str(raw / "egd-cxr"))
    result = run(raw, tmp_path / "out", gaze=str(raw / "egd-cxr"), skip_bad=True)
    assert any("99999999_000" in note for note in result.notes)
    assert pl.read_parquet(tmp_path / "out" / "manifest.parquet").height == nih[1]["n_images"]


def test_unreadable_dicom(nih, tmp_path) -> None:
    raw = copy_raw(nih[0], tmp_path / "raw")
    name = next(n for n, i in nih[1]["images"].items() if i["dicom"] and not i["annotated"])
    dicom = raw / nih[1]["images"][name]["path"]
    dicom.write_bytes(b"not a dicom file at all" * 10)
    one_line_error(raw, tmp_path / "out", str(dicom), "unreadable DICOM")
    result = run(raw, tmp_path / "out", skip_bad=True)
    assert any(note.startswith(f"skipped {name}") and "unreadable DICOM" in note for note in result.notes)
    ids = set(pl.read_parquet(tmp_path / "out" / "manifest.parquet")["id"])
    assert name not in ids and len(ids) == nih[1]["n_images"] - 1
