"""The chest X-ray phantom: ChestX-ray14 and MIMIC-CXR-JPG layouts with their real headers and quirks, EGD-CXR
and REFLACX gaze on a patient-wise subset (gathered on the findings), DICOM (MONOCHROME1 inverted), subtle but
real findings where the summary says, determinism and argument checks."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from kdcli.synth.cxr import (
    BBOX_HEADER,
    CHEXPERT,
    NIH_HEADER,
    REFLACX_LABELS,
    TO_CHEXPERT,
    TO_REFLACX,
    _synth,
    synth_cxr,
)

FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Effusion", "Mass", "Nodule", "Pneumothorax")
NIH = {"per_class": 3, "size": 96, "layout": "nih", "gaze": "egd", "annotated_fraction": 0.5,
       "dicom_fraction": 0.2, "seed": 0}
MIMIC = {**NIH, "layout": "mimic", "gaze": "reflacx"}


def _read(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _dicts(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, rel: str) -> np.ndarray:
    """A grey image in [0, 1], whatever its container (8/16-bit PNG, JPEG, DICOM either photometric)."""
    if rel.endswith(".dcm"):
        ds = pydicom.dcmread(root / rel)
        v = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        return v / ((1 << ds.BitsStored) - 1)  # raw scale: MONOCHROME1 stays inverted here on purpose
    im = cv2.imread(str(root / rel), cv2.IMREAD_UNCHANGED)
    return im.astype(np.float64) / (65535.0 if im.dtype == np.uint16 else 255.0)


@pytest.fixture(scope="module")
def nih(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("nih")
    return root, synth_cxr(root, **NIH)


@pytest.fixture(scope="module")
def mimic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mimic")
    return root, synth_cxr(root, **MIMIC)


def test_summary_labels_and_counts(nih: tuple[Path, dict]) -> None:
    root, info = nih
    assert info["root"] == str(root) and info["layout"] == "nih" and info["gaze"] == "egd"
    assert tuple(info["labels"]) == FINDINGS
    imgs = info["images"]
    assert info["n_images"] == len(imgs) == 2 * 3 * len(FINDINGS)  # per_class per finding + as many normals
    assert info["counts"]["No Finding"] == 3 * len(FINDINGS)
    assert all(info["counts"][f] >= 3 for f in FINDINGS)
    assert all(len(v["findings"]) <= 2 for v in imgs.values())
    assert any(len(v["findings"]) == 2 for v in imgs.values())  # multi-label
    for v in imgs.values():
        assert set(v["boxes"]) == set(v["centres"]) == set(v["findings"])
        for f, (x, y, w, h) in v["boxes"].items():
            cx, cy = v["centres"][f]
            assert 0 <= x < cx < x + w <= 96 and 0 <= y < cy < y + h <= 96
    # the annotated subset is patient-wise and about the requested fraction
    ann = set(info["annotated"])
    assert ann == {n for n, v in imgs.items() if v["annotated"]}
    assert 0.3 < len(ann) / len(imgs) < 0.7
    by_pat: dict[int, set[bool]] = {}
    for v in imgs.values():
        by_pat.setdefault(v["patient"], set()).add(v["annotated"])
    assert all(len(s) == 1 for s in by_pat.values())


def test_nih_data_entry(nih: tuple[Path, dict]) -> None:
    root, info = nih
    text = (root / "Data_Entry_2017.csv").read_text()
    assert text.splitlines()[0] == NIH_HEADER
    header, *rows = _read(root / "Data_Entry_2017.csv")
    assert len(header) == 12 and header[7:9] == ["OriginalImage[Width", "Height]"] and header[-1] == ""
    assert len(rows) == info["n_images"]
    folders = set()
    patients: dict[int, list[int]] = {}
    for r in rows:
        assert len(r) == 12 and r[-1] == "", r  # 11 fields + trailing comma
        name, labels, fu, pid = r[0], r[1], int(r[2]), int(r[3])
        m = re.fullmatch(r"(\d{8})_(\d{3})\.png", name)
        assert m and int(m[1]) == pid and int(m[2]) == fu
        patients.setdefault(pid, []).append(fu)
        v = info["images"][name]
        assert labels == ("|".join(v["findings"]) or "No Finding")
        assert r[6] in ("PA", "AP") and r[5] in ("M", "F") and int(r[7]) > 1000 and float(r[9]) > 0
        # the file may be a DICOM under the same stem: readers fall back to it
        folder = v["path"].split("/")[0]
        folders.add(folder)
        expected = f"{folder}/images/{name}"
        assert v["listed_path"] == expected
        if v["dicom"]:
            assert not (root / expected).exists() and (root / expected[:-4]).with_suffix(".dcm").is_file()
        else:
            assert (root / expected).is_file()
    assert folders == {"images_001", "images_002"}
    assert all(sorted(f) == list(range(len(f))) for f in patients.values())
    assert any(len(f) > 1 for f in patients.values())  # follow-ups


def test_nih_bbox_and_patientwise_split(nih: tuple[Path, dict]) -> None:
    root, info = nih
    assert (root / "BBox_List_2017.csv").read_text().splitlines()[0] == BBOX_HEADER
    header, *rows = _read(root / "BBox_List_2017.csv")
    assert header == ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""]
    assert rows
    seen = set()
    for name, label, *xywh in rows:
        v = info["images"][name]
        assert v["annotated"] and label in v["findings"] and (name, label) not in seen
        seen.add((name, label))
        assert np.allclose([float(t) for t in xywh], v["boxes"][label], atol=0.06)
    n_boxes = sum(len(info["images"][n]["findings"]) for n in info["annotated"])
    assert len(rows) == n_boxes
    tv = (root / "train_val_list.txt").read_text().split()
    te = (root / "test_list.txt").read_text().split()
    assert sorted(tv + te) == sorted(info["images"]) and not set(tv) & set(te)
    pat = {n: n.split("_")[0] for n in info["images"]}
    assert not {pat[n] for n in tv} & {pat[n] for n in te}
    assert 0.1 < len(te) / (len(tv) + len(te)) < 0.35


def test_nih_mixed_bit_depths(nih: tuple[Path, dict]) -> None:
    root, info = nih
    depth = {}
    for name, v in info["images"].items():
        if not v["dicom"]:
            im = cv2.imread(str(root / v["path"]), cv2.IMREAD_UNCHANGED)
            assert im.ndim == 2 and im.shape == (96, 96)
            depth[name] = 16 if im.dtype == np.uint16 else 8
            assert depth[name] == v["bits"]
    assert 0 < sum(d == 16 for d in depth.values()) < 0.3 * len(depth)
    sixteen = next(n for n, d in depth.items() if d == 16)
    im = cv2.imread(str(root / info["images"][sixteen]["path"]), cv2.IMREAD_UNCHANGED)
    assert im.max() > 255  # really uses the 16-bit range


def test_egd_gaze(nih: tuple[Path, dict]) -> None:
    root, info = nih
    master = _dicts(root / "egd-cxr" / "master_sheet.csv")
    assert list(master[0]) == ["dicom_id", "path", "patient_id", "image_top_pad", "image_bottom_pad",
                               "image_left_pad", "image_right_pad", "Normal", "CHF", "pneumonia"]
    stems = {n[:-4]: n for n in info["annotated"]}
    assert {r["dicom_id"] for r in master} == set(stems)
    for r in master:
        v = info["images"][stems[r["dicom_id"]]]
        assert r["Normal"] == str(int(not v["findings"])) and r["path"] == v["listed_path"]
    assert (root / "egd-cxr" / "fixations.csv").read_text().splitlines()[0] == (
        "SESSION_ID,DICOM_ID,CNT,TIME(in secs),FPOGX,FPOGY,FPOGS,FPOGD,FPOGID,FPOGV,X_ORIGINAL,Y_ORIGINAL")
    fix = _dicts(root / "egd-cxr" / "fixations.csv")
    assert {r["DICOM_ID"] for r in fix} == set(stems)
    pads = {r["dicom_id"]: [int(r[f"image_{k}_pad"]) for k in ("top", "bottom", "left", "right")] for r in master}
    outside = 0
    for r in fix:
        top, bottom, left, right = pads[r["DICOM_ID"]]
        w, h = 96 + left + right, 96 + top + bottom
        assert w / h == pytest.approx(1920 / 1080, rel=0.02)  # letterboxed to the screen
        x, y = int(r["X_ORIGINAL"]), int(r["Y_ORIGINAL"])
        assert float(r["FPOGX"]) * w - left == pytest.approx(x + 0.5, abs=0.6)
        assert float(r["FPOGY"]) * h - top == pytest.approx(y + 0.5, abs=0.6)
        assert float(r["FPOGD"]) > 0 and float(r["TIME(in secs)"]) > float(r["FPOGS"])
        outside += not (0 <= x < 96 and 0 <= y < 96)
    assert 0 < outside < 0.06 * len(fix)  # a few glances off the image: readers must clip them


def _concentration(info: dict, fixations: dict[str, np.ndarray]) -> tuple[float, float]:
    """Median distance from fixations to the nearest finding centre, and the same for uniform random points."""
    rng = np.random.default_rng(0)
    d_fix, d_rand = [], []
    for name, pts in fixations.items():
        centres = np.array(list(info["images"][name]["centres"].values()))
        if not len(centres):
            continue
        pts = pts[(pts >= 0).all(1) & (pts < 96).all(1)]
        rand = rng.uniform(10, 86, (len(pts), 2))
        d_fix += list(np.linalg.norm(pts[:, None] - centres[None], axis=2).min(1))
        d_rand += list(np.linalg.norm(rand[:, None] - centres[None], axis=2).min(1))
    return float(np.median(d_fix)), float(np.median(d_rand))


def test_egd_fixations_gather_on_findings(nih: tuple[Path, dict]) -> None:
    _, info = nih
    fix: dict[str, list] = {}
    for r in _dicts(Path(info["root"]) / "egd-cxr" / "fixations.csv"):
        fix.setdefault(f"{r['DICOM_ID']}.png", []).append([int(r["X_ORIGINAL"]) + 0.5, int(r["Y_ORIGINAL"]) + 0.5])
    d_fix, d_rand = _concentration(info, {k: np.array(v) for k, v in fix.items()})
    assert d_fix < 0.4 * d_rand, (d_fix, d_rand)


def test_mimic_layout_and_csvs(mimic: tuple[Path, dict]) -> None:
    root, info = mimic
    split = _dicts(root / "mimic-cxr-2.0.0-split.csv")
    assert list(split[0]) == ["dicom_id", "study_id", "subject_id", "split"]
    assert {r["dicom_id"] for r in split} == set(info["images"])
    assert {r["split"] for r in split} <= {"train", "validate", "test"} and "train" in {r["split"] for r in split}
    subj_split: dict[str, set[str]] = {}
    for r in split:
        subj_split.setdefault(r["subject_id"], set()).add(r["split"])
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", r["dicom_id"])
        v = info["images"][r["dicom_id"]]
        rel = f"files/p{r['subject_id'][:2]}/p{r['subject_id']}/s{r['study_id']}/{r['dicom_id']}.jpg"
        assert v["listed_path"] == rel and re.fullmatch(r"1\d{7}", r["subject_id"])
        assert (root / (rel[:-4] + ".dcm" if v["dicom"] else rel)).is_file()
    assert all(len(s) == 1 for s in subj_split.values())  # split by subject
    meta = _dicts(root / "mimic-cxr-2.0.0-metadata.csv")
    assert list(meta[0])[:7] == ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                                 "ViewPosition", "Rows", "Columns"]
    assert all(r["Rows"] == r["Columns"] == "96" and r["ViewPosition"] in ("PA", "AP") for r in meta)
    jpg = next(v["path"] for v in info["images"].values() if v["path"].endswith(".jpg"))
    assert cv2.imread(str(root / jpg), cv2.IMREAD_UNCHANGED).shape == (96, 96)


def test_mimic_chexpert_labels(mimic: tuple[Path, dict]) -> None:
    root, info = mimic
    rows = _dicts(root / "mimic-cxr-2.0.0-chexpert.csv")
    assert list(rows[0]) == ["subject_id", "study_id", *CHEXPERT]
    by_study = {r["study_id"]: r for r in rows}
    values: list[str] = []
    for v in info["images"].values():
        r = by_study[v["listed_path"].split("/")[3][1:]]
        values += [r[c] for c in CHEXPERT]
        assert set(r[c] for c in CHEXPERT) <= {"1.0", "0.0", "-1.0", ""}
        present = {TO_CHEXPERT[f] for f in v["findings"]}
        assert {c for c in CHEXPERT[1:] if r[c] in ("1.0", "-1.0")} == present  # uncertain ones are true ones
        assert (r["No Finding"] == "1.0") == (not v["findings"])
    n_pos = values.count("1.0") + values.count("-1.0")
    assert 0.1 < values.count("-1.0") / n_pos < 0.5
    assert values.count("0.0") > 0 and values.count("") > 0.6 * len(values)  # mostly blank


def test_reflacx_files(mimic: tuple[Path, dict]) -> None:
    root, info = mimic
    main = root / "reflacx" / "main_data"
    meta = []
    for ph in (1, 2, 3):
        rows = _dicts(main / f"metadata_phase_{ph}.csv")
        assert rows and list(rows[0]) == ["id", "split", "eye_tracking_data_discarded", "image", "dicom_id",
                                          "subject_id", "image_size_x", "image_size_y", *REFLACX_LABELS]
        assert all(re.fullmatch(rf"P{ph}\d{{2}}R\d{{6}}", r["id"]) for r in rows)
        meta += rows
    assert {r["dicom_id"] for r in meta} == set(info["annotated"])
    assert {r["eye_tracking_data_discarded"] for r in meta} == {"True", "False"}
    assert len({r["id"] for r in meta}) == len(meta) > len(info["annotated"])  # phase 1 read twice
    fix: dict[str, np.ndarray] = {}
    outside = 0
    for r in meta:
        v = info["images"][r["dicom_id"]]
        assert r["subject_id"] == str(v["patient"]) and r["image"] == v["listed_path"][:-4] + ".dcm"
        assert {k for k in REFLACX_LABELS if int(r[k]) > 0} == {TO_REFLACX[f] for f in v["findings"]}
        d = main / r["id"]
        ell = _dicts(d / "anomaly_location_ellipses.csv")
        assert (d / "anomaly_location_ellipses.csv").read_text().startswith("xmin,ymin,xmax,ymax,certainty,")
        assert len(ell) == len(v["findings"])
        for e, f in zip(ell, v["findings"], strict=True):
            assert e[TO_REFLACX[f]] == "True" and 1 <= int(e["certainty"]) <= 5
            x, y, w, h = v["boxes"][f]
            cx, cy = (float(e["xmin"]) + float(e["xmax"])) / 2, (float(e["ymin"]) + float(e["ymax"])) / 2
            assert abs(cx - (x + w / 2)) < 5 and abs(cy - (y + h / 2)) < 5
        assert list(_dicts(d / "chest_bounding_box.csv")[0]) == ["xmin", "ymin", "xmax", "ymax"]
        rows = _read(d / "fixations.csv")
        assert ",".join(rows[0]).startswith("timestamp_start_fixation,timestamp_end_fixation,x_position,y_position")
        assert len(rows[0]) == 17 and rows[0][-1] == "ymax_in_screen_coordinates"
        pts = np.array([[float(t[2]), float(t[3])] for t in rows[1:]])
        outside += int(((pts < 0) | (pts >= 96)).any(1).sum())
        if r["id"] == min(i for i in (m["id"] for m in meta if m["dicom_id"] == r["dicom_id"])):
            fix[r["dicom_id"]] = pts
    assert outside > 0
    d_fix, d_rand = _concentration(info, fix)
    assert d_fix < 0.4 * d_rand, (d_fix, d_rand)


def test_dicom_and_monochrome1(nih: tuple[Path, dict], tmp_path: Path) -> None:
    root, info = nih
    plain = synth_cxr(tmp_path, **{**NIH, "dicom_fraction": 0.0, "gaze": "none"})
    dcm = [n for n, v in info["images"].items() if v["dicom"]]
    assert len(dcm) == round(0.2 * info["n_images"])
    kinds = set()
    for name in dcm:
        v = info["images"][name]
        ds = pydicom.dcmread(root / v["path"])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
        assert ds.Modality == "DX" and ds.BitsAllocated == 16 and ds.BitsStored in (12, 16)
        assert ds.pixel_array.max() < (1 << ds.BitsStored) and "WindowCenter" in ds and "RescaleSlope" in ds
        assert ds.PhotometricInterpretation == ("MONOCHROME1" if v["monochrome1"] else "MONOCHROME2")
        kinds.add(ds.PhotometricInterpretation)
        png = _load(tmp_path, plain["images"][name]["path"])
        r = np.corrcoef(_load(root, v["path"]).ravel(), png.ravel())[0, 1]
        assert (r < -0.98) if v["monochrome1"] else (r > 0.98), (name, r)
    assert kinds == {"MONOCHROME1", "MONOCHROME2"}


def test_findings_are_real_but_subtle(tmp_path: Path) -> None:
    args = {"per_class": 2, "size": 96, "layout": "nih", "gaze": "none", "annotated_fraction": 0.0,
            "dicom_fraction": 0.0, "seed": 3}
    info = _synth(tmp_path / "with", **args)
    _synth(tmp_path / "without", **args, draw=False)
    diffs: dict[str, list[float]] = {f: [] for f in FINDINGS}
    for v in info["images"].values():
        a, b = (_load(tmp_path / d, v["path"]) * 255 for d in ("with", "without"))
        delta = a - b
        if not v["lesions"]:  # pragma: no cover - every case of this phantom has a lesion, faint or not
            assert np.abs(delta).max() < 1e-6  # same chest, distractors, exposure and noise
            continue
        inside = np.zeros(delta.shape, bool)
        for f, lesion in v["lesions"].items():  # every lesion, labelled or below the threshold
            x, y, w, h = lesion["box"]
            box = delta[int(y): int(np.ceil(y + h)), int(x): int(np.ceil(x + w))]
            if f in v["boxes"]:  # the labelled ones: visible, yet subtle
                diffs[f].append(box.mean())
            if f != "Cardiomegaly":  # a bigger heart moves a full-contrast border: its subtlety is in the size
                # below the ~80-95-level lung/soft-tissue step: pleural fluid comes close to soft tissue at its
                # deepest, every other finding stays under it even at the top of its severity (image gain 1.3)
                assert np.abs(box).max() < (80 if f == "Effusion" else 72), f
            inside[max(0, int(y) - 3): int(np.ceil(y + h)) + 3, max(0, int(x) - 3): int(np.ceil(x + w)) + 3] = True
        assert np.abs(delta[~inside]).mean() < 0.2  # nothing changes away from the lesions
    for f, d in diffs.items():
        assert d, f
        sign = -1 if f == "Pneumothorax" else 1  # pleural air is darker; everything else is an opacity
        assert all(sign * x > 0.5 for x in d), (f, d)
        assert 2 < np.mean(np.abs(d)) < 35, (f, d)  # visible at 64 px, yet a fraction of the anatomy's contrast


# slow: synthesises both layouts three more times, once through a worker pool
@pytest.mark.slow
def test_deterministic_and_worker_independent(nih: tuple[Path, dict], mimic: tuple[Path, dict],
                                              tmp_path: Path) -> None:
    for (root, info), args in ((nih, NIH), (mimic, MIMIC)):
        tag = args["layout"]
        again = synth_cxr(tmp_path / f"{tag}-again", **args)
        synth_cxr(tmp_path / f"{tag}-pool", **args, workers=2)
        ref = _tree_bytes(root)
        assert any(k.endswith(".dcm") for k in ref)
        assert _tree_bytes(tmp_path / f"{tag}-again") == ref
        assert _tree_bytes(tmp_path / f"{tag}-pool") == ref
        assert again == {**info, "root": str(tmp_path / f"{tag}-again")}
    synth_cxr(tmp_path / "other", **{**NIH, "seed": 1})
    assert _tree_bytes(tmp_path / "other") != _tree_bytes(nih[0])
    none = synth_cxr(tmp_path / "none", **{**MIMIC, "gaze": "none"})
    assert not (tmp_path / "none" / "reflacx").exists() and not (tmp_path / "none" / "egd-cxr").exists()
    assert all(v["fixations"] is None for v in none["images"].values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per_class": 0}, "per_class"),
        ({"size": 63}, "size"),
        ({"layout": "chexpert"}, "layout"),
        ({"gaze": "tobii"}, "gaze"),
        ({"annotated_fraction": 1.5}, "annotated_fraction"),
        ({"dicom_fraction": -0.1}, "dicom_fraction"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synth_cxr(tmp_path / "x", **{**NIH, **kwargs})
    assert not any(tmp_path.iterdir())  # validated before anything is written
