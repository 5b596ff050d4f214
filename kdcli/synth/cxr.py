"""Deterministic chest X-ray phantoms with subtle findings, boxes and eye gaze on a subset, in real layouts.

Built for the two-stage coarse-to-fine CXR setting (van Sonsbeek et al., WACV 2023): global multi-label
labels on every image, plus eye-gaze fixations and disease boxes on an annotated subset only. Grey PA chests
(dark lungs, bright mediastinum and heart, ribs, clavicles, domed diaphragms, hilar vessels, exposure and noise
variation) carry 0-2 of seven ChestX-ray14 findings drawn where they occur: Nodule (small round opacity),
Mass (larger lobulated opacity), Consolidation (patchy opacity, mid/lower zone), Atelectasis (plate-like band,
lower zone), Effusion (basal opacity with a meniscus blunting the costophrenic angle), Cardiomegaly (heart
18-32% wider, half that taller; normal hearts vary by +-5%) and Pneumothorax (apical-lateral rim of air without
lung markings, darker, with a thin visceral pleural line). Each finding gets `per_class` images as the primary
finding (about a quarter of those carry a second one), plus as many "No Finding" images, as in ChestX-ray14 (~half
normal).

Findings are low contrast but sized and scaled to survive the usual 2x reduction and random crops: peak +0.11..0.24
(Pneumothorax -0.055) on a [0, 1] image whose lung field sits ~0.33 below soft tissue, pixel noise std
0.015-0.025, ribs and vessels of similar contrast; a nodule is ~3-5 px across at 64 px. So a classifier trained from
scratch on a few hundred 64-128 px images ranks them well above chance but not perfectly, some findings clearly
harder than others, and knowing where to look helps. Gaze fixations (~70% Gaussian around the findings, the rest
roaming the lungs, ~2% just off the image) and boxes gather on the findings, so gaze/box supervision carries
localisation signal.

Calibration (knobs: `_chest.AMP`, `_chest.CARDIO_SCALE`, finding sizes, anatomical variation, noise):
`kdcli demo cxr --seeds 1 --per-class 40 --size 64 --epochs 20 --annotated 0.2` (560 images at 128 px prepared
at 64 px, timm test_resnet from scratch, AdamW 3e-3, batch 32, light augmentation, patient-wise test split):
stage 1 test mean AUROC 0.77 (train 0.81): Mass 0.91, Pneumothorax 0.89, Atelectasis 0.81, Effusion 0.76,
Consolidation 0.74, Nodule 0.64, Cardiomegaly 0.63; CVI stage 2 0.80 (Effusion 0.88, Cardiomegaly 0.69, the rest
within +-0.03). Training seeds 0-2 on the same data: stage 1 0.77 / 0.76 / 0.72, CVI 0.80 / 0.82 / 0.75. One data
set, ~16 test positives per finding: a rough guide, not a benchmark. The earlier, fainter calibration (peaks
0.045-0.11, nodules ~2-3 px across at 64 px, hearts 7-17% wider against +-9% normal variation) gave ~0.51-0.54
test and ~0.6 train with this very command: not learnable by the pipeline.

Layouts:
- "nih" (ChestX-ray14): images_00N/images/<8-digit patient>_<3-digit follow-up>.png (40 per folder), 8-bit
  grey with ~10% 16-bit PNGs; Data_Entry_2017.csv (real header, 11 fields + trailing comma per row),
  BBox_List_2017.csv (malformed real header; rows for the annotated subset, one per finding, pixel x,y,w,h),
  train_val_list.txt / test_list.txt (patient-wise, ~80/20).
- "mimic" (MIMIC-CXR-JPG): files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg, one study per image; split,
  metadata and chexpert CSVs (1.0 positives, ~30% of them -1.0 uncertain, some explicit 0.0, mostly blank).
- dicom_fraction: that fraction of images is written INSTEAD as <same stem>.dcm (DX, 12- or 16-bit stored,
  RescaleSlope/Intercept, WindowCenter/Width, half MONOCHROME1 = inverted). The CSVs keep the .png/.jpg names
  (readers must fall back to the .dcm), and the summary records which images are DICOM.
- gaze "egd" (EGD-CXR: egd-cxr/master_sheet.csv, egd-cxr/fixations.csv) or "reflacx" (reflacx/main_data/...)
  for the patient-wise `annotated_fraction` subset; EGD pads are in original-image pixels, the padded image is
  16:9 and fills the 1920x1080 screen: FPOGX = (X_ORIGINAL + left_pad) / (width + left_pad + right_pad).
  REFLACX phase-1 images are read twice (two ids per image, as the real phase 1/2 readers shared images).

Every image is square (`size` px); pixel coordinates are those of the written file. The returned summary holds
the ground truth (findings, centres, boxes) for tests; files carry only what the real files carry.
Same arguments -> identical bytes, whatever `workers`.
"""

from __future__ import annotations

import csv
import hashlib
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from kdcli.shards.format import atomic_write_bytes
from kdcli.synth import _chest
from kdcli.synth._chest import FINDINGS

LAYOUTS = ("nih", "mimic")
GAZES = ("egd", "reflacx", "none")
NIH_PER_FOLDER = 40
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
CHEXPERT = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices")
TO_CHEXPERT = {"Nodule": "Lung Lesion", "Mass": "Lung Lesion", "Effusion": "Pleural Effusion",
               "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation", "Atelectasis": "Atelectasis",
               "Pneumothorax": "Pneumothorax"}
REFLACX_LABELS = ("Atelectasis", "Consolidation", "Pleural effusion", "Enlarged cardiac silhouette", "Pneumothorax",
                  "Lung nodule or mass", "Groundglass opacity", "Abnormal mediastinal contour", "Fracture",
                  "Pulmonary edema", "Support devices", "Other")
TO_REFLACX = {"Nodule": "Lung nodule or mass", "Mass": "Lung nodule or mass", "Effusion": "Pleural effusion",
              "Cardiomegaly": "Enlarged cardiac silhouette", "Consolidation": "Consolidation",
              "Atelectasis": "Atelectasis", "Pneumothorax": "Pneumothorax"}
EGD_HEADER = ("SESSION_ID,DICOM_ID,CNT,TIME(in secs),FPOGX,FPOGY,FPOGS,FPOGD,FPOGID,FPOGV,X_ORIGINAL,Y_ORIGINAL")
REFLACX_FIX_HEADER = (
    "timestamp_start_fixation,timestamp_end_fixation,x_position,y_position,pupil_area_normalized,"
    "angular_resolution_x_pixels_per_degree,angular_resolution_y_pixels_per_degree,window_width,window_level,"
    "xmin_shown_from_image,ymin_shown_from_image,xmax_shown_from_image,ymax_shown_from_image,"
    "xmin_in_screen_coordinates,ymin_in_screen_coordinates,xmax_in_screen_coordinates,ymax_in_screen_coordinates"
)
MIMIC_META = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
              "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
              "PatientOrientationCodeSequence_CodeMeaning")
SCREEN = (1920, 1080)
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's documented example root

# path, kind ("png8" | "png16" | "jpg" | "dcm1" | "dcm2"), anatomy, findings, size, render seed, dicom meta, draw
Job = tuple[str, str, dict, list, int, tuple, dict, bool]


# ---------------------------------------------------------------- small utilities


def _atomic_write(path: Path, data: bytes | str) -> None:
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def _csv_text(header: str, rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerows(rows)
    return header + "\n" + buf.getvalue()


def _hex(seed: int, *key: object, n: int = 8) -> str:
    return hashlib.blake2b(":".join(map(str, (seed, *key))).encode(), digest_size=n).hexdigest()


def _num(seed: int, *key: object) -> int:
    return int(_hex(seed, *key), 16)


def _f(v: float, nd: int = 3) -> str:
    return f"{v:.{nd}f}"


# ---------------------------------------------------------------- planning


def _plan_labels(per_class: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng([seed, 1])
    items: list[list[str]] = []
    for name in FINDINGS:
        for _ in range(per_class):
            fs = [name]
            if rng.random() < 0.25:  # multi-label: a second finding on another site
                other = [f for f in FINDINGS if f != name]
                fs.append(other[int(rng.integers(len(other)))])
            items.append(sorted(fs))
    items += [[] for _ in range(per_class * len(FINDINGS))]
    return [items[j] for j in rng.permutation(len(items))]


def _group_patients(n: int, seed: int) -> list[int]:
    """Patient index per image: consecutive runs of 1-3 follow-ups (~40% of patients have several)."""
    rng = np.random.default_rng([seed, 2])
    pat, p = [], 0
    while len(pat) < n:
        pat += [p] * int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
        p += 1
    return pat[:n]


def _pick_patients(rng: np.random.Generator, patients: list[int], frac: float) -> set[int]:
    uniq = sorted(set(patients))
    k = round(frac * len(uniq))
    return {uniq[i] for i in rng.permutation(len(uniq))[:k]}


# ---------------------------------------------------------------- rendering (workers)


def _dicom_bytes(img: np.ndarray, meta: dict, mono1: bool, bits: int) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    hi = (1 << bits) - 1
    raw = np.round(img * (hi - 200) + 100).astype(np.uint16)  # some headroom, like a real detector
    if mono1:
        raw = (hi - raw).astype(np.uint16)
    slope, intercept = meta["slope"], meta["intercept"]
    fm = FileMetaDataset()
    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    sop = generate_uid(_UID_ROOT, [meta["key"], "sop"])
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = _UID_ROOT + "1"
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID = generate_uid(_UID_ROOT, [meta["key"], "study"])
    ds.SeriesInstanceUID = generate_uid(_UID_ROOT, [meta["key"], "series"])
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", meta["view"], "CHEST"
    ds.PatientID, ds.PatientSex = meta["patient"], meta["sex"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.ImagerPixelSpacing = [meta["spacing"], meta["spacing"]]
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
    lo, top = float(raw.min()) * slope + intercept, float(raw.max()) * slope + intercept
    ds.WindowCenter, ds.WindowWidth = f"{(lo + top) / 2:.1f}", f"{max(top - lo, 1.0):.1f}"
    ds.PixelData = raw.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _render(job: Job) -> None:
    path, kind, anat, findings, size, rseed, meta, draw = job
    img = _chest.render(anat, findings, size, np.random.default_rng(list(rseed)), draw)
    if kind.startswith("dcm"):
        rng = np.random.default_rng([*rseed, 9])
        _atomic_write(Path(path), _dicom_bytes(img, meta, kind == "dcm1", int(rng.choice([12, 16]))))
        return
    if kind == "png16":
        ok, buf = cv2.imencode(".png", np.round(img * 65535).astype(np.uint16))
    else:
        ext, params = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]) if kind == "jpg" else (".png", [])
        ok, buf = cv2.imencode(ext, np.round(img * 255).astype(np.uint8), params)
    if not ok:  # pragma: no cover
        raise OSError(f"cv2 could not encode {path}")
    _atomic_write(Path(path), buf.tobytes())


# ---------------------------------------------------------------- gaze writers


def _egd(out: Path, items: list[dict], size: int) -> None:
    w_pad = round(size * SCREEN[0] / SCREEN[1])  # square image letterboxed to 16:9
    left = (w_pad - size) // 2
    right = w_pad - size - left
    master, fix = [], []
    for sess, it in enumerate(items, 1):
        names = set(it["findings"])
        chf = int(bool(names & {"Cardiomegaly", "Effusion"}))
        pneu = int("Consolidation" in names)
        master.append([it["stem"], it["egd_path"], it["patient"], 0, 0, left, right, int(not names), chf, pneu])
        t = float(_num(0, it["stem"]) % 1000) / 1000 + 1.0  # the session starts after a short lead-in
        for cnt, (x, y, d) in enumerate(it["gaze"]):
            xo, yo = x * size, y * size
            fx, fy = (xo + left) / w_pad, yo / size
            fix.append([sess, it["stem"], cnt, _f(t + d, 4), _f(fx, 5), _f(fy, 5), _f(t, 4), _f(d, 4), cnt + 1, 1,
                        int(np.floor(xo)), int(np.floor(yo))])
            t += d + 0.04
    hdr = ("dicom_id,path,patient_id,image_top_pad,image_bottom_pad,image_left_pad,image_right_pad,"
           "Normal,CHF,pneumonia")
    _atomic_write(out / "egd-cxr" / "master_sheet.csv", _csv_text(hdr, master))
    _atomic_write(out / "egd-cxr" / "fixations.csv", _csv_text(EGD_HEADER, fix))


def _reflacx(out: Path, items: list[dict], size: int, seed: int) -> dict[str, list[str]]:
    main = out / "reflacx" / "main_data"
    rng = np.random.default_rng([seed, 7])
    n = len(items)
    phase = np.where(np.arange(n) < max(1, round(0.1 * n)), 1, np.where(np.arange(n) < max(2, round(0.3 * n)), 2, 3))
    rows: dict[int, list[list]] = {1: [], 2: [], 3: []}
    ids: dict[str, list[str]] = {}
    scale = SCREEN[1] / size
    sx0 = (SCREEN[0] - size * scale) / 2
    for it, ph in zip(items, phase, strict=True):
        readers = (1, 2) if ph == 1 else (int(rng.integers(1, 6)),)
        for j, reader in enumerate(readers):
            rid = f"P{ph}0{reader}R{_num(seed, 'reflacx', it['stem'], j) % 900000 + 100000:06d}"
            ids.setdefault(it["stem"], []).append(rid)
            cert = {lab: 0 for lab in REFLACX_LABELS}
            ell = []
            for f in it["objects"]:
                c = int(rng.integers(3, 6))
                lab = TO_REFLACX[f["name"]]
                cert[lab] = max(cert[lab], c)
                x0, y0, x1, y1 = (np.array(f["box"]) + rng.normal(0, 0.01, 4)) * size
                ell.append([_f(x0, 1), _f(y0, 1), _f(x1, 1), _f(y1, 1), c] + [lab == k for k in REFLACX_LABELS])
            discarded = len(ids) % 8 == 2  # ~1 in 8 readings lost its eye tracking (calibration drift)
            rows[ph].append([rid, it["split3"], discarded, it["dicom_path"], it["stem"], it["patient"], size, size]
                            + [cert[k] for k in REFLACX_LABELS])
            gaze = it["gaze"] if j == 0 else _chest.fixations(rng, it["anat"], it["objects"])
            ppd = 45 / scale  # ~45 screen px per degree at the reading distance, in image pixels
            fix, t = [], 0.5
            for x, y, d in gaze:
                fix.append([_f(t, 3), _f(t + d, 3), _f(x * size, 2), _f(y * size, 2), _f(rng.uniform(0.3, 0.6), 4),
                            _f(ppd, 3), _f(ppd, 3), 256, 128, 0, 0, size, size,
                            round(sx0), 0, round(sx0 + size * scale), SCREEN[1]])
                t += d + 0.03
            d = main / rid
            _atomic_write(d / "fixations.csv", _csv_text(REFLACX_FIX_HEADER, fix))
            cb = np.array(_chest.chest_box(it["anat"])) * size
            _atomic_write(d / "chest_bounding_box.csv", _csv_text("xmin,ymin,xmax,ymax", [[_f(v, 1) for v in cb]]))
            _atomic_write(d / "anomaly_location_ellipses.csv",
                          _csv_text("xmin,ymin,xmax,ymax,certainty," + ",".join(REFLACX_LABELS), ell))
    hdr = ("id,split,eye_tracking_data_discarded,image,dicom_id,subject_id,image_size_x,image_size_y,"
           + ",".join(REFLACX_LABELS))
    for ph in (1, 2, 3):
        _atomic_write(main / f"metadata_phase_{ph}.csv", _csv_text(hdr, rows[ph]))
    return ids


# ---------------------------------------------------------------- main entry


def synth_cxr(
    out: Path,
    per_class: int = 6,
    size: int = 256,
    layout: str = "nih",
    gaze: str = "egd",
    annotated_fraction: float = 0.3,
    dicom_fraction: float = 0.0,
    seed: int = 0,
    workers: int = 1,
) -> dict:
    """Write a ChestX-ray14- or MIMIC-CXR-JPG-like phantom under `out`; see the module docstring.

    Returns {"root", "layout", "gaze", "labels": FINDINGS, "label_map": {finding: CheXpert/REFLACX name},
    "images": {name: {"path", "patient", "split", "findings", "centres": {f: [x, y]}, "boxes": {f: [x, y, w, h]},
    "annotated", "dicom", "monochrome1", "bits"}}, "annotated": [names], "reflacx_ids": {stem: [ids]},
    "counts": {finding or "No Finding": n}, "n_images", "n_patients"}. Names are Image Index (nih) or dicom_id
    (mimic); centres and boxes are in pixels of the written image.
    """
    return _synth(out, per_class, size, layout, gaze, annotated_fraction, dicom_fraction, seed, workers)


def _synth(out: Path, per_class: int, size: int, layout: str, gaze: str, annotated_fraction: float,
           dicom_fraction: float, seed: int, workers: int, draw: bool = True) -> dict:
    """synth_cxr; draw=False writes the very same chests, exposures and noise without findings (for tests)."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if size < 64:
        raise ValueError(f"size must be >= 64, got {size}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if gaze not in GAZES:
        raise ValueError(f"gaze must be one of {GAZES}, got {gaze!r}")
    for name, v in (("annotated_fraction", annotated_fraction), ("dicom_fraction", dicom_fraction)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    labels = _plan_labels(per_class, seed)
    n = len(labels)
    pat_of = _group_patients(n, seed)
    n_pat = pat_of[-1] + 1
    rng = np.random.default_rng([seed, 3])
    test_pats = _pick_patients(rng, pat_of, 0.2)
    val_pats = _pick_patients(rng, [p for p in pat_of if p not in test_pats], 0.1)
    ann_pats = _pick_patients(np.random.default_rng([seed, 4]), pat_of, annotated_fraction)
    dcm_rng = np.random.default_rng([seed, 5])
    is_dcm = np.zeros(n, bool)
    is_dcm[dcm_rng.permutation(n)[: round(dicom_fraction * n)]] = True
    mono1 = np.zeros(n, bool)
    dcm_idx = np.flatnonzero(is_dcm)
    mono1[dcm_idx[dcm_rng.permutation(len(dcm_idx))[: len(dcm_idx) // 2]]] = True
    png16 = np.zeros(n, bool)
    cand = np.flatnonzero(~is_dcm)
    if layout == "nih" and len(cand):
        png16[cand[np.random.default_rng([seed, 6]).permutation(len(cand))[: max(1, round(0.1 * n))]]] = True

    # patient-level facts
    pat_anat = [_chest.anatomy(np.random.default_rng([seed, 10, p])) for p in range(n_pat)]
    prng = np.random.default_rng([seed, 11])
    pat_age = prng.integers(18, 90, n_pat)
    pat_sex = prng.choice(["M", "F"], n_pat)
    subject = (10000000 + prng.choice(9000000, n_pat, replace=False)).tolist()
    studies = (50000000 + prng.choice(9000000, n, replace=False)).tolist()

    items, jobs = [], []
    follow = [0] * n_pat
    folders_used = set()
    for k in range(n):
        p = pat_of[k]
        fu, follow[p] = follow[p], follow[p] + 1
        irng = np.random.default_rng([seed, 20, k])
        anat = _chest.jitter(irng, pat_anat[p])
        objs = _chest.place_findings(np.random.default_rng([seed, 21, k]), anat, labels[k])
        view = "AP" if irng.random() < 0.3 else "PA"
        split = "test" if p in test_pats else ("validate" if p in val_pats else "train")
        if layout == "nih":
            stem = f"{p + 1:08d}_{fu:03d}"
            name = f"{stem}.png"
            folder = f"images_{k // NIH_PER_FOLDER + 1:03d}"
            folders_used.add(folder)
            rel = f"{folder}/images/{name}"
            dicom_path = rel
        else:
            sid = subject[p]
            study = studies[k]
            h = _hex(seed, "dicom", k, n=20)
            stem = "-".join(h[i:i + 8] for i in range(0, 40, 8))
            name = stem
            rel = f"files/p{str(sid)[:2]}/p{sid}/s{study}/{stem}.jpg"
            dicom_path = rel.replace(".jpg", ".dcm")
        kind = "dcm1" if mono1[k] else "dcm2" if is_dcm[k] else "png16" if png16[k] else (
            "png8" if layout == "nih" else "jpg")
        written = rel.rsplit(".", 1)[0] + ".dcm" if is_dcm[k] else rel
        meta = {"key": f"{seed}:{k}", "view": view, "patient": f"{p + 1:08d}", "sex": str(pat_sex[p]),
                "spacing": "0.143" if layout == "nih" else "0.139", "slope": 1.0,
                "intercept": 0.0 if irng.random() < 0.5 else -1024.0}
        jobs.append((str(out / written), kind, anat, objs, size, (seed, 30, k), meta, draw))
        ann = p in ann_pats
        g = _chest.fixations(np.random.default_rng([seed, 22, k]), anat, objs) if ann and gaze != "none" else None
        pid = p + 1 if layout == "nih" else subject[p]
        items.append({"k": k, "name": name, "stem": stem, "rel": rel, "written": written, "patient": pid,
                      "subject": subject[p], "study": None if layout == "nih" else int(rel.split("/")[3][1:]),
                      "findings": labels[k], "objects": objs, "anat": anat, "view": view, "follow": fu,
                      "split": split, "split3": split, "ann": ann, "gaze": g, "dicom_path": dicom_path,
                      "egd_path": dicom_path, "size": size, "age": int(pat_age[p]) + fu // 2, "sex": str(pat_sex[p])})

    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        for job in jobs:
            _render(job)

    if layout == "nih":
        _write_nih(out, items, seed)
    else:
        _write_mimic(out, items, seed, size)
    ann_items = [it for it in items if it["ann"]]
    reflacx_ids: dict[str, list[str]] = {}
    if gaze == "egd" and ann_items:
        _egd(out, ann_items, size)
    elif gaze == "reflacx" and ann_items:
        for it in ann_items:
            if layout == "nih":
                it["split3"] = "test" if it["split"] == "test" else "train"
        reflacx_ids = _reflacx(out, ann_items, size, seed)

    images = {}
    for it in items:
        images[it["name"]] = {
            "path": it["written"],
            "listed_path": it["rel"],
            "patient": it["patient"],
            "split": it["split"] if layout == "mimic" else ("test" if it["split"] == "test" else "train_val"),
            "findings": list(it["findings"]),
            "centres": {f["name"]: [f["cx"] * size, f["cy"] * size] for f in it["objects"]},
            "boxes": {f["name"]: [f["box"][0] * size, f["box"][1] * size, (f["box"][2] - f["box"][0]) * size,
                                  (f["box"][3] - f["box"][1]) * size] for f in it["objects"]},
            "annotated": it["ann"],
            "dicom": bool(is_dcm[it["k"]]),
            "monochrome1": bool(mono1[it["k"]]),
            "bits": 16 if png16[it["k"]] or is_dcm[it["k"]] else 8,
            "fixations": None if it["gaze"] is None else (it["gaze"][:, :2] * size).tolist(),
        }
    counts = {f: sum(f in it["findings"] for it in items) for f in FINDINGS}
    counts["No Finding"] = sum(not it["findings"] for it in items)
    return {
        "root": str(out),
        "layout": layout,
        "gaze": gaze,
        "labels": list(FINDINGS),
        "label_map": {"mimic": dict(TO_CHEXPERT), "reflacx": dict(TO_REFLACX), "bbox": {"Infiltration": "Infiltrate"}},
        "images": images,
        "annotated": [it["name"] for it in ann_items],
        "reflacx_ids": reflacx_ids,
        "counts": counts,
        "n_images": n,
        "n_patients": n_pat,
        "folders": sorted(folders_used),
    }


def _write_nih(out: Path, items: list[dict], seed: int) -> None:
    rows, boxes = [], []
    rng = np.random.default_rng([seed, 40])
    for it in items:
        w, h = int(rng.integers(2000, 3056)), int(rng.integers(2000, 3056))
        sp = "0.143" if rng.random() < 0.8 else "0.168"
        lab = "|".join(it["findings"]) or "No Finding"
        rows.append(f"{it['name']},{lab},{it['follow']},{it['patient']},{it['age']},{it['sex']},{it['view']},"
                    f"{w},{h},{sp},{sp},")
        if it["ann"]:
            for f in it["objects"]:
                x0, y0, x1, y1 = (float(v) * it["size"] for v in f["box"])
                boxes.append(f"{it['name']},{f['name']},{x0:.1f},{y0:.1f},{x1 - x0:.1f},{y1 - y0:.1f}")
    _atomic_write(out / "Data_Entry_2017.csv", "\n".join([NIH_HEADER, *rows]) + "\n")
    _atomic_write(out / "BBox_List_2017.csv", "\n".join([BBOX_HEADER, *boxes]) + "\n")
    tv = [it["name"] for it in items if it["split"] != "test"]
    te = [it["name"] for it in items if it["split"] == "test"]
    _atomic_write(out / "train_val_list.txt", "\n".join(tv) + "\n")
    _atomic_write(out / "test_list.txt", "\n".join(te) + ("\n" if te else ""))


def _write_mimic(out: Path, items: list[dict], seed: int, size: int) -> None:
    rng = np.random.default_rng([seed, 50])
    split, meta, chex = [], [], []
    for it in items:
        split.append([it["stem"], it["study"], it["subject"], it["split"]])
        date = 21100101 + int(rng.integers(0, 90)) * 10000 + int(rng.integers(0, 12)) * 100 + int(rng.integers(0, 28))
        hh, mm, ss, ms = (int(v) for v in rng.integers(0, [24, 60, 60, 1000]))
        tm = f"{hh:02d}{mm:02d}{ss:02d}.{ms:03d}"
        desc = "CHEST (PA AND LAT)" if it["view"] == "PA" else "CHEST (PORTABLE AP)"
        meta.append([it["stem"], it["subject"], it["study"], desc, it["view"], size, size, date, tm, desc,
                     "postero-anterior" if it["view"] == "PA" else "antero-posterior", "Erect"])
        vals = {c: "" for c in CHEXPERT}
        for f in it["findings"]:
            c = TO_CHEXPERT[f]
            vals[c] = "-1.0" if rng.random() < 0.3 and vals[c] != "1.0" else "1.0"
        if not it["findings"]:
            vals["No Finding"] = "1.0"
        for c in CHEXPERT[1:]:
            if vals[c] == "" and rng.random() < 0.1 and c not in {TO_CHEXPERT[f] for f in it["findings"]}:
                vals[c] = "0.0"  # explicitly negated in the report ("no effusion")
        chex.append([it["subject"], it["study"]] + [vals[c] for c in CHEXPERT])
    _atomic_write(out / "mimic-cxr-2.0.0-split.csv", _csv_text("dicom_id,study_id,subject_id,split", split))
    _atomic_write(out / "mimic-cxr-2.0.0-metadata.csv", _csv_text(MIMIC_META, meta))
    _atomic_write(out / "mimic-cxr-2.0.0-chexpert.csv", _csv_text("subject_id,study_id," + ",".join(CHEXPERT), chex))
