"""Deterministic chest X-ray phantoms with subtle findings, boxes and eye gaze on a subset, in real layouts.

Built for the two-stage coarse-to-fine CXR setting (van Sonsbeek et al., WACV 2023): global multi-label
labels on every image, plus eye-gaze fixations and disease boxes on an annotated subset only. Grey PA chests
(dark lungs, bright mediastinum and heart, ribs, clavicles, domed diaphragms, hilar vessels, exposure and noise
variation) carry lesions of seven ChestX-ray14 findings drawn where they occur: Nodule (small round opacity),
Mass (larger lobulated opacity), Consolidation (patchy opacity, mid/lower zone), Atelectasis (plate-like band,
lower zone), Effusion (basal opacity with a meniscus blunting the costophrenic angle), Cardiomegaly (a wider heart,
half as much taller; normal hearts vary by +-5%) and Pneumothorax (apical-lateral rim of air without lung
markings, darker, with a thin visceral pleural line), plus look-alike opacities that are no finding at all.

Generative story (what a distillation method can and cannot exploit here)
------------------------------------------------------------------------
CVI's roles: the X-ray is the student's modality, the gaze and the boxes (on a patient-wise subset) the teacher's.
1. Case latent. Every image ("case") draws a latent u first, from a random stream keyed by the case alone
   (seed, pool, case index) -- never by its class, split, patient or annotation:
     - a primary finding p, uniform over the 7, with severity s_p ~ U(0, 1), and with probability 0.3 a second
       finding q != p with its own s_q ~ U(0, 1); every other severity is 0 (no such lesion);
     - look-alike distractors, Poisson counts per kind drawn whatever the severities: nipple shadows (0.45 per
       image: a flat sharp-edged disc low in the lung, in both lungs 60% of the time), rib crossings (0.45: a
       nodule-like density where a posterior and an anterior rib cross) and soft-tissue overlap (0.3: a broad
       patchy opacity low and lateral, like consolidation), at 45-95% of a nodule's (consolidation's) contrast.
   Where each lesion and distractor lies (side, zone, place, shape) comes from a geometry stream keyed by the case
   too, inside the patient's lungs (the anatomy is per patient; follow-ups jitter it).
2. Label. Finding f is labelled present iff s_f > 0.5 (`_chest.THRESHOLD`): a thresholded score of u. Every "No
   Finding" image carries its primary lesion below the threshold (uniform: half of them below 0.25, barely
   there), and a fifth of the lesions lie within 0.1 of the threshold on either side: borderline cases. Exact
   counts by quota sampling: cases in stream order, each kept until its class (the most severe labelled finding,
   or No Finding) is full -- `per_class` per finding, 7 x `per_class` No Finding, as ChestX-ray14 is ~half normal;
   within a class the cases are i.i.d. from p(u | class).
3. Rendering. Both modalities render the very same lesions (place, shape, severity), each with its own gain:
     - the X-ray (student), weak and linear: peak contrast AMP x (0.1 + 1.2 s) x U(0.9, 1.1), i.e. 0.7 AMP at the
       threshold (`_chest.image_gain`); the heart 1 + 0.32 s wider, the effusion's height and the pneumothorax's
       air rim grow with s. Distractors are drawn at their own contrast, whatever the label;
     - the gaze (teacher), strong and concave: a share 0.7 w of the fixations gathers on the lesions, w = max over
       lesions of 1.15 s / (s + 0.15) (0.58 at s = 0.15, 0.88 at the threshold; `_chest.gaze_weight`), split
       between lesions in proportion to w; the rest roam the lungs and keep clear of the distractors (a reader
       recognises a nipple shadow and does not dwell on it); ~2% glance off the image. Boxes (BBox_List rows,
       REFLACX ellipses) mark the labelled lesions.
   So the annotation says where this image's lesions are, faint or not, and which opacity is a lesion and which
   a look-alike: what its label does not. Nuisance (anatomy, pose, exposure, gamma, noise, file formats) comes
   from streams of their own; the label never enters the pixels except through u.
4. Label noise (`label_noise` = rho in [0, 0.5)). In a TRAINING image (the split `prepare cxr` gives it with
   its defaults: MIMIC's train split; for ChestX-ray14 the train_val patients that its dev carve -- the same
   function, `kdcli.sources.cxr.nih_dev_patients` -- keeps in train) each lesion's label flips with probability
   min(1/2, c exp(-|s - 0.5| / 0.1)): borderline positives are missed and faint lesions called, as raters
   disagree; a finding without a lesion is never called. c is solved once on a reference sample so that rho of a
   training split's images change label set in expectation. At rho = 0.1 a lesion within 0.1 of the threshold
   flips 7x as often as one further away (25% vs 3.6%); at rho = 0.3 the borderline ones alone cannot supply the
   flips (50% vs 18%). Dev and test labels stay clean, pixels and annotations do not change, and
   `<out>/label_noise.csv` lists every flipped image with both label sets.
5. Negative control (`independent=True`): X-rays, labels and label noise byte-identical; the gaze and the boxes
   render a latent of their own, drawn from a stream of its own conditioned on the image's clean label (the same
   labelled findings, its own severities, places and distractors, in the same patient's lungs). The annotation
   then carries the label (a labelled Cardiomegaly still draws the gaze to the heart) and nothing beyond it: not
   where this image's lesion lies, not which opacity is a look-alike. A control whose gaze is drawn to
   distractors as much as to lesions would still say where the lesions are; this one says nothing the label does
   not, so a method's gain over its baseline must vanish there.

Sizes: `per_class` as above, split patient-wise ~72/8/20 (train/validate/test; ChestX-ray14 writes train +
validate as train_val_list.txt and `prepare` carves its own dev). `test_per_class` = T > 0: the test split is T per
finding and 7T No Finding from a case pool of its own (its own patients and streams), byte-identical whatever
`per_class` is, so one fixed, large test set sits beside training sets of every size; the main pool then splits
7/1 into train and validate. Unlabeled pool (`unlabeled` = N): N more images from a pool of their own, in the
stream's natural mix (no quota: nobody graded them; ~43% without a labelled finding), on patients of their own
(never a dev or test patient), with gaze on the patient-wise `annotated_fraction` of them and no box (a box
names its finding: a label). ChestX-ray14 layout: rows of Data_Entry_2017.csv whose Finding Labels field is
blank (Data_Entry is the metadata and the label file at once; the real release never leaves it blank, normals
say "No Finding"), listed in train_val_list.txt. MIMIC layout: rows of the split (train) and metadata CSVs whose
study is absent from the chexpert CSV, or (one in three) there with every finding blank. Their EGD master-sheet
and REFLACX label columns are blank. Patient ids: pool test from 70000001 (NIH) / subject 17000000, unlabeled
from 80000001 / 18000000. `<out>/latents.csv` holds every image's latent (severities, distractor counts, what the
annotation was drawn from), clean and listed labels and splits.

Calibration (knobs: `_chest.AMP`, `image_gain`, `gaze_weight`, `DISTRACTOR_RATE`, finding sizes, noise), measured
with `kdcli demo cxr --seeds 3 --per-class 40 --size 64 --epochs 20 --annotated 0.2` (560 images at 128 px
prepared at 64 px, timm test_resnet from scratch, patient-wise test split of ~110 images): stage 1 test mean
AUROC 0.626 +- 0.024 (seed 0: Pneumothorax 0.76, Mass 0.75, Cardiomegaly 0.65, Effusion 0.64, Nodule 0.61,
Consolidation 0.60, Atelectasis 0.56), control 0.622 +- 0.032, CVI 0.624 +- 0.030 (CVI - control +0.2 +- 0.2
points, 2 seeds up, 1 down). Without distractors (rates 0, seed 0) stage 1 reaches 0.733: the look-alikes cost
the image-only model ~8 points. The annotation carries what the label lacks: on the 13 annotated dev images of
seed 0 the posterior (which reads the gaze) beats the prior by 4-10 AUROC points in 9 of 10 epochs (0.72-0.78
vs 0.64-0.72; seeds 1 and 2 tie), yet the prior does not take it up: seed 0 with `-p kl_weight=0.1` 0.655 vs the
control's 0.659, with `-p attention_weight=1` 0.657; seed 0 with 560 unlabeled images (119 with gaze) `distill`
(default ratio 1) 0.656, without them 0.658. The pre-latent design (findings in class-fixed zones, every
positive at 0.75-1.15 AMP, no look-alikes) gave stage 1 0.77 with this command. `kdcli bench distill cxr --quick`
(32 px, 5 epochs, per_class 4 and 8, 2 seeds) stays near chance (stage 1 0.53-0.60) in both variants: too small
to say anything, every interval includes 0 (CVI - control -0.2..+0.6 points).

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
the ground truth (latent, lesions, distractors, centres, boxes) for tests; files carry only what the real files
carry. Same arguments -> identical bytes, whatever `workers`.
"""

from __future__ import annotations

import csv
import hashlib
import io
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, NamedTuple

import cv2
import numpy as np

from kdcli.extras import require
from kdcli.shards.format import atomic_write_bytes
from kdcli.sources.cxr import nih_dev_patients
from kdcli.synth import _chest
from kdcli.synth._chest import DISTRACTOR_RATE, DISTRACTORS, FINDINGS, THRESHOLD
from kdcli.synth._noise import scale_for_rate
from kdcli.synth._options import label_noise_field, seed_field, size_field, takes, workers_field

LAYOUTS = ("nih", "mimic")
GAZES = ("egd", "reflacx", "none")
FOR_DICOM = "DICOM phantoms (dicom_fraction > 0)"
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

# path, kind ("png8" | "png16" | "jpg" | "dcm1" | "dcm2"), anatomy, lesions, distractors, size, render seed,
# dicom meta, draw
Job = tuple[str, str, dict, list, list, int, tuple, dict, bool]

POOLS = ("main", "test", "unlabeled")  # case pools: per_class's, test_per_class's, unlabeled's
_POOL_ID = {pool: i for i, pool in enumerate(POOLS)}
# Stream keys (the entry after the seed): each random stream has its own, so no two streams ever coincide.
_ORDER, _PATIENTS, _SPLIT, _ANNOTATED, _DICOM, _PNG16, _READINGS = 1, 2, 3, 4, 5, 6, 7
_ANATOMY, _FACTS, _POSE, _GEOMETRY, _GAZE, _RENDER, _ENTRY, _CHEXPERT = 10, 11, 20, 21, 22, 30, 40, 50
_CASE, _FREE, _FREE_GEOMETRY, _NOISE, _REFERENCE = 60, 61, 62, 63, 64
SECOND_FINDING = 0.3  # share of cases with a lesion of a second kind
FLIP_MARGIN = 0.1  # M0: a lesion's label flips with probability ~ exp(-|s - threshold| / M0)
FLIP_CAP = 0.5  # no label is flipped more often than kept
# Identifier ranges per pool, so that the pools never share a patient, subject or study
NIH_PATIENT0 = {"main": 1, "test": 70_000_001, "unlabeled": 80_000_001}
MIMIC_SUBJECTS = {"main": (10_000_000, 7_000_000), "test": (17_000_000, 1_000_000),
                  "unlabeled": (18_000_000, 1_000_000)}
MIMIC_STUDIES = {"main": (50_000_000, 6_000_000), "test": (56_000_000, 1_000_000),
                 "unlabeled": (57_000_000, 1_000_000)}
POOL_CAPACITY = 100_000  # test or unlabeled images at most
LATENTS_NAME = "latents.csv"
NOISE_NAME = "label_noise.csv"


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


# ---------------------------------------------------------------- the case latent


class Latent(NamedTuple):
    """One image's latent (see the module docstring): a severity per finding (0: no such lesion) and how many
    look-alike distractors of each kind (_chest.DISTRACTORS) the film shows."""

    severity: tuple[float, ...]  # in FINDINGS order
    distractors: tuple[int, ...]

    def present(self) -> dict[str, float]:
        return {f: s for f, s in zip(FINDINGS, self.severity, strict=True) if s > 0}

    def labels(self) -> tuple[str, ...]:
        """The clean label: the findings whose severity exceeds the threshold."""
        return tuple(f for f, s in zip(FINDINGS, self.severity, strict=True) if s > THRESHOLD)

    def group(self) -> str:
        """The quota class: the most severe labelled finding, or "No Finding"."""
        labelled = [(s, f) for f, s in zip(FINDINGS, self.severity, strict=True) if s > THRESHOLD]
        return max(labelled)[1] if labelled else "No Finding"


def _draw_latent(rng: np.random.Generator) -> Latent:
    # every draw is made whatever the outcome, so a stream always holds the same number of draws per case
    primary = int(rng.integers(len(FINDINGS)))
    s_primary = float(rng.random())
    second = bool(rng.random() < SECOND_FINDING)
    other = int(rng.integers(len(FINDINGS) - 1))
    other += other >= primary
    s_other = float(rng.random())
    counts = rng.poisson([DISTRACTOR_RATE[k] for k in DISTRACTORS])
    severity = [0.0] * len(FINDINGS)
    severity[primary] = s_primary
    if second:
        severity[other] = s_other
    return Latent(tuple(severity), tuple(int(c) for c in counts))


def _case_latent(seed: int, pool: str, case: int) -> Latent:
    return _draw_latent(np.random.default_rng([seed, _CASE, _POOL_ID[pool], case]))


def _fill(seed: int, pool: str, count: int) -> list[tuple[int, Latent]]:
    """Cases in stream order, each kept until its class is full: `count` per finding (as the most severe
    labelled finding) and `count` x 7 without finding. Within a class, cases are i.i.d. from p(latent | class)."""
    want = {f: count for f in FINDINGS} | {"No Finding": count * len(FINDINGS)}
    kept: list[tuple[int, Latent]] = []
    case = 0
    while any(want.values()):
        latent = _case_latent(seed, pool, case)
        group = latent.group()
        if want[group]:
            kept.append((case, latent))
            want[group] -= 1
        case += 1
    return kept


def _free_latent(seed: int, pool: str, case: int, labels: tuple[str, ...]) -> Latent:
    """The negative control's annotation latent: a stream of its own, conditioned on the case's clean label."""
    rng = np.random.default_rng([seed, _FREE, _POOL_ID[pool], case])
    while True:
        latent = _draw_latent(rng)
        if latent.labels() == labels:
            return latent


@lru_cache(maxsize=16)
def _flip_scale(rho: float) -> float:
    """c such that a training split of this generator's class mix (half without finding) changes rho of its
    images' label sets in expectation, each lesion flipping with probability min(1/2, c exp(-|s - t| / M0))."""
    rng = np.random.default_rng([_REFERENCE])
    n = 200_000
    s_primary, second, s_other = rng.random(n), rng.random(n) < SECOND_FINDING, rng.random(n)
    positive = (s_primary > THRESHOLD) | (second & (s_other > THRESHOLD))
    near_primary = np.exp(-np.abs(s_primary - THRESHOLD) / FLIP_MARGIN)
    near_other = np.where(second, np.exp(-np.abs(s_other - THRESHOLD) / FLIP_MARGIN), 0.0)

    def rate(c: float) -> float:
        kept = 1 - (1 - np.minimum(FLIP_CAP, c * near_primary)) * (1 - np.minimum(FLIP_CAP, c * near_other))
        return 0.5 * float(kept[~positive].mean()) + 0.5 * float(kept[positive].mean())

    return scale_for_rate(rate, rho)


def flip_probabilities(latent: Latent, rho: float) -> np.ndarray:
    """Per finding, how likely a rater flips its label: only lesions that exist, mostly near the threshold."""
    s = np.asarray(latent.severity)
    if rho <= 0:
        return np.zeros(len(s))
    p = np.minimum(FLIP_CAP, _flip_scale(rho) * np.exp(-np.abs(s - THRESHOLD) / FLIP_MARGIN))
    return np.where(s > 0, p, 0.0)


def _noisy_labels(seed: int, pool: str, case: int, latent: Latent, rho: float) -> tuple[str, ...]:
    draws = np.random.default_rng([seed, _NOISE, _POOL_ID[pool], case]).random(len(FINDINGS))
    flip = draws < flip_probabilities(latent, rho)
    clean = set(latent.labels())
    return tuple(f for f, flipped in zip(FINDINGS, flip, strict=True) if (f in clean) != flipped)


# ---------------------------------------------------------------- planning: patients, splits


def _group_patients(n: int, seed: int, pool: str) -> list[int]:
    """Patient index per image: consecutive runs of 1-3 follow-ups (~40% of patients have several)."""
    rng = np.random.default_rng([seed, _PATIENTS, _POOL_ID[pool]])
    pat, p = [], 0
    while len(pat) < n:
        pat += [p] * int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
        p += 1
    return pat[:n]


def _pick_patients(rng: np.random.Generator, patients: list[int], frac: float) -> set[int]:
    uniq = sorted(set(patients))
    k = round(frac * len(uniq))
    return {uniq[i] for i in rng.permutation(len(uniq))[:k]}


def _pool_splits(pool: str, pat_of: list[int], seed: int, own_test: bool) -> list[str]:
    """"train" | "validate" | "test" per image of a pool, patient-wise."""
    if pool == "test":
        return ["test"] * len(pat_of)
    if pool == "unlabeled":
        return ["train"] * len(pat_of)
    rng = np.random.default_rng([seed, _SPLIT])
    test_pats = set() if own_test else _pick_patients(rng, pat_of, 0.2)
    val_pats = _pick_patients(rng, [p for p in pat_of if p not in test_pats], 0.125 if own_test else 0.1)
    return ["test" if p in test_pats else "validate" if p in val_pats else "train" for p in pat_of]


# ---------------------------------------------------------------- rendering (workers)


def _dicom_bytes(img: np.ndarray, meta: dict, mono1: bool, bits: int) -> bytes:
    require("pydicom", "cxr", FOR_DICOM)
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
    path, kind, anat, lesions, distractors, size, rseed, meta, draw = job
    img = _chest.render(anat, lesions, size, np.random.default_rng(list(rseed)), draw, distractors)
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
        if it["listed"] is None:  # the sheet's Normal/CHF/pneumonia are labels: blank on an unlabeled image
            flags = ["", "", ""]
        else:
            names = set(it["clean"])
            flags = [int(not names), int(bool(names & {"Cardiomegaly", "Effusion"})), int("Consolidation" in names)]
        master.append([it["stem"], it["dicom_path"], it["patient"], 0, 0, left, right, *flags])
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
    rows: dict[int, list[list]] = {1: [], 2: [], 3: []}
    ids: dict[str, list[str]] = {}
    scale = SCREEN[1] / size
    sx0 = (SCREEN[0] - size * scale) / 2
    for pool in POOLS:  # phases by position within each pool: a pool's readings do not depend on the others
        chosen = [it for it in items if it["pool"] == pool]
        n = len(chosen)
        phase = np.where(np.arange(n) < max(1, round(0.1 * n)), 1,
                         np.where(np.arange(n) < max(2, round(0.3 * n)), 2, 3))
        for position, (it, ph) in enumerate(zip(chosen, phase, strict=True)):
            rng = np.random.default_rng([seed, _READINGS, it["pool_id"], it["case"]])
            readers = (1, 2) if ph == 1 else (int(rng.integers(1, 6)),)
            split = "test" if it["split"] == "test" else ("validate" if it["split"] == "validate" else "train")
            for j, reader in enumerate(readers):
                rid = f"P{ph}0{reader}R{_num(seed, 'reflacx', it['stem'], j) % 900000 + 100000:06d}"
                ids.setdefault(it["stem"], []).append(rid)
                cert: dict[str, int | str] = {lab: 0 for lab in REFLACX_LABELS}
                if it["listed"] is None:  # the reading's label columns are labels: blank on an unlabeled image
                    cert = {lab: "" for lab in REFLACX_LABELS}
                ell = []
                for f in it["objects"]:
                    c = int(rng.integers(3, 6))
                    lab = TO_REFLACX[f["name"]]
                    cert[lab] = max(int(cert[lab]), c)
                    x0, y0, x1, y1 = (np.array(f["box"]) + rng.normal(0, 0.01, 4)) * size
                    ell.append([_f(x0, 1), _f(y0, 1), _f(x1, 1), _f(y1, 1), c] + [lab == k for k in REFLACX_LABELS])
                discarded = (position + j) % 8 == 2  # ~1 in 8 readings lost its eye tracking (calibration drift)
                rows[ph].append([rid, split, discarded, it["dicom_path"], it["stem"], it["patient"], size, size]
                                + [cert[k] for k in REFLACX_LABELS])
                gaze = it["gaze"] if j == 0 else _chest.fixations(rng, it["anat"], it["ann_lesions"],
                                                                   it["ann_distractors"])
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
                _atomic_write(d / "chest_bounding_box.csv", _csv_text("xmin,ymin,xmax,ymax",
                                                                      [[_f(v, 1) for v in cb]]))
                _atomic_write(d / "anomaly_location_ellipses.csv",
                              _csv_text("xmin,ymin,xmax,ymax,certainty," + ",".join(REFLACX_LABELS), ell))
    hdr = ("id,split,eye_tracking_data_discarded,image,dicom_id,subject_id,image_size_x,image_size_y,"
           + ",".join(REFLACX_LABELS))
    for ph in (1, 2, 3):
        _atomic_write(main / f"metadata_phase_{ph}.csv", _csv_text(hdr, rows[ph]))
    return ids


# ---------------------------------------------------------------- main entry


@dataclass
class CxrSynthOptions:
    """Chest X-ray phantoms: one latent per image (lesion severities and places) rendered faintly in the X-ray and
    strongly in the gaze and boxes, plus look-alike distractors that the gaze avoids."""

    out_help: ClassVar[str] = "Folder to write (NIH or MIMIC layout; gaze under egd-cxr/ or reflacx/)."

    per_class: int = field(default=6, metadata={"help": "Images per finding (plus as many without finding)."})
    size: int = size_field(256)
    layout: str = field(default="nih", metadata={"help": "nih (ChestX-ray14) or mimic (MIMIC-CXR-JPG)."})
    gaze: str = field(default="egd", metadata={"help": "egd, reflacx or none."})
    annotated_fraction: float = field(default=0.3, metadata={
        "help": "Fraction of images with gaze (and NIH boxes)."})
    dicom_fraction: float = field(default=0.0, metadata={"help": "Fraction written as DICOM (half MONOCHROME1)."})
    seed: int = seed_field()
    workers: int = workers_field()
    label_noise: float = label_noise_field(
        "Share of TRAINING images whose finding labels a rater flips, borderline lesions most often; dev/test "
        "stay clean; flips listed in label_noise.csv.")
    independent: bool = field(default=False, metadata={
        "help": "Negative control: gaze and boxes drawn from a latent of their own with the same labels; they "
                "carry nothing beyond them."})
    test_per_class: int = field(default=0, metadata={
        "help": "Test images per finding (plus 7x as many normal) from a case pool of their own, the same "
                "whatever --per-class is (0: 20% of the patients)."})
    unlabeled: int = field(default=0, metadata={
        "help": "Unlabeled training images (patients of their own): NIH rows with blank Finding Labels; MIMIC "
                "studies without a CheXpert label."})

    def report(self, summary: dict, out: Path) -> list[str]:
        return [f"wrote {summary['n_images']} labelled images ({self.layout} layout, gaze {self.gaze}, "
                f"{summary['design']} design) to {out}"
                + (f", {summary['n_unlabeled']} unlabeled" if self.unlabeled else "")
                + (f" (labels of {summary['flipped']} training images flipped, see {out / 'label_noise.csv'})"
                   if self.label_noise else "")]


@takes(CxrSynthOptions)
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
    *,
    label_noise: float = 0.0,
    independent: bool = False,
    test_per_class: int = 0,
    unlabeled: int = 0,
) -> dict:
    """Write a ChestX-ray14- or MIMIC-CXR-JPG-like phantom under `out`; see the module docstring.

    `label_noise` (rho in [0, 0.5)): boundary-biased rater flips of that share of the TRAINING images' labels
    (listed in label_noise.csv); `independent`: the negative control (gaze and boxes drawn from a latent of their
    own with the same clean label); `test_per_class` > 0: the test split from a pool of its own, the same whatever
    `per_class` is; `unlabeled`: that many images without labels, training patients of their own.
    Returns {"root", "layout", "gaze", "design", "label_noise", "labels": FINDINGS, "label_map",
    "images": {name: {"path", "listed_path", "patient", "pool", "split", "prepare_split", "unlabeled", "findings"
    (listed; None when unlabeled), "clean_findings", "severity": {finding: s}, "centres"/"boxes" (of the clean
    labelled findings, pixels), "lesions": {finding: {"severity", "centre", "box"}} (every lesion, labelled or
    not), "distractors": [{"kind", "spots": [[x, y, r]]}], "annotation_lesions" (what the gaze is drawn to),
    "annotated", "dicom", "monochrome1", "bits", "fixations"}}, "annotated": [names], "reflacx_ids": {stem: [ids]},
    "counts":
    {finding or "No Finding": n} (listed labels of the labelled images), "n_images" (labelled), "n_unlabeled",
    "n_patients", "flipped", "folders"}. Names are Image Index (nih) or dicom_id (mimic).
    """
    return _synth(out, per_class=per_class, size=size, layout=layout, gaze=gaze,
                  annotated_fraction=annotated_fraction, dicom_fraction=dicom_fraction, seed=seed, workers=workers,
                  label_noise=label_noise, independent=independent, test_per_class=test_per_class,
                  unlabeled=unlabeled)


def _check(per_class: int, size: int, layout: str, gaze: str, annotated_fraction: float, dicom_fraction: float,
           seed: int, workers: int, label_noise: float, test_per_class: int, unlabeled: int) -> None:
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
    if not 0.0 <= label_noise < FLIP_CAP:
        raise ValueError(f"label_noise must be in [0, {FLIP_CAP}), got {label_noise}")
    if test_per_class < 0 or unlabeled < 0:
        raise ValueError(f"test_per_class and unlabeled must be >= 0, got {test_per_class}, {unlabeled}")
    if unlabeled > POOL_CAPACITY or test_per_class * 2 * len(FINDINGS) > POOL_CAPACITY:
        raise ValueError(f"at most {POOL_CAPACITY} test or unlabeled images (their patient ids' range)")


def _synth(out: Path, *, per_class: int = 6, size: int = 256, layout: str = "nih", gaze: str = "egd",
           annotated_fraction: float = 0.3, dicom_fraction: float = 0.0, seed: int = 0, workers: int = 1,
           label_noise: float = 0.0, independent: bool = False, test_per_class: int = 0, unlabeled: int = 0,
           draw: bool = True) -> dict:
    """synth_cxr; draw=False writes the very same chests, distractors, exposures and noise without the lesions
    (for tests)."""
    _check(per_class, size, layout, gaze, annotated_fraction, dicom_fraction, seed, workers, label_noise,
           test_per_class, unlabeled)
    if dicom_fraction > 0:
        require("pydicom", "cxr", FOR_DICOM)  # before any image is rendered
    out = Path(out)
    pools = [("main", _fill(seed, "main", per_class))]
    if test_per_class:
        pools.append(("test", _fill(seed, "test", test_per_class)))
    if unlabeled:  # the natural mix: nobody graded them, so there is no class quota
        pools.append(("unlabeled", [(case, _case_latent(seed, "unlabeled", case)) for case in range(unlabeled)]))
    items: list[dict] = []
    jobs: list[Job] = []
    n_patients = 0
    for pool, cases in pools:
        planned, pool_jobs = _plan_pool(pool, cases, len(items), out, size, layout, gaze, annotated_fraction,
                                        dicom_fraction, seed, label_noise, independent, bool(test_per_class), draw)
        items += planned
        jobs += pool_jobs
        n_patients += len({it["patient"] for it in planned})

    if workers > 1:
        with ProcessPoolExecutor(workers) as pool_exec:
            list(pool_exec.map(_render, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        for job in jobs:
            _render(job)

    if layout == "nih":
        _write_nih(out, items, seed)
    else:
        _write_mimic(out, items, seed)
    ann_items = [it for it in items if it["ann"]]
    reflacx_ids: dict[str, list[str]] = {}
    if gaze == "egd" and ann_items:
        _egd(out, ann_items, size)
    elif gaze == "reflacx" and ann_items:
        reflacx_ids = _reflacx(out, ann_items, size, seed)
    _write_sidecars(out, items, label_noise)
    return _summary(out, items, layout, gaze, size, label_noise, independent, reflacx_ids, n_patients)


def _plan_pool(pool: str, cases: list[tuple[int, Latent]], first: int, out: Path, size: int, layout: str, gaze: str,
               annotated_fraction: float, dicom_fraction: float, seed: int, label_noise: float, independent: bool,
               own_test: bool, draw: bool) -> tuple[list[dict], list[Job]]:
    """The images of one case pool (main, test or unlabeled), from its own streams only: a pool's images do not
    depend on the other pools (a fixed test pool stays the same whatever per_class is)."""
    pid = _POOL_ID[pool]
    if pool != "unlabeled":
        order = np.random.default_rng([seed, _ORDER, pid]).permutation(len(cases))
        cases = [cases[i] for i in order]
    n = len(cases)
    pat_of = _group_patients(n, seed, pool)
    n_pat = pat_of[-1] + 1
    splits = _pool_splits(pool, pat_of, seed, own_test)
    ann_pats = _pick_patients(np.random.default_rng([seed, _ANNOTATED, pid]), pat_of, annotated_fraction)
    dcm_rng = np.random.default_rng([seed, _DICOM, pid])
    is_dcm = np.zeros(n, bool)
    is_dcm[dcm_rng.permutation(n)[: round(dicom_fraction * n)]] = True
    mono1 = np.zeros(n, bool)
    dcm_idx = np.flatnonzero(is_dcm)
    mono1[dcm_idx[dcm_rng.permutation(len(dcm_idx))[: len(dcm_idx) // 2]]] = True
    png16 = np.zeros(n, bool)
    cand = np.flatnonzero(~is_dcm)
    if layout == "nih" and len(cand):
        png16[cand[np.random.default_rng([seed, _PNG16, pid]).permutation(len(cand))[: max(1, round(0.1 * n))]]] = True

    # patient-level facts
    pat_anat = [_chest.anatomy(np.random.default_rng([seed, _ANATOMY, pid, p])) for p in range(n_pat)]
    prng = np.random.default_rng([seed, _FACTS, pid])
    pat_age = prng.integers(18, 90, n_pat)
    pat_sex = prng.choice(["M", "F"], n_pat)
    base, span = MIMIC_SUBJECTS[pool]
    subject = (base + prng.choice(span, n_pat, replace=False)).tolist()
    base, span = MIMIC_STUDIES[pool]
    studies = (base + prng.choice(span, n, replace=False)).tolist()
    nih_id = [NIH_PATIENT0[pool] + p for p in range(n_pat)]
    pid_of = nih_id if layout == "nih" else subject
    prepare_split = _prepare_splits(layout, pool, splits, [pid_of[p] for p in pat_of])

    items, jobs = [], []
    follow = [0] * n_pat
    for position, (case, latent) in enumerate(cases):
        k = first + position
        p = pat_of[position]
        fu, follow[p] = follow[p], follow[p] + 1
        pose = np.random.default_rng([seed, _POSE, pid, case])
        anat = _chest.jitter(pose, pat_anat[p])
        view = "AP" if pose.random() < 0.3 else "PA"
        geometry = np.random.default_rng([seed, _GEOMETRY, pid, case])
        lesions = _chest.place_findings(geometry, anat, latent.present())
        distractors = _chest.place_distractors(geometry, anat, dict(zip(DISTRACTORS, latent.distractors,
                                                                        strict=True)))
        clean = latent.labels()
        shown, ann_lesions, ann_distractors = latent, lesions, distractors
        if independent:  # the annotation renders a latent of its own, with the same clean label only
            shown = _free_latent(seed, pool, case, clean)
            free = np.random.default_rng([seed, _FREE_GEOMETRY, pid, case])
            ann_lesions = _chest.place_findings(free, anat, shown.present())
            ann_distractors = _chest.place_distractors(free, anat, dict(zip(DISTRACTORS, shown.distractors,
                                                                            strict=True)))
        if pool == "unlabeled":
            listed = None
        elif label_noise > 0 and prepare_split[position] == "train":
            listed = _noisy_labels(seed, pool, case, latent, label_noise)
        else:
            listed = clean
        if layout == "nih":
            stem = f"{nih_id[p]:08d}_{fu:03d}"
            name = f"{stem}.png"
            folder = f"images_{k // NIH_PER_FOLDER + 1:03d}"
            rel = f"{folder}/images/{name}"
            dicom_path = rel
        else:
            sid, study = subject[p], studies[position]
            h = _hex(seed, "dicom", pool, case, n=20)
            stem = "-".join(h[i:i + 8] for i in range(0, 40, 8))
            name = stem
            rel = f"files/p{str(sid)[:2]}/p{sid}/s{study}/{stem}.jpg"
            dicom_path = rel.replace(".jpg", ".dcm")
        kind = "dcm1" if mono1[position] else "dcm2" if is_dcm[position] else "png16" if png16[position] else (
            "png8" if layout == "nih" else "jpg")
        written = rel.rsplit(".", 1)[0] + ".dcm" if is_dcm[position] else rel
        meta = {"key": f"{seed}:{pool}:{case}", "view": view, "patient": f"{pid_of[p]:08d}",
                "sex": str(pat_sex[p]), "spacing": "0.143" if layout == "nih" else "0.139", "slope": 1.0,
                "intercept": 0.0 if pose.random() < 0.5 else -1024.0}
        jobs.append((str(out / written), kind, anat, lesions, distractors, size, (seed, _RENDER, pid, case), meta,
                     draw))
        ann = p in ann_pats
        fixations = None
        if ann and gaze != "none":
            fixations = _chest.fixations(np.random.default_rng([seed, _GAZE, pid, case]), anat, ann_lesions,
                                         ann_distractors)
        # a box (and a REFLACX ellipse) names its finding, i.e. is a label: none on unlabeled images
        boxed = [] if listed is None else [f for f in ann_lesions if f["severity"] > THRESHOLD]
        items.append({"k": k, "pool": pool, "pool_id": pid, "case": case, "position": position, "name": name,
                      "stem": stem, "rel": rel, "written": written, "patient": pid_of[p], "subject": subject[p],
                      "study": None if layout == "nih" else studies[position], "latent": latent, "shown": shown,
                      "clean": clean, "listed": listed, "lesions": lesions, "distractors": distractors,
                      "ann_lesions": ann_lesions, "ann_distractors": ann_distractors, "objects": boxed,
                      "anat": anat, "view": view, "follow": fu, "split": splits[position],
                      "prepare_split": prepare_split[position], "ann": ann, "gaze": fixations,
                      "dicom_path": dicom_path, "size": size, "age": int(pat_age[p]) + fu // 2,
                      "sex": str(pat_sex[p]), "dicom": bool(is_dcm[position]), "mono1": bool(mono1[position]),
                      "bits": 16 if png16[position] or is_dcm[position] else 8})
    return items, jobs


def _prepare_splits(layout: str, pool: str, splits: list[str], patients: list[int]) -> list[str]:
    """The split `prepare cxr` gives each image with its defaults: MIMIC's official one (validate -> dev); for
    ChestX-ray14 the official test list, and dev carved from train_val by the source's own function
    (dev_fraction 0.1, split seed 0; patients with unlabeled images stay in train)."""
    if layout == "mimic":
        return [{"train": "train", "validate": "dev", "test": "test"}[s] for s in splits]
    if pool != "main":
        return ["test" if s == "test" else "train" for s in splits]
    dev = nih_dev_patients({str(p) for p, s in zip(patients, splits, strict=True) if s != "test"}, 0.1, 0)
    return ["test" if s == "test" else "dev" if str(p) in dev else "train"
            for p, s in zip(patients, splits, strict=True)]


def _pixels(box: tuple[float, float, float, float], size: int) -> list[float]:
    return [box[0] * size, box[1] * size, (box[2] - box[0]) * size, (box[3] - box[1]) * size]


def _summary(out: Path, items: list[dict], layout: str, gaze: str, size: int, label_noise: float,
             independent: bool, reflacx_ids: dict[str, list[str]], n_patients: int) -> dict:
    images = {}
    for it in items:
        labelled = {f["name"]: f for f in it["lesions"] if f["severity"] > THRESHOLD}
        images[it["name"]] = {
            "path": it["written"],
            "listed_path": it["rel"],
            "patient": it["patient"],
            "pool": it["pool"],
            "split": it["split"] if layout == "mimic" else ("test" if it["split"] == "test" else "train_val"),
            "prepare_split": it["prepare_split"],
            "unlabeled": it["listed"] is None,
            "findings": None if it["listed"] is None else list(it["listed"]),
            "clean_findings": list(it["clean"]),
            "severity": {f: round(s, 6) for f, s in it["latent"].present().items()},
            "centres": {n: [f["cx"] * size, f["cy"] * size] for n, f in labelled.items()},
            "boxes": {n: _pixels(f["box"], size) for n, f in labelled.items()},
            "lesions": {f["name"]: {"severity": f["severity"], "centre": [f["cx"] * size, f["cy"] * size],
                                    "box": _pixels(f["box"], size)} for f in it["lesions"]},
            "distractors": [{"kind": d["kind"], "spots": [[x * size, y * size, r * size] for x, y, r in d["blobs"]]}
                            for d in it["distractors"]],
            "annotation_lesions": {f["name"]: [f["cx"] * size, f["cy"] * size] for f in it["ann_lesions"]},
            "annotated": it["ann"],
            "dicom": it["dicom"],
            "monochrome1": it["mono1"],
            "bits": it["bits"],
            "fixations": None if it["gaze"] is None else (it["gaze"][:, :2] * size).tolist(),
        }
    labelled_items = [it for it in items if it["listed"] is not None]
    counts = {f: sum(f in it["listed"] for it in labelled_items) for f in FINDINGS}
    counts["No Finding"] = sum(not it["listed"] for it in labelled_items)
    return {
        "root": str(out),
        "layout": layout,
        "gaze": gaze,
        "design": "independent" if independent else "shared",
        "label_noise": label_noise,
        "labels": list(FINDINGS),
        "label_map": {"mimic": dict(TO_CHEXPERT), "reflacx": dict(TO_REFLACX), "bbox": {"Infiltration": "Infiltrate"}},
        "images": images,
        "annotated": [it["name"] for it in items if it["ann"]],
        "reflacx_ids": reflacx_ids,
        "counts": counts,
        "n_images": len(labelled_items),
        "n_unlabeled": len(items) - len(labelled_items),
        "n_patients": n_patients,
        "flipped": sum(it["listed"] != it["clean"] for it in labelled_items),
        "folders": sorted({it["rel"].split("/")[0] for it in items}) if layout == "nih" else [],
    }


def _label_text(labels: tuple[str, ...] | None) -> str:
    return "" if labels is None else "|".join(labels) or "No Finding"


def _write_sidecars(out: Path, items: list[dict], label_noise: float) -> None:
    header = ["name", "pool", "split", "prepare_split", "patient", "annotated", "clean", "listed",
              *[f"severity_{f}" for f in FINDINGS], *[f"distractors_{k}" for k in DISTRACTORS], "annotation_lesions"]
    rows = [[it["name"], it["pool"], it["split"], it["prepare_split"], it["patient"], int(it["ann"]),
             _label_text(it["clean"]), _label_text(it["listed"]), *[f"{s:.6f}" for s in it["latent"].severity],
             *it["latent"].distractors, "|".join(f"{f}:{s:.4f}" for f, s in it["shown"].present().items())]
            for it in items]
    _atomic_write(out / LATENTS_NAME, _csv_text(",".join(header), rows))
    if label_noise > 0:
        flipped = [[it["name"], _label_text(it["clean"]), _label_text(it["listed"])] for it in items
                   if it["listed"] is not None and it["listed"] != it["clean"]]
        _atomic_write(out / NOISE_NAME, _csv_text("name,clean_labels,noisy_labels", flipped))


def _write_nih(out: Path, items: list[dict], seed: int) -> None:
    rows, boxes = [], []
    for it in items:
        rng = np.random.default_rng([seed, _ENTRY, it["pool_id"], it["case"]])
        w, h = int(rng.integers(2000, 3056)), int(rng.integers(2000, 3056))
        sp = "0.143" if rng.random() < 0.8 else "0.168"
        # an unlabeled image: listed (Data_Entry is the metadata too) with its Finding Labels field blank
        rows.append(f"{it['name']},{_label_text(it['listed'])},{it['follow']},{it['patient']},{it['age']},"
                    f"{it['sex']},{it['view']},{w},{h},{sp},{sp},")
        if it["ann"]:
            for f in it["objects"]:
                x0, y0, bw, bh = _pixels(f["box"], it["size"])
                boxes.append(f"{it['name']},{f['name']},{x0:.1f},{y0:.1f},{bw:.1f},{bh:.1f}")
    _atomic_write(out / "Data_Entry_2017.csv", "\n".join([NIH_HEADER, *rows]) + "\n")
    _atomic_write(out / "BBox_List_2017.csv", "\n".join([BBOX_HEADER, *boxes]) + "\n")
    tv = [it["name"] for it in items if it["split"] != "test"]
    te = [it["name"] for it in items if it["split"] == "test"]
    _atomic_write(out / "train_val_list.txt", "\n".join(tv) + "\n")
    _atomic_write(out / "test_list.txt", "\n".join(te) + ("\n" if te else ""))


def _write_mimic(out: Path, items: list[dict], seed: int) -> None:
    split, meta, chex = [], [], []
    for it in items:
        rng = np.random.default_rng([seed, _CHEXPERT, it["pool_id"], it["case"]])
        split.append([it["stem"], it["study"], it["subject"], it["split"]])
        date = 21100101 + int(rng.integers(0, 90)) * 10000 + int(rng.integers(0, 12)) * 100 + int(rng.integers(0, 28))
        hh, mm, ss, ms = (int(v) for v in rng.integers(0, [24, 60, 60, 1000]))
        tm = f"{hh:02d}{mm:02d}{ss:02d}.{ms:03d}"
        desc = "CHEST (PA AND LAT)" if it["view"] == "PA" else "CHEST (PORTABLE AP)"
        meta.append([it["stem"], it["subject"], it["study"], desc, it["view"], it["size"], it["size"], date, tm, desc,
                     "postero-anterior" if it["view"] == "PA" else "antero-posterior", "Erect"])
        if it["listed"] is None:  # unlabeled: no chexpert row, or (one in three) a row with every finding blank
            if it["position"] % 3 == 1:
                chex.append([it["subject"], it["study"]] + [""] * len(CHEXPERT))
            continue
        vals = {c: "" for c in CHEXPERT}
        for f in it["listed"]:
            c = TO_CHEXPERT[f]
            vals[c] = "-1.0" if rng.random() < 0.3 and vals[c] != "1.0" else "1.0"
        if not it["listed"]:
            vals["No Finding"] = "1.0"
        mentioned = {TO_CHEXPERT[f] for f in it["listed"]}
        for c in CHEXPERT[1:]:
            if vals[c] == "" and rng.random() < 0.1 and c not in mentioned:
                vals[c] = "0.0"  # explicitly negated in the report ("no effusion")
        chex.append([it["subject"], it["study"]] + [vals[c] for c in CHEXPERT])
    _atomic_write(out / "mimic-cxr-2.0.0-split.csv", _csv_text("dicom_id,study_id,subject_id,split", split))
    _atomic_write(out / "mimic-cxr-2.0.0-metadata.csv", _csv_text(MIMIC_META, meta))
    _atomic_write(out / "mimic-cxr-2.0.0-chexpert.csv", _csv_text("subject_id,study_id," + ",".join(CHEXPERT), chex))
